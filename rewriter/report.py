"""Terminal rendering of the run report (the JSON document of ``rewriter.api``)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def _fmt_err(x: Any) -> str:
    if x is None:
        return "-"
    return f"{x:.2e}" if isinstance(x, float) else str(x)


def op_count_table(before: dict[str, int], after: dict[str, int], *, changed_only: bool = False) -> Table:
    t = Table(title="op counts", title_justify="left")
    t.add_column("op")
    t.add_column("before", justify="right")
    t.add_column("after", justify="right")
    t.add_column("delta", justify="right")
    for op in sorted(set(before) | set(after), key=lambda o: (-(before.get(o, 0)), o)):
        b, a = before.get(op, 0), after.get(op, 0)
        if changed_only and a == b:
            continue
        d = a - b
        style = "green" if d < 0 else ("yellow" if d > 0 else "")
        t.add_row(op, str(b), str(a), f"[{style}]{d:+d}[/]" if d else "0")
    t.add_row("[b]total[/]", str(sum(before.values())), str(sum(after.values())),
              f"{sum(after.values()) - sum(before.values()):+d}")
    return t


def sites_table(passes: list[dict[str, Any]]) -> Table:
    t = Table(title="sites", title_justify="left")
    t.add_column("pass")
    t.add_column("site")
    t.add_column("status")
    t.add_column("reason", overflow="fold")
    for p in passes:
        for s in p.get("sites", []):
            t.add_row(p["name"], s["site"], "[green]applied[/]", s.get("reason", ""))
        for s in p.get("declined", []):
            t.add_row(p["name"], s["site"], "[yellow]declined[/]", s["reason"])
    return t


def render(report: dict[str, Any], console: Console | None = None) -> None:
    """Print a run report: passes, sites, op-count diff and numerics."""
    console = console or Console()
    pt = Table(title="passes", title_justify="left")
    for col in ("pass", "kind", "applied", "declined", "seconds", "max rel err", "verified"):
        pt.add_column(col, justify="right" if col in ("applied", "declined", "seconds", "max rel err") else "left")
    for p in report["passes"]:
        v = p.get("verification") or {}
        verdict = "-" if not v else ("[green]yes[/]" if v.get("passed") else "[red]NO[/]")
        pt.add_row(p["name"], p["kind"], str(p["applied"]), str(len(p["declined"])),
                   f"{p['seconds']:.3f}", _fmt_err(v.get("max_rel_error")), verdict)
    console.print(pt)
    metric_rows = [(p["name"], o) for p in report["passes"] for o in ((p.get("verification") or {}).get("outputs") or [])
                   if "budget" in o]
    if metric_rows:  # approximate passes judged by a budget metric: the metric per output and pass
        mt = Table(title="approximate passes: error per output", title_justify="left")
        for col in ("pass", "output", "rel Frobenius err", "mean cosine", "min cosine", "budget", "ok"):
            mt.add_column(col)
        for name, o in metric_rows:
            mt.add_row(name, o["name"], _fmt_err(o.get("rel_fro_error")), _cos(o.get("cosine")),
                       _cos(o.get("min_cosine")), o["budget"], "[green]yes[/]" if o["passed"] else "[red]NO[/]")
        console.print(mt)
    if any(p.get("sites") or p.get("declined") for p in report["passes"]):
        console.print(sites_table(report["passes"]))
    ops = report["diff"]["op_counts"]
    console.print(op_count_table(ops["before"], ops["after"]))
    diff = report["diff"]
    console.print(f"parameters: {diff['params']['before']:,} -> {diff['params']['after']:,}  "
                  f"bytes: {diff['bytes']['before']:,} -> {diff['bytes']['after']:,}")
    v = report["verification"]
    if not v.get("performed", True):
        console.print("[yellow]verification skipped (--no-verify)[/]")
        return
    nt = Table(title="numerics (original vs rewritten)", title_justify="left")
    for col in ("output", "max abs err", "max rel err", "tolerance", "ok"):
        nt.add_column(col)
    for o in v.get("outputs", []):
        if "error" in o:
            nt.add_row(o["name"], "-", "-", "-", f"[red]{o['error']}[/]")
            continue
        nt.add_row(o["name"], _fmt_err(o["max_abs_error"]), _fmt_err(o["max_rel_error"]),
                   _fmt_err(o["tolerance"]), "[green]yes[/]" if o["passed"] else "[red]NO[/]")
    console.print(nt)
    for note in v.get("notes", []):
        console.print(f"[dim]note: {note}[/]")


def _cos(x: Any) -> str:
    return "-" if x is None else f"{x:.4f}"


def _ms(x: Any) -> str:
    return "-" if x is None else f"{x:.4f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _short(label: str, n: int = 24) -> str:
    return label if len(label) <= n else "…" + label[-(n - 1):]


def _share(row: dict[str, Any], side: str, rows: list[dict[str, Any]]) -> float | None:
    """``row``'s share of ``side``'s profiled total (computed from the ms when an older
    report has no ``*_share`` key)."""
    if f"{side}_share" in row:
        return row[f"{side}_share"]
    total = sum(r[f"{side}_ms"] for r in rows)
    return row[f"{side}_ms"] / total if total > 0 else None


def profiled_side(lat: dict[str, Any], side: str) -> dict[str, Any] | None:
    """The timing record the op-type profile's ``side`` column belongs to: for a stateful
    model the ``after`` column is the profiled phase's row (a sparse step), not the
    schedule's mean step."""
    if side == "after" and lat.get("profiled_phase") and lat.get("phases"):
        return next((r for r in lat["phases"] if r["phase"] == lat["profiled_phase"]), lat.get(side))
    return lat.get(side)


def profile_note(lat: dict[str, Any]) -> str:
    """One line: the profiled totals next to the wall-clock p50, and why they differ."""
    parts = []
    for side in ("before", "after"):
        s = profiled_side(lat, side)
        if s and s.get("profiled_ms") is not None:
            parts.append(f"{_short(s['label'])}: {s['profiled_ms']:.4f} ms profiled vs {s['p50_ms']:.4f} ms p50")
    totals = ("; ".join(parts) + ". ") if parts else ""
    return (totals + "The per-op times come from a separate profiled run: profiling adds overhead to every "
            "kernel and leaves out the time between kernels, so their total is not the wall-clock latency. "
            "Compare shares; time with the p50.")


def latency_tables(lat: dict[str, Any]) -> list[Table]:
    """The latency section: p50/p90 before/after with the speedup, per op type, per pass."""
    eng = lat["engine"] + (f" {','.join(lat.get('providers') or [])}" if lat.get("providers") else "")
    t = Table(title=f"latency ({eng}, {lat['runs']} interleaved samples x {lat.get('inner', 1)} calls, ms/call)",
              title_justify="left")
    for col in ("model", "p50 ms", "p90 ms", "min ms"):
        t.add_column(col, justify="left" if col == "model" else "right")
    if lat.get("phases"):
        return [phase_table(lat)] + _detail_tables(lat)
    for side in ("before", "after"):
        s = lat.get(side)
        if s:
            t.add_row(escape(s["label"]), _ms(s["p50_ms"]), _ms(s["p90_ms"]), _ms(s.get("min_ms")))
    if lat.get("speedup") is not None:
        sp = lat["speedup"]
        style = "green" if sp >= 1 else "red"
        t.add_row("[b]speedup[/] (paired median)", f"[{style}]{sp:.3f}x[/]", "", "")
    return [t] + _detail_tables(lat)


def _x(sp: Any) -> str:
    if sp is None:
        return "-"
    return f"[{'green' if sp >= 1 else 'red'}]{sp:.3f}x[/]"


def phase_table(lat: dict[str, Any]) -> Table:
    """A stateful model's latency: the original, each phase (its step, how many of the
    schedule's steps it runs, where its state came from) and the schedule, each row named."""
    eng = lat["engine"] + (f" {','.join(lat.get('providers') or [])}" if lat.get("providers") else "")
    sch = lat["schedule"]
    t = Table(title=f"latency per phase ({eng}, {lat['runs']} interleaved samples x {lat.get('inner', 1)} calls, "
                    f"ms/call)", title_justify="left")
    for col in ("phase", "step", "steps of schedule", "p50 ms", "p90 ms", "speedup"):
        t.add_column(col, justify="left" if col == "phase" else "right")
    b = lat["before"]
    t.add_row("original" if b["label"] == "original" else f"original ({escape(b['label'])})", "any", str(sch["steps"]), _ms(b["p50_ms"]), _ms(b["p90_ms"]), "")
    for r in lat["phases"]:
        t.add_row(f"{r['phase']} step (state from {r.get('state_from', '-')})", str(r["step"]), str(r["count"]),
                  _ms(r["p50_ms"]), _ms(r["p90_ms"]), _x(r["speedup"]))
    a = lat["after"]
    t.add_row(f"[b]schedule[/] ({schedule_words(sch)}; mean step)", f"0-{sch['steps'] - 1}", str(sch["steps"]),
              _ms(a["p50_ms"]), _ms(a["p90_ms"]), _x(lat.get("speedup")))
    return t


def schedule_words(sch: dict[str, Any]) -> str:
    """``20 steps: 5 dense, 3 refresh, 12 sparse``."""
    c = sch["counts"]
    return f"{sch['steps']} steps: " + ", ".join(f"{c[p]} {p}" for p in ("dense", "refresh", "sparse") if c.get(p))


def latency_line(lat: dict[str, Any]) -> str:
    """One line of the latency section for the summary."""
    eng = lat.get("backend") or lat["engine"]
    if lat.get("phases"):
        sp = {r["phase"]: r["speedup"] for r in lat["phases"]}
        parts = ", ".join(f"{p} {sp[p]:.2f}x" for p in ("sparse", "refresh", "dense") if p in sp)
        return (f"latency ({eng}): {schedule_words(lat['schedule'])} -> {lat['speedup']:.3f}x "
                f"(per step: {parts}); paired medians of {lat['runs']} interleaved samples")
    a, b = lat.get("after"), lat["before"]
    if not a or lat.get("speedup") is None:
        return f"latency ({eng}): {b['p50_ms']:.3f} ms p50"
    return (f"latency ({eng}): {b['p50_ms']:.3f} -> {a['p50_ms']:.3f} ms p50, {lat['speedup']:.3f}x "
            f"(paired median of {lat['runs']} interleaved samples)")


def _detail_tables(lat: dict[str, Any]) -> list[Table]:
    tables = []
    ops = lat.get("op_types") or []
    if ops:
        sides = [s for s in ("before", "after") if lat.get(s)]
        what = f" ({lat['profiled_phase']} step)" if lat.get("profiled_phase") else ""
        ot = Table(title=f"time per op type{what}: share of the profiled total", title_justify="left",
                   caption=escape(profile_note(lat)), caption_justify="left")
        ot.add_column("op")
        for s in sides:
            ot.add_column(escape(_short(profiled_side(lat, s)["label"])) + " %", justify="right")
        for r in ops[:20]:
            ot.add_row(r["op"], *(_pct(_share(r, s, ops)) for s in sides))
        tables.append(ot)
    if lat.get("per_pass"):
        pt = Table(title="latency per pass (after each prefix)", title_justify="left")
        for col in ("after pass", "p50 ms", "speedup", "cumulative"):
            pt.add_column(col, justify="left" if col == "after pass" else "right")
        for r in lat["per_pass"]:
            pt.add_row(r["pass"], _ms(r["p50_ms"]), "-" if r["speedup"] is None else f"{r['speedup']:.3f}x",
                       "-" if r["cumulative_speedup"] is None else f"{r['cumulative_speedup']:.3f}x")
        tables.append(pt)
    return tables


def node_diff_table(diff: dict[str, Any], *, limit: int = 40) -> Table | None:
    """Nodes added, removed and changed (with the pass that did it), when the diff has them."""
    nodes = diff.get("nodes")
    if not nodes:
        return None
    n_changes = len(nodes["added"]) + len(nodes["removed"]) + len(nodes["changed"])
    t = Table(title=f"nodes: {nodes['before']} -> {nodes['after']} (+{len(nodes['added'])} "
                    f"-{len(nodes['removed'])} ~{len(nodes['changed'])}, {nodes['unchanged']} unchanged)",
              title_justify="left")
    for col in ("change", "op", "node", "pass", "what"):
        t.add_column(col, overflow="fold")
    style = {"added": "green", "removed": "red", "changed": "yellow"}
    shown = 0
    for kind in ("added", "removed", "changed"):
        for e in nodes[kind]:
            if shown == limit:
                break
            shown += 1
            what = ", ".join(e.get("what", []) + (["dead"] if e.get("dead") else []))
            t.add_row(f"[{style[kind]}]{kind}[/]", e["op"], e["name"], e.get("pass", ""), what)
    if n_changes > shown:
        t.add_row("…", "", f"{n_changes - shown} more (see --json)", "", "")
    return t


def shape_changes_table(diff: dict[str, Any]) -> Table | None:
    """Tensors whose shape changed and input/output signature changes."""
    widths = diff.get("widths") or []
    io = diff.get("io") or {}
    io_rows = [(side, kind, e) for side in ("inputs", "outputs") for kind in ("added", "removed", "changed")
               for e in io.get(side, {}).get(kind, [])]
    if not widths and not io_rows:
        return None
    t = Table(title="shape and signature changes", title_justify="left")
    for col in ("what", "tensor", "before", "after"):
        t.add_column(col, overflow="fold")
    for w in widths:
        t.add_row(f"{w['kind']} shape", w["tensor"], str(w["before"]), str(w["after"]))
    for side, kind, e in io_rows:
        if kind == "changed":
            t.add_row(f"{side[:-1]} changed", e["name"], str(e["before"]), str(e["after"]))
        else:
            t.add_row(f"{side[:-1]} {kind}", e["name"], str(e.get("shape")) if kind == "removed" else "",
                      str(e.get("shape")) if kind == "added" else "")
    return t


def goals_table(goals: list[dict[str, Any]]) -> Table:
    """``rewrite check``: each goal, its target, what was measured, met or not."""
    t = Table(title="goals", title_justify="left")
    for col in ("goal", "target", "measured", "result", "why"):
        t.add_column(col, overflow="fold")
    for g in goals:
        t.add_row(g["goal"], str(g["target"]), str(g["measured"]),
                  "[green]met[/]" if g["passed"] else "[red]FAILED[/]", g.get("why", ""))
    return t


def render_diff(doc: dict[str, Any], console: Console | None = None) -> None:
    """Print a ``rewrite diff`` document: op table, params, nodes, shape changes."""
    console = console or Console()
    diff = doc["diff"]
    ops = diff["op_counts"]
    console.print(op_count_table(ops["before"], ops["after"]))
    console.print(f"parameters: {diff['params']['before']:,} -> {diff['params']['after']:,}  "
                  f"bytes: {diff['bytes']['before']:,} -> {diff['bytes']['after']:,}")
    for t in (node_diff_table(diff), shape_changes_table(diff)):
        if t is not None:
            console.print(t)


def render_extras(report: dict[str, Any], console: Console | None = None) -> None:
    """What ``render`` leaves out: node-level diff, shape changes, latency."""
    console = console or Console()
    diff = report.get("diff") or {}
    for t in (node_diff_table(diff), shape_changes_table(diff)):
        if t is not None:
            console.print(t)
    if report.get("latency"):
        for t in latency_tables(report["latency"]):
            console.print(t)


def _op_changes(ops: dict[str, Any], limit: int = 6) -> str:
    """``BatchNormalization 1 -> 0, Add 3 -> 2``: the op types whose count changed, the
    largest changes first."""
    before, after = ops.get("before") or {}, ops.get("after") or {}
    changed = [(o, before.get(o, 0), after.get(o, 0)) for o in set(before) | set(after)
               if before.get(o, 0) != after.get(o, 0)]
    changed.sort(key=lambda r: (-abs(r[2] - r[1]), r[0]))
    text = ", ".join(f"{o} {b} -> {a}" for o, b, a in changed[:limit])
    if len(changed) > limit:
        text += f", {len(changed) - limit} more"
    return text or "no op type changed in count"


def render_summary(report: dict[str, Any], console: Console | None = None) -> None:
    """The default terminal report: one line per pass (applied / declined sites, its error,
    verified), the op types that changed, the numerics verdict with the verification's notes
    (shadow, assumed shapes, defaulted dims) and the latency line. The
    full tables are ``render`` + ``render_extras`` (``-v``), the JSON and the HTML."""
    console = console or Console()
    for p in report["passes"]:
        v = p.get("verification") or {}
        verdict = "" if not v else ("; [green]verified[/]" if v.get("passed") else "; [red]verification FAILED[/]")
        err = f"; max rel err {_fmt_err(v.get('max_rel_error'))}" if v.get("max_rel_error") is not None else ""
        metric = [o for o in (v.get("outputs") or []) if "budget" in o]
        if metric:
            worst = max(metric, key=lambda o: o.get("rel_fro_error") or 0.0)
            err += f"; rel Frobenius err {_fmt_err(worst.get('rel_fro_error'))} (budget {worst['budget']})"
        declined = p.get("declined") or []
        why = f" (e.g. {escape(declined[0]['reason'][:90])})" if declined and not p["applied"] else ""
        console.print(f"pass [b]{escape(p['name'])}[/] ({p['kind']}): {p['applied']} site(s) applied, "
                      f"{len(declined)} declined{why}{err}{verdict}", soft_wrap=True)
    diff = report.get("diff") or {}
    if diff.get("op_counts"):
        console.print(f"ops: {escape(_op_changes(diff['op_counts']))}", soft_wrap=True)
    v = report["verification"]
    if not v.get("performed", True):
        console.print("[yellow]verification skipped (--no-verify)[/]")
    else:
        outs = [o for o in v.get("outputs", []) if "error" not in o]
        tol = max((o["tolerance"] for o in outs), default=None)
        ok = "[green]passed[/]" if v.get("passed") else "[red]FAILED[/]"
        console.print(f"numerics (original vs rewritten, {len(v.get('outputs', []))} output(s)): {ok}, "
                      f"max rel err {_fmt_err(v.get('max_rel_error'))}"
                      + (f" (tolerance {_fmt_err(tol)})" if tol is not None else ""), soft_wrap=True)
        for note in v.get("notes", []):
            console.print(f"[dim]note: {escape(note)}[/]", soft_wrap=True)
    if report.get("latency"):
        console.print(latency_line(report["latency"]), soft_wrap=True, markup=False)

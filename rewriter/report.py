"""Terminal rendering of the run report (the JSON document of ``rewriter.api``)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
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

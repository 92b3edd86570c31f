"""The ``rewrite`` command line (typer). It only calls the Python API and renders.

    rewrite MODEL --passes P1,P2 [-o OUT] [--set PASS.KEY=VALUE ...] [--inputs F.npz]
            [--calib F.npz] [--shape NAME=D0,D1,...] [--no-verify] [--force] [--allow-unapplied] [--json F]
            [--html F] [--bench [--per-pass] [--runs N] [--steps S]] [--compile] [-v] [--debug]
    rewrite passes [--json]
    rewrite explain MODEL --passes P
    rewrite diff A.onnx B.onnx [--json F] [--html F]
    rewrite bench MODEL [--against OTHER | --passes P [--per-pass]] [--runs N] [--steps S] [--shape ...] [--compile] [--json F] [--html F]
    rewrite check MODEL --passes P [--max-rel-error X] [--min-speedup Y] [--json F] [--html F]

Exit codes: 0 done; 1 verification failed (nothing written), or for ``check`` a goal not
met; 2 bad input or usage (one line on stderr); 3 a requested pass applied to no site
(nothing written; with --allow-unapplied only when no pass applied); 4 internal error.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Optional

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from backends.ort import session as ort_session
from rewriter import api, loader
from rewriter.api import _instantiate, _specialise
from rewriter.diff import diff_models
from rewriter.errors import BadInput, RewriterError, VerificationFailed
from rewriter.html import render_html, write_html
from rewriter.ir.fx_view import FxView
from rewriter.manager import explain
from rewriter.pass_api import Context, describe_passes, get_pass, make_options, parse_sets
from rewriter.report import goals_table, latency_tables, render, render_diff, render_extras, render_summary, sites_table
from rewriter.run.verify import input_specs, parse_bytes, resolve_shapes

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Verified graph rewrites for ONNX and torch models.")
out = Console()
err = Console(stderr=True)

SUBCOMMANDS = {"run", "passes", "explain", "diff", "bench", "check"}

log = logging.getLogger(__name__)


class GoalFailed(RewriterError):
    """``rewrite check``: a goal was not met (exit 1)."""

    exit_code = 1


def _split_passes(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise BadInput("--passes is empty")
    for n in names:
        get_pass(n)
    return names


def _parse_bytes(text: str | None) -> int | None:
    return None if text is None else parse_bytes(text)


def _parse_shapes(items: list[str]) -> dict[str, list[int]]:
    shapes = {}
    for item in items:
        name, sep, dims = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = [int(d) for d in dims.split(",")]
            if any(d <= 0 for d in shapes[name]):
                raise ValueError
        except ValueError:
            raise BadInput(f"malformed --shape {item!r}: expected NAME=D0,D1,... with positive ints") from None
    return shapes


def _options(sets: list[str], pass_names: list[str]) -> dict[str, dict[str, str]]:
    parsed = parse_sets(sets)
    for pname, opts in parsed.items():
        if pname not in pass_names:
            get_pass(pname)  # unknown pass -> its own error
            raise BadInput(f"--set {pname}.…: pass {pname!r} is not in --passes")
        make_options(get_pass(pname), opts)  # validate now, before any work
    return parsed


def _check_report_path(path: str | None, flag: str) -> None:
    """Fail before any work when a report file cannot be written there."""
    if path is None:
        return
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise BadInput(f"{flag} {path}: directory {parent} does not exist")
    if target.is_dir():
        raise BadInput(f"{flag} {path}: is a directory")
    if not os.access(parent, os.W_OK):
        raise BadInput(f"{flag} {path}: directory {parent} is not writable")


def _write_json(path: str, report: dict) -> None:
    target = Path(path)
    if not target.parent.exists():
        raise BadInput(f"--json {path}: directory {target.parent} does not exist")
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, target)


def _write_html(path: str, doc: dict, snaps: tuple | None) -> Path:
    """The page of a ``diff`` or ``bench`` document (run reports go through ``Result.html``)."""
    before, after = snaps if snaps else (None, None)
    return write_html(path, render_html(doc, before, after))


def _attach_diff(result) -> None:
    """Add the node-level graph diff to the report (``Result.diff``).

    The diff is an addition to the run: if it fails on some graph, the run still completes
    (with a warning) rather than losing the rewrite."""
    try:
        result.diff()
    except Exception as e:  # noqa: BLE001
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            raise
        err.print(f"[yellow]warning: graph diff failed ({type(e).__name__}: {e}); report has op counts only[/]")


def _progress(quiet: bool):
    """A rich progress bar on stderr (transient; disabled with --quiet)."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err, transient=True, disable=quiet or not err.is_terminal)


class _BenchBar:
    """``progress(description, done, total)`` of ``api.latency`` / ``Result.bench`` drawn as
    one rich progress bar."""

    def __init__(self, quiet: bool):
        self._prog = _progress(quiet)
        self._task = None

    def __enter__(self):
        self._prog.__enter__()
        self._task = self._prog.add_task("preparing sessions", total=None)
        return self

    def __exit__(self, *exc):
        return self._prog.__exit__(*exc)

    def __call__(self, description: str, done: int | None, total: int | None) -> None:
        self._prog.update(self._task, description=description, total=total, completed=done or 0)


@app.command("run", help="Rewrite MODEL with the given passes, verify, and write the result.")
def run_cmd(
    model: str = typer.Argument(..., help="a .onnx path, zoo:NAME, or package.module:factory (runs that code)"),
    passes: str = typer.Option(..., "--passes", "-p", help="comma-separated pass names, applied in order"),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="output path (.onnx or .pt2)"),
    set_: list[str] = typer.Option([], "--set", help="PASS.KEY=VALUE pass option (repeatable)"),
    inputs: Optional[str] = typer.Option(None, "--inputs", help=".npz of verification inputs"),
    calib: Optional[str] = typer.Option(None, "--calib", help=".npz of calibration inputs"),
    shape: list[str] = typer.Option([], "--shape", help="NAME=D0,D1,... for dynamic input dims"),
    max_input_bytes: Optional[str] = typer.Option(None, "--max-input-bytes",
                                                  help="largest total size of verification inputs (e.g. 4G; default 1G)"),
    freeze: bool = typer.Option(False, "--freeze-initializer-inputs",
                                help="treat initializers that are also graph inputs (IR v3 files) as constants"),
    no_verify: bool = typer.Option(False, "--no-verify", help="skip verification"),
    force: bool = typer.Option(False, "--force", help="write even if verification fails"),
    allow_unapplied: bool = typer.Option(False, "--allow-unapplied",
                                         help="write the output when at least one pass applied (warn about the others)"),
    json_out: Optional[str] = typer.Option(None, "--json", help="write the JSON report here"),
    html_out: Optional[str] = typer.Option(None, "--html", help="write a self-contained HTML report here"),
    bench: bool = typer.Option(False, "--bench", help="time the model before and after (adds the latency section)"),
    per_pass: bool = typer.Option(False, "--per-pass", help="with --bench: time after each prefix of the pass list"),
    runs: int = typer.Option(100, "--runs", help="--bench: timed samples per model"),
    warmup: int = typer.Option(5, "--warmup", help="--bench: warm-up calls per model"),
    threads: Optional[int] = typer.Option(None, "--threads", help="--bench: ORT intra-op threads (default: ORT's)"),
    no_profile: bool = typer.Option(False, "--no-profile", help="--bench: skip the per-op-type ORT profile"),
    compile_: bool = typer.Option(False, "--compile", help="torch (.pt2): check the result under torch.compile "
                                  "(graph breaks in the report); with --bench also time it compiled"),
    steps: Optional[int] = typer.Option(None, "--steps", help="--bench, stateful models (rettention): denoising "
                                        "steps of the timed schedule (default 20)"),
    debug: bool = typer.Option(False, "--debug", help="tracebacks and debug logging"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="print only errors"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="print every table (sites, op counts, nodes, "
                                 "numerics, latency), not the summary"),
) -> int:
    pass_names = _split_passes(passes)
    options = _options(set_, pass_names)
    shapes = _parse_shapes(shape)
    max_bytes = _parse_bytes(max_input_bytes)
    bench = bench or per_pass
    _check_report_path(json_out, "--json")
    _check_report_path(html_out, "--html")
    for f, flag in ((inputs, "--inputs"), (calib, "--calib")):
        if f is not None and not Path(f).is_file():
            raise BadInput(f"{flag} {f}: no such file")
    source = loader.resolve(model)
    if output is None:
        output = f"{source.stem}.{'+'.join(pass_names)}.onnx"
    target = loader.check_output_path(output, source.name if source.kind == "onnx" else None)
    ir_kind = "onnx" if target.suffix.lower() == ".onnx" else "torch"
    if compile_ and ir_kind != "torch":
        raise BadInput("--compile lowers torch models: write the result as .pt2")
    with err.status("loading model...") as status:
        if source.kind != "onnx" and ir_kind == "onnx":
            status.update(f"exporting {source.name} to ONNX...")
        view = loader.to_view(source, ir_kind)

        def progress(msg: str) -> None:
            status.update(msg + "...")

        result = api.rewrite(view, pass_names, options=options, inputs=inputs, calib=calib,
                             shapes=shapes, verify=not no_verify, force=force, progress=progress,
                             source=model, max_input_bytes=max_bytes, freeze_initializer_inputs=freeze,
                             allow_unapplied=allow_unapplied)
    report = result.report
    _attach_diff(result)
    if compile_ and (result.passed or force):
        with err.status("checking under torch.compile..."):
            result.compile()
        if report["compile"]["graph_breaks"] and not quiet:
            err.print(f"[yellow]torch.compile: {report['compile']['graph_breaks']} graph break(s): "
                      f"{'; '.join(report['compile']['reasons'])}[/]")
    if bench:
        if result.passed or force:
            with _BenchBar(quiet) as bar:
                result.bench(runs=runs, warmup=warmup, threads=threads, profile=not no_profile,
                             per_pass=per_pass, progress=bar, steps=steps)
            if compile_:  # latency: under torch.compile; latency_eager: the eager run above
                report["latency_eager"] = report["latency"]
                with _BenchBar(quiet) as bar:
                    result.bench(runs=runs, warmup=warmup, threads=threads, profile=not no_profile,
                                 progress=bar, compiled=True, steps=steps)
        elif not quiet:
            err.print("[yellow]benchmark skipped: verification failed[/]")
    if not quiet:
        if verbose:
            render(report, out)
            render_extras(report, out)
        else:
            render_summary(report, out)
    if json_out:
        _write_json(json_out, report)
    if html_out:
        result.html(html_out)
    if not result.passed and not force:
        v = result.verification
        site = v.get("failing_site")
        raise VerificationFailed(
            f"verification failed after pass {v.get('failed_pass')!r}"
            + (f" at site {site!r}" if site else "")
            + f": {_why_failed(v)}; nothing written (--force writes anyway)")
    result.check_applied()  # exit 3 unless --allow-unapplied and some pass applied
    for line in result.unapplied_warnings():
        err.print(f"warning: {line}; written without it", markup=False, highlight=False, soft_wrap=True)
    path = result.save(target, force=force)
    if json_out:
        _write_json(json_out, report)
    if html_out:
        result.html(html_out)
    if not quiet:
        out.print(f"wrote [bold]{path}[/]")
        if json_out:
            out.print(f"JSON [bold]{Path(json_out).resolve()}[/]")
        if html_out:
            out.print(f"report [bold]{Path(html_out).resolve()}[/]")
        if not verbose:
            out.print(more_hint(json_out, html_out), soft_wrap=True, highlight=False)
    return 0


def more_hint(json_out: str | None, html_out: str | None) -> str:
    """The summary's last line: where the full tables are."""
    keep = [f for f, given in (("--json F", json_out), ("--html F", html_out)) if not given]
    return ("more: -v prints every site, op count, node change, numerics and latency table"
            + (f"; {' or '.join(keep)} writes them to a file" if keep else "; the JSON and HTML hold them all"))


def _width() -> int:
    """The terminal width: ``COLUMNS`` when set, else the terminal's, else 80."""
    return max(40, shutil.get_terminal_size((80, 24)).columns)


def format_passes(docs: list[dict], width: int = 80) -> str:
    """One block per pass: name, kind and IRs; the summary; then one line per option,
    ``name: type = default``, followed by its meaning when the line has room, else by the
    meaning wrapped under it. No line is longer than ``width``."""
    lines: list[str] = []
    for d in docs:
        lines.append(f"{d['name']}  ({d['kind']}; {', '.join(d['irs'])})")
        lines += textwrap.wrap(d["summary"], width, initial_indent="  ", subsequent_indent="  ") or ["  -"]
        if not d["options"]:
            lines.append("  options: none")
        else:
            lines.append("  options:")
            sigs = [f"    {o['name']}: {o['type']} = {o['default']!r}" for o in d["options"]]
            col = max(len(s) for s in sigs) + 2
            # one line per option when every meaning fits beside its signature; else each
            # meaning goes on its own (wrapped) lines under the signature, for the whole pass
            if all(col + len(o["help"]) <= width for o in d["options"]):
                lines += [(s.ljust(col) + o["help"]).rstrip() for s, o in zip(sigs, d["options"])]
            else:
                for sig, o in zip(sigs, d["options"]):
                    lines.append(sig)
                    lines += textwrap.wrap(o["help"], width, initial_indent=" " * 8, subsequent_indent=" " * 8)
        lines.append("")
    return "\n".join(lines)


@app.command("passes", help="Describe every pass: kind, IRs, summary, and its options with defaults.")
def passes_cmd(
    as_json: bool = typer.Option(False, "--json", help="print the descriptions as JSON (for tools)"),
) -> int:
    docs = describe_passes()
    if as_json:
        sys.stdout.write(json.dumps({"passes": docs}, indent=2, default=str) + "\n")
    else:
        sys.stdout.write(format_passes(docs, _width()))
    return 0


@app.command("explain", help="Show every candidate site of the passes: accepted or declined, and why.")
def explain_cmd(
    model: str = typer.Argument(...),
    passes: str = typer.Option(..., "--passes", "-p"),
    set_: list[str] = typer.Option([], "--set"),
    torch_ir: bool = typer.Option(False, "--torch", help="explain on the torch.export graph (torch models)"),
    shape: list[str] = typer.Option([], "--shape", help="NAME=D0,D1,... for dynamic input dims"),
    freeze: bool = typer.Option(False, "--freeze-initializer-inputs",
                                help="treat initializers that are also graph inputs (IR v3 files) as constants"),
    json_out: Optional[str] = typer.Option(None, "--json"),
    debug: bool = typer.Option(False, "--debug"),
) -> int:
    pass_names = _split_passes(passes)
    options = _options(set_, pass_names)
    shapes = _parse_shapes(shape)
    source = loader.resolve(model)
    with err.status("loading model..."):
        view = loader.to_view(source, "torch" if torch_ir and source.kind != "onnx" else "onnx")
        if freeze:
            loader.freeze_initializer_inputs(view)
        if shapes:
            resolve_shapes(input_specs(view), shapes)  # names and ranks checked as in a run
        _specialise(view, shapes, None, None)
        records = explain(view, _instantiate(pass_names, options, Context()))
    docs = [r.to_json() for r in records]
    out.print(sites_table(docs))
    if json_out:
        _write_json(json_out, {"passes": docs})
    return 0


def _load_view(spec: str, flag: str = "MODEL"):
    """A GraphView for ``spec``: .onnx, .pt2 (torch.export), zoo:NAME or module:factory (as ONNX)."""
    if spec.lower().endswith(".pt2"):
        if not Path(spec).is_file():
            raise BadInput(f"{spec}: no such file")
        try:
            ep = torch.export.load(spec)
        except Exception as e:  # noqa: BLE001
            raise BadInput(f"{spec}: not a readable .pt2 file ({type(e).__name__})") from None
        args = ep.example_inputs[0] if ep.example_inputs else None
        if args is None:
            raise BadInput(f"{spec}: the .pt2 file carries no example inputs to run it with")
        return FxView(ep.module(), tuple(args))
    source = loader.resolve(spec)
    with err.status(f"loading {spec}..."):
        return loader.to_view(source, "onnx")


@app.command("diff", help="Compare two models: op counts, nodes added/removed/changed, params, I/O, shapes.")
def diff_cmd(
    before: str = typer.Argument(..., help="the first model (.onnx, .pt2, zoo:NAME)"),
    after: str = typer.Argument(..., help="the second model"),
    json_out: Optional[str] = typer.Option(None, "--json", help="write the diff document here"),
    html_out: Optional[str] = typer.Option(None, "--html", help="write a self-contained HTML page here"),
    debug: bool = typer.Option(False, "--debug"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> int:
    _check_report_path(json_out, "--json")
    _check_report_path(html_out, "--html")
    a, b = _load_view(before), _load_view(after)
    with err.status("comparing graphs..."):
        d, sa, sb = diff_models(a, b)
    doc = {"schema": "rewriter.diff/1", "before": before, "after": after, "diff": d}
    if not quiet:
        render_diff(doc, out)
    if json_out:
        _write_json(json_out, doc)
    if html_out:
        _write_html(html_out, doc, (sa, sb))
        if not quiet:
            out.print(f"report [bold]{Path(html_out).resolve()}[/]")
    return 0


@app.command("bench", help="Time a model (ORT with full optimizations, or torch), optionally against another.")
def bench_cmd(
    model: str = typer.Argument(..., help=".onnx, .pt2, zoo:NAME or module:factory"),
    against: Optional[str] = typer.Option(None, "--against", help="a second model, timed interleaved with MODEL"),
    passes: Optional[str] = typer.Option(None, "--passes", "-p", help="time MODEL against MODEL rewritten by these"),
    set_: list[str] = typer.Option([], "--set", help="PASS.KEY=VALUE pass option (with --passes)"),
    per_pass: bool = typer.Option(False, "--per-pass", help="with --passes: time after each prefix of the list"),
    runs: int = typer.Option(100, "--runs", help="timed samples per model"),
    warmup: int = typer.Option(5, "--warmup", help="warm-up calls per model"),
    threads: Optional[int] = typer.Option(None, "--threads", help="ORT intra-op threads (default: ORT's)"),
    shape: list[str] = typer.Option([], "--shape", help="NAME=D0,D1,... for dynamic input dims"),
    max_input_bytes: Optional[str] = typer.Option(None, "--max-input-bytes",
                                                  help="largest total size of verification inputs (e.g. 4G; default 1G)"),
    freeze: bool = typer.Option(False, "--freeze-initializer-inputs",
                                help="treat initializers that are also graph inputs (IR v3 files) as constants"),
    inputs: Optional[str] = typer.Option(None, "--inputs", help=".npz of inputs"),
    no_profile: bool = typer.Option(False, "--no-profile", help="skip the per-op-type ORT profile"),
    compile_: bool = typer.Option(False, "--compile", help="torch models: also time under torch.compile (Inductor)"),
    steps: Optional[int] = typer.Option(None, "--steps", help="stateful models (rettention): denoising steps of "
                                        "the timed schedule (default 20)"),
    json_out: Optional[str] = typer.Option(None, "--json", help="write the bench document here"),
    html_out: Optional[str] = typer.Option(None, "--html", help="write a self-contained HTML page here"),
    debug: bool = typer.Option(False, "--debug"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> int:
    if against and passes:
        raise BadInput("give --against or --passes, not both")
    if per_pass and not passes:
        raise BadInput("--per-pass needs --passes")
    pass_names = _split_passes(passes) if passes else []
    options = _options(set_, pass_names) if passes else {}
    shapes = _parse_shapes(shape)
    max_bytes = _parse_bytes(max_input_bytes)
    if inputs is not None and not Path(inputs).is_file():
        raise BadInput(f"--inputs {inputs}: no such file")
    _check_report_path(json_out, "--json")
    _check_report_path(html_out, "--html")
    view = _load_view(model)
    if compile_ and view.ir != "torch":
        raise BadInput("--compile times torch models (.pt2)")
    if pass_names:
        with err.status("rewriting...") as status:
            result = api.rewrite(view, pass_names, options=options, inputs=inputs, shapes=shapes,
                                 progress=lambda m: status.update(m + "..."), max_input_bytes=max_bytes,
                                 freeze_initializer_inputs=freeze)
        if not result.passed:
            raise VerificationFailed(f"verification failed after pass {result.verification.get('failed_pass')!r}; "
                                     "not timing a wrong model")
        with _BenchBar(quiet) as bar:
            sec = result.bench(runs=runs, warmup=warmup, threads=threads, profile=not no_profile,
                               per_pass=per_pass, labels=(model, f"{model} + {','.join(pass_names)}"),
                               progress=bar, steps=steps)
            if compile_:
                eager = sec
                sec = result.bench(runs=runs, warmup=warmup, threads=threads, profile=not no_profile,
                                   labels=(model, f"{model} + {','.join(pass_names)}"), progress=bar,
                                   compiled=True, steps=steps)
    else:
        feeds, _ = api.verification_feeds(view, inputs, shapes, max_input_bytes=max_bytes)
        other = None
        if against:
            other = _load_view(against, "--against")
            if other.ir != view.ir:
                raise BadInput(f"--against {against}: a {other.ir} model cannot be timed against a {view.ir} model")
        with _BenchBar(quiet) as bar:
            sec = api.latency(view, other, feeds, runs=runs, warmup=warmup, threads=threads,
                              profile=not no_profile, labels=(model, against or "rewritten"), progress=bar,
                              steps=steps)
            if compile_:
                eager = sec
                sec = api.latency(view, other, feeds, runs=runs, warmup=warmup, threads=threads,
                                  profile=not no_profile, labels=(model, against or "rewritten"), progress=bar,
                                  compiled=True, steps=steps)
    doc = {"schema": "rewriter.bench/1", "model": model, "against": against, "latency": sec}
    if compile_:  # latency: under torch.compile; latency_eager: the eager timing
        doc["latency_eager"] = eager
    if not quiet:
        for t in latency_tables(sec):
            out.print(t)
    if json_out:
        _write_json(json_out, doc)
    if html_out:
        _write_html(html_out, doc, None)
        if not quiet:
            out.print(f"report [bold]{Path(html_out).resolve()}[/]")
    return 0


def _why_failed(v: dict) -> str:
    """What failed: the runtime's one line when the rewritten model does not run, else the
    worst relative error."""
    if v.get("runs") is False or str(v.get("error", "")).startswith("the rewritten model does not run"):
        return str(v.get("error") or "the rewritten model does not run")
    return f"max rel error {v.get('max_rel_error', float('nan')):.3g}"


def _goals(report: dict, pass_names: list[str], max_rel_error: float | None, min_speedup: float | None) -> list[dict]:
    """The goals of ``rewrite check`` with what was measured and whether each is met."""
    goals = []
    v = report["verification"]
    failed = v.get("failed_pass")
    goals.append({"goal": "verified", "target": "every pass within its tolerance or budget",
                  "measured": "passed" if v.get("passed") else f"failed after {failed!r}"
                  + (f" at site {v['failing_site']!r}" if v.get("failing_site") else ""),
                  "passed": bool(v.get("passed")),
                  **({} if v.get("passed") else {"why": _why_failed(v)})})
    applied = {p["name"]: p["applied"] for p in report["passes"]}
    empty = [n for n in pass_names if applied.get(n, 0) == 0]
    goals.append({"goal": "applied", "target": "every pass applies to >= 1 site",
                  "measured": ", ".join(f"{n}: {applied.get(n, 0)}" for n in pass_names),
                  "passed": not empty,
                  **({"why": "no site for " + ", ".join(empty)} if empty else {})})
    if max_rel_error is not None:
        err_v = v.get("max_rel_error")
        ok = err_v is not None and v.get("performed", True) and err_v <= max_rel_error
        goals.append({"goal": "max rel error", "target": f"<= {max_rel_error:g}",
                      "measured": "not measured" if err_v is None else f"{err_v:.3g}", "passed": bool(ok),
                      **({} if ok else {"why": "verification did not run" if err_v is None else
                                        f"{err_v:.3g} > {max_rel_error:g}"})})
    if min_speedup is not None:
        sp = (report.get("latency") or {}).get("speedup")
        ok = sp is not None and sp >= min_speedup
        goals.append({"goal": "speedup", "target": f">= {min_speedup:g}x",
                      "measured": "not measured" if sp is None else f"{sp:.3f}x", "passed": bool(ok),
                      **({} if ok else {"why": "not measured" if sp is None else f"{sp:.3f}x < {min_speedup:g}x"})})
    return goals


@app.command("check", help="CI gate: rewrite, verify, optionally time; exit 1 when a goal is not met.")
def check_cmd(
    model: str = typer.Argument(..., help="a .onnx path, zoo:NAME, or package.module:factory"),
    passes: str = typer.Option(..., "--passes", "-p", help="comma-separated pass names, applied in order"),
    max_rel_error: Optional[float] = typer.Option(None, "--max-rel-error", help="goal: final max relative error <= X"),
    min_speedup: Optional[float] = typer.Option(None, "--min-speedup", help="goal: speedup (before/after) >= Y"),
    set_: list[str] = typer.Option([], "--set", help="PASS.KEY=VALUE pass option (repeatable)"),
    inputs: Optional[str] = typer.Option(None, "--inputs", help=".npz of verification inputs"),
    calib: Optional[str] = typer.Option(None, "--calib", help=".npz of calibration inputs"),
    shape: list[str] = typer.Option([], "--shape", help="NAME=D0,D1,... for dynamic input dims"),
    max_input_bytes: Optional[str] = typer.Option(None, "--max-input-bytes",
                                                  help="largest total size of verification inputs (e.g. 4G; default 1G)"),
    freeze: bool = typer.Option(False, "--freeze-initializer-inputs",
                                help="treat initializers that are also graph inputs (IR v3 files) as constants"),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="write the model here when every goal is met"),
    runs: int = typer.Option(100, "--runs", help="timed samples per model (with --min-speedup)"),
    warmup: int = typer.Option(5, "--warmup", help="warm-up calls per model"),
    threads: Optional[int] = typer.Option(None, "--threads", help="ORT intra-op threads"),
    json_out: Optional[str] = typer.Option(None, "--json", help="write the JSON report (with goals) here"),
    html_out: Optional[str] = typer.Option(None, "--html", help="write a self-contained HTML report here"),
    debug: bool = typer.Option(False, "--debug"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="print only the goals table and errors"),
) -> int:
    pass_names = _split_passes(passes)
    options = _options(set_, pass_names)
    shapes = _parse_shapes(shape)
    max_bytes = _parse_bytes(max_input_bytes)
    for val, flag in ((max_rel_error, "--max-rel-error"), (min_speedup, "--min-speedup")):
        if val is not None and not (val >= 0):
            raise BadInput(f"{flag} {val}: must be a non-negative number")
    for f, flag in ((inputs, "--inputs"), (calib, "--calib")):
        if f is not None and not Path(f).is_file():
            raise BadInput(f"{flag} {f}: no such file")
    _check_report_path(json_out, "--json")
    _check_report_path(html_out, "--html")
    source = loader.resolve(model)
    target = None
    if output is not None:
        target = loader.check_output_path(output, source.name if source.kind == "onnx" else None)
    ir_kind = "torch" if target is not None and target.suffix.lower() == ".pt2" else "onnx"
    with err.status("loading model...") as status:
        view = loader.to_view(source, ir_kind)
        result = api.rewrite(view, pass_names, options=options, inputs=inputs, calib=calib, shapes=shapes,
                             verify=True, progress=lambda m: status.update(m + "..."), source=model,
                             max_input_bytes=max_bytes, freeze_initializer_inputs=freeze)
    report = result.report
    _attach_diff(result)
    if min_speedup is not None and result.passed:  # a model that failed verification is not timed
        with _BenchBar(quiet) as bar:
            result.bench(runs=runs, warmup=warmup, threads=threads, profile=html_out is not None, progress=bar)
    goals = _goals(report, pass_names, max_rel_error, min_speedup)
    report["goals"] = goals
    report["passed"] = all(g["passed"] for g in goals)
    if not quiet:
        render(report, out)
        render_extras(report, out)
    out.print(goals_table(goals))
    if report["passed"] and target is not None:
        result.save(target, force=True)
    if json_out:
        _write_json(json_out, report)
    if html_out:
        result.html(html_out)
    if not report["passed"]:
        raise GoalFailed("check failed: " + "; ".join(f"{g['goal']}: {g.get('why', 'not met')}"
                                                      for g in goals if not g["passed"]))
    if not quiet:
        out.print("[green]all goals met[/]")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not debug:
        for noisy in ("torch", "onnxscript", "onnx_ir"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        # ORT logs its own errors on stderr before raising them; the one line quotes them
        ort_session.quiet_logging()
    if not args:
        args = ["--help"]
    if args and args[0] not in SUBCOMMANDS and args[0] not in ("--help", "-h"):
        args.insert(0, "run")
    code = 0
    try:
        with warnings.catch_warnings():
            if not debug:  # a library's warning would be a stray stderr line: one line, always
                warnings.simplefilter("ignore")
            rv = app(args, standalone_mode=False, prog_name="rewrite")
        code = rv if isinstance(rv, int) else 0
    except RewriterError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt:
        code = 130
    except Exception as e:  # noqa: BLE001 - never a traceback without --debug
        kind = type(e).__name__
        if kind == "Exit":  # click's (typer may vendor click, so match by name)
            return _finish(getattr(e, "exit_code", 0), argv)
        if kind == "Abort":
            return _finish(130, argv)
        if hasattr(e, "format_message"):  # usage errors: one line
            print(f"error: {e.format_message()}", file=sys.stderr)
            return _finish(2, argv)
        if debug:
            raise
        msg = str(e).splitlines()[0] if str(e) else ""
        print(f"error: internal error: {type(e).__name__}: {msg} (rerun with --debug for the traceback)",
              file=sys.stderr)
        code = 4
    return _finish(code, argv)


def _finish(code: int, argv: list[str] | None) -> int:
    """Exit, or return ``code`` to an in-process caller. A model's IR is cyclic (nodes and
    values point at each other), so reference counting never frees it and the cyclic
    collector runs only when its allocation counters say so: a caller that runs the CLI
    several times would hold two or three models at once. ``main(argv)`` therefore
    collects once its run is over; a process that exits frees everything anyway."""
    if argv is None:
        sys.exit(code)
    gc.collect()
    return code


if __name__ == "__main__":
    main()

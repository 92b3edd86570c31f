"""The ``rewrite`` command line (typer). It only calls the Python API and renders.

    rewrite MODEL --passes P1,P2 [-o OUT] [--set PASS.KEY=VALUE ...] [--inputs F.npz]
            [--calib F.npz] [--shape NAME=D0,D1,...] [--no-verify] [--force] [--json F] [--debug]
    rewrite passes
    rewrite explain MODEL --passes P

Exit codes: 0 done; 1 verification failed (nothing written); 2 bad input or usage (one
line on stderr); 3 a requested pass applied to no site (nothing written); 4 internal error.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from rewriter.errors import BadInput, NothingApplied, RewriterError, VerificationFailed

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Verified graph rewrites for ONNX and torch models.")
out = Console()
err = Console(stderr=True)

SUBCOMMANDS = {"run", "passes", "explain"}


def _split_passes(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise BadInput("--passes is empty")
    from rewriter.pass_api import get_pass

    for n in names:
        get_pass(n)
    return names


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
    from rewriter.pass_api import get_pass, make_options, parse_sets

    parsed = parse_sets(sets)
    for pname, opts in parsed.items():
        if pname not in pass_names:
            get_pass(pname)  # unknown pass -> its own error
            raise BadInput(f"--set {pname}.…: pass {pname!r} is not in --passes")
        make_options(get_pass(pname), opts)  # validate now, before any work
    return parsed


def _write_json(path: str, report: dict) -> None:
    target = Path(path)
    if not target.parent.exists():
        raise BadInput(f"--json {path}: directory {target.parent} does not exist")
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, target)


@app.command("run", help="Rewrite MODEL with the given passes, verify, and write the result.")
def run_cmd(
    model: str = typer.Argument(..., help="a .onnx path, zoo:NAME, or package.module:factory (runs that code)"),
    passes: str = typer.Option(..., "--passes", "-p", help="comma-separated pass names, applied in order"),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="output path (.onnx or .pt2)"),
    set_: list[str] = typer.Option([], "--set", help="PASS.KEY=VALUE pass option (repeatable)"),
    inputs: Optional[str] = typer.Option(None, "--inputs", help=".npz of verification inputs"),
    calib: Optional[str] = typer.Option(None, "--calib", help=".npz of calibration inputs"),
    shape: list[str] = typer.Option([], "--shape", help="NAME=D0,D1,... for dynamic input dims"),
    no_verify: bool = typer.Option(False, "--no-verify", help="skip verification"),
    force: bool = typer.Option(False, "--force", help="write even if verification fails"),
    json_out: Optional[str] = typer.Option(None, "--json", help="write the JSON report here"),
    debug: bool = typer.Option(False, "--debug", help="tracebacks and debug logging"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="print only errors"),
) -> int:
    from rewriter import api, loader
    from rewriter.report import render

    pass_names = _split_passes(passes)
    options = _options(set_, pass_names)
    shapes = _parse_shapes(shape)
    for f, flag in ((inputs, "--inputs"), (calib, "--calib")):
        if f is not None and not Path(f).is_file():
            raise BadInput(f"{flag} {f}: no such file")
    source = loader.resolve(model)
    if output is None:
        output = f"{source.stem}.{'+'.join(pass_names)}.onnx"
    target = loader.check_output_path(output, source.name if source.kind == "onnx" else None)
    ir_kind = "onnx" if target.suffix.lower() == ".onnx" else "torch"
    with err.status("loading model...") as status:
        if source.kind != "onnx" and ir_kind == "onnx":
            status.update(f"exporting {source.name} to ONNX...")
        view = loader.to_view(source, ir_kind)

        def progress(msg: str) -> None:
            status.update(msg + "...")

        result = api.rewrite(view, pass_names, options=options, inputs=inputs, calib=calib,
                             shapes=shapes, verify=not no_verify, force=force, progress=progress,
                             source=model)
    report = result.report
    if not quiet:
        render(report, out)
    if json_out:
        _write_json(json_out, report)
    if not result.passed and not force:
        v = result.verification
        site = v.get("failing_site")
        raise VerificationFailed(
            f"verification failed after pass {v.get('failed_pass')!r}"
            + (f" at site {site!r}" if site else "")
            + f": max rel error {v.get('max_rel_error', float('nan')):.3g}; nothing written (--force writes anyway)")
    empty = result.unapplied
    if empty:
        reasons = "; ".join(f"{s.site}: {s.reason}" for r in empty for s in r.declined) or "no candidate sites"
        raise NothingApplied(f"pass {', '.join(r.name for r in empty)} applied to no site ({reasons}); nothing written")
    path = result.save(target, force=force)
    if json_out:
        _write_json(json_out, report)
    if not quiet:
        out.print(f"wrote [bold]{path}[/]")
    return 0


@app.command("passes", help="List every pass with its kind and summary.")
def passes_cmd() -> int:
    import dataclasses

    from rewriter.pass_api import all_passes

    t = Table()
    for col in ("pass", "kind", "IRs", "summary", "options"):
        t.add_column(col, overflow="fold")
    for name, cls in all_passes().items():
        opts = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls.Options))
        t.add_row(name, cls.kind.value, ",".join(sorted(cls.irs)), cls.summary, opts or "-")
    out.print(t)
    return 0


@app.command("explain", help="Show every candidate site of the passes: accepted or declined, and why.")
def explain_cmd(
    model: str = typer.Argument(...),
    passes: str = typer.Option(..., "--passes", "-p"),
    set_: list[str] = typer.Option([], "--set"),
    torch_ir: bool = typer.Option(False, "--torch", help="explain on the torch.export graph (torch models)"),
    json_out: Optional[str] = typer.Option(None, "--json"),
    debug: bool = typer.Option(False, "--debug"),
) -> int:
    from rewriter import loader
    from rewriter.api import _instantiate
    from rewriter.manager import explain
    from rewriter.pass_api import Context
    from rewriter.report import sites_table

    pass_names = _split_passes(passes)
    options = _options(set_, pass_names)
    source = loader.resolve(model)
    with err.status("loading model..."):
        view = loader.to_view(source, "torch" if torch_ir and source.kind != "onnx" else "onnx")
        records = explain(view, _instantiate(pass_names, options, Context()))
    docs = [r.to_json() for r in records]
    out.print(sites_table(docs))
    if json_out:
        _write_json(json_out, {"passes": docs})
    return 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not debug:
        for noisy in ("torch", "onnxscript", "onnx_ir"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
    if not args:
        args = ["--help"]
    if args and args[0] not in SUBCOMMANDS and args[0] not in ("--help", "-h"):
        args.insert(0, "run")
    code = 0
    try:
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
    if argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()

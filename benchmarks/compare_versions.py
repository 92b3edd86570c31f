"""Time and peak RSS of two checkouts of the project, interleaved (issues 20, 21).

    python benchmarks/compare_versions.py --old DIR [--new DIR] [--rounds 3]
        [--model /tmp/rewriter-gpt2/gpt2_124m.onnx] [--large FILE]
        [--variants speed,cli,cli-verify,large-verify] [--json OUT]

Each variant runs as a child process of the same Python, once per checkout per round,
old and new alternating (the order flips every round), with ``PYTHONPATH`` set to the
checkout. Wall time is measured around the child; peak RSS is the child's own
``ru_maxrss`` from ``os.wait4``. Variants:

* ``speed``: ``benchmarks/rewrite_speed.py --rounds 1`` of that checkout (``crms`` and
  ``rms`` in memory and through the CLI in one process; its peak RSS is the figure
  issue 20 names);
* ``speed-same``: this checkout's ``rewrite_speed.py --rounds 1 --code CHECKOUT``: one
  method (a ``gc.collect()`` before each phase) timing either checkout's code;
* ``cli``: ``python -m rewriter.cli MODEL --passes rms --no-verify -q -o OUT``;
* ``cli-verify``: the same with verification (the default);
* ``large`` / ``large-verify``: ``cli`` / ``cli-verify`` on ``--large``
  (``benchmarks/make_large_model.py``).

Medians over the rounds, the ratio new / old and the load average before and after
are printed. Timings are never asserted anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def run_child(cmd: list[str], pythonpath: str, cwd: str) -> tuple[float, float, int, str, str]:
    """Run ``cmd``; return (wall s, peak RSS MB, exit status, stdout, stderr tail)."""
    env = dict(os.environ, PYTHONPATH=pythonpath)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text = out.read().decode(errors="replace")
        tail = err.read().decode(errors="replace")[-400:]
    return wall, usage.ru_maxrss / 1024, proc.returncode, text, tail


def speed_phases(text: str) -> dict[str, float]:
    """The per-phase seconds ``rewrite_speed.py --rounds 1`` prints after "medians"."""
    phases, on = {}, False
    for line in text.splitlines():
        on = on or line.startswith("medians")
        m = re.match(r"\s+(.+?)\s+([0-9.]+) s\b", line) if on else None
        if m:
            phases[m.group(1)] = float(m.group(2))
    return phases


def commands(variant: str, checkout: Path, args, out: Path) -> list[str]:
    py = sys.executable
    cli = [py, "-m", "rewriter.cli"]
    if variant == "speed":
        return [py, str(checkout / "benchmarks" / "rewrite_speed.py"), "--rounds", "1",
                "--dir", str(Path(args.model).parent)]
    if variant == "speed-same":  # this checkout's script (gc between phases) timing each checkout's code
        return [py, str(ROOT / "benchmarks" / "rewrite_speed.py"), "--rounds", "1",
                "--dir", str(Path(args.model).parent), "--code", str(checkout)]
    if variant == "cli":
        return cli + [args.model, "--passes", args.passes, "--no-verify", "-q", "-o", str(out)]
    if variant == "cli-verify":
        return cli + [args.model, "--passes", args.passes, "-q", "-o", str(out)]
    if variant == "large":
        return cli + [args.large, "--passes", args.passes, "--no-verify", "-q", "-o", str(out)]
    if variant == "large-verify":
        return cli + [args.large, "--passes", args.passes, "-q", "-o", str(out)]
    raise SystemExit(f"unknown variant {variant!r}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True)
    ap.add_argument("--new", default=str(ROOT))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default="/tmp/rewriter-gpt2/gpt2_124m.onnx")
    ap.add_argument("--large", default=None)
    ap.add_argument("--passes", default="rms")
    ap.add_argument("--variants", default="speed,cli,cli-verify")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    versions = {"old": Path(args.old).resolve(), "new": Path(args.new).resolve()}
    variants = args.variants.split(",")
    if any(v.startswith("large") for v in variants) and not args.large:
        raise SystemExit("the large variants need --large FILE")
    work = Path(tempfile.mkdtemp(prefix="compare-versions-"))
    res: dict[str, dict[str, dict[str, list[float]]]] = {
        v: {k: {"wall": [], "rss": []} for k in versions} for v in variants}
    phase_times: dict[str, dict[str, list[float]]] = {}
    load_before = loadavg()
    print(f"load average before: {load_before}", flush=True)
    for r in range(args.rounds):
        order = list(versions) if r % 2 == 0 else list(reversed(versions))
        for v in variants:
            for k in order:
                out = work / f"{k}-{v}.onnx"
                wall, rss, rc, text, tail = run_child(commands(v, versions[k], args, out),
                                                      str(versions[k]), str(versions[k]))
                if rc != 0:
                    print(f"{v} {k} exit {rc}: {tail}", file=sys.stderr)
                    return 1
                res[v][k]["wall"].append(wall)
                res[v][k]["rss"].append(rss)
                if v in ("speed", "speed-same"):
                    for ph, sec in speed_phases(text).items():
                        phase_times.setdefault(ph, {q: [] for q in versions})[k].append(sec)
                for f in work.glob(f"{k}-{v}.onnx*"):
                    f.unlink()
                print(f"round {r + 1} {v:13s} {k}: {wall:6.2f} s  {rss:7.0f} MB  "
                      f"load {loadavg()}", flush=True)
    load_after = loadavg()
    print(f"\nmedians of {args.rounds} interleaved rounds; load average before {load_before}, "
          f"after {load_after}")
    print(f"{'variant':13s} {'old s':>7s} {'new s':>7s} {'ratio':>6s}   "
          f"{'old MB':>7s} {'new MB':>7s} {'ratio':>6s}")
    summary = {}
    for v in variants:
        m = {k: {q: statistics.median(res[v][k][q]) for q in ("wall", "rss")} for k in versions}
        summary[v] = m
        print(f"{v:13s} {m['old']['wall']:7.2f} {m['new']['wall']:7.2f} "
              f"{m['new']['wall'] / m['old']['wall']:6.3f}   {m['old']['rss']:7.0f} "
              f"{m['new']['rss']:7.0f} {m['new']['rss'] / m['old']['rss']:6.3f}")
    for ph, t in phase_times.items():
        mo, mn = statistics.median(t["old"]), statistics.median(t["new"])
        print(f"  speed: {ph:22s} {mo:7.2f} {mn:7.2f} {mn / mo:6.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"versions": {k: str(p) for k, p in versions.items()}, "rounds": args.rounds,
             "load_before": load_before, "load_after": load_after, "raw": res,
             "medians": summary, "speed_phases": phase_times}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

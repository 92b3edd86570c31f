"""Soak test: the whole suite N times in a row from a fresh clone, with every core kept busy.

    python benchmarks/soak.py [--runs 5] [--busy N] [--ref HEAD] [--keep DIR] [--setup] [-- PYTEST ARGS]
    make test-soak            (SOAK_RUNS=5 by default)

What it does:

1. ``git clone`` this repository (committed state at ``--ref``) into a fresh temporary directory;
2. starts ``--busy`` processes (default: one per core) that spin for the whole soak, at the
   same priority as the tests, so every test runs on a machine with no idle core;
3. runs ``python -m pytest -q tests`` in the clone ``--runs`` times in a row, stopping at the
   first failure;
4. prints one line per run (result, duration, pytest's summary, load average) and the failing
   tests' names, and exits 0 only when every run passed.

The clone imports its own code (``PYTHONPATH`` = the clone) with this interpreter's packages;
``--setup`` runs ``make setup`` in the clone first for a fresh virtual environment too (needs
the package index). Logs of every run stay in the clone's ``soak-logs/`` (kept with ``--keep``).
CI does not run this (it takes ``--runs`` times the suite); run it before a release or after a
change to numerics.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def busy_loops(n: int) -> list[subprocess.Popen]:
    """``n`` processes that each keep one core at 100% until killed."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(n)]


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()


def clone(ref: str, dest: Path) -> str:
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(ROOT), str(dest)], check=True)
    subprocess.run(["git", "checkout", "--quiet", ref], cwd=dest, check=True)
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=dest, check=True, capture_output=True,
                          text=True).stdout.strip()


def summary_line(log: str) -> str:
    """pytest's last ``N passed, M failed in Xs`` line."""
    for line in reversed(log.strip().splitlines()):
        if re.search(r"\b(passed|failed|errors?|deselected|skipped|no tests ran)\b", line) and " in " in line:
            return line.strip("= ").strip()
    return "(no pytest summary)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="consecutive full-suite runs (default 5)")
    ap.add_argument("--busy", type=int, default=os.cpu_count() or 2, help="spinning processes (default: one per core)")
    ap.add_argument("--ref", default="HEAD", help="commit to test (default HEAD; uncommitted changes are not in a clone)")
    ap.add_argument("--keep", type=Path, default=None, help="clone here and keep it (default: a temporary dir, removed)")
    ap.add_argument("--setup", action="store_true", help="run `make setup` in the clone (fresh venv) and use its python")
    ap.add_argument("pytest_args", nargs="*", help="after --: arguments for pytest (default: -q tests)")
    args = ap.parse_args(argv)
    if args.runs < 1 or args.busy < 0:
        ap.error("--runs must be >= 1 and --busy >= 0")

    tmp = None
    if args.keep is None:
        tmp = tempfile.mkdtemp(prefix="rewriter-soak-")
        dest = Path(tmp) / "rewriter"
    else:
        dest = args.keep.resolve()
        if dest.exists():
            ap.error(f"--keep {dest}: already exists")
    commit = clone(args.ref, dest)
    python = sys.executable
    if args.setup:
        subprocess.run(["make", "setup", f"PYTHON={sys.executable}"], cwd=dest, check=True)
        python = str(dest / ".venv" / "bin" / "python")
    logs = dest / "soak-logs"
    logs.mkdir()
    env = dict(os.environ, PYTHONPATH=str(dest))
    cmd = [python, "-m", "pytest", "-p", "no:cacheprovider", *(args.pytest_args or ["-q", "tests"])]
    print(f"soak: commit {commit} cloned into {dest}; {args.runs} x `{' '.join(cmd[1:])}` "
          f"with {args.busy} busy process(es) on {os.cpu_count()} core(s)", flush=True)

    results = []
    spinners = busy_loops(args.busy)
    t_all = time.monotonic()
    try:
        for i in range(1, args.runs + 1):
            t0 = time.monotonic()
            log_path = logs / f"run{i}.log"
            with open(log_path, "w") as log:
                rc = subprocess.run(cmd, cwd=dest, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
            text = log_path.read_text()
            dt = time.monotonic() - t0
            load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
            results.append((i, rc, dt))
            print(f"run {i}/{args.runs}: {'PASS' if rc == 0 else f'FAIL (exit {rc})'} in {dt / 60:.1f} min; "
                  f"{summary_line(text)}; load average {load}", flush=True)
            if rc != 0:
                failed = sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)))
                print("failing: " + (", ".join(failed) or "(see log)") + f"\nlog: {log_path}", flush=True)
                break
    finally:
        stop(spinners)
    passed = sum(1 for _, rc, _ in results if rc == 0)
    print(f"soak: {passed}/{args.runs} consecutive full-suite passes under load "
          f"({(time.monotonic() - t_all) / 60:.1f} min, commit {commit})", flush=True)
    ok = passed == args.runs
    if tmp is not None:
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept for inspection: {dest}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

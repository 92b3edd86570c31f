"""The fuzz corpus of issue 21 (``tests._fuzz``), longer: ``--count`` mutants (default 3000)
in child processes of ``--chunk`` each (RLIMIT_AS ``--mem-gib``, 30 s a mutant), niced.
Prints the counts: exits, classes, and each rule broken (all should be 0).

    python benchmarks/fuzz.py --count 3000 --start 100000
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=3000)
    ap.add_argument("--start", type=int, default=100_000, help="first seed (the test uses 0..119)")
    ap.add_argument("--chunk", type=int, default=250)
    ap.add_argument("--mem-gib", type=float, default=3.0)
    ap.add_argument("--json", help="write every record here")
    args = ap.parse_args()
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    recs: list[dict] = []
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for s in range(args.start, args.start + args.count, args.chunk):
            n = min(args.chunk, args.start + args.count - s)
            out = Path(tmp) / f"{s}.json"
            p = subprocess.run(["nice", "-n", "10", sys.executable, "-m", "tests._fuzz", "--start", str(s),
                                "--count", str(n), "--mem-gib", str(args.mem_gib), "--json", str(out)],
                               env=env, cwd=root, timeout=60 * n, capture_output=True, text=True)
            if p.returncode or not out.exists():  # the child itself died: every mutant of the chunk counts
                recs += [{"seed": s + i, "class": "?/?/?", "exit": f"child rc {p.returncode}",
                          "violations": [f"child rc {p.returncode}: {p.stderr.strip()[-200:]}"]} for i in range(n)]
                continue
            recs += json.loads(out.read_text())
            print(f"{len(recs)} mutants, {time.time() - t0:.0f} s", file=sys.stderr)
    exits = collections.Counter(str(r["exit"]) for r in recs)
    classes = collections.Counter(r["class"].split("/")[1] for r in recs)
    broken = collections.Counter(v.split(":")[0] for r in recs for v in r["violations"])
    summary = {"mutants": len(recs), "seconds": round(time.time() - t0), "exits": dict(exits),
               "classes": dict(classes), "violations": dict(broken),
               "examples": [r for r in recs if r["violations"]][:10]}
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(recs))
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())

"""Run the real-world corpus matrix (``tests/realworld``) and print, per architecture and
exporter, what each pass does: applied (with the independent check's max relative error) or
declined (with the reason), next to the expected outcome.

    PYTHONPATH=. .venv/bin/python benchmarks/corpus_table.py [--arch gpt2,vit] [--exporter ts14]
        [--json out.json] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.realworld.corpus import ARCHS, EXPORTERS, Corpus, run_case  # noqa: E402
from tests.realworld.expected import PASSES, expected, matches  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default=",".join(ARCHS))
    ap.add_argument("--exporter", default=",".join(EXPORTERS))
    ap.add_argument("--passes", default="")
    ap.add_argument("--json", default="")
    ap.add_argument("--markdown", action="store_true", help="print the README table")
    args = ap.parse_args()
    rows = []
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Corpus(Path(tmp))
        for arch in args.arch.split(","):
            for exp in args.exporter.split(","):
                for p in PASSES[arch]:
                    if args.passes and p not in args.passes.split(","):
                        continue
                    o = run_case(corpus, arch, exp, p)
                    want = expected(arch, exp, p)
                    ok, why = matches(want, o)
                    rows.append({"arch": arch, "exporter": exp, "pass": p, "status": o.status, "applied": o.applied,
                                 "declined": o.declined, "error": o.error, "message": o.message,
                                 "summary": o.summary(), "expected": want, "ok": ok, "why": why, "seconds": round(o.seconds, 2)})
                    print(f"{arch:9s} {exp:9s} {p:10s} {'OK ' if ok else 'BAD'} | want {want:30.30s} | {o.summary()[:220]}", flush=True)
        export_s = sum(corpus.seconds.values())
    total = time.perf_counter() - t_all
    print(f"\n{len(rows)} cases in {total:.0f} s (exports {export_s:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "seconds": total, "export_seconds": export_s}, indent=1))


if __name__ == "__main__":
    main()

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
    ap.add_argument("--from-json", default="", help="render the table of a saved --json run")
    args = ap.parse_args()
    if args.from_json:
        text = Path(args.from_json).read_text()
        rows = ([json.loads(x) for x in text.splitlines() if x.strip()] if args.from_json.endswith(".jsonl")
                else json.loads(text)["rows"])
        print(markdown(rows))
        return
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
    if args.markdown:
        print(markdown(rows))


def _cell(row: dict, notes: dict[str, int]) -> str:
    """``applied 1.6e-07`` (the independent check's max relative error), ``declined: <the
    expected reason>``, or, where the tool does not do what it should yet, ``✗`` and what it did."""
    want, status = row["expected"], row["status"]
    if row["ok"]:
        if status == "applied":
            more = " (cross-attn declined)" if "cross-attention" in want else ""
            err = row["error"]
            return f"applied {err:.0e}{more}" if row["pass"] != "lns" else "applied (1/√l)"
        if want == "none":
            return "no site (exporter folded BN)"
        kind, _, text = want.partition(":")
        said = row["declined"] if kind == "declined" else [row["message"]]
        alt = next((a for a in text.split("|") if any(a in r for r in said)), text.split("|")[0])
        return f"{'refused' if kind == 'error' else kind}: {alt}"
    from tests.realworld.test_corpus import KNOWN_GAPS

    why = KNOWN_GAPS.get((row["arch"], row["exporter"], row["pass"]))
    want_short = want.split(":")[0].replace("applied+declined", "applied")
    today = {"declined": "declines", "broken": "breaks", "error": "refuses", "applied": "applies"}.get(status, status)
    if why is None:
        return f"✗ want {want_short}, {today}: " + row["summary"][:40].replace("|", "/")
    n = notes.setdefault(why, len(notes) + 1)
    return f"✗ want {want_short}, {today} [{n}]"


def markdown(rows: list[dict]) -> str:
    passes = list(dict.fromkeys(r["pass"] for r in rows))
    order = list(dict.fromkeys((r["arch"], r["exporter"]) for r in rows))
    notes: dict[str, int] = {}
    cells = {(r["arch"], r["exporter"], r["pass"]): _cell(r, notes) for r in rows}
    lines = ["| model | exporter | " + " | ".join(passes) + " |", "|---|---|" + "---|" * len(passes)]
    for arch, exp in order:
        lines.append(f"| {arch} | {exp} | " + " | ".join(cells.get((arch, exp, p), "") for p in passes) + " |")
    ok = sum(r["ok"] for r in rows)
    lines.append(f"\n{ok} of {len(rows)} cases as expected. Where not yet, what to fix:\n")
    lines += [f"{n}. {why}" for why, n in notes.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

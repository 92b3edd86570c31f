"""The seeded fuzz corpus of issue 21 (``tests._fuzz``) in ``make test``: 300 mutants of
small valid models (structured, wire-format and byte-level edits), each through ``rewrite``
in a child process bounded in memory (RLIMIT_AS 3 GiB) and time (30 s a mutant)."""

from __future__ import annotations

import collections
import json
import subprocess
import sys


def test_fuzz_corpus_holds_the_oracle(tmp_path):
    """Every mutant: exit 0 only when ORT reads the file and the output matches ORT on the
    original; else exit 1/2/3 with one line and no output; never exit 4, a timeout or
    MemoryError; the input's bytes unchanged."""
    out = tmp_path / "fuzz.json"
    subprocess.run([sys.executable, "-m", "tests._fuzz", "--start", "0", "--count", "300", "--json", str(out)],
                   check=True, timeout=600)
    recs = json.loads(out.read_text())
    bad = [r for r in recs if r["violations"]]
    assert not bad, bad[:5]
    exits = collections.Counter(r["exit"] for r in recs)
    classes = collections.Counter(r["class"].split("/")[1] for r in recs)
    assert len(recs) == 300 and exits[0] and exits[2], exits  # both verdicts occur
    assert set(classes) == {"structured", "wire", "bytes"}, classes

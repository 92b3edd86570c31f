"""`rewrite passes`: every pass and option, defaults as values, readable at 80 columns; --json."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from rewriter.cli import format_passes
from rewriter.pass_api import describe_passes


def _passes(*args, columns=80):
    env = dict(os.environ, COLUMNS=str(columns))
    p = subprocess.run([sys.executable, "-m", "rewriter.cli", "passes", *args], capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    return p.stdout


def _signature(o) -> str:
    return f"{o['name']}: {o['type']} = {o['default']!r}"


def test_passes_at_80_columns_lists_every_option_on_one_line():
    """COLUMNS=80: no line over 80, no `<... object at 0x...>`, each pass and option signature whole."""
    text = _passes()
    lines = text.splitlines()
    assert all(len(ln) <= 80 for ln in lines), [ln for ln in lines if len(ln) > 80]
    assert not re.search(r"object at 0x|_MISSING_TYPE", text)
    flat = " ".join(text.split())
    docs = describe_passes()
    assert len(docs) >= 7
    for d in docs:
        assert any(ln.startswith(f"{d['name']}  ({d['kind']}; ") for ln in lines), d["name"]
        for o in d["options"]:
            # the signature (name, type, default) sits on a single line
            assert any(ln.strip().startswith(_signature(o)) for ln in lines), _signature(o)
            assert o["help"], f"{d['name']}.{o['name']} has no meaning"
            assert " ".join(o["help"].split()) in flat, o["help"]
    # a default_factory shows its value
    assert "candidates: list[int] = [2, 3, 4]" in text


def test_passes_json_lists_the_same():
    """`rewrite passes --json` parses and holds the same passes and options as the text."""
    doc = json.loads(_passes("--json"))
    text = _passes()
    assert [d["name"] for d in doc["passes"]] == [d["name"] for d in describe_passes()]
    for d in doc["passes"]:
        assert {"name", "kind", "irs", "summary", "options"} <= set(d)
        for o in d["options"]:
            assert {"name", "type", "default", "help"} <= set(o)
            assert _signature(o) in text
    shiftadd = {o["name"]: o for o in next(d for d in doc["passes"] if d["name"] == "shiftadd")["options"]}
    assert shiftadd["candidates"]["default"] == [2, 3, 4] and shiftadd["include"]["default"] == []


def test_format_passes_wraps_meanings_never_signatures():
    """A meaning too long for the width goes under its signature, wrapped; lines fit the width."""
    docs = [{"name": "p", "kind": "exact", "irs": ["onnx"], "summary": "word " * 30,
             "options": [{"name": "a", "type": "int", "default": 1, "help": "short"},
                         {"name": "b", "type": "a|b|c", "default": "a", "help": "long meaning " * 8}]}]
    lines = format_passes(docs, width=50).splitlines()
    assert all(len(ln) <= 50 for ln in lines)
    assert "    a: int = 1" in lines and "    b: a|b|c = 'a'" in lines
    assert lines[lines.index("    b: a|b|c = 'a'") + 1].startswith(" " * 8 + "long meaning")
    wide = format_passes(docs, width=200).splitlines()
    assert any(ln.startswith("    b: a|b|c = 'a'") and ln.rstrip().endswith("long meaning") for ln in wide)

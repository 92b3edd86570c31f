"""The real-world corpus: every (architecture, exporter, pass) ends as ``EXPECTED`` says.

Models from ``transformers`` / ``diffusers`` classes (tiny configs, seeded random weights),
exported by the TorchScript exporter at opsets 14 and 17 (dynamic axes), by the dynamo
exporter at opset 18 (dynamic batch and sequence), or captured by ``torch.export`` (``fx``).
Each file is built once per session. Each case rewrites the file through the Python API,
saves it, and checks the saved file independently: plain ONNX Runtime with graph
optimizations off (or the nn.Module against the GraphModule), fp32 max|a-b|/max|a| <= 1e-5 on
fresh seeded inputs of another batch / sequence where the file keeps them dynamic; or the
pass declines with the expected reason. ``benchmarks/corpus_table.py`` prints the table.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from tests.realworld.corpus import Corpus, run_case
from tests.realworld.expected import EXPECTED, matches

# Cases that a correct tool gets right but today's does not, grouped by the component to fix
# (the branch that fixes it, where one is at work), as "arch-exporter-pass". strict: a case
# that starts passing fails here, so its entry is removed when the fix lands.
_GAPS: dict[str, list[str]] = {}
KNOWN_GAPS: dict[tuple[str, str, str], str] = {
    tuple(case.split("-")): why for why, cases in _GAPS.items() for case in cases}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return Corpus(tmp_path_factory.mktemp("corpus"))


def _params():
    out = []
    for (arch, exporter, p), want in EXPECTED.items():
        marks = []
        if exporter == "dynamo18":
            marks.append(pytest.mark.slow)
        gap = KNOWN_GAPS.get((arch, exporter, p))
        if gap:
            marks.append(pytest.mark.xfail(strict=True, reason=gap))
        out.append(pytest.param(arch, exporter, p, want, marks=marks, id=f"{arch}-{exporter}-{p}"))
    return out


@pytest.mark.parametrize("arch,exporter,pass_name,want", _params())
def test_corpus_case(corpus, tmp_path, arch, exporter, pass_name, want):
    """The pass applies exactly (independent ORT / torch check) or declines with the expected reason."""
    outcome = run_case(corpus, arch, exporter, pass_name, out_dir=tmp_path)
    ok, why = matches(want, outcome)
    if os.environ.get("CORPUS_ROWS"):  # benchmarks/corpus_table.py --from-json renders these
        with open(os.environ["CORPUS_ROWS"], "a") as f:
            f.write(json.dumps({"arch": arch, "exporter": exporter, "pass": pass_name, "expected": want, "ok": ok,
                                "why": why, **dataclasses.asdict(outcome), "summary": outcome.summary()}) + "\n")
    assert ok, f"{arch}/{exporter}/{pass_name}: {why}"


def test_matches_can_fail():
    """The expectation check rejects a wrong outcome: a decline where applied is expected, a
    wrong reason, an applied case blocked in part by a Shape read, a broken rewrite."""
    from tests.realworld.corpus import Outcome

    assert not matches("applied", Outcome("declined", 0, ["post-LN: n1"]))[0]
    assert not matches("declined:post-LN", Outcome("declined", 0, ["no norm reads a residual stream"]))[0]
    assert not matches("applied", Outcome("applied", 2, ["its output is read by other:Shape (s)"], 1e-7))[0]
    assert not matches("applied", Outcome("broken", 3, [], 0.4))[0]
    assert not matches("declined:causal", Outcome("applied", 1, [], 0.0))[0]
    assert not matches("applied+declined:cross-attention", Outcome("applied", 1, [], 0.0))[0]
    assert matches("declined:causal|attention mask", Outcome("declined", 0, ["x: has an attention mask"]))[0]
    assert matches("applied+declined:cross-attention", Outcome("applied", 1, ["a2: cross-attention (5 keys)"], 0.0))[0]

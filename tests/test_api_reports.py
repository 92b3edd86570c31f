"""The Python API gives the CLI's documents: ``Result.diff()``, ``Result.bench()`` and
``Result.html()`` (one implementation: the CLI calls them), validated against the schema."""

from __future__ import annotations

import json

import numpy as np
import pytest

import rewriter
from rewriter.cli import main
from rewriter.report_schema import REPORT_SCHEMA, validate
from tests.test_core import _BreakSecond, _three_gemms

EXACT_TOL = 1e-5  # the exact passes' fp32 tolerance (docs/architecture.md, tolerances)


def test_ci_script_through_the_api_alone(tmp_path):
    """A CI job written against the API only: rewrite a zoo model, gate on the verification,
    time it (the speedup key is there; its value is not judged), write the HTML, save, and
    the whole report validates against the JSON schema."""
    jsonschema = pytest.importorskip("jsonschema")

    res = rewriter.rewrite("zoo:bn-cnn", ["foldnorm"])
    assert res.passed and res.verification["performed"]
    assert res.verification["max_rel_error"] <= EXACT_TOL
    assert [p["applied"] > 0 for p in res.report["passes"]] == [True]

    diff = res.diff()
    assert diff is res.report["diff"]
    removed = {e["op"] for e in diff["nodes"]["removed"]}
    assert "BatchNormalization" in removed
    assert diff["op_counts"]["after"].get("BatchNormalization", 0) == 0

    lat = res.bench(runs=3, warmup=1, profile=True)
    assert res.report["latency"] is lat
    assert "speedup" in lat and lat["before"]["samples"] == 3 and lat["after"]["samples"] == 3

    page = res.html(tmp_path / "report.html")
    text = page.read_text()
    for ident in ('id="graph-before"', 'id="graph-after"', 'id="latency-summary"', 'id="numerics"', 'id="sites"'):
        assert ident in text
    out = res.save(tmp_path / "bn-cnn.foldnorm.onnx")
    assert out.is_file() and res.report["output"] == str(out)

    doc = json.loads(json.dumps(res.report))  # what a CI job would write and read back
    jsonschema.validate(doc, REPORT_SCHEMA)
    broken = dict(doc, latency={k: v for k, v in doc["latency"].items() if k != "speedup"})
    with pytest.raises(jsonschema.ValidationError):  # the schema really requires the key
        jsonschema.validate(broken, REPORT_SCHEMA)


def test_api_documents_equal_the_cli_documents(tmp_path):
    """The CLI's --json report carries the same node-level diff, the same latency keys and
    the same verification as the API's Result for the same model and passes."""
    cli_json = tmp_path / "cli.json"
    rc = main(["zoo:bn-cnn", "--passes", "foldnorm", "-o", str(tmp_path / "o.onnx"), "--bench", "--runs", "3",
               "--warmup", "1", "--json", str(cli_json), "--html", str(tmp_path / "cli.html"), "-q"])
    assert rc == 0
    cli = json.loads(cli_json.read_text())
    res = rewriter.rewrite("zoo:bn-cnn", ["foldnorm"], source="zoo:bn-cnn")
    res.diff()
    res.bench(runs=3, warmup=1)
    api = json.loads(json.dumps(res.report, default=str))
    validate(cli)
    validate(api)
    assert api["diff"] == cli["diff"]
    assert set(api["latency"]) == set(cli["latency"])
    assert api["passes"][0]["sites"] == cli["passes"][0]["sites"]
    assert api["verification"]["max_rel_error"] == pytest.approx(cli["verification"]["max_rel_error"], abs=1e-12)


def test_bench_refuses_a_model_that_failed_verification(rng, tmp_path):
    """A Result that failed verification is not timed (unless the run was forced), and its
    page is still written with the numerics saying FAILED."""
    res = rewriter.rewrite(_three_gemms(rng), [_BreakSecond()])
    assert not res.passed
    with pytest.raises(rewriter.VerificationFailed, match="not timing"):
        res.bench(runs=2, warmup=0)
    assert "latency" not in res.report
    text = res.html(tmp_path / "failed.html").read_text()
    assert "FAILED" in text and 'id="graph-after"' in text
    forced = rewriter.rewrite(_three_gemms(rng), [_BreakSecond()], force=True)
    assert "speedup" in forced.bench(runs=2, warmup=0, profile=False)


def test_original_is_untouched_for_torch_input(tmp_path):
    """For an nn.Module the original is captured again on first use: diff() sees the
    BatchNorm the rewrite removed, and the caller's module still computes what it did."""
    import torch

    import models_zoo

    module, ex = models_zoo.build("bn-cnn")
    with torch.no_grad():
        want = module(*ex).numpy()
    res = rewriter.rewrite(module, ["foldnorm"], example_inputs=ex)
    assert res.passed and res.report["model"]["ir"] == "torch"
    d = res.diff()
    assert any("batch_norm" in e["op"] for e in d["nodes"]["removed"])
    with torch.no_grad():
        assert np.array_equal(module(*ex).numpy(), want)


def test_original_survives_saving_over_the_input_file(tmp_path):
    """The original of a file input is read again only when needed, but saving the result
    over the input first keeps it: diff() still sees the BatchNorm the pass removed."""
    from tests._report_models import conv_bn

    path = conv_bn(tmp_path / "m.onnx")
    res = rewriter.rewrite(str(path), ["foldnorm"])
    res.save(path)
    d = res.diff()
    assert [e["op"] for e in d["nodes"]["removed"]] == ["BatchNormalization"]
    assert d["op_counts"]["before"]["BatchNormalization"] == 1

    other = conv_bn(tmp_path / "n.onnx")
    lazy = rewriter.rewrite(str(other), ["foldnorm"])
    assert lazy._original is None  # nothing held until asked for
    assert lazy.original.op_counts()["BatchNormalization"] == 1 and lazy.view.op_counts().get("BatchNormalization", 0) == 0

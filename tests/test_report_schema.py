"""The JSON documents (run report, diff, bench) validate against the documented schemas."""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest

from rewriter.cli import main
from rewriter.report_schema import BENCH_SCHEMA, DIFF_SCHEMA, REPORT_SCHEMA, validate
from tests._report_models import conv_bn


@pytest.fixture()
def model(tmp_path):
    return conv_bn(tmp_path / "m.onnx")


def _run_report(model, tmp_path, *extra):
    out = tmp_path / "r.json"
    rc = main([str(model), "--passes", "foldnorm", "-o", str(tmp_path / "o.onnx"), "--json", str(out), "-q", *extra])
    assert rc == 0
    return json.loads(out.read_text())


def test_schemas_are_valid_json_schema():
    """Each documented schema is itself a valid draft 2020-12 JSON Schema."""
    for s in (REPORT_SCHEMA, DIFF_SCHEMA, BENCH_SCHEMA):
        jsonschema.Draft202012Validator.check_schema(s)


def test_run_report_with_bench_validates(model, tmp_path):
    """`rewrite M --passes P --bench --json` validates and carries the documented latency/diff keys."""
    doc = _run_report(model, tmp_path, "--bench", "--runs", "3", "--warmup", "1")
    validate(doc)
    lat = doc["latency"]
    assert lat["before"]["p50_ms"] > 0 and lat["after"]["p50_ms"] > 0 and lat["speedup"] > 0
    assert lat["runs"] == 3 and lat["engine"] == "onnxruntime" and lat["graph_optimization"] == "all"
    assert {r["op"] for r in lat["op_types"]}  # profiled op types present
    assert set(doc["diff"]["params"]) == {"before", "after"} and set(doc["diff"]["bytes"]) == {"before", "after"}
    assert [e["name"] for e in doc["diff"]["nodes"]["removed"]] == ["bn"]
    assert doc["diff"]["nodes"]["removed"][0]["pass"] == "foldnorm"


def test_run_report_without_bench_validates(model, tmp_path):
    """Without --bench the report has no latency key and still validates."""
    doc = _run_report(model, tmp_path)
    validate(doc)
    assert "latency" not in doc


def test_schema_rejects_a_broken_document(model, tmp_path):
    """The schema is not vacuous: a report missing latency.speedup or with a bad kind fails."""
    doc = _run_report(model, tmp_path, "--bench", "--runs", "2", "--warmup", "0", "--no-profile")
    bad = copy.deepcopy(doc)
    del bad["latency"]["speedup"]
    with pytest.raises(jsonschema.ValidationError):
        validate(bad)
    bad = copy.deepcopy(doc)
    bad["passes"][0]["kind"] = "magic"
    with pytest.raises(jsonschema.ValidationError):
        validate(bad)


def test_diff_document_validates(model, tmp_path):
    """`rewrite diff A B --json` writes a rewriter.diff/1 document that validates."""
    out = tmp_path / "o.onnx"
    assert main([str(model), "--passes", "foldnorm", "-o", str(out), "-q"]) == 0
    j = tmp_path / "d.json"
    assert main(["diff", str(model), str(out), "--json", str(j), "-q"]) == 0
    doc = json.loads(j.read_text())
    validate(doc)
    assert doc["diff"]["op_counts"]["before"]["BatchNormalization"] == 1


def test_bench_document_validates(model, tmp_path):
    """`rewrite bench M --against M --json` writes a rewriter.bench/1 document that validates."""
    j = tmp_path / "b.json"
    assert main(["bench", str(model), "--against", str(model), "--runs", "3", "--warmup", "1", "--json", str(j), "-q"]) == 0
    doc = json.loads(j.read_text())
    validate(doc)
    assert doc["latency"]["after"]["label"] == str(model)

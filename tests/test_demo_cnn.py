"""``somax-plug demo --model cnn``: the Flax NNX CNN job on a tiny budget, in-process."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("flax.nnx")

from somax_plug._src.demo import HEADERS, build_parser, run_job, summary_rows  # noqa: E402


def test_demo_cnn_writes_the_same_results_and_plot(tmp_path):
    report = run_job(["sgn", "adam"], out=tmp_path, steps={"sgn": 2, "adam": 3},
                     progress=False, model="cnn")
    data = json.loads((tmp_path / "results.json").read_text())
    assert data == json.loads(json.dumps(report))
    assert data["model"]["kind"] == "Flax NNX CNN" and "BatchNorm" in data["model"]["state"]
    assert [r["name"] for r in data["results"]] == ["sgn", "adam"]
    for result, steps in zip(data["results"], (2, 3), strict=True):
        assert result["summary"]["steps"] == steps
        history = result["history"]
        assert [h["step"] for h in history] == list(range(steps + 1))
        for h in history:
            assert math.isfinite(h["train_loss"]) and 0.0 <= h["test_accuracy"] <= 1.0
    assert (tmp_path / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = summary_rows(data["results"])
    assert len(rows) == 2 and all(len(r) == len(HEADERS) for r in rows)


def test_demo_parser_knows_the_cnn_model():
    assert build_parser().parse_args([]).model == "mlp"
    assert build_parser().parse_args(["--model", "cnn"]).model == "cnn"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--model", "resnet"])

"""The main job and the benchmark report, on tiny budgets, in-process."""

from __future__ import annotations

import json

from somax_plug._src import bench
from somax_plug._src.demo import HEADERS, run_job, summary_rows

SUMMARY_FIELDS = {
    "final_test_accuracy", "steps", "wall_clock_s", "time_to_95_s", "steps_to_95",
    "time_to_97_s", "steps_to_97", "compile_s",
}


def test_demo_writes_results_and_plot(tmp_path):
    report = run_job(["sgn", "adam"], out=tmp_path, steps={"sgn": 3, "adam": 4},
                     progress=False)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data == json.loads(json.dumps(report))
    assert {"machine", "jax_version", "results", "summary", "dataset"} <= set(data)
    assert {"platform", "cpu_count", "jax_version", "backend", "devices"} <= set(data["machine"])
    assert [r["name"] for r in data["results"]] == ["sgn", "adam"]
    for result, steps in zip(data["results"], (3, 4), strict=True):
        assert SUMMARY_FIELDS <= set(result["summary"])
        assert result["summary"]["steps"] == steps
        assert result["summary"]["compile_s"] > 0
        assert {"preset", "overrides", "batch_size"} <= set(result["config"])
        history = result["history"]
        assert [h["step"] for h in history] == list(range(steps + 1))
        for h in history:
            assert set(h) == {"step", "wall_clock_s", "train_loss", "test_accuracy"}
            assert 0.0 <= h["test_accuracy"] <= 1.0
        clocks = [h["wall_clock_s"] for h in history]
        assert clocks == sorted(clocks)
        assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert data["results"][0]["config"]["overrides"]["solver"]["name"] == "cg"
    png = (tmp_path / "training.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    rows = summary_rows(data["results"])
    assert len(rows) == 2 and all(len(r) == len(HEADERS) for r in rows)


def test_bench_json_schema_smoke():
    report = bench.collect(smoke=True, only=["flops"])
    assert set(report) == {"ratios", "cases", "targets"}
    assert set(report["ratios"]) == set(bench.RATIOS)
    assert report["ratios"]["flops_over_minimum"] > 0
    assert all(v is None for k, v in report["ratios"].items() if k != "flops_over_minimum")
    cases = report["cases"]
    assert {"platform", "cpu_count", "jax_version", "backend", "devices"} <= set(
        cases["machine"])
    assert cases["mode"] == "smoke" and "flops" in cases["runtime_s"]
    assert cases["flops"]["details"]["cg_iterations_run"] == cases["flops"]["details"]["k"]
    for name, target in report["targets"].items():
        assert name in bench.RATIOS and target["op"] == "<="
    json.dumps(report)  # serialisable as printed by --json
    assert bench.met("flops_over_minimum", 1.0) == "yes"
    assert bench.met("flops_over_minimum", None) == "n/a"
    assert bench.met("ours_over_adam_per_step", 3.0) == "-"

"""The real workloads (digits CNN, stdlib char-LM) at tiny size, and their bench report.

One smoke run of ``somax-plug bench --workloads cnn,lm`` (tiny models, 3 steps, Adam
and one preset, one seed) serves the schema, finiteness and output checks;
the LM's data loader is checked for determinism and for reading only standard-library
files. Neither python-somax nor kfac-jax is needed (their contenders are checked to be
reported ``not installed`` when they cannot be imported).
"""

from __future__ import annotations

import json
import math
import sys
import sysconfig
from pathlib import Path

import jax
import numpy as np
import pytest

from somax_plug._src import bench
from somax_plug._src.benchmarks import workloads as wl
from somax_plug._src.workloads import contenders as roster
from somax_plug._src.workloads import lm, make, runner

RUN_FIELDS = {
    "name", "family", "seed", "status", "error", "steps", "wall_clock_s", "compile_s",
    "time_to_target_s", "steps_to_target", "final", "last_train_loss", "last_heldout_loss",
    "step_ms", "details", "warmup_s",
}
SUMMARY_FIELDS = {
    "runs", "statuses", "reached", "median_time_to_target_s", "median_steps_to_target",
    "median_final_loss", "median_final_accuracy", "median_step_ms", "compile_s",
    "status", "errors", "last_train_loss", "last_heldout_loss",
}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_out")
    report = bench.collect(smoke=True, workloads=["cnn", "lm"], out=out)
    return report, out


# --------------------------------------------------------------------- LM data
def test_lm_corpus_is_stdlib_and_deterministic():
    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    a, b = lm.load_corpus(), lm.load_corpus()
    assert Path(a["root"]).resolve() == root
    np.testing.assert_array_equal(a["train"], b["train"])
    np.testing.assert_array_equal(a["valid"], b["valid"])
    assert not set(lm.TRAIN_FILES) & set(lm.VALID_FILES)  # split by file
    for split, files in (("train_files", lm.TRAIN_FILES), ("valid_files", lm.VALID_FILES)):
        read = a[split]["files"]
        assert read and set(read) | set(a[split]["missing"]) == set(files)
        for name in read:
            path = (root / name).resolve()
            assert path.is_relative_to(root) and path.suffix == ".py" and path.is_file()
    assert sum(a["train_files"]["files"].values()) == len(a["train"])
    assert a["train"].min() >= 0 and a["train"].max() < lm.VOCAB_SIZE
    assert lm.decode(lm.encode(b"def f(x):\n\treturn x  # \xc3\xa9")) == (
        "def f(x):\n\treturn x  # \ufffd\ufffd")


def test_lm_batches_are_rows_and_a_function_of_seed_and_step():
    corpus = lm.load_corpus()
    w = lm.make("tiny", corpus=corpus)
    t, bsz = lm.SIZES["tiny"]["context"], lm.SIZES["tiny"]["batch"]
    x, y = w.batch(3, 7)
    assert x.shape == y.shape == (bsz * t,) and x.dtype == y.dtype == np.int32
    x2, y2 = w.batch(3, 7)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    assert not np.array_equal(x, w.batch(3, 8)[0])
    assert not np.array_equal(x, w.batch(4, 7)[0])
    # targets are the next characters of the same windows
    np.testing.assert_array_equal(np.asarray(x).reshape(bsz, t)[:, 1:],
                                  np.asarray(y).reshape(bsz, t)[:, :-1])
    params = jax.jit(w.init_params)(jax.random.key(0))
    logits, loss = jax.jit(lambda p: (w.predict_fn(p, x), w.objective(p, (x, y))))(params)
    assert logits.shape == (bsz * t, lm.VOCAB_SIZE)
    assert math.isclose(float(loss), math.log(lm.VOCAB_SIZE), rel_tol=0.05)


def test_cnn_images():
    w = make("cnn", "tiny")
    x, y = w.batch(0, 0)
    assert x.shape == (w.batch_size, 8, 8, 1) and y.shape == (w.batch_size,)
    logits = jax.jit(lambda k: w.predict_fn(w.init_params(k), x))(jax.random.key(0))
    assert logits.shape == (w.batch_size, 10)
    assert w.eval_data[0].shape[1:] == (8, 8, 1)


# ------------------------------------------------------------ training, report
def test_smoke_bench_schema(smoke):
    report, _ = smoke
    assert set(report) == {"ratios", "cases", "targets"}
    assert set(report["ratios"]) == set(bench.RATIOS)
    assert set(wl.ratio_names()) <= set(report["targets"])
    assert report["cases"]["mode"] == "smoke" and "workloads" in report["cases"]["runtime_s"]
    assert set(report["cases"]) >= {"workloads", "machine", "runtime_s"}
    assert "planning" not in report["cases"]  # --workloads alone runs only that part
    case = report["cases"]["workloads"]
    assert set(wl.ratio_names()) <= set(case)
    json.dumps(report)


@pytest.mark.parametrize("name", ["cnn", "lm"])
def test_smoke_runs_are_finite(smoke, name):
    report, _ = smoke
    sub = report["cases"]["workloads"]["details"][name]
    assert {"workload", "machine", "seeds", "budget", "contenders", "summary", "best",
            "ratios", "runs", "patches"} <= set(sub)
    names = [c["name"] for c in sub["contenders"]]
    assert names == [f"adam lr={make(name, 'tiny').adam_grid[-1]:g}", wl.SMOKE_PRESET]
    for c in names:
        assert SUMMARY_FIELDS <= set(sub["summary"][c])
        [rec] = sub["runs"][c]
        assert RUN_FIELDS <= set(rec)
        assert rec["status"] in ("reached", "not reached"), (c, rec)
        assert rec["steps"] == 3 and rec["compile_s"] > 0
        assert math.isfinite(rec["last_train_loss"])
        assert math.isfinite(rec["final"]["loss"]) and 0 <= rec["final"]["accuracy"] <= 1
    assert sub["best"]["preset"] == wl.SMOKE_PRESET
    assert len(runner.table_rows(sub)) == 2


@pytest.mark.parametrize("name", ["cnn", "lm"])
def test_smoke_writes_json_and_plot(smoke, name):
    _, out = smoke
    data = json.loads((out / f"{name}_results.json").read_text())
    for recs in data["runs"].values():
        history = recs[0]["history"]
        assert [h["step"] for h in history][0] == 0 and history[-1]["step"] == 3
        assert all(math.isfinite(h["loss"]) for h in history)
        clocks = [h["wall_clock_s"] for h in history]
        assert clocks == sorted(clocks)
    assert (out / f"{name}_training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_peers_are_reported_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "somax", None)
    monkeypatch.setitem(sys.modules, "kfac_jax", None)
    w = make("cnn", "tiny")
    rep = runner.run(w, [roster.python_somax(), roster.kfac()], seeds=(0, 1))
    for c in ("python-somax sgn_ce", "kfac-jax"):
        assert [r["status"] for r in rep["runs"][c]] == ["not installed"] * 2
        assert rep["summary"][c]["status"] == "not installed"
        assert "not installed" in rep["runs"][c][0]["error"]
    assert rep["ratios"]["best_preset_over_kfac"] is None


class _Exploding:
    """A runner whose loss becomes non-finite at the second timed step."""

    def __init__(self) -> None:
        self.calls = 0

    def init(self, params):
        return 0

    def step(self, params, state, batch, key):
        self.calls += 1
        loss = float("nan") if self.calls > 3 else 1.0
        return params, state, loss


def test_divergence_is_reported_with_last_loss():
    w = make("cnn", "tiny")
    c = roster.Contender("exploding", "test", {}, lambda w, s: _Exploding())
    rec = runner.train_run(w, c, 0)
    assert rec["status"] == "diverged" and rec["last_train_loss"] == 1.0
    summary = runner.summarize([rec], higher_is_better=True)
    assert summary["status"] == "diverged" and summary["last_heldout_loss"] is not None


def test_cli_options():
    from somax_plug._src.demo import build_parser

    assert build_parser().parse_args([]).workload == "mlp"
    assert build_parser().parse_args(["--workload", "lm"]).workload == "lm"
    args = bench.build_parser().parse_args(["--workloads", "cnn,lm"])
    assert args.workloads == ["cnn", "lm"]
    assert bench.build_parser().parse_args([]).workloads is None
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(["--workloads", "mnist"])

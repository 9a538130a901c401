"""The contenders of the workload benchmark, each as a runner with one interface.

A :class:`Contender` builds, for a workload and a seed, a runner with
``init(params) -> state`` and ``step(params, state, batch, key) -> (params, state,
loss)`` (``loss``: the minibatch loss before the step, or None where the library does
not report it). Contenders (:func:`default_contenders`):

* ``adam lr=...``: ``optax.adam`` at each learning rate of the workload's grid
  (:attr:`~somax_plug._src.workloads.base.Workload.adam_grid`), a jitted
  ``jax.value_and_grad`` of the mean cross-entropy and the update;
* ``optax sophia``: ``optax.contrib.sophia`` (its defaults: Hutchinson diagonal every 10
  steps, ``gamma=0.01``, clip 1, weight decay 1e-4) at the workload's ``sophia_lr``
  (optax requires one; a point inside the Adam grid, not tuned), with ``obj_fn`` the
  minibatch loss;
* ``python-somax sgn_ce``: python-somax's ``sgn_ce(predict_fn=...)`` with its defaults
  (lam 1, CG 20 iterations, tol 1e-5, warm start, learning rate 1), jitted;
* ``kfac-jax``: ``kfac_jax.Optimizer`` configured as in kfac-jax's README (adaptive
  learning rate, momentum and damping, initial damping 1, no l2), burn-in off (it
  needs a data iterator); the loss is registered with
  ``register_softmax_cross_entropy_loss`` and, for the language model, batches are
  counted in sequences (``batch_size_extractor``) with ``weight = 1 / T`` so that the
  registered loss is the per-character mean. kfac-jax 0.0.8 needs
  :mod:`~somax_plug._src.workloads.kfac_patch` on current JAX (applied in-process);
* every somax_plug preset (``somax_plug.get_registry().presets()``, built-in ones)
  composed with its defaults only: ``compose(preset=NAME, predict_fn=...,
  loss="softmax_cross_entropy")``, stepped with ``jax.jit(method.step)`` compiled
  ahead of time (which also measures the step's memory: a step that would need more
  than half the machine's memory is refused, not run) or, without that check (the
  tests), with ``method.step``.

python-somax and kfac-jax are optional: without them their runner raises
:class:`NotInstalled` and the contender is reported ``not installed``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import optax

from somax_plug._src.workloads.base import Workload

PyTree = Any


KFAC_PERIODS = (5, 5)
"""kfac-jax's ``inverse_update_period`` and ``damping_adaptation_interval`` (its
defaults, passed explicitly: the warm-up covers two periods)."""


class NotInstalled(RuntimeError):
    """An optional peer library is missing (the contender is reported, not run)."""


class Infeasible(RuntimeError):
    """The compiled step would need more memory than the machine has."""


@dataclass(frozen=True)
class Contender:
    """One optimizer: a name, a family, its options and a runner factory.

    Attributes:
        family: ``"adam"``, ``"sophia"``, ``"python-somax"``, ``"kfac-jax"`` or
            ``"preset"``.
        options: what configures it (JSON-serialisable), recorded in the report.
        build: ``build(workload, seed) -> runner``.
    """

    name: str
    family: str
    options: dict[str, Any]
    build: Callable[[Workload, int], Any] = field(compare=False, repr=False)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "family": self.family, "options": self.options,
                "note": self.note}


# ------------------------------------------------------------------------- runners
class OptaxRunner:
    """An Optax transformation on ``jax.value_and_grad`` of the workload's objective."""

    def __init__(self, workload: Workload, tx: Any, needs_obj_fn: bool = False) -> None:
        self.tx = tx
        objective = workload.objective

        def step(params: PyTree, state: Any, batch: Any) -> Any:
            loss, grads = jax.value_and_grad(objective)(params, batch)
            extra = {"obj_fn": lambda p: objective(p, batch)} if needs_obj_fn else {}
            updates, state = tx.update(grads, state, params, **extra)
            return optax.apply_updates(params, updates), state, loss

        self._step = jax.jit(step)

    def init(self, params: PyTree) -> Any:
        return self.tx.init(params)

    def step(self, params: PyTree, state: Any, batch: Any, key: Any) -> Any:
        return self._step(params, state, batch)


class PresetRunner:
    """A somax_plug preset with its defaults, through the public ``compose``."""

    def __init__(self, workload: Workload, preset: str, check_memory: bool = True) -> None:
        import somax_plug

        self.method = somax_plug.compose(preset=preset, predict_fn=workload.predict_fn,
                                         loss="softmax_cross_entropy")
        self.check_memory = check_memory
        self._checked: dict[str, Any] | None = None
        self._compiled: Any = None

    def init(self, params: PyTree) -> Any:
        return self.method.init(params)

    def precheck(self, params: PyTree, state: Any, batch: Any, key: Any) -> dict[str, Any]:
        """Compile ``jax.jit(method.step)`` ahead of time; refuse it if it needs more
        than :func:`memory_limit`, else step with that executable from now on.

        Once per runner (the shapes do not change between seeds). The executable is
        the public ``Method.step`` traced under ``jax.jit`` (its input checks run once,
        at tracing), so the step compiles once, not twice.
        """
        if not self.check_memory:
            return {}
        if self._checked is None:
            self._checked = self._measure(params, state, batch, key)
        return self._checked

    def _measure(self, params: PyTree, state: Any, batch: Any, key: Any) -> dict[str, Any]:
        compiled = jax.jit(self.method.step).lower(params, state, batch, key).compile()
        try:
            mem = compiled.memory_analysis()
            need = int(mem.temp_size_in_bytes + mem.argument_size_in_bytes
                       + mem.output_size_in_bytes)
        except Exception:  # pragma: no cover - backends without the analysis
            return {}
        limit = memory_limit()
        if need > limit:
            raise Infeasible(f"the compiled step needs {need / 2**30:.1f} GiB of memory, more "
                             f"than the limit of {limit / 2**30:.1f} GiB (half this machine's)")
        self._compiled = compiled
        return {"step_memory_bytes": need, "stepped_with": "jax.jit(method.step), AOT-compiled"}

    def step(self, params: PyTree, state: Any, batch: Any, key: Any) -> Any:
        step = self.method.step if self._compiled is None else self._compiled
        params, state, info = step(params, state, batch, key)
        return params, state, info["loss"]

    def describe(self) -> dict[str, Any]:
        return {"composition": self.method.plan.to_dict()["components"],
                "plan_fingerprint": self.method.plan.fingerprint}


class SomaxRunner:
    """python-somax's ``sgn_ce`` with its defaults (``step(params, {x, y}, state, rng)``)."""

    def __init__(self, workload: Workload) -> None:
        try:
            import somax
        except Exception as exc:
            raise NotInstalled("python-somax not installed (pip install somax-plug[bench])"
                               ) from exc
        self.method = somax.sgn_ce(predict_fn=workload.predict_fn)
        self._step = jax.jit(self.method.step)
        self.version = somax.__version__

    def init(self, params: PyTree) -> Any:
        return self.method.init(params)

    def step(self, params: PyTree, state: Any, batch: Any, key: Any) -> Any:
        x, y = batch
        params, state, _ = self._step(params, {"x": x, "y": y}, state, key)
        return params, state, None


class KfacRunner:
    """kfac-jax's ``Optimizer`` (README configuration), patched for current JAX."""

    def __init__(self, workload: Workload, seed: int) -> None:
        try:
            import kfac_jax
        except Exception as exc:
            raise NotInstalled("kfac-jax not installed (pip install somax-plug[bench])"
                               ) from exc
        from somax_plug._src.workloads import kfac_patch

        self.patch = kfac_patch.apply()
        rows = int(workload.info.get("rows_per_example", 1))
        predict = workload.predict_fn
        import jax.numpy as jnp

        def loss_fn(params: PyTree, batch: Any) -> Any:
            x, y = batch
            logits = predict(params, x)
            kfac_jax.register_softmax_cross_entropy_loss(logits, y, weight=1.0 / rows)
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

        self.opt = kfac_jax.Optimizer(
            value_and_grad_func=jax.value_and_grad(loss_fn), l2_reg=0.0,
            use_adaptive_learning_rate=True, use_adaptive_momentum=True,
            use_adaptive_damping=True, initial_damping=1.0, multi_device=False,
            num_burnin_steps=0, batch_size_extractor=lambda b: b[0].shape[0] // rows,
            inverse_update_period=KFAC_PERIODS[0], damping_adaptation_interval=KFAC_PERIODS[1],
        )
        self._workload, self.seed = workload, seed
        # kfac-jax compiles a step variant per phase of its inverse and damping periods
        self.warmup_steps = 2 * max(KFAC_PERIODS) + 1
        self.version = getattr(kfac_jax, "__version__", "?")

    def init(self, params: PyTree) -> Any:
        batch = self._workload.batch(self.seed, 0)  # for shapes; seed set by the runner
        return self.opt.init(params, jax.random.key(self.seed), batch)

    def step(self, params: PyTree, state: Any, batch: Any, key: Any) -> Any:
        params, state, stats = self.opt.step(params, state, key, batch=batch)
        return params, state, stats["loss"]


def memory_limit() -> int:
    """Half of the machine's physical memory (bytes); 8 GiB where unknown."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")) // 2
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 8 * 2**30


# ---------------------------------------------------------------------- the roster
def adam(lr: float) -> Contender:
    return Contender(f"adam lr={lr:g}", "adam", {"optimizer": "optax.adam", "learning_rate": lr},
                     lambda w, s: OptaxRunner(w, optax.adam(lr)))


def sophia(lr: float) -> Contender:
    return Contender(
        "optax sophia", "sophia",
        {"optimizer": "optax.contrib.sophia", "learning_rate": lr, "other": "defaults"},
        lambda w, s: OptaxRunner(w, optax.contrib.sophia(lr), needs_obj_fn=True),
        note="learning rate required by optax (not tuned); the rest at optax's defaults")


def python_somax() -> Contender:
    return Contender("python-somax sgn_ce", "python-somax",
                     {"function": "somax.sgn_ce", "options": "defaults"},
                     lambda w, s: SomaxRunner(w))


def kfac() -> Contender:
    return Contender(
        "kfac-jax", "kfac-jax",
        {"optimizer": "kfac_jax.Optimizer", "use_adaptive_learning_rate": True,
         "use_adaptive_momentum": True, "use_adaptive_damping": True, "initial_damping": 1.0,
         "l2_reg": 0.0, "num_burnin_steps": 0},
        lambda w, s: KfacRunner(w, s),
        note="kfac-jax README configuration; patched in-process for current JAX")


def preset(name: str, check_memory: bool = True) -> Contender:
    return Contender(name, "preset", {"preset": name, "overrides": {}},
                     lambda w, s: PresetRunner(w, name, check_memory=check_memory),
                     note="compose(preset=...) with its defaults")


def preset_names() -> list[str]:
    """The built-in presets, as registered now (so changes to them flow in)."""
    from somax_plug._src.registry import get_registry

    return sorted(p.name for p in get_registry().presets() if p.plugin == "builtin")


def default_contenders(workload: Workload, presets: list[str] | None = None,
                       check_memory: bool = True) -> list[Contender]:
    """Adam over the grid, optax Sophia, python-somax, kfac-jax, then every preset."""
    roster = [adam(lr) for lr in workload.adam_grid]
    roster += [sophia(workload.sophia_lr), python_somax(), kfac()]
    roster += [preset(n, check_memory) for n in (preset_names() if presets is None else presets)]
    return roster

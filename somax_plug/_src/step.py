"""The step builder: a :class:`~somax_plug.Plan` -> one jitted step.

``Method.step(params, state, batch, key) -> (params, state, info)`` runs, inside a
single ``jax.jit``, the pure functions of :mod:`somax_plug._src.step_core` (which
the Optax bridge runs too):

1. the plan's every-step resources, each traced once into one shared
   :class:`~somax_plug.Resources` context (planned mode); in unplanned
   mode each consumer gets a fresh context and recomputes what it reads, and the
   operator is rebuilt at every product;
2. the estimators, each under ``lax.cond`` at its cadence (between ticks the
   last statistics, kept in its state, are reused);
3. the preconditioner's update (at its cadence) and the solve of
   ``(C + lam I) s = g`` with ``lam`` from the damping policy;
4. the update ``u = tx(s)`` (by default ``-learning_rate * s``), then the plan's
   ``after_update`` resources (the loss after the step, the predicted decrease
   ``-(g.u + u.Cu / 2)``) at their consumers' cadence;
5. the damping update, which may reject the step. A rejected or non-finite step
   returns the parameters and the estimator, preconditioner, solver and
   optimizer states unchanged (only lambda and the step count move).

The state is a :class:`MethodState` pytree whose shapes never change, so the
step also runs inside ``lax.scan``. ``info`` has the fixed schema
:data:`INFO_KEYS`.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from somax_plug import compose
    >>> method = compose("ggn", "cg", predict_fn=lambda p, x: x @ p, loss="mse")
    >>> params = jnp.zeros(3)
    >>> state = method.init(params)
    >>> x, y = jnp.eye(3), jnp.ones(3)
    >>> params, state, info = method.step(params, state, (x, y), jax.random.key(0))
    >>> sorted(info)[:3]
    ['accepted', 'direction_norm', 'finite']
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from somax_plug._src import step_core as core
from somax_plug._src import tree
from somax_plug._src.plan import Plan
from somax_plug._src.step_core import INFO_KEYS, MethodState, default_key
from somax_plug._src.validation import InputValidator

__all__ = ["INFO_KEYS", "Method", "MethodState"]

_CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def _warn_cpu_collectives(plan: Plan, dp: Any) -> None:
    """Warn where canonical reductions met an XLA CPU collective deadlock (measured).

    Several CPU devices in this process, ``reduce_chunks`` and an estimator under a
    cadence (``every_k > 1``): XLA's CPU runtime ran two collectives in different
    orders on different devices and aborted after 40 s. The flag avoids it.
    """
    import os
    import warnings

    local = [d for d in dp.mesh.devices.flat if d.process_index == jax.process_index()]
    cadenced = [c.name for c in plan.estimators if c.every_k > 1]
    if (
        len(local) > 1
        and all(d.platform == "cpu" for d in local)
        and cadenced
        and _CPU_SCHEDULER_FLAG not in os.environ.get("XLA_FLAGS", "")
    ):
        warnings.warn(
            f"reduce_chunks with the cadenced estimator(s) {', '.join(cadenced)} on "
            f"{len(local)} CPU devices of one process deadlocked in XLA's CPU collectives "
            f"in tests (aborted after 40 s); start Python with XLA_FLAGS={_CPU_SCHEDULER_FLAG}"
            ", or use one CPU device per process (see docs/howto/multi-process.md)",
            RuntimeWarning,
            stacklevel=4,
        )


class Method:
    """A planned composition bound to a model: ``init`` and a jitted ``step``.

    Build it with :func:`somax_plug.compose`. ``trace_counts`` counts, per
    resource, how many times a provider was traced (one per step per resource in
    planned mode), which the tests and benchmarks read.
    """

    def __init__(
        self,
        plan: Plan,
        model: Any,
        tx: Any = None,
        mesh: Any = None,
        param_sharding: Any = None,
    ) -> None:
        self.plan = plan
        self.model = model
        self.tx = tx if tx is not None else optax.scale_by_learning_rate(plan.learning_rate)
        self.mesh = mesh
        self.data_parallel = None
        if mesh is not None:
            from somax_plug._src.sharding import DataParallel, canonical_model

            if isinstance(mesh, DataParallel):  # a layout with options (reduce_chunks)
                import copy

                layout = copy.copy(mesh)  # this method's own bound layouts
                if param_sharding is not None:
                    layout.param_sharding = param_sharding
                self.data_parallel, self.mesh = layout, mesh.mesh
            else:
                self.data_parallel = DataParallel(mesh, param_sharding=param_sharding)
            if self.data_parallel.reduce_chunks is not None:
                model = canonical_model(model, self.data_parallel)
                _warn_cpu_collectives(plan, self.data_parallel)
        elif param_sharding is not None:
            from somax_plug._src.errors import InputError

            raise InputError("param_sharding needs a mesh: pass mesh= as well")
        self.core = core.StepCore(plan, model)
        if self.data_parallel is not None and self.data_parallel.reduce_chunks is not None:
            from somax_plug._src.sharding import canonical_providers

            # dense and row-space algebra replicated (the same on any number of devices)
            self.core.providers = canonical_providers(self.core.providers, self.data_parallel)
        self.trace_counts = self.core.trace_counts
        self._model_state_spec: Any = ()
        self._contract_seen: set = set()
        self._validator = InputValidator(self._shape_view(model), self.data_parallel)
        self._validator.curvature_batch = plan.curvature_batch
        self._step_jit = jax.jit(self._step)
        self._step_default_key = jax.jit(
            lambda params, state, batch: self._step(
                params, state, batch, default_key(state.count)
            )
        )
        self._example_key: Any = None

    # ------------------------------------------------------------------ state
    def init(self, params: Any, model_state: Any = None) -> MethodState:
        """Initial state for ``params`` (shapes never change afterwards).

        ``model_state`` is the model's initial state (for example a Flax
        ``variables["batch_stats"]``); it is required exactly when the model declares
        ``has_state``. Records the parameters' and the state's shapes and dtypes,
        which :meth:`step` checks its arguments against; with a mesh, the state comes
        back laid out over it.
        """
        self._set_model_state(model_state)
        state = self._init_state(params, model_state)
        self._bind(params, state)
        if self.data_parallel is not None:
            from somax_plug._src.distributed import put_global

            state = put_global(state, self.data_parallel.state_shardings)
        return state

    def _set_model_state(self, model_state: Any) -> None:
        """Check ``model_state`` against the model's ``has_state`` and record its spec."""
        from somax_plug._src.errors import InputError
        from somax_plug._src.validation import spec_tree

        if self.model.has_state and model_state is None:
            raise InputError(
                "the model declares has_state=True, so method.init needs its initial "
                "state: method.init(params, model_state) (for example a Flax "
                "variables['batch_stats'], or the state an adapter of somax_plug.models "
                "returns)"
            )
        if not self.model.has_state and model_state is not None:
            raise InputError(
                f"method.init got a model_state ({type(model_state).__name__}) but the "
                "model does not declare has_state=True; declare it (compose(..., "
                "has_state=True) with predict_fn(params, inputs, *, state) -> (outputs, "
                "new_state)) or drop the model_state"
            )
        self._model_state_spec = spec_tree(model_state) if model_state is not None else ()
        self._contract_seen = set()

    def _init_state(self, params: Any, model_state: Any = None) -> MethodState:
        return self.core.init(params, self.tx, () if model_state is None else model_state)

    def _shape_view(self, model: Any) -> Any:
        """The plain model the input validator traces (state and key made up in-trace)."""
        if model.plain:
            return model
        from somax_plug._src.model import Model

        def outputs(params: Any, inputs: Any) -> Any:
            state = jax.tree_util.tree_map(
                lambda s: jnp.zeros(s.shape, s.dtype), self._model_state_spec
            )
            key = jax.random.key(0) if model.has_rng else None
            return model.apply_checked(params, inputs, state, key)[0]

        return Model(outputs, model.loss, couples_examples=True)

    def state_spec(self, params: Any) -> Any:
        """The ``jax.ShapeDtypeStruct`` tree of ``init(params)`` (no FLOPs, no side effect).

        For a model with state, its state's spec is the one ``init`` (or
        :meth:`resume`) recorded last.
        """
        ms = self._model_state_spec
        if self.model.has_state and ms == ():
            from somax_plug._src.errors import InputError

            raise InputError(
                "this model declares has_state=True and its state's shapes are not known "
                "yet: call method.init(params, model_state) first (for example before "
                "restoring a checkpoint into this method)"
            )
        return jax.eval_shape(
            lambda p: self._init_state(
                p, jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), ms)
            ),
            params,
        )

    def resume(self, params: Any, state: Any) -> tuple[Any, Any]:
        """Adopt ``params`` and a ``state`` made elsewhere (e.g. restored from a checkpoint).

        Records their shapes and dtypes as :meth:`init` does (so :meth:`step` checks
        against them) and, with a mesh, lays them out over it. Returns them.
        """
        if isinstance(state, MethodState) and self.model.has_state:
            self._set_model_state(state.model_state)
        self._bind(params, state)
        if self.data_parallel is not None:
            from somax_plug._src.distributed import put_global

            params = put_global(params, self.data_parallel.params_shardings)
            state = put_global(state, self.data_parallel.state_shardings)
        return params, state

    def _bind(self, params: Any, state: Any) -> None:
        """Fix the shapes and dtypes (and, with a mesh, the layouts) the step expects."""
        before = (self._validator.params_spec, self._validator.state_spec)
        self._validator.bind(params, state)
        after = (self._validator.params_spec, self._validator.state_spec)
        if self.data_parallel is not None and (
            self.data_parallel.params_shardings is None or before != after
        ):
            self.data_parallel.bind(params, state)
            self._step_jit = self.data_parallel.jit(self._step)

    # ------------------------------------------------------------------- step
    def direction(
        self, params: Any, state: MethodState, batch: Any, key: Any, rhs: Any = None
    ) -> core.Direction:
        """Compute ``s ~ (C + lam I)^-1 g`` (``g`` = the gradient, or ``rhs``); traceable."""
        return self.core.direction(params, state, batch, key, rhs)

    def _step(self, params: Any, state: MethodState, batch: Any, key: Any) -> Any:
        c = self.core
        d = c.direction(params, state, batch, key)
        ok = core.finite(d)
        safe = tree.where(ok, d.s, tree.zeros_like(d.s))
        updates, tx_state = self.tx.update(safe, state.tx, params)
        ok = ok & jnp.isfinite(tree.norm(updates))  # a tx (schedule, chain) may overflow
        candidate = optax.apply_updates(params, updates)
        after = c.after_update(d, state.count, updates, candidate)
        damping_state, accept = c.update_damping(
            state.damping, core.step_stats(d, after, ok), state.count
        )
        accept = accept & ok
        new_state = core.commit(accept, d.state._replace(tx=tx_state), state, damping_state)
        return tree.where(accept, candidate, params), new_state, core.info(d, after, accept, ok)

    def step(self, params: Any, state: MethodState, batch: Any, key: Any = None) -> Any:
        """One jitted step: ``(params, state, info)``. ``key`` defaults to one per count.

        Before tracing, the arguments are checked against what :meth:`init` saw
        (:class:`~somax_plug.InputError` on a mismatch; see
        :mod:`somax_plug._src.validation`), once per input signature. With a mesh, the
        arguments are placed on it (the batch sharded over the data axis).
        """
        if not isinstance(state, MethodState):
            from somax_plug._src.errors import InputError

            raise InputError(
                f"state must be the MethodState from method.init or a previous step, got "
                f"{type(state).__name__}; the arguments are step(params, state, batch, key)"
            )
        if not self._validator.bound:  # a state restored or built elsewhere
            if self.model.has_state:
                self._set_model_state(state.model_state)
            self._bind(params, self._checked_state_spec(params))
        self._check_model_state(state)
        if key is None and self.data_parallel is None:
            # the default key is derived inside the jitted step: no eager dispatches
            if self._example_key is None:
                self._example_key = jax.random.key(0)
            self._validator.check(params, state, batch, self._example_key)
            self._check_model_contract(params, state, batch, self._example_key)
            return self._step_default_key(params, state, batch)
        if key is None:
            key = default_key(state.count)
        self._validator.check(params, state, batch, key)
        self._check_model_contract(params, state, batch, key)
        if self.data_parallel is not None:
            params, state, batch, key = self.data_parallel.place(params, state, batch, key)
        return self._step_jit(params, state, batch, key)

    def _check_model_state(self, state: MethodState) -> None:
        """The model state keeps the structure, shapes and dtypes init recorded."""
        if not self.model.has_state:
            return
        from somax_plug._src.validation import _compare

        _compare(
            state.model_state,
            self._model_state_spec,
            "state.model_state",
            "method.init recorded",
            "the model state must keep its structure, shapes and dtypes from step to "
            "step: pass the state this method's previous step returned (or call "
            "method.init(params, model_state) again for a new model state)",
        )

    def _check_model_contract(self, params: Any, state: Any, batch: Any, key: Any) -> None:
        """Before tracing, once per signature: ``predict_fn`` against its declared
        flags (:meth:`Model.check_contract`)."""
        if self.model.plain:
            return
        from somax_plug._src.errors import InputError
        from somax_plug._src.validation import signature

        sig = signature(params, state.model_state, batch, key)
        try:
            if sig in self._contract_seen:
                return
        except TypeError:
            sig = None
        mkey = core.model_key(key, 0)
        try:
            self.model.check_contract(params, batch[0], state.model_state, mkey)
        except InputError:
            raise
        except Exception as exc:
            from somax_plug._src.validation import _first_line

            raise InputError(
                f"predict_fn fails when called as its flags declare (has_state="
                f"{self.model.has_state}, has_rng={self.model.has_rng}): {_first_line(exc)}"
            ) from exc
        if sig is not None:
            self._contract_seen.add(sig)

    def layer_map(self, params: Any, inputs: Any, model_state: Any = None) -> Any:
        """The ``LayerMap`` this method's plan finds for ``params`` and ``inputs``.

        Computed by the plan's own ``layer_map`` provider (a plugin's override
        included), outside any step; ``model_state`` is needed for a model with state
        (``has_state=True``). Raises ``CompositionError`` when the plan reads no layer
        map.
        """
        import jax

        from somax_plug._src.errors import CompositionError
        from somax_plug._src.resources import Resources

        provider = self.core.providers.get("layer_map")
        if provider is None:
            raise CompositionError(
                "this method's plan reads no layer map (no component requires the "
                "'layer_map' resource); use somax_plug.layers.discover(predict_fn, params, "
                "inputs) to see the layers of a model"
            )
        model = self.model
        if model.has_state and model_state is None:
            raise CompositionError(
                "this model has state (has_state=True): pass model_state= (for example "
                "method.init(...).model_state) to see its layer map"
            )
        if not model.plain:
            model = model.bind(model_state, jax.random.key(0))
        res = Resources(model, params, (inputs, None), jax.random.key(0),
                        {"layer_map": provider})
        return res["layer_map"]

    def _checked_state_spec(self, params: Any) -> Any:
        from somax_plug._src.errors import InputError

        try:
            return self.state_spec(params)
        except Exception as exc:
            raise InputError(
                f"cannot build this method's state for the given parameters: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def explain(self, params: Any = None, inputs: Any = None, model_state: Any = None) -> str:
        """The plan's explanation, then the choices components made when the step was traced.

        A component that decides something from static shapes while tracing (solver
        ``auto``: which solve; ``cg``: which loop form) records the decision and its
        reason in ``recorded_choices()``; they appear here once a step (or the Optax
        bridge's update) has been traced, and the plan's rule is printed before that.

        Args:
            params, inputs: the model's parameters and a batch of inputs (shapes only
                matter). Where the plan reads the ``layer_map`` resource (a component
                that needs per-layer structure), the layer map that the step's own
                provider finds for them is printed too (``LayerMap``: every dense/conv
                kernel, its shapes and shared axes, and the parameters not covered).
            model_state: the model's state, for a model with ``has_state=True``.
        """
        text = self.plan.explain()
        if params is not None and inputs is not None and "layer_map" in self.core.providers:
            text += "\n" + str(self.layer_map(params, inputs, model_state))
        chosen, pending = [f"  {'step':<15} {line}" for line in self.core.recorded], []
        for c in self.plan.components:
            recorded = getattr(c.instance, "recorded_choices", None)
            lines = list(recorded()) if callable(recorded) else []
            chosen += [f"  {c.role:<15} {line}" for line in lines]
            if not lines and getattr(c.instance, "deferred_rule", ""):
                pending.append(c.role)
        if chosen:
            text += "\nchosen when the step was traced:\n" + "\n".join(chosen)
        if pending:
            text += (
                f"\nnot traced yet: the choices of {', '.join(pending)} are made (and shown "
                "here) at the first step"
            )
        return text

"""The step builder: a :class:`~somax_plug.plan.Plan` -> one jitted step.

``Method.step(params, state, batch, key) -> (params, state, info)`` runs, inside a
single ``jax.jit``:

1. the plan's every-step resources, each traced once into one shared
   :class:`~somax_plug.resources.Resources` context (planned mode); in unplanned
   mode each consumer gets a fresh context and recomputes what it reads, and the
   operator is rebuilt at every product (see :class:`_Unshared`);
2. the estimators, each under ``lax.cond`` at its cadence (between ticks the
   last statistics, kept in its state, are reused);
3. the preconditioner's update (at its cadence) and the solve of
   ``(C + lam I) s = g`` with ``lam`` from the damping policy;
4. the update ``u = tx(s)`` (by default ``-learning_rate * s``), then, if planned,
   the loss after the step and the predicted decrease ``-(g.u + u.Cu / 2)``;
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

from typing import Any, NamedTuple

import attrs
import jax
import jax.numpy as jnp
import optax

from somax_plug import tree
from somax_plug.kinds import LinearOperator, RowFactors, SolverInfo, StepStats
from somax_plug.plan import Plan
from somax_plug.resources import Resources
from somax_plug.validation import InputValidator

INFO_KEYS = (
    "loss",
    "loss_after",
    "grad_norm",
    "direction_norm",
    "lam",
    "solver_iterations",
    "solver_residual",
    "solver_converged",
    "predicted_decrease",
    "rho",
    "accepted",
    "finite",
)
"""The fixed schema of ``info`` (NaN where a value was not computed this step)."""


class MethodState(NamedTuple):
    """State of a composed method (a pytree with fixed shapes)."""

    count: jax.Array
    estimators: tuple
    preconditioner: Any
    solver: Any
    damping: Any
    tx: Any


class Direction(NamedTuple):
    """What one direction computation produced (internal to the step and the bridge)."""

    s: Any
    loss: jax.Array
    grad: Any
    op: Any
    stats: dict
    lam: jax.Array
    solver_info: SolverInfo
    state: MethodState
    res: Resources


class _Unshared(LinearOperator):
    """Unplanned ablation: every product rebuilds the operator from its own resources.

    This is what a composition without a plan does when a solver calls a curvature
    operator that computes what it needs itself (``jax.jvp`` / ``jax.vjp`` from
    scratch per product). The parameters pass an ``optimization_barrier`` tied to
    ``v``, so XLA can neither merge the recomputation with the step's own forward
    pass nor hoist it out of the solver's loop: the ablation measures the work a
    plan saves, and gives the same numbers.
    """

    def __init__(self, res: Resources, build: Any) -> None:
        self._res = res
        self._build = build
        self._first = build(res)
        self.tags = self._first.tags
        self.primal = self._first.primal

    def mv(self, v: Any) -> Any:
        params, v = jax.lax.optimization_barrier((self._res.params, v))
        return self._build(self._res.fresh(params)).mv(v)

    def diag(self) -> Any:
        return self._first.diag()

    def row_factors(self) -> Any:
        first = self._first.row_factors()
        if first is None:
            return None

        def fresh_factors(x: Any) -> Any:
            params, x = jax.lax.optimization_barrier((self._res.params, x))
            return self._build(self._res.fresh(params)).row_factors(), x

        def matvec(v: Any) -> Any:
            factors, v = fresh_factors(v)
            return factors.matvec(v)

        def rmatvec(r: Any) -> Any:
            factors, r = fresh_factors(r)
            return factors.rmatvec(r)

        return RowFactors(matvec, rmatvec, first.num_rows)


def _isolated(res: Resources) -> Resources:
    """A fresh context behind an optimization barrier (unplanned mode)."""
    return res.fresh(jax.lax.optimization_barrier(res.params))


def _default_key(count: jax.Array) -> jax.Array:
    """The key a step uses when none is given: ``fold_in(key(0), count)``."""
    return jax.random.fold_in(jax.random.key(0), count)


def _tick(count: jax.Array, every_k: int) -> jax.Array:
    return (count % every_k) == 0


def _cadenced(every_k: int, count: jax.Array, run: Any, skip: Any, operand: Any) -> Any:
    """``run(operand)`` every ``every_k`` steps, else ``skip(operand)`` (via ``lax.cond``)."""
    if every_k == 1:
        return run(operand)
    return jax.lax.cond(_tick(count, every_k), run, skip, operand)


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
            from somax_plug.sharding import DataParallel

            self.data_parallel = DataParallel(mesh, param_sharding=param_sharding)
        elif param_sharding is not None:
            from somax_plug.errors import InputError

            raise InputError("param_sharding needs a mesh: pass mesh= as well")
        self.trace_counts: dict[str, int] = {}
        self._providers = {r.name: r.provider for r in plan.resources if r.producer != "step"}
        if plan.unplanned and "operator" in self._providers:
            build = self._providers["operator"].compute
            self._providers["operator"] = attrs.evolve(
                self._providers["operator"], compute=lambda res: _Unshared(res, build)
            )
        self._operator_readers = {
            c for r in plan.resources if r.name == "operator" for c in r.consumers
        }
        self._validator = InputValidator(model, self.data_parallel)
        self._step_jit = jax.jit(self._step)
        self._step_default_key = jax.jit(
            lambda params, state, batch: self._step(
                params, state, batch, _default_key(state.count)
            )
        )
        self._example_key: Any = None

    # ------------------------------------------------------------------ state
    def init(self, params: Any) -> MethodState:
        """Initial state for ``params`` (shapes never change afterwards).

        Records the parameters' and the state's shapes and dtypes, which
        :meth:`step` checks its arguments against; with a mesh, the state comes
        back laid out over it.
        """
        state = self._init_state(params)
        self._bind(params, state)
        if self.data_parallel is not None:
            state = jax.device_put(state, self.data_parallel.state_shardings)
        return state

    def _init_state(self, params: Any) -> MethodState:
        plan = self.plan
        pc = plan.component("preconditioner")
        return MethodState(
            count=jnp.zeros((), jnp.int32),
            estimators=tuple(e.instance.init(params) for e in plan.estimators),
            preconditioner=pc.instance.init(params) if pc is not None else (),
            solver=plan.component("solver").instance.init(params),
            damping=plan.component("damping").instance.init(),
            tx=self.tx.init(params),
        )

    def state_spec(self, params: Any) -> Any:
        """The ``jax.ShapeDtypeStruct`` tree of ``init(params)`` (no FLOPs, no side effect)."""
        return jax.eval_shape(self._init_state, params)

    def resume(self, params: Any, state: Any) -> tuple[Any, Any]:
        """Adopt ``params`` and a ``state`` made elsewhere (e.g. restored from a checkpoint).

        Records their shapes and dtypes as :meth:`init` does (so :meth:`step` checks
        against them) and, with a mesh, lays them out over it. Returns them.
        """
        self._bind(params, state)
        if self.data_parallel is not None:
            params = jax.device_put(params, self.data_parallel.params_shardings)
            state = jax.device_put(state, self.data_parallel.state_shardings)
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

    # ------------------------------------------------------------- direction
    def _context(self, params: Any, batch: Any, key: Any) -> Resources:
        return Resources(
            self.model,
            params,
            batch,
            key,
            self._providers,
            planned=self.plan.resource_names,
            counts=self.trace_counts,
        )

    def direction(
        self, params: Any, state: MethodState, batch: Any, key: Any, rhs: Any = None
    ) -> Direction:
        """Compute ``s ~ (C + lam I)^-1 g`` (``g`` = the gradient, or ``rhs``).

        Pure and traceable; runs the estimators and the preconditioner update at
        their cadences. ``state.count`` is not advanced here.
        """
        plan = self.plan
        unplanned = plan.unplanned
        res = self._context(params, batch, key)
        if not unplanned:
            for node in plan.resources:
                if node.every_k == 1 and node.producer != "step":
                    res[node.name]
        own = (lambda: _isolated(res)) if unplanned else (lambda: res)
        branch = (lambda: _isolated(res)) if unplanned else (lambda: res.child())

        step_ctx = own()
        loss = step_ctx["loss"]
        grad = step_ctx["grad"]
        g = grad if rhs is None else rhs
        count = state.count

        stats: dict[str, Any] = {}
        est_states = []
        for comp, est_state in zip(plan.estimators, state.estimators, strict=True):
            ekey = res.key_for(comp.role)

            def run(es: Any, comp: Any = comp, ekey: Any = ekey) -> Any:
                return comp.instance.estimate(branch(), ekey, es)

            out, new_es = _cadenced(
                comp.every_k, count, run, lambda es: (es["stats"], es), est_state
            )
            stats.update(out)
            est_states.append(new_es)

        damping = plan.component("damping").instance
        lam = jnp.asarray(damping.value(state.damping))

        pc = plan.component("preconditioner")
        pc_state = state.preconditioner
        precond = None
        if pc is not None:
            pkey = res.key_for("preconditioner")

            def update(p: Any) -> Any:
                return pc.instance.update(branch(), stats, lam, pkey, p)

            pc_state = _cadenced(pc.every_k, count, update, lambda p: p, pc_state)
            precond = lambda v, _s=pc_state: pc.instance.apply(_s, v, lam)

        solver_c = plan.component("solver")
        op = None
        if f"solver:{solver_c.name.rpartition(':')[2]}" in self._operator_readers:
            op = own()["operator"]
        s, solver_info, solver_state = solver_c.instance.solve(
            op, g, lam, precond, stats, state.solver
        )
        new_state = state._replace(
            estimators=tuple(est_states), preconditioner=pc_state, solver=solver_state
        )
        return Direction(s, loss, grad, op, stats, lam, solver_info, new_state, res)

    # ------------------------------------------------------------------- step
    def _step(self, params: Any, state: MethodState, batch: Any, key: Any) -> Any:
        plan = self.plan
        d = self.direction(params, state, batch, key)
        finite = jnp.isfinite(d.loss) & tree.all_finite(d.grad) & tree.all_finite(d.s)
        s_safe = tree.where(finite, d.s, tree.zeros_like(d.s))
        updates, tx_state = self.tx.update(s_safe, state.tx, params)
        finite = finite & tree.all_finite(updates)  # a tx (schedule, chain) may overflow
        candidate = optax.apply_updates(params, updates)
        nan = jnp.full((), jnp.nan, jnp.result_type(d.loss))

        def loss_after(_: Any) -> Any:
            return jnp.asarray(self.model.loss_value(candidate, batch), nan.dtype)

        def predicted(_: Any) -> Any:
            if d.op is not None:  # the solver's operator (rebuilt per product if unplanned)
                op = d.op
            else:
                op = (_isolated(d.res) if plan.unplanned else d.res.child())["operator"]
            cu = op.mv(updates)
            return -(tree.vdot(d.grad, updates) + 0.5 * tree.vdot(updates, cu)).astype(nan.dtype)

        skip = lambda _: nan
        after_node = plan.resource("loss_after")
        pred_node = plan.resource("predicted_decrease")
        la = _cadenced(after_node.every_k, state.count, loss_after, skip, 0) if after_node else nan
        pd = _cadenced(pred_node.every_k, state.count, predicted, skip, 0) if pred_node else nan
        rho = (d.loss - la) / pd

        damping_c = plan.component("damping")
        step_stats = StepStats(d.loss, la, pd, d.solver_info, finite)

        def damp(ds: Any) -> Any:
            new_ds, ok = damping_c.instance.update(ds, step_stats)
            return new_ds, jnp.asarray(ok, bool)

        damping_state, accept = _cadenced(
            damping_c.every_k, state.count, damp, lambda ds: (ds, jnp.asarray(True)), state.damping
        )
        accept = accept & finite
        new_params = tree.where(accept, candidate, params)
        kept = d.state._replace(tx=tx_state)
        new_state = jax.tree_util.tree_map(
            lambda new, old: jnp.where(accept, new, old), kept, state
        )._replace(count=state.count + 1, damping=damping_state)
        info = {
            "loss": d.loss.astype(nan.dtype),
            "loss_after": la,
            "grad_norm": tree.norm(d.grad).astype(nan.dtype),
            "direction_norm": tree.norm(d.s).astype(nan.dtype),
            "lam": jnp.asarray(d.lam, nan.dtype),
            "solver_iterations": jnp.asarray(d.solver_info.iterations, jnp.int32),
            "solver_residual": jnp.asarray(d.solver_info.residual, nan.dtype),
            "solver_converged": jnp.asarray(d.solver_info.converged, bool),
            "predicted_decrease": pd,
            "rho": rho.astype(nan.dtype),
            "accepted": accept,
            "finite": finite,
        }
        return new_params, new_state, info

    def step(self, params: Any, state: MethodState, batch: Any, key: Any = None) -> Any:
        """One jitted step: ``(params, state, info)``. ``key`` defaults to one per count.

        Before tracing, the arguments are checked against what :meth:`init` saw
        (:class:`~somax_plug.errors.InputError` on a mismatch; see
        :mod:`somax_plug.validation`), once per input signature. With a mesh, the
        arguments are placed on it (the batch sharded over the data axis).
        """
        if not isinstance(state, MethodState):
            from somax_plug.errors import InputError

            raise InputError(
                f"state must be the MethodState from method.init or a previous step, got "
                f"{type(state).__name__}; the arguments are step(params, state, batch, key)"
            )
        if not self._validator.bound:  # a state restored or built elsewhere
            self._bind(params, self._checked_state_spec(params))
        if key is None and self.data_parallel is None:
            # the default key is derived inside the jitted step: no eager dispatches
            if self._example_key is None:
                self._example_key = jax.random.key(0)
            self._validator.check(params, state, batch, self._example_key)
            return self._step_default_key(params, state, batch)
        if key is None:
            key = _default_key(state.count)
        self._validator.check(params, state, batch, key)
        if self.data_parallel is not None:
            params, state, batch, key = self.data_parallel.place(params, state, batch, key)
        return self._step_jit(params, state, batch, key)

    def _checked_state_spec(self, params: Any) -> Any:
        from somax_plug.errors import InputError

        try:
            return self.state_spec(params)
        except Exception as exc:
            raise InputError(
                f"cannot build this method's state for the given parameters: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def explain(self) -> str:
        """The plan's explanation."""
        return self.plan.explain()

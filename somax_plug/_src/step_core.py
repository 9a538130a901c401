"""The step core: the pure functions one step is made of.

:class:`~somax_plug.Method` (``method.step``) and the Optax bridge
(:func:`~somax_plug.as_optax`) are two thin wrappers around the same
:class:`StepCore`:

1. :meth:`StepCore.direction`: the plan's every-step resources (each traced once,
   shared, in planned mode), the estimators and the preconditioner update at their
   cadences (``lax.cond``), and the solve of ``(C + lam I) s = rhs`` with ``lam``
   from the damping state;
2. :func:`finite`: whether the loss, the right-hand side and the direction are
   finite;
3. :meth:`StepCore.after_update`: the resources of phase ``after_update``
   (``loss_after``, ``predicted_decrease``) at their cadences, once the update is
   known (only ``method.step`` knows it: the bridge's final update is made by the
   transformations after it, so there they are NaN);
4. :meth:`StepCore.update_damping`: the damping policy's update at its cadence,
   which may reject the step;
5. :func:`commit`: the new state where the step is accepted, the old one (except
   the count and the damping state) where it is not: rollback;
6. :func:`info`: the fixed :data:`INFO_KEYS` schema, identical for both wrappers.

Everything here is traceable and shape-stable (the step runs inside ``lax.scan``).
"""

from __future__ import annotations

import zlib
from typing import Any, NamedTuple

import attrs
import jax
import jax.numpy as jnp

from somax_plug._src import tree
from somax_plug._src.contracts import checking
from somax_plug._src.kinds import LinearOperator, RowFactors, SolverInfo, StepStats
from somax_plug._src.plan import Plan
from somax_plug._src.resources import STATISTICS, SUB, Resources

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
    """State of a composed method (a pytree with fixed shapes).

    ``model_state`` is the model's own state (BatchNorm statistics, for a model that
    declares ``has_state``; ``()`` otherwise): the step reads it as a constant of the
    linearization and carries the model's new state forward when the step is
    accepted (see :mod:`somax_plug._src.model`).
    """

    count: jax.Array
    estimators: tuple
    preconditioner: Any
    solver: Any
    damping: Any
    tx: Any
    model_state: Any = ()


class Direction(NamedTuple):
    """What one direction computation produced.

    ``rhs`` is what was solved for (the gradient, or the bridge's incoming updates);
    ``state`` has the new estimator, preconditioner and solver states (count,
    damping and tx unchanged); ``res`` is the step's resource context.
    """

    s: Any
    loss: jax.Array
    rhs: Any
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


def default_key(count: jax.Array) -> jax.Array:
    """The key a step uses when none is given: ``fold_in(key(0), count)``."""
    return jax.random.fold_in(jax.random.key(0), count)


MODEL_KEY_SALT = zlib.crc32(b"model") & 0x7FFFFFFF


def model_key(key: Any, count: jax.Array) -> jax.Array:
    """The one key a step gives the model (its dropout mask), from the step's key.

    ``fold_in(fold_in(key, crc32("model")), count)``: independent of the estimators'
    keys (:meth:`~somax_plug.Resources.key_for`), shared by every consumer within the
    step (the loss, the gradient, each curvature product, the estimators, the loss
    after the step), and advancing with the step count even when the caller passes
    the same ``key`` to every step.

    Example:
        >>> import jax
        >>> k0 = model_key(jax.random.key(0), 0)
        >>> k1 = model_key(jax.random.key(0), 1)
        >>> bool((jax.random.key_data(k0) != jax.random.key_data(k1)).any())
        True
    """
    return jax.random.fold_in(jax.random.fold_in(key, MODEL_KEY_SALT), count)


def cadenced(every_k: int, count: jax.Array, run: Any, skip: Any, operand: Any) -> Any:
    """``run(operand)`` every ``every_k`` steps, else ``skip(operand)`` (via ``lax.cond``)."""
    if every_k == 1:
        return run(operand)
    return jax.lax.cond((count % every_k) == 0, run, skip, operand)


PHASE_MODES = ("auto", "switch", "select")


def _contains(jaxpr: Any, primitive: str) -> bool:
    """Whether ``jaxpr`` (or one of its sub-jaxprs) holds an equation of ``primitive``."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == primitive:
            return True
        for v in eqn.params.values():
            for sub in v if isinstance(v, tuple | list) else (v,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns") and _contains(inner, primitive):
                    return True
    return False


def phase_mode_for(mode: str, model: Any, params: Any, inputs: Any) -> tuple[str, str]:
    """``(mode, reason)``: how the cadence phases of a step run (decided when traced).

    ``"switch"`` runs one ``lax.switch`` branch, so a step pays only for what is due.
    ``"select"`` computes every phase and selects the due one: on XLA's CPU backend a
    convolution inside a conditional (or loop) body runs far slower than at the top
    level (jax-ml/jax#12868; measured here: a conv net's gradient 29.7 ms at the top
    level, 1380 ms inside ``lax.switch``), so computing both phases there is cheaper.
    ``"auto"`` picks ``"select"`` on the CPU backend for a model with a
    ``conv_general_dilated``, ``"switch"`` otherwise.
    """
    if mode != "auto":
        return mode, "as set"
    if jax.default_backend() != "cpu":
        return "switch", f"backend {jax.default_backend()}"
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), (params, inputs)
    )
    try:
        closed = jax.make_jaxpr(model.outputs)(*abstract)
    except Exception:  # noqa: BLE001 - the step itself reports a model that fails
        return "switch", "the model could not be inspected"
    if _contains(closed.jaxpr, "conv_general_dilated"):
        return "select", "CPU backend and a convolution in the model: XLA CPU runs convs " \
            "inside a conditional slowly, so every phase is computed and the due one selected"
    return "switch", "no convolution in the model"


def _select(index: jax.Array, cases: tuple) -> jax.Array:
    """``cases[index]`` elementwise (any dtype, PRNG keys included)."""
    first = cases[0]
    if jnp.issubdtype(jnp.result_type(first), jax.dtypes.prng_key):
        data = [jax.random.key_data(c) for c in cases]
        return jax.random.wrap_key_data(
            jax.lax.select_n(index, *data), impl=jax.random.key_impl(first)
        )
    return jax.lax.select_n(index, *cases)


class StepCore:
    """A plan bound to a model: the pure pieces of a step (see the module docstring).

    ``trace_counts`` counts, per resource, how many times a provider was traced
    (one per step per resource in planned mode); the tests and benchmarks read it.
    """

    def __init__(self, plan: Plan, model: Any) -> None:
        self.plan = plan
        self.model = model
        self.trace_counts: dict[str, int] = {}
        self.providers = {r.name: r.provider for r in plan.resources}
        if plan.unplanned and "operator" in self.providers:
            build = self.providers["operator"].compute
            self.providers["operator"] = attrs.evolve(
                self.providers["operator"], compute=lambda res: _Unshared(res, build)
            )
        self._after = tuple(r for r in plan.resources if r.phase == "after_update")
        self._after_names = frozenset(r.name for r in self._after)
        self.force_ticks: frozenset[int] | None = None
        """Benchmarks only: run this phase (the cadences that tick) on every step."""
        self.phase_mode: str = "auto"
        """How a step with several cadence phases runs only what is due: ``"switch"``
        (one ``lax.switch`` branch per phase), ``"select"`` (every phase computed,
        the due one selected) or ``"auto"`` (see :func:`phase_mode_for`)."""
        self.recorded: list[str] = []
        """Choices made when the step was traced (``Method.explain`` prints them)."""
        self._subbatch = None
        if plan.curvature_batch:
            subs = {
                r.name.removesuffix(SUB): r.provider
                for r in plan.resources
                if r.name.endswith(SUB)
            }
            self._subbatch = (plan.curvature_batch, subs)
        self._phases()

    # ------------------------------------------------------------------ state
    def init(self, params: Any, tx: Any, model_state: Any = ()) -> MethodState:
        plan = self.plan
        pc = plan.component("preconditioner")
        return MethodState(
            count=jnp.zeros((), jnp.int32),
            estimators=tuple(e.instance.init(params) for e in plan.estimators),
            preconditioner=pc.instance.init(params) if pc is not None else (),
            solver=plan.component("solver").instance.init(params),
            damping=plan.component("damping").instance.init_for(params),
            tx=tx.init(params),
            model_state=model_state,
        )

    def context(self, params: Any, batch: Any, key: Any, model: Any = None) -> Resources:
        """The step's resource context; ``model`` is the step's bound model (default:
        the plain model itself)."""
        return Resources(
            self.model if model is None else model,
            params,
            batch,
            key,
            self.providers,
            planned=self._always,
            counts=self.trace_counts,
            subbatch=self._subbatch,
        )

    def _own(self, res: Resources) -> Resources:
        """What a consumer reads from: the shared context, or its own (unplanned)."""
        return _isolated(res) if self.plan.unplanned else res

    def _branch(self, res: Resources) -> Resources:
        """The context of a branch (values traced inside stay inside)."""
        return _isolated(res) if self.plan.unplanned else res.child()

    # ----------------------------------------------------------------- phases
    def _phases(self) -> None:
        """Split the plan's resources by cadence (see :meth:`direction`)."""
        plan = self.plan
        nodes = [r for r in plan.resources if r.phase == "step"]
        varying: set[str] = set()
        for r in nodes:  # topological order: a node varies if it is cadenced or reuses one
            if r.every_k > 1 or set(r.requires) & varying:
                varying.add(r.name)
        self._always = frozenset(r.name for r in nodes if r.name not in varying)
        self._varying = tuple(r for r in nodes if r.name in varying)
        cadences = {r.every_k for r in nodes if r.every_k > 1}
        # the damping's cadence is the after-update phase's (``cadenced``), not a phase here
        cadences |= {c.every_k for c in plan.components
                     if c.cadence and c.every_k > 1 and c.role != "damping"}
        self.cadences = tuple(sorted(cadences))

    def _due(self, ticks: frozenset[int]) -> frozenset[str]:
        """The resources a phase computes: the every-step ones and those whose cadence ticks."""
        return self._always | {
            r.name for r in self._varying if r.every_k == 1 or r.every_k in ticks
        }

    # -------------------------------------------------------------- direction
    def direction(
        self, params: Any, state: MethodState, batch: Any, key: Any, rhs: Any = None
    ) -> Direction:
        """``s ~ (C + lam I)^-1 rhs``, ``rhs`` the gradient unless given.

        The resources that every phase needs are computed once, outside any branch.
        The rest of the step before the solve (the resources with a cadence, those
        whose provider shares one of them when it is due, such as the loss and the
        gradient read from an HVP linearization, the estimators and the
        preconditioner update) runs in one ``lax.switch`` branch per combination of
        ticking cadences, so each step pays only for what is due: between two
        Hessian estimates of Sophia the gradient is a plain ``value_and_grad``. One
        compilation, fixed shapes. ``state.count`` is not advanced here.
        """
        plan = checking(self.plan)  # component outputs checked at trace time
        mkey = model_key(key, state.count) if self.model.has_rng else None
        res = self.context(params, batch, key, self.model.bind(state.model_state, mkey))
        if not plan.unplanned:
            for name in sorted(self._always):
                if name not in self._after_names:
                    res[name]
        lam = jnp.asarray(plan.component("damping").instance.value(state.damping))
        count = state.count
        pc = plan.component("preconditioner")

        def phase(ticks: frozenset[int]) -> Any:
            def run(carry: Any) -> Any:
                est_states, pc_state = carry
                ctx = res.child(planned=self._due(ticks)) if self._varying else res
                own = self._own(ctx)
                grad = own["grad"]  # before the loss: a value_and_grad gives both
                loss = own["loss"]
                stats: dict[str, Any] = {}
                new_est = []
                for comp, es in zip(plan.estimators, est_states, strict=True):
                    if comp.every_k == 1 or comp.every_k in ticks:
                        out, es = comp.instance.estimate(
                            self._branch(ctx), res.key_for(comp.role), es
                        )
                    else:
                        out = es["stats"]
                    stats.update(out)
                    new_est.append(es)
                if pc is not None and (pc.every_k == 1 or pc.every_k in ticks):
                    pc_state = pc.instance.update(
                        self._branch(ctx), stats, lam, res.key_for("preconditioner"), pc_state
                    )
                return (loss, grad, stats, tuple(new_est), pc_state)

            return run

        carry = (state.estimators, state.preconditioner)
        patterns = [
            frozenset(k for i, k in enumerate(self.cadences) if bits >> i & 1)
            for bits in range(2 ** len(self.cadences))
        ]
        if self.force_ticks is not None:  # benchmarks compile one phase at a time
            out = phase(frozenset(self.force_ticks))(carry)
        elif len(patterns) == 1:
            out = phase(patterns[0])(carry)
        else:
            index = sum(
                ((count % k) == 0).astype(jnp.int32) << i for i, k in enumerate(self.cadences)
            )
            mode, why = phase_mode_for(self.phase_mode, res.model, params, batch[0])
            self.recorded = [f"cadence phases: {mode} ({why})"]
            if mode == "switch":
                out = jax.lax.switch(index, [phase(p) for p in patterns], carry)
            else:
                outs = [phase(p)(carry) for p in patterns]
                out = jax.tree_util.tree_map(lambda *xs: _select(index, xs), *outs)
        loss, grad, stats, est_states, pc_state = out
        res.set("loss", loss)
        res.set("grad", grad)
        res.set(STATISTICS, stats)  # phase "solve": an operator built from the statistics
        if res.subbatch_spec is not None:
            res.subbatch().set(STATISTICS, stats)
        g = grad if rhs is None else rhs
        precond = None
        if pc is not None:
            precond = lambda v, _s=pc_state: pc.instance.apply(_s, v, lam)

        op = self._own(res)["operator"] if plan.reads("solver", "operator") else None
        s, solver_info, solver_state = plan.component("solver").instance.solve(
            op, g, lam, precond, stats, state.solver
        )
        model_state = state.model_state
        if self.model.has_state:  # the same forward pass as the loss's (XLA merges them)
            model_state = self.model.apply(params, batch[0], state.model_state, mkey)[1]
        new_state = state._replace(
            estimators=est_states,
            preconditioner=pc_state,
            solver=solver_state,
            model_state=model_state,
        )
        return Direction(s, loss, g, stats, lam, solver_info, new_state, res)

    # ----------------------------------------------------------- after update
    def after_update(
        self, d: Direction, count: jax.Array, update: Any, params_after: Any
    ) -> dict[str, jax.Array]:
        """The ``after_update`` resources this step (NaN off their cadence)."""
        nan = jnp.full((), jnp.nan, jnp.result_type(d.loss))
        d.res.set("update", update)
        d.res.set("params_after", params_after)
        out = {}
        for node in self._after:

            def compute(_: Any, name: str = node.name) -> Any:
                return jnp.asarray(self._branch(d.res)[name], nan.dtype)

            out[node.name] = cadenced(node.every_k, count, compute, lambda _: nan, 0)
        return out

    # ---------------------------------------------------------------- damping
    def update_damping(
        self, damping_state: Any, stats: StepStats, count: jax.Array
    ) -> tuple[Any, jax.Array]:
        """``(new damping state, accept)`` at the policy's cadence (else kept, accepted)."""
        damping = self.plan.component("damping")

        def damp(ds: Any) -> Any:
            new_ds, ok = damping.instance.update(ds, stats)
            return new_ds, jnp.asarray(ok, bool)

        return cadenced(
            damping.every_k, count, damp, lambda ds: (ds, jnp.asarray(True)), damping_state
        )


def finite(d: Direction) -> jax.Array:
    """Whether the loss, the right-hand side and the direction are all finite.

    Checked on their norms, which ``info`` reports anyway (one reduction each, shared
    by XLA): a norm is finite exactly when every element is, unless the sum of
    squares overflows (elements above about 1e19 in float32), which also counts as
    not finite.
    """
    return jnp.isfinite(d.loss) & jnp.isfinite(tree.norm(d.rhs)) & jnp.isfinite(tree.norm(d.s))


def commit(
    accept: jax.Array, new: MethodState, old: MethodState, damping_state: Any
) -> MethodState:
    """``new`` where accepted, else ``old``; the count advances and lambda moves either way."""
    kept = jax.tree_util.tree_map(lambda a, b: jnp.where(accept, a, b), new, old)
    return kept._replace(count=old.count + 1, damping=damping_state)


def step_stats(d: Direction, after: dict[str, jax.Array], ok: jax.Array) -> StepStats:
    """What the damping policy sees (NaN for what was not computed)."""
    nan = jnp.full((), jnp.nan, jnp.result_type(d.loss))
    return StepStats(
        d.loss,
        after.get("loss_after", nan),
        after.get("predicted_decrease", nan),
        d.solver_info,
        ok,
    )


def info(
    d: Direction, after: dict[str, jax.Array], accept: jax.Array, ok: jax.Array
) -> dict[str, jax.Array]:
    """The :data:`INFO_KEYS` record of one step."""
    dtype = jnp.result_type(d.loss)
    nan = jnp.full((), jnp.nan, dtype)
    la = after.get("loss_after", nan)
    pd = after.get("predicted_decrease", nan)
    return {
        "loss": jnp.asarray(d.loss, dtype),
        "loss_after": la,
        "grad_norm": tree.norm(d.rhs).astype(dtype),
        "direction_norm": tree.norm(d.s).astype(dtype),
        "lam": jnp.asarray(d.lam, dtype),
        "solver_iterations": jnp.asarray(d.solver_info.iterations, jnp.int32),
        "solver_residual": jnp.asarray(d.solver_info.residual, dtype),
        "solver_converged": jnp.asarray(d.solver_info.converged, bool),
        "predicted_decrease": pd,
        "rho": ((d.loss - la) / pd).astype(dtype),
        "accepted": jnp.asarray(accept, bool),
        "finite": jnp.asarray(ok, bool),
    }


def empty_info(dtype: Any) -> dict[str, jax.Array]:
    """An :data:`INFO_KEYS` record before any step (NaN, 0, False)."""
    nan = jnp.full((), jnp.nan, dtype)
    out = {k: nan for k in INFO_KEYS}
    out["solver_iterations"] = jnp.zeros((), jnp.int32)
    for k in ("solver_converged", "accepted", "finite"):
        out[k] = jnp.asarray(False)
    return out

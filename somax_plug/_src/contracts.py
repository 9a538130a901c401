"""Output contracts: what a component returns is checked at trace time.

The step calls four kinds of component code inside the traced step; each call is
checked here, once per trace (no cost per step), and a mismatch raises
:class:`~somax_plug.ComponentError` naming the component, what it returned and
what was expected, instead of an XLA error with no component named (or, for an
integer direction, a silently wrong step):

===============================  ==========================================================
call                             contract
===============================  ==========================================================
``solver.solve(op, g, ...)``     ``(s, info, state)``: ``s`` has the pytree structure,
                                 shapes and dtypes of ``g``; ``info`` is a
                                 :class:`~somax_plug.SolverInfo` of scalars (integer
                                 ``iterations``, real ``residual``, boolean
                                 ``converged``); ``state`` matches the state passed in
``estimator.estimate(...)``      ``(stats, state)``: ``stats`` a mapping with every
                                 statistic the estimator provides; ``state`` matches
``preconditioner.update(...)``   a state matching the one passed in
``preconditioner.apply(s, v)``   a pytree with the structure, shapes and dtypes of ``v``
===============================  ==========================================================

"Matches" means the same pytree structure and, leaf by leaf, the same shape and
dtype: the state is carried through ``lax.cond``/``lax.scan``, which require it.

:func:`checking` wraps a plan's components for one trace of the step (the step
builder calls it at the start of ``direction``); everything else passes through.

Example:
    >>> import jax.numpy as jnp
    >>> check_like("solver 'demo:x'", "its direction", {"w": jnp.ones(2, jnp.int32)},
    ...            "the gradient", {"w": jnp.ones(2)})
    Traceback (most recent call last):
    ...
    somax_plug.ComponentError: solver 'demo:x' returned its direction ...
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from somax_plug._src.errors import ComponentError
from somax_plug._src.kinds import SolverInfo


def _describe(leaf: Any) -> str:
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
        return f"a Python {type(leaf).__name__}"
    return f"{leaf.dtype}{list(leaf.shape)}"


def _mismatch(got: Any, ref: Any) -> str | None:
    """Where ``got`` differs from ``ref`` (structure, shape, dtype), or None."""
    got_leaves, got_tree = jax.tree_util.tree_flatten_with_path(got)
    ref_leaves, ref_tree = jax.tree_util.tree_flatten_with_path(ref)
    if got_tree != ref_tree:
        return f"a pytree of structure {got_tree}, where {ref_tree} was expected"
    for (path, a), (_, b) in zip(got_leaves, ref_leaves, strict=True):
        where = jax.tree_util.keystr(path) or "the value"
        if not hasattr(a, "shape") or not hasattr(a, "dtype"):
            return f"{_describe(a)} at {where}, where an array {_describe(b)} was expected"
        if tuple(np.shape(a)) != tuple(np.shape(b)):
            return f"shape {list(np.shape(a))} at {where}, where {list(np.shape(b))} was expected"
        if np.dtype(a.dtype) != np.dtype(b.dtype):
            return f"dtype {a.dtype} at {where}, where {b.dtype} was expected"
    return None


def check_like(owner: str, what: str, got: Any, ref_name: str, ref: Any) -> None:
    """Raise :class:`~somax_plug.ComponentError` unless ``got`` matches ``ref``."""
    problem = _mismatch(got, ref)
    if problem is not None:
        why = (
            " (a state is carried through lax.cond and lax.scan, which need fixed types)"
            if "state" in what
            else ""
        )
        raise ComponentError(
            f"{owner} returned {what} as {problem}; it must have the pytree structure, "
            f"shapes and dtypes of {ref_name}{why} (cast with .astype(...), or build it "
            "with jax.tree.map over it)"
        )


def _scalar(value: Any, kinds: str) -> bool:
    if isinstance(value, bool | int | float) and not hasattr(value, "dtype"):
        python = {"b": bool, "i": int, "f": float}
        return any(
            isinstance(value, python[k]) and (k == "b" or not isinstance(value, bool))
            for k in kinds
        )
    dtype = getattr(value, "dtype", None)
    return dtype is not None and np.ndim(value) == 0 and np.dtype(dtype).kind in kinds


def check_solver_info(owner: str, info: Any) -> None:
    """``info`` must be a :class:`~somax_plug.SolverInfo` of scalars of the right kinds."""
    fix = (
        "return somax_plug.SolverInfo(iterations=<int32 scalar>, residual=<float scalar>, "
        "converged=<bool scalar>)"
    )
    if not isinstance(info, SolverInfo):
        raise ComponentError(
            f"{owner} returned {type(info).__name__} {info!r:.80} as its solver info; {fix}"
        )
    for field, kinds, words in (
        ("iterations", "iu", "an integer scalar"),
        ("residual", "fiu", "a real scalar"),
        ("converged", "b", "a boolean scalar"),
    ):
        value = getattr(info, field)
        if not _scalar(value, kinds):
            raise ComponentError(
                f"{owner} returned SolverInfo.{field} = {_describe(value)}; it must be "
                f"{words}; {fix}"
            )


def _pair(owner: str, out: Any, n: int, names: str) -> tuple[Any, ...]:
    if not isinstance(out, tuple) or len(out) != n:
        got = (
            f"{type(out).__name__} of length {len(out)}"
            if isinstance(out, tuple)
            else (type(out).__name__)
        )
        raise ComponentError(f"{owner} returned a {got}; it must return a tuple {names}")
    return out


def _owner(component: Any) -> str:
    return f"{component.kind.value} {component.name!r} (role {component.role}, plugin " + (
        f"{component.plugin!r})"
    )


class _CheckedInstance:
    """A component instance whose step-time methods check what they return."""

    def __init__(self, component: Any) -> None:
        self._component = component
        self._instance = component.instance
        self._owner = _owner(component)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._instance, name)

    def solve(self, op: Any, rhs: Any, lam: Any, precond: Any, stats: Any, state: Any) -> Any:
        out = self._instance.solve(op, rhs, lam, precond, stats, state)
        s, info, new_state = _pair(self._owner, out, 3, "(direction, SolverInfo, state)")
        check_like(self._owner, "its direction", s, "the right-hand side (the gradient)", rhs)
        check_solver_info(self._owner, info)
        check_like(self._owner, "its new state", new_state, "the state it was given", state)
        return s, info, new_state

    def estimate(self, res: Any, key: Any, state: Any) -> Any:
        out = self._instance.estimate(res, key, state)
        stats, new_state = _pair(self._owner, out, 2, "(stats, state)")
        if not isinstance(stats, Mapping):
            raise ComponentError(
                f"{self._owner} returned {type(stats).__name__} as its statistics; it must "
                "return a dict {statistic name: value}"
            )
        missing = sorted(set(self._component.provides) - set(stats))
        if missing:
            raise ComponentError(
                f"{self._owner} declares that it provides {missing} but its statistics have "
                f"only {sorted(stats)}; return every statistic it declares"
            )
        check_like(self._owner, "its new state", new_state, "the state it was given", state)
        return stats, new_state

    def update(self, res: Any, stats: Any, lam: Any, key: Any, state: Any) -> Any:
        new_state = self._instance.update(res, stats, lam, key, state)
        check_like(self._owner, "its new state", new_state, "the state it was given", state)
        return new_state

    def apply(self, state: Any, v: Any, lam: Any) -> Any:
        out = self._instance.apply(state, v, lam)
        check_like(self._owner, "M^-1 v", out, "the vector v it was given", v)
        return out


class _CheckedComponent:
    """A planned component whose ``instance`` checks its outputs."""

    def __init__(self, component: Any) -> None:
        self._component = component
        self.instance = _CheckedInstance(component)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._component, name)


CHECKED_KINDS = ("estimator", "solver", "preconditioner")


class _CheckedPlan:
    """A view of a plan whose estimators, solver and preconditioner check their outputs."""

    def __init__(self, plan: Any) -> None:
        self._plan = plan
        self.estimators = tuple(_CheckedComponent(e) for e in plan.estimators)

    def component(self, role: str) -> Any:
        component = self._plan.component(role)
        if component is None or component.kind.value not in CHECKED_KINDS:
            return component
        return _CheckedComponent(component)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._plan, name)


def checking(plan: Any) -> Any:
    """``plan`` as seen by one trace of the step: component outputs checked (see above)."""
    return _CheckedPlan(plan)

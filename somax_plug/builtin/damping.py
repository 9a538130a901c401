"""Built-in damping policies: the state of lambda, its update, and step rejection.

A policy's state is a :class:`DampingState` of fixed-shape scalars (so it runs inside
``lax.scan``); ``value(state)`` is the lambda of the coming step and
``update(state, stats) -> (state, accept)`` reads the :class:`~somax_plug.kinds.StepStats`
of the step just taken. A rejected step is undone by the step builder.

=======================  ================================================  =================
policy                   lambda                                            rejects
=======================  ================================================  =================
``constant``             fixed                                             non-finite steps
``levenberg_marquardt``  ratio test, ``rho = actual / predicted decrease``  ``rho < eta`` or
                                                                           non-finite steps
``schedule``             an Optax schedule of the step count               non-finite steps
=======================  ================================================  =================

Example:
    >>> from somax_plug.builtin.damping import Schedule
    >>> d = Schedule(schedule={"name": "exponential_decay", "init_value": 1.0,
    ...                        "transition_steps": 1, "decay_rate": 0.5})
    >>> float(d.value(d.init()))
    1.0

References: Levenberg (1944), Marquardt (1963); the ratio test and the factors
3/2 and 2/3 follow Martens (2010), "Deep learning via Hessian-free optimization";
Nocedal & Wright (2006), Algorithm 4.1.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import attrs
import jax.numpy as jnp

from somax_plug.kinds import Damping, StepStats
from somax_plug.spec import Requires

Array = Any

__all__ = ["Constant", "DampingState", "LevenbergMarquardt", "Schedule"]


class DampingState(NamedTuple):
    """State shared by the built-in policies.

    Attributes:
        lam: the lambda of the coming step (scalar, ``dtype`` option).
        count: number of updates seen (int32).
        rho: the last reduction ratio (NaN when the policy does not compute it).
    """

    lam: Array
    count: Array
    rho: Array


def _state(lam: Any, dtype: str, count: Any = 0, rho: Any = jnp.nan) -> DampingState:
    return DampingState(
        lam=jnp.asarray(lam, dtype),
        count=jnp.asarray(count, jnp.int32),
        rho=jnp.asarray(rho, dtype),
    )


def _check(name: str, cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(f"damping {name!r}: {message}")


def _check_dtype(name: str, dtype: str) -> None:
    _check(
        name,
        dtype in ("float32", "float64", "bfloat16", "float16"),
        f"dtype must be a floating dtype name such as 'float32', got {dtype!r}",
    )


@attrs.frozen
class Constant(Damping):
    """A fixed lambda; a step is rejected only when it is not finite (``stats.finite``).

    Options: ``lam`` (default 1e-3), ``dtype`` (of the state, default ``"float32"``).
    """

    lam: float = 1e-3
    dtype: str = "float32"

    def __attrs_post_init__(self) -> None:
        _check("constant", self.lam >= 0, f"lam must be >= 0, got {self.lam!r}")
        _check_dtype("constant", self.dtype)

    @property
    def requires(self) -> Requires:
        return Requires()

    def init(self) -> DampingState:
        return _state(self.lam, self.dtype)

    def value(self, state: DampingState) -> Array:
        return state.lam

    def update(self, state: DampingState, stats: StepStats) -> tuple[DampingState, Array]:
        accept = jnp.asarray(stats.finite, jnp.bool_)
        return state._replace(count=state.count + 1), accept


@attrs.frozen
class LevenbergMarquardt(Damping):
    """Levenberg-Marquardt lambda from the reduction ratio, with step rejection.

    ::

        rho = (loss - loss_after) / predicted_decrease      (-inf if predicted <= 0)
        accept = finite and rho >= eta
        lam <- lam * increase   if not finite or rho < rho_low
        lam <- lam * decrease   if rho > rho_high
        lam <- clip(lam, min_lambda, max_lambda)

    ``predicted_decrease`` is the decrease the quadratic model predicts (positive for
    a descent step); a step the model does not predict to decrease the loss is
    rejected. Lambda always stays in ``[min_lambda, max_lambda]`` (the initial value
    is clipped too). Requires the resources ``loss_after`` and ``predicted_decrease``.

    Options: ``init`` (1.0), ``increase`` (> 1, default 1.5), ``decrease`` (in (0, 1),
    default 2/3), ``rho_low`` (0.25), ``rho_high`` (0.75), ``eta`` (1e-4),
    ``min_lambda`` (1e-8), ``max_lambda`` (1e8), ``dtype`` (``"float32"``).
    """

    init_value: float = attrs.field(default=1.0, alias="init")
    increase: float = 1.5
    decrease: float = 2.0 / 3.0
    rho_low: float = 0.25
    rho_high: float = 0.75
    eta: float = 1e-4
    min_lambda: float = 1e-8
    max_lambda: float = 1e8
    dtype: str = "float32"

    def __attrs_post_init__(self) -> None:
        name = "levenberg_marquardt"
        _check(name, self.increase > 1, f"increase must be > 1, got {self.increase!r}")
        _check(name, 0 < self.decrease < 1, f"decrease must be in (0, 1), got {self.decrease!r}")
        _check(
            name,
            0 <= self.min_lambda <= self.max_lambda,
            f"need 0 <= min_lambda <= max_lambda, got {self.min_lambda!r}, {self.max_lambda!r}",
        )
        _check(
            name,
            self.rho_low <= self.rho_high,
            f"need rho_low <= rho_high, got {self.rho_low!r}, {self.rho_high!r}",
        )
        _check(name, self.init_value >= 0, f"init must be >= 0, got {self.init_value!r}")
        _check_dtype(name, self.dtype)

    @property
    def requires(self) -> Requires:
        return Requires(resources={"loss_after", "predicted_decrease"})

    def init(self) -> DampingState:
        lam = min(max(self.init_value, self.min_lambda), self.max_lambda)
        return _state(lam, self.dtype)

    def value(self, state: DampingState) -> Array:
        return state.lam

    def update(self, state: DampingState, stats: StepStats) -> tuple[DampingState, Array]:
        dt = state.lam.dtype
        loss, loss_after, pred = (
            jnp.asarray(x) for x in (stats.loss, stats.loss_after, stats.predicted_decrease)
        )
        wide = jnp.result_type(loss.dtype, loss_after.dtype, pred.dtype, dt, jnp.float32)
        loss, loss_after, pred = (x.astype(wide) for x in (loss, loss_after, pred))
        actual = loss - loss_after
        rho = jnp.where(pred > 0, actual / jnp.where(pred > 0, pred, 1), -jnp.inf)
        finite = (
            jnp.asarray(stats.finite, jnp.bool_)
            & jnp.isfinite(loss)
            & jnp.isfinite(loss_after)
            & jnp.isfinite(pred)
        )
        accept = finite & (rho >= self.eta)
        lam = state.lam
        lam = jnp.where(~finite | (rho < self.rho_low), lam * self.increase, lam)
        lam = jnp.where(finite & (rho > self.rho_high), lam * self.decrease, lam)
        lam = jnp.clip(lam, self.min_lambda, self.max_lambda).astype(dt)
        rho = jnp.where(finite, rho, jnp.nan).astype(dt)
        return DampingState(lam=lam, count=state.count + 1, rho=rho), accept


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        items = sorted(((k, _freeze(v)) for k, v in value.items()), key=lambda kv: str(kv[0]))
        return _FrozenMapping(tuple(items))
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, _FrozenMapping):
        return {k: _thaw(v) for k, v in value.items}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


@attrs.frozen
class _FrozenMapping:
    """A hashable stand-in for a (nested) dict of schedule options."""

    items: tuple[tuple[Any, Any], ...]


def _schedule_converter(value: Any) -> Any:
    if isinstance(value, Mapping):
        return _freeze(value)
    return value


@attrs.frozen
class Schedule(Damping):
    """Lambda from an Optax schedule of the step count; rejects non-finite steps only.

    ``schedule`` is a callable ``count -> value`` or a dict naming a function of
    ``optax.schedules`` and its arguments, for example
    ``{"name": "exponential_decay", "init_value": 1.0, "transition_steps": 100,
    "decay_rate": 0.5}``. The dict is stored frozen (hashable) and the schedule is
    built when traced. State: the count of updates and ``lam = schedule(count)``.

    Options: ``schedule`` (required), ``dtype`` (``"float32"``).
    """

    schedule: Any = attrs.field(converter=_schedule_converter)
    dtype: str = "float32"

    def __attrs_post_init__(self) -> None:
        _check_dtype("schedule", self.dtype)
        if isinstance(self.schedule, _FrozenMapping):
            options = _thaw(self.schedule)
            name = options.get("name")
            import optax

            _check(
                "schedule",
                isinstance(name, str)
                and not name.startswith("_")
                and callable(getattr(optax.schedules, name, None)),
                f"schedule name {name!r} is not a function of optax.schedules "
                "(e.g. 'constant_schedule', 'exponential_decay', 'cosine_decay_schedule')",
            )
        else:
            _check(
                "schedule",
                callable(self.schedule),
                "schedule must be a callable count -> value or a dict with a 'name' of "
                f"an optax.schedules function, got {self.schedule!r}",
            )

    @property
    def requires(self) -> Requires:
        return Requires()

    def resolve(self) -> Callable[[Array], Array]:
        """The schedule as a callable ``count -> value``."""
        if isinstance(self.schedule, _FrozenMapping):
            import optax

            options = _thaw(self.schedule)
            name = options.pop("name")
            return getattr(optax.schedules, name)(**options)
        return self.schedule

    def _lam(self, count: Array) -> Array:
        return jnp.asarray(self.resolve()(count), self.dtype)

    def init(self) -> DampingState:
        return _state(self._lam(jnp.asarray(0, jnp.int32)), self.dtype)

    def value(self, state: DampingState) -> Array:
        return state.lam

    def update(self, state: DampingState, stats: StepStats) -> tuple[DampingState, Array]:
        count = state.count + 1
        new = state._replace(count=count, lam=self._lam(count))
        return new, jnp.asarray(stats.finite, jnp.bool_)

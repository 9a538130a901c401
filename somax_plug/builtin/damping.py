"""Built-in damping policies: the state of lambda, its update, and step rejection.

A policy's state is a :class:`DampingState` of fixed-shape scalars (so it runs inside
``lax.scan``); ``value(state)`` is the lambda of the coming step and
``update(state, stats) -> (state, accept)`` reads the :class:`~somax_plug.StepStats`
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

from somax_plug import Damping, OptionError, StepStats, declare, lazy_import, option, tree

jnp = lazy_import("jax.numpy")

Array = Any

__all__ = ["Constant", "DampingState", "LevenbergMarquardt", "Schedule"]


class DampingState(NamedTuple):
    """State shared by the built-in policies.

    Attributes:
        lam: the lambda of the coming step (scalar, in the state dtype: the ``dtype``
            option, else the parameters' accumulation dtype, see :func:`state_dtype`).
        count: number of updates seen (int32).
        rho: the last reduction ratio (NaN when the policy does not compute it).
    """

    lam: Array
    count: Array
    rho: Array


def state_dtype(dtype: str | None, params: Any = None) -> Any:
    """The dtype of a damping state: ``dtype`` if given, else the parameters' accumulation dtype.

    The accumulation dtype is float64 when any parameter leaf is float64 (with
    ``jax_enable_x64``), else float32, so in float64 mode ``lam = 0.01`` is stored as
    the float64 0.01 rather than the float32 0.009999999776. Without parameters
    (``policy.init()`` on its own) it is float32.

    Example:
        >>> state_dtype("bfloat16"), state_dtype(None)
        ('bfloat16', dtype('float32'))
    """
    if dtype is not None:
        return dtype
    if params is None:
        return jnp.dtype(jnp.float32)
    return jnp.dtype(tree.accum_dtype(params))


def _state(lam: Any, dtype: Any, count: Any = 0, rho: Any = float("nan")) -> DampingState:
    return DampingState(
        lam=jnp.asarray(lam, dtype),
        count=jnp.asarray(count, jnp.int32),
        rho=jnp.asarray(rho, dtype),
    )


DTYPES = ("float32", "float64", "bfloat16", "float16")
"""Dtype names a damping state may use."""
DTYPE_DOC = "dtype of the state (None: the parameters' accumulation dtype)"


@declare("constant", summary="fixed lambda; rejects only non-finite steps")
@attrs.frozen
class Constant(Damping):
    """A fixed lambda; a step is rejected only when it is not finite (``stats.finite``).

    Options: ``lam`` (default 1e-3, finite), ``dtype`` (of the state; default None: the
    parameters' accumulation dtype, see :func:`state_dtype`).
    """

    lam: float = option(1e-3, ge=0, doc="the damping lambda")
    dtype: str | None = option(None, choices=DTYPES, doc=DTYPE_DOC)

    def init(self, params: Any = None) -> DampingState:
        return _state(self.lam, state_dtype(self.dtype, params))

    def init_for(self, params: Any) -> DampingState:
        return self.init(params)

    def lam_floor(self) -> float | None:
        return float(self.lam)

    def value(self, state: DampingState) -> Array:
        return state.lam

    def update(self, state: DampingState, stats: StepStats) -> tuple[DampingState, Array]:
        accept = jnp.asarray(stats.finite, jnp.bool_)
        return state._replace(count=state.count + 1), accept


@declare(
    "levenberg_marquardt",
    summary="ratio-test lambda (Martens 2010), rejects steps with rho < eta",
    requires={"resources": {"loss_after", "predicted_decrease"}},
)
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
    ``min_lambda`` (1e-8), ``max_lambda`` (1e8), ``dtype`` (None: the parameters'
    accumulation dtype, see :func:`state_dtype`).
    """

    init_value: float = option(1.0, ge=0, alias="init", doc="initial lambda")
    increase: float = option(1.5, gt=1, doc="factor when rho < rho_low")
    decrease: float = option(2.0 / 3.0, gt=0, lt=1, doc="factor when rho > rho_high")
    rho_low: float = option(0.25, doc="below it lambda increases")
    rho_high: float = option(0.75, doc="above it lambda decreases")
    eta: float = option(1e-4, doc="reject steps with rho < eta")
    min_lambda: float = option(1e-8, ge=0, doc="lower bound of lambda")
    max_lambda: float = option(1e8, ge=0, doc="upper bound of lambda")
    dtype: str | None = option(None, choices=DTYPES, doc=DTYPE_DOC)

    def __attrs_post_init__(self) -> None:
        if not self.min_lambda <= self.max_lambda:
            raise OptionError(
                f"damping 'levenberg_marquardt': need min_lambda <= max_lambda, got "
                f"{self.min_lambda!r} > {self.max_lambda!r}"
            )
        if not self.rho_low <= self.rho_high:
            raise OptionError(
                f"damping 'levenberg_marquardt': need rho_low <= rho_high, got "
                f"{self.rho_low!r} > {self.rho_high!r}"
            )

    def init(self, params: Any = None) -> DampingState:
        lam = min(max(self.init_value, self.min_lambda), self.max_lambda)
        return _state(lam, state_dtype(self.dtype, params))

    def init_for(self, params: Any) -> DampingState:
        return self.init(params)

    def lam_floor(self) -> float | None:
        return float(self.min_lambda)  # lam is clipped to [min_lambda, max_lambda]

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


@declare(
    "schedule", summary="lambda from an Optax schedule (callable or {'name': ..., **kwargs})"
)
@attrs.frozen
class Schedule(Damping):
    """Lambda from an Optax schedule of the step count; rejects non-finite steps only.

    ``schedule`` is a callable ``count -> value`` or a dict naming a function of
    ``optax.schedules`` and its arguments, for example
    ``{"name": "exponential_decay", "init_value": 1.0, "transition_steps": 100,
    "decay_rate": 0.5}``. The dict is stored frozen (hashable) and the schedule is
    built when traced. State: the count of updates and ``lam = schedule(count)``.

    Options: ``schedule`` (required), ``dtype`` (None: the parameters' accumulation
    dtype, see :func:`state_dtype`).
    """

    schedule: Any = option(
        required=True,
        converter=_schedule_converter,
        doc="a callable count -> lambda, or {'name': <optax schedule>, **its arguments}",
    )
    dtype: str | None = option(None, choices=DTYPES, doc=DTYPE_DOC)

    def __attrs_post_init__(self) -> None:
        if isinstance(self.schedule, _FrozenMapping):
            name = _thaw(self.schedule).get("name")
            import optax

            ok = (
                isinstance(name, str)
                and not name.startswith("_")
                and callable(getattr(optax.schedules, name, None))
            )
            problem = f"schedule name {name!r} is not a function of optax.schedules"
        else:
            ok = callable(self.schedule)
            problem = f"schedule {self.schedule!r} is neither a callable nor a mapping"
        if not ok:
            raise OptionError(
                f"damping 'schedule': option 'schedule': {problem}; expected a callable "
                "count -> value or a dict with a 'name' of an optax.schedules function "
                "(e.g. 'constant_schedule', 'exponential_decay', 'cosine_decay_schedule')"
            )

    def resolve(self) -> Callable[[Array], Array]:
        """The schedule as a callable ``count -> value``."""
        if isinstance(self.schedule, _FrozenMapping):
            import optax

            options = _thaw(self.schedule)
            name = options.pop("name")
            return getattr(optax.schedules, name)(**options)
        return self.schedule

    def _lam(self, count: Array, dtype: Any) -> Array:
        return jnp.asarray(self.resolve()(count), dtype)

    def init(self, params: Any = None) -> DampingState:
        dtype = state_dtype(self.dtype, params)
        return _state(self._lam(jnp.asarray(0, jnp.int32), dtype), dtype)

    def init_for(self, params: Any) -> DampingState:
        return self.init(params)

    def value(self, state: DampingState) -> Array:
        return state.lam

    def update(self, state: DampingState, stats: StepStats) -> tuple[DampingState, Array]:
        count = state.count + 1
        new = state._replace(count=count, lam=self._lam(count, state.lam.dtype))
        return new, jnp.asarray(stats.finite, jnp.bool_)

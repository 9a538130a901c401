"""Per-step resources: named intermediates computed once and shared.

A *resource* is an intermediate result of one step (the loss, the gradient, the
linearization of the model, an HVP closure, ...). Each is produced by a
:class:`ResourceProvider`, a plain function ``compute(res) -> value`` that may read
other resources through ``res[name]``. Providers come from the
``somax_plug_provide_resource`` hook (the built-ins through the same hook).

:class:`Resources` is the lazy, memoising context that the step builder creates
inside the traced step: the first ``res["grad"]`` runs the provider, the second
returns the same traced value. In *planned* mode every component shares one
context, so each resource is traced once; in *unplanned* mode each component gets
a fresh context, so shared intermediates are recomputed (for ablations).

Built-in resource names and value types (see ``somax_plug.builtin.resources``):

=====================  ====================================================
``outputs``            ``predict_fn(params, inputs)``
``linearization``      :class:`Linearization` (outputs, jvp, vjp)
``loss``               scalar reduced loss
``output_grad``        d loss / d outputs
``grad``               gradient pytree
``output_hessian``     :class:`OutputHessian` of the loss w.r.t. the outputs
``hvp``                :class:`HVP` (gradient and Hessian-vector product)
``per_example_grads``  pytree with a leading batch axis, summing to ``grad``
``operator``           the composition's curvature operator C
=====================  ====================================================

``loss_after`` and ``predicted_decrease`` read the step inputs ``update`` and
``params_after`` (:data:`AFTER_UPDATE_INPUTS`), so the plan computes them after the
solve (phase ``after_update``); the damping policy receives them in
:class:`~somax_plug.StepStats`. ``statistics`` (:data:`STATISTICS`) is the step's
estimator outputs, set after the estimators: a curvature that requires statistics has
its operator built then (phase ``solve``).

Example:
    >>> from somax_plug import ResourceProvider
    >>> p = ResourceProvider("double_loss", lambda res: 2 * res["loss"], requires={"loss"})
    >>> p.requires
    frozenset({'loss'})
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import attrs

from somax_plug._src.errors import CompositionError
from somax_plug._src.spec import _frozenset

PyTree = Any

INPUT_RESOURCES = frozenset({"params", "batch", "key"})
"""Inputs of every step (not computed by a provider)."""
SUB = "@sub"
"""Suffix of the resources computed on the curvature's sub-batch (``curvature_batch``)."""
AFTER_UPDATE_INPUTS = frozenset({"update", "params_after"})
"""Inputs the step sets once the direction is known: the update ``u`` it applies and
the parameters ``params + u``. A resource that reads one is computed after the solve."""
STATISTICS = "statistics"
"""The step input holding this step's estimator statistics (name -> value), set once
the estimators have run. The planner makes a curvature that declares
``Requires(statistics=...)`` read it (phase ``solve``): its operator is built after the
estimators, from their outputs (curvature ``kfac`` with ``factors="kfac_ema"``)."""


class Linearization(NamedTuple):
    """One ``jax.linearize`` of the model at the current parameters.

    ``jvp(v)`` is J v (parameter tangent -> output tangent) and ``vjp(u)`` is
    J^T u (output cotangent -> parameter pytree), both without re-running the
    forward pass.
    """

    outputs: Any
    jvp: Callable[[PyTree], Any]
    vjp: Callable[[Any], PyTree]


class OutputHessian(NamedTuple):
    """Hessian of the (reduced) loss with respect to the model outputs.

    ``mv(u)`` is H_out u for an output-shaped ``u``. ``sqrt`` is a per-example
    factor ``L`` of shape ``[B, K, K]`` (K the flattened output size per example)
    with ``H_out = blockdiag(L_b L_b^T)``, or None when not available.
    ``sqrt_t_mv(u)`` and ``sqrt_mv(r)`` are ``L_b^T u_b`` and ``L_b r_b`` on ``[B, K]``
    arrays without building ``sqrt`` (the loss's closed forms); None: a GGN contracts
    ``sqrt`` itself.
    """

    mv: Callable[[Any], Any]
    sqrt: Any
    sqrt_t_mv: Callable[[Any], Any] | None = None
    sqrt_mv: Callable[[Any], Any] | None = None


class HVP(NamedTuple):
    """``jax.linearize(jax.grad(loss))``: the gradient and v -> H v, forward-over-reverse.

    ``loss`` is the reduced loss at the same point when the provider computed it on
    the way (the built-in one does), else None.
    """

    grad: PyTree
    mv: Callable[[PyTree], PyTree]
    loss: Any = None


@attrs.frozen
class ResourceProvider:
    """How to compute one resource.

    Attributes:
        name: the resource name.
        compute: ``compute(res) -> value``; reads other resources as ``res[name]``.
        requires: the resources ``compute`` reads (the edges of the plan's graph).
        plugin: the plugin that provided it (filled in by the planner).
        summary: one line for ``plan.explain()``.
        reuses: resources ``compute`` reads *only when* ``res.planned(name)`` (it
            shares them instead of recomputing); they add no requirement, but a
            planner may show them as sharing edges in ``explain()``.
    """

    name: str
    compute: Callable[[Resources], Any] = attrs.field(eq=False)
    requires: frozenset[str] = attrs.field(factory=frozenset, converter=_frozenset)
    plugin: str = ""
    summary: str = ""
    reuses: frozenset[str] = attrs.field(factory=frozenset, converter=_frozenset)


class Resources:
    """Lazy, memoised per-step resources (lives only inside one traced step).

    Args:
        model: the :class:`~somax_plug.Model` (predict_fn and loss).
        params: current parameters.
        batch: ``(inputs, targets)``.
        key: this step's PRNG key.
        providers: resource name -> :class:`ResourceProvider`.
        planned: names the plan computes (providers may use it to pick a source;
            ``grad`` comes from the HVP linearization when ``hvp`` is planned).
        parent: a context to read already-computed values from (``lax.cond``
            branches get a child so that values traced inside do not leak out).
        counts: shared dict counting provider calls per name (tests, benchmarks).
    """

    def __init__(
        self,
        model: Any,
        params: PyTree,
        batch: Any,
        key: Any,
        providers: Mapping[str, ResourceProvider],
        planned: frozenset[str] | None = None,
        parent: Resources | None = None,
        counts: dict[str, int] | None = None,
        subbatch: tuple[int, Mapping[str, ResourceProvider]] | None = None,
        count_suffix: str = "",
    ) -> None:
        self.model = model
        self.params = params
        self.batch = batch
        self.key = key
        self.providers = dict(providers)
        self.planned_names = frozenset(providers) if planned is None else frozenset(planned)
        self.parent = parent
        self.counts = {} if counts is None else counts
        self.subbatch_spec = subbatch
        self._count_suffix = count_suffix
        self._cache: dict[str, Any] = {}
        self._sub: Resources | None = None

    @property
    def inputs(self) -> Any:
        return self.batch[0]

    @property
    def targets(self) -> Any:
        return self.batch[1]

    def planned(self, name: str) -> bool:
        """Whether the plan computes ``name`` this step."""
        return name in self.planned_names

    def computed(self, name: str) -> bool:
        """Whether ``name`` has already been computed in this context or its parents."""
        return name in self._cache or (self.parent is not None and self.parent.computed(name))

    def _lookup(self, name: str) -> tuple[bool, Any]:
        if name in self._cache:
            return True, self._cache[name]
        if self.parent is not None:
            return self.parent._lookup(name)
        return False, None

    def __getitem__(self, name: str) -> Any:
        if name == "params":
            return self.params
        if name == "batch":
            return self.batch
        if name == "key":
            return self.key
        if name.endswith(SUB) and self.subbatch_spec is not None:
            return self.subbatch()[name.removesuffix(SUB)]
        found, value = self._lookup(name)
        if not found and name in AFTER_UPDATE_INPUTS:
            raise CompositionError(
                f"resource {name!r} is set by the step after the solve; a provider that "
                "reads it is computed in the 'after_update' phase (declare it in requires)"
            )
        if found:
            return value
        provider = self.providers.get(name)
        if provider is None:
            known = ", ".join(sorted(self.providers)) or "(none)"
            raise CompositionError(
                f"resource {name!r} was read but no provider is planned for it; "
                f"planned resources: {known}. Declare it in the component's "
                "Requires(resources=...) so the planner provides it."
            )
        value = provider.compute(self)
        self._cache[name] = value
        counted = name + self._count_suffix
        self.counts[counted] = self.counts.get(counted, 0) + 1
        return value

    def subbatch(self) -> Resources:
        """The context of the curvature's sub-batch: the first rows of the batch.

        Its resources (the plan's ``name@sub`` nodes) have their own cache; a child
        context's sub-batch context is a child of its parent's, so values traced in
        a branch stay in it.
        """
        if self.subbatch_spec is None:
            raise CompositionError(
                "this step has no curvature sub-batch; set curvature_batch= in the composition"
            )
        if self._sub is None:
            rows, providers = self.subbatch_spec
            planned = frozenset(
                n.removesuffix(SUB) for n in self.planned_names if n.endswith(SUB)
            )
            if self.parent is not None:
                self._sub = self.parent.subbatch().child(planned=planned)
            else:
                import jax

                batch = jax.tree_util.tree_map(lambda x: x[:rows], self.batch)
                self._sub = Resources(
                    self.model,
                    self.params,
                    batch,
                    self.key,
                    providers,
                    planned,
                    counts=self.counts,
                    count_suffix=SUB,
                )
        return self._sub

    def __contains__(self, name: str) -> bool:
        return name in INPUT_RESOURCES or name in self.providers or self.computed(name)

    def set(self, name: str, value: Any) -> None:
        """Store a value computed outside a provider (the step builder's own)."""
        self._cache[name] = value

    def child(self, planned: frozenset[str] | None = None) -> Resources:
        """A context that reads this one's values but keeps new ones to itself.

        ``planned`` replaces the names the plan computes in it (a cadence phase in
        which fewer resources are due).
        """
        return Resources(
            self.model,
            self.params,
            self.batch,
            self.key,
            self.providers,
            self.planned_names if planned is None else planned,
            parent=self,
            counts=self.counts,
            subbatch=self.subbatch_spec,
            count_suffix=self._count_suffix,
        )

    def fresh(self, params: PyTree = None) -> Resources:
        """A context with no cached values (unplanned mode: recompute everything).

        ``params`` replaces the parameters (the same values behind an
        ``optimization_barrier``, in unplanned mode); default: the same. The
        after-update inputs (``update``, ``params_after``), when set, are kept.
        """
        out = Resources(
            self.model,
            self.params if params is None else params,
            self.batch,
            self.key,
            self.providers,
            self.planned_names,
            counts=self.counts,
            subbatch=self.subbatch_spec,
            count_suffix=self._count_suffix,
        )
        for name in AFTER_UPDATE_INPUTS:
            found, value = self._lookup(name)
            if found:
                out.set(name, value)
        return out

    def key_for(self, consumer: str) -> Any:
        """An independent PRNG key for ``consumer`` (stable across runs)."""
        import jax

        return jax.random.fold_in(self.key, zlib.crc32(consumer.encode()) & 0x7FFFFFFF)

"""Compositions: which components, with which options (plain data).

A :class:`Composition` names a curvature, a solver, any estimators, an optional
preconditioner and a damping policy, each as a registry name with options or as
a ready instance. It can come from keyword arguments, a dict, a TOML file or a
preset; :func:`compose` plans it and returns a runnable
:class:`~somax_plug.Method`.

Component arguments accept:

* ``"cg"`` or ``"builtin:cg"``: a registry name;
* ``{"name": "cg", "maxiter": 20, "every_k": 1}``: a name with options (``every_k``
  sets the cadence of estimators, preconditioners and damping);
* ``("cg", {"maxiter": 20})``: the same as a pair;
* an instance of the kind's base class (``somax_plug.Solver`` ...): used as is.

TOML layout (``somax-plug plan FILE.toml``)::

    preset = "sgn"            # optional: start from a preset
    loss = "softmax_cross_entropy"
    learning_rate = 1.0

    [curvature]
    name = "ggn"

    [solver]
    name = "cg"
    maxiter = 20

    [[estimators]]
    name = "hutchinson_diag"
    every_k = 10

    [damping]
    name = "constant"
    lam = 1e-3

Example:
    >>> from somax_plug import Composition
    >>> c = Composition.from_dict({"curvature": "ggn", "solver": {"name": "cg", "maxiter": 5}})
    >>> c.solver.name, dict(c.solver.options)
    ('cg', {'maxiter': 5})
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from somax_plug._src.errors import CompositionError
from somax_plug._src.kinds import KIND_BASES, Kind
from somax_plug._src.options import INT32_MAX
from somax_plug._src.spec import _frozen_items

ROLES: dict[str, Kind] = {
    "curvature": Kind.CURVATURE,
    "solver": Kind.SOLVER,
    "preconditioner": Kind.PRECONDITIONER,
    "damping": Kind.DAMPING,
}
TOP_LEVEL = {
    "preset",
    "loss",
    "reduction",
    "learning_rate",
    "rho_every_k",
    "curvature_batch",
    "estimators",
    *ROLES,
}


@attrs.frozen
class ComponentRef:
    """One component of a composition: a registry name with options, or an instance."""

    kind: Kind
    name: str | None = None
    options: tuple[tuple[str, Any], ...] = attrs.field(default=(), converter=_frozen_items)
    instance: Any = None
    every_k: int | None = None

    @property
    def label(self) -> str:
        return self.name if self.name is not None else type(self.instance).__name__

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.label, **dict(self.options)}
        if self.every_k is not None:
            out["every_k"] = self.every_k
        return out


def as_ref(kind: Kind, value: Any, role: str) -> ComponentRef:
    """Normalise one component argument (see the module docstring)."""
    if isinstance(value, ComponentRef):
        return value
    base = KIND_BASES[kind]
    if isinstance(value, base):
        return ComponentRef(kind, instance=value)
    if isinstance(value, str):
        return ComponentRef(kind, name=value)
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
        value = {"name": value[0], **dict(value[1])}
    if isinstance(value, Mapping):
        options = dict(value)
        name = options.pop("name", None)
        if not isinstance(name, str):
            raise CompositionError(
                f"{role}: a mapping needs a 'name' key naming a registered {kind.value}, "
                f"got {dict(value)!r}"
            )
        every_k = options.pop("every_k", None)
        if every_k is not None and (
            isinstance(every_k, bool) or not isinstance(every_k, int) or every_k < 1
        ):
            raise CompositionError(
                f"{role} {name!r}: every_k must be a positive int, got {every_k!r}"
            )
        return ComponentRef(kind, name=name, options=options, every_k=every_k)
    raise CompositionError(
        f"{role}: expected a registered {kind.value} name, a {{'name': ..., **options}} mapping, "
        f"a (name, options) pair or a {base.__name__} instance; got {type(value).__name__}"
    )


@attrs.frozen
class Composition:
    """The components of a method (no model: plans need none)."""

    curvature: ComponentRef | None
    solver: ComponentRef
    estimators: tuple[ComponentRef, ...] = ()
    preconditioner: ComponentRef | None = None
    damping: ComponentRef | None = None
    loss: str | None = None
    reduction: str | None = None
    learning_rate: Any = 1.0
    preset: str | None = None
    rho_every_k: int = 0
    curvature_batch: int | None = None

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], registry: Any = None) -> Composition:
        """Build from a mapping (a preset's composition, a TOML file, user kwargs)."""
        config = dict(config)
        unknown = set(config) - TOP_LEVEL
        if unknown:
            raise CompositionError(
                f"unknown composition keys {sorted(unknown)}; expected some of {sorted(TOP_LEVEL)}"
            )
        preset = config.pop("preset", None)
        if preset is not None and not isinstance(preset, str):
            raise CompositionError(
                f"preset must be the name of a registered preset (a string such as 'sgn'), "
                f"got {type(preset).__name__} {preset!r}"
            )
        if preset is not None:
            from somax_plug._src.registry import get_registry

            reg = registry or get_registry()
            base = dict(reg.preset(preset).composition)
            base.update({k: v for k, v in config.items() if v is not None})
            config = base
        if config.get("solver") is None:
            raise CompositionError(
                "a composition needs a solver (for a first-order baseline use solver 'identity')"
            )
        refs: dict[str, Any] = {}
        for role, kind in ROLES.items():
            value = config.get(role)
            refs[role] = None if value is None else as_ref(kind, value, role)
        estimators = config.get("estimators") or ()
        if isinstance(estimators, str | Mapping) or not isinstance(estimators, list | tuple):
            estimators = [estimators]
        est_refs = tuple(
            as_ref(Kind.ESTIMATOR, e, f"estimators[{i}]") for i, e in enumerate(estimators)
        )
        loss = loss_name(config.get("loss"))
        return cls(
            curvature=refs["curvature"],
            solver=refs["solver"],
            estimators=est_refs,
            preconditioner=refs["preconditioner"],
            damping=refs["damping"],
            loss=loss,
            reduction=_reduction(config.get("reduction")),
            learning_rate=_learning_rate(_default(config.get("learning_rate"), 1.0)),
            preset=preset,
            rho_every_k=_rho_every_k(config.get("rho_every_k")),
            curvature_batch=_curvature_batch(config.get("curvature_batch")),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for role in ROLES:
            ref = getattr(self, role)
            if ref is not None:
                out[role] = ref.to_dict()
        if self.estimators:
            out["estimators"] = [e.to_dict() for e in self.estimators]
        if self.rho_every_k:
            out["rho_every_k"] = self.rho_every_k
        if self.curvature_batch:
            out["curvature_batch"] = self.curvature_batch
        for key in ("loss", "reduction", "preset"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        lr = self.learning_rate
        out["learning_rate"] = lr if isinstance(lr, int | float) else repr(lr)
        return out


def _default(value: Any, default: Any) -> Any:
    return default if value is None else value


def _reduction(value: Any) -> str | None:
    """``"mean"``, ``"sum"`` or None (the loss's own: ``"mean"`` for a loss by name)."""
    from somax_plug._src.losses import REDUCTIONS

    if value is None or (isinstance(value, str) and value in REDUCTIONS):
        return value
    raise CompositionError(
        f"reduction must be one of {', '.join(map(repr, REDUCTIONS))} (the loss averaged or "
        f"summed over the batch), got {type(value).__name__} {value!r}"
    )


def _learning_rate(value: Any) -> Any:
    """A finite number (not a bool, not a string) or a schedule ``step -> lr``.

    A negative number is allowed (it ascends the loss: tests use it to force a
    rejected step); NaN, infinities, strings (``"0.1"``), bools and arrays are not.
    """
    if callable(value) and not isinstance(value, type):
        return value
    problem = None
    if isinstance(value, bool | str | bytes) or not hasattr(value, "__float__"):
        problem = "not a number"
    elif getattr(value, "shape", ()) != ():
        problem = f"an array of shape {tuple(value.shape)}, not a scalar"
    else:
        if not math.isfinite(float(value)):
            problem = "not finite"
    if problem is None:
        return value
    raise CompositionError(
        f"learning_rate = {value!r} ({type(value).__name__}) is not allowed: {problem}; "
        "expected a finite number such as 0.1, or an Optax schedule (a callable "
        "step -> learning rate)"
    )


def _rho_every_k(value: Any) -> int:
    """0 (never report rho) or a positive int within int32."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= INT32_MAX:
        raise CompositionError(
            f"rho_every_k must be an int >= 0 (report the gain ratio rho every k steps; 0 or "
            f"omitted: never), at most {INT32_MAX}; got {type(value).__name__} {value!r}"
        )
    return value


def _curvature_batch(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CompositionError(
            f"curvature_batch must be a positive int (the number of rows of each step's "
            f"batch the curvature products use), got {value!r}; omit it for the whole batch"
        )
    return value


def loss_name(loss: Any) -> str | None:
    """The name a plan records for a loss: a built-in's name, else ``"custom"``.

    A built-in :class:`~somax_plug.Loss` instance has the same name as the loss given
    by name (so ``get_loss("softmax_cross_entropy")`` meets the same requirements);
    a callable or a user's own ``Loss`` subclass is ``"custom"``.
    """
    if loss is None or isinstance(loss, str):
        return loss
    from somax_plug._src.losses import LOSSES, Loss

    if isinstance(loss, Loss):
        name = type(loss).__dict__.get("name")
        return name if isinstance(name, str) and LOSSES.get(name) is type(loss) else "custom"
    if callable(loss):
        return "custom"
    raise CompositionError(
        f"loss must be a name, a somax_plug.Loss or a callable loss(outputs, targets) -> [B], "
        f"got {type(loss).__name__} {loss!r}; valid names: mse, softmax_cross_entropy, "
        "sigmoid_binary_cross_entropy"
    )


def looks_like_path(source: str | Path) -> bool:
    """Whether a ``somax-plug plan`` argument names a file rather than a preset.

    A :class:`~pathlib.Path`, or a string with a path separator or a suffix
    (``m.toml``, ``./sgn``, ``configs/sgn``) is a path; a bare name (``sgn``,
    ``builtin:sgn``) is a preset name first.

    Example:
        >>> looks_like_path("sgn"), looks_like_path("./sgn"), looks_like_path("m.toml")
        (False, True, True)
    """
    if isinstance(source, Path):
        return True
    seps = {os.sep, "/"} | ({os.altsep} if os.altsep else set())
    return any(sep in source for sep in seps) or Path(source).suffix != ""


def load_composition(source: str | Path | Mapping[str, Any], registry: Any = None) -> Composition:
    """A composition from a TOML path, a preset name, or a mapping.

    Which one a string is (the rule ``somax-plug plan ARG`` follows):

    * it looks like a path (:func:`looks_like_path`: a separator or a suffix, such as
      ``m.toml`` or ``./sgn``): the TOML file, which must exist (a registered preset
      of exactly that name is used only when no such file exists);
    * a bare name: a registered preset of that name wins, even over a file of that
      name in the current directory; a bare name that is no preset is read as a file
      if one exists (else the error lists the presets).

    The file is UTF-8 TOML: the composition keys at the top level, or all of them in
    one ``[method]`` table (then nothing else may be at the top level).

    Raises:
        CompositionError: a missing, unreadable or non-UTF-8 file, a directory,
            invalid TOML, a ``[method]`` table beside other keys, or an unknown
            preset (naming the presets and the file it looked for).

    Example:
        >>> load_composition("sgn").preset
        'sgn'
    """
    if isinstance(source, Mapping):
        return Composition.from_dict(source, registry=registry)
    if not isinstance(source, str | Path):
        raise CompositionError(
            f"a composition source must be a TOML path, a preset name or a mapping, got "
            f"{type(source).__name__} {source!r}"
        )
    path = Path(source)
    if looks_like_path(source):
        if path.exists() or not _is_preset(str(source), registry):
            return _from_file(path, registry)
        return Composition.from_dict({"preset": str(source)}, registry=registry)
    if _is_preset(str(source), registry):
        return Composition.from_dict({"preset": str(source)}, registry=registry)
    if path.exists():
        return _from_file(path, registry)
    from somax_plug._src.errors import UnknownComponentError

    try:
        return Composition.from_dict({"preset": str(source)}, registry=registry)
    except UnknownComponentError as exc:
        raise UnknownComponentError(
            f"{exc}; nor is there a composition file {str(source)!r} here (a file argument "
            f"needs a suffix or a separator, e.g. {str(source)}.toml or ./{source})"
        ) from None


def _is_preset(name: str, registry: Any) -> bool:
    from somax_plug._src.errors import UnknownComponentError
    from somax_plug._src.registry import get_registry

    try:
        (registry or get_registry()).preset(name)
    except UnknownComponentError:
        return False
    return True  # found, or ambiguous (then planning it names the owners)


def _from_file(path: Path, registry: Any) -> Composition:
    if not path.exists():
        raise CompositionError(
            f"composition file {str(path)!r} does not exist; pass the path of a TOML file "
            "(see `somax-plug plan --help`) or the name of a preset (`somax-plug list`)"
        )
    if path.is_dir():
        raise CompositionError(
            f"composition file {str(path)!r} is a directory; pass the path of a TOML file in it"
        )
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CompositionError(
            f"cannot read composition file {str(path)!r}: {exc.strerror or exc}; pass a "
            "readable TOML file"
        ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CompositionError(
            f"{path}: not UTF-8 text (byte {exc.start}: {raw[exc.start:exc.start + 1]!r}); "
            "a composition file must be TOML in UTF-8"
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CompositionError(f"{path}: invalid TOML: {exc}") from None
    if "method" in data:
        others = sorted(k for k in data if k != "method")
        if others:
            raise CompositionError(
                f"{path}: a [method] table holds the whole composition, but the file also "
                f"has {others} outside it, which would be ignored; move them into [method] "
                "(as [method.solver], method.learning_rate = ...) or drop the [method] table"
            )
        data = data["method"]
        if not isinstance(data, Mapping):
            raise CompositionError(
                f"{path}: 'method' must be a table ([method]) of composition keys, got "
                f"{type(data).__name__} {data!r}"
            )
    return Composition.from_dict(data, registry=registry)


def compose(
    curvature: Any = None,
    solver: Any = None,
    *,
    predict_fn: Callable[..., Any],
    loss: Any,
    estimators: Any = None,
    preconditioner: Any = None,
    damping: Any = None,
    preset: str | None = None,
    config: Mapping[str, Any] | str | Path | None = None,
    learning_rate: Any = None,
    tx: Any = None,
    reduction: str | None = None,
    rho_every_k: int | None = None,
    curvature_batch: int | None = None,
    unplanned: bool = False,
    registry: Any = None,
    mesh: Any = None,
    param_sharding: Any = None,
    has_state: bool | None = None,
    has_rng: bool | None = None,
) -> Any:
    """Plan a composition and return a :class:`~somax_plug.Method`.

    Args:
        curvature, solver, estimators, preconditioner, damping: components (see the
            module docstring); omitted ones come from ``preset`` or ``config``.
        predict_fn: ``predict_fn(params, inputs) -> outputs``; with ``has_state`` /
            ``has_rng``, ``predict_fn(params, inputs, *, state, key) -> (outputs,
            new_state)`` (see :mod:`somax_plug.models` for Flax and Equinox models).
        has_state, has_rng: the model has state (``method.init(params,
            model_state)``) / needs a key (one per step, the same for every consumer
            in the step); None: read from ``predict_fn``'s attributes, else False.
        loss: a loss name (``mse``, ``softmax_cross_entropy``,
            ``sigmoid_binary_cross_entropy``) or ``loss(outputs, targets) -> [B]``.
        preset: start from a registered preset (``"sgn"``, ``"newton_cg"``, ...).
        config: a mapping or TOML path with the same keys.
        learning_rate: float or Optax schedule; the direction s is applied as
            ``params - learning_rate * s`` unless ``tx`` is given.
        tx: an Optax transformation applied to the direction instead of the
            learning rate (it must do its own scaling, e.g. end in
            ``optax.scale_by_learning_rate``).
        reduction: ``"mean"`` or ``"sum"`` over the batch; None (the default) takes
            the ``config``'s (or preset's) ``reduction``, else the loss instance's own,
            else ``"mean"``. A keyword given explicitly overrides the file.
        rho_every_k: report the gain ratio rho (which needs the loss after the step
            and the predicted decrease) every k steps; damping policies that need
            them get them every step regardless.
        curvature_batch: compute the curvature (the operator and every resource it
            reads) on the first ``curvature_batch`` rows of each step's batch, while
            the loss and the gradient use the whole batch (Martens 2010, sec. 4.3:
            a smaller curvature batch makes each product cheaper). On minibatches
            drawn at random, the first rows are a random sub-batch.
        unplanned: build the ablation in which every component recomputes its own
            resources (same numbers, more work).
        registry: a registry to resolve names in (default: the process-wide one).
        mesh: a ``jax.sharding.Mesh`` for data parallelism (see
            :mod:`somax_plug._src.sharding`): every batch leaf is sharded along its
            leading axis over the mesh's ``"data"`` axis (its first axis if it has
            no ``"data"`` axis), parameters and state are replicated, and the step
            is jitted with those in/out shardings. Build one with
            :func:`somax_plug.data_parallel_mesh`. **The one switch for
            device-count-independent numerics** is ``mesh=DataParallel(mesh,
            reduce_chunks=K)`` (opt-in; measured 1.3x to 1.6x the step time of
            ``sgn`` on 1 and 4 CPU devices): the batch is reduced in ``K`` fixed
            chunks in a fixed order, so the loss, gradients, curvature products,
            Gram matrices, solver iteration counts and damping decisions are
            bitwise the same for any number of devices and processes (see
            ``docs/howto/multi-process.md``).
        param_sharding: with ``mesh``, a rule ``(path, leaf) -> PartitionSpec | None``
            that shards parameter and state leaves along another mesh axis, e.g.
            :func:`somax_plug.shard_large_2d` (None: replicate all).

    Example:
        >>> import jax.numpy as jnp
        >>> from somax_plug import compose
        >>> method = compose("ggn", "cg", predict_fn=lambda p, x: x @ p, loss="mse",
        ...                  damping={"name": "constant", "lam": 1e-3})
        >>> state = method.init(jnp.zeros(3))
    """
    from somax_plug._src.model import make_model
    from somax_plug._src.planner import make_plan
    from somax_plug._src.step import Method

    data: dict[str, Any] = {}
    if config is not None:
        base = (
            load_composition(config, registry=registry) if not isinstance(config, Mapping) else None
        )
        data = base.to_dict() if base is not None else dict(config)
    if preset is not None:
        data["preset"] = preset
    given = {
        "curvature": curvature,
        "solver": solver,
        "estimators": estimators,
        "preconditioner": preconditioner,
        "damping": damping,
        "learning_rate": learning_rate,
        "rho_every_k": rho_every_k,
        "curvature_batch": curvature_batch,
    }
    data.update({k: v for k, v in given.items() if v is not None})
    data["loss"] = loss
    if reduction is not None:
        data["reduction"] = reduction
    composition = Composition.from_dict(data, registry=registry)
    plan = make_plan(composition, registry=registry, unplanned=unplanned)
    model = make_model(
        predict_fn, loss, reduction=composition.reduction, has_state=has_state, has_rng=has_rng
    )
    return Method(plan=plan, model=model, tx=tx, mesh=mesh, param_sharding=param_sharding)

"""Data parallelism with JAX's own sharding: a mesh, a placement, one sharded jit.

``compose(..., mesh=mesh)`` makes the step data-parallel:

* every leaf of the batch ``(inputs, targets)`` is sharded along its leading
  (batch) axis over the mesh's data axis, ``NamedSharding(mesh, P("data"))``;
* parameters and the method state are replicated (``NamedSharding(mesh, P())``),
  unless a ``param_sharding`` rule shards some leaves along another mesh axis;
* the step is ``jax.jit(step, in_shardings=..., out_shardings=...)``: XLA's GSPMD
  partitioner turns every reduction over the batch (the loss, gradients, GGN and
  Fisher products, Gram matrices of the row-space solvers, ...) into the right
  cross-device collectives. There is no hand-written reduction anywhere.

Batch sizes must be divisible by the number of devices along the data axis
(checked before tracing, :class:`~somax_plug.InputError` otherwise).

Parameter sharding (for large 2-D layers): ``param_sharding`` is a rule
``rule(path, leaf) -> PartitionSpec | None`` called for every leaf of the
parameters *and* of the state (``leaf`` is a ``jax.ShapeDtypeStruct``, ``path`` a
``jax.tree_util`` key path); ``None`` means replicated. :func:`shard_large_2d`
builds the usual rule: 2-D floating leaves with at least ``min_size`` elements are
split along their last axis over the model axis. State leaves with a parameter's
shape (diagonal EMAs, momenta) are then split the same way.

Multi-host: call ``jax.distributed.initialize()`` first in every process; the
mesh from :func:`data_parallel_mesh` then spans every process's devices (see
``docs/howto/multi-process.md``).

Device-count-independent reductions (``DataParallel(mesh, reduce_chunks=K)``, passed
as ``compose(..., mesh=DataParallel(...))``): GSPMD sums over the batch as per-device
partial sums plus an all-reduce, so the rounding of the gradient and of every
curvature product depends on how many devices share the batch. With ``reduce_chunks
= K`` the model is evaluated on ``K`` fixed chunks of the batch (``vmap`` over
chunks, the parameters broadcast to one copy per chunk), and every reverse-mode
reduction over the batch (the gradient, ``J^T u``, Hessian-vector products) is the
transpose of that broadcast, made canonical: the ``K`` per-chunk sums are gathered
and added in the fixed order ``((c_0 + c_1) + c_2) + ...`` on every device. The
chunks do not depend on the devices, so 1, 2, 4, ... devices (and processes) give
bitwise the same gradients and products, hence the same Krylov iteration counts.
Cost: ``K`` copies of each parameter-shaped cotangent (spread over the devices).

Example:
    >>> import jax
    >>> from somax_plug import data_parallel_mesh
    >>> mesh = data_parallel_mesh()          # every local device on one "data" axis
    >>> mesh.axis_names
    ('data',)
    >>> # method = compose(preset="sgn", predict_fn=f, loss="mse", mesh=mesh)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from somax_plug._src.errors import InputError

PyTree = Any
ShardingRule = Callable[[Any, jax.ShapeDtypeStruct], "PartitionSpec | None"]

__all__ = [
    "DataParallel",
    "data_parallel_mesh",
    "replicated",
    "shard_batch",
    "shard_large_2d",
]


def data_parallel_mesh(
    num_devices: int | None = None,
    axis: str = "data",
    model_axis: str | None = None,
    *,
    model_size: int | None = None,
    devices: Any = None,
) -> Mesh:
    """A mesh for data parallelism: ``num_devices`` devices on the axis ``axis``.

    Args:
        num_devices: how many devices to use (default: all of ``jax.devices()``,
            which spans every process after ``jax.distributed.initialize()``).
        axis: name of the data axis (the batch is sharded over it).
        model_axis: optional name of a second axis, for parameters sharded by a
            ``param_sharding`` rule; then ``model_size`` devices lie along it and
            ``num_devices // model_size`` along the data axis.
        model_size: devices along ``model_axis`` (required with it).
        devices: the devices to use (default ``jax.devices()``).

    Example:
        >>> mesh = data_parallel_mesh(1)
        >>> dict(mesh.shape)
        {'data': 1}
    """
    pool = list(jax.devices() if devices is None else devices)
    n = len(pool) if num_devices is None else int(num_devices)
    if n < 1 or n > len(pool):
        raise InputError(
            f"data_parallel_mesh: num_devices must be between 1 and {len(pool)} (the devices "
            f"available), got {num_devices!r}; on CPU, set "
            "XLA_FLAGS=--xla_force_host_platform_device_count=N before importing jax"
        )
    chosen = np.asarray(pool[:n], dtype=object)
    if model_axis is None:
        if model_size not in (None, 1):
            raise InputError("data_parallel_mesh: model_size needs a model_axis name")
        return Mesh(chosen, (axis,))
    if model_axis == axis:
        raise InputError(f"data_parallel_mesh: model_axis must differ from axis {axis!r}")
    if model_size is None or model_size < 1 or n % model_size:
        raise InputError(
            f"data_parallel_mesh: with model_axis={model_axis!r}, give model_size, a divisor "
            f"of num_devices={n}; got model_size={model_size!r}"
        )
    return Mesh(chosen.reshape(n // model_size, model_size), (axis, model_axis))


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding that keeps a full copy on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(batch: PyTree, mesh: Mesh, axis: str = "data") -> PyTree:
    """``batch`` with every leaf's leading axis sharded over ``axis`` of ``mesh``.

    Example:
        >>> import jax.numpy as jnp
        >>> mesh = data_parallel_mesh(1)
        >>> x, y = shard_batch((jnp.ones((4, 2)), jnp.zeros(4)), mesh)
        >>> x.sharding.spec == PartitionSpec("data")
        True
    """
    return jax.device_put(batch, NamedSharding(mesh, PartitionSpec(axis)))


def shard_large_2d(model_axis: str = "model", min_size: int = 1 << 16) -> ShardingRule:
    """A ``param_sharding`` rule: split big 2-D floating leaves along their last axis.

    A leaf is split over ``model_axis`` when it is 2-D, floating, has at least
    ``min_size`` elements and a last dimension divisible by the axis size; every
    other leaf is replicated. (A hand-written rule whose spec does not divide a
    leaf's shape is an error; this one carries ``replicate_indivisible = True``,
    which makes :class:`DataParallel` replicate such leaves instead.)

    Example:
        >>> import jax, jax.numpy as jnp
        >>> rule = shard_large_2d("model", min_size=4)
        >>> rule((), jax.ShapeDtypeStruct((2, 4), jnp.float32)) == PartitionSpec(None, "model")
        True
        >>> rule((), jax.ShapeDtypeStruct((4,), jnp.float32)) is None
        True
    """

    def rule(path: Any, leaf: jax.ShapeDtypeStruct) -> PartitionSpec | None:
        if len(leaf.shape) != 2 or not jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating):
            return None
        if int(np.prod(leaf.shape)) < min_size:
            return None
        return PartitionSpec(None, model_axis)

    rule.replicate_indivisible = True  # type: ignore[attr-defined]
    return rule


def _spec_of(x: Any) -> jax.ShapeDtypeStruct:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    return jax.ShapeDtypeStruct(np.shape(x), jax.numpy.result_type(x))


class DataParallel:
    """How one :class:`~somax_plug.Method` is laid out over a mesh.

    Args:
        mesh: a ``jax.sharding.Mesh``.
        data_axis: the axis the batch is sharded over (default: ``"data"`` when the
            mesh has it, else its first axis).
        param_sharding: optional rule ``(path, leaf) -> PartitionSpec | None`` for
            parameters and state leaves (see the module docstring).

        reduce_chunks: ``None`` (GSPMD's reductions), or ``K``: reduce over the batch
            in ``K`` fixed chunks in a fixed order, the same for any number of devices
            (see the module docstring). ``K`` must be a multiple of the data axis size
            and divide every batch size; plain models only (no state, no key).

    Example:
        >>> dp = DataParallel(data_parallel_mesh(1))
        >>> dp.data_axis, dp.data_size
        ('data', 1)
        >>> DataParallel(data_parallel_mesh(1), reduce_chunks=4).reduce_chunks
        4
    """

    def __init__(
        self,
        mesh: Mesh,
        data_axis: str | None = None,
        param_sharding: ShardingRule | None = None,
        *,
        reduce_chunks: int | None = None,
    ) -> None:
        if not isinstance(mesh, Mesh):
            raise InputError(
                f"mesh must be a jax.sharding.Mesh (e.g. somax_plug._src.sharding."
                f"data_parallel_mesh()), got {type(mesh).__name__}"
            )
        names = tuple(mesh.axis_names)
        if data_axis is None:
            data_axis = "data" if "data" in names else names[0]
        if data_axis not in names:
            raise InputError(f"data axis {data_axis!r} is not an axis of the mesh {names}")
        if param_sharding is not None and not callable(param_sharding):
            raise InputError(
                "param_sharding must be a rule (path, leaf) -> PartitionSpec | None, e.g. "
                f"somax_plug._src.sharding.shard_large_2d('model'); got {param_sharding!r}"
            )
        self.mesh = mesh
        self.data_axis = data_axis
        self.param_sharding = param_sharding
        n = int(dict(mesh.shape)[data_axis])
        if reduce_chunks is not None and (
            isinstance(reduce_chunks, bool)
            or not isinstance(reduce_chunks, int)
            or reduce_chunks < 1
            or reduce_chunks % n
        ):
            raise InputError(
                f"reduce_chunks must be a positive multiple of the {n} devices of the data "
                f"axis {data_axis!r} (e.g. {max(n, 8) // n * n}; the same value on every "
                f"device count), or None; got {reduce_chunks!r}"
            )
        self.reduce_chunks = reduce_chunks
        self.batch = NamedSharding(mesh, PartitionSpec(data_axis))
        self.replicated = replicated(mesh)
        self.params_shardings: PyTree = None
        self.state_shardings: PyTree = None

    @property
    def data_size(self) -> int:
        """Number of devices along the data axis (the batch size must be a multiple)."""
        return int(dict(self.mesh.shape)[self.data_axis])

    def check_batch_size(self, batch_size: int) -> None:
        """Raise :class:`InputError` unless ``batch_size`` splits evenly over the data axis."""
        k = self.reduce_chunks
        if k is not None and batch_size % k:
            lower = batch_size - batch_size % k or k
            raise InputError(
                f"batch size {batch_size} is not divisible by reduce_chunks={k} (the fixed "
                f"chunks of the canonical reductions); use a multiple of {k} (e.g. {lower} "
                f"or {lower + k}), or DataParallel(..., reduce_chunks=None)"
            )
        n = self.data_size
        if batch_size % n:
            lower = batch_size - batch_size % n or n
            raise InputError(
                f"batch size {batch_size} is not divisible by the {n} devices of the mesh's "
                f"data axis {self.data_axis!r}; use a batch size that is a multiple of {n} "
                f"(e.g. {lower} or {lower + n}), or a mesh with fewer devices"
            )

    def tree_shardings(self, tree: PyTree, what: str = "params") -> PyTree:
        """A ``NamedSharding`` for every leaf of ``tree`` (arrays or ShapeDtypeStructs)."""
        if self.param_sharding is None:
            return jax.tree_util.tree_map(lambda _: self.replicated, tree)
        sizes = dict(self.mesh.shape)

        def one(path: Any, x: Any) -> NamedSharding:
            leaf = _spec_of(x)
            spec = self.param_sharding(path, leaf)
            if spec is None:
                return self.replicated
            if not isinstance(spec, PartitionSpec) or len(spec) > len(leaf.shape):
                raise InputError(
                    f"param_sharding returned {spec!r} for {what}{jax.tree_util.keystr(path)} "
                    f"of shape {leaf.shape}; expected a PartitionSpec with at most "
                    f"{len(leaf.shape)} entries, or None"
                )
            for dim, names in zip(leaf.shape, spec, strict=False):
                group = () if names is None else (names if isinstance(names, tuple) else (names,))
                count = 1
                for name in group:
                    if name not in sizes:
                        raise InputError(
                            f"param_sharding: {what}{jax.tree_util.keystr(path)} uses mesh "
                            f"axis {name!r}, which the mesh {tuple(sizes)} does not have"
                        )
                    count *= sizes[name]
                if dim % count:
                    if getattr(self.param_sharding, "replicate_indivisible", False):
                        return self.replicated
                    raise InputError(
                        f"param_sharding: {what}{jax.tree_util.keystr(path)} has shape "
                        f"{leaf.shape}; dimension {dim} does not split over {count} devices "
                        f"({spec!r}); replicate it (return None) or use another axis"
                    )
            return NamedSharding(self.mesh, spec)

        return jax.tree_util.tree_map_with_path(one, tree)

    def bind(self, params: PyTree, state: PyTree) -> None:
        """Fix the layouts of ``params`` and ``state`` (arrays or ShapeDtypeStructs)."""
        self.params_shardings = self.tree_shardings(params, "params")
        self.state_shardings = self.tree_shardings(state, "state")

    def jit(self, fn: Callable[..., Any]) -> Any:
        """``jax.jit(fn)`` for ``fn(params, state, batch, key) -> (params, state, info)``.

        Uses the layouts fixed by :meth:`bind`; the outputs keep the inputs'
        layouts, so a step's outputs feed the next step without a copy or a
        recompilation.
        """
        p_sh, s_sh = self.params_shardings, self.state_shardings
        return jax.jit(
            fn,
            in_shardings=(p_sh, s_sh, self.batch, self.replicated),
            out_shardings=(p_sh, s_sh, self.replicated),
        )

    def place(self, params: PyTree, state: PyTree, batch: PyTree, key: Any) -> tuple:
        """Put the step's arguments where the sharded step expects them.

        Arrays that already have the target sharding are used as they are, so after
        the first step this costs no copy. With a mesh over several processes, a host
        value (parameters, state, key, or a batch not made by
        :func:`somax_plug.process_batch`) is this process's copy of the global value,
        the same in every process (:func:`somax_plug._src.distributed.put_global`).
        """
        from somax_plug._src.distributed import put_global

        return (
            put_global(params, self.params_shardings),
            put_global(state, self.state_shardings),
            put_global(batch, jax.tree_util.tree_map(lambda _: self.batch, batch)),
            put_global(key, self.replicated),
        )


# ------------------------------------------------- canonical (chunked) reductions
def canonical_model(model: Any, dp: DataParallel) -> Any:
    """``model`` with its predict_fn evaluated on ``dp.reduce_chunks`` fixed chunks.

    The parameters enter through :func:`_chunk_broadcast` (one copy per chunk; its
    transpose, the sum over the chunks, runs in a fixed order on every device), so
    every reduction over the batch that autodiff makes for the parameters is the same
    sum in the same order for any number of devices. Inputs whose leading size does
    not split into the chunks (a single example inside a ``vmap``) use the model as it
    is (nothing is reduced over a batch there).
    """
    import attrs

    if not model.plain:
        raise InputError(
            "reduce_chunks needs a plain model (no has_state, no has_rng): batch "
            "statistics or one dropout mask per batch change when the batch is evaluated "
            "in chunks; use DataParallel(..., reduce_chunks=None) for this model"
        )
    k = int(dp.reduce_chunks)
    predict = model.predict_fn
    spec = {"k": k, "chunked": NamedSharding(dp.mesh, PartitionSpec(dp.data_axis)),
            "rep": dp.replicated}

    def chunk_broadcast(params: PyTree) -> PyTree:
        return jax.tree_util.tree_map(lambda x: _chunk_broadcast_p().bind(x, **spec), params)

    def predict_fn(params: PyTree, inputs: PyTree) -> PyTree:
        sizes = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree_util.tree_leaves(inputs)}
        if len(sizes) != 1 or None in sizes or next(iter(sizes)) % k:
            return predict(params, inputs)
        xs = jax.tree_util.tree_map(lambda x: x.reshape((k, x.shape[0] // k, *x.shape[1:])), inputs)
        out = jax.vmap(predict)(chunk_broadcast(params), xs)  # one parameter copy per chunk
        return jax.tree_util.tree_map(lambda o: o.reshape((-1, *o.shape[2:])), out)

    return attrs.evolve(model, predict_fn=predict_fn)


def _chunk_sum(ct: Any, *, k: int, rep: NamedSharding) -> Any:
    """``ct[0] + ct[1] + ... + ct[k-1]`` in that order, on the gathered ``(k, ...)`` array."""
    ct = jax.lax.with_sharding_constraint(ct, rep)
    out = ct[0]
    for i in range(1, k):
        out = out + ct[i]
    return out


def _broadcast_impl(x: Any, *, k: int, chunked: NamedSharding, rep: NamedSharding) -> Any:
    y = jax.numpy.broadcast_to(x, (k, *np.shape(x)))
    return jax.lax.with_sharding_constraint(y, chunked)


_CHUNK_BROADCAST: list = []


def _chunk_broadcast_p() -> Any:
    """The primitive ``x -> (x, x, ..., x)`` (``k`` copies, sharded over the data axis).

    Linear; its transpose is :func:`_chunk_sum` (a fixed-order sum, where a plain
    ``broadcast_to`` would transpose to XLA's device-dependent all-reduce). Its
    batching rule binds it again (the ``vmap`` axis moved behind the chunk axis), so
    the transpose stays canonical under ``vmap`` too (the row-space solvers' Gram
    matrices, the estimators' probe batches).
    """
    if _CHUNK_BROADCAST:
        return _CHUNK_BROADCAST[0]
    from jax.extend.core import Primitive
    from jax.interpreters import ad, batching, mlir

    prim = Primitive("somax_plug_chunk_broadcast")
    prim.def_impl(_broadcast_impl)
    prim.def_abstract_eval(lambda x, *, k, chunked, rep: x.update(shape=(k, *x.shape)))
    mlir.register_lowering(prim, mlir.lower_fun(_broadcast_impl, multiple_results=False))

    def transpose(ct: Any, x: Any, *, k: int, chunked: NamedSharding, rep: NamedSharding) -> list:
        if type(ct) is ad.Zero:
            return [ad.Zero(x.aval)]
        return [_chunk_sum(ct, k=k, rep=rep)]

    ad.deflinear2(prim, transpose)

    def batch(args: tuple, dims: tuple, **params: Any) -> tuple:
        (x,), (d,) = args, dims
        return prim.bind(jax.numpy.moveaxis(x, d, 0), **params), 1

    batching.primitive_batchers[prim] = batch
    _CHUNK_BROADCAST.append(prim)
    return prim

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
The loss value is reduced in the same fixed order (:func:`chunked_loss`: ``rho``,
the Levenberg-Marquardt decisions, the loss after the step), and the curvature
operator's products are pinned replicated (:class:`CanonicalOperator`: Gram and
dense matrices, row-space and dense solves). Sums over the batch that a component
computes itself, outside autodiff (the Kronecker factors, the empirical Fisher's
products and diagonal), go through the loss's ``batch_sum(fn, *xs)``
(:func:`canonical_batch_sum` here: ``fn`` ``vmap``-ed over the ``K`` chunks, the
chunk results added in the fixed order). Measured bitwise on 1, 2 and 4 devices
(float32) for ``sgn``, ``gauss_newton_lm``, ``direct``, ``sophia_h``, Jacobi-PCG
and empirical Fisher + Jacobi-PCG, ``kfac``, ``ekfac`` and ``ggn_cg_kfac``
(``tests/canonical_check.py``); not for Hessian + ``minres`` with one chunk per
device. The layer map and the tapped pass read the base model through the
canonical predict_fn's :class:`Chunking` (``somax_plug/_src/layers.py``): the same
layers as the plain model, the tapped evaluation ``vmap``-ed over the same chunks
(``docs/howto/multi-process.md``).
Cost: ``K`` copies of each parameter-shaped cotangent (spread over the devices), and
Gram and dense matrices built one row / column at a time.

Example:
    >>> import jax
    >>> from somax_plug import data_parallel_mesh
    >>> mesh = data_parallel_mesh()          # every local device on one "data" axis
    >>> mesh.axis_names
    ('data',)
    >>> # method = compose(preset="sgn", predict_fn=f, loss="mse", mesh=mesh)
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import attrs
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from somax_plug._src.errors import InputError
from somax_plug._src.kinds import LinearOperator

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
    if devices is None:
        from somax_plug._src.distributed import cpu_scheduler_flag

        cpu_scheduler_flag()  # the first JAX call of a program: XLA has not read its flags
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
@attrs.frozen
class Chunking:
    """How a canonical model evaluates a batch: ``k`` fixed chunks, one parameter copy each.

    :func:`canonical_model` sets it as the ``chunking`` attribute of the predict_fn it
    returns, so that code that reads the model's structure (the layer map,
    :func:`somax_plug.layers.layer_io`) can trace the *base* ``predict`` and chunk it
    the same way. Chunk ``c`` holds examples ``c * B / k ... (c + 1) * B / k - 1``
    (chunk-major), on slot ``c * n / k`` of the data axis (``n`` devices).

    Attributes:
        predict: the model's own ``predict_fn(params, inputs)`` (unchunked).
        k: the number of chunks (``DataParallel.reduce_chunks``).
        chunked: the layout of a ``[k, ...]`` array: the chunk axis over the data axis.
        rep: the replicated layout.

    Example:
        >>> import jax.numpy as jnp
        >>> dp = DataParallel(data_parallel_mesh(1), reduce_chunks=2)
        >>> ch = Chunking(lambda p, x: x * p, 2, dp.batch, dp.replicated)
        >>> x = jnp.arange(8.0).reshape(2, 4)          # a batch axis of 4, at axis 1
        >>> parts = ch.split(x, axis=1)                 # [k, 2, 2]: chunk c is x[:, 2c:2c+2]
        >>> parts.shape, bool((ch.merge(parts, axis=1) == x).all())
        ((2, 2, 2), True)
    """

    predict: Callable[..., Any] = attrs.field(eq=False)
    k: int
    chunked: NamedSharding
    rep: NamedSharding

    def chunkable(self, tree: PyTree) -> bool:
        """Whether every leaf has one common leading size divisible by ``k``."""
        return _chunkable(tree, self.k)

    def broadcast(self, params: PyTree) -> PyTree:
        """``k`` copies of every leaf (``[k, ...]``) through the chunk-broadcast primitive.

        Its transpose is the fixed-order sum :func:`_chunk_sum`: every reduction over
        the batch that autodiff makes for ``params`` is device-count independent.
        """
        prim = _chunk_broadcast_p()
        return jax.tree_util.tree_map(
            lambda x: prim.bind(x, k=self.k, chunked=self.chunked, rep=self.rep), params)

    def split(self, x: Any, axis: int = 0) -> Any:
        """``x`` with its batch axis ``axis`` (size ``B``) as ``[k, ..., B / k, ...]``.

        The chunk axis comes first and is pinned to the chunked layout; ``axis = 0``
        on every leaf of a pytree is :func:`_split_chunks`.
        """
        if axis == 0:
            return _split_chunks(x, self.k, self.chunked)
        shape = np.shape(x)
        y = jax.numpy.reshape(x, (*shape[:axis], self.k, shape[axis] // self.k,
                                  *shape[axis + 1:]))
        return jax.lax.with_sharding_constraint(jax.numpy.moveaxis(y, axis, 0), self.chunked)

    def merge(self, x: Any, axis: int = 0) -> Any:
        """The inverse of :meth:`split`: ``[k, ..., m, ...]`` to ``[..., k m, ...]``.

        The chunk axis is pinned to the chunked layout first (as the canonical
        predict_fn pins its outputs), then folded into axis ``axis`` chunk-major.
        """
        x = jax.lax.with_sharding_constraint(x, self.chunked)
        if axis:
            x = jax.numpy.moveaxis(x, 0, axis)
        shape = np.shape(x)
        return x.reshape((*shape[:axis], -1, *shape[axis + 2:]))


def chunking_of(predict_fn: Any) -> Chunking | None:
    """The :class:`Chunking` of a canonical model's predict_fn, or None for any other."""
    ch = getattr(predict_fn, "chunking", None)
    return ch if isinstance(ch, Chunking) else None


def canonical_model(model: Any, dp: DataParallel) -> Any:
    """``model`` with its predict_fn evaluated on ``dp.reduce_chunks`` fixed chunks.

    The parameters enter through :func:`_chunk_broadcast` (one copy per chunk; its
    transpose, the sum over the chunks, runs in a fixed order on every device), so
    every reduction over the batch that autodiff makes for the parameters is the same
    sum in the same order for any number of devices. Inputs whose leading size does
    not split into the chunks (a single example inside a ``vmap``) use the model as it
    is (nothing is reduced over a batch there). The returned predict_fn carries its
    :class:`Chunking` (attribute ``chunking``, read by :func:`chunking_of`): the layer
    map and the tapped pass (:func:`somax_plug.layers.layer_io`) trace the base model
    and chunk it the same way.
    """
    if not model.plain:
        raise InputError(
            "reduce_chunks needs a plain model (no has_state, no has_rng): batch "
            "statistics or one dropout mask per batch change when the batch is evaluated "
            "in chunks; use DataParallel(..., reduce_chunks=None) for this model"
        )
    ch = Chunking(model.predict_fn, int(dp.reduce_chunks),
                  NamedSharding(dp.mesh, PartitionSpec(dp.data_axis)), dp.replicated)
    predict = ch.predict
    loss = chunked_loss(model.loss, k=ch.k, chunked=ch.chunked, rep=ch.rep)

    def predict_fn(params: PyTree, inputs: PyTree) -> PyTree:
        if not ch.chunkable(inputs):
            return predict(params, inputs)
        # the chunks pinned to the data axis, in and out: every intermediate of the
        # model (and of its linearization) stays split by chunk whatever else the
        # step computes, so each chunk's arithmetic is the same program everywhere
        out = jax.vmap(predict)(ch.broadcast(params), ch.split(inputs))  # a copy per chunk
        return jax.tree_util.tree_map(ch.merge, out)

    predict_fn.chunking = ch  # type: ignore[attr-defined]
    return attrs.evolve(model, predict_fn=predict_fn, loss=loss)


def _canonical_sum(per: Any, *, k: int, chunked: NamedSharding, rep: NamedSharding) -> Any:
    """``sum_b per[b]`` in an order fixed by ``k`` alone (not by the devices).

    The ``B`` values are split into ``k`` chunks (``B / k`` each, the chunks of the
    model's evaluation, sharded over the data axis); each chunk is summed pairwise
    (zero-padded to a power of two, then halves added elementwise: ``log2`` rounds
    of elementwise additions, which no partitioner can reorder); the ``k`` chunk
    sums are gathered and added in the order ``((c_0 + c_1) + c_2) + ...``.
    """
    b = per.shape[0]
    if b % k:
        return jax.numpy.sum(per)
    x = jax.lax.with_sharding_constraint(per.reshape(k, b // k), chunked)
    width = 1 << (b // k - 1).bit_length()
    if width > b // k:
        x = jax.numpy.pad(x, ((0, 0), (0, width - b // k)))
    while x.shape[1] > 1:
        half = x.shape[1] // 2
        x = x[:, :half] + x[:, half:]
    return _chunk_sum(x[:, 0], k=k, rep=rep)


_CHUNKED_LOSSES: dict = {}


def chunked_loss(loss: Any, *, k: int, chunked: NamedSharding, rep: NamedSharding) -> Any:
    """``loss`` whose reduction over the batch is :func:`_canonical_sum` (same class).

    The reduced loss (``mean`` or ``sum`` of the per-example losses) feeds ``rho``,
    the Levenberg-Marquardt accept/reject and lambda decisions, the loss after the
    step and every stopping rule that reads the loss; GSPMD would sum it as
    per-device partial sums plus an all-reduce, whose rounding depends on the device
    count. The returned loss is an instance of a subclass of ``type(loss)`` (so
    ``isinstance`` checks and every other method are the loss's own) whose
    ``__call__`` sums in the fixed order; its gradient is the same per-example
    weights (exact: a sum's transpose is a broadcast).
    """
    base = type(loss)
    key = (base, k, chunked, rep)
    sub = _CHUNKED_LOSSES.get(key)
    if sub is None:
        from somax_plug._src.losses import compute_dtype

        def __call__(self: Any, outputs: Any, targets: Any) -> Any:
            per = self.per_example(outputs, targets)
            per = per.astype(compute_dtype(per.dtype))
            total = _canonical_sum(per, k=k, chunked=chunked, rep=rep)
            return total / per.shape[0] if self.reduction == "mean" else total

        def batch_sum(self: Any, fn: Callable[..., Any], *xs: Any) -> Any:
            return canonical_batch_sum(fn, *xs, k=k, chunked=chunked, rep=rep)

        sub = type(f"Chunked{base.__name__}", (base,), {
            "__slots__": (), "__call__": __call__, "batch_sum": batch_sum,
            "__module__": base.__module__})
        _CHUNKED_LOSSES[key] = sub
    new = copy.copy(loss)
    object.__setattr__(new, "__class__", sub)
    return new


def _chunkable(tree: PyTree, k: int) -> bool:
    """Whether every leaf of ``tree`` has one common leading size, divisible by ``k``."""
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree_util.tree_leaves(tree)}
    return len(sizes) == 1 and None not in sizes and next(iter(sizes)) % k == 0


def _split_chunks(tree: PyTree, k: int, chunked: NamedSharding) -> PyTree:
    """Every leaf ``[B, ...]`` as ``[k, B / k, ...]``, pinned to the chunked layout."""
    return jax.tree_util.tree_map(
        lambda x: jax.lax.with_sharding_constraint(
            jax.numpy.reshape(x, (k, np.shape(x)[0] // k, *np.shape(x)[1:])), chunked),
        tree)


def canonical_batch_sum(
    fn: Callable[..., Any], *xs: Any, k: int, chunked: NamedSharding, rep: NamedSharding
) -> Any:
    """``fn(*xs)`` as ``K`` fixed chunks added in a fixed order (:meth:`Loss.batch_sum`).

    ``fn`` maps pytrees with a leading batch axis ``B`` to their sum over the batch.
    Every leaf is reshaped to ``[K, B / K, ...]`` and pinned to the chunked layout
    (chunk ``i`` on the same slot of the data axis as the model's chunk ``i``), ``fn``
    is ``vmap``-ed over the chunks, and the ``K`` chunk results are gathered and added
    as ``((c_0 + c_1) + c_2) + ...`` (:func:`_chunk_sum`): each chunk is the same
    program on any number of devices, and so is the order of the sum. Leaves without
    one common leading size divisible by ``K`` (or no leaves) give ``fn(*xs)``.
    """
    if not _chunkable(xs, k):
        return fn(*xs)
    per = jax.vmap(fn)(*_split_chunks(xs, k, chunked))
    return jax.tree_util.tree_map(
        lambda c: _chunk_sum(jax.lax.with_sharding_constraint(c, chunked), k=k, rep=rep), per)


class _RowByRow:
    """``U^T r`` whose stacked rows (``map_rows``) are built one row at a time.

    ``map_rows(eye)`` is ``lax.map(rmatvec, eye)``: the same product for each row as
    one ``rmatvec`` (see :meth:`CanonicalOperator.to_dense` for why not ``vmap``).
    The row-space solvers' Gram matrix ``U U^T`` uses it when present.
    """

    def __init__(self, rmatvec: Any, rep: NamedSharding) -> None:
        self._rmatvec, self._rep = rmatvec, rep

    def __call__(self, r: Any) -> PyTree:
        # pinned in and out: the dense algebra that made ``r`` stays replicated (GSPMD
        # would otherwise split it by the rows' batch layout)
        return _pinned(self._rmatvec(_pinned(r, self._rep)), self._rep)

    def map_rows(self, eye: Any) -> PyTree:
        return _pinned(jax.lax.map(self._rmatvec, _pinned(eye, self._rep)), self._rep)


def _pinned(x: Any, rep: NamedSharding) -> Any:
    """``x`` replicated, behind an ``optimization_barrier`` (the same fusions on 1 device)."""
    return jax.lax.optimization_barrier(jax.lax.with_sharding_constraint(x, rep))


@jax.tree_util.register_pytree_node_class
class CanonicalOperator(LinearOperator):
    """A curvature operator whose dense and row-space products are replicated.

    With canonical reductions every parameter-shaped product is already the same on
    any number of devices; what is not is dense linear algebra on a matrix or a
    vector whose rows follow the batch (``U v``, the rows of a Gram matrix
    ``U U^T``, ``to_dense()``): GSPMD would split it over the devices, and a matrix
    product or a triangular solve on a block of rows rounds differently from the
    whole. Here ``row_factors().matvec`` and ``to_dense()`` are constrained to be
    replicated, so ``row_cholesky``, ``row_cg``, ``direct``, ``auto`` and anything
    that builds ``U U^T`` from them run the whole computation on every device, as
    one device does. ``mv``, ``diag`` and the tags are the wrapped operator's.
    """

    def __init__(self, op: LinearOperator, rep: NamedSharding) -> None:
        self._op = op
        self._rep = rep
        self.tags = op.tags
        self.primal = op.primal

    def mv(self, v: PyTree) -> PyTree:
        return _pinned(self._op.mv(_pinned(v, self._rep)), self._rep)

    def diag(self) -> PyTree:
        return _pinned(self._op.diag(), self._rep)

    def row_factors(self) -> Any:
        rows = self._op.row_factors()
        if rows is None:
            return None
        rep = self._rep

        def matvec(v: PyTree) -> Any:
            return _pinned(rows.matvec(_pinned(v, rep)), rep)

        return rows._replace(matvec=matvec, rmatvec=_RowByRow(rows.rmatvec, rep))

    def to_dense(self) -> Any:
        """``[n, n]`` column by column (``lax.map`` of ``mv``), replicated.

        Each column is the same product as one ``mv``: a ``vmap`` over all n columns
        made XLA pick other kernels for the batched products on one device than on
        several (measured: different bits on 1 device, the same on 2 and 4).
        """
        from jax import flatten_util

        flat, unravel = flatten_util.ravel_pytree(self.primal)

        def column(e: Any) -> Any:
            return flatten_util.ravel_pytree(self.mv(unravel(e)))[0]

        eye = jax.numpy.eye(flat.shape[0], dtype=flat.dtype)
        return _pinned(jax.lax.map(column, eye).T, self._rep)

    def __getattr__(self, name: str) -> Any:  # a component's own extras (e.g. kronecker)
        if name.startswith("__") or name in ("_op", "_rep"):
            raise AttributeError(name)
        return getattr(self._op, name)

    def tree_flatten(self) -> tuple:
        return (self._op,), self._rep

    @classmethod
    def tree_unflatten(cls, rep: NamedSharding, children: tuple) -> CanonicalOperator:
        return cls(children[0], rep)


def canonical_providers(providers: dict, dp: DataParallel) -> dict:
    """``providers`` with the ``operator`` wrapped in :class:`CanonicalOperator`."""
    if "operator" not in providers:
        return providers
    build, rep = providers["operator"].compute, dp.replicated
    return {**providers, "operator": attrs.evolve(
        providers["operator"], compute=lambda res: CanonicalOperator(build(res), rep))}


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
    # the copies' abstract value carries no mesh: a parameter pinned by a sharding
    # constraint has one in its aval, and a conv whose kernel carries it cannot be
    # batched again once transposed (JAX's conv batching rule: NotImplementedError
    # for a grouped conv with an out_sharding; the Kronecker factors vmap that VJP)
    prim.def_abstract_eval(
        lambda x, *, k, chunked, rep: x.update(shape=(k, *x.shape), sharding=None))
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

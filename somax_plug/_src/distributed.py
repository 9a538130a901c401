"""Multi-process data parallelism: ``jax.distributed``, a global mesh, per-process data.

Past one machine, the same jitted step runs under JAX's multi-process runtime: one
Python process per host (or per accelerator group), all started with the same
program (SPMD), joined by :func:`init_distributed` (``jax.distributed.initialize``). The
mesh from :func:`somax_plug.data_parallel_mesh` then spans every process's devices,
and ``compose(..., mesh=mesh)`` builds a step whose arrays are *global*: each
process holds only its own devices' pieces.

* **data**: each process loads only its own shard of the global batch and turns it
  into one global array with :func:`process_batch` (which wraps
  ``jax.make_array_from_process_local_data``). With ``P`` processes feeding ``b``
  examples each, the step sees a global batch of ``P * b`` examples, sharded over
  the mesh's data axis; :func:`process_slice` tells a process which rows of a global
  batch are its own (process ``p`` feeds rows ``[p * b, (p + 1) * b)`` of the mesh
  from :func:`data_parallel_mesh`).
* **parameters and state** are replicated (``NamedSharding(mesh, P())``) unless a
  ``param_sharding`` rule says otherwise. Every process passes the *same* host
  values to ``method.init`` and ``method.step`` (same initial parameters, same key):
  the SPMD contract. They are laid out with ``jax.make_array_from_callback``, which
  copies this process's value onto its own devices without comparing values across
  processes (JAX's ``device_put`` check compares by ``==``, which a NaN in a state,
  e.g. the constant damping's ``rho``, never passes).
* **reading results**: :func:`to_host` gives a NumPy copy of a (replicated or
  sharded) global array in every process.
* **faults**: :func:`init_distributed` sets a short heartbeat timeout, so when a process
  dies the others fail with an error within about ``heartbeat_timeout_s`` seconds
  instead of waiting in a collective forever. Recovery is to restart every process
  and restore the last checkpoint (:mod:`somax_plug.checkpoint`).

On CPU, :func:`init_distributed` selects gloo collectives (``jax_cpu_collectives_
implementation``) and ``local_device_count`` virtual devices per process, so two
local processes stand in for two hosts (``docs/howto/multi-process.md``).

Example (each of two processes, ``process_id`` 0 and 1)::

    from somax_plug import compose, data_parallel_mesh
    from somax_plug import init_distributed, process_batch

    init_distributed("127.0.0.1:12345", num_processes=2, process_id=process_id,
                     local_device_count=2)            # before any other JAX call
    mesh = data_parallel_mesh()                  # 4 devices, 2 per process
    method = compose(preset="sgn", predict_fn=f, loss="mse", mesh=mesh)
    state = method.init(params)                  # same params in every process
    batch = process_batch((x_local, y_local), mesh)
    params, state, info = method.step(params, state, batch, jax.random.key(0))
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from somax_plug._src.errors import InputError

PyTree = Any

__all__ = [
    "CPU_SCHEDULER_FLAG",
    "cpu_scheduler_flag",
    "init_distributed",
    "process_batch",
    "process_slice",
    "put_global",
    "to_host",
]


def init_distributed(
    coordinator_address: str,
    num_processes: int,
    process_id: int,
    *,
    local_device_count: int | None = None,
    cpu_collectives: str | None = "gloo",
    initialization_timeout_s: int = 120,
    heartbeat_timeout_s: int = 10,
    shutdown_timeout_s: int = 30,
) -> None:
    """Join this process to a multi-process JAX run (``jax.distributed.initialize``).

    Call it first, in every process, before any other JAX call (before
    ``jax.devices()``): the backend is configured here.

    Args:
        coordinator_address: ``"host:port"`` of process 0 (it runs the coordinator
            there), e.g. ``"127.0.0.1:12345"`` for local processes.
        num_processes: how many processes take part.
        process_id: this process's index, ``0 <= process_id < num_processes``.
        local_device_count: on CPU, how many virtual devices this process gets
            (``jax_num_cpu_devices``); ``None`` keeps JAX's default. Ignored on
            GPU/TPU, where each process sees its own accelerators.
        cpu_collectives: the CPU cross-process collectives (``"gloo"``, or ``None``
            to leave JAX's setting); needed for a CPU mesh over several processes.
        initialization_timeout_s: how long to wait for every process to join.
        heartbeat_timeout_s: after this many seconds without a heartbeat a process
            is declared dead and the others fail with an error (JAX's default, 100 s,
            is long for tests and small jobs).
        shutdown_timeout_s: how long a finishing process waits for the others.

    Raises:
        InputError: ``num_processes`` / ``process_id`` out of range, a bad address,
            or JAX already initialised (devices created before this call).

    Example::

        init_distributed("127.0.0.1:12345", num_processes=2, process_id=0,
                         local_device_count=2)
    """
    if not isinstance(num_processes, int) or num_processes < 1:
        raise InputError(f"num_processes must be an int >= 1, got {num_processes!r}")
    if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
        raise InputError(
            f"process_id must be an int in [0, {num_processes - 1}] (one per process), got "
            f"{process_id!r}"
        )
    host, sep, port = str(coordinator_address).rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InputError(
            f"coordinator_address must be 'host:port' (e.g. '127.0.0.1:12345'), got "
            f"{coordinator_address!r}"
        )
    for name, value in (
        ("initialization_timeout_s", initialization_timeout_s),
        ("heartbeat_timeout_s", heartbeat_timeout_s),
        ("shutdown_timeout_s", shutdown_timeout_s),
    ):
        if not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a whole number of seconds >= 1, got {value!r}")
    if local_device_count is not None and (
        not isinstance(local_device_count, int) or local_device_count < 1
    ):
        raise InputError(f"local_device_count must be an int >= 1, got {local_device_count!r}")
    cpu_scheduler_flag()  # before the backend starts (XLA reads XLA_FLAGS then)
    try:
        if local_device_count is not None:
            jax.config.update("jax_num_cpu_devices", local_device_count)
        if cpu_collectives is not None:
            jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 (JAX raises RuntimeError or ValueError)
        raise InputError(
            f"cannot configure JAX for {num_processes} processes ({exc}); call "
            "somax_plug.init_distributed before any other JAX call (jax.devices(), "
            "creating an array)"
        ) from exc
    try:
        jax.distributed.initialize(
            coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=initialization_timeout_s,
            heartbeat_timeout_seconds=heartbeat_timeout_s,
            shutdown_timeout_seconds=shutdown_timeout_s,
        )
    except Exception as exc:  # noqa: BLE001 (JAX raises RuntimeError or XlaRuntimeError)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"process {process_id} of {num_processes} could not join the group at "
            f"{coordinator_address} ({type(exc).__name__}: {first}); call init_distributed "
            "once, before any other JAX call, and start every process with the same "
            "coordinator address and num_processes (process 0 runs the coordinator) "
            f"within initialization_timeout_s={initialization_timeout_s}"
        ) from exc


CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
"""The XLA flag that avoids a CPU collective deadlock (see :func:`cpu_scheduler_flag`)."""

_FLAG_NAME = CPU_SCHEDULER_FLAG.split("=")[0]


def _backends_started() -> bool:
    from jax._src import xla_bridge

    return bool(xla_bridge.backends_are_initialized())


def cpu_scheduler_flag() -> str:
    """Put :data:`CPU_SCHEDULER_FLAG` into ``XLA_FLAGS`` while XLA can still read it.

    With several CPU devices in one process, XLA's concurrency-optimised scheduler
    ordered two collectives differently on different devices in a step with a
    cadenced estimator (``lax.cond``) and canonical reductions, and the step
    deadlocked (XLA aborts after 40 s: "Termination timeout for all reduce").
    Disabling that scheduler avoids it. The flag only concerns XLA's CPU backend,
    so it is harmless on GPU and TPU hosts. :func:`init_distributed` and
    :func:`somax_plug.data_parallel_mesh` call this before they start the backend.

    Returns:
        ``"set"`` (added now), ``"user"`` (``XLA_FLAGS`` already names the option:
        left as the user set it), or ``"too late"`` (the backend has started, XLA
        has read its flags; ``compose`` warns where it matters).

    Example:
        >>> cpu_scheduler_flag() in ("set", "user", "too late")
        True
    """
    import os

    flags = os.environ.get("XLA_FLAGS", "")
    if _FLAG_NAME in flags:
        return "user"
    if _backends_started():
        return "too late"
    os.environ["XLA_FLAGS"] = f"{flags} {CPU_SCHEDULER_FLAG}".strip()
    return "set"


def _data_sharding(mesh: Mesh, axis: str) -> NamedSharding:
    if not isinstance(mesh, Mesh):
        raise InputError(
            f"mesh must be a jax.sharding.Mesh (somax_plug.data_parallel_mesh()), got "
            f"{type(mesh).__name__}"
        )
    if axis not in mesh.axis_names:
        raise InputError(f"data axis {axis!r} is not an axis of the mesh {tuple(mesh.axis_names)}")
    return NamedSharding(mesh, PartitionSpec(axis))


def _local_rows(mesh: Mesh, axis: str) -> int:
    """How many positions of the data axis this process's devices occupy."""
    sharding = _data_sharding(mesh, axis)
    n = int(dict(mesh.shape)[axis])
    starts = {idx[0].start or 0 for idx in sharding.addressable_devices_indices_map((n,)).values()}
    return len(starts)


def process_slice(global_batch_size: int, mesh: Mesh, axis: str = "data") -> slice:
    """The rows of a global batch that this process feeds to :func:`process_batch`.

    With ``mesh`` from :func:`somax_plug.data_parallel_mesh` the processes' devices
    lie in order along the data axis, so process ``p`` of ``P`` owns rows
    ``[p * B / P, (p + 1) * B / P)``.

    Raises:
        InputError: ``global_batch_size`` does not split over the data axis, or this
            process's rows are not one contiguous range (a hand-made mesh).

    Example:
        >>> from somax_plug import data_parallel_mesh
        >>> process_slice(8, data_parallel_mesh(1))
        slice(0, 8, None)
    """
    sharding = _data_sharding(mesh, axis)
    n = int(dict(mesh.shape)[axis])
    if not isinstance(global_batch_size, int) or global_batch_size < 1 or global_batch_size % n:
        raise InputError(
            f"global_batch_size must be a positive multiple of the {n} devices of the data "
            f"axis {axis!r}, got {global_batch_size!r}"
        )
    index = sharding.addressable_devices_indices_map((global_batch_size,))
    bounds = sorted({(s[0].start or 0, s[0].stop or global_batch_size) for s in index.values()})
    for (_, stop), (start, _) in zip(bounds, bounds[1:], strict=False):
        if stop != start:
            raise InputError(
                f"this process's devices hold rows {bounds} of the batch, not one contiguous "
                "range; build the mesh with somax_plug.data_parallel_mesh() (devices in "
                "process order) or shard the data yourself with "
                "jax.make_array_from_callback"
            )
    return slice(bounds[0][0], bounds[-1][1])


def process_batch(local_batch: PyTree, mesh: Mesh, axis: str = "data") -> PyTree:
    """One global batch from every process's local shard (``make_array_from_process_local_data``).

    Every process calls it with its own ``local_batch`` (a pytree such as ``(inputs,
    targets)``, each leaf with a leading batch axis of the same size ``b`` in every
    process). The result is a pytree of global ``jax.Array`` s of leading size
    ``b * P`` (``P`` processes along the data axis), sharded as
    ``NamedSharding(mesh, P(axis))``: exactly the layout ``Method.step`` expects,
    so the step uses it without a copy. Process ``p`` 's rows are
    :func:`process_slice` of the global batch. In a single process it equals
    ``somax_plug.shard_batch``.

    Args:
        local_batch: this process's examples (NumPy or JAX arrays).
        mesh: the global mesh (``somax_plug.data_parallel_mesh()``).
        axis: the mesh's data axis.

    Raises:
        InputError: a leaf without a batch axis, leaves with different batch sizes, or
            a local batch that does not split over this process's devices.

    Example:
        >>> import numpy as np
        >>> from somax_plug import data_parallel_mesh
        >>> x, y = process_batch((np.ones((4, 2)), np.zeros(4)), data_parallel_mesh(1))
        >>> x.shape, x.sharding.spec == PartitionSpec("data")
        ((4, 2), True)
    """
    sharding = _data_sharding(mesh, axis)
    local = _local_rows(mesh, axis)
    leaves = jax.tree_util.tree_leaves_with_path(local_batch)
    if not leaves:
        raise InputError("process_batch: the local batch holds no arrays")
    sizes = []
    for path, x in leaves:
        shape = np.shape(x)
        where = f"local_batch{jax.tree_util.keystr(path)}"
        if not shape:
            raise InputError(
                f"process_batch: {where} is a scalar; every leaf needs a leading batch axis"
            )
        sizes.append((where, shape[0]))
    first_where, b = sizes[0]
    for where, size in sizes[1:]:
        if size != b:
            raise InputError(
                f"process_batch: {first_where} has {b} examples but {where} has {size}; every "
                "leaf of the local batch must share the leading batch axis"
            )
    if b == 0 or b % local:
        raise InputError(
            f"process_batch: this process feeds {b} examples but holds {local} device(s) of "
            f"the data axis {axis!r}; feed a positive multiple of {local} examples per process "
            "(the same number in every process)"
        )

    def one(x: Any) -> jax.Array:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            raise InputError(
                "process_batch: got a global array already (not fully addressable); pass "
                "this process's local examples"
            )
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree_util.tree_map(one, local_batch)


def to_host(tree: PyTree) -> PyTree:
    """A NumPy copy of every leaf, in every process (global arrays included).

    A replicated leaf is read from this process's own copy (no communication); a
    leaf split across processes is gathered with
    ``jax.experimental.multihost_utils.process_allgather`` (a collective: call it
    in every process). PRNG key arrays come back as their key data.

    Example:
        >>> import jax.numpy as jnp
        >>> to_host({"w": jnp.ones(2)})["w"]
        array([1., 1.], dtype=float32)
    """
    from jax.experimental import multihost_utils

    def one(x: Any) -> Any:
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        if not isinstance(x, jax.Array):
            return np.asarray(x)
        if x.is_fully_addressable:
            return np.asarray(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree_util.tree_map(one, tree)


def put_global(tree: PyTree, shardings: PyTree) -> PyTree:
    """``tree`` laid out with ``shardings`` (a matching tree of ``NamedSharding``), no checks.

    An array that already has its target sharding is returned as is (no copy). Any
    other leaf is taken as this process's copy of the *global* value (the SPMD
    contract: every process passes the same value) and placed with
    ``jax.make_array_from_callback``, each process filling its own devices. Unlike
    ``jax.device_put`` across processes, no values are compared between processes
    (the comparison fails on a NaN, which is never equal to itself). PRNG key arrays
    are placed through their key data. In a single process this is ``device_put``.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    targets = treedef.flatten_up_to(shardings)
    return jax.tree_util.tree_unflatten(
        treedef, [_put_one(x, s) for x, s in zip(leaves, targets, strict=True)]
    )


def _put_one(x: Any, sharding: NamedSharding) -> Any:
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding)  # a global array resharded: JAX's own path
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        impl = jax.random.key_impl(x)
        data = _put_one(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=impl)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

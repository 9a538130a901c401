"""Checkpoints on Orbax: parameters and method state, tied to the plan.

:func:`save` writes one `Orbax <https://orbax.readthedocs.io>`_ checkpoint
directory (``orbax.checkpoint.CompositeCheckpointHandler``) with three items:

* ``params`` and ``state``: the parameters and the :class:`~somax_plug.MethodState`,
  saved with ``orbax.checkpoint.args.StandardSave`` (PRNG key arrays, bfloat16 and
  every other JAX dtype natively; no pickle anywhere);
* ``somax_plug``: a JSON header (``orbax.checkpoint.args.JsonSave``) with the plan
  fingerprint, the registry (plugin set) fingerprint and the plan's content for a
  readable diff, every leaf's path, dtype, shape and SHA-256 of its bytes, the
  parameters' container skeleton, the library and JAX versions and the user's
  ``metadata``.

The directory opens with Orbax's own API (``ocp.Checkpointer(
ocp.CompositeCheckpointHandler()).restore(path)``, or ``ocp.StandardCheckpointer()``
on ``path / "state"``).

Writes are atomic: Orbax writes into a fresh private directory beside ``path``
(``mkdtemp``: unique name, mode 0700, nothing followed), every file and directory is
``fsync``-ed, and the finished checkpoint is swapped in with one ``rename``
(``renameat2(RENAME_EXCHANGE)`` on Linux when an older checkpoint is there). So a
crash mid-save leaves the previous checkpoint intact, concurrent saves to one path
leave one complete winner, and ``save`` never writes through a symbolic link nor
replaces anything that is not a somax_plug checkpoint.

:func:`restore` reads the header first, refuses another plan (naming both plan
fingerprints and what differs) or another plugin set (naming both registry
fingerprints; ``allow_plugin_change=True`` accepts it), then checks every stored
array's path, shape and dtype against the method's state spec
(:meth:`~somax_plug.Method.state_spec`) *before* reading any array, and every
restored array's bytes against its SHA-256. Any corrupt, truncated or hand-edited
checkpoint raises :class:`~somax_plug.CheckpointError`, never a raw ``KeyError``
or ``EOFError``.

Resuming is exact: ``N`` steps, save, restore into a fresh method built from the
same composition, ``N`` more steps gives bitwise the parameters, state and info
of ``2N`` uninterrupted steps (same device kind and JAX version).

Orbax is an optional dependency: ``pip install 'somax-plug[checkpoint]'``.

Example:
    >>> import jax, jax.numpy as jnp, tempfile, os
    >>> from somax_plug import compose, checkpoint
    >>> method = compose("ggn", "cg", predict_fn=lambda p, x: x @ p, loss="mse")
    >>> params = jnp.zeros(3)
    >>> state = method.init(params)
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt")
    >>> _ = checkpoint.save(path, params, state, method)
    >>> params2, state2 = checkpoint.restore(path, method)
    >>> bool((params2 == params).all())
    True
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import gc
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from somax_plug._src.errors import CheckpointError

PyTree = Any

FORMAT = 2
HEADER_ITEM = "somax_plug"
_ITEMS = ("params", "state", HEADER_ITEM)
_HEADER_FILE = "metadata"  # JsonCheckpointHandler's file inside the item directory
_MAX_HEADER_BYTES = 64 << 20
_INSTALL = "pip install 'somax-plug[checkpoint]'  (or: pip install orbax-checkpoint)"

__all__ = [
    "FORMAT",
    "adopt",
    "describe",
    "plan_content_fingerprint",
    "read_header",
    "restore",
    "save",
]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep Orbax's background noise off stderr while a failure is turned into our error.

    When TensorStore fails on a corrupt file, Orbax's worker coroutines and futures
    report the same failure again as "Exception ignored" / "Future exception was never
    retrieved" tracebacks; the caller gets one :class:`CheckpointError` instead.
    """
    loggers = [logging.getLogger(n) for n in ("asyncio", "concurrent.futures", "absl")]
    levels = [lg.level for lg in loggers]
    hook, stderr = sys.unraisablehook, sys.stderr
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    sys.unraisablehook = lambda _unraisable: None
    failed = True
    try:
        yield
        failed = False
    finally:
        if failed:  # Orbax's other workers finish failing on their own threads
            sys.stderr = io.StringIO()
            time.sleep(0.25)
            gc.collect()  # their abandoned futures report now, while the hook is silent
        sys.stderr = stderr
        sys.unraisablehook = hook
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _ocp() -> Any:
    try:
        import orbax.checkpoint as ocp
    except ImportError as exc:
        raise CheckpointError(
            f"checkpoints need Orbax, which is not installed ({exc}); install it with {_INSTALL}"
        ) from None
    return ocp


def _processes() -> int:
    return jax.process_count()


def _checkpointer(ocp: Any) -> Any:
    """Orbax's checkpointer; in a multi-process run, one that acts in this process alone.

    Every process then reads (and process 0 alone writes) on its own, with no
    Orbax barrier between processes: :func:`save` synchronises them itself.
    """
    if _processes() == 1:
        return ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    me = jax.process_index()
    mp = ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"somax_plug_p{me}"
    )
    handler = ocp.CompositeCheckpointHandler(
        composite_options=ocp.CompositeOptions(multiprocessing_options=mp),
        params=ocp.StandardCheckpointHandler(multiprocessing_options=mp),
        state=ocp.StandardCheckpointHandler(multiprocessing_options=mp),
        **{HEADER_ITEM: ocp.JsonCheckpointHandler(multiprocessing_options=mp)},
    )
    return ocp.Checkpointer(handler, multiprocessing_options=mp)


def _local_copy(tree: PyTree, name: str) -> PyTree:
    """Every array as a NumPy copy in this process (for process 0's write).

    A replicated leaf is this process's own copy; a leaf split across processes is
    gathered (``process_allgather``, a collective: every process calls this, in the
    same order). Orbax refuses process-local ``jax.Array`` s in a multi-process run,
    and a PRNG key array has no NumPy form, so a key leaf is refused here.
    """
    from somax_plug._src.distributed import to_host

    def one(path: Any, x: Any) -> Any:
        if _is_key(x):
            raise CheckpointError(
                f"{name}{jax.tree_util.keystr(path)} is a PRNG key array, which a "
                "multi-process save cannot write; keep its jax.random.key_data (uint32) "
                "in the state instead, or save from a single-process run"
            )
        return to_host(x) if isinstance(x, jax.Array) else x

    return jax.tree_util.tree_map_with_path(one, tree)


def _as_process_0(path: Path, write: Any) -> None:
    """Run ``write()`` in process 0 only; every process returns when it is done, or raises."""
    from jax.experimental import multihost_utils

    error = ""
    if jax.process_index() == 0:
        try:
            write()
        except CheckpointError as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 (reported to every process below)
            error = f"{type(exc).__name__}: {exc}"
    code = np.frombuffer(error.encode("utf-8")[:2000].ljust(2000, b"\0"), np.uint8)
    seen = bytes(np.asarray(multihost_utils.broadcast_one_to_all(code))).rstrip(b"\0")
    if seen:
        raise CheckpointError(
            f"process 0 of {_processes()} could not write checkpoint {str(path)!r}: "
            f"{seen.decode('utf-8', 'replace')}"
        )


# ------------------------------------------------------------------- the plan
def _plan_content(plan: Any) -> dict[str, Any]:
    body = dict(plan.to_dict_without_fingerprint())
    body.pop("registry", None)
    return json.loads(json.dumps(body, sort_keys=True, default=repr))


def plan_content_fingerprint(plan: Any) -> str:
    """Hash of the plan *without* the registry fingerprint (components, resources, loss)."""
    blob = json.dumps(_plan_content(plan), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def describe(method: Any) -> dict[str, Any]:
    """The plan identity of ``method`` as JSON: format, the three fingerprints, the plan.

    Save it beside a state in your own ``orbax.checkpoint.CheckpointManager``
    (``ocp.args.JsonSave(checkpoint.describe(method))``) and give it back to
    :func:`adopt` as ``described=`` to have a restore under another plan or plugin set
    refused as :func:`restore` refuses it.

    Example:
        >>> from somax_plug import compose, checkpoint
        >>> m = compose("ggn", "cg", predict_fn=lambda p, x: x @ p, loss="mse")
        >>> sorted(checkpoint.describe(m))[:3]
        ['format', 'plan', 'plan_content_fingerprint']
    """
    plan = method.plan
    return {
        "format": FORMAT,
        "plan_fingerprint": plan.fingerprint,
        "registry_fingerprint": plan.registry_fingerprint,
        "plan_content_fingerprint": plan_content_fingerprint(plan),
        "plan": _plan_content(plan),
    }


def _component_line(c: dict[str, Any]) -> str:
    opts = ", ".join(f"{k}={v!r}" for k, v in sorted(c.get("options", {}).items()))
    cadence = f" every {c['every_k']} steps" if c.get("every_k", 1) != 1 else ""
    return f"{c['name']}{cadence}" + (f" ({opts})" if opts else "")


def _plan_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Readable differences between two plan contents (checkpoint -> this method)."""
    lines = []
    try:
        old_c = {c["role"]: c for c in old.get("components", [])}
    except (TypeError, KeyError, AttributeError):
        return ["(the checkpoint's plan content is not readable)"]
    new_c = {c["role"]: c for c in new.get("components", [])}
    for role in list(old_c) + [r for r in new_c if r not in old_c]:
        a, b = old_c.get(role), new_c.get(role)
        if a == b:
            continue
        try:
            left = _component_line(a) if a else "(none)"
        except (TypeError, KeyError, AttributeError):
            left = repr(a)[:200]
        right = _component_line(b) if b else "(none)"
        if left == right:  # same name/options/cadence: the declarations differ
            left, right = (
                f"{_component_line(c)} [{c.get('plugin')}: provides {c.get('provides')}, "
                f"requires {c.get('requires')}]"
                for c in (a, b)
            )
        lines.append(f"{role}: {left} -> {right}")
    for key in ("loss", "unplanned"):
        if old.get(key) != new.get(key):
            lines.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    if not lines and old.get("resources") != new.get("resources"):
        try:
            old_r = {r["name"]: r for r in old.get("resources", [])}
        except (TypeError, KeyError, AttributeError):
            old_r = {}
        new_r = {r["name"]: r for r in new.get("resources", [])}
        for name in sorted(set(old_r) | set(new_r)):
            a, b = old_r.get(name), new_r.get(name)
            if a != b:
                lines.append(
                    f"resource {name}: "
                    + (f"every {a.get('every_k')} steps" if a else "(absent)")
                    + " -> "
                    + (f"every {b['every_k']} steps" if b else "(absent)")
                )
    return lines or ["(the plans' contents differ)"]


def _check_plan(header: dict[str, Any], plan: Any, where: str, allow_plugin_change: bool) -> None:
    old_fp, new_fp = header["plan_fingerprint"], plan.fingerprint
    old_reg, new_reg = header["registry_fingerprint"], plan.registry_fingerprint
    same_content = header["plan_content_fingerprint"] == plan_content_fingerprint(plan)
    if old_fp == new_fp and old_reg == new_reg and same_content:
        return
    msg = (
        f"{where} was written for plan {old_fp} (registry {old_reg}); "
        f"this method has plan {new_fp} (registry {new_reg})"
    )
    if not same_content:
        diff = "; ".join(_plan_diff(header["plan"], _plan_content(plan)))
        raise CheckpointError(
            f"{msg}. The plans differ: {diff}. Restore with a method composed like the "
            "one that wrote it"
        )
    if old_reg != new_reg and not allow_plugin_change:
        raise CheckpointError(
            f"{msg}. The plan components are the same, but the plugin set (registry "
            "fingerprint) differs: plugins were added, removed or upgraded. If that is "
            "intended, restore with allow_plugin_change=True"
        )
    if old_reg == new_reg:  # same content and plugins but another plan fingerprint
        raise CheckpointError(
            f"{msg}. The plan contents and plugin sets agree but the plan fingerprints do "
            "not: the checkpoint's header is inconsistent (edited by hand?)"
        )


# ------------------------------------------------------------------- leaves
def _is_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _key_parts(path: tuple) -> tuple[str, ...]:
    """A pytree key path as strings (how Orbax nests names: dict keys, fields, indices)."""
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
        else:
            out.append(str(k))
    return tuple(out)


def _stored_form(spec: Any) -> tuple[list[int], str]:
    """(shape, dtype) of how a leaf is stored: PRNG keys as their uint32 key data."""
    if _is_key(spec):
        spec = jax.eval_shape(jax.random.key_data, spec)
    return [int(d) for d in spec.shape], str(np.dtype(spec.dtype))


def _spec(x: Any) -> jax.ShapeDtypeStruct:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype)


def _host_bytes(x: Any, where: str) -> bytes:
    if _is_key(x):
        x = jax.random.key_data(x)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if not x.is_fully_replicated:
            raise CheckpointError(
                f"{where} is sharded across processes; gather it first "
                "(jax.experimental.multihost_utils.process_allgather) or save per process"
            )
        x = x.addressable_data(0)
    return np.ascontiguousarray(np.asarray(x)).tobytes()


def _leaf_for_saving(x: Any, where: str) -> Any:
    if isinstance(x, jax.Array):
        return x
    try:
        arr = np.asarray(x)
    except Exception as exc:  # noqa: BLE001 (any object can fail to convert)
        raise CheckpointError(f"{where} is not an array ({type(x).__name__}): {exc}") from None
    if arr.dtype.kind not in "biufcV" and arr.dtype.name != "bfloat16":
        raise CheckpointError(
            f"{where} is a {type(x).__name__} of dtype {arr.dtype}; a checkpoint holds "
            "numeric arrays only (no objects, no strings)"
        )
    return arr


def _describe_leaves(tree: PyTree, name: str) -> tuple[PyTree, dict[str, Any]]:
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    leaves, metas = [], []
    for path, x in with_path:
        where = f"{name}{jax.tree_util.keystr(path)}"
        x = _leaf_for_saving(x, where)
        shape, dtype = _stored_form(_spec(x))
        meta = {
            "path": jax.tree_util.keystr(path),
            "dtype": str(x.dtype),
            "shape": list(np.shape(x)),
            "stored": {"dtype": dtype, "shape": shape},
            "sha256": hashlib.sha256(_host_bytes(x, where)).hexdigest(),
        }
        if _is_key(x):
            meta["key_impl"] = str(jax.random.key_impl(x))
        leaves.append(x)
        metas.append(meta)
    return jax.tree_util.tree_unflatten(treedef, leaves), {
        "treedef": _treedef_text(treedef),
        "leaves": metas,
    }


_WRAP = "value"


def _is_bare(tree: PyTree) -> bool:
    """A tree that is a single array (no container around it)."""
    return tree is not None and jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(tree))


def _treedef_text(treedef: Any) -> str:
    import re

    return re.sub(r" at 0x[0-9a-fA-F]+", "", str(treedef))


def _skeleton(tree: PyTree, counter: list[int]) -> Any:
    """A JSON description of plain containers (dict/list/tuple/None) with leaf slots."""
    if tree is None:
        return {"none": None}
    if type(tree) is dict:
        if not all(isinstance(k, str) for k in tree):
            raise TypeError("non-string dict keys")
        # numbered in jax's flattening order (sorted keys), like the stored leaves
        return {"dict": {k: _skeleton(tree[k], counter) for k in sorted(tree)}}
    if type(tree) in (list, tuple):
        return {type(tree).__name__: [_skeleton(v, counter) for v in tree]}
    if jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(tree)):
        counter[0] += 1
        return {"leaf": counter[0] - 1}
    raise TypeError(f"custom pytree node {type(tree).__name__}")


def _from_skeleton(skel: Any, leaves: list[Any], depth: int = 0) -> PyTree:
    if depth > 200:
        raise ValueError("nested more than 200 levels deep")
    if not isinstance(skel, dict) or len(skel) != 1:
        raise ValueError(f"a node must be a one-key object, got {type(skel).__name__}")
    ((kind, value),) = skel.items()
    if kind == "none":
        return None
    if kind == "leaf":
        if type(value) is not int or not 0 <= value < len(leaves):
            raise ValueError(f"leaf index {value!r} is not in 0..{len(leaves) - 1}")
        return leaves[value]
    if kind == "dict" and isinstance(value, dict):
        return {k: _from_skeleton(v, leaves, depth + 1) for k, v in value.items()}
    if kind in ("list", "tuple") and isinstance(value, list):
        items = [_from_skeleton(v, leaves, depth + 1) for v in value]
        return tuple(items) if kind == "tuple" else items
    raise ValueError(f"unknown node kind {kind!r} (expected none, leaf, dict, list or tuple)")


# ------------------------------------------------------------------ the header
def _bad(where: str, what: str) -> CheckpointError:
    return CheckpointError(
        f"{where} is corrupt or was edited by hand: {what}. Restore an intact copy, or "
        "write a new checkpoint with somax_plug.checkpoint.save"
    )


def _expect(obj: dict, key: str, kind: type | tuple, where: str, ctx: str) -> Any:
    if key not in obj:
        raise _bad(where, f"the header's {ctx} has no key {key!r}")
    value = obj[key]
    names = " or ".join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))
    if (
        not isinstance(value, kind)
        or isinstance(value, bool)
        and bool not in (kind if isinstance(kind, tuple) else (kind,))
    ):
        raise _bad(
            where,
            f"the header's {ctx}[{key!r}] is a JSON {type(value).__name__}, expected {names}",
        )
    return value


def _check_leaf_meta(meta: Any, where: str, ctx: str) -> None:
    if not isinstance(meta, dict):
        raise _bad(where, f"{ctx} is a JSON {type(meta).__name__}, expected an object")
    _expect(meta, "path", str, where, ctx)
    _expect(meta, "dtype", str, where, ctx)
    shape = _expect(meta, "shape", list, where, ctx)
    stored = _expect(meta, "stored", dict, where, ctx)
    sha = _expect(meta, "sha256", str, where, ctx)
    for s in (shape, _expect(stored, "shape", list, where, ctx + "['stored']")):
        if not all(type(d) is int and d >= 0 for d in s):
            raise _bad(where, f"{ctx} has shape {s!r}, expected non-negative integers")
    _expect(stored, "dtype", str, where, ctx + "['stored']")
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise _bad(where, f"{ctx}['sha256'] is not a SHA-256 hex digest")
    if "key_impl" in meta:
        _expect(meta, "key_impl", str, where, ctx)


def _header_digest(header: dict[str, Any]) -> str:
    body = {k: v for k, v in header.items() if k != "header_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _validate_header(header: Any, where: str) -> dict[str, Any]:
    if not isinstance(header, dict):
        raise _bad(where, f"the header is a JSON {type(header).__name__}, expected an object")
    if header.get("format") == FORMAT:
        digest = _expect(header, "header_sha256", str, where, "top level")
        if digest != _header_digest(header):
            raise _bad(where, "the header does not match its own SHA-256 (header_sha256)")
    fmt = header.get("format")
    if fmt != FORMAT:
        raise CheckpointError(
            f"{where} has checkpoint format {fmt!r}; this version reads format {FORMAT} "
            "(an Orbax directory written by somax_plug.checkpoint.save)"
        )
    for key in ("plan_fingerprint", "registry_fingerprint", "plan_content_fingerprint"):
        _expect(header, key, str, where, "top level")
    _expect(header, "plan", dict, where, "top level")
    _expect(header, "versions", dict, where, "top level")
    _expect(header, "metadata", dict, where, "top level")
    for name in ("params", "state"):
        part = _expect(header, name, dict, where, "top level")
        _expect(part, "treedef", str, where, name)
        leaves = _expect(part, "leaves", list, where, name)
        for i, meta in enumerate(leaves):
            _check_leaf_meta(meta, where, f"{name}['leaves'][{i}]")
    if not isinstance(header["params"].get("wrapped", False), bool):
        raise _bad(where, "the header's params['wrapped'] is not a JSON boolean")
    if "skeleton" not in header["params"]:
        raise _bad(where, "the header's params has no key 'skeleton'")
    return header


def _read_header(path: Path) -> dict[str, Any]:
    where = f"checkpoint {str(path)!r}"
    _check_is_checkpoint(path)
    file = path / HEADER_ITEM / _HEADER_FILE
    try:
        if file.is_symlink() or not file.is_file():
            raise _bad(where, f"{HEADER_ITEM}/{_HEADER_FILE} is missing or not a file")
        size = file.stat().st_size
        if size > _MAX_HEADER_BYTES:
            raise _bad(where, f"the header is {size} bytes (more than {_MAX_HEADER_BYTES})")
        header = json.loads(file.read_bytes().decode("utf-8"))
    except CheckpointError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _bad(where, f"its JSON header does not read ({type(exc).__name__}: {exc})") from None
    return _validate_header(header, where)


def _what_file(path: Path) -> str:
    """A short description of a file that is not a checkpoint (reads 8 bytes, never loads)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        return f"a file that cannot be read ({exc.strerror or exc})"
    if head.startswith(b"PK"):
        return "a zip file (an old .npz checkpoint of somax_plug 0.1?)"
    if head.startswith(b"\x93NUMPY"):
        return "a NumPy .npy file"
    return "a file"


def _sniff(path: Path) -> str:
    what = _what_file(path)
    if what.startswith("a zip file"):
        return (
            "it is a zip file, probably a checkpoint in the old .npz format of somax_plug "
            "0.1 (format 1), which this version does not read. Resume it with somax_plug "
            "0.1 and save again with this version (a checkpoint is now an Orbax directory)"
        )
    return f"it is {what}, not a checkpoint; a somax_plug checkpoint is an Orbax directory"


def _check_is_checkpoint(path: Path) -> None:
    where = f"checkpoint {str(path)!r}"
    if not os.path.lexists(path):
        hint = _interrupted_hint(path)
        raise CheckpointError(f"{where} does not exist{hint}")
    if path.is_symlink() and not path.exists():
        raise CheckpointError(
            f"{where} is a symbolic link to {os.readlink(path)!r}, which does not exist or "
            "loops; point it at a checkpoint directory"
        )
    if not path.is_dir():
        raise CheckpointError(f"{str(path)!r} is not a somax_plug checkpoint: {_sniff(path)}")
    if not (path / HEADER_ITEM).is_dir():
        present = sorted(p.name for p in path.iterdir())[:8]
        raise CheckpointError(
            f"{str(path)!r} is not a somax_plug checkpoint: it has no {HEADER_ITEM!r} item "
            f"(it holds {present}); a checkpoint written by somax_plug.checkpoint.save has "
            f"the items {list(_ITEMS)}"
        )


def _interrupted_hint(path: Path) -> str:
    parent = path.parent
    try:
        found = sorted(parent.glob(f".{path.name}.tmp-*/previous"))
    except OSError:
        return ""
    if not found:
        return ""
    return (
        f"; a save was interrupted while swapping checkpoints: the previous checkpoint "
        f"is intact at {str(found[-1])!r}; move it back to {str(path)!r}"
    )


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a checkpoint (fingerprints, plan, leaves, versions, metadata).

    Reads no array. Raises :class:`~somax_plug.CheckpointError` if ``path`` is not a
    checkpoint or its header is corrupt.
    """
    return _read_header(Path(path))


# ------------------------------------------------------------------ save
def _fsync(path: Path) -> None:
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            _fsync(Path(dirpath) / f)
        _fsync(Path(dirpath))


# Orbax's checkpointers share event loops and TensorStore contexts within a process,
# and ``_quiet`` swaps process-wide hooks: saves and restores from several threads of
# one process take turns (processes need no lock: each save writes its own private
# directory and installs it with one atomic rename)
_ORBAX_LOCK = threading.RLock()

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> None:
    """Atomically swap two directory entries (Linux ``renameat2``); OSError if unsupported."""
    if not sys.platform.startswith("linux"):
        raise OSError(errno.ENOSYS, "renameat2 is Linux-only")
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        raise OSError(errno.ENOSYS, "this C library has no renameat2")
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _is_replaceable(path: Path) -> bool:
    """An empty directory or a somax_plug checkpoint (never a link, file or other data)."""
    if path.is_symlink() or not path.is_dir():
        return False
    entries = {p.name for p in path.iterdir()}
    return (
        not entries
        or HEADER_ITEM in entries
        and entries
        <= set(_ITEMS)
        | {
            "_CHECKPOINT_METADATA",
            "commit_success.txt",
            "_METADATA",
        }
    )


def _refuse_target(path: Path) -> None:
    if path.is_symlink():
        raise CheckpointError(
            f"{str(path)!r} is a symbolic link (to {os.readlink(path)!r}); save does not "
            "follow or replace links: pass the real path"
        )
    if os.path.lexists(path) and not _is_replaceable(path):
        kind = (
            "a directory that is not a somax_plug checkpoint" if path.is_dir() else _what_file(path)
        )
        raise CheckpointError(
            f"{str(path)!r} exists and is {kind}; save replaces only an earlier "
            "checkpoint (or an empty directory): choose another path or remove it"
        )


def _install(staged: Path, path: Path, tmp: Path) -> None:
    """Move ``staged`` to ``path``; an earlier checkpoint there ends up in ``tmp``."""
    for _ in range(8):
        _refuse_target(path)
        if not os.path.lexists(path):
            try:
                os.rename(staged, path)  # atomic; fails if another save got there first
                return
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR):
                    raise
                continue
        try:
            _exchange(staged, path)  # the old checkpoint is now at ``staged``
            return
        except OSError as exc:
            if exc.errno == errno.ENOENT:  # it went away meanwhile: retry
                continue
            if exc.errno not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
        # no atomic exchange here: move the old one aside, then the new one in
        previous = tmp / "previous"
        try:
            os.rename(path, previous)
        except FileNotFoundError:
            continue
        try:
            os.rename(staged, path)
        except BaseException:
            os.rename(previous, path)  # put the old one back
            raise
        return
    raise CheckpointError(
        f"could not install the checkpoint at {str(path)!r}: other processes kept "
        "replacing it; save to distinct paths"
    )


def _check_state_matches(method: Any, params: PyTree, state: PyTree) -> None:
    try:
        expected = method.state_spec(params)
    except Exception as exc:  # noqa: BLE001 (the user's params may not fit the model)
        raise CheckpointError(
            f"cannot compute the state spec of this method for these params: {exc}"
        ) from None
    _compare_trees("state", expected, state, "the state to save", "this method's init")


def _compare_trees(name: str, expected: PyTree, got: PyTree, got_what: str, exp_what: str):
    e_paths, e_def = jax.tree_util.tree_flatten_with_path(expected)
    g_paths, g_def = jax.tree_util.tree_flatten_with_path(got)
    if e_def != g_def:
        raise CheckpointError(
            f"{got_what}: the {name} structure differs from {exp_what}:\n"
            f"  found:    {_treedef_text(g_def)}\n  expected: {_treedef_text(e_def)}"
        )
    for (p, e), (_, g) in zip(e_paths, g_paths, strict=True):
        es, gs = _spec(e), _spec(g)
        if es.shape != gs.shape or es.dtype != gs.dtype:
            raise CheckpointError(
                f"{got_what}: {name}{jax.tree_util.keystr(p)} is {gs.dtype}{list(gs.shape)} "
                f"but {exp_what} has {es.dtype}{list(es.shape)}"
            )


def save(
    path: str | os.PathLike,
    params: PyTree,
    state: PyTree,
    method: Any,
    *,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``params`` and ``state`` of ``method`` to the Orbax directory ``path``, atomically.

    Args:
        path: the checkpoint directory (created; an earlier checkpoint there is replaced
            atomically; a link, a file or any other directory is refused).
        params, state: what :meth:`~somax_plug.Method.step` returned; ``state`` must
            have the structure, shapes and dtypes of ``method.init(params)``.
        method: the :class:`~somax_plug.Method` they belong to.
        metadata: a dict of JSON values (epoch, data position, ...), returned by
            :func:`read_header` under ``"metadata"``.

    Returns:
        ``Path(path)``.

    In a multi-process run (``jax.distributed``), call it in *every* process, with
    the same arguments, as every other step of the program: leaves split across
    processes are gathered (a collective), replicated ones read from this process's
    copy; process 0 writes the checkpoint (``path`` must be on a file system that every
    process that restores can read) and every process returns once it is complete,
    or raises the same :class:`CheckpointError`.
    """
    ocp = _ocp()
    path = Path(path)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, Mapping) or not all(isinstance(k, str) for k in metadata):
        raise CheckpointError(
            f"metadata must be a dict with string keys and JSON values, got "
            f"{type(metadata).__name__}"
        )
    try:
        metadata = json.loads(json.dumps(dict(metadata), allow_nan=False))
    except (TypeError, ValueError, RecursionError) as exc:
        raise CheckpointError(
            f"metadata must be JSON-serialisable (no NaN/inf, no objects): {exc}"
        ) from None
    _refuse_target(path)
    _check_state_matches(method, params, state)
    multi = _processes() > 1
    if multi:
        params, state = _local_copy(params, "params"), _local_copy(state, "state")
    params_tree, p_header = _describe_leaves(params, "params")
    # Orbax's StandardSave takes containers only: a bare array is stored as {"value": x}
    p_header["wrapped"] = _is_bare(params_tree)
    if p_header["wrapped"]:
        params_tree = {_WRAP: params_tree}
    state_tree, s_header = _describe_leaves(state, "state")
    try:
        p_header["skeleton"] = _skeleton(params, [0])
    except TypeError:
        p_header["skeleton"] = None
    import somax_plug

    header = {
        **describe(method),
        "params": p_header,
        "state": s_header,
        "versions": {
            "somax_plug": somax_plug.__version__,
            "jax": jax.__version__,
            "orbax_checkpoint": getattr(ocp, "__version__", "?"),
        },
        "metadata": metadata,
    }
    header["header_sha256"] = _header_digest(header)
    if multi:
        _as_process_0(path, lambda: _write(ocp, path, params_tree, state_tree, header))
    else:
        _write(ocp, path, params_tree, state_tree, header)
    return path


def _write(ocp: Any, path: Path, params_tree: PyTree, state_tree: PyTree, header: dict) -> None:
    """Stage the Orbax checkpoint in a private directory, fsync it, swap it in."""
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=parent))
    except OSError as exc:
        raise CheckpointError(f"cannot write a checkpoint in {str(parent)!r}: {exc}") from None
    try:
        staged = tmp / "checkpoint"
        with _ORBAX_LOCK:
            checkpointer = _checkpointer(ocp)
            try:
                with _quiet():
                    checkpointer.save(
                        staged,
                        ocp.args.Composite(
                            params=ocp.args.StandardSave(params_tree),
                            state=ocp.args.StandardSave(state_tree),
                            **{HEADER_ITEM: ocp.args.JsonSave(header)},
                        ),
                    )
            finally:
                checkpointer.close()
            _fsync_tree(staged)
            _install(staged, path, tmp)
        _fsync(parent)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 (Orbax and the OS raise many kinds)
        raise CheckpointError(
            f"could not write checkpoint {str(path)!r} ({type(exc).__name__}: {exc}); "
            "any earlier checkpoint there is unchanged"
        ) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------ restore
def _stored_arrays(ocp: Any, path: Path, where: str) -> dict[str, dict[tuple, Any]]:
    """Orbax's own record of every stored array: item -> key path -> (shape, dtype)."""
    out = {}
    for item in ("params", "state"):
        if not (path / item).is_dir():
            raise _bad(where, f"the Orbax item {item!r} is missing")
        # Orbax's JSON side files, read by Orbax's worker threads in the middle of a
        # restore: a broken one is refused here, before any thread starts
        side = [path / item / "_METADATA"]
        if (path / item / "array_metadatas").is_dir():
            side += sorted((path / item / "array_metadatas").iterdir())
        for file in side:
            try:
                if file.stat().st_size > _MAX_HEADER_BYTES:
                    raise ValueError(f"{file.stat().st_size} bytes")
                json.loads(file.read_bytes().decode("utf-8"))
            except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
                rel = file.relative_to(path)
                raise _bad(
                    where, f"Orbax's {rel} does not read ({type(exc).__name__}: {exc})"
                ) from None
        handler = ocp.StandardCheckpointHandler()
        try:
            with _quiet():
                out[item] = _stored_table(handler.metadata(path / item))
        except Exception as exc:  # noqa: BLE001 (Orbax raises many kinds on bad metadata)
            raise _bad(
                where,
                f"Orbax cannot read the array metadata of {item!r} ({type(exc).__name__}: {exc})",
            ) from None
        finally:
            handler.close()
    return out


def _check_against(
    name: str,
    expected: PyTree,
    stored_header: dict[str, Any],
    stored_arrays: dict[tuple, Any],
    where: str,
    source: str,
) -> None:
    """Every expected leaf must be stored, with its shape and dtype, in header and Orbax."""
    prefix = (_WRAP,) if stored_header.get("wrapped") else ()
    with_path, treedef = jax.tree_util.tree_flatten_with_path(expected)
    if _treedef_text(treedef) != stored_header["treedef"] or len(with_path) != len(
        stored_header["leaves"]
    ):
        raise CheckpointError(
            f"{where}: the {name} structure differs from this method's:\n"
            f"  saved: {stored_header['treedef']}\n  here:  {_treedef_text(treedef)}"
        )
    if len(stored_arrays) != len(with_path):
        raise _bad(
            where,
            f"Orbax holds {len(stored_arrays)} {name} arrays but the header lists {len(with_path)}",
        )
    for (p, spec), meta in zip(with_path, stored_header["leaves"], strict=True):
        leaf = f"{name}{jax.tree_util.keystr(p)}"
        if meta["path"] != jax.tree_util.keystr(p):
            raise _bad(where, f"the header lists {name}{meta['path']} where {leaf} belongs")
        want = _stored_form(spec)
        key_note = " (a PRNG key array, stored as its uint32 key data)" if _is_key(spec) else ""
        found = stored_arrays.get(prefix + _key_parts(p))
        if found is None:
            raise _bad(where, f"the array for {leaf} is missing")
        if meta["shape"] != [int(d) for d in spec.shape] or meta["dtype"] != str(spec.dtype):
            raise CheckpointError(
                f"{where}: {leaf}: expected {spec.dtype}{list(spec.shape)} ({source}), found "
                f"{meta['dtype']}{meta['shape']} (the checkpoint header lists that)"
            )
        header_form = (meta["stored"]["shape"], meta["stored"]["dtype"])
        for what, got in (("holds", tuple(found)), ("header lists", header_form)):
            if list(got[0]) != want[0] or got[1] != want[1]:
                x64 = ""
                if "64" in got[1] and "32" in want[1] and not jax.config.jax_enable_x64:
                    x64 = (
                        "; it was written with 64-bit types: enable "
                        "jax.config.update('jax_enable_x64', True) before restoring"
                    )
                raise CheckpointError(
                    f"{where}: {leaf}{key_note}: expected {want[1]}{want[0]} ({source}), "
                    f"found {got[1]}{list(got[0])} (the checkpoint {what} that){x64}"
                )


def _params_spec(header: dict[str, Any], params_like: PyTree, where: str) -> PyTree:
    p_meta = header["params"]
    if params_like is not None:
        return jax.tree_util.tree_map(_spec, params_like)
    if p_meta["skeleton"] is None:
        raise CheckpointError(
            f"{where}: the parameters use custom pytree nodes "
            f"({p_meta['treedef']}); pass params_like= (the initial parameters) to restore"
        )
    specs = []
    for m in p_meta["leaves"]:
        try:
            if "key_impl" in m:
                data = jax.ShapeDtypeStruct(tuple(m["stored"]["shape"]), np.uint32)
                impl = m["key_impl"]
                spec = jax.eval_shape(lambda d, i=impl: jax.random.wrap_key_data(d, impl=i), data)
            else:
                spec = jax.ShapeDtypeStruct(tuple(m["shape"]), np.dtype(m["dtype"]))
        except Exception as exc:  # noqa: BLE001 (a hand-edited dtype or impl name)
            raise _bad(where, f"params{m['path']} has dtype {m['dtype']!r}: {exc}") from None
        if "64" in m["dtype"] and not jax.config.jax_enable_x64:
            raise CheckpointError(
                f"{where}: params{m['path']} was saved as {m['dtype']}; enable "
                "jax.config.update('jax_enable_x64', True) before restoring 64-bit checkpoints"
            )
        specs.append(spec)
    try:
        return _from_skeleton(p_meta["skeleton"], specs)
    except (ValueError, RecursionError) as exc:
        raise _bad(where, f"the parameters' skeleton does not read: {exc}") from None


def _check_digests(name: str, tree: PyTree, stored_header: dict[str, Any], where: str) -> None:
    for (p, x), meta in zip(
        jax.tree_util.tree_flatten_with_path(tree)[0], stored_header["leaves"], strict=True
    ):
        leaf = f"{name}{jax.tree_util.keystr(p)}"
        if hashlib.sha256(_host_bytes(x, leaf)).hexdigest() != meta["sha256"]:
            raise _bad(where, f"the bytes of {leaf} do not match their SHA-256 in the header")


def restore(
    path: str | os.PathLike,
    method: Any,
    *,
    params_like: PyTree = None,
    allow_plugin_change: bool = False,
) -> tuple[PyTree, PyTree]:
    """Read ``(params, state)`` written by :func:`save`, for ``method``.

    Args:
        path: the checkpoint directory.
        method: a :class:`~somax_plug.Method` built from the same composition
            (same plan); it need not have been initialised.
        params_like: parameters (or ``jax.ShapeDtypeStruct`` s) with the saved
            structure; needed only for parameters with custom pytree nodes (plain
            dicts, lists and tuples are rebuilt from the header).
        allow_plugin_change: accept a checkpoint written under another plugin set
            (registry fingerprint) when the plan itself is the same.

    Returns:
        ``(params, state)`` ready for :meth:`~somax_plug.Method.step` (adopted with
        :meth:`~somax_plug.Method.resume`).

    In a multi-process run, call it in every process: each reads the checkpoint on its
    own (no Orbax barrier) and :meth:`~somax_plug.Method.resume` lays the arrays out
    over the method's global mesh.

    Raises:
        CheckpointError: another plan or plugin set; a structure, shape or dtype that
            differs from the method's state spec (naming the leaf, expected and found);
            bytes that do not match their digest; not a checkpoint, or a corrupt one.
    """
    ocp = _ocp()
    path = Path(path)
    where = f"checkpoint {str(path)!r}"
    header = _read_header(path)
    _check_plan(header, method.plan, where, allow_plugin_change)
    params_spec = _params_spec(header, params_like, where)
    try:
        state_spec = method.state_spec(params_spec)
    except Exception as exc:  # noqa: BLE001 (params_like may not fit the model)
        raise CheckpointError(
            f"{where}: cannot compute this method's state spec for the saved parameters: {exc}"
        ) from None
    with _ORBAX_LOCK:
        return _restore_checked(
            ocp, method, path, where, header, params_spec, state_spec, params_like
        )


def _restore_checked(
    ocp: Any,
    method: Any,
    path: Path,
    where: str,
    header: dict[str, Any],
    params_spec: PyTree,
    state_spec: PyTree,
    params_like: PyTree,
) -> tuple[PyTree, PyTree]:
    """The part of :func:`restore` that runs Orbax: shape/dtype checks, read, digests."""
    stored = _stored_arrays(ocp, path, where)
    p_source = "params_like" if params_like is not None else "the parameters' header"
    _check_against("params", params_spec, header["params"], stored["params"], where, p_source)
    _check_against(
        "state", state_spec, header["state"], stored["state"], where, "this method's state spec"
    )
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    placed = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
        (params_spec, state_spec),
    )
    wrapped = header["params"].get("wrapped", False)
    checkpointer = _checkpointer(ocp)
    try:
        with _quiet():
            restored = checkpointer.restore(
                path,
                ocp.args.Composite(
                    params=ocp.args.StandardRestore({_WRAP: placed[0]} if wrapped else placed[0]),
                    state=ocp.args.StandardRestore(placed[1]),
                ),
            )
        params, state = restored["params"], restored["state"]
        if wrapped:
            params = params[_WRAP]
    except Exception as exc:  # noqa: BLE001 (Orbax/TensorStore raise many kinds)
        raise _bad(where, f"Orbax cannot read its arrays ({type(exc).__name__}: {exc})") from None
    finally:
        checkpointer.close()
    try:
        _compare_trees("params", params_spec, params, where, "the expected parameters")
        _compare_trees("state", state_spec, state, where, "this method's state spec")
    except CheckpointError as exc:
        raise _bad(where, str(exc)) from None
    _check_digests("params", params, header["params"], where)
    _check_digests("state", state, header["state"], where)
    return method.resume(params, state)


# ------------------------------------------------------- your own CheckpointManager
def _stored_table(stored: Any) -> dict[tuple, Any]:
    tree = getattr(stored, "tree", stored)
    return {
        _key_parts(p): ([int(d) for d in leaf.shape], str(np.dtype(leaf.dtype)))
        for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def adopt(
    method: Any,
    params: PyTree,
    state: PyTree,
    *,
    described: dict[str, Any] | None = None,
    stored: Any = None,
    allow_plugin_change: bool = False,
) -> tuple[PyTree, PyTree]:
    """Check a state restored with your own Orbax code, then hand it to ``method``.

    For a ``MethodState`` saved beside model parameters in your own
    ``orbax.checkpoint.CheckpointManager`` (see the how-to page): restore it with
    ``ocp.args.StandardRestore(method.state_spec(params))``, then call this.

    Args:
        method: the :class:`~somax_plug.Method` that will step.
        params, state: what your manager restored.
        described: the :func:`describe` dict you saved with the state; when given, a
            different plan or plugin set is refused as :func:`restore` refuses it.
        stored: Orbax's metadata of the saved state
            (``manager.item_metadata(step)["state"]``); when given, every stored array's
            shape and dtype is checked against the state spec (Orbax would cast a
            float64 array into a float32 target without a word).
        allow_plugin_change: as in :func:`restore`.

    Returns:
        ``method.resume(params, state)``.

    Raises:
        CheckpointError: naming the leaf, what this method expects and what was found.

    Example:
        >>> import jax.numpy as jnp
        >>> from somax_plug import compose, checkpoint
        >>> m = compose("ggn", "cg", predict_fn=lambda p, x: x @ p, loss="mse")
        >>> params = jnp.zeros(3)
        >>> described = checkpoint.describe(m)  # saved beside the state
        >>> p, s = checkpoint.adopt(m, params, m.init(params), described=described)
        >>> int(s.count)
        0
    """
    where = "the restored state"
    if described is not None:
        if not isinstance(described, dict):
            raise _bad(where, f"described is a {type(described).__name__}, expected a dict")
        if described.get("format") != FORMAT:
            raise CheckpointError(
                f"{where}: described has format {described.get('format')!r}, expected "
                f"{FORMAT} (checkpoint.describe(method))"
            )
        for key in ("plan_fingerprint", "registry_fingerprint", "plan_content_fingerprint"):
            _expect(described, key, str, where, "described")
        _expect(described, "plan", dict, where, "described")
        _check_plan(described, method.plan, where, allow_plugin_change)
    try:
        expected = method.state_spec(params)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{where}: cannot compute this method's state spec: {exc}") from None
    if stored is not None:
        try:
            table = _stored_table(stored)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(
                f"stored must be Orbax's metadata of the saved state "
                f"(manager.item_metadata(step)['state']): {type(exc).__name__}: {exc}"
            ) from None
        leaves = jax.tree_util.tree_flatten_with_path(expected)[0]
        if len(table) != len(leaves):
            raise CheckpointError(
                f"{where}: Orbax stored {len(table)} state arrays, this method's state has "
                f"{len(leaves)}"
            )
        for p, spec in leaves:
            want, found = _stored_form(spec), table.get(_key_parts(p))
            leaf = f"state{jax.tree_util.keystr(p)}"
            if found is None:
                raise CheckpointError(f"{where}: Orbax stored no array for {leaf}")
            if list(found[0]) != want[0] or found[1] != want[1]:
                raise CheckpointError(
                    f"{where}: {leaf}: expected {want[1]}{want[0]} (this method's state "
                    f"spec), found {found[1]}{list(found[0])} (stored by Orbax)"
                )
    _compare_trees("state", expected, state, where, "this method's state spec")
    return method.resume(params, state)

"""Checkpoints: parameters and method state in one ``.npz``, tied to the plan.

:func:`save` writes one NumPy ``.npz`` file (no pickle): the flattened leaves of
the parameters and of the :class:`~somax_plug.MethodState`, and a JSON
header with

* the plan fingerprint, the registry (plugin set) fingerprint and the plan's
  content (components, options, cadences, resources) for a readable diff;
* the pytree structures (``str`` of the treedefs) and every leaf's dtype and
  shape; PRNG key arrays are stored as their key data plus the implementation
  name, bfloat16 and other non-NumPy dtypes as raw bits;
* the library and JAX versions and optional user ``metadata``.

:func:`restore` rebuilds ``(params, state)`` bitwise. It refuses, with a
:class:`~somax_plug.CheckpointError` naming both fingerprints and the
differing components, a checkpoint written under another plan; and one written
under another plugin set unless ``allow_plugin_change=True`` (which still refuses
a different plan).

Resuming is exact: ``N`` steps, save, restore into a fresh method built from the
same composition, ``N`` more steps gives bitwise the parameters, state and info
of ``2N`` uninterrupted steps (same device kind and JAX version).

Example:
    >>> import jax, jax.numpy as jnp, tempfile, os
    >>> from somax_plug import compose, checkpoint
    >>> method = compose("ggn", "cg", predict_fn=lambda p, x: x @ p, loss="mse")
    >>> params = jnp.zeros(3)
    >>> state = method.init(params)
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.npz")
    >>> _ = checkpoint.save(path, params, state, method)
    >>> params2, state2 = checkpoint.restore(path, method)
    >>> bool((params2 == params).all())
    True
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from somax_plug._src.errors import CheckpointError

PyTree = Any

FORMAT = 1
_HEADER = "__header__"

__all__ = ["FORMAT", "plan_content_fingerprint", "read_header", "restore", "save"]


# ------------------------------------------------------------------- the plan
def _plan_content(plan: Any) -> dict[str, Any]:
    body = dict(plan.to_dict_without_fingerprint())
    body.pop("registry", None)
    return json.loads(json.dumps(body, sort_keys=True, default=repr))


def plan_content_fingerprint(plan: Any) -> str:
    """Hash of the plan *without* the registry fingerprint (components, resources, loss)."""
    blob = json.dumps(_plan_content(plan), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _component_line(c: dict[str, Any]) -> str:
    opts = ", ".join(f"{k}={v!r}" for k, v in sorted(c.get("options", {}).items()))
    cadence = f" every {c['every_k']} steps" if c.get("every_k", 1) != 1 else ""
    return f"{c['name']}{cadence}" + (f" ({opts})" if opts else "")


def _plan_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Readable differences between two plan contents (checkpoint -> this method)."""
    lines = []
    old_c = {c["role"]: c for c in old.get("components", [])}
    new_c = {c["role"]: c for c in new.get("components", [])}
    for role in list(old_c) + [r for r in new_c if r not in old_c]:
        a, b = old_c.get(role), new_c.get(role)
        if a == b:
            continue
        left = _component_line(a) if a else "(none)"
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
        old_r = {r["name"]: r for r in old.get("resources", [])}
        new_r = {r["name"]: r for r in new.get("resources", [])}
        for name in sorted(set(old_r) | set(new_r)):
            a, b = old_r.get(name), new_r.get(name)
            if a != b:
                lines.append(
                    f"resource {name}: "
                    + (f"every {a['every_k']} steps" if a else "(absent)")
                    + " -> "
                    + (f"every {b['every_k']} steps" if b else "(absent)")
                )
    return lines or ["(the plans' contents differ)"]


# ------------------------------------------------------------------- leaves
def _is_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _host(x: Any, where: str) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if not x.is_fully_replicated:
            raise CheckpointError(
                f"{where} is sharded across processes; gather it first "
                "(jax.experimental.multihost_utils.process_allgather) or save per process"
            )
        x = x.addressable_data(0)
    return np.asarray(x)


def _encode(x: Any, where: str) -> tuple[np.ndarray, dict[str, Any]]:
    if _is_key(x):
        data = _host(jax.random.key_data(x), where)
        meta = {
            "dtype": str(x.dtype),
            "shape": list(x.shape),
            "key_impl": str(jax.random.key_impl(x)),
        }
        return data, meta
    arr = _host(x, where)
    meta = {"dtype": str(arr.dtype), "shape": list(arr.shape)}
    if arr.dtype.kind == "V" or arr.dtype.name not in np.sctypeDict:  # bfloat16, float8, ...
        meta["stored_as"] = f"uint{8 * arr.dtype.itemsize}"
        arr = arr.view(np.dtype(meta["stored_as"]))
    return arr, meta


def _decode(arr: np.ndarray, meta: dict[str, Any], where: str) -> Any:
    if "key_impl" in meta:
        return jax.random.wrap_key_data(jnp.asarray(arr), impl=meta["key_impl"])
    if "stored_as" in meta:
        arr = arr.view(jnp.dtype(meta["dtype"]))
    out = jnp.asarray(arr)
    if str(out.dtype) != meta["dtype"]:
        raise CheckpointError(
            f"{where} was saved as {meta['dtype']} but loads as {out.dtype}; enable "
            "jax.config.update('jax_enable_x64', True) before restoring 64-bit checkpoints"
        )
    return out


def _normalise_treedef(text: str) -> str:
    return re.sub(r" at 0x[0-9a-fA-F]+", "", text)


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


def _from_skeleton(skel: Any, leaves: list[Any]) -> PyTree:
    ((kind, value),) = skel.items()
    if kind == "none":
        return None
    if kind == "leaf":
        return leaves[value]
    if kind == "dict":
        return {k: _from_skeleton(v, leaves) for k, v in value.items()}
    items = [_from_skeleton(v, leaves) for v in value]
    return tuple(items) if kind == "tuple" else items


def _flatten(tree: PyTree, name: str) -> tuple[list[Any], dict[str, Any]]:
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    arrays, metas = [], []
    for path, x in with_path:
        arr, meta = _encode(x, f"{name}{jax.tree_util.keystr(path)}")
        meta["path"] = jax.tree_util.keystr(path)
        arrays.append(arr)
        metas.append(meta)
    return arrays, {"treedef": _normalise_treedef(str(treedef)), "leaves": metas}


# ------------------------------------------------------------------ save/load
def save(
    path: str | os.PathLike,
    params: PyTree,
    state: PyTree,
    method: Any,
    *,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``params`` and ``state`` of ``method`` to ``path`` (one ``.npz``, atomically).

    Args:
        path: the file to write (used as given; ``.npz`` is a good suffix).
        params, state: what :meth:`~somax_plug.Method.step` returned.
        method: the :class:`~somax_plug.Method` they belong to.
        metadata: JSON-serialisable extras (epoch, data position, ...), returned by
            :func:`read_header`.

    In a multi-process run, call it from one process (``jax.process_index() == 0``):
    replicated leaves are read from the local copy.
    """
    path = Path(path)
    plan = method.plan
    p_arrays, p_header = _flatten(params, "params")
    s_arrays, s_header = _flatten(state, "state")
    try:
        counter = [0]
        p_header["skeleton"] = _skeleton(params, counter)
    except TypeError:
        p_header["skeleton"] = None
    import somax_plug

    header = {
        "format": FORMAT,
        "plan_fingerprint": plan.fingerprint,
        "registry_fingerprint": plan.registry_fingerprint,
        "plan_content_fingerprint": plan_content_fingerprint(plan),
        "plan": _plan_content(plan),
        "params": p_header,
        "state": s_header,
        "versions": {"somax_plug": somax_plug.__version__, "jax": jax.__version__},
        "metadata": metadata or {},
    }
    try:
        blob = json.dumps(header, sort_keys=True)
    except TypeError as exc:
        raise CheckpointError(f"metadata must be JSON-serialisable: {exc}") from None
    arrays = {f"params/{i}": a for i, a in enumerate(p_arrays)}
    arrays.update({f"state/{i}": a for i, a in enumerate(s_arrays)})
    arrays[_HEADER] = np.frombuffer(blob.encode(), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(tmp, path)
    return path


def _load(path: Path) -> tuple[dict[str, Any], Any]:
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        data = np.load(path, allow_pickle=False)
        header = json.loads(bytes(data[_HEADER]).decode())
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"{str(path)!r} is not a somax_plug checkpoint (an .npz with a JSON header): {exc}"
        ) from None
    if header.get("format") != FORMAT:
        raise CheckpointError(
            f"{str(path)!r} has checkpoint format {header.get('format')!r}; this version "
            f"reads format {FORMAT}"
        )
    return header, data


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a checkpoint (fingerprints, plan, structures, metadata)."""
    return _load(Path(path))[0]


def _check_plan(header: dict[str, Any], plan: Any, path: Path, allow_plugin_change: bool) -> None:
    old_fp, new_fp = header["plan_fingerprint"], plan.fingerprint
    old_reg, new_reg = header["registry_fingerprint"], plan.registry_fingerprint
    same_content = header["plan_content_fingerprint"] == plan_content_fingerprint(plan)
    if old_fp == new_fp and old_reg == new_reg and same_content:
        return
    where = (
        f"checkpoint {str(path)!r} was written for plan {old_fp} (registry {old_reg}); "
        f"this method has plan {new_fp} (registry {new_reg})"
    )
    if not same_content:
        diff = "; ".join(_plan_diff(header["plan"], _plan_content(plan)))
        raise CheckpointError(
            f"{where}. The plans differ: {diff}. Restore with a method composed like the "
            "one that wrote it"
        )
    if old_reg != new_reg and not allow_plugin_change:
        raise CheckpointError(
            f"{where}. The plan components are the same, but the plugin set (registry "
            "fingerprint) differs: plugins were added, removed or upgraded. If that is "
            "intended, restore with allow_plugin_change=True"
        )


def _check_leaves(name: str, expected: PyTree, stored: dict[str, Any], path: Path) -> None:
    with_path, treedef = jax.tree_util.tree_flatten_with_path(expected)
    if _normalise_treedef(str(treedef)) != stored["treedef"] or len(with_path) != len(
        stored["leaves"]
    ):
        raise CheckpointError(
            f"checkpoint {str(path)!r}: the {name} structure differs from this method's:\n"
            f"  saved: {stored['treedef']}\n  here:  {_normalise_treedef(str(treedef))}"
        )
    for (p, spec), meta in zip(with_path, stored["leaves"], strict=True):
        shape, dtype = list(spec.shape), str(spec.dtype)
        if shape != meta["shape"] or dtype != meta["dtype"]:
            raise CheckpointError(
                f"checkpoint {str(path)!r}: {name}{jax.tree_util.keystr(p)} was saved as "
                f"{meta['dtype']}{meta['shape']} but this method expects {dtype}{shape}"
            )


def restore(
    path: str | os.PathLike,
    method: Any,
    *,
    params_like: PyTree = None,
    allow_plugin_change: bool = False,
) -> tuple[PyTree, PyTree]:
    """Read ``(params, state)`` written by :func:`save`, for ``method``.

    Args:
        path: the checkpoint file.
        method: a :class:`~somax_plug.Method` built from the same composition
            (same plan); it need not have been initialised.
        params_like: parameters (or ``jax.ShapeDtypeStruct`` s) with the saved
            structure; needed only for parameters with custom pytree nodes (plain
            dicts, lists and tuples are rebuilt from the header).
        allow_plugin_change: accept a checkpoint written under another plugin set
            (registry fingerprint) when the plan itself is the same.

    Raises:
        CheckpointError: another plan or plugin set, other structures, shapes or
            dtypes, or not a checkpoint.
    """
    path = Path(path)
    header, data = _load(path)
    _check_plan(header, method.plan, path, allow_plugin_change)
    p_meta, s_meta = header["params"], header["state"]
    params_leaves = [
        _decode(data[f"params/{i}"], m, f"params{m['path']}")
        for i, m in enumerate(p_meta["leaves"])
    ]
    if params_like is not None:
        treedef = jax.tree_util.tree_structure(params_like)
        _check_leaves("params", jax.tree_util.tree_map(_spec, params_like), p_meta, path)
        params = jax.tree_util.tree_unflatten(treedef, params_leaves)
    elif p_meta.get("skeleton") is not None:
        params = _from_skeleton(p_meta["skeleton"], params_leaves)
        _check_leaves("params", jax.tree_util.tree_map(_spec, params), p_meta, path)
    else:
        raise CheckpointError(
            f"checkpoint {str(path)!r}: the parameters use custom pytree nodes "
            f"({p_meta['treedef']}); pass params_like= (the initial parameters) to restore"
        )
    expected_state = method.state_spec(params)
    _check_leaves("state", expected_state, s_meta, path)
    state_leaves = [
        _decode(data[f"state/{i}"], m, f"state{m['path']}") for i, m in enumerate(s_meta["leaves"])
    ]
    state = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(expected_state), state_leaves)
    return method.resume(params, state)


def _spec(x: Any) -> jax.ShapeDtypeStruct:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype)

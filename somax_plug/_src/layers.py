"""The layer map: dense and conv layers found in the model's jaxpr.

Kronecker-factored curvature (KFAC, EKFAC) and Shampoo-type preconditioners need the
layers of a model: which parameter leaves are dense or conv kernels, what a layer's
input is, and over which axes its weight is shared. :func:`discover` reads them from
the jaxpr of ``predict_fn(params, example_inputs)`` (``jax.make_jaxpr``, recursing into
``pjit`` / ``closed_call`` / ``custom_jvp_call`` / ``custom_vjp_call`` / ``remat``
sub-jaxprs):

* a **kernel** is a parameter leaf consumed by exactly one ``dot_general`` (kind
  ``"dense"``) or ``conv_general_dilated`` (kind ``"conv"``, as its ``rhs``) whose
  other operand is not a parameter, possibly through ``reshape``, ``transpose``,
  ``broadcast_in_dim``, ``convert_element_type``, ``squeeze``, ``expand_dims`` and
  ``copy`` (as Flax and Equinox emit them);
* a **bias** is a parameter leaf (through the same ops) added to that layer's output
  (through the same ops), and used nowhere else.

For a dense layer ``y = contract(a, W)`` the input ``a`` has *contract axes* (those
contracted with ``W``) and free axes; the free axes that grow with the batch are the
*batch axes* (found by tracing a second time with every input's leading axis one
longer) and the others are the *shared axes* (tokens: the same ``W`` is applied at
each). For a conv layer the contract axis is the input's feature axis, the batch axis
is the ``lhs_spec`` batch axis and the shared axes are the spatial axes. Output axes
are given the same way (``output_feature_axes`` are the kernel's free axes).

Every parameter leaf is either in a layer or listed in :attr:`LayerMap.unmatched`
with the reason (LayerNorm scales, embeddings, a kernel used twice, ...): nothing is
dropped silently. ``overrides`` (by parameter path) correct or complete the map.

:func:`layer_io` evaluates the same jaxpr with *taps* (the KFAC trick): it records the
input of every matched equation and adds a zero perturbation ``d_l`` to its output, so
that one ``jax.vjp`` (one forward pass) gives the outputs, every layer's input ``a_l``
and a VJP ``u -> (J^T u, {l: (d y_l)^T u})``: the per-layer output gradients are the
cotangents of the perturbations.

Example:
    >>> import jax.numpy as jnp
    >>> from somax_plug.layers import discover
    >>> params = {"w": jnp.ones((3, 4)), "b": jnp.zeros(4), "s": jnp.ones(4)}
    >>> lm = discover(lambda p, x: p["s"] * (x @ p["w"] + p["b"]), params, jnp.ones((2, 5, 3)))
    >>> lm["w"].kind, lm["w"].bias, lm["w"].batch_axes, lm["w"].shared_axes
    ('dense', 'b', (0,), (1,))
    >>> lm.unmatched
    (('s', 'used by mul (not a dense or conv layer)'),)
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import attrs
import jax
import numpy as np
from jax import tree_util as jtu
from jax.extend import core as jcore

from somax_plug._src.errors import InputError, SomaxPlugError
from somax_plug._src.resources import Linearization, ResourceProvider

PyTree = Any

TRANSPARENT = frozenset(
    {
        "reshape",
        "transpose",
        "broadcast_in_dim",
        "convert_element_type",
        "squeeze",
        "expand_dims",
        "copy",
        "copy_p",
    }
)
"""Primitives a kernel, a bias or a layer output is followed through."""
CALLS = frozenset(
    {
        "pjit",
        "jit",
        "closed_call",
        "core_call",
        "custom_jvp_call",
        "custom_vjp_call",
        "custom_vjp_call_jaxpr",
        "remat",
        "checkpoint",
        "remat2",
    }
)
"""Primitives whose sub-jaxpr is walked (and, by :func:`layer_io`, inlined)."""
KINDS = ("dense", "conv")
LAYER_FIELDS = (
    "kind",
    "bias",
    "input_shape",
    "output_shape",
    "contract_axes",
    "batch_axes",
    "shared_axes",
    "output_feature_axes",
    "output_batch_axes",
    "output_shared_axes",
)
"""The fields an override may set (the kernel is the override's path)."""


def _tuple(x: Any) -> tuple:
    return tuple(int(i) for i in x)


@attrs.frozen
class Layer:
    """One dense or conv layer: ``y = contract(a, W) (+ b)``.

    Attributes:
        kind: ``"dense"`` (``dot_general``) or ``"conv"`` (``conv_general_dilated``).
        kernel: the kernel's parameter path; ``kernel_shape`` its shape.
        bias: the bias's parameter path, or None; ``bias_shape`` its shape.
        input_shape: the shape of the layer's input ``a`` at the example inputs.
        output_shape: the shape of ``contract(a, W)`` (the equation's output, before
            the bias, in the equation's axis order).
        contract_axes: axes of ``a`` contracted with the kernel (conv: the feature
            axis; the window spans the spatial axes).
        batch_axes: axes of ``a`` that grow with the batch.
        shared_axes: axes of ``a`` over which the weight is shared (tokens, spatial
            positions): free axes that are not batch axes.
        output_feature_axes: axes of the output produced by the kernel's free axes.
        output_batch_axes, output_shared_axes: the output's batch and shared axes.
        params: the equation's static parameters (``dimension_numbers``, and for a
            conv ``window_strides``, ``padding``, ``lhs_dilation``, ``rhs_dilation``),
            as ``(name, value)`` pairs.
        source: ``"discovered"`` or ``"override"``.
    """

    kind: str
    kernel: str
    kernel_shape: tuple[int, ...] = attrs.field(converter=_tuple)
    bias: str | None = None
    bias_shape: tuple[int, ...] | None = None
    input_shape: tuple[int, ...] = attrs.field(default=(), converter=_tuple)
    output_shape: tuple[int, ...] = attrs.field(default=(), converter=_tuple)
    contract_axes: tuple[int, ...] = attrs.field(default=(), converter=_tuple)
    batch_axes: tuple[int, ...] = attrs.field(default=(), converter=_tuple)
    shared_axes: tuple[int, ...] = attrs.field(default=(), converter=_tuple)
    output_feature_axes: tuple[int, ...] = attrs.field(default=(), converter=_tuple)
    output_batch_axes: tuple[int, ...] = attrs.field(default=(), converter=_tuple)
    output_shared_axes: tuple[int, ...] = attrs.field(default=(), converter=_tuple)
    params: tuple[tuple[str, Any], ...] = attrs.field(default=(), repr=False)
    kernel_operand: int = 1
    source: str = "discovered"

    def apply(self, a: Any, kernel: Any) -> Any:
        """``contract(a, W)``: the layer's equation on input ``a`` (without the bias).

        ``a`` and ``W`` are first cast to their common dtype (a float32 kernel applied
        to a float64 input is cast in the model's jaxpr too).

        With :func:`layer_io`'s ``a_l`` and output gradient ``g_l``, the kernel's
        gradient is the VJP of this map at ``g_l`` (``jax.vjp(lambda w:
        layer.apply(a_l, w), W)[1](g_l)``), and a Kronecker factor reads ``a_l`` and
        ``g_l`` over the batch and shared axes.

        Example:
            >>> import jax.numpy as jnp
            >>> la = discover(lambda p, x: x @ p["w"], {"w": jnp.ones((3, 2))},
            ...               jnp.ones((4, 3)))["w"]
            >>> la.apply(jnp.ones((4, 3)), jnp.ones((3, 2))).shape
            (4, 2)
        """
        p = dict(self.params)
        dtype = jax.numpy.result_type(a, kernel)  # as the model's casts promote them
        a, kernel = jax.numpy.asarray(a, dtype), jax.numpy.asarray(kernel, dtype)
        if self.kind == "dense":
            dn = p.get("dimension_numbers")
            if dn is None:
                raise InputError(
                    f"layer {self.kernel!r} has no dimension_numbers (declared by an "
                    "override): apply needs a discovered layer"
                )
            ops = (a, kernel) if self.kernel_operand == 1 else (kernel, a)
            return jax.lax.dot_general(*ops, dn)
        if "dimension_numbers" not in p:
            raise InputError(
                f"layer {self.kernel!r} has no conv parameters (declared by an override): "
                "apply needs a discovered layer"
            )
        return jax.lax.conv_general_dilated(
            a,
            kernel,
            p["window_strides"],
            p["padding"],
            lhs_dilation=p.get("lhs_dilation"),
            rhs_dilation=p.get("rhs_dilation"),
            dimension_numbers=p["dimension_numbers"],
        )


@attrs.frozen
class LayerMap:
    """Parameter path -> layer, plus every parameter that is in no layer.

    ``lm[path]`` is the :class:`Layer` whose kernel or bias is ``path``; iterating
    gives the layers; ``unmatched`` is ``((path, reason), ...)``; ``paths`` every
    parameter path of the pytree in flattening order. ``str(lm)`` is a table. A
    LayerMap is static: a pytree with no leaves, so it crosses ``jax.jit``.
    """

    layers: tuple[Layer, ...]
    unmatched: tuple[tuple[str, str], ...]
    paths: tuple[str, ...]

    def __iter__(self) -> Iterator[Layer]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __contains__(self, path: object) -> bool:
        return any(path in (la.kernel, la.bias) for la in self.layers)

    def __getitem__(self, path: str) -> Layer:
        for la in self.layers:
            if path in (la.kernel, la.bias):
                return la
        why = dict(self.unmatched).get(path)
        if why is not None:
            raise KeyError(f"parameter {path!r} is in no layer ({why})")
        raise KeyError(f"no parameter {path!r}; {_closest(path, self.paths)}")

    @property
    def kernels(self) -> tuple[str, ...]:
        """The kernel paths, in the order of the layers."""
        return tuple(la.kernel for la in self.layers)

    def __str__(self) -> str:
        head = ("kernel", "kind", "kernel shape", "bias", "input", "output", "contract",
                "batch", "shared")
        rows = [
            (
                la.kernel + ("*" if la.source == "override" else ""),
                la.kind,
                _shape(la.kernel_shape),
                la.bias or "-",
                _shape(la.input_shape),
                _shape(la.output_shape),
                _shape(la.contract_axes),
                _shape(la.batch_axes),
                _shape(la.shared_axes),
            )
            for la in self.layers
        ]
        widths = [max(len(str(r[i])) for r in (head, *rows)) for i in range(len(head))]
        line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True))
        out = [f"layer map: {len(self.layers)} layer(s), {len(self.unmatched)} unmatched",
               line(head).rstrip()]
        out += [line(r).rstrip() for r in rows]
        if any(la.source == "override" for la in self.layers):
            out.append("(* set or changed by an override)")
        for path, why in self.unmatched:
            out.append(f"unmatched  {path}: {why}")
        return "\n".join(out)


jtu.register_pytree_node(LayerMap, lambda lm: ((), lm), lambda lm, _: lm)


def _shape(t: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(i) for i in t) + ")"


def _closest(path: str, paths: tuple[str, ...]) -> str:
    if not paths:
        return "the parameter pytree has no leaves"
    close = difflib.get_close_matches(path, paths, n=3, cutoff=0.4)
    if not close:
        close = list(paths[:3])
    return "closest existing paths: " + ", ".join(repr(p) for p in close)


# ----------------------------------------------------------------- parameter paths


def _key_str(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def param_paths(params: PyTree) -> tuple[str, ...]:
    """``"a/b/0/kernel"``-style paths of the leaves of ``params``, in flattening order.

    Dict keys, attribute names and sequence indices are joined with ``/``; a trailing
    ``value`` attribute (a Flax NNX ``Variable``) is dropped when that keeps the paths
    distinct.

    Example:
        >>> param_paths({"dense": {"kernel": 1, "bias": 2}, "out": [3]})
        ('dense/bias', 'dense/kernel', 'out/0')
    """
    keyed = jtu.tree_flatten_with_path(params)[0]
    full = tuple("/".join(_key_str(k) for k in path) for path, _ in keyed)
    short = tuple(
        p.removesuffix("/value")
        if path and type(path[-1]).__name__ == "GetAttrKey" and _key_str(path[-1]) == "value"
        else p
        for p, (path, _) in zip(full, keyed, strict=True)
    )
    return short if len(set(short)) == len(short) else full


# ------------------------------------------------------------------ jaxpr analysis


class _Site(NamedTuple):
    """A matched equation: where it is (eqn indices through sub-jaxprs) and its avals."""

    where: tuple[int, ...]
    kind: str
    kernel: int  # leaf index
    act_pos: int  # operand position of the activation
    act_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    params: dict


class _Use(NamedTuple):
    what: str  # "layer", "bias" or "other"
    site: tuple[int, ...] | None
    detail: str


def _sub_jaxpr(eqn: Any) -> tuple[Any, list] | None:
    if eqn.primitive.name not in CALLS:
        return None
    for name in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(name)
        if sub is None:
            continue
        if isinstance(sub, jcore.ClosedJaxpr):
            jaxpr, consts = sub.jaxpr, list(sub.consts)
        elif isinstance(sub, jcore.Jaxpr):
            jaxpr, consts = sub, []
        else:
            continue
        if len(jaxpr.invars) == len(eqn.invars) and len(jaxpr.outvars) == len(eqn.outvars):
            return jaxpr, consts
    return None


def _is_var(v: Any) -> bool:
    return isinstance(v, jcore.Var)


class _Scan:
    """One pass over a jaxpr: parameter origins, matched equations and every use."""

    def __init__(self) -> None:
        self.sites: dict[tuple[int, ...], _Site] = {}
        self.uses: dict[int, list[_Use]] = {}

    def use(self, leaf: int, u: _Use) -> None:
        self.uses.setdefault(leaf, []).append(u)

    def walk(
        self,
        jaxpr: Any,
        origin: dict[Any, int],
        layer_out: dict[Any, tuple[int, ...]],
        prefix: tuple[int, ...] = (),
    ) -> None:
        for i, eqn in enumerate(jaxpr.eqns):
            name = eqn.primitive.name
            ins = [v if _is_var(v) else None for v in eqn.invars]
            in_origin = [origin.get(v) if v is not None else None for v in ins]
            sub = _sub_jaxpr(eqn)
            if name in TRANSPARENT and len(eqn.outvars) == 1:
                first = ins[0]
                if first is not None and first in origin and all(
                    o is None for o in in_origin[1:]
                ):
                    origin[eqn.outvars[0]] = origin[first]
                    continue
                if first is not None and first in layer_out:
                    layer_out[eqn.outvars[0]] = layer_out[first]
                self._other(name, in_origin)
            elif sub is not None:
                inner, _ = sub
                inner_origin = {
                    iv: origin[v]
                    for iv, v in zip(inner.invars, ins, strict=True)
                    if v is not None and v in origin
                }
                inner_out = {
                    iv: layer_out[v]
                    for iv, v in zip(inner.invars, ins, strict=True)
                    if v is not None and v in layer_out
                }
                self.walk(inner, inner_origin, inner_out, (*prefix, i))
                for ov, iv in zip(eqn.outvars, inner.outvars, strict=True):
                    if _is_var(iv) and iv in inner_origin:
                        origin[ov] = inner_origin[iv]
                    elif _is_var(iv) and iv in inner_out:
                        layer_out[ov] = inner_out[iv]
            elif name in ("dot_general", "conv_general_dilated"):
                self._layer(eqn, name, in_origin, layer_out, (*prefix, i))
            elif name in ("add", "add_any") and len(ins) == 2:
                outs = [layer_out.get(v) if v is not None else None for v in ins]
                same = [_shape_of(v) == _shape_of(eqn.outvars[0]) for v in eqn.invars]
                for a, b in ((0, 1), (1, 0)):
                    if outs[a] is not None and in_origin[b] is not None and same[a]:
                        self.use(in_origin[b], _Use("bias", outs[a], "add"))
                        break
                else:
                    self._other(name, in_origin)
                    # a residual sum y + x (x not a parameter) still carries y's bias:
                    # d/db (y + x + b) = d/dy; of two layer outputs, the later one
                    cands = [outs[a] for a in (0, 1) if outs[a] is not None and same[a]
                             and in_origin[a] is None and in_origin[1 - a] is None]
                    if cands:
                        layer_out[eqn.outvars[0]] = max(cands)
            else:
                self._other(name, in_origin)

    def _other(self, name: str, in_origin: list[int | None]) -> None:
        for leaf in in_origin:
            if leaf is not None:
                self.use(leaf, _Use("other", None, name))

    def _layer(
        self,
        eqn: Any,
        name: str,
        in_origin: list[int | None],
        layer_out: dict[Any, tuple[int, ...]],
        where: tuple[int, ...],
    ) -> None:
        lhs, rhs = in_origin[0], in_origin[1]
        if (lhs is None) == (rhs is None):
            if lhs is not None:
                self.use(lhs, _Use("other", None, f"{name} of two parameters"))
                self.use(rhs, _Use("other", None, f"{name} of two parameters"))
            return  # two activations (attention scores): no layer
        kernel_pos = 0 if lhs is not None else 1
        kernel = lhs if lhs is not None else rhs
        p = eqn.params
        if name == "dot_general":
            (_, _), (lb, rb) = p["dimension_numbers"]
            if lb or rb:
                self.use(kernel, _Use("other", None, "dot_general with batch dimensions "
                                      "(a weight per example)"))
                return
            kind = "dense"
        else:
            if kernel_pos != 1:
                self.use(kernel, _Use("other", None, "conv_general_dilated as its lhs"))
                return
            if p.get("feature_group_count", 1) != 1 or p.get("batch_group_count", 1) != 1:
                self.use(kernel, _Use("other", None, "a grouped conv_general_dilated "
                                      f"(feature_group_count={p.get('feature_group_count')})"))
                return
            kind = "conv"
        act = eqn.invars[1 - kernel_pos]
        self.sites[where] = _Site(
            where,
            kind,
            kernel,
            1 - kernel_pos,
            tuple(act.aval.shape),
            tuple(eqn.outvars[0].aval.shape),
            dict(p),
        )
        self.use(kernel, _Use("layer", where, name))
        layer_out[eqn.outvars[0]] = where


def _abstract(x: Any) -> Any:
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype)
    return x


def _trace(predict_fn: Callable, params: PyTree, inputs: PyTree) -> tuple[Any, Any, int]:
    leaves, treedef = jtu.tree_flatten(params)

    def flat_fn(flat: list, x: PyTree) -> Any:
        return predict_fn(jtu.tree_unflatten(treedef, flat), x)

    abstract_leaves = [_abstract(x) for x in leaves]
    abstract_inputs = jtu.tree_map(_abstract, inputs)
    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(abstract_leaves, abstract_inputs)
    return closed, out_shape, len(leaves)


def _shapes(tree: PyTree) -> str:
    shapes = [tuple(np.shape(x)) for x in jtu.tree_leaves(tree)]
    return ", ".join(map(str, shapes[:6])) + (", ..." if len(shapes) > 6 else "")


def _trace_checked(
    what: str, predict_fn: Callable, params: PyTree, inputs: PyTree
) -> tuple[Any, Any, int]:
    """:func:`_trace`, with a failure of the user's ``predict_fn`` named as such."""
    if not jtu.tree_leaves(params):
        raise InputError(
            f"{what}: params has no array leaves (got a {type(params).__name__}); pass the "
            "parameter pytree predict_fn takes (Flax: variables; NNX: nnx.split's state; "
            "Equinox: eqx.partition's arrays)"
        )
    try:
        return _trace(predict_fn, params, inputs)
    except SomaxPlugError:
        raise
    except Exception as e:  # noqa: BLE001 (the user's model: say what was traced)
        raise InputError(
            f"{what}: tracing predict_fn(params, inputs) failed with {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''} (inputs' shapes: {_shapes(inputs)}; "
            f"params' shapes: {_shapes(params)}); pass inputs of the shape the model "
            "takes, with the batch axis first"
        ) from e


def _scan(closed: Any, n_leaves: int) -> _Scan:
    scan = _Scan()
    jaxpr = closed.jaxpr
    origin = {v: i for i, v in enumerate(jaxpr.invars[:n_leaves])}
    scan.walk(jaxpr, origin, {})
    return scan


def _grow_batch(x: Any) -> Any:
    if hasattr(x, "shape") and hasattr(x, "dtype") and len(np.shape(x)) >= 1:
        shape = np.shape(x)
        return jax.ShapeDtypeStruct((shape[0] + 1, *shape[1:]), x.dtype)
    return x


def _layer_of(site: _Site, grown: _Site | None, paths: tuple[str, ...], leaves: list) -> Layer:
    p = site.params
    act_nd, out_nd = len(site.act_shape), len(site.out_shape)
    if site.kind == "dense":
        (lc, rc), _ = p["dimension_numbers"]
        act_contract = tuple(lc if site.act_pos == 0 else rc)
        ker_contract = tuple(rc if site.act_pos == 0 else lc)
        ker_nd = len(np.shape(leaves[site.kernel]))
        act_free = [d for d in range(act_nd) if d not in act_contract]
        n_ker_free = ker_nd - len(ker_contract)
        if site.act_pos == 0:
            out_of_act = {d: j for j, d in enumerate(act_free)}
            out_feature = tuple(range(len(act_free), out_nd))
        else:
            out_of_act = {d: n_ker_free + j for j, d in enumerate(act_free)}
            out_feature = tuple(range(n_ker_free))
        if grown is not None and len(grown.act_shape) == act_nd:
            batch = tuple(d for d in act_free if grown.act_shape[d] != site.act_shape[d])
        else:
            batch = tuple(act_free[:1])
        shared = tuple(d for d in act_free if d not in batch)
        out_batch = tuple(out_of_act[d] for d in batch)
        out_shared = tuple(out_of_act[d] for d in shared)
        params = (("dimension_numbers", p["dimension_numbers"]),)
    else:
        dn = p["dimension_numbers"]
        lhs_spec, out_spec = tuple(dn.lhs_spec), tuple(dn.out_spec)
        act_contract = (lhs_spec[1],)
        batch = (lhs_spec[0],)
        shared = lhs_spec[2:]
        out_feature = (out_spec[1],)
        out_batch = (out_spec[0],)
        out_shared = out_spec[2:]
        params = tuple(
            (k, _hashable(p[k]))
            for k in ("dimension_numbers", "window_strides", "padding", "lhs_dilation",
                      "rhs_dilation")
            if k in p
        )
    return Layer(
        kind=site.kind,
        kernel=paths[site.kernel],
        kernel_shape=np.shape(leaves[site.kernel]),
        input_shape=site.act_shape,
        output_shape=site.out_shape,
        contract_axes=act_contract,
        batch_axes=batch,
        shared_axes=shared,
        output_feature_axes=out_feature,
        output_batch_axes=out_batch,
        output_shared_axes=out_shared,
        params=params,
        kernel_operand=1 - site.act_pos,
    )


def _hashable(x: Any) -> Any:
    if isinstance(x, list | tuple) and not hasattr(x, "_fields"):
        return tuple(_hashable(i) for i in x)
    return x


def _describe(uses: list[_Use]) -> str:
    kinds = sorted({u.detail for u in uses})
    n_layers = sum(u.what == "layer" for u in uses)
    if n_layers > 1:
        return (f"feeds {n_layers} dot_general/conv equations (a shared or tied weight); "
                "declare it with an override")
    return "used by " + ", ".join(kinds) + " (not a dense or conv layer)"


def _match(scan: _Scan, n_leaves: int) -> tuple[dict[int, _Site], dict[int, int], dict[int, str]]:
    """Kernels (leaf -> site), biases (kernel leaf -> bias leaf), unmatched (leaf -> why)."""
    kernels: dict[int, _Site] = {}
    unmatched: dict[int, str] = {}
    for leaf in range(n_leaves):
        uses = scan.uses.get(leaf, [])
        if not uses:
            unmatched[leaf] = "not used by the model's outputs through any equation"
        elif len(uses) == 1 and uses[0].what == "layer":
            kernels[leaf] = scan.sites[uses[0].site]
    biases: dict[int, int] = {}
    for leaf in range(n_leaves):
        uses = scan.uses.get(leaf, [])
        if leaf in kernels or leaf in unmatched:
            continue
        if len(uses) == 1 and uses[0].what == "bias":
            site = scan.sites[uses[0].site]
            if site.kernel in kernels and site.kernel not in biases:
                biases[site.kernel] = leaf
                continue
            unmatched[leaf] = "added to the output of a layer that is not matched"
            continue
        unmatched[leaf] = _describe(uses)
    return kernels, biases, unmatched


# ----------------------------------------------------------------------- discovery


def discover(
    predict_fn: Callable[[PyTree, Any], Any],
    params: PyTree,
    example_inputs: Any,
    overrides: Mapping[str, Mapping[str, Any] | None] | None = None,
) -> LayerMap:
    """Find every dense and conv layer of ``predict_fn`` from its jaxpr.

    Args:
        predict_fn: ``predict_fn(params, inputs) -> outputs`` (any pytree of arrays).
        params: the parameter pytree (arrays or ``jax.ShapeDtypeStruct``).
        example_inputs: inputs of the shapes the model is trained on (arrays or
            ``jax.ShapeDtypeStruct``; only shapes and dtypes are read).
        overrides: parameter path -> ``None`` (take this kernel's layer out: it and
            its bias are listed as unmatched "by override") or a mapping of
            :data:`LAYER_FIELDS` (``kind``, ``bias``, axes, shapes) that changes the
            discovered layer whose kernel is the path, or declares one for a path the
            discovery left unmatched (``kind`` then required).

    Returns:
        A frozen :class:`LayerMap`; every parameter path is in a layer or unmatched.

    Raises:
        InputError: an override names a path that does not exist (the message lists
            the closest ones), a bias path of another layer, an unknown field or kind;
            ``params`` has no array leaves; ``predict_fn`` fails to trace on
            ``example_inputs`` (the message names the shapes).

    Example:
        >>> import jax.numpy as jnp
        >>> p = {"w": jnp.ones((3, 2))}
        >>> lm = discover(lambda p, x: x @ p["w"], p, jnp.ones((4, 3)))
        >>> print(lm)  # doctest: +NORMALIZE_WHITESPACE
        layer map: 1 layer(s), 0 unmatched
        kernel  kind   kernel shape  bias  input   output  contract  batch  shared
        w       dense  (3, 2)        -     (4, 3)  (4, 2)  (1)       (0)    ()
    """
    leaves = jtu.tree_leaves(params)
    paths = param_paths(params)
    overrides = dict(overrides or {})
    _check_overrides(overrides, paths)
    ch = _chunking(predict_fn)
    if ch is not None:  # a canonical model: the layers of the model it chunks
        predict_fn = ch.predict
    closed, _, n = _trace_checked("discover", predict_fn, params, example_inputs)
    scan = _scan(closed, n)
    kernels, biases, unmatched = _match(scan, n)
    grown_sites: dict[int, _Site] = {}
    try:
        closed2, _, _ = _trace(predict_fn, params, jtu.tree_map(_grow_batch, example_inputs))
        grown_sites = {s.kernel: s for s in _scan(closed2, n).sites.values()}
    except Exception:  # noqa: BLE001 (a model tied to one batch size: axis 0 is the batch)
        grown_sites = {}
    layers: dict[str, Layer] = {}
    for leaf, site in kernels.items():
        la = _layer_of(site, grown_sites.get(leaf), paths, leaves)
        if leaf in biases:
            b = biases[leaf]
            la = attrs.evolve(la, bias=paths[b], bias_shape=tuple(np.shape(leaves[b])))
        layers[la.kernel] = la
    unmatched_by_path = {paths[leaf]: why for leaf, why in unmatched.items()}
    shapes = {p: tuple(np.shape(x)) for p, x in zip(paths, leaves, strict=True)}
    _apply_overrides(overrides, layers, unmatched_by_path, shapes, paths)
    order = {p: i for i, p in enumerate(paths)}
    return LayerMap(
        layers=tuple(sorted(layers.values(), key=lambda la: order[la.kernel])),
        unmatched=tuple(sorted(unmatched_by_path.items(), key=lambda kv: order[kv[0]])),
        paths=paths,
    )


def _check_overrides(overrides: dict, paths: tuple[str, ...] | None) -> None:
    """Check override values (and, given ``paths``, that every named path exists)."""
    for path, value in overrides.items():
        if not isinstance(path, str):
            raise InputError(
                f"layer-map override key {path!r} is a {type(path).__name__}; expected a "
                "parameter path string such as 'params/Dense_0/kernel'"
            )
        if paths is not None and path not in paths:
            raise InputError(
                f"layer-map override names parameter path {path!r}, which does not exist; "
                f"{_closest(str(path), paths)}"
            )
        if value is None:
            continue
        if not isinstance(value, Mapping):
            raise InputError(
                f"layer-map override for {path!r} is a {type(value).__name__}; expected "
                f"None (take the layer out) or a mapping of fields {', '.join(LAYER_FIELDS)}"
            )
        unknown = sorted(set(value) - set(LAYER_FIELDS))
        if unknown:
            raise InputError(
                f"layer-map override for {path!r} sets unknown field(s) {unknown}; "
                f"expected some of {', '.join(LAYER_FIELDS)}"
            )
        if "kind" in value and value["kind"] not in KINDS:
            raise InputError(
                f"layer-map override for {path!r} sets kind {value['kind']!r}; "
                f"expected one of {KINDS}"
            )
        bias = value.get("bias")
        if bias is not None and paths is not None and bias not in paths:
            raise InputError(
                f"layer-map override for {path!r} names bias {bias!r}, which does not "
                f"exist; {_closest(str(bias), paths)}"
            )


def _apply_overrides(
    overrides: dict,
    layers: dict[str, Layer],
    unmatched: dict[str, str],
    shapes: dict[str, tuple[int, ...]],
    paths: tuple[str, ...],
) -> None:
    bias_of = {la.bias: la.kernel for la in layers.values() if la.bias is not None}
    for path, value in overrides.items():
        if path in bias_of and path not in layers:
            raise InputError(
                f"layer-map override names {path!r}, the bias of layer {bias_of[path]!r}; "
                f"override the layer by its kernel path {bias_of[path]!r}"
            )
        if value is None:
            la = layers.pop(path, None)
            unmatched[path] = "taken out of the layer map by an override"
            if la is not None and la.bias is not None:
                unmatched[la.bias] = f"bias of {path!r}, taken out by an override"
            continue
        fields = dict(value)
        if "bias" in fields and fields["bias"] is not None:
            fields["bias_shape"] = shapes[fields["bias"]]
        elif "bias" in fields:
            fields["bias_shape"] = None
        if path in layers:
            old = layers[path]
            if old.bias is not None and fields.get("bias", old.bias) != old.bias:
                unmatched[old.bias] = f"bias of {path!r} replaced by an override"
            layers[path] = attrs.evolve(old, source="override", **fields)
        else:
            if "kind" not in fields:
                raise InputError(
                    f"layer-map override declares a layer for {path!r}, which the "
                    f"discovery left unmatched ({unmatched.get(path)}); give its 'kind' "
                    f"(one of {KINDS})"
                )
            layers[path] = Layer(kernel=path, kernel_shape=shapes[path], source="override",
                                 **fields)
            unmatched.pop(path, None)
        bias = fields.get("bias")
        if bias is not None:
            owner = next((k for k, la in layers.items() if la.bias == bias and k != path), None)
            if owner is not None or bias in layers:
                raise InputError(
                    f"layer-map override gives {path!r} the bias {bias!r}, which already "
                    f"belongs to layer {owner or bias!r}; a parameter is in one layer"
                )
            unmatched.pop(bias, None)


# ------------------------------------------------------------------- layer inputs


class LayerIO(NamedTuple):
    """One tapped forward pass (see :func:`layer_io`).

    Attributes:
        outputs: the model's outputs (as ``predict_fn`` returns them).
        inputs: kernel path -> the layer's input ``a_l`` (shape ``input_shape``).
        vjp: ``vjp(u) -> (J^T u, {kernel path: g_l})`` for an output cotangent ``u``;
            ``g_l = (d outputs / d y_l)^T u`` is the layer's output gradient (shape
            ``output_shape``). A ``jax.tree_util.Partial``: it crosses ``jit``.
        jvp: ``jvp(v) -> J v`` for a parameter tangent ``v`` (a ``Partial``).
    """

    outputs: Any
    inputs: dict[str, Any]
    vjp: Callable[[Any], tuple[PyTree, dict[str, Any]]]
    jvp: Callable[[PyTree], Any] | None = None

    def output_grads(self, u: Any) -> dict[str, Any]:
        """Kernel path -> the layer's output gradient for the output cotangent ``u``."""
        return self.vjp(u)[1]

    @property
    def linearization(self) -> Linearization:
        """The same pass as a :class:`~somax_plug.Linearization` (outputs, J v, J^T u).

        The built-in ``linearization`` resource returns this when ``layer_io`` is
        planned, so one forward pass serves the loss, the gradient, every curvature
        product and the layer inputs.
        """
        return Linearization(outputs=self.outputs, jvp=self.jvp,
                             vjp=jtu.Partial(_first, self.vjp))


def _first(vjp: Callable, u: Any) -> Any:
    return vjp(u)[0]


def _param_jvp(jvp: Callable, zeros: Any, v: PyTree) -> Any:
    return jvp(v, zeros)


def _transpose(transpose: Callable, u: Any) -> Any:
    return tuple(transpose(u))


def layer_io(
    predict_fn: Callable[[PyTree, Any], Any],
    params: PyTree,
    inputs: Any,
    layer_map: LayerMap,
) -> LayerIO:
    """Each layer's input and a VJP for its output gradient, from one forward pass.

    The model's jaxpr is evaluated with taps at the layers of ``layer_map``: at layer
    ``l`` (``y_l = contract(a_l, W_l)``) it records ``a_l`` and computes
    ``y_l + d_l`` with ``d_l = 0``. One ``jax.linearize`` of ``(params, d) ->
    outputs`` (and its transpose) then gives ``J v`` and, for an output cotangent
    ``u``, both ``J^T u`` and ``g_l = (dy_l)^T u`` (the cotangent of ``d_l``): the
    output gradients of every layer, from the same linearization, with no second
    forward pass. With ``u = dL/d outputs``, ``g_l`` is
    ``dL/dy_l`` and ``grad_{W_l} L = contract(a_l, g_l)`` over the batch and shared
    axes.

    Args:
        predict_fn, params, inputs: the model, as for :func:`discover` (``inputs`` the
            batch of this step; arrays, possibly traced).
        layer_map: from :func:`discover` (overrides included). A layer declared by an
            override must still have its kernel feeding one ``dot_general`` /
            ``conv_general_dilated``.

    Returns:
        :class:`LayerIO` ``(outputs, inputs, vjp)``.

    Raises:
        InputError: a layer of the map does not match the model's equations.

    Example:
        >>> import jax.numpy as jnp
        >>> p = {"w": jnp.ones((3, 2))}
        >>> f = lambda p, x: x @ p["w"]
        >>> x = jnp.arange(12.0).reshape(4, 3)
        >>> io = layer_io(f, p, x, discover(f, p, x))
        >>> bool((io.inputs["w"] == x).all()), io.output_grads(jnp.ones((4, 2)))["w"].shape
        (True, (4, 2))
    """
    ch = _chunking(predict_fn)
    if ch is not None:
        if ch.chunkable(inputs):
            return _chunked_layer_io(ch, params, inputs, layer_map)
        predict_fn = ch.predict  # as the canonical predict_fn: the model as it is
    closed, out_shape, n = _trace_checked("layer_io", predict_fn, params, inputs)
    scan, taps = _taps(closed, n, param_paths(params), layer_map)
    treedef_out = jtu.tree_structure(out_shape)
    zeros = {
        taps[w]: jax.numpy.zeros(s.out_shape, _out_dtype(closed.jaxpr, w))
        for w, s in scan.sites.items()
        if w in taps
    }
    act_pos = {w: scan.sites[w].act_pos for w in taps}

    def tapped(p: PyTree, d: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        acts: dict[str, Any] = {}
        outs = _eval_taps(closed.jaxpr, list(closed.consts),
                          [*jtu.tree_leaves(p), *jtu.tree_leaves(inputs)], taps, act_pos, d,
                          acts)
        return jtu.tree_unflatten(treedef_out, outs), acts

    return _linearized(tapped, params, zeros)


def _linearized(tapped: Callable, params: PyTree, zeros: dict[str, Any]) -> LayerIO:
    """:class:`LayerIO` from ``tapped(params, perturbations) -> (outputs, inputs)``."""
    outputs, jvp, acts = jax.linearize(tapped, params, zeros, has_aux=True)
    transpose = jax.linear_transpose(jvp, params, zeros)
    return LayerIO(
        outputs=outputs,
        inputs=acts,
        vjp=jtu.Partial(_transpose, transpose),
        jvp=jtu.Partial(_param_jvp, jvp, zeros),
    )


def _taps(
    closed: Any, n: int, paths: tuple[str, ...], layer_map: LayerMap
) -> tuple[_Scan, dict[tuple[int, ...], str]]:
    """The matched equations of ``closed`` and, for each layer of the map, its site."""
    scan = _scan(closed, n)
    by_kernel: dict[str, _Site] = {}
    for site in scan.sites.values():
        by_kernel.setdefault(paths[site.kernel], site)
    counts: dict[str, int] = {}
    for site in scan.sites.values():
        counts[paths[site.kernel]] = counts.get(paths[site.kernel], 0) + 1
    taps: dict[tuple[int, ...], str] = {}
    for la in layer_map:
        site = by_kernel.get(la.kernel)
        if site is None:
            raise InputError(
                f"layer {la.kernel!r} of the layer map feeds no dot_general or "
                f"conv_general_dilated of this model; layer_io taps only layers whose "
                f"kernel is a matmul or conv operand (take it out with an override None)"
            )
        if counts[la.kernel] > 1:
            raise InputError(
                f"layer {la.kernel!r} feeds {counts[la.kernel]} dot_general/conv equations; "
                "layer_io taps a kernel used once (take it out with an override None)"
            )
        if site.kind != la.kind:
            raise InputError(
                f"layer {la.kernel!r} is a {la.kind!r} layer in the map but the model "
                f"applies it as {site.kind!r}; rediscover the map or fix the override"
            )
        taps[site.where] = la.kernel
    return scan, taps


def _chunk_axis(la: Layer, axes: tuple[int, ...], chunk: tuple[int, ...],
                full: tuple[int, ...], k: int, what: str) -> int:
    """The one batch axis of a layer's input or output, checked against the chunks."""
    hint = ("use DataParallel(mesh, reduce_chunks=None) (GSPMD's reductions) for this "
            "model, or an override that gives the layer one batch axis, or None")
    if len(axes) != 1:
        raise InputError(
            f"layer {la.kernel!r} has {len(axes)} batch axes {axes} on its {what}; under "
            f"reduce_chunks the tapped pass splits a layer's {what} into the batch's "
            f"{k} chunks along exactly one batch axis; {hint}"
        )
    ax = axes[0]
    want = tuple(s * k if i == ax else s for i, s in enumerate(chunk))
    if full and (len(full) != len(chunk) or ax >= len(chunk) or tuple(full) != want):
        raise InputError(
            f"layer {la.kernel!r}: its {what} has shape {tuple(full)} on the whole batch "
            f"but {chunk} on one of the {k} chunks, which is not the whole split along "
            f"its batch axis {ax} (expected {want}); {hint}"
        )
    return ax


def _chunked_layer_io(ch: Any, params: PyTree, inputs: Any, layer_map: LayerMap) -> LayerIO:
    """:func:`layer_io` of a canonical model (``DataParallel(mesh, reduce_chunks=k)``).

    The base model's jaxpr is traced at one chunk's inputs (``B / k`` examples) and
    the tapped evaluation is ``vmap``-ed over the ``k`` chunks, with the parameters
    through the chunk broadcast (one copy per chunk) and each layer's perturbation
    ``d_l`` split along its output's batch axis. The outputs, the recorded layer
    inputs and (by transposition) the layer output gradients are merged back into
    the batch axis chunk-major, the order of :func:`canonical_batch_sum`'s chunks: so
    ``J^T u`` goes through the broadcast's fixed-order transpose and every factor
    summed by ``Loss.batch_sum`` sees chunk ``c`` where the model evaluated it.
    """
    k = ch.k
    one = jtu.tree_map(
        lambda x: jax.ShapeDtypeStruct((np.shape(x)[0] // k, *np.shape(x)[1:]), x.dtype),
        inputs)
    closed, out_shape, n = _trace_checked("layer_io", ch.predict, params, one)
    scan, taps = _taps(closed, n, param_paths(params), layer_map)
    layers = {la.kernel: la for la in layer_map}
    in_axis, out_axis, zeros = {}, {}, {}
    for w, kernel in taps.items():
        la, site = layers[kernel], scan.sites[w]
        in_axis[kernel] = _chunk_axis(la, la.batch_axes, site.act_shape, la.input_shape, k,
                                      "input")
        out_axis[kernel] = _chunk_axis(la, la.output_batch_axes, site.out_shape,
                                       la.output_shape, k, "output")
        full = tuple(s * k if i == out_axis[kernel] else s
                     for i, s in enumerate(site.out_shape))
        zeros[kernel] = jax.numpy.zeros(full, _out_dtype(closed.jaxpr, w))
    treedef_out = jtu.tree_structure(out_shape)
    act_pos = {w: scan.sites[w].act_pos for w in taps}

    def chunk(p: PyTree, x: Any, d: dict[str, Any]) -> tuple[list, dict[str, Any]]:
        acts: dict[str, Any] = {}
        outs = _eval_taps(closed.jaxpr, list(closed.consts),
                          [*jtu.tree_leaves(p), *jtu.tree_leaves(x)], taps, act_pos, d, acts)
        return outs, acts

    def tapped(p: PyTree, d: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        ds = {kn: ch.split(v, out_axis[kn]) for kn, v in d.items()}
        outs, acts = jax.vmap(chunk)(ch.broadcast(p), ch.split(inputs), ds)
        outs = [ch.merge(o) for o in outs]
        acts = {kn: ch.merge(a, in_axis[kn]) for kn, a in acts.items()}
        return jtu.tree_unflatten(treedef_out, outs), acts

    return _linearized(tapped, params, zeros)


def _out_dtype(jaxpr: Any, where: tuple[int, ...]) -> Any:
    eqn = jaxpr.eqns[where[0]]
    for i in where[1:]:
        eqn = _sub_jaxpr(eqn)[0].eqns[i]
    return eqn.outvars[0].aval.dtype


def _eval_taps(
    jaxpr: Any,
    consts: list,
    args: list,
    taps: Mapping[tuple[int, ...], str],
    act_pos: Mapping[tuple[int, ...], int],
    perts: Mapping[str, Any],
    acts: dict[str, Any],
    prefix: tuple[int, ...] = (),
) -> list:
    env: dict[Any, Any] = {}

    def read(v: Any) -> Any:
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts, strict=True):
        env[v] = x
    for v, x in zip(jaxpr.invars, args, strict=True):
        env[v] = x
    for i, eqn in enumerate(jaxpr.eqns):
        where = (*prefix, i)
        invals = [read(v) for v in eqn.invars]
        sub = _sub_jaxpr(eqn)
        if sub is not None and any(t[: len(where)] == where and t != where for t in taps):
            inner, inner_consts = sub
            outs = _eval_taps(inner, inner_consts, invals, taps, act_pos, perts, acts, where)
        else:
            with eqn.ctx.manager:
                ans = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
            outs = list(ans) if eqn.primitive.multiple_results else [ans]
            if where in taps:
                kernel = taps[where]
                acts[kernel] = invals[act_pos[where]]
                outs = [outs[0] + perts[kernel]]
        for v, x in zip(eqn.outvars, outs, strict=True):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _shape_of(v: Any) -> tuple[int, ...]:
    return tuple(getattr(v.aval, "shape", ()))


# ---------------------------------------------------------------- resource providers


def _output_grads(vjp: Callable, u: Any) -> dict[str, Any]:
    return vjp(u)[1]


def _chunking(predict_fn: Any) -> Any:
    """The chunking of a canonical model's predict_fn (``reduce_chunks``), or None."""
    if getattr(predict_fn, "chunking", None) is None:
        return None
    from somax_plug._src.sharding import chunking_of

    return chunking_of(predict_fn)


def _model_fn(model: Any) -> Callable[[PyTree, Any], Any]:
    """What the layer map traces: a canonical model's predict_fn (it carries its
    chunking), else ``model.outputs``."""
    fn = getattr(model, "predict_fn", None)
    return fn if _chunking(fn) is not None else model.outputs


def layer_map_provider(
    overrides: Mapping[str, Mapping[str, Any] | None] | None = None, *, plugin: str = ""
) -> ResourceProvider:
    """The ``layer_map`` resource: :func:`discover` on the step's model, params and inputs.

    The map is found when the step is traced (a static value: it costs nothing at run
    time). To override it, return this provider, built with ``overrides``, from a
    plugin's ``somax_plug_provide_resource`` hook for ``"layer_map"`` (the first
    answer wins over the built-in one). The override values are checked here; the
    paths when the step is traced (before any FLOP).

    Example:
        >>> layer_map_provider({"params/Embed_0/embedding": None}).name
        'layer_map'
    """
    table = dict(overrides or {})
    _check_overrides(table, None)

    def compute(res: Any) -> LayerMap:
        return discover(_model_fn(res.model), res.params, res.inputs, table)

    return ResourceProvider(
        "layer_map",
        compute,
        plugin=plugin,
        summary="dense/conv layers found in the model's jaxpr (static, at trace time)"
        + (f", {len(table)} override(s)" if table else ""),
    )


def layer_providers(plugin: str = "builtin") -> dict[str, ResourceProvider]:
    """``layer_map``, ``layer_io``, ``layer_inputs`` and ``layer_output_grads``.

    ``layer_io`` is one tapped forward pass (:func:`layer_io`); ``layer_inputs`` is
    its kernel path -> layer input dict; ``layer_output_grads`` its VJP, as a
    ``jax.tree_util.Partial`` ``u -> {kernel path: output gradient}`` (``u`` an
    output cotangent: ``output_grad`` for the gradient, or sampled columns of the
    output Hessian's square root for a Fisher/GGN factor).
    """

    def io(res: Any) -> LayerIO:
        return layer_io(_model_fn(res.model), res.params, res.inputs, res["layer_map"])

    def grads(res: Any) -> Callable[[Any], dict[str, Any]]:
        return jtu.Partial(_output_grads, res["layer_io"].vjp)

    return {
        p.name: p
        for p in (
            layer_map_provider(plugin=plugin),
            ResourceProvider(
                "layer_io",
                io,
                requires={"layer_map"},
                plugin=plugin,
                summary="one tapped forward pass: outputs, layer inputs, VJP to layer outputs",
            ),
            ResourceProvider(
                "layer_inputs",
                lambda res: res["layer_io"].inputs,
                requires={"layer_io"},
                plugin=plugin,
                summary="kernel path -> the layer's input",
            ),
            ResourceProvider(
                "layer_output_grads",
                grads,
                requires={"layer_io"},
                plugin=plugin,
                summary="u -> kernel path -> the layer's output gradient (a VJP, no new forward)",
            ),
        )
    }

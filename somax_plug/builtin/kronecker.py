"""Kronecker-factored curvature (plugin ``"builtin"``): KFAC and EKFAC.

Notation (one dense layer ``y = a W (+ b)`` of the layer map, see
:mod:`somax_plug.layers`): ``a_{bt}`` the layer input of example ``b`` at shared
position ``t`` (tokens, ``T = 1`` without weight sharing) with a trailing ``1`` when
the layer has a bias, ``g_{rbt} = (d outputs / d y_{bt})^T u_r`` the output-side
vector of the r-th *cotangent column* ``u_r``, ``M_{rb} = sum_t a_{bt} g_{rbt}^T`` the
per-column gradient of ``[W; b]``. The cotangent columns say which curvature is
factored (``source``), each with ``C_block = sum_{r,b} vec(M_rb) vec(M_rb)^T``:

==============  ===========================================================  =========
source          columns ``u_r`` (per example ``b``)                            C
==============  ===========================================================  =========
``ggn``         the columns of the loss's output-Hessian square root ``L_b``   GGN
                (``H_b = L_b L_b^T``, type-2 vectors: exact)
``fisher``      ``dL/dz(z, y_s) / sqrt(c S)`` for ``S`` sampled targets        Fisher (MC)
``empirical``   ``dL/dz(z, y) / sqrt(c)`` at the data's targets                empirical
                                                                               Fisher
==============  ===========================================================  =========

(``c`` the reduction factor: ``1/B`` for the mean). KFAC replaces each block by
``A (x) G`` (row-major ``vec``: ``(A (x) G) vec(M) = vec(A M G)``):

* ``expand`` (positions as extra examples): ``A = 1/(B T) sum_{b,t} a a^T``,
  ``G = sum_{r,b,t} g g^T``;
* ``reduce`` (Eschenhagen et al. 2023): ``A = 1/B sum_b abar abar^T`` with ``abar_b``
  the mean of ``a_{bt}`` over ``t``, ``G = sum_{r,b} gsum gsum^T`` with ``gsum`` the sum
  over ``t``. Without weight sharing (``T = 1``) both are the same.

For one example and one layer, KFAC is the GGN block exactly. EKFAC (George et al.
2018) keeps KFAC's eigenbasis ``Q = Q_A (x) Q_G`` and replaces its eigenvalues by the
exact diagonal of the block in that basis, ``S = sum_{r,b} (Q_A^T M_rb Q_G)**2``
(elementwise), so that ``C_ekfac = Q diag(S) Q^T`` is never further from the block in
Frobenius norm than KFAC.

A conv layer is factored the same way with ``a_{bt}`` the im2col patch of the input at
output position ``t`` (:func:`_patches`, features ordered ``(in channel, window)``) and
the kernel viewed as ``[in * window, out]``.

Parameters that the layer map does not cover (LayerNorm scales, embeddings, a kernel
used twice, a grouped conv, a bias that does not match its layer's output) get a
diagonal block ``d_p = sum_r (J^T u_r)_p^2``; with more than one example the columns
are multiplied per example by Rademacher signs first, which makes ``d`` an unbiased
estimate of the exact diagonal ``sum_{r,b} (J_b^T u_rb)_p^2`` (exact for one example).
They are listed, with the reason, in :attr:`KroneckerFactors.uncovered`.

Resources (``kfac_factors_<source>_<approx>``; ``fisher`` draws one target per
example) are computed once per step from the shared tapped pass (``layer_io``) and
shared by every component that reads them.

Example:
    >>> from somax_plug.builtin.kronecker import factor_resource, PROVIDERS
    >>> factor_resource("ggn", "expand") in PROVIDERS
    True

References: Martens & Grosse (2015), "Optimizing neural networks with
Kronecker-factored approximate curvature"; George et al. (2018), "Fast approximate
natural gradient descent in a Kronecker-factored eigenbasis"; Eschenhagen et al.
(2023), "Kronecker-factored approximate curvature for modern neural network
architectures".
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import attrs
import numpy as np

from somax_plug import (
    DIAG,
    PSD,
    SYMMETRIC,
    Choices,
    Curvature,
    Estimator,
    InputError,
    Preconditioner,
    PytreeOperator,
    ResourceProvider,
    Resources,
    Solver,
    SolverInfo,
    choices_field,
    declare,
    lazy_import,
    option,
    tree,
)
from somax_plug.losses import batch_size_of, compute_dtype, flatten_per_example

jax = lazy_import("jax")
jnp = lazy_import("jax.numpy")

PyTree = Any
Array = Any

KRONECKER = "kronecker"
"""Operator tag: ``inverse_mv(v, lam)`` and ``damped_mv(v, lam)`` are exact and cheap."""
SOURCES = ("ggn", "fisher", "empirical")
APPROXIMATIONS = ("expand", "reduce")
MATRIX_MAX = 4096
"""The preconditioner's default ``max_dim``: the largest factor it keeps (4096^2 numbers)."""

__all__ = [
    "EKFAC",
    "KFAC",
    "KRONECKER",
    "PROVIDERS",
    "Block",
    "KFACEMA",
    "KFACPreconditioner",
    "KroneckerFactors",
    "KroneckerInverse",
    "KroneckerOperator",
    "blocks_of",
    "compute_factors",
    "factor_resource",
]


def param_paths(params: PyTree) -> tuple[str, ...]:
    """:func:`somax_plug.layers.param_paths` (imported when first used: it imports JAX)."""
    from somax_plug.layers import param_paths as paths

    return paths(params)


def factor_resource(source: str, approx: str) -> str:
    """The resource name of the factors for ``source`` and ``approx``.

    Example:
        >>> factor_resource("fisher", "reduce")
        'kfac_factors_fisher_reduce'
    """
    return f"kfac_factors_{source}_{approx}"


# ------------------------------------------------------------------ layer blocks


@attrs.frozen
class Block:
    """How one dense layer's ``[W; b]`` is viewed as a ``[din (+1), dout]`` matrix.

    ``W.transpose(kernel_perm).reshape(din, dout)`` is the kernel as a matrix (rows:
    the contracted input features, columns: the output features); the layer input
    ``a.transpose(a_perm).reshape(B, T, din)`` and the output-side vector
    ``g.transpose(g_perm).reshape(B, T, dout)``, with ``B`` the product of the batch
    axes and ``T`` of the shared ones.
    """

    kernel: str
    kernel_shape: tuple[int, ...]
    kernel_perm: tuple[int, ...]
    din: int
    dout: int
    bias: str | None
    a_perm: tuple[int, ...]
    a_batch: int
    g_perm: tuple[int, ...]
    conv: tuple[tuple[str, Any], ...] = ()
    """For a conv layer: the patch parameters (the input ``a`` is first replaced by its
    im2col patches (:func:`_patches`), features ordered ``(in, window)``)."""

    @property
    def rows(self) -> int:
        """``din + 1`` with a bias, else ``din``."""
        return self.din + (self.bias is not None)


def _bias_ok(la: Any, feature_shape: tuple[int, ...], dout: int) -> bool:
    return la.bias is not None and la.bias_shape is not None and math.prod(
        la.bias_shape) == dout and tuple(d for d in la.bias_shape if d != 1) == tuple(
        d for d in feature_shape if d != 1)


def _conv_block(la: Any) -> tuple[Block | None, str, bool]:
    p = dict(la.params)
    dn = p.get("dimension_numbers")
    if dn is None or "window_strides" not in p:
        return None, "conv declared by an override without its parameters", False
    if p.get("feature_group_count", 1) != 1 or p.get("batch_group_count", 1) != 1:
        return None, "grouped convolution", False
    lhs, rhs, out = (tuple(x) for x in dn)
    ks = la.kernel_shape
    if len(ks) != len(rhs):
        return None, (f"conv kernel of rank {len(rhs)} reshaped from a parameter of shape "
                      f"{tuple(ks)} (its layout in the parameter is unknown)"), False
    o_ax, i_ax, k_sp = rhs[0], rhs[1], rhs[2:]
    din = ks[i_ax] * math.prod(ks[i] for i in k_sp)
    dout = ks[o_ax]
    bias_ok = _bias_ok(la, (dout,), dout)
    order = (out[0], *out[2:], out[1])  # patches and outputs: (N, spatial..., features)
    conv = (
        ("filter_shape", tuple(ks[i] for i in k_sp)),
        ("window_strides", tuple(p["window_strides"])),
        ("padding", p["padding"]),
        ("lhs_dilation", p.get("lhs_dilation")),
        ("rhs_dilation", p.get("rhs_dilation")),
        ("dimension_numbers", (lhs, rhs, out)),
    )
    block = Block(kernel=la.kernel, kernel_shape=tuple(ks), kernel_perm=(i_ax, *k_sp, o_ax),
                  din=din, dout=dout, bias=la.bias if bias_ok else None, a_perm=order,
                  a_batch=1, g_perm=order, conv=conv)
    return block, "", bias_ok


def _patches(a: Array, conv: tuple[tuple[str, Any], ...]) -> Array:
    """im2col: the input patches of a conv, features ``(in channel, window...)``.

    The result of ``jax.lax.conv_general_dilated_patches`` (laid out by the conv's output
    spec), computed as one strided slice of the zero-padded input per window offset:
    that function is a grouped convolution with a one-hot kernel, which XLA's CPU
    backend runs on a slow path (the digits CNN's 16 -> 32 layer, 128 images: about
    2 ms of a 15 ms ``kfac`` step). An input dilation (a transposed conv) takes that
    function itself.

    Example:
        >>> import jax.numpy as jnp
        >>> conv = (("filter_shape", (2,)), ("window_strides", (1,)), ("padding", "VALID"),
        ...         ("lhs_dilation", None), ("rhs_dilation", None),
        ...         ("dimension_numbers", ((0, 2, 1), (2, 1, 0), (0, 2, 1))))  # NWC, WIO
        >>> _patches(jnp.arange(3.0).reshape(1, 3, 1), conv)[0].tolist()
        [[0.0, 1.0], [1.0, 2.0]]
    """
    c = dict(conv)
    dn = jax.lax.ConvDimensionNumbers(*c["dimension_numbers"])
    window, strides = tuple(c["filter_shape"]), tuple(c["window_strides"])
    if c["lhs_dilation"] is not None and any(d != 1 for d in c["lhs_dilation"]):
        return jax.lax.conv_general_dilated_patches(
            a, window, strides, c["padding"], lhs_dilation=c["lhs_dilation"],
            rhs_dilation=c["rhs_dilation"], dimension_numbers=dn,
            precision=jax.lax.Precision.HIGHEST)
    lhs, out = dn.lhs_spec, dn.out_spec
    x = a.transpose((lhs[0], *lhs[2:], lhs[1]))  # (N, spatial..., C)
    dil = tuple(c["rhs_dilation"] or (1,) * len(window))
    reach = tuple((k - 1) * d + 1 for k, d in zip(window, dil, strict=True))
    pads = c["padding"]
    if isinstance(pads, str):
        pads = jax.lax.padtype_to_pads(x.shape[1:-1], reach, strides, pads)
    x = jnp.pad(x, ((0, 0), *(tuple(p) for p in pads), (0, 0)))
    size = tuple((n - r) // s + 1 for n, r, s in zip(x.shape[1:-1], reach, strides,
                                                     strict=True))
    cols = []
    for offset in itertools.product(*(range(k) for k in window)):
        start = (0, *(o * d for o, d in zip(offset, dil, strict=True)), 0)
        stop = (x.shape[0], *(st + (n - 1) * s + 1 for st, n, s in zip(
            start[1:-1], size, strides, strict=True)), x.shape[-1])
        cols.append(jax.lax.slice(x, start, stop, (1, *strides, 1)))
    p = jnp.stack(cols, axis=-1)  # (N, out spatial..., C, window)
    p = p.reshape(*p.shape[:-2], -1)
    perm = [0] * p.ndim  # to the output spec's layout
    perm[out[0]], perm[out[1]] = 0, p.ndim - 1
    for i, ax in enumerate(out[2:]):
        perm[ax] = 1 + i
    return p.transpose(perm)


def _dense_block(la: Any) -> tuple[Block | None, str, bool]:
    """``(block, reason, bias_ok)`` for one layer of the map."""
    if la.kind == "conv":
        return _conv_block(la)
    if la.kind != "dense":
        return None, f"{la.kind} layer: not factored", False
    p = dict(la.params)
    dn = p.get("dimension_numbers")
    if dn is None:
        return None, "declared by an override without dimension_numbers", False
    (lc, rc), (lb, rb) = dn
    if tuple(lb) or tuple(rb):
        return None, "dot_general with batch dimensions (a per-example kernel)", False
    k1 = la.kernel_operand == 1
    kc, ac = (tuple(rc), tuple(lc)) if k1 else (tuple(lc), tuple(rc))
    ks = la.kernel_shape
    kfree = tuple(i for i in range(len(ks)) if i not in kc)
    a_nd = len(la.input_shape)
    afree = tuple(i for i in range(a_nd) if i not in ac)
    batch = set(la.batch_axes)
    if not batch or not batch <= set(afree):
        return None, f"no batch axis among the input's free axes {afree}", False
    base = 0 if k1 else len(kfree)
    fbase = len(afree) if k1 else 0
    a_b = [i for i in afree if i in batch]
    a_s = [i for i in afree if i not in batch]
    g_b = [base + j for j, i in enumerate(afree) if i in batch]
    g_s = [base + j for j, i in enumerate(afree) if i not in batch]
    feat = [fbase + j for j in range(len(kfree))]
    din = math.prod(ks[i] for i in kc)
    dout = math.prod(ks[i] for i in kfree)
    bias_ok = _bias_ok(la, tuple(ks[i] for i in kfree), dout)
    block = Block(
        kernel=la.kernel,
        kernel_shape=tuple(ks),
        kernel_perm=(*kc, *kfree),
        din=din,
        dout=dout,
        bias=la.bias if bias_ok else None,
        a_perm=(*a_b, *a_s, *ac),
        a_batch=len(a_b),
        g_perm=(*g_b, *g_s, *feat),
    )
    return block, "", bias_ok


def blocks_of(layer_map: Any) -> tuple[tuple[Block, ...], tuple[tuple[str, str], ...]]:
    """The factored blocks of a layer map and every other parameter, with the reason.

    Example:
        >>> import jax.numpy as jnp
        >>> from somax_plug.layers import discover
        >>> p = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2), "s": jnp.ones(2)}
        >>> lm = discover(lambda p, x: p["s"] * (x @ p["w"] + p["b"]), p, jnp.ones((4, 3)))
        >>> blocks, uncovered = blocks_of(lm)
        >>> (blocks[0].din, blocks[0].dout, blocks[0].bias), uncovered
        ((3, 2, 'b'), (('s', 'used by mul (not a dense or conv layer)'),))
    """
    blocks, uncovered = [], dict(layer_map.unmatched)
    for la in layer_map:
        block, why, bias_ok = _dense_block(la)
        if block is None:
            uncovered[la.kernel] = why
            if la.bias is not None:
                uncovered[la.bias] = f"bias of {la.kernel!r}, which is not factored ({why})"
            continue
        if la.bias is not None and not bias_ok:
            uncovered[la.bias] = (
                f"bias of {la.kernel!r} with shape {la.bias_shape}, not the layer's "
                f"{block.dout} output features"
            )
        blocks.append(block)
    order = {p: i for i, p in enumerate(layer_map.paths)}
    return tuple(blocks), tuple(sorted(uncovered.items(), key=lambda kv: order.get(kv[0], 0)))


# ------------------------------------------------------------------ the factors


class KroneckerFactors:
    """Per-layer factors of one step (a pytree; the layout is static).

    Attributes:
        blocks, uncovered: from :func:`blocks_of`; ``paths`` the parameter paths.
        A, G: per block, ``[rows, rows]`` and ``[dout, dout]`` (see the module docs).
        a, g: per block, the rows they are made of: ``a`` ``[B, T, rows]``, ``g``
            ``[R, B, T, dout]`` (EKFAC's correction reads them).
        diag: uncovered path -> its diagonal block (the leaf's shape).
        approx: ``"expand"`` or ``"reduce"``.
    """

    def __init__(self, blocks: tuple, uncovered: tuple, paths: tuple, approx: str,
                 A: list, G: list, a: list, g: list, diag: dict) -> None:  # noqa: N803
        self.blocks, self.uncovered, self.paths, self.approx = blocks, uncovered, paths, approx
        self.A, self.G, self.a, self.g, self.diag = A, G, a, g, diag


jax_tree_registered = False


def _register() -> None:
    global jax_tree_registered
    if jax_tree_registered:
        return
    jax.tree_util.register_pytree_node(
        KroneckerFactors,
        lambda f: ((f.A, f.G, f.a, f.g, f.diag), (f.blocks, f.uncovered, f.paths, f.approx)),
        lambda aux, ch: KroneckerFactors(*aux, *ch),
    )
    jax_tree_registered = True


def _columns(res: Resources, source: str, outputs: Any) -> Array:
    """Cotangent columns ``[R, B, K]`` (flattened per example) for ``source``."""
    loss = res.model.loss
    c = loss.scale(batch_size_of(outputs))
    dt = compute_dtype(flatten_per_example(outputs).dtype)
    if source == "ggn":
        sq = res["output_hessian"].sqrt
        if sq is None:
            raise InputError(
                f"KFAC source 'ggn' needs the output Hessian's square root, which loss "
                f"{loss.name!r} does not give; use source 'fisher' or 'empirical'"
            )
        return jnp.moveaxis(jnp.asarray(sq, dt), 2, 0)
    if source == "fisher":
        try:
            targets = loss.sample_targets(res.key_for("kfac_fisher"), outputs, 1)
        except NotImplementedError as exc:
            raise InputError(
                f"KFAC source 'fisher' samples targets, which loss {loss.name!r} cannot: "
                f"{exc}; or use source 'ggn' or 'empirical'"
            ) from None
        grads = jax.vmap(lambda t: loss.output_grad(outputs, t))(targets)
        return jax.vmap(flatten_per_example)(grads).astype(dt) / math.sqrt(c)
    return flatten_per_example(res["output_grad"], dt)[None] / math.sqrt(c)


def _unflatten(col: Array, like: Any) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten(like)
    out, start = [], 0
    for x in leaves:
        shape = tuple(x.shape[1:])
        size = math.prod(shape)
        out.append(col[:, start:start + size].reshape((x.shape[0], *shape)).astype(x.dtype))
        start += size
    return jax.tree_util.tree_unflatten(treedef, out)


def compute_factors(res: Resources, source: str, approx: str) -> KroneckerFactors:
    """The factors of this step from the shared tapped pass (see the module docs).

    Reads ``layer_map``, ``layer_io`` and, by ``source``, ``output_hessian``,
    ``output_grad`` or one sampled target per example (``res.key_for("kfac_fisher")``).
    """
    _register()
    lm, io = res["layer_map"], res["layer_io"]
    blocks, uncovered = blocks_of(lm)
    paths = param_paths(res.params)
    outputs = io.outputs
    cols = _columns(res, source, outputs)  # [R, B, K]
    b = cols.shape[1]
    if uncovered and b > 1:
        signs = jax.random.rademacher(res.key_for("kfac_signs"), (b,), cols.dtype)
        cols = cols * signs[None, :, None]
    us = jax.vmap(lambda col: _unflatten(col, outputs))(cols)
    pgrads, ggrads = jax.vmap(io.vjp)(us)
    pleaves = dict(zip(paths, jax.tree_util.tree_leaves(pgrads), strict=True))
    dt = cols.dtype
    bsum = res.model.loss.batch_sum
    A, G, a_rows, g_rows = [], [], [], []  # noqa: N806
    for blk in blocks:
        a = jnp.asarray(io.inputs[blk.kernel], dt)
        if blk.conv:
            a = _patches(a, blk.conv)
        a = a.transpose(blk.a_perm)
        bsz = math.prod(a.shape[: blk.a_batch])
        a = a.reshape(bsz, -1, blk.din)
        if blk.bias is not None:
            a = jnp.concatenate([a, jnp.ones((*a.shape[:2], 1), dt)], axis=-1)
        g = jnp.asarray(ggrads[blk.kernel], dt)
        g = g.transpose((0, *(i + 1 for i in blk.g_perm))).reshape(g.shape[0], bsz, -1, blk.dout)
        t = a.shape[1]
        # sums over the batch (leading axis; g's [R, B] rows as [B, R]): device-count
        # independent under reduce_chunks (Loss.batch_sum). G contracts b, r, t in one
        # einsum: gram of g reshaped to rows rounded differently with one chunk per
        # device (3.8e-6, float32)
        if approx == "expand":
            A.append(bsum(lambda x: gram(x.reshape(-1, x.shape[-1])), a) / (bsz * t))
            G.append(bsum(lambda x: jnp.einsum("brti,brtj->ij", x, x), g.swapaxes(0, 1)))
        else:
            am, gs = a.mean(axis=1), g.sum(axis=2)
            A.append(bsum(gram, am) / bsz)
            G.append(bsum(lambda x: jnp.einsum("bri,brj->ij", x, x), gs.swapaxes(0, 1)))
        a_rows.append(a)
        g_rows.append(g)
    diag = {p: jnp.sum(jnp.square(pleaves[p].astype(dt)), axis=0) for p, _ in uncovered}
    return KroneckerFactors(blocks, uncovered, paths, approx, A, G, a_rows, g_rows, diag)


def gram(x: Array) -> Array:
    """``x^T x`` for ``x`` of shape ``[N, n]``: one matrix product.

    Not one triangle by block recursion (``N n^2 (1 + 1/2^k)`` FLOPs instead of
    ``2 N n^2``), which this module did until 2026-12-01: on XLA's CPU backend the
    blocks' slices, transposes and concatenation cost more than the FLOPs saved
    (``kfac`` step of the 784-256-10 MLP, batch 256, inverses every 10 steps: 13.2 ms
    with one product against 13.8 ms, interleaved).

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.arange(6.0).reshape(2, 3)
        >>> bool(jnp.allclose(gram(x), x.T @ x))
        True
    """
    return x.T @ x


def _provider(source: str, approx: str) -> ResourceProvider:
    need = {"ggn": {"output_hessian"}, "fisher": set(), "empirical": {"output_grad"}}[source]
    return ResourceProvider(
        factor_resource(source, approx),
        lambda res: compute_factors(res, source, approx),
        requires={"layer_map", "layer_io", *need},
        plugin="builtin",
        summary=f"Kronecker factors A, G per dense layer ({source}, KFAC-{approx}), "
        "diagonal blocks for the rest",
    )


PROVIDERS = {
    factor_resource(s, a): _provider(s, a) for s in SOURCES for a in APPROXIMATIONS
}
"""Resource name -> provider, one per source and approximation."""


# ------------------------------------------------------------------ the operator


def _eigh(m: Array) -> tuple[Array, Array]:
    d, q = jnp.linalg.eigh(0.5 * (m + m.T))
    return jnp.maximum(d, 0), q


def _pi(a: Array, g: Array, dt: Any) -> Array:
    """Martens & Grosse's pi: ``sqrt((tr A / dim A) / (tr G / dim G))`` (1 if degenerate)."""
    ta, tg = jnp.trace(a) / a.shape[0], jnp.trace(g) / g.shape[0]
    ok = (ta > 0) & (tg > 0)
    return jnp.where(ok, jnp.sqrt(jnp.where(ok, ta / jnp.where(ok, tg, 1), 1)), 1).astype(dt)


class KroneckerOperator(PytreeOperator):
    """Block-diagonal ``C = blockdiag_l(A_l (x) G_l) + diag(d)`` (KFAC) or EKFAC.

    ``mv``, ``diag``, ``to_dense`` (the default, from ``mv``), and two exact products
    with a damping ``lam``: ``damped_mv(v, lam)`` and ``inverse_mv(v, lam)``, its
    inverse. With ``pi_damping`` a KFAC block is damped as
    ``(A + pi sqrt(lam) I) (x) (G + sqrt(lam)/pi I)`` (Martens & Grosse 2015, sec. 6.3),
    else (and always for EKFAC and diagonal blocks) as ``C + lam I``.
    """

    tags = frozenset({SYMMETRIC, PSD, DIAG, KRONECKER})
    _children = ("primal", "factors", "eig")
    _static = ("mode", "pi_damping")

    def __init__(self, primal: PyTree, factors: KroneckerFactors, mode: str = "kfac",
                 pi_damping: bool = False, eig: Any = None) -> None:
        self.primal = primal
        self.factors = factors
        self.mode = mode
        self.pi_damping = pi_damping
        if eig is None and mode == "ekfac":
            eig = [_ekfac_eig(a, g, ra, rg, factors.approx)
                   for a, g, ra, rg in zip(factors.A, factors.G, factors.a, factors.g,
                                           strict=True)]
        self.eig = eig

    @property
    def uncovered(self) -> tuple[tuple[str, str], ...]:
        """``(path, reason)`` of every parameter with a diagonal block."""
        return self.factors.uncovered

    # matrix views of the blocks
    def _leaves(self, v: PyTree) -> tuple[dict, Any]:
        leaves, treedef = jax.tree_util.tree_flatten(v)
        return dict(zip(self.factors.paths, leaves, strict=True)), treedef

    def _mat(self, blk: Block, lv: dict, dt: Any) -> Array:
        m = jnp.asarray(lv[blk.kernel], dt).transpose(blk.kernel_perm).reshape(blk.din, blk.dout)
        if blk.bias is not None:
            m = jnp.concatenate([m, jnp.asarray(lv[blk.bias], dt).reshape(1, blk.dout)], 0)
        return m

    def _put(self, blk: Block, m: Array, lv: dict, out: dict) -> None:
        k = lv[blk.kernel]
        shape = tuple(blk.kernel_shape[i] for i in blk.kernel_perm)
        inv = tuple(int(i) for i in _argsort(blk.kernel_perm))
        out[blk.kernel] = m[: blk.din].reshape(shape).transpose(inv).astype(k.dtype)
        if blk.bias is not None:
            out[blk.bias] = m[blk.din].reshape(lv[blk.bias].shape).astype(lv[blk.bias].dtype)

    def _apply(self, v: PyTree, block_fn: Any, diag_fn: Any) -> PyTree:
        lv, treedef = self._leaves(v)
        dt = compute_dtype(tree.accum_dtype(v))
        out = dict(lv)
        for i, blk in enumerate(self.factors.blocks):
            self._put(blk, block_fn(i, self._mat(blk, lv, dt)), lv, out)
        for p, _ in self.factors.uncovered:
            d = self.factors.diag[p]
            out[p] = diag_fn(d.astype(dt), jnp.asarray(lv[p], dt)).astype(lv[p].dtype)
        return jax.tree_util.tree_unflatten(treedef, [out[p] for p in self.factors.paths])

    def _in_basis(self, i: int, m: Array, scale: Any) -> Array:
        (qa, qg), s = self._basis(i)
        return qa @ (scale(s) * (qa.T @ m @ qg)) @ qg.T

    def _basis(self, i: int) -> tuple[tuple[Array, Array], Array]:
        if self.mode == "ekfac":
            qa, qg, s = self.eig[i]
            return (qa, qg), s
        da, qa = _eigh(self.factors.A[i])
        dg, qg = _eigh(self.factors.G[i])
        return (qa, qg), da[:, None] * dg[None, :]

    def mv(self, v: PyTree) -> PyTree:
        f = self.factors
        if self.mode == "ekfac":
            return self._apply(v, lambda i, m: self._in_basis(i, m, lambda s: s),
                               lambda d, x: d * x)
        return self._apply(v, lambda i, m: f.A[i].astype(m.dtype) @ m @ f.G[i].astype(m.dtype),
                           lambda d, x: d * x)

    def diag(self) -> PyTree:
        def block(i: int, m: Array) -> Array:
            if self.mode == "ekfac":
                (qa, qg), s = self._basis(i)
                return ((qa**2) @ s @ (qg**2).T).astype(m.dtype)
            return jnp.outer(jnp.diag(self.factors.A[i]), jnp.diag(self.factors.G[i])).astype(
                m.dtype
            )

        return self._apply(self.primal, block, lambda d, x: d * jnp.ones_like(x))

    def _pis(self, i: int, lam: Array, dt: Any) -> tuple[Array, Array]:
        a, g = self.factors.A[i].astype(dt), self.factors.G[i].astype(dt)
        pi = _pi(a, g, dt)
        r = jnp.sqrt(jnp.maximum(jnp.asarray(lam, dt), 0))
        return pi * r, r / pi

    def damped_mv(self, v: PyTree, lam: Array) -> PyTree:
        """``(C + lam I) v``, or with ``pi_damping`` the factored damping of each block."""
        if not (self.pi_damping and self.mode == "kfac"):
            return jax.tree_util.tree_map(
                lambda cv, x: (cv + jnp.asarray(lam, cv.dtype) * x).astype(x.dtype),
                self.mv(v), v)
        f = self.factors

        def block(i: int, m: Array) -> Array:
            ea, eg = self._pis(i, lam, m.dtype)
            a = f.A[i].astype(m.dtype) + ea * jnp.eye(m.shape[0], dtype=m.dtype)
            g = f.G[i].astype(m.dtype) + eg * jnp.eye(m.shape[1], dtype=m.dtype)
            return a @ m @ g

        return self._apply(v, block, lambda d, x: (d + lam) * x)

    def inverse_mv(self, v: PyTree, lam: Array) -> PyTree:
        """The exact inverse of :meth:`damped_mv` (eigendecompositions of the factors)."""
        pi = self.pi_damping and self.mode == "kfac"

        def block(i: int, m: Array) -> Array:
            lam_ = jnp.asarray(lam, m.dtype)
            if pi:
                da, qa = _eigh(self.factors.A[i].astype(m.dtype))
                dg, qg = _eigh(self.factors.G[i].astype(m.dtype))
                ea, eg = self._pis(i, lam, m.dtype)
                den = (da + ea)[:, None] * (dg + eg)[None, :]
                return qa @ ((qa.T @ m @ qg) / den) @ qg.T
            return self._in_basis(i, m, lambda s: 1 / (s.astype(m.dtype) + lam_))

        return self._apply(v, block, lambda d, x: x / (d + lam))


class LeafKroneckerOperator(PytreeOperator):
    """``C = blockdiag`` per parameter leaf, from estimator ``kfac_ema``'s running averages.

    The statistic's layout (the preconditioner ``kfac``'s, see
    :class:`KFACPreconditioner`): a leaf ``X`` viewed as an ``[s1, s2]`` matrix with
    running factors ``L`` (``s1 x s1``) and ``R`` (``s2 x s2``) has the block ``L (x) R``,
    ``C vec(X) = vec(L X R)``; a vector leaf with ``M`` has ``M``; every other leaf (or
    one whose average is only a diagonal, ``kron`` false) has ``diag(d)``. A bias's
    coupling to its kernel is not in the averages, so unlike :class:`KroneckerOperator`
    (this step's factors) a bias is its own block. ``damped_mv`` / ``inverse_mv``: ``C +
    lam I``, or with ``pi_damping`` a factored block ``(L + pi sqrt(lam) I) (x) (R +
    sqrt(lam)/pi I)`` and its exact inverse.

    Example:
        >>> import jax.numpy as jnp
        >>> leaves = {"w": {"L": 2 * jnp.eye(2), "R": 3 * jnp.eye(1), "diag": jnp.zeros((2, 1)),
        ...                 "kron": jnp.ones((), bool)}}
        >>> op = LeafKroneckerOperator({"w": jnp.zeros((2, 1))}, leaves)
        >>> op.mv({"w": jnp.ones((2, 1))})["w"].tolist()
        [[6.0], [6.0]]
    """

    tags = frozenset({SYMMETRIC, PSD, DIAG, KRONECKER})
    _children = ("primal", "leaves")
    _static = ("pi_damping",)

    def __init__(self, primal: PyTree, leaves: dict, pi_damping: bool = False) -> None:
        self.primal = primal
        self.leaves = leaves
        self.pi_damping = pi_damping

    def _apply(self, v: PyTree, mat: Any, vec: Any, dia: Any) -> PyTree:
        paths = param_paths(v)
        xs, treedef = jax.tree_util.tree_flatten(v)
        out = []
        for p, x in zip(paths, xs, strict=True):
            st = self.leaves[p]
            xd = jnp.asarray(x, st["diag"].dtype)
            y = dia(st, xd)
            if "L" in st:
                m = xd.reshape(st["L"].shape[0], st["R"].shape[0])
                y = jnp.where(st["kron"], mat(st, m).reshape(xd.shape), y)
            elif "M" in st:
                y = jnp.where(st["kron"], vec(st, xd), y)
            out.append(y.astype(x.dtype))
        return jax.tree_util.tree_unflatten(treedef, out)

    def mv(self, v: PyTree) -> PyTree:
        return self._apply(v, lambda st, m: st["L"] @ m @ st["R"],
                           lambda st, x: st["M"] @ x, lambda st, x: st["diag"] * x)

    def diag(self) -> PyTree:
        return self._apply(
            self.primal, lambda st, m: jnp.outer(jnp.diag(st["L"]), jnp.diag(st["R"])),
            lambda st, x: jnp.diag(st["M"]), lambda st, x: st["diag"] * jnp.ones_like(x))

    def _shifts(self, st: dict, lam: Array) -> tuple[Array, Array]:
        dt = st["L"].dtype
        pi = _pi(st["L"], st["R"], dt)
        r = jnp.sqrt(jnp.maximum(jnp.asarray(lam, dt), 0))
        return pi * r, r / pi

    def damped_mv(self, v: PyTree, lam: Array) -> PyTree:
        """``(C + lam I) v``, or with ``pi_damping`` the factored damping of each block."""
        if not self.pi_damping:
            return jax.tree_util.tree_map(
                lambda cv, x: (cv + jnp.asarray(lam, cv.dtype) * x).astype(x.dtype),
                self.mv(v), v)

        def mat(st: dict, m: Array) -> Array:
            ea, eg = self._shifts(st, lam)
            return (st["L"] @ m + ea * m) @ st["R"] + eg * (st["L"] @ m + ea * m)

        lam_ = lambda st: jnp.asarray(lam, st["diag"].dtype)  # noqa: E731
        return self._apply(v, mat, lambda st, x: st["M"] @ x + lam_(st) * x,
                           lambda st, x: (st["diag"] + lam_(st)) * x)

    def inverse_mv(self, v: PyTree, lam: Array) -> PyTree:
        """The exact inverse of :meth:`damped_mv` (Cholesky or eigendecompositions)."""
        lam_ = lambda st: jnp.asarray(lam, st["diag"].dtype)  # noqa: E731

        def mat(st: dict, m: Array) -> Array:
            if self.pi_damping:
                ea, eg = self._shifts(st, lam)
                return spd_inverse(st["L"], ea) @ m @ spd_inverse(st["R"], eg)
            (dl, ql), (dr, qr) = _eigh(st["L"]), _eigh(st["R"])
            return ql @ ((ql.T @ m @ qr) / (dl[:, None] * dr[None, :] + lam_(st))) @ qr.T

        return self._apply(v, mat, lambda st, x: spd_inverse(st["M"], lam_(st)) @ x,
                           lambda st, x: x / (st["diag"] + lam_(st)))


def _argsort(perm: tuple[int, ...]) -> list[int]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return inv


def _ekfac_eig(a_f: Array, g_f: Array, a: Array, g: Array, approx: str,
               batch_sum: Any = None) -> tuple:
    """``(Q_A, Q_G, S)``: KFAC's eigenbasis and the exact diagonal of the block in it.

    ``S_ij = sum_b sum_r (sum_t (a_b Q_A)_ti (g_rb Q_G)_tj)^2`` (George et al. 2018,
    eq. 9) for the rows ``a`` ``[B, T, rows]`` and ``g`` ``[R, B, T, dout]``: a sum
    over the batch ``b``, taken by ``batch_sum`` (the loss's
    :meth:`~somax_plug.Loss.batch_sum`: device-count independent under
    ``reduce_chunks``; default ``fn(*xs)``). The factors ``a_f``, ``g_f`` fix the
    basis (``eigh``).

    Example:
        >>> import jax.numpy as jnp
        >>> a, g = jnp.ones((2, 1, 3)), jnp.ones((1, 2, 1, 2))
        >>> qa, qg, s = _ekfac_eig(jnp.eye(3), jnp.eye(2), a, g, "expand")
        >>> s.shape, float(s.sum())  # sum_b |a_b|^2 |g_b|^2 = 2 * 3 * 2
        ((3, 2), 12.0)
    """
    _, qa = _eigh(a_f)
    _, qg = _eigh(g_f)

    def chunk(ab: Array, gb: Array) -> Array:  # [b, T, rows], [b, R, T, dout]: sum over b
        # the bases tied to the chunk (plus a zero read from it): under reduce_chunks
        # batch_sum vmaps this over the chunks, and a basis closed over would be folded
        # into one product over all of a device's chunks, whose kernel (and rounding)
        # depends on how many chunks a device holds; tied, it is one batched product
        # per chunk, as x^T x is (measured: 3e-8 apart in float32 untied)
        tie = jnp.zeros((), ab.dtype) * ab.reshape(-1)[0]
        at, gt = ab @ (qa + tie), gb @ (qg + tie.astype(gb.dtype))
        if at.shape[1] == 1:
            return jnp.einsum("bi,brj->ij", at[:, 0] ** 2, gt[:, :, 0] ** 2)

        def one(xs: tuple[Array, Array]) -> Array:
            ae, ge = xs  # [T, rows], [R, T, dout]
            return jnp.sum(jnp.einsum("ti,rtj->rij", ae, ge) ** 2, axis=0)

        return jnp.sum(jax.lax.map(one, (at, gt)), axis=0)

    bsum = batch_sum if batch_sum is not None else (lambda fn, *xs: fn(*xs))
    return qa, qg, bsum(chunk, a, jnp.swapaxes(g, 0, 1))


# ------------------------------------------------------------------ components


def _factor_requires(o: dict) -> dict:
    return {"resources": {factor_resource(o["source"], o["approx"])}}


COVERAGE = ("diagonal", "strict")

EMA_STAT = "kfac_ema"
"""The statistic of estimator ``kfac_ema``: ``{"leaves": {path: EMA leaf}, "count"}``."""


def _ema_or_factors(o: dict) -> dict:
    """What a reader of the factors requires: the factors, or with
    ``factors="kfac_ema"`` the estimator's statistic."""
    if o.get("factors") == EMA_STAT:
        return {"statistics": {EMA_STAT}}
    return _factor_requires(o)






class _Explained:
    """``deferred_rule`` / ``recorded_choices`` for ``Method.explain()``."""

    @property
    def deferred_rule(self) -> str:
        """The per-layer rule (printed by ``plan.explain()`` before the first step)."""
        if getattr(self, "factors", "own") == EMA_STAT:
            return ("the per-leaf blocks of estimator kfac_ema's running averages (the "
                    "estimator's rule decides what is factored)")
        return ("per dense layer of the layer map: [W; b] -> A (x) G; every other "
                "parameter -> a diagonal block (listed here once the step is traced)"
                + ("; coverage='strict': an error instead" if self.coverage == "strict" else ""))

    def recorded_choices(self) -> list[str]:
        """What was factored and what got a diagonal block, with the reason."""
        return list(self._choices.entries)

    def _record(self, f: KroneckerFactors) -> None:
        for blk in f.blocks:
            bias = f" + {blk.bias}" if blk.bias else ""
            self._choices.add(f"{blk.kernel}{bias}: Kronecker block A {blk.rows}x{blk.rows}, "
                              f"G {blk.dout}x{blk.dout}")
        for p, why in f.uncovered:
            self._choices.add(f"{p}: diagonal block ({why})")


def covered(factors: KroneckerFactors, coverage: str, owner: str) -> KroneckerFactors:
    """``factors``, or with ``coverage="strict"`` an error listing what is not factored.

    Raised when the step is traced (the layer map needs the model's jaxpr), before any
    FLOP.
    """
    if coverage == "strict" and factors.uncovered:
        listed = "; ".join(f"{p!r}: {why}" for p, why in factors.uncovered)
        raise InputError(
            f"{owner} with coverage='strict': {len(factors.uncovered)} parameter(s) are "
            f"not in a factored dense layer ({listed}); fix the layer map with overrides "
            "(somax_plug.layers.layer_map_provider) or use coverage='diagonal' (a "
            "diagonal block for each)"
        )
    return factors


@declare(
    "kfac",
    summary="KFAC: block-diagonal A (x) G per dense layer (GGN, Fisher or empirical; this "
    "step's factors or estimator kfac_ema's running averages), exact damped inverse",
    provides={SYMMETRIC, PSD, DIAG, KRONECKER},
    requires=_ema_or_factors,
)
@attrs.frozen
class KFAC(Curvature, _Explained):
    """Kronecker-factored curvature ``blockdiag(A_l (x) G_l)`` (Martens & Grosse 2015).

    Factors from this step's batch (the resource ``kfac_factors_<source>_<approx>``);
    the preconditioner ``kfac`` keeps running averages of them. The operator is
    :class:`KroneckerOperator`, whose ``inverse_mv(v, lam)`` is exact.

    With ``factors="kfac_ema"`` the blocks are estimator ``kfac_ema``'s running
    averages instead (:class:`LeafKroneckerOperator`; the estimator's ``source``,
    ``approx`` and cadence, this component's unused): the operator is built after the
    estimators (resource phase ``solve``), and every reader of the statistic (a
    preconditioner ``kfac`` with ``factors="kfac_ema"`` too) shares one EMA update per
    tick. The planner refuses it, before tracing, without the estimator, or beside an
    estimator or preconditioner that reads the operator (they run before it exists).

    Example:
        >>> KFAC(source="fisher", approx="reduce").approx
        'reduce'
    """

    source: str = option("ggn", choices=SOURCES, doc="which curvature is factored")
    approx: str = option("expand", choices=APPROXIMATIONS, doc="KFAC-expand or KFAC-reduce")
    pi_damping: bool = option(False, doc="factored damping with Martens & Grosse's pi")
    coverage: str = option("diagonal", choices=COVERAGE,
                           doc="unfactored parameters: a diagonal block, or an error")
    factors: str = option("own", choices=("own", EMA_STAT),
                          doc="this step's factors, or estimator 'kfac_ema''s running averages")
    _choices: Choices = choices_field()

    def build(self, res: Resources) -> KroneckerOperator | LeafKroneckerOperator:
        if self.factors == EMA_STAT:
            return LeafKroneckerOperator(res.params, res["statistics"][EMA_STAT]["leaves"],
                                         self.pi_damping)
        f = covered(res[factor_resource(self.source, self.approx)], self.coverage,
                    "curvature 'kfac'")
        self._record(f)
        return KroneckerOperator(res.params, f, "kfac", self.pi_damping)


@declare(
    "ekfac",
    summary="EKFAC: KFAC's eigenbasis with the exact diagonal in it (George et al. 2018)",
    provides={SYMMETRIC, PSD, DIAG, KRONECKER},
    requires=_factor_requires,
)
@attrs.frozen
class EKFAC(Curvature, _Explained):
    """Eigenvalue-corrected KFAC ``Q diag(S) Q^T`` per dense layer (George et al. 2018).

    ``Q = Q_A (x) Q_G`` the eigenvectors of the KFAC factors and ``S`` the exact
    diagonal of the curvature block in that basis, from this step's batch.

    Example:
        >>> EKFAC().source
        'ggn'
    """

    source: str = option("ggn", choices=SOURCES, doc="which curvature is factored")
    approx: str = option("expand", choices=APPROXIMATIONS, doc="basis from KFAC-expand/reduce")
    coverage: str = option("diagonal", choices=COVERAGE,
                           doc="unfactored parameters: a diagonal block, or an error")
    _choices: Choices = choices_field()

    def build(self, res: Resources) -> KroneckerOperator:
        f = covered(res[factor_resource(self.source, self.approx)], self.coverage,
                    "curvature 'ekfac'")
        self._record(f)
        eig = [_ekfac_eig(a, g, ra, rg, f.approx, res.model.loss.batch_sum)
               for a, g, ra, rg in zip(f.A, f.G, f.a, f.g, strict=True)]
        return KroneckerOperator(res.params, f, "ekfac", eig=eig)


@declare(
    "kronecker_inverse",
    summary="s = (C + lam I)^-1 rhs applied exactly by a Kronecker-factored operator "
    "(or by estimator kfac_ema's running averages)",
    requires=lambda o: ({"statistics": {"kfac_ema"}} if o.get("factors") == "kfac_ema"
                        else {"tags": {SYMMETRIC}}),
)
@attrs.frozen
class KroneckerInverse(Solver):
    """The KFAC/EKFAC step: ``s = inverse_mv(rhs, lam)``, no iteration.

    Meant for an operator tagged ``kronecker`` (curvature ``kfac`` or ``ekfac``).
    Reports ``iterations = 1``, the residual ``||damped_mv(s) - rhs|| / ||rhs||`` and
    ``converged`` = finite. On another symmetric operator it falls back to a dense
    solve of ``to_dense() + lam I``, for at most ``dense_max`` parameters (an
    :class:`~somax_plug.InputError` when the step is traced, before any FLOP,
    otherwise).

    With ``factors="kfac_ema"`` it reads estimator ``kfac_ema``'s running averages
    instead (no operator): per leaf ``s = (L (x) R + lam I)^-1 rhs`` in the
    preconditioner ``kfac``'s layout, from the averages' eigendecompositions, every step
    (``residual`` NaN: not computed).

    Example:
        >>> from somax_plug import spec_of
        >>> sorted(spec_of(KroneckerInverse).requires.tags)
        ['symmetric']
    """

    dense_max: int = option(2048, ge=1, doc="largest non-Kronecker operator solved densely")
    factors: str = option("operator", choices=("operator", "kfac_ema"),
                          doc="invert the operator, or estimator 'kfac_ema''s running averages")

    def solve(self, op: Any, rhs: PyTree, lam: Array, precond: Any, stats: Any,
              state: PyTree) -> tuple[PyTree, SolverInfo, PyTree]:
        dt = tree.accum_dtype(rhs)
        if self.factors == EMA_STAT:
            return (*_solve_ema(stats[EMA_STAT], rhs, lam, dt), state)
        n = tree.size(rhs)
        if not hasattr(op, "inverse_mv") and n > self.dense_max:
            raise InputError(
                f"solver 'kronecker_inverse' got a {type(op).__name__} without inverse_mv "
                f"on {n} parameters (> dense_max={self.dense_max}); use curvature 'kfac' or "
                "'ekfac', or an iterative solver such as 'cg'"
            )
        if hasattr(op, "inverse_mv"):
            s = op.inverse_mv(rhs, lam)
            r = tree.sub(op.damped_mv(s, lam), rhs)
        else:
            flat, unravel = tree.ravel(rhs)
            d = op.to_dense().astype(flat.dtype)
            d = d + jnp.asarray(lam, flat.dtype) * jnp.eye(d.shape[0], dtype=flat.dtype)
            s = unravel(jnp.linalg.solve(d, flat))
            r = tree.sub(tree.cast_like(op.mv(s), rhs), rhs)
            r = jax.tree_util.tree_map(lambda ri, si: ri + jnp.asarray(lam, ri.dtype) * si, r, s)
        res = tree.norm(r) / jnp.maximum(tree.norm(rhs), jnp.finfo(dt).tiny)
        info = SolverInfo(jnp.asarray(1, jnp.int32), res.astype(dt), tree.all_finite(s))
        return s, info, state


def _solve_ema(stat: dict, rhs: PyTree, lam: Array, dt: Any) -> tuple[PyTree, SolverInfo]:
    """``(L (x) R + lam I)^-1 rhs`` per leaf from shared running averages (see
    :class:`KroneckerInverse`): the preconditioner ``kfac``'s exact-damping application."""
    pre = KFACPreconditioner()
    own = pre.init(rhs)["leaves"]
    leaves = {p: {**st, **stat["leaves"][p]} for p, st in own.items()}
    inverted = _invert(leaves, None, pre.eps)
    s = tree.cast_like(pre.apply({"leaves": inverted, "count": stat["count"]}, rhs, lam), rhs)
    info = SolverInfo(jnp.asarray(1, jnp.int32), jnp.full((), jnp.nan, dt), tree.all_finite(s))
    return s, info


# ------------------------------------------------------------------ preconditioner


def _leaf_state(x: Array, max_dim: int) -> dict:
    dt = jnp.result_type(x.dtype, jnp.float32)
    st: dict[str, Any] = {"diag": jnp.zeros(x.shape, dt), "kron": jnp.zeros((), bool)}
    s1, s2 = math.prod(x.shape[:-1]), x.shape[-1] if x.ndim else 1
    if x.ndim >= 2 and max(s1, s2) <= max_dim:
        for k, n in (("L", s1), ("R", s2)):
            st[k] = jnp.zeros((n, n), dt)
            st["Q" + k] = jnp.eye(n, dtype=dt)
            st["d" + k] = jnp.zeros((n,), dt)
        st["pi"] = jnp.ones((), dt)
    elif x.ndim == 1 and x.shape[0] <= max_dim:
        n = x.shape[0]
        st["M"], st["QM"], st["dM"] = jnp.zeros((n, n), dt), jnp.eye(n, dtype=dt), jnp.zeros(
            (n,), dt)
    return st


def _targets(f: KroneckerFactors, shapes: dict) -> tuple[dict, tuple]:
    """Per-leaf new statistics from the factors: ``{path: {"L", "R"} | {"M"} | {"diag"}}``."""
    new: dict[str, dict] = {}
    misfit = []
    for blk, a, g in zip(f.blocks, f.A, f.G, strict=True):
        shape = shapes[blk.kernel]
        akk = a[: blk.din, : blk.din]
        s1, s2 = math.prod(shape[:-1]), shape[-1]
        n = len(shape)
        kdiag = jnp.outer(jnp.diag(akk), jnp.diag(g)).reshape(
            tuple(shape[i] for i in blk.kernel_perm)).transpose(_argsort(blk.kernel_perm))
        if blk.kernel_perm[-1] == n - 1 and (blk.din, blk.dout) == (s1, s2):
            # output axis last (dense (in..., out), conv HWIO): A's rows to leaf order
            rows = np.arange(s1).reshape([shape[i] for i in blk.kernel_perm[:-1]])
            rows = rows.transpose(_argsort(blk.kernel_perm[:-1])).ravel()
            if not np.array_equal(rows, np.arange(s1)):
                akk = akk[np.ix_(rows, rows)]
            new[blk.kernel] = {"L": akk, "R": g, "diag": kdiag}
        elif n == 2 and blk.kernel_perm == (1, 0):
            new[blk.kernel] = {"L": g, "R": akk, "diag": kdiag}
        else:
            new[blk.kernel] = {"diag": kdiag}
            misfit.append((blk.kernel, "kernel layout is neither (in..., out) nor (out, in)"))
        if blk.bias is not None:
            bshape = shapes[blk.bias]
            abb = a[blk.din, blk.din]
            bdiag = (abb * jnp.diag(g)).reshape(bshape)
            new[blk.bias] = {"M": abb * g, "diag": bdiag} if len(bshape) == 1 else {
                "diag": bdiag}
    for p, _ in f.uncovered:
        new[p] = {"diag": f.diag[p]}
    return new, tuple(misfit)


AVERAGE_KEYS = ("L", "R", "M", "diag", "kron")
"""The running-average part of a leaf's state; the rest (``Q*``, ``d*``, ``pi``) is the
inverse, written only at an inverse refresh."""


def _ema_leaf(x: Array, max_dim: int) -> dict:
    """The running-average part of a leaf's state (:data:`AVERAGE_KEYS`)."""
    st = _leaf_state(x, max_dim)
    return {k: v for k, v in st.items() if k in AVERAGE_KEYS}


def _inverse_part(leaves: dict) -> dict:
    """Each leaf's state without :data:`AVERAGE_KEYS`."""
    return {p: {k: v for k, v in st.items() if k not in AVERAGE_KEYS}
            for p, st in leaves.items()}


def _fold(state_leaves: dict, f: KroneckerFactors, params: PyTree, first: Array,
          beta: float, choices: Choices, max_dim: int) -> dict:
    """``F <- beta F + (1 - beta) F_new`` per leaf (``F = F_new`` on the first refresh)."""
    shapes = {p: tuple(x.shape) for p, x in zip(
        param_paths(params), jax.tree_util.tree_leaves(params), strict=True)}
    new, misfit = _targets(f, shapes)
    for p, why in misfit:
        choices.add(f"{p}: diagonal block in the preconditioner ({why})")
    leaves = {}
    for p, st in state_leaves.items():
        st = dict(st)
        stat = new.get(p, {})

        def ema(old: Array, x: Array) -> Array:
            x = jnp.asarray(x, old.dtype)
            return jnp.where(first, x, beta * old + (1 - beta) * x)

        if "L" in stat and "L" in st:
            st["L"], st["R"] = ema(st["L"], stat["L"]), ema(st["R"], stat["R"])
            st["kron"] = jnp.ones((), bool)
        elif "M" in stat and "M" in st:
            st["M"] = ema(st["M"], stat["M"])
            st["kron"] = jnp.ones((), bool)
        elif "diag" in stat:
            st["diag"] = ema(st["diag"], stat["diag"])
            st["kron"] = jnp.zeros((), bool)
            if "L" in stat or "M" in stat:
                choices.add(f"{p}: diagonal block in the preconditioner (a factor "
                            f"larger than max_dim={max_dim})")
        leaves[p] = st
    return leaves


@declare(
    "kfac_ema",
    summary="running averages (EMA) of the Kronecker factors at the estimator's cadence, "
    "one set shared by every component that reads statistic 'kfac_ema'",
    provides={EMA_STAT},
    requires=_factor_requires,
)
@attrs.frozen
class KFACEMA(Estimator, _Explained):
    """``F <- decay F + (1 - decay) F_new`` of the factors, a statistic others read.

    At each of its ticks (``every_k``: the EMA's cadence) the factors of the step
    (``kfac_factors_<source>_<approx>``) are folded into running averages, per parameter
    leaf in the preconditioner ``kfac``'s layout (see :class:`KFACPreconditioner`), the
    first tick setting them. The statistic ``kfac_ema`` (``{"leaves", "count"}``) is
    read by ``preconditioner kfac`` with ``factors="kfac_ema"``, which then keeps only
    its inverses (at its own cadence, ``inverse_every`` of its refreshes): one EMA
    update per tick, however many components read it.

    Example:
        >>> KFACEMA(decay=0.9).decay
        0.9
    """

    source: str = option("ggn", choices=SOURCES, doc="which curvature is factored")
    approx: str = option("expand", choices=APPROXIMATIONS, doc="KFAC-expand or KFAC-reduce")
    decay: float = option(0.95, ge=0, lt=1, doc="EMA decay of the factors")
    coverage: str = option("diagonal", choices=COVERAGE,
                           doc="unfactored parameters: a diagonal block, or an error")
    max_dim: int = option(MATRIX_MAX, ge=1,
                          doc="a factor larger than this: the block's diagonal instead")
    _choices: Choices = choices_field()

    def init(self, params: PyTree) -> PyTree:
        paths = param_paths(params)
        leaves = jax.tree_util.tree_leaves(params)
        stat = {"leaves": {p: _ema_leaf(x, self.max_dim) for p, x in zip(paths, leaves,
                                                                           strict=True)},
                "count": jnp.zeros((), jnp.int32)}
        return {"stats": {EMA_STAT: stat}}

    def estimate(self, res: Resources, key: Array, state: PyTree) -> tuple[dict, PyTree]:
        f = covered(res[factor_resource(self.source, self.approx)], self.coverage,
                    "estimator 'kfac_ema'")
        self._record(f)
        old = state["stats"][EMA_STAT]
        leaves = _fold(old["leaves"], f, res.params, old["count"] == 0, self.decay,
                       self._choices, self.max_dim)
        stat = {"leaves": leaves, "count": old["count"] + 1}
        return {EMA_STAT: stat}, {**state, "stats": {EMA_STAT: stat}}


@declare(
    "kfac",
    summary="KFAC preconditioner: EMA of the Kronecker factors (its own or estimator "
    "kfac_ema's), damped inverse every k refreshes (KFAC-preconditioned CG, or the KFAC "
    "step with solver model_step or identity)",
    requires=_ema_or_factors,
)
@attrs.frozen
class KFACPreconditioner(Preconditioner, _Explained):
    """``M^-1 v`` from running averages of Kronecker factors (KFAC-preconditioned CG).

    At each refresh (the component's ``every_k``) the factors of the step
    (``kfac_factors_<source>_<approx>``) are folded into an EMA,
    ``F <- decay F + (1 - decay) F_new`` (the first refresh sets ``F = F_new``); on
    every ``inverse_every``-th refresh the eigendecompositions are recomputed. Then::

        M^-1 vec(X) = (Q_L (x) Q_R) diag(1 / (d_L (x) d_R + lam)) (Q_L (x) Q_R)^T vec(X)

    per parameter leaf ``X`` viewed as a ``[prod(shape[:-1]), shape[-1]]`` matrix
    (``L = A, R = G`` for an ``(in..., out)`` kernel or an HWIO conv kernel, ``L = G,
    R = A`` for an Equinox ``(out, in)`` one). With ``pi_damping``, the factored
    damping ``M^-1 X = (L + pi sqrt(lam) I)^-1 X (R + sqrt(lam)/pi I)^-1`` with the
    two inverses computed (and ``lam`` taken) at the inverse refresh, as kfac-jax
    does: half the cost of an application, the damping as of the last refresh.
    A layer's bias gets the full ``A_bb G`` block (``A_bb`` the
    bias-bias entry of ``A``), so unlike the curvature ``kfac`` the kernel-bias
    coupling is dropped: the state's shapes are known from the parameters alone.
    Leaves that the layer map does not factor, and leaves whose factors would be larger
    than ``max_dim`` (an embedding table), get a diagonal EMA (for a layer: the
    block's exact diagonal ``diag(A) (x) diag(G)``): ``v / (d + lam)``. Before the
    first refresh ``M^-1 v = v / lam`` (``eps`` floors every denominator).

    With ``factors="kfac_ema"`` the running averages are estimator ``kfac_ema``'s
    statistic (its ``decay``, ``source``, ``approx`` and cadence; this component's are
    then unused), shared with every other reader; this component keeps only the
    inverses, refreshed every ``inverse_every`` of its own refreshes. The planner
    refuses it, before tracing, when no estimator provides ``kfac_ema``.

    Example:
        >>> pre = KFACPreconditioner(decay=0.9, inverse_every=5)
        >>> (pre.decay, pre.inverse_every)
        (0.9, 5)
    """

    source: str = option("ggn", choices=SOURCES, doc="which curvature is factored")
    approx: str = option("expand", choices=APPROXIMATIONS, doc="KFAC-expand or KFAC-reduce")
    decay: float = option(0.95, ge=0, lt=1, doc="EMA decay of the factors")
    inverse_every: int = option(1, ge=1, doc="recompute the inverses every n refreshes")
    pi_damping: bool = option(False, doc="factored damping with Martens & Grosse's pi")
    eps: float = option(1e-12, gt=0, doc="floor of the denominators")
    coverage: str = option("diagonal", choices=COVERAGE,
                           doc="unfactored parameters: a diagonal block, or an error")
    max_dim: int = option(MATRIX_MAX, ge=1,
                          doc="a factor larger than this: the block's diagonal instead")
    factors: str = option("own", choices=("own", EMA_STAT),
                          doc="running averages: its own, or estimator 'kfac_ema''s")
    _choices: Choices = choices_field()

    def init(self, params: PyTree) -> PyTree:
        paths = param_paths(params)
        leaves = jax.tree_util.tree_leaves(params)
        return {
            "leaves": {p: _leaf_state(x, self.max_dim) for p, x in zip(paths, leaves,
                                                                         strict=True)},
            "count": jnp.zeros((), jnp.int32),
        }

    def update(self, res: Any, stats: Any, lam: Array, key: Array, state: PyTree) -> PyTree:
        count = state["count"]
        if self.factors == EMA_STAT:
            shared = stats[EMA_STAT]["leaves"]
            leaves = {p: {**st, **shared[p]} for p, st in state["leaves"].items()}
        else:
            f = covered(res[factor_resource(self.source, self.approx)], self.coverage,
                        "preconditioner 'kfac'")
            self._record(f)
            leaves = _fold(state["leaves"], f, res.params, count == 0, self.decay,
                           self._choices, self.max_dim)
        due = (count % self.inverse_every) == 0
        lam_now = jnp.asarray(lam)
        lam_now = lam_now.astype(jnp.result_type(lam_now.dtype, jnp.float32))
        # only the inverses pass through the cond: the averages are its operands, not
        # its outputs (no copy of every factor on the steps without a refresh)
        inverses = jax.lax.cond(
            due, lambda lm: _inverse_part(
                _invert(leaves, lm if self.pi_damping else None, self.eps)),
            lambda lm: _inverse_part(leaves), lam_now)
        leaves = {p: {**st, **inverses[p]} for p, st in leaves.items()}
        return {"leaves": leaves, "count": count + 1}

    def apply(self, state: PyTree, v: PyTree, lam: Array) -> PyTree:
        paths = param_paths(v)
        leaves, treedef = jax.tree_util.tree_flatten(v)
        out = []
        for p, x in zip(paths, leaves, strict=True):
            st = state["leaves"][p]
            dt = st["diag"].dtype
            lam_ = jnp.asarray(lam, dt)
            eps = jnp.asarray(self.eps, dt)
            xd = x.astype(dt)

            def diag_branch(xd: Array, st: dict = st, lam_: Array = lam_,
                            eps: Array = eps) -> Array:
                return xd / jnp.maximum(st["diag"] + lam_, eps)

            if "L" in st:
                def kron(xd: Array, st: dict = st, lam_: Array = lam_, eps: Array = eps) -> Array:
                    m = xd.reshape(st["L"].shape[0], st["R"].shape[0])
                    if self.pi_damping:  # the factors' damped inverses, cached
                        return (st["QL"] @ m @ st["QR"]).reshape(xd.shape)
                    den = st["dL"][:, None] * st["dR"][None, :] + lam_
                    t = st["QL"].T @ m @ st["QR"] / jnp.maximum(den, eps)
                    return (st["QL"] @ t @ st["QR"].T).reshape(xd.shape)

                y = jax.lax.cond(st["kron"], kron, diag_branch, xd)
            elif "M" in st:
                def mat(xd: Array, st: dict = st, lam_: Array = lam_, eps: Array = eps) -> Array:
                    if self.pi_damping:
                        return st["QM"] @ xd
                    return st["QM"] @ ((st["QM"].T @ xd) / jnp.maximum(st["dM"] + lam_, eps))

                y = jax.lax.cond(st["kron"], mat, diag_branch, xd)
            else:
                y = diag_branch(xd)
            out.append(y.astype(x.dtype))
        return jax.tree_util.tree_unflatten(treedef, out)


def _damped_inverse(d: Array, q: Array, shift: Array, eps: float) -> Array:
    """``(m + shift I)^-1 = Q diag(1 / (d + shift)) Q^T`` from ``m``'s eigendecomposition."""
    return (q / jnp.maximum(d + shift, eps)[None, :]) @ q.T


SCHUR_BASE = 128
"""Blocks at most this large are inverted through LAPACK's Cholesky (see
:func:`spd_block_inverse`)."""


def spd_block_inverse(a: Array, base: int = SCHUR_BASE) -> Array:
    """``a^-1`` of a symmetric positive definite ``a``, by 2x2 block recursion.

    With ``a = [[a11, a21^T], [a21, a22]]``, ``i11 = a11^-1`` (the recursion), ``b = a21
    i11`` and the Schur complement ``S = a22 - b a21^T`` (symmetric positive definite
    when ``a`` is)::

        a^-1 = [[i11 + b^T c, -c^T], [-c, S^-1]],   c = S^-1 b

    down to blocks of ``base`` rows, inverted as ``X^T X`` with ``X = L^-1`` (LAPACK's
    Cholesky ``L``, ``triangular_solve``). Above the base everything is matrix products
    (``4/3 n^3`` FLOPs in all, as Cholesky, triangular inverse and ``X^T X``). On XLA's
    CPU backend (one thread, float32, 784 x 784): 8.9 ms, against 20 ms for LAPACK's
    Cholesky of the whole matrix, a block-recursive triangular inverse and ``X^T X`` on
    one triangle. The signs ride on the blocks' slices (``-b`` is computed, no negation
    pass) and the top-left block is not symmetrised (transposes are slow there): the
    result is symmetric up to rounding. A matrix that is not numerically positive
    definite gives a non-finite result (LAPACK's Cholesky fails on a base block, and the
    NaNs reach every block of the result, the diagonal included).

    Example:
        >>> import jax.numpy as jnp
        >>> a = jnp.array([[4.0, 2.0], [2.0, 5.0]])
        >>> bool(jnp.allclose(spd_block_inverse(a, base=1) @ a, jnp.eye(2), atol=1e-6))
        True
    """
    n = a.shape[0]
    if n <= base:
        x = jax.lax.linalg.triangular_solve(
            jnp.linalg.cholesky(a), jnp.eye(n, dtype=a.dtype), left_side=True, lower=True)
        return x.T @ x
    h = n // 2
    i11 = spd_block_inverse(a[:h, :h], base)
    nb = (-a[h:, :h]) @ i11  # -b: the sign rides on the slice's copy, no negation pass
    i22 = spd_block_inverse(a[h:, h:] + nb @ a[:h, h:], base)
    nc = i22 @ nb  # -c
    return jnp.block([[i11 + nb.T @ nc, nc.T], [nc, i22]])


def spd_inverse(m: Array, shift: Array, eps: float = 1e-12) -> Array:
    """``(m + shift I)^-1`` of a symmetric PSD ``m``, without an eigendecomposition.

    :func:`spd_block_inverse` of ``m + shift I``. Measured on XLA's CPU backend (one
    thread, float32): 784 x 784 in 8.9 ms, against 55-72 ms for ``jnp.linalg.eigh``,
    27-36 ms for ``jnp.linalg.inv`` and 40 ms for ``cho_solve(cho_factor(m), I)``
    (785 x 785). Where the recursion fails (``m + shift I`` not numerically positive
    definite: a singular factor with ``shift = 0``) the result is not finite (its
    trace says so) and the eigendecomposition's ``Q diag(1 / max(d + shift, eps)) Q^T``
    is used instead (a ``lax.cond``: paid only then).

    Example:
        >>> import jax.numpy as jnp
        >>> out = spd_inverse(jnp.array([[3.0, 1.0], [1.0, 3.0]]), 1.0)
        >>> [[round(float(v), 4) for v in row] for row in out]
        [[0.2667, -0.0667], [-0.0667, 0.2667]]
    """
    m = 0.5 * (m + m.T)
    shift = jnp.asarray(shift, m.dtype)
    inv = spd_block_inverse(m + shift * jnp.eye(m.shape[0], dtype=m.dtype))

    def by_eigh(_: Array) -> Array:
        d, q = _eigh(m)
        return _damped_inverse(d, q, shift, eps)

    return jax.lax.cond(jnp.isfinite(jnp.trace(inv)), lambda y: y, by_eigh, inv)


def _invert(leaves: dict, lam: Array | None, eps: float) -> dict:
    """Eigendecompositions; with ``lam`` (pi damping) the damped inverses themselves,
    ``(L + pi sqrt(lam))^-1`` and ``(R + sqrt(lam)/pi)^-1`` (:func:`spd_inverse`, no
    eigendecomposition), stored in ``QL`` / ``QR``."""
    out = {}
    for p, st in leaves.items():
        st = dict(st)
        if "L" in st:
            st["pi"] = _pi(st["L"], st["R"], st["L"].dtype)
            if lam is not None:  # Cholesky inverses, no eigendecomposition
                r = jnp.sqrt(jnp.maximum(lam, 0)).astype(st["L"].dtype)
                st["QL"] = spd_inverse(st["L"], st["pi"] * r, eps)
                st["QR"] = spd_inverse(st["R"], r / st["pi"], eps)
            else:
                st["dL"], st["QL"] = _eigh(st["L"])
                st["dR"], st["QR"] = _eigh(st["R"])
        elif "M" in st:
            if lam is not None:
                st["QM"] = spd_inverse(st["M"], lam.astype(st["M"].dtype), eps)
            else:
                st["dM"], st["QM"] = _eigh(st["M"])
        out[p] = st
    return out

"""Losses with Optax's convention, and their curvature with respect to the outputs.

A :class:`Loss` maps model outputs ``z`` (a leading batch axis of size B) and targets
to per-example losses ``l_b`` (shape ``[B]``), then reduces them::

    L(z) = c * sum_b l_b(z_b),      c = 1/B ("mean", the default) or 1 ("sum").

Everything a curvature operator needs is a derivative of the *reduced* loss L with
respect to the outputs:

* ``output_grad(z, y)``        -- dL/dz, output-shaped (``c * dl_b/dz_b`` per example);
* ``output_hessian_mv(z, y, u)`` -- H_out u with ``H_out = d^2 L / dz^2``, block
  diagonal over examples (closed form for the built-ins, jvp-of-grad otherwise);
* ``output_hessian_sqrt(z, y)`` -- per-example factors ``L_b`` of shape ``[B, K, K]``
  (K = flattened per-example output size) with ``H_out = blockdiag(L_b L_b^T)``, and
  their products ``output_hessian_sqrt_t_mv(z, y, u)`` (``L_b^T u_b``) and
  ``output_hessian_sqrt_mv(z, y, r)`` (``L_b r_b``) on ``[B, K]`` arrays, which the
  built-ins compute in closed form without the ``[B, K, K]`` array;
* ``sample_targets(key, z, S)`` -- S draws from the model's predictive distribution
  (for the Monte-Carlo Fisher), stacked on a new leading axis.

Built-ins (by name, see :func:`get_loss`):

=================================  ============================================  ================
name                               per-example loss                              sqrt of H_b
=================================  ============================================  ================
``mse``                            ``0.5 * sum((z_b - y_b)**2)`` (any shape)      ``sqrt(c) I``
``softmax_cross_entropy``          ``-sum_k y_k log softmax(z)_k`` (last axis)    see below
``sigmoid_binary_cross_entropy``   ``sum(sigmoid_binary_cross_entropy(z, y))``    ``diag(sqrt(c
                                                                                 s (1 - s)))``
=================================  ============================================  ================

For softmax cross-entropy with probabilities ``p = softmax(z_b)`` and label mass
``m = sum_k y_k`` (1 for integer labels and one-hot rows), ``H_b = c m (diag p - p p^T)``
and ``L_b = sqrt(c m) (diag(sqrt p) - p sqrt(p)^T)``; indeed
``L L^T = diag p - 2 p p^T + p (sqrt(p)^T sqrt(p)) p^T = diag p - p p^T``. Extra axes
between the batch and the class axis (tokens, pixels) are positions: ``"mean"`` averages
over every counted position of the batch (padding excluded with ``ignore_label``), and
``L_b`` is block diagonal over them (see :class:`SoftmaxCrossEntropy`).

Any callable ``loss(outputs, targets) -> [B]`` is accepted too (:class:`CallableLoss`):
its output Hessian is ``jax.jvp`` of ``jax.grad`` and its square root comes from
``eigh`` of each per-example Hessian (``jax.hessian``, vmapped) with eigenvalues clipped
at 0. A non-convex loss therefore gets the *psd part* of its output Hessian in the
square root, and a GGN built from it uses that psd part everywhere (see
:attr:`Loss.output_hessian_psd`).

Dtypes: losses are evaluated and reduced in ``promote_types(outputs.dtype, float32)``
(float32 for bfloat16 outputs, float64 for float64 outputs); output-shaped results
(gradients, Hessian-vector products) come back in the outputs' dtype; square roots
stay in the computation dtype.

Example:
    >>> import jax.numpy as jnp
    >>> from somax_plug import get_loss
    >>> ce = get_loss("softmax_cross_entropy")
    >>> z, y = jnp.zeros((2, 3)), jnp.array([0, 2])
    >>> round(float(ce(z, y)), 4)  # log(3)
    1.0986
    >>> ce.output_hessian_sqrt(z, y).shape
    (2, 3, 3)
"""

from __future__ import annotations

import difflib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import attrs

from somax_plug._src.errors import CompositionError
from somax_plug._src.lazy import lazy_import

jax = lazy_import("jax")
jnp = lazy_import("jax.numpy")
optax = lazy_import("optax")

PyTree = Any
Array = Any

REDUCTIONS = ("mean", "sum")


# --------------------------------------------------------------------------- helpers


def compute_dtype(dtype: Any) -> jnp.dtype:
    """Dtype in which losses and reductions are computed: at least float32."""
    return jnp.promote_types(jnp.dtype(dtype), jnp.float32)


def batch_size_of(tree: PyTree) -> int:
    """Static size of the leading (batch) axis of a pytree with a batch axis."""
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves or jnp.ndim(leaves[0]) == 0:
        raise CompositionError("expected arrays with a leading batch axis, got scalars or nothing")
    return int(jnp.shape(leaves[0])[0])


def flatten_per_example(tree: PyTree, dtype: Any = None) -> Array:
    """Flatten each example of a batched pytree: ``[B, ...]`` leaves -> one ``[B, K]`` array."""
    leaves = jax.tree_util.tree_leaves(tree)
    b = batch_size_of(tree)
    flat = [jnp.reshape(x, (b, -1)) for x in leaves]
    out = flat[0] if len(flat) == 1 else jnp.concatenate(flat, axis=1)
    return out if dtype is None else out.astype(dtype)


def unflatten_per_example(flat: Array, like: PyTree) -> PyTree:
    """Inverse of :func:`flatten_per_example` for any leading size, with ``like``'s dtypes.

    ``like`` only supplies the per-example shapes (``leaf.shape[1:]``) and dtypes.
    """
    leaves, treedef = jax.tree_util.tree_flatten(like)
    out, start = [], 0
    for x in leaves:
        shape = tuple(jnp.shape(x)[1:])
        size = math.prod(shape)
        piece = flat[:, start : start + size]
        out.append(jnp.reshape(piece, (flat.shape[0], *shape)).astype(jnp.result_type(x)))
        start += size
    return jax.tree_util.tree_unflatten(treedef, out)


def _sum_trailing(x: Array) -> Array:
    """Sum every axis but the first: ``[B, ...] -> [B]``."""
    return jnp.sum(x, axis=tuple(range(1, x.ndim))) if x.ndim > 1 else x


def _check_reduction(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if value not in REDUCTIONS:
        raise CompositionError(
            f"unknown loss reduction {value!r}; expected one of: {', '.join(REDUCTIONS)}"
        )


def _psd_sqrt(h: Array) -> Array:
    """``V sqrt(max(lambda, 0))`` for a symmetric ``[K, K]`` matrix ``h = V diag(lambda) V^T``."""
    h = 0.5 * (h + h.T)
    lam, vecs = jnp.linalg.eigh(h)
    return vecs * jnp.sqrt(jnp.maximum(lam, 0.0))[None, :]


# --------------------------------------------------------------------------- base class


@attrs.frozen
class Loss(ABC):
    """A loss in Optax's convention: per-example values, then a reduction.

    Subclasses implement :meth:`per_example`; the derivatives have generic defaults
    (autodiff) that the built-ins override with closed forms.

    Attributes:
        reduction: ``"mean"`` (``L = mean_b l_b``) or ``"sum"`` (``L = sum_b l_b``).
    """

    reduction: str = attrs.field(default="mean", validator=_check_reduction, kw_only=True)

    name: ClassVar[str] = "loss"

    @abstractmethod
    def per_example(self, outputs: PyTree, targets: PyTree) -> Array:
        """Per-example losses ``l_b`` of shape ``[B]``."""

    @property
    def output_hessian_psd(self) -> bool:
        """True when ``H_out`` is psd for every output (so ``H_out = sqrt sqrt^T`` exactly)."""
        return True

    def scale(self, batch_size: int) -> float:
        """The reduction factor c: ``1/B`` for ``"mean"``, ``1`` for ``"sum"`` (static)."""
        return 1.0 / batch_size if self.reduction == "mean" else 1.0

    def position_scale(self, outputs: PyTree, targets: PyTree) -> Array | float:
        """The factor ``s`` with ``H_out = s * blockdiag(unit per-position Hessians)``.

        For most losses it is the reduction factor c (:meth:`scale`); a loss that
        averages over positions as well (softmax cross-entropy on ``[B, T, C]``
        outputs) returns ``c q``, with q its per-position weight. Monte-Carlo
        estimators divide their sampled outer products by it.
        """
        return self.scale(batch_size_of(outputs))

    def mask_samples(self, samples: PyTree, targets: PyTree) -> PyTree:
        """Sampled targets with the real targets' ignored positions kept ignored.

        ``samples`` are :meth:`sample_targets` draws (stacked first); the default keeps
        them as they are (a loss with no ignored positions).
        """
        return samples

    def __call__(self, outputs: PyTree, targets: PyTree) -> Array:
        """Reduced loss (a scalar in :func:`compute_dtype` of the outputs)."""
        per = self.per_example(outputs, targets)
        per = per.astype(compute_dtype(per.dtype))
        return jnp.mean(per) if self.reduction == "mean" else jnp.sum(per)

    def batch_sum(self, fn: Callable[..., PyTree], *xs: PyTree) -> PyTree:
        """``fn(*xs)``: a sum over the batch that a component computes itself.

        The extension point for every reduction over the batch that is not autodiff's
        (a Kronecker factor ``sum_b a_b a_b^T``, an empirical-Fisher product
        ``sum_b g_b (g_b . v)``, a sum of squares for an exact diagonal). ``fn`` maps
        pytrees whose leaves all have the batch as leading axis (the same size ``B``)
        to their contribution *summed over that batch*; it must be additive over any
        split of the batch::

            fn(x) = fn(x[:m]) + fn(x[m:])        (up to rounding)

        The default is ``fn(*xs)``. Under canonical reductions
        (``DataParallel(mesh, reduce_chunks=K)``) the step's loss overrides it: every
        ``x`` is split into the ``K`` fixed chunks of the batch (leading axis), ``fn``
        is ``vmap``-ed over the chunks (one chunk per slot of the data axis) and the
        ``K`` results are added in the fixed order ``((c_0 + c_1) + c_2) + ...``, so
        the result is bitwise the same on any number of devices. A leading size not
        divisible by ``K`` gets ``fn(*xs)``. Components reach it as
        ``res.model.loss.batch_sum``; the scale (``1/B`` for a mean) stays with the
        caller. Inside ``fn``, contract a chunk with a value from outside ``xs`` (a
        vector ``v`` closed over) by a product and a sum (``jnp.sum(p * v, axis=1)``),
        not a matrix-vector ``dot``: ``vmap`` folds the chunks into such a dot's rows,
        and XLA's kernel then depends on how many chunks a device holds (measured:
        1.5e-8 apart in float32). Products of two ``xs`` (``x^T x``) are batched dots
        and stay canonical.

        Example:
            >>> import jax.numpy as jnp
            >>> from somax_plug import get_loss
            >>> a = jnp.arange(6.0).reshape(3, 2)
            >>> get_loss("mse").batch_sum(lambda x: jnp.einsum("bi,bj->ij", x, x), a).tolist()
            [[20.0, 26.0], [26.0, 35.0]]
        """
        return fn(*xs)

    def output_grad(self, outputs: PyTree, targets: PyTree) -> PyTree:
        """``dL/dz`` (output-shaped, the outputs' dtype)."""
        return jax.grad(self.__call__)(outputs, targets)

    def output_hessian_mv(self, outputs: PyTree, targets: PyTree, u: PyTree) -> PyTree:
        """``H_out u`` (generic: forward-over-reverse, ``jvp`` of ``grad``)."""
        return jax.jvp(lambda z: self.output_grad(z, targets), (outputs,), (u,))[1]

    def output_hessian_sqrt(self, outputs: PyTree, targets: PyTree) -> Array:
        """Per-example ``L_b`` (``[B, K, K]``) with ``H_out = blockdiag(L_b L_b^T)``.

        Generic: ``jax.hessian`` of each per-example loss (vmapped), then ``eigh`` with
        eigenvalues clipped at 0 -- exact for convex losses, the psd part otherwise.
        """
        b = batch_size_of(outputs)
        c = self.scale(b)
        flat = flatten_per_example(outputs)
        cdt = compute_dtype(flat.dtype)

        def one(z_flat: Array, target: PyTree) -> Array:
            t1 = jax.tree_util.tree_map(lambda a: a[None], target)

            def ell(zf: Array) -> Array:
                z = unflatten_per_example(zf[None].astype(flat.dtype), outputs)
                return self.per_example(z, t1)[0].astype(cdt)

            h = jax.hessian(ell)(z_flat.astype(cdt))
            return _psd_sqrt(c * h)

        return jax.vmap(one)(flat, targets)

    def output_hessian_sqrt_t_mv(self, outputs: PyTree, targets: PyTree, u: Array) -> Array:
        """``L_b^T u_b`` per example for ``u`` of shape ``[B, K]`` (flattened per example).

        The rows of a GGN's row factors, ``U v = blockdiag(L_b^T) J v``. Generic: a
        contraction with :meth:`output_hessian_sqrt`; the built-ins override it with a
        closed form that never builds the ``[B, K, K]`` factor (for softmax
        cross-entropy over ``V`` classes that factor is ``V`` times larger than the
        logits: 20 MB for 512 rows of 98 classes).

        Example:
            >>> import jax.numpy as jnp
            >>> from somax_plug import get_loss
            >>> ce = get_loss("softmax_cross_entropy")
            >>> z, y, u = jnp.zeros((2, 3)), jnp.array([0, 2]), jnp.ones((2, 3))
            >>> ce.output_hessian_sqrt_t_mv(z, y, u).tolist()  # (1/3)(1 - 1) = 0
            [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
        """
        sq = self.output_hessian_sqrt(outputs, targets)
        return jnp.einsum("bkr,bk->br", sq, u.astype(sq.dtype))

    def output_hessian_sqrt_mv(self, outputs: PyTree, targets: PyTree, r: Array) -> Array:
        """``L_b r_b`` per example for ``r`` of shape ``[B, K]`` (the transpose of
        :meth:`output_hessian_sqrt_t_mv`; the built-ins in closed form)."""
        sq = self.output_hessian_sqrt(outputs, targets)
        return jnp.einsum("bkr,br->bk", sq, r.astype(sq.dtype))

    def sample_targets(self, key: Array, outputs: PyTree, num_samples: int) -> PyTree:
        """``num_samples`` target draws from the predictive distribution, stacked first."""
        raise NotImplementedError(
            f"loss {self.name!r} defines no predictive distribution, so it cannot sample "
            "targets (needed by curvature 'fisher' and estimator 'gnb_diag'); use a built-in "
            "loss or pass sampler=... to get_loss"
        )


# --------------------------------------------------------------------------- built-ins


@attrs.frozen
class MSE(Loss):
    """Squared error, ``l_b = 0.5 * sum((z_b - y_b)**2)`` over every non-batch axis.

    The factor 0.5 makes ``H_b = I`` (``optax.losses.l2_loss``): the loss is the negative
    log-likelihood of a unit-variance Gaussian up to a constant, so the Fisher equals
    the GGN. ``sample_targets`` draws ``z + N(0, I)``.

    Example:
        >>> import jax.numpy as jnp
        >>> float(MSE()(jnp.ones((2, 3)), jnp.zeros((2, 3))))
        1.5
    """

    name: ClassVar[str] = "mse"

    def per_example(self, outputs: Array, targets: Array) -> Array:
        cdt = compute_dtype(outputs.dtype)
        return _sum_trailing(optax.losses.l2_loss(outputs.astype(cdt), targets.astype(cdt)))

    def output_hessian_mv(self, outputs: Array, targets: Array, u: Array) -> Array:
        c = self.scale(batch_size_of(outputs))
        return (c * u.astype(compute_dtype(u.dtype))).astype(outputs.dtype)

    def output_hessian_sqrt(self, outputs: Array, targets: Array) -> Array:
        b = batch_size_of(outputs)
        k = math.prod(outputs.shape[1:])
        eye = jnp.eye(k, dtype=compute_dtype(outputs.dtype)) * math.sqrt(self.scale(b))
        return jnp.broadcast_to(eye, (b, k, k))

    def output_hessian_sqrt_t_mv(self, outputs: Array, targets: Array, u: Array) -> Array:
        return math.sqrt(self.scale(batch_size_of(outputs))) * u.astype(
            compute_dtype(outputs.dtype))

    output_hessian_sqrt_mv = output_hessian_sqrt_t_mv  # L = sqrt(c) I is symmetric

    def sample_targets(self, key: Array, outputs: Array, num_samples: int) -> Array:
        noise = jax.random.normal(key, (num_samples, *outputs.shape), outputs.dtype)
        return outputs[None] + noise


def _check_ignore_label(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise CompositionError(
            f"softmax_cross_entropy: ignore_label must be an integer label value that marks "
            f"padding (for example -1) or None, got {value!r}"
        )


@attrs.frozen
class SoftmaxCrossEntropy(Loss):
    """Softmax cross-entropy over the last axis of the logits, averaged over positions.

    Targets are integer labels (``[B, ...]``, ``optax.losses.
    softmax_cross_entropy_with_integer_labels``) or one-hot / soft labels of the logits'
    shape (``optax.losses.softmax_cross_entropy``). An integer label outside ``[0, C)``
    gives a NaN loss (and a NaN gradient row) for its example, even under ``jit``:
    never the wrapped class ``y mod C`` (which indexing would pick for ``-1``), so a
    step on such a batch is rejected rather than trained; ``Method.step`` refuses such
    labels with an ``InputError`` before tracing where they are concrete.

    **Positions.** Every axis between the batch axis and the class axis (tokens of a
    sequence, pixels of a segmentation) is a *position*; each counted position
    contributes one cross-entropy ``l_{bt}``. ``reduction="mean"`` is the mean over the
    counted positions of the batch, as language-model practice and
    ``optax...with_integer_labels(logits, labels).mean()`` have it; ``"sum"`` is the sum::

        L = (1/N) sum_{b,t} m_{bt} l_{bt}   (mean),      L = sum_{b,t} m_{bt} l_{bt}   (sum)

    with ``m_{bt} = 0`` where the label equals ``ignore_label`` (padding) and 1
    otherwise, and ``N = max(sum m, 1)`` (integer labels) or ``N = B * P`` (P positions
    per example, soft labels, whose rows carry their own mass). For ``[B, C]`` logits
    (one position) this is the usual mean over examples. In the per-example form the
    library works with, ``l_b = q sum_t m_{bt} l_{bt}`` and ``L = c sum_b l_b`` with
    ``c = 1/B`` and the per-position weight ``q = B / N`` (mean) or ``q = 1`` (sum), a
    constant of the step's targets; the output Hessian of each counted position is
    ``c q (diag p - p p^T)`` (:meth:`position_scale` is ``c q``), and the GGN, the
    Fisher, the row-space solvers and Gauss-Newton-Bartlett all use it.
    ``sample_targets`` draws integer labels from ``Categorical(softmax(z))``;
    :meth:`mask_samples` keeps the ignored positions ignored in the draws.

    Attributes:
        ignore_label: an integer label value that marks padding (``m_{bt} = 0``: no
            loss, gradient or curvature), for example ``-1``; None (the default):
            every position counts and every label must be a class index.

    Example:
        >>> import jax.numpy as jnp
        >>> ce = SoftmaxCrossEntropy(reduction="sum")
        >>> z, u = jnp.zeros((1, 2), jnp.float32), jnp.array([[1.0, 0.0]], jnp.float32)
        >>> ce.output_hessian_mv(z, jnp.array([1]), u)
        Array([[ 0.25, -0.25]], dtype=float32)
        >>> seq = SoftmaxCrossEntropy(ignore_label=-1)  # [B, T, C] logits, [B, T] labels
        >>> round(float(seq(jnp.zeros((1, 3, 2)), jnp.array([[0, 1, -1]]))), 4)  # log 2
        0.6931
    """

    ignore_label: int | None = attrs.field(
        default=None, kw_only=True, validator=_check_ignore_label
    )

    name: ClassVar[str] = "softmax_cross_entropy"

    @staticmethod
    def _integer_labels(targets: Array) -> bool:
        return jnp.issubdtype(jnp.result_type(targets), jnp.integer)

    def _counted(self, targets: Array) -> Array:
        """Integer labels: True where the position counts (its label is not ignored)."""
        if self.ignore_label is None:
            return jnp.ones(targets.shape, bool)
        return targets != self.ignore_label

    def _valid_labels(self, outputs: Array, targets: Array) -> Array:
        """``0 <= y < C`` or ignored, per label: a bad label gives NaN, never a wrapped class."""
        return ((targets >= 0) & (targets < outputs.shape[-1])) | ~self._counted(targets)

    def _label_mass(self, logits: Array, targets: Array) -> Array:
        """``m = sum_k y_k`` per position (``[B, ..., 1]``): 1, or 0 where ignored."""
        cdt = compute_dtype(logits.dtype)
        if self._integer_labels(targets):
            return self._counted(targets)[..., None].astype(cdt)
        return jnp.sum(targets.astype(cdt), axis=-1, keepdims=True)

    def _position_weight(self, outputs: Array, targets: Array) -> Array | float:
        """q: ``B / N`` for the mean over positions, 1 for the sum (see the class doc)."""
        if self.reduction == "sum":
            return 1.0
        positions = math.prod(outputs.shape[1:-1])
        if self.ignore_label is None or not self._integer_labels(targets):
            return 1.0 / positions
        cdt = compute_dtype(outputs.dtype)
        counted = jnp.sum(self._counted(targets).astype(cdt))
        return outputs.shape[0] / jnp.maximum(counted, 1.0)

    def position_scale(self, outputs: Array, targets: Array) -> Array | float:
        return self.scale(batch_size_of(outputs)) * self._position_weight(outputs, targets)

    def mask_samples(self, samples: Array, targets: Array) -> Array:
        if self.ignore_label is None or not self._integer_labels(targets):
            return samples
        return jnp.where(self._counted(targets), samples, self.ignore_label)

    def _one_hot(self, outputs: Array, targets: Array) -> Array:
        cdt = compute_dtype(outputs.dtype)
        if not self._integer_labels(targets):
            return targets.astype(cdt)
        counted = self._counted(targets)
        y = jax.nn.one_hot(jnp.where(counted, targets, 0), outputs.shape[-1], dtype=cdt)
        y = y * counted[..., None]
        return jnp.where(self._valid_labels(outputs, targets)[..., None], y, jnp.nan)

    def per_example(self, outputs: Array, targets: Array) -> Array:
        cdt = compute_dtype(outputs.dtype)
        logits = outputs.astype(cdt)
        if self._integer_labels(targets):
            counted = self._counted(targets)
            safe = jnp.where(counted, targets, 0)
            per = optax.losses.softmax_cross_entropy_with_integer_labels(logits, safe)
            per = jnp.where(counted, per, 0.0)
            per = jnp.where(self._valid_labels(outputs, targets), per, jnp.nan)
        else:
            if targets.shape != outputs.shape:
                raise CompositionError(
                    f"softmax_cross_entropy: soft/one-hot targets must have the logits' shape "
                    f"{outputs.shape}, got {targets.shape} (or pass integer labels)"
                )
            per = optax.losses.softmax_cross_entropy(logits, targets.astype(cdt))
        return self._position_weight(outputs, targets) * _sum_trailing(per)

    def output_grad(self, outputs: Array, targets: Array) -> Array:
        cdt = compute_dtype(outputs.dtype)
        p = jax.nn.softmax(outputs.astype(cdt), axis=-1)
        y = self._one_hot(outputs, targets)
        m = self._label_mass(outputs, targets)
        s = self.position_scale(outputs, targets)
        return (s * (m * p - y)).astype(outputs.dtype)

    def output_hessian_mv(self, outputs: Array, targets: Array, u: Array) -> Array:
        cdt = compute_dtype(outputs.dtype)
        p = jax.nn.softmax(outputs.astype(cdt), axis=-1)
        u = u.astype(cdt)
        pu = p * u
        hu = pu - p * jnp.sum(pu, axis=-1, keepdims=True)
        s = self.position_scale(outputs, targets)
        return (s * self._label_mass(outputs, targets) * hu).astype(outputs.dtype)

    def output_hessian_sqrt(self, outputs: Array, targets: Array) -> Array:
        p, sq, scale = self._sqrt_parts(outputs, targets)  # [B, T, C]
        (b, t, n_cls), cdt = p.shape, p.dtype
        eye = jnp.eye(n_cls, dtype=cdt)
        blocks = sq[..., :, None] * eye - p[..., :, None] * sq[..., None, :]  # [B, T, C, C]
        blocks = blocks * scale[..., None]
        if t == 1:
            return blocks[:, 0]
        full = jnp.einsum("btcd,ts->btcsd", blocks, jnp.eye(t, dtype=cdt))
        return full.reshape(b, t * n_cls, t * n_cls)

    def _sqrt_parts(self, outputs: Array, targets: Array) -> tuple[Array, Array, Array]:
        """``p``, ``sqrt(p)`` and the block scale ``sqrt(s m)``, each ``[B, T, C|1]``."""
        cdt = compute_dtype(outputs.dtype)
        b, n_cls = outputs.shape[0], outputs.shape[-1]
        p = jax.nn.softmax(outputs.astype(cdt), axis=-1).reshape(b, -1, n_cls)
        m = self._label_mass(outputs, targets).reshape(b, -1, 1)
        scale = jnp.sqrt(self.position_scale(outputs, targets) * m)
        return p, jnp.sqrt(p), jnp.broadcast_to(scale, (*p.shape[:2], 1))

    def output_hessian_sqrt_t_mv(self, outputs: Array, targets: Array, u: Array) -> Array:
        """``L^T u = sqrt(s m) (sqrt(p) * u - sqrt(p) (p . u))`` per position, O(C)."""
        p, sq, scale = self._sqrt_parts(outputs, targets)
        u = u.reshape(p.shape).astype(p.dtype)
        # the class sums as batched dots and no a * b - c * d: with a sum and a
        # difference of products, the rows rounded differently with the batch split
        # over 2 devices (canonical mode, tests/test_sharding.py)
        pu = jnp.einsum("btc,btc->bt", p, u)[..., None]
        return (scale * sq * (u - pu)).reshape(p.shape[0], -1)

    def output_hessian_sqrt_mv(self, outputs: Array, targets: Array, r: Array) -> Array:
        """``L r = sqrt(s m) (sqrt(p) * r - p (sqrt(p) . r))`` per position, O(C)."""
        p, sq, scale = self._sqrt_parts(outputs, targets)
        r = r.reshape(p.shape).astype(p.dtype)
        sr = jnp.einsum("btc,btc->bt", sq, r)[..., None]
        return (scale * (sq * r - p * sr)).reshape(p.shape[0], -1)

    def sample_targets(self, key: Array, outputs: Array, num_samples: int) -> Array:
        logits = outputs.astype(compute_dtype(outputs.dtype))
        return jax.random.categorical(key, logits, axis=-1, shape=(num_samples, *logits.shape[:-1]))


@attrs.frozen
class SigmoidBinaryCrossEntropy(Loss):
    """Sigmoid binary cross-entropy, elementwise on logits, summed per example.

    Targets are probabilities in [0, 1] with the logits' shape (a target outside it
    gives a NaN loss, even under ``jit``: the loss would be unbounded below; ``Method.step``
    refuses it before tracing where it is concrete). With ``s = sigmoid(z)``
    the output Hessian is ``diag(c s (1 - s))`` whatever the targets;
    ``sample_targets`` draws ``Bernoulli(s)`` (as the outputs' dtype).

    Example:
        >>> import jax.numpy as jnp
        >>> round(float(SigmoidBinaryCrossEntropy()(jnp.zeros((1, 2)), jnp.ones((1, 2)))), 4)
        1.3863
    """

    name: ClassVar[str] = "sigmoid_binary_cross_entropy"

    def per_example(self, outputs: Array, targets: Array) -> Array:
        cdt = compute_dtype(outputs.dtype)
        y = targets.astype(cdt)
        per = optax.losses.sigmoid_binary_cross_entropy(outputs.astype(cdt), y)
        return _sum_trailing(jnp.where((y >= 0) & (y <= 1), per, jnp.nan))

    def _curv(self, outputs: Array) -> Array:
        s = jax.nn.sigmoid(outputs.astype(compute_dtype(outputs.dtype)))
        return self.scale(batch_size_of(outputs)) * s * (1.0 - s)

    def output_hessian_mv(self, outputs: Array, targets: Array, u: Array) -> Array:
        return (self._curv(outputs) * u.astype(compute_dtype(u.dtype))).astype(outputs.dtype)

    def output_hessian_sqrt(self, outputs: Array, targets: Array) -> Array:
        d = jnp.sqrt(self._curv(outputs)).reshape(outputs.shape[0], -1)
        return jax.vmap(jnp.diag)(d)

    def output_hessian_sqrt_t_mv(self, outputs: Array, targets: Array, u: Array) -> Array:
        d = jnp.sqrt(self._curv(outputs)).reshape(outputs.shape[0], -1)
        return d * u.astype(d.dtype)

    output_hessian_sqrt_mv = output_hessian_sqrt_t_mv  # L = diag(d) is symmetric

    def sample_targets(self, key: Array, outputs: Array, num_samples: int) -> Array:
        s = jax.nn.sigmoid(outputs.astype(compute_dtype(outputs.dtype)))
        draws = jax.random.bernoulli(key, s, shape=(num_samples, *outputs.shape))
        return draws.astype(outputs.dtype)


@attrs.frozen
class CallableLoss(Loss):
    """Any per-example loss ``fn(outputs, targets) -> [B]`` (outputs may be a pytree).

    Derivatives come from autodiff (see :class:`Loss`). ``convex=True`` promises that
    every per-example output Hessian is psd, which lets a GGN use the cheap
    ``jvp``-of-``grad`` product; otherwise it uses the psd part through the square root.
    ``sampler(key, outputs, num_samples)`` enables the Monte-Carlo Fisher.

    Example:
        >>> import jax.numpy as jnp
        >>> huber = CallableLoss(lambda z, y: jnp.sum(optax.huber_loss(z, y), axis=-1))
        >>> huber.per_example(jnp.zeros((2, 3)), jnp.ones((2, 3))).shape
        (2,)
    """

    fn: Callable[[PyTree, PyTree], Array] = attrs.field(eq=id)
    convex: bool = attrs.field(default=False, kw_only=True)
    sampler: Callable[..., PyTree] | None = attrs.field(default=None, eq=id, kw_only=True)

    @property
    def name(self) -> str:  # type: ignore[override]
        return getattr(self.fn, "__name__", type(self.fn).__name__)

    @property
    def output_hessian_psd(self) -> bool:
        return self.convex

    def per_example(self, outputs: PyTree, targets: PyTree) -> Array:
        per = jnp.asarray(self.fn(outputs, targets))
        b = batch_size_of(outputs)
        if per.shape != (b,):
            raise CompositionError(
                f"loss {self.name!r} must return per-example values of shape ({b},) "
                f"(Optax convention, no reduction), got shape {per.shape}"
            )
        return per

    def sample_targets(self, key: Array, outputs: PyTree, num_samples: int) -> PyTree:
        if self.sampler is None:
            return super().sample_targets(key, outputs, num_samples)
        return self.sampler(key, outputs, num_samples)


# --------------------------------------------------------------------------- lookup

LOSSES: dict[str, type[Loss]] = {
    "mse": MSE,
    "softmax_cross_entropy": SoftmaxCrossEntropy,
    "sigmoid_binary_cross_entropy": SigmoidBinaryCrossEntropy,
}
"""Built-in losses by name."""


def get_loss(
    loss: str | Loss | Callable[[PyTree, PyTree], Array],
    reduction: str | None = None,
    **options: Any,
) -> Loss:
    """Resolve a loss given by name, instance or per-example callable.

    Args:
        loss: a built-in name (see :data:`LOSSES`), a :class:`Loss`, or a callable
            ``fn(outputs, targets) -> [B]`` (wrapped in :class:`CallableLoss`).
        reduction: ``"mean"`` or ``"sum"``; None keeps an instance's own reduction and
            means ``"mean"`` for names and callables.
        **options: fields of a built-in loss (``ignore_label`` of
            ``softmax_cross_entropy``) or of :class:`CallableLoss` (``convex``,
            ``sampler``).

    Raises:
        CompositionError: unknown name (the message lists the valid names).
    """
    if isinstance(loss, Loss):
        return loss if reduction is None else attrs.evolve(loss, reduction=reduction)
    red = "mean" if reduction is None else reduction
    if isinstance(loss, str):
        cls = LOSSES.get(loss)
        if cls is None:
            close = difflib.get_close_matches(loss, LOSSES, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise CompositionError(
                f"unknown loss {loss!r}; valid names: {', '.join(sorted(LOSSES))}, or pass a "
                f"callable loss(outputs, targets) -> per-example losses [B].{hint}"
            )
        allowed = sorted(f.name for f in attrs.fields(cls) if f.name != "reduction")
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            takes = f"options {', '.join(allowed)}" if allowed else "no options"
            raise CompositionError(f"loss {loss!r} takes {takes}, got {unknown}")
        return cls(reduction=red, **options)
    if callable(loss):
        return CallableLoss(loss, reduction=red, **options)
    raise CompositionError(
        f"loss must be a name, a Loss or a callable, got {type(loss).__name__}; "
        f"valid names: {', '.join(sorted(LOSSES))}"
    )

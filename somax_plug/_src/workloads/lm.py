"""A small character-level transformer language model on the Python standard library.

Corpus (every machine with Python has it, offline): the source files of the running
interpreter's standard library, ``sysconfig.get_paths()["stdlib"]``, a fixed
selection split **by file**: :data:`TRAIN_FILES` (33 modules, 1,490,436 bytes on
CPython 3.11.7) for training, :data:`VALID_FILES` (8 other modules, 174,477 bytes) for
validation. Each split is the concatenation of its files' bytes in the listed order.
The numbers therefore depend (slightly) on the Python version; the report records it
and the size of every file read. A listed file that is missing is skipped and
recorded.

Vocabulary (98 symbols, byte-level): id 0 for any byte outside printable ASCII
(non-ASCII UTF-8 bytes, about 1e-4 of the corpus), 1 for newline, 2 for tab, 3..97
for the 95 printable ASCII characters (32..126).

Model (``size="full"``: 2 layers, width 96, 4 heads, context 32; 245,858
parameters; ``size="tiny"``, for the tests: 1 layer, width 16, context 8): token and
learned position embeddings, then per layer (pre-LayerNorm) ``x + attn(LN(x))`` with
causal multi-head self-attention and ``x + MLP(LN(x))`` with a 4x GELU MLP, a final
LayerNorm and an untied output head. Initialisation N(0, 0.02) (output projections
scaled by ``1/sqrt(2 * layers)``), LayerNorm scale 1, biases 0.

Rows convention: the model's inputs are the minibatch's token windows **flattened
to rows**, ``x: int32[B * T]``; ``predict_fn`` reshapes them to ``[B, T]``, runs the
transformer and returns the logits flattened the same way, ``[B * T, V]``, with integer
targets ``[B * T]`` (the next characters). ``loss="softmax_cross_entropy"`` with its
default mean reduction is then the **mean cross-entropy per character** (nats), the
quantity reported and targeted. (Given ``[B, T, V]`` logits and ``[B, T]`` targets,
somax_plug's cross-entropy would sum over T inside each example and average over B
only: a per-sequence loss T times larger, and a different curvature scale.)

Minibatches: 16 windows of 33 characters (512 predicted characters) at uniform random
offsets of the training stream, drawn afresh at every step by
``numpy.random.default_rng([seed, step])``. Validation: 64 fixed windows evenly
spaced over the validation stream (2,048 predicted characters). Target: validation
loss 2.4 nats per character (3.46 bits).
"""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from somax_plug._src.workloads.base import Budget, Target, Workload

TRAIN_FILES = (
    "abc.py", "argparse.py", "ast.py", "base64.py", "bisect.py", "calendar.py",
    "configparser.py", "contextlib.py", "copy.py", "csv.py", "dataclasses.py", "difflib.py",
    "enum.py", "fractions.py", "functools.py", "gettext.py", "heapq.py", "inspect.py",
    "ipaddress.py", "logging/__init__.py", "pprint.py", "queue.py", "random.py", "shlex.py",
    "shutil.py", "statistics.py", "string.py", "tarfile.py", "textwrap.py", "threading.py",
    "tokenize.py", "typing.py", "uuid.py",
)
"""Training files, relative to the standard library's folder."""

VALID_FILES = (
    "fnmatch.py", "glob.py", "json/decoder.py", "json/encoder.py", "operator.py",
    "selectors.py", "weakref.py", "locale.py",
)
"""Validation files (none of them in :data:`TRAIN_FILES`)."""

VOCAB_SIZE = 98
TARGET_LOSS = 2.4

ADAM_GRID = (3e-4, 1e-3, 3e-3, 1e-2)
"""``optax.adam``'s learning rates (the bench reports every one and the best)."""

SOPHIA_LR = 1e-3
"""``optax.contrib.sophia``'s learning rate (required by optax; not tuned)."""

SIZES: dict[str, dict[str, int]] = {
    "full": {"layers": 2, "width": 96, "heads": 4, "context": 32, "batch": 16, "valid": 64},
    "tiny": {"layers": 1, "width": 16, "heads": 2, "context": 8, "batch": 4, "valid": 8},
}


# ----------------------------------------------------------------------------- data
def stdlib_root() -> Path:
    """The running interpreter's standard-library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def _table() -> np.ndarray:
    table = np.zeros(256, np.int32)
    table[10], table[9] = 1, 2
    table[32:127] = np.arange(3, 98)
    return table


TABLE = _table()


def encode(data: bytes) -> np.ndarray:
    """Bytes to ids (see the vocabulary in the module docstring)."""
    return TABLE[np.frombuffer(data, np.uint8)]


def decode(ids: Any) -> str:
    """Ids to text (id 0 as ``\\ufffd``)."""
    chars = {0: "\ufffd", 1: "\n", 2: "\t", **{i: chr(i + 29) for i in range(3, 98)}}
    return "".join(chars[int(i)] for i in np.asarray(ids).ravel())


def load_split(files: tuple[str, ...], root: Path | None = None) -> tuple[np.ndarray, dict]:
    """The concatenated, encoded files and ``{"files": {name: bytes}, "missing": [...]}``."""
    root = stdlib_root() if root is None else root
    parts, sizes, missing = [], {}, []
    for name in files:
        path = root / name
        if not path.is_file():
            missing.append(name)
            continue
        data = path.read_bytes()
        parts.append(encode(data))
        sizes[name] = len(data)
    if not parts:
        raise FileNotFoundError(f"none of the corpus files were found under {root}")
    return np.concatenate(parts).astype(np.int32), {"files": sizes, "missing": missing}


def load_corpus(root: Path | None = None) -> dict[str, Any]:
    """``{"train", "valid"}`` id streams and what was read (``root``, file sizes)."""
    root = stdlib_root() if root is None else root
    train, train_info = load_split(TRAIN_FILES, root)
    valid, valid_info = load_split(VALID_FILES, root)
    return {"train": train, "valid": valid, "root": str(root),
            "train_files": train_info, "valid_files": valid_info}


def windows(stream: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    """``[len(starts), length]`` slices of ``stream``."""
    return stream[starts[:, None] + np.arange(length)[None, :]]


def train_batch(stream: np.ndarray, seed: int, step: int, batch: int,
                context: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows ``(x [B*T], y [B*T])`` of one step (a pure function of seed and step)."""
    starts = np.random.default_rng([seed, step]).integers(0, len(stream) - context - 1, batch)
    w = windows(stream, starts, context + 1)
    return w[:, :-1].reshape(-1), w[:, 1:].reshape(-1)


def valid_rows(stream: np.ndarray, count: int, context: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` evenly spaced validation windows as rows ``(x, y)``."""
    starts = np.linspace(0, len(stream) - context - 1, count).astype(np.int64)
    w = windows(stream, starts, context + 1)
    return w[:, :-1].reshape(-1), w[:, 1:].reshape(-1)


# ---------------------------------------------------------------------------- model
def init_transformer(key: jax.Array, layers: int, width: int, context: int,
                     vocab: int = VOCAB_SIZE) -> dict[str, Any]:
    """Parameters (see the module docstring for the initialisation)."""
    keys = iter(jax.random.split(key, 3 + 4 * layers))
    normal = lambda shape, std=0.02: std * jax.random.normal(next(keys), shape, jnp.float32)
    proj_std = 0.02 / math.sqrt(2 * layers)
    zeros, ones = (lambda n: jnp.zeros((n,), jnp.float32)), (lambda n: jnp.ones((n,),
                                                                              jnp.float32))
    params: dict[str, Any] = {"tok": normal((vocab, width)), "pos": normal((context, width))}
    for i in range(layers):
        params[f"block{i}"] = {
            "ln1_g": ones(width), "ln1_b": zeros(width),
            "qkv_w": normal((width, 3 * width)), "qkv_b": zeros(3 * width),
            "proj_w": normal((width, width), proj_std), "proj_b": zeros(width),
            "ln2_g": ones(width), "ln2_b": zeros(width),
            "fc_w": normal((width, 4 * width)), "fc_b": zeros(4 * width),
            "out_w": normal((4 * width, width), proj_std), "out_b": zeros(width),
        }
    params["lnf_g"], params["lnf_b"] = ones(width), zeros(width)
    params["head_w"], params["head_b"] = normal((width, vocab)), zeros(vocab)
    return params


def layer_norm(x: jax.Array, g: jax.Array, b: jax.Array, eps: float = 1e-5) -> jax.Array:
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + eps) * g + b


def attention(x: jax.Array, p: dict[str, Any], heads: int) -> jax.Array:
    """Causal multi-head self-attention of ``x [B, T, D]``."""
    b, t, d = x.shape
    qkv = x @ p["qkv_w"] + p["qkv_b"]
    q, k, v = jnp.split(qkv, 3, axis=-1)
    split = lambda a: a.reshape(b, t, heads, d // heads).transpose(0, 2, 1, 3)
    q, k, v = split(q), split(k), split(v)
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d // heads)
    mask = jnp.tril(jnp.ones((t, t), bool))
    scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    h = jax.nn.softmax(scores, axis=-1) @ v
    h = h.transpose(0, 2, 1, 3).reshape(b, t, d)
    return h @ p["proj_w"] + p["proj_b"]


def transformer(params: dict[str, Any], tokens: jax.Array, heads: int) -> jax.Array:
    """Logits ``[B, T, V]`` of tokens ``[B, T]``."""
    t = tokens.shape[1]
    h = params["tok"][tokens] + params["pos"][:t]
    i = 0
    while f"block{i}" in params:
        p = params[f"block{i}"]
        h = h + attention(layer_norm(h, p["ln1_g"], p["ln1_b"]), p, heads)
        z = layer_norm(h, p["ln2_g"], p["ln2_b"])
        h = h + jax.nn.gelu(z @ p["fc_w"] + p["fc_b"]) @ p["out_w"] + p["out_b"]
        i += 1
    h = layer_norm(h, params["lnf_g"], params["lnf_b"])
    return h @ params["head_w"] + params["head_b"]


def make_predict_fn(context: int, heads: int) -> Any:
    """``predict_fn(params, x [B*T]) -> logits [B*T, V]`` (the rows convention)."""

    def predict_fn(params: dict[str, Any], x: jax.Array) -> jax.Array:
        logits = transformer(params, x.reshape(-1, context), heads)
        return logits.reshape(-1, logits.shape[-1])

    return predict_fn


# ------------------------------------------------------------------------- workload
def make(size: str = "full", corpus: dict[str, Any] | None = None) -> Workload:
    """The stdlib character-LM workload (``size``: ``"full"`` or ``"tiny"``)."""
    cfg = SIZES[size]
    corpus = load_corpus() if corpus is None else corpus
    train, valid = corpus["train"], corpus["valid"]
    ctx, bsz = cfg["context"], cfg["batch"]

    def batch(seed: int, step: int) -> tuple[Any, Any]:
        x, y = train_batch(train, seed, step, bsz, ctx)
        return jnp.asarray(x), jnp.asarray(y)

    vx, vy = valid_rows(valid, cfg["valid"], ctx)
    budget = (Budget(max_steps=4000, max_seconds=45.0, eval_every_s=0.5, eval_every_steps=25)
              if size == "full" else Budget(max_steps=5, max_seconds=30.0))
    import platform

    return Workload(
        name="lm",
        title=(f"stdlib char-LM, transformer {cfg['layers']}x{cfg['width']} "
               f"({cfg['heads']} heads, context {ctx})"),
        size=size,
        init_params=lambda key: init_transformer(key, cfg["layers"], cfg["width"], ctx),
        predict_fn=make_predict_fn(ctx, cfg["heads"]),
        batch=batch,
        eval_data=(jnp.asarray(vx), jnp.asarray(vy)),
        target=Target("loss", TARGET_LOSS),
        budget=budget,
        batch_size=bsz,
        adam_grid=ADAM_GRID,
        sophia_lr=SOPHIA_LR,
        info={
            "dataset": {
                "name": "Python standard library sources (sysconfig stdlib)",
                "python": platform.python_version(), "root": corpus["root"],
                "train_chars": int(len(train)), "valid_chars": int(len(valid)),
                "train_files": corpus["train_files"], "valid_files": corpus["valid_files"],
                "vocab": f"{VOCAB_SIZE} ids: 0 non-printable/non-ASCII byte, 1 newline, "
                         "2 tab, 3..97 printable ASCII",
                "valid_windows": cfg["valid"],
            },
            "model": {"kind": "transformer (pre-LN, causal, GELU MLP 4x)", **cfg},
            "loss": "softmax_cross_entropy over rows [B*T, V]: mean nats per character",
            "rows_per_example": ctx,
            "minibatches": f"{bsz} windows of {ctx + 1} characters at random offsets, fresh "
                           "every step, numpy.random.default_rng([seed, step])",
        },
    )

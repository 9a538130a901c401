"""Reliability corpus: corrupt, hand-edited and hostile checkpoints (issue 12).

Every probe runs through :func:`reliability.check_corpus`: a corrupt or hand-edited
checkpoint (truncated or flipped files, a missing array or item, a header without a
key or of the wrong JSON type, deep nesting, a random file or directory, an old
``.npz`` of somax_plug 0.1) must give a :class:`~somax_plug.CheckpointError`; a
hostile file system (planted symbolic links, a file or a foreign directory at the
path, a crash or an interrupt mid-save, concurrent saves) must lose and overwrite
nothing. Each case snapshots every file under its own directory and raises
:class:`reliability.Lost` if a file it must not touch changed; ``restore`` must never
change anything.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reliability import Case, Lost, check_corpus

from somax_plug import CheckpointError, checkpoint, compose
from somax_plug._src import checkpoint as impl


def predict(p, x):
    return x @ p["w"] + p["b"]


def make(**kw):
    return compose(preset="sgn", predict_fn=predict, loss="mse", **kw)


PARAMS = {"w": jnp.arange(6.0).reshape(3, 2) / 10, "b": jnp.ones(2)}
BATCH = (jnp.arange(12.0).reshape(4, 3) / 7, jnp.ones((4, 2)))


def leaves_bytes(tree):
    out = []
    for x in jax.tree_util.tree_leaves(tree):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        out.append((str(x.dtype), np.shape(x), np.asarray(x).tobytes()))
    return out


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root``: a file's SHA-256, a link's target, a directory."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link -> " + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


class World:
    """One good checkpoint and a fresh directory per case."""

    def __init__(self, root: Path):
        self.root = root
        self.method = make()
        state = self.method.init(PARAMS)
        self.params, self.state, _ = self.method.step(PARAMS, state, BATCH, jax.random.key(0))
        self.good = checkpoint.save(
            root / "good", self.params, self.state, self.method, metadata={"step": 1}
        )
        self.expected = leaves_bytes((self.params, self.state))
        self._n = itertools.count()

    def dir(self) -> Path:
        d = self.root / f"case{next(self._n)}"
        d.mkdir()
        return d

    def copy(self) -> Path:
        target = self.dir() / "ckpt"
        shutil.copytree(self.good, target, symlinks=True)
        return target

    def restores_intact(self, path: Path) -> None:
        """``path`` must hold the good checkpoint, bitwise (else: lost)."""
        try:
            p, s = checkpoint.restore(path, make())
        except CheckpointError as e:
            raise Lost(f"the checkpoint at {path} no longer restores: {e}") from None
        if leaves_bytes((p, s)) != self.expected:
            raise Lost(f"the checkpoint at {path} restores other values")


# ------------------------------------------------------------------ helpers
def header_file(path: Path) -> Path:
    return path / impl.HEADER_ITEM / impl._HEADER_FILE


def edit_header(path: Path, edit, *, redigest: bool = True) -> None:
    """Change the JSON header; with ``redigest`` also fix its SHA-256 (a careful edit)."""
    header = json.loads(header_file(path).read_text())
    header = edit(header)
    if redigest and isinstance(header, dict) and "header_sha256" in header:
        header["header_sha256"] = impl._header_digest(header)
    text = header if isinstance(header, str) and header.startswith("RAW:") else None
    header_file(path).write_text(text[4:] if text else json.dumps(header))


def files(path: Path, pattern: str) -> list[Path]:
    found = sorted(p for p in path.glob(pattern) if p.is_file())
    assert found, f"no file matches {pattern!r} under {path}: Orbax's layout changed"
    return found


def flip(p: Path) -> None:
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0x01
    p.write_bytes(bytes(b))


def truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def restore_case(world: World, name: str, mutate, says=("corrupt",), **kw) -> Case:
    """Mutate a copy of the good checkpoint; ``restore`` must refuse it and change nothing."""

    def run():
        path = world.copy()
        mutate(path)
        before = snapshot(path.parent)
        try:
            return checkpoint.restore(path, make(**kw))
        finally:
            if snapshot(path.parent) != before:
                raise Lost(f"restore changed files under {path.parent}")

    return Case(name, run, says=says, error=CheckpointError, tags=("checkpoint",))


def set_key(keys, value):
    def edit(h):
        node = h
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
        return h

    return edit


def drop_key(keys):
    def edit(h):
        node = h
        for k in keys[:-1]:
            node = node[k]
        del node[keys[-1]]
        return h

    return edit


def state_as_dict(state, drop: str | None = None):
    """The state as the nested dict Orbax stores, optionally without one leaf."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
        parts = impl._key_parts(path)
        if ".".join(parts) == drop:
            continue
        node = out
        for k in parts[:-1]:
            node = node.setdefault(k, {})
        node[parts[-1]] = x
    return out


def resave_state(path: Path, tree) -> None:
    import orbax.checkpoint as ocp

    shutil.rmtree(path / "state")
    with ocp.StandardCheckpointer() as ck:
        ck.save(path / "state", tree)
        ck.wait_until_finished()


def old_npz(p: Path) -> None:
    """A checkpoint file of somax_plug 0.1 (format 1: arrays and a JSON header)."""
    header = json.dumps({"format": 1, "plan_fingerprint": "x"}).encode()
    with open(p, "wb") as fh:
        np.savez(fh, **{"params/0": np.ones(3), "__header__": np.frombuffer(header, np.uint8)})


# ------------------------------------------------------------------ corrupt files
def corrupt_cases(w: World) -> list[Case]:
    cases = []
    # every file of the checkpoint with a flipped byte: refused, or (for the files
    # Orbax does not read, e.g. commit markers) restored bitwise: never silently wrong
    seen_unread = set()
    for rel in sorted(snapshot(w.good)):
        if (w.good / rel).is_dir():
            continue
        # the per-process OCDBT files are merged into the item's own manifest and not
        # read on restore: one of each directory stands for the rest (runtime)
        if "ocdbt.process_" in rel:
            if str(Path(rel).parent) in seen_unread:
                continue
            seen_unread.add(str(Path(rel).parent))
        for how, fn in (("flipped byte", flip),):  # truncations: the explicit cases below

            def run(rel=rel, fn=fn):
                path = w.copy()
                fn(path / rel)
                try:
                    p, s = checkpoint.restore(path, make())
                except CheckpointError as e:
                    return ("refused", str(e))
                return ("restored", leaves_bytes((p, s)))

            def check(result, rel=rel):
                if result[0] == "restored" and result[1] != w.expected:
                    raise AssertionError(f"{rel}: restored other values without an error")

            cases.append(Case(f"{how} in {rel}: refused or bitwise", run, "ok", check=check))

    def each(pattern, fn):
        return lambda p: [fn(f) for f in files(p, pattern)]

    cases += [
        restore_case(w, "truncated header", lambda p: truncate(header_file(p))),
        restore_case(w, "empty header", lambda p: header_file(p).write_bytes(b"")),
        restore_case(w, "flipped byte in header", lambda p: flip(header_file(p))),
        restore_case(w, "truncated state data", each("state/d/*", truncate)),
        restore_case(w, "flipped byte in state data", each("state/d/*", flip)),
        restore_case(w, "truncated params data", each("params/d/*", truncate)),
        restore_case(w, "flipped byte in params data", each("params/d/*", flip)),
        restore_case(w, "flipped byte in state manifest", each("state/manifest.ocdbt", flip)),
        restore_case(w, "truncated state manifest", each("state/manifest.ocdbt", truncate)),
        restore_case(w, "truncated params manifest", each("params/manifest.ocdbt", truncate)),
        restore_case(w, "truncated sharding file", each("state/_sharding", truncate)),
        restore_case(w, "truncated array metadata", each("state/array_metadatas/*", truncate)),
        restore_case(w, "truncated Orbax tree metadata", each("state/_METADATA", truncate)),
        restore_case(w, "flipped byte in sharding file", each("state/_sharding", flip)),
        restore_case(
            w, "non-UTF-8 header", lambda p: header_file(p).write_bytes(b"\xff\xfe{\x00}")
        ),
        restore_case(w, "header is a directory", lambda p: _replace_with_dir(header_file(p))),
        restore_case(
            w,
            "header is a symlink elsewhere",
            lambda p: _replace_with_link(header_file(p), p.parent / "elsewhere" / "header"),
        ),
    ]
    # missing pieces
    for rel, says in (
        ("state", ("'state'", "missing")),
        ("params", ("'params'", "missing")),
        ("somax_plug", ("not a somax_plug checkpoint", "somax_plug")),
        ("somax_plug/metadata", ("missing",)),
        ("state/d", ("corrupt",)),
        ("state/manifest.ocdbt", ("corrupt",)),
        ("state/_METADATA", ("corrupt",)),
    ):
        cases.append(
            restore_case(w, f"missing {rel}", lambda p, rel=rel: _remove(p / rel), says=says)
        )

    def without_array_metadatas():  # optional in Orbax: refused or restored bitwise
        path = w.copy()
        _remove(path / "state" / "array_metadatas")
        try:
            return leaves_bytes(checkpoint.restore(path, make()))
        except CheckpointError:
            return w.expected

    cases.append(
        Case(
            "missing state/array_metadatas: refused or bitwise",
            without_array_metadatas,
            "ok",
            check=lambda r: _same_bytes(w, r),
        )
    )
    cases += [
        restore_case(
            w,
            "a missing array (state re-saved without damping.rho)",
            lambda p: resave_state(p, state_as_dict(w.state, drop="damping.rho")),
            says=("state",),
        ),
        restore_case(
            w,
            "an extra array (state re-saved with one more)",
            lambda p: resave_state(p, {**state_as_dict(w.state), "extra": jnp.ones(2)}),
            says=("state arrays",),
        ),
        restore_case(
            w,
            "a wrong shape (state.damping.lam re-saved as [2])",
            lambda p: resave_state(
                p,
                w.state._replace(
                    damping=w.state.damping._replace(lam=jnp.zeros(2, w.state.damping.lam.dtype))
                ),
            ),
            says=("state.damping.lam: expected", "found", "[2]"),
        ),
        restore_case(
            w,
            "a wrong dtype (state.count re-saved as int16)",
            lambda p: resave_state(p, w.state._replace(count=np.int16(1))),
            says=("state.count: expected int32[]", "found int16[]"),
        ),
        restore_case(
            w,
            "other values with the same shapes (state re-saved)",
            lambda p: resave_state(p, w.state._replace(count=jnp.asarray(7, jnp.int32))),
            says=("state.count", "SHA-256"),
        ),
    ]
    return cases


def _same_bytes(w: World, got) -> None:
    if got != w.expected:
        raise AssertionError("restored other values without an error")


def _remove(p: Path) -> None:
    shutil.rmtree(p) if p.is_dir() else p.unlink()


def _replace_with_dir(p: Path) -> None:
    p.unlink()
    p.mkdir()


def _replace_with_link(p: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(p.read_text())
    p.unlink()
    p.symlink_to(target)


# ------------------------------------------------------------------ hand-edited header
def header_cases(w: World) -> list[Case]:
    cases = [
        restore_case(
            w,
            "edited metadata, digest not fixed",
            lambda p: edit_header(p, set_key(["metadata", "step"], 2), redigest=False),
            says=("header_sha256",),
        ),
        restore_case(
            w,
            "header_sha256 removed",
            lambda p: edit_header(p, drop_key(["header_sha256"])),
            says=("header_sha256",),
        ),
    ]
    for key in (
        "plan_fingerprint",
        "registry_fingerprint",
        "plan_content_fingerprint",
        "plan",
        "params",
        "state",
        "versions",
        "metadata",
    ):
        cases.append(
            restore_case(
                w,
                f"header without {key!r}",
                lambda p, key=key: edit_header(p, drop_key([key])),
                says=(f"no key {key!r}",),
            )
        )
    cases.append(
        restore_case(
            w,
            "header without 'format'",
            lambda p: edit_header(p, drop_key(["format"])),
            says=("format None",),
        )
    )
    for keys in (
        ["state", "treedef"],
        ["state", "leaves"],
        ["params", "skeleton"],
        ["state", "leaves", 0, "sha256"],
        ["state", "leaves", 0, "shape"],
        ["state", "leaves", 0, "stored"],
        ["params", "leaves", 0, "dtype"],
    ):
        cases.append(
            restore_case(
                w,
                f"header without {keys}",
                lambda p, keys=keys: edit_header(p, drop_key(keys)),
                says=(f"no key {keys[-1]!r}",),
            )
        )
    wrong_types = [
        ([], "a JSON list", ("JSON list", "expected an object")),
        ('RAW:"a string"', "a JSON string", ("JSON str",)),
        ("RAW:3", "a JSON number", ("JSON int",)),
        ("RAW:null", "JSON null", ("JSON NoneType",)),
    ]
    for value, what, says in wrong_types:
        cases.append(
            restore_case(
                w, f"header is {what}", lambda p, v=value: edit_header(p, lambda h: v), says=says
            )
        )
    for keys, value, says in (
        (["format"], "2", ("format '2'",)),
        (["format"], 1, ("format 1",)),
        (["plan_fingerprint"], 7, ("plan_fingerprint", "JSON int", "expected str")),
        (["metadata"], [1], ("metadata", "JSON list", "expected dict")),
        (["plan"], "sgn", ("plan", "JSON str")),
        (["state"], [], ("'state'", "JSON list")),
        (["state", "leaves"], {}, ("leaves", "JSON dict", "expected list")),
        (["state", "leaves", 0], "x", ("leaves'][0]", "JSON str")),
        (["state", "leaves", 0, "shape"], "3", ("shape", "JSON str")),
        (["state", "leaves", 0, "shape"], [-1], ("non-negative",)),
        (["state", "leaves", 0, "shape"], [True], ("non-negative",)),
        (["state", "leaves", 0, "sha256"], "abc", ("SHA-256",)),
        (["state", "leaves", 0, "dtype"], 5, ("dtype", "JSON int")),
        (["params", "leaves", 0, "dtype"], "float99", ("params['b']", "float99")),
        (["params", "skeleton"], {"leaf": 99}, ("skeleton", "leaf index 99")),
        (["params", "skeleton"], {"weird": 1}, ("skeleton", "unknown node kind")),
        (["params", "skeleton"], [1, 2], ("skeleton", "one-key object")),
        (["state", "leaves", 0, "shape"], [5], ("state.count", "header lists that")),
        (["state", "leaves", 0, "stored"], {"shape": [5], "dtype": "int32"}, ("state.count",)),
        (["state", "leaves", 0, "sha256"], "0" * 64, ("state.count", "SHA-256")),
        (["state", "treedef"], "PyTreeDef(*)", ("state structure differs",)),
        (["state", "leaves", 0, "path"], ".other", ("where state.count belongs",)),
        (["plan_fingerprint"], "0123456789abcdef", ("0123456789abcdef", "plan")),
    ):
        cases.append(
            restore_case(
                w,
                f"header {keys} = {json.dumps(value)[:30]}",
                lambda p, k=keys, v=value: edit_header(p, set_key(k, v)),
                says=says,
            )
        )
    deep_skeleton = {"leaf": 0}
    for _ in range(300):
        deep_skeleton = {"list": [deep_skeleton]}
    cases += [
        restore_case(
            w,
            "deep nesting: 100000 brackets",
            lambda p: header_file(p).write_text("[" * 100_000 + "]" * 100_000),
            says=("does not read",),
        ),
        restore_case(
            w,
            "deep nesting: metadata 5000 levels deep",
            lambda p: header_file(p).write_text(
                header_file(p).read_text().rstrip()[:-1]
                + ', "deep": '
                + '{"a": ' * 5000
                + "1"
                + "}" * 5000
                + "}"
            ),
            says=("does not read",),
        ),
        restore_case(
            w,
            "deep nesting: a 300-level skeleton",
            lambda p: edit_header(p, set_key(["params", "skeleton"], deep_skeleton)),
            says=("nested more than 200",),
        ),
        restore_case(
            w,
            "another plan",
            lambda p: None,
            says=("The plans differ", w.method.plan.fingerprint, "damping"),
            damping={"name": "constant", "lam": 0.5},
        ),
    ]
    return cases


# ------------------------------------------------------------------ not a checkpoint
def not_checkpoint_cases(w: World) -> list[Case]:
    def at(make_thing, says):
        def run():
            d = w.dir()
            path = d / "ckpt"
            make_thing(path)
            before = snapshot(d)
            try:
                return checkpoint.restore(path, make())
            finally:
                if snapshot(d) != before:
                    raise Lost("restore changed a file that is not a checkpoint")

        return run, says

    rng = np.random.default_rng(0)

    def random_dir(p):
        p.mkdir()
        (p / "data.bin").write_bytes(rng.bytes(100))
        (p / "sub").mkdir()

    def loop(p):
        p.symlink_to(p.name)

    probes = {
        "missing path": (lambda p: None, ("does not exist",)),
        "random bytes file": (
            lambda p: p.write_bytes(rng.bytes(300)),
            ("not a somax_plug checkpoint", "a file"),
        ),
        "old-format .npz of 0.1": (old_npz, ("old .npz format", "format 1", "save again")),
        "a .npy file": (_npy, ("NumPy .npy",)),
        "a zip of junk": (lambda p: p.write_bytes(b"PK\x03\x04" + rng.bytes(50)), ("zip",)),
        "a random directory": (random_dir, ("no 'somax_plug' item",)),
        "an empty directory": (lambda p: p.mkdir(), ("no 'somax_plug' item",)),
        "a broken symlink": (lambda p: p.symlink_to(p.parent / "nowhere"), ("does not exist",)),
        "a symlink loop": (loop, ("symbolic link", "loops")),
        "only the header item": (
            lambda p: (shutil.copytree(w.good, p), _remove(p / "state"), _remove(p / "params")),
            ("missing",),
        ),
    }
    cases = []
    for name, (fn, says) in probes.items():
        run, says = at(fn, says)
        cases.append(Case(f"restore from {name}", run, says=says, error=CheckpointError))
    cases.append(
        Case(
            "read_header of an old .npz",
            lambda: checkpoint.read_header(_made(w, old_npz)),
            says=("old .npz format",),
            error=CheckpointError,
        )
    )

    def through_link():
        d = w.dir()
        (d / "link").symlink_to(w.good)
        return checkpoint.restore(d / "link", make())

    cases.append(
        Case(
            "restore through a symlink to a good checkpoint (reading is fine)",
            through_link,
            "ok",
            check=lambda r: _same(w, r),
        )
    )
    return cases


def _npy(p: Path) -> None:
    with open(p, "wb") as fh:
        np.save(fh, np.ones(3))


def _made(w: World, fn) -> Path:
    p = w.dir() / "x"
    fn(p)
    return p


def _same(w: World, result) -> None:
    if leaves_bytes(result) != w.expected:
        raise AssertionError("restored other values")


# ------------------------------------------------------------------ saving safely
def save_cases(w: World) -> list[Case]:
    def guarded(setup, *, victims=(), expect="error", says=(), after=None, **save_kw):
        """``setup(dir, path)``; save; nothing under ``victims`` may change."""

        def run():
            d = w.dir()
            path = d / "ckpt"
            victim_dir = d / "victims"
            victim_dir.mkdir()
            (victim_dir / "precious.txt").write_text("user data")
            shutil.copytree(w.good, victim_dir / "other_ckpt")
            setup(d, path)
            before = snapshot(victim_dir)
            try:
                out = checkpoint.save(path, w.params, w.state, w.method, **save_kw)
            finally:
                if snapshot(victim_dir) != before:
                    raise Lost(f"save changed files under {victim_dir}")
                if after is not None:
                    after(d, path)
                leftovers = [p.name for p in d.iterdir() if ".tmp-" in p.name]
                if leftovers:
                    raise Lost(f"save left temporary directories behind: {leftovers}")
            w.restores_intact(out)
            return out

        return run

    def link_to(target_rel):
        return lambda d, p: p.symlink_to(d / "victims" / target_rel)

    def unchanged_file(content: bytes):
        def setup(d, p):
            p.write_bytes(content)

        def after(d, p):
            if p.read_bytes() != content:
                raise Lost(f"{p} was overwritten")

        return setup, after

    def foreign_dir(d, p):
        p.mkdir()
        (p / "notes.txt").write_text("mine")

    def foreign_after(d, p):
        if (p / "notes.txt").read_text() != "mine" or len(list(p.iterdir())) != 1:
            raise Lost(f"{p} was changed")

    def user_file_in_ckpt(d, p):
        shutil.copytree(w.good, p)
        (p / "README.txt").write_text("my notes")

    def user_file_after(d, p):
        if not (p / "README.txt").exists():
            raise Lost("the user's file inside the old checkpoint was lost")

    rnd_setup, rnd_after = unchanged_file(b"\x00user data\x01" * 10)
    npz_path = w.root / "an_old.npz"
    old_npz(npz_path)
    npz_setup, npz_after = unchanged_file(npz_path.read_bytes())

    cases = [
        Case(
            "save over a symlink to a file",
            guarded(link_to("precious.txt")),
            says=("symbolic link", "real path"),
            error=CheckpointError,
        ),
        Case(
            "save over a symlink to another checkpoint",
            guarded(link_to("other_ckpt")),
            says=("symbolic link",),
            error=CheckpointError,
        ),
        Case(
            "save over a regular file",
            guarded(rnd_setup, after=rnd_after),
            says=("exists and is a file", "choose another path"),
            error=CheckpointError,
        ),
        Case(
            "save over an old .npz",
            guarded(npz_setup, after=npz_after),
            says=("exists and is a zip file",),
            error=CheckpointError,
        ),
        Case(
            "save over a directory that is not a checkpoint",
            guarded(foreign_dir, after=foreign_after),
            says=("not a somax_plug checkpoint",),
            error=CheckpointError,
        ),
        Case(
            "save over a checkpoint holding a user's file",
            guarded(user_file_in_ckpt, after=user_file_after),
            says=("not a somax_plug checkpoint",),
            error=CheckpointError,
        ),
        Case(
            "save with a planted PATH.tmp symlink (the old temp name)",
            guarded(lambda d, p: (d / "ckpt.tmp").symlink_to(d / "victims" / "precious.txt")),
            expect="ok",
        ),
        Case(
            "save with a planted Orbax temp-name symlink",
            guarded(lambda d, p: (d / "ckpt.orbax-checkpoint-tmp-0").symlink_to(d / "victims")),
            expect="ok",
        ),
        Case("save into an empty directory", guarded(lambda d, p: p.mkdir()), expect="ok"),
        Case(
            "save over an earlier checkpoint",
            guarded(lambda d, p: shutil.copytree(w.good, p)),
            expect="ok",
        ),
        Case(
            "save with non-JSON metadata writes nothing",
            guarded(lambda d, p: None, metadata={"f": float("nan")}),
            says=("JSON",),
            error=CheckpointError,
        ),
        Case(
            "save below a file",
            lambda: checkpoint.save(
                _made(w, lambda p: p.write_text("x")) / "c", w.params, w.state, w.method
            ),
            says=("cannot write",),
            error=CheckpointError,
        ),
        Case(
            "save a state of another method",
            lambda: checkpoint.save(
                w.dir() / "c", w.params, make(tx=_adam()).init(w.params), w.method
            ),
            says=("state structure differs",),
            error=CheckpointError,
        ),
    ]
    return cases


def _adam():
    import optax

    return optax.adam(1e-3)


# ------------------------------------------------------------------ crashes, races
def crash_cases(w: World, monkeypatch) -> list[Case]:
    import orbax.checkpoint as ocp

    def with_previous():
        d = w.dir()
        path = d / "ckpt"
        shutil.copytree(w.good, path)
        return d, path

    new_params = jax.tree_util.tree_map(lambda x: x + 1, w.params)

    def no_temp_left(d):
        left = [p.name for p in d.iterdir() if ".tmp-" in p.name]
        if left:
            raise Lost(f"temporary directories left behind: {left}")

    def crash_in_orbax(exc):
        def run():
            d, path = with_previous()
            real = ocp.Checkpointer.save

            def broken(self, directory, *a, **k):
                real(self, directory, *a, **k)  # the new one is fully written...
                raise exc  # ...and the process is interrupted before it is installed

            with monkeypatch.context() as m:
                m.setattr(ocp.Checkpointer, "save", broken)
                try:
                    checkpoint.save(path, new_params, w.state, w.method)
                except KeyboardInterrupt:
                    pass
                finally:
                    w.restores_intact(path)
                    no_temp_left(d)

        return run

    def crash_between_renames():
        d, path = with_previous()
        real_rename = os.rename
        calls = []

        def rename(a, b):
            calls.append((a, b))
            if Path(b) == path and Path(a).name == "checkpoint":
                raise OSError(errno.EIO, "disk failed")
            return real_rename(a, b)

        def no_exchange(a, b):
            raise OSError(errno.ENOSYS, "no renameat2")

        with monkeypatch.context() as m:
            m.setattr(impl, "_exchange", no_exchange)
            m.setattr(impl.os, "rename", rename)
            try:
                checkpoint.save(path, new_params, w.state, w.method)
            finally:
                m.undo()
                w.restores_intact(path)
                no_temp_left(d)

    def killed_between_renames():
        """A hard kill after the old one moved aside: restore says where it is."""
        d, path = with_previous()
        aside = d / ".ckpt.tmp-killed"
        aside.mkdir()
        os.rename(path, aside / "previous")
        try:
            checkpoint.restore(path, make())
        finally:
            w.restores_intact(aside / "previous")

    def killed_mid_save():
        """A process killed hard inside Orbax's write: the previous checkpoint is intact."""
        d, path = with_previous()
        script = f"""
import os, jax, jax.numpy as jnp
jax.config.update("jax_enable_x64", True)
import orbax.checkpoint as ocp
from somax_plug import compose, checkpoint
def predict(p, x):
    return x @ p["w"] + p["b"]
m = compose(preset="sgn", predict_fn=predict, loss="mse")
params = {{"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}}
real = ocp.Checkpointer.save
def dying(self, directory, *a, **k):
    real(self, directory, *a, **k)
    os._exit(9)
ocp.Checkpointer.save = dying
checkpoint.save({str(path)!r}, params, m.init(params), m)
"""
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
        if out.returncode != 9:
            raise AssertionError(f"the child did not die in save: {out.stderr[-800:]!r}")
        w.restores_intact(path)
        stale = [p for p in d.iterdir() if ".tmp-" in p.name]
        checkpoint.save(path, new_params, w.state, w.method)  # the next save works
        p, _ = checkpoint.restore(path, make())
        if leaves_bytes(p) != leaves_bytes(new_params):
            raise AssertionError("the save after a crash did not take")
        return stale

    def concurrent_threads():
        d = w.dir()
        path = d / "ckpt"
        versions = [jax.tree_util.tree_map(lambda x, i=i: x + i, w.params) for i in range(4)]
        errors = []

        def one(p):
            try:
                checkpoint.save(path, p, w.state, w.method)
            except CheckpointError as e:  # a clear error is allowed; corruption is not
                errors.append(e)

        threads = [threading.Thread(target=one, args=(p,)) for p in versions]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if len(errors) == len(threads):
            raise AssertionError(f"every concurrent save failed: {errors}")
        try:
            p, s = checkpoint.restore(path, make())
        except CheckpointError as e:
            raise Lost(f"concurrent saves corrupted the checkpoint: {e}") from None
        if leaves_bytes(p) not in [leaves_bytes(v) for v in versions]:
            raise Lost("concurrent saves mixed two checkpoints")
        no_temp_left(d)

    def concurrent_restores():
        hook, stderr = sys.unraisablehook, sys.stderr
        results, errors = [], []

        def one():
            try:
                results.append(leaves_bytes(checkpoint.restore(w.good, make())))
            except Exception as e:  # noqa: BLE001 (any failure here is a finding)
                errors.append(e)

        threads = [threading.Thread(target=one) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors or any(r != w.expected for r in results) or len(results) != 4:
            raise AssertionError(f"concurrent restores: {errors}")
        if sys.unraisablehook is not hook or sys.stderr is not stderr:
            raise AssertionError("concurrent restores left process-wide hooks swapped")

    def two_processes():
        """Two processes save different values to one path at once, five times each."""
        d = w.dir()
        path = d / "ckpt"
        script = """
import os, sys, time, jax, jax.numpy as jnp
jax.config.update("jax_enable_x64", True)
from somax_plug import compose, checkpoint
def predict(p, x):
    return x @ p["w"] + p["b"]
m = compose(preset="sgn", predict_fn=predict, loss="mse")
me, d = int(sys.argv[1]), sys.argv[2]
params = {"w": jnp.full((3, 2), float(me)), "b": jnp.full(2, float(me))}
state = m.init(params)
open(os.path.join(d, f"ready{me}"), "w").close()
while not all(os.path.exists(os.path.join(d, f"ready{i}")) for i in (1, 2)):
    time.sleep(0.01)
for _ in range(5):
    checkpoint.save(os.path.join(d, "ckpt"), params, state, m)
"""
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", script, str(i), str(d)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for i in (1, 2)
        ]
        outs = [p.communicate(timeout=180) for p in procs]
        failed = [o[1].decode()[-600:] for p, o in zip(procs, outs, strict=True) if p.returncode]
        if len(failed) == 2:
            raise AssertionError(f"both concurrent processes failed: {failed}")
        try:
            p, _ = checkpoint.restore(path, make())
        except CheckpointError as e:
            raise Lost(f"concurrent processes corrupted the checkpoint: {e}") from None
        values = {float(np.asarray(x).ravel()[0]) for x in jax.tree_util.tree_leaves(p)}
        if values not in ({1.0}, {2.0}):
            raise Lost(f"concurrent processes mixed two checkpoints: {values}")
        no_temp_left(d)
        return failed

    def interleaved(initially_there: bool):
        """Save B runs completely between save A's write and A's install."""

        def run():
            d = w.dir()
            path = d / "ckpt"
            if initially_there:
                shutil.copytree(w.good, path)
            a_params = jax.tree_util.tree_map(lambda x: x + 10, w.params)
            b_params = jax.tree_util.tree_map(lambda x: x + 20, w.params)
            real = impl._fsync_tree
            nested = []

            def hook(root):
                real(root)
                if not nested:
                    nested.append(1)
                    checkpoint.save(path, b_params, w.state, w.method)

            with monkeypatch.context() as m:
                m.setattr(impl, "_fsync_tree", hook)
                checkpoint.save(path, a_params, w.state, w.method)
            p, _ = checkpoint.restore(path, make())
            if leaves_bytes(p) != leaves_bytes(a_params):  # the last to install wins
                raise Lost("the last save to finish did not win")
            no_temp_left(d)

        return run

    return [
        Case(
            "an error inside Orbax's write keeps the previous checkpoint",
            crash_in_orbax(RuntimeError("disk full")),
            says=("could not write", "unchanged"),
            error=CheckpointError,
        ),
        Case(
            "an interrupt (Ctrl-C) mid-save keeps the previous checkpoint",
            crash_in_orbax(KeyboardInterrupt()),
            "ok",
        ),
        Case(
            "a failure between the two renames (no atomic exchange) puts the old one back",
            crash_between_renames,
            says=("could not write", "disk failed"),
            error=CheckpointError,
        ),
        Case(
            "a kill between the two renames: restore names the previous checkpoint",
            killed_between_renames,
            says=("interrupted", "previous", ".ckpt.tmp-killed"),
            error=CheckpointError,
        ),
        Case("a process killed hard mid-save", killed_mid_save, "ok"),
        Case("four concurrent saves to one path", concurrent_threads, "ok"),
        Case("four concurrent restores from threads", concurrent_restores, "ok"),
        Case("two processes saving to one path at once", two_processes, "ok"),
        Case("an interleaved save, path absent", interleaved(False), "ok"),
        Case("an interleaved save over a checkpoint", interleaved(True), "ok"),
    ]


# ------------------------------------------------------------------ the corpus
def test_checkpoint_corpus(tmp_path, monkeypatch):
    w = World(tmp_path)
    cases = (
        corrupt_cases(w)
        + header_cases(w)
        + not_checkpoint_cases(w)
        + save_cases(w)
        + crash_cases(w, monkeypatch)
    )
    good_before = snapshot(w.good)
    counts = check_corpus("checkpoints", cases)
    assert snapshot(w.good) == good_before  # the original was never touched
    assert counts["named"] >= 90 and counts["raw"] == counts["silent"] == counts["lost"] == 0


def test_messages_never_advise_allow_pickle(tmp_path):
    rng = np.random.default_rng(1)
    for i, blob in enumerate([rng.bytes(64), b"\x93NUMPY" + rng.bytes(40), b"PK" + rng.bytes(9)]):
        path = tmp_path / f"f{i}"
        path.write_bytes(blob)
        with pytest.raises(CheckpointError) as info:
            checkpoint.restore(path, make())
        assert "pickle" not in str(info.value).lower()


def test_no_temp_name_is_fixed_or_followed(tmp_path):
    """The staging directory is fresh per save (mkdtemp), never a fixed, guessable name."""
    method = make()
    state = method.init(PARAMS)
    seen = []
    real = impl.tempfile.mkdtemp

    def spy(*a, **k):
        seen.append(real(*a, **k))
        return seen[-1]

    with pytest.MonkeyPatch.context() as m:
        m.setattr(impl.tempfile, "mkdtemp", spy)
        checkpoint.save(tmp_path / "c", PARAMS, state, method)
        checkpoint.save(tmp_path / "c", PARAMS, state, method)
    assert len(set(seen)) == 2 and all(Path(s).parent == tmp_path for s in seen)
    assert all(Path(s).name.startswith(".c.tmp-") for s in seen)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]

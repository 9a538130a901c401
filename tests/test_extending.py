"""Adding a built-in component touches its module and its test file, nothing else.

Tried as a new maintainer would, in a copy of the repository: one solver class
(with its declaration) is appended to ``somax_plug/builtin/solvers.py`` and one test
file is written. Without touching anything else, the solver appears in
``somax-plug list --json`` and ``somax-plug show``, in the docs table the MkDocs hook
generates, and in the built-in conformance suite, which it passes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

NEW_SOLVER = '''


@declare(
    "dense_lu",
    summary="dense LU solve of (C + lam I) s = rhs (a maintainer's new solver)",
    requires={"resources": {"operator"}},
)
@attrs.frozen
class DenseLU(Solver):
    """``s = (C + lam I)^-1 rhs`` by ``jnp.linalg.solve`` on the dense matrix."""

    max_size: int = option(512, ge=1, doc="refuse larger systems")

    def solve(self, op, rhs, lam, precond, stats, state):
        b, unravel = tree.ravel(rhs)
        eye = jnp.eye(b.shape[0], dtype=b.dtype)
        a = op.to_dense().astype(b.dtype) + jnp.asarray(lam, b.dtype) * eye
        x = jnp.linalg.solve(a, b)
        r = b - a @ x
        rel = jnp.sqrt(jnp.vdot(r, r) / jnp.maximum(jnp.vdot(b, b), jnp.finfo(b.dtype).tiny))
        rel = rel.astype(tree.accum_dtype(rhs))
        info = SolverInfo(jnp.asarray(1, jnp.int32), rel, rel <= 1e-6)
        return tree.cast_like(unravel(x), rhs), info, state
'''

NEW_TEST = '''
from somax_plug.testing.conformance import check_solver


def test_dense_lu_conforms():
    check_solver("dense_lu", max_examples=2)
'''


def _run(args, cwd, env):
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_a_new_solver_needs_only_its_class_and_its_test(tmp_path):
    repo = tmp_path / "repo"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", ".hypothesis")
    for part in ("somax_plug", "tests", "docs"):
        shutil.copytree(ROOT / part, repo / part, ignore=ignore)
    for part in ("pyproject.toml", "mkdocs.yml"):
        shutil.copy(ROOT / part, repo / part)
    solvers = repo / "somax_plug" / "builtin" / "solvers.py"
    solvers.write_text(solvers.read_text() + textwrap.dedent(NEW_SOLVER))
    (repo / "tests" / "test_dense_lu.py").write_text(NEW_TEST)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOMAX_PLUG_")}
    env["PYTHONPATH"] = str(repo)
    env["CI"] = "true"

    listed = _run([sys.executable, "-m", "somax_plug._src.cli", "list", "--json"], repo, env)
    assert listed.returncode == 0, listed.stderr[-2000:]
    rows = {r["qualified_name"]: r for r in json.loads(listed.stdout)}
    row = rows["builtin:dense_lu"]
    assert row["kind"] == "solver" and row["requires"]["resources"] == ["operator"]
    assert row["options"][0]["name"] == "max_size"

    shown = _run([sys.executable, "-m", "somax_plug._src.cli", "show", "dense_lu"], repo, env)
    assert shown.returncode == 0 and "max_size" in shown.stdout, shown.stderr[-2000:]

    table = _run(
        [
            sys.executable,
            "-c",
            "import sys; sys.path.insert(0, 'docs/_ext'); import component_tables as t; "
            "print(t.on_page_markdown('<!-- components: solver -->'))",
        ],
        repo,
        env,
    )
    assert table.returncode == 0, table.stderr[-2000:]
    assert "`dense_lu`" in table.stdout and "max_size" in table.stdout

    tests = _run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_dense_lu.py",
            "tests/test_conformance_builtins.py",
            "-k",
            "dense_lu",
        ],
        repo,
        env,
    )
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]
    assert "2 passed" in tests.stdout, tests.stdout[-2000:]
    # the copy was imported, not the installed package
    assert "test_solver_conforms[dense_lu]" in _run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "tests/test_conformance_builtins.py", "-k", "dense_lu"],
        repo,
        env,
    ).stdout

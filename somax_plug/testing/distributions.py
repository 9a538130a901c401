"""Fake installed distributions: a real ``.dist-info`` on ``sys.path``.

:func:`install_fake_distribution` writes a package directory and a
``NAME-VERSION.dist-info`` with ``METADATA`` and ``entry_points.txt`` into a
folder and puts that folder on ``sys.path``, so ``importlib.metadata`` finds the
entry point exactly as it finds a pip-installed plugin. Use it to test a plugin's
loading behaviour without pip; the project's CI also installs the example plugins
with pip into a fresh virtual environment.

Example:
    >>> import tempfile
    >>> from somax_plug.testing.distributions import install_fake_distribution
    >>> folder = tempfile.mkdtemp()
    >>> dist = install_fake_distribution(
    ...     folder, "demo-plugin", {"demo_plugin": "X = 1\\n"}, entry_points={"demo": "demo_plugin"}
    ... )
    >>> dist.remove()
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import attrs


@attrs.define
class FakeDistribution:
    """Handle to a fake distribution; :meth:`remove` undoes the installation."""

    name: str
    version: str
    root: Path
    modules: tuple[str, ...]

    def remove(self) -> None:
        path = str(self.root)
        while path in sys.path:
            sys.path.remove(path)
        for module in list(sys.modules):
            if module.split(".")[0] in self.modules:
                del sys.modules[module]
        importlib.invalidate_caches()


def install_fake_distribution(
    folder: str | Path,
    name: str,
    modules: Mapping[str, str],
    entry_points: Mapping[str, str],
    version: str = "0.1.0",
    group: str = "somax_plug",
) -> FakeDistribution:
    """Write modules and a dist-info into ``folder`` and put it on ``sys.path``.

    Args:
        folder: an empty directory (for example pytest's ``tmp_path``).
        name: the distribution name (``somax-plug-foo``).
        modules: module name -> source; a dotted name creates packages.
        entry_points: entry-point name (the plugin name) -> ``module[:attr]``.
        version: the distribution version.
        group: the entry-point group (``somax_plug``).
    """
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    for module, source in modules.items():
        parts = module.split(".")
        package_dir = root.joinpath(*parts[:-1])
        package_dir.mkdir(parents=True, exist_ok=True)
        for i in range(1, len(parts)):
            init = root.joinpath(*parts[:i], "__init__.py")
            if not init.exists():
                init.write_text("")
        target = package_dir / f"{parts[-1]}.py"
        if (package_dir / parts[-1]).is_dir():
            target = package_dir / parts[-1] / "__init__.py"
        target.write_text(source)
    safe = re.sub(r"[-_.]+", "_", name)
    info = root / f"{safe}-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = [f"[{group}]"] + [f"{k} = {v}" for k, v in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    (info / "RECORD").write_text("")
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    top = tuple(sorted({m.split(".")[0] for m in modules}))
    return FakeDistribution(name=name, version=version, root=root, modules=top)

"""The import contract (docs/development.md#layers), checked on the source: every import
statement of the package, at module level or inside functions, is read from the AST.

* ``models`` (pure PyTorch) imports nothing else of the project;
* inside ``core``: ``io`` ← ``plane`` ← ``tiling`` ← ``volume`` ← ``runs`` (each imports only
  those to its left, and ``models``; ``volume`` not ``runs``); ``linking`` (no model) imports
  only ``io``;
* nothing below the widgets (``models``, ``core``, ``cli``) imports Qt, napari's Qt parts,
  magicgui/superqt or the widgets; the CLI does not import the widgets.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "napari_esam"
QT = ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "superqt", "magicgui", "napari.qt",
      "napari._qt", "napari.window", "napari.viewer")

#: what each part may import from the project (prefixes of module names)
ALLOWED = {
    "napari_esam.models": ("napari_esam.models",),
    "napari_esam.core.io": ("napari_esam.core.io",),
    "napari_esam.core.plane": ("napari_esam.models", "napari_esam.core.io",
                               "napari_esam.core.plane"),
    "napari_esam.core.tiling": ("napari_esam.models", "napari_esam.core.io",
                                "napari_esam.core.plane", "napari_esam.core.tiling"),
    "napari_esam.core.volume": ("napari_esam.models", "napari_esam.core.io",
                                "napari_esam.core.plane", "napari_esam.core.tiling",
                                "napari_esam.core.volume"),
    "napari_esam.core.linking": ("napari_esam.core.io", "napari_esam.core.linking"),
    "napari_esam.core.runs": ("napari_esam.models", "napari_esam.core"),
    "napari_esam.cli": ("napari_esam.models", "napari_esam.core", "napari_esam.cli"),
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file (relative ones resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    mod = module_name(path, root)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found += [(node.lineno, f"{base}.{a.name}" if a.name != "*" else base)
                      for a in node.names]
    return found


def violations(part: str, root: Path = PACKAGE.parent) -> list[str]:
    allowed = (*ALLOWED[part], "napari_esam.__version__")
    out = []
    for path in sorted((root / part.replace(".", "/")).rglob("*.py")):
        for line, name in imports(path, root):
            where = f"{path.relative_to(root)}:{line} imports {name}"
            if name.startswith(QT) or name.split(".")[0] in QT:
                out.append(where + " (Qt below the widgets)")
            elif name.startswith("napari_esam") and not name.startswith(allowed):
                out.append(where + f" (allowed: {', '.join(allowed)})")
    return out


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_the_import_contract_holds(part):
    assert violations(part) == []


def test_the_contract_detects_violations(tmp_path):
    """The check can fail: a model importing core (inside a function, relatively) and a core
    module importing Qt are reported."""
    (tmp_path / "napari_esam" / "models").mkdir(parents=True)
    (tmp_path / "napari_esam" / "models" / "probe.py").write_text(
        "def f():\n    from ..core.plane import labels\n")
    (tmp_path / "napari_esam" / "core" / "runs").mkdir(parents=True)
    (tmp_path / "napari_esam" / "core" / "runs" / "probe.py").write_text("import qtpy\n")
    assert violations("napari_esam.models", tmp_path) == [
        "napari_esam/models/probe.py:2 imports napari_esam.core.plane.labels "
        "(allowed: napari_esam.models, napari_esam.__version__)"]
    assert violations("napari_esam.core.runs", tmp_path) == [
        "napari_esam/core/runs/probe.py:1 imports qtpy (Qt below the widgets)"]

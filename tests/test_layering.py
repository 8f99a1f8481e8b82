"""The layering rule of docs/architecture.md, read from the package's own imports.

Data flows one way: a module may import from its own layer and the layers below it, never from a
layer above. The rule is checked by parsing every module of resgeom_fast with ``ast`` (imports
inside functions included, relative imports resolved), so a new import that breaks it fails here
with the file, the line and both layers named.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Optional

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "resgeom_fast"

# Bottom to top. Modules of one layer may import each other; the package's own __init__ (which
# re-exports every layer) and the command line sit above everything.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("floor", ("core", "_lib", "_progress", "_version", "_C")),
    ("ops", ("ops",)),
    ("linalg", ("linalg",)),
    ("models/data", ("models", "data")),
    ("operators", ("operators",)),
    ("train", ("train",)),
    ("analysis", ("analysis",)),
    ("experiments", ("experiments",)),
    ("cli", ("cli", "__main__", "__init__")),
]
LEVEL = {top: i for i, (_, tops) in enumerate(LAYERS) for top in tops}


def layer_of(module: str) -> Optional[int]:
    """The layer index of a dotted module name inside resgeom_fast (None outside the package)."""
    parts = module.split(".")
    if parts[0] != "resgeom_fast":
        return None
    if len(parts) == 1:
        return LEVEL["__init__"]
    return LEVEL.get(parts[1])


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every import in ``source`` (``from a import b`` yields
    ``a.b`` when ``b`` is a module of the package, else ``a``)."""
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                rel = Path(*sub.split(".")[1:]) if sub.startswith("resgeom_fast.") else None
                if rel is not None and ((PACKAGE / rel).is_dir() or (PACKAGE / rel).with_suffix(".py").exists()):
                    out.append((node.lineno, sub))
                else:
                    out.append((node.lineno, target))
    return out


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """Every import of ``source`` (the text of ``module``) that reaches a higher layer."""
    own = layer_of(module)
    if own is None:
        return []
    found = []
    for line, name in imported_modules(source, module, is_package):
        target = layer_of(name)
        if target is not None and target > own:
            found.append(f"{module} (layer {LAYERS[own][0]}) line {line} imports {name} (layer {LAYERS[target][0]})")
    return found


def package_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_top_level_part_of_the_package_has_a_layer():
    tops = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in package_modules()}
    unknown = sorted(t for t in tops if t not in LEVEL)
    assert not unknown, f"give these a layer in tests/test_layering.py and docs/architecture.md: {unknown}"


def test_no_module_imports_from_a_higher_layer():
    found = []
    for path in package_modules():
        mod = module_name(path)
        is_pkg = path.name == "__init__.py"
        if is_pkg:
            mod = mod.rpartition(".")[0]
        found += violations(path.read_text(), mod, is_pkg)
    assert not found, "layering violations:\n" + "\n".join(found)


@pytest.mark.parametrize("source, module, is_pkg, expected", [
    ("from resgeom_fast.analysis import collapse\n", "resgeom_fast.operators.hessian", False, 1),
    ("def f():\n    from ..experiments import runner\n", "resgeom_fast.analysis.spectrum", False, 1),
    ("from . import eigsh\nfrom resgeom_fast import ops\n", "resgeom_fast.linalg", True, 0),
    ("from resgeom_fast import analysis\n", "resgeom_fast.models.fc", False, 1),
    ("from ..core import checks\nimport torch\n", "resgeom_fast.models.fc", False, 0),
    ("from resgeom_fast.operators import hessian\n", "resgeom_fast.train.trainer", False, 0),
    ("from resgeom_fast.train import trainer\n", "resgeom_fast.operators.hessian", False, 1),
])
def test_the_checker_finds_upward_imports(source, module, is_pkg, expected):
    """The checker itself: constructed sources with a known number of upward imports."""
    assert len(violations(source, module, is_pkg)) == expected

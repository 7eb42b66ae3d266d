"""The package's layers (README, "Architecture"): each part of voxtune imports only the parts
below it, never a peer or a part above. Every import is read, those inside functions included;
imports under `if TYPE_CHECKING:` are for annotations only and are not counted."""

from __future__ import annotations

import ast
from pathlib import Path

import voxtune

PACKAGE = Path(voxtune.__file__).parent

# Lowest first. A part may import the parts of the layers before its own.
LAYERS = [
    {"errors", "tags"},
    {"files", "config", "metrics"},
    {"audio"},
    {"model"},
    {"data", "infer", "export"},
    {"eval"},
    {"train"},
    {"serve"},
    {"cli"},
]
LAYER = {part: index for index, parts in enumerate(LAYERS) for part in parts}


def part_of(path: Path) -> str:
    """The part a file belongs to: its subpackage, or its module at the top of the package."""
    relative = path.relative_to(PACKAGE).with_suffix("")
    return relative.parts[0]


def imported_parts(tree: ast.Module) -> set[str]:
    """The voxtune parts a module imports, outside `if TYPE_CHECKING:` blocks."""
    annotation_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for node in ast.walk(block)
    }
    parts = set()
    for node in ast.walk(tree):
        if id(node) in annotation_only:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from voxtune import x` imports the part x when x is one (else a name of the root).
            names = [f"voxtune.{a.name}" for a in node.names] if node.module == "voxtune" else [node.module]
        else:
            continue
        parts |= {name.split(".")[1] for name in names if name.startswith("voxtune.")}
    return parts & LAYER.keys()


def test_every_part_is_in_a_layer():
    parts = {part_of(path) for path in PACKAGE.rglob("*.py")} - {"__init__", "__main__"}
    assert parts <= LAYER.keys(), f"parts with no layer: {sorted(parts - LAYER.keys())}"


def test_each_part_imports_only_the_layers_below_it():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        part = part_of(path)
        if part not in LAYER:
            continue  # the package's own __init__: the public face, above every part
        for target in imported_parts(ast.parse(path.read_text(), str(path))):
            if target != part and LAYER[target] >= LAYER[part]:
                upward.append(f"{path.relative_to(PACKAGE.parent)}: {part} imports {target}")
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_the_check_sees_imports_inside_functions():
    """The rule would be empty if function-local imports (the lazy ones) slipped past it."""
    tree = ast.parse("def f():\n    from voxtune.serve import app\nif TYPE_CHECKING:\n    import voxtune.cli\n")
    assert imported_parts(tree) == {"serve"}

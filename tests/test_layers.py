"""The package's layers: every import inside ticketguard points down (or stays inside its own package)."""

import ast
from pathlib import Path

import ticketguard

PACKAGE = Path(ticketguard.__file__).parent
LAYERS = {
    "core": 1,
    "models": 2,
    "data": 2,
    "training": 3,
    "artifacts": 4,
    "search": 5,
    "schemes": 5,
    "verification": 6,
    "attacks": 7,
    "protect": 8,
    "experiments": 9,
    "cli": 10,
}


def _room(module: str) -> str:
    """The layer package a dotted ``ticketguard.x.y`` name belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "ticketguard":
                found.update(f"ticketguard.{alias.name}" for alias in node.names)
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name == "ticketguard" or name.startswith("ticketguard.")}


def _edges() -> list[tuple[str, str]]:
    edges = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(relative.parts)
        edges.extend((module, target) for target in _imports(path))
    return edges


def test_every_module_lives_in_a_layer() -> None:
    rooms = {_room(module) for module, _ in _edges()} | {
        p.stem if p.is_file() else p.name for p in PACKAGE.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()
    }
    assert rooms - set(LAYERS) <= {"__init__", "__main__", ""}


def test_imports_point_down_the_layers() -> None:
    upward = []
    for module, target in _edges():
        source, destination = _room(module), _room(target)
        if source in ("__init__", "__main__") or source == destination:
            continue
        if destination not in LAYERS or LAYERS[destination] >= LAYERS[source]:
            upward.append(f"{module} -> {target}")
    assert not upward, "\n".join(upward)


def test_no_test_reaches_a_private_name() -> None:
    """Tests use what the package offers: an import or attribute of a ticketguard module starting with _."""
    reached = []
    for path in sorted((PACKAGE.parent / "tests").glob("*.py")):
        tree = ast.parse(path.read_text())
        modules = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ticketguard"):
                reached += [f"{path.name}: {alias.name}" for alias in node.names if _private(alias.name)]
                modules.update(alias.asname or alias.name for alias in node.names)
            elif isinstance(node, ast.Import):
                modules.update(alias.asname or alias.name for alias in node.names if alias.name.startswith("ticketguard"))
        for node in ast.walk(tree):
            is_module_attribute = isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            if is_module_attribute and node.value.id in modules and _private(node.attr):
                reached.append(f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not reached, "\n".join(reached)


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")

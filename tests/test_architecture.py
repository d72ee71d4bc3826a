"""The house of docs/ARCHITECTURE.md: every owlnet import runs to the same floor or below."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "owlnet"

# room (first component under owlnet) -> floor, as drawn in docs/ARCHITECTURE.md
FLOORS = {
    "proto": 1, "errors": 1, "logging": 1,
    "backend": 2, "config": 2, "fileio": 2, "views": 2,
    "blob": 3, "fillers": 3, "numerics": 3, "device_checks": 3, "kernels": 3, "data": 3,
    "layer_types": 4,
    "net": 5, "fusion": 5, "arena": 5, "memory": 5, "snapshot": 5,
    "solver": 6, "parallel": 6,
    "io": 7, "net_spec": 7, "draw": 7, "coord_map": 7, "classifier": 7, "detector": 7,
    "nccl": 7, "onnx_export": 7, "__init__": 7,
    "tools": 8, "cli": 8,
}


def room_of(parts: list[str]) -> str:
    return parts[0] if parts else "__init__"


def owlnet_imports(path: Path):
    """(line, imported room) for each import of an owlnet module in ``path``."""
    relative = path.relative_to(PACKAGE).with_suffix("").parts
    package = list(relative[:-1]) if relative[-1] != "__init__" else list(relative[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
                if not node.module and not base:
                    for alias in node.names:
                        yield node.lineno, room_of([alias.name])
                    continue
                yield node.lineno, room_of(target)
            elif node.module and node.module.split(".")[0] == "owlnet":
                yield node.lineno, room_of(node.module.split(".")[1:])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "owlnet":
                    yield node.lineno, room_of(alias.name.split(".")[1:])


def test_every_module_has_a_floor():
    rooms = {room_of(list(p.relative_to(PACKAGE).with_suffix("").parts))
             for p in PACKAGE.rglob("*.py")}
    assert rooms <= set(FLOORS), f"place {sorted(rooms - set(FLOORS))} in docs/ARCHITECTURE.md"


def test_imports_never_run_up_a_floor():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        room = room_of(list(path.relative_to(PACKAGE).with_suffix("").parts))
        for line, target in owlnet_imports(path):
            if FLOORS.get(target, 0) > FLOORS[room]:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({room}, floor "
                              f"{FLOORS[room]}) imports {target} (floor {FLOORS[target]})")
    assert not upward, "\n".join(upward)

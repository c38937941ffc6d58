"""The rooms of fcit_hpc import downward only (docs/architecture.md, "Layout"): every
``import fcit_hpc.X`` (at module level or inside a function) names a room at the importer's level
or below."""

import ast

import pytest

from .conftest import ROOT

# room -> level; a module may import rooms of its level or lower. Top-level helper modules
# (errors, host, seeds, registry) belong to the config room.
LEVELS = {
    "errors": 0,
    "host": 0,
    "seeds": 0,
    "registry": 0,
    "cache": 0,
    "config": 0,
    "config_reference": 0,
    "runtime": 0,
    "resources": 0,
    "timers": 0,
    "data": 1,
    "state": 1,
    "benchmark": 2,
    "model": 3,
    "methods": 4,
    "train": 5,
    "fed": 6,
    "eval": 7,
    "run": 8,
    "compare": 8,
    "bench": 8,
    "bench_train": 8,
    "bench_lengths": 8,
    "bench_scale": 8,
    "plan": 8,
    "preflight": 8,
    "crash": 8,
    "cli": 8,
    "doctor": 8,
    "__main__": 8,
    "__init__": 8,
}
PACKAGE = ROOT / "fcit_hpc"


def room_of(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "__init__"


def imports(path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("fcit_hpc")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("fcit_hpc"):
                out.add(node.module)
    return out


def modules():
    for f in sorted(PACKAGE.rglob("*.py")):
        rel = f.relative_to(ROOT).with_suffix("")
        yield ".".join(rel.parts), f


def test_every_room_has_a_level():
    rooms = {room_of(m) for m, _ in modules()}
    assert rooms <= set(LEVELS), rooms - set(LEVELS)


@pytest.mark.parametrize("module,path", list(modules()), ids=[m for m, _ in modules()])
def test_imports_go_downward(module, path):
    mine = LEVELS[room_of(module)]
    upward = [m for m in imports(path) if m != "fcit_hpc" and LEVELS[room_of(m)] > mine]
    assert upward == [], f"{module} imports rooms above it: {upward}"


def test_the_check_catches_an_upward_import(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from fcit_hpc.fed.loop import run_federated\n")
    assert LEVELS[room_of(next(iter(imports(f))))] > LEVELS["model"]

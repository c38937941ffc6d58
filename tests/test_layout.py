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


ENTRY = LEVELS["run"]  # the commands, the run's assembly, compare, plan, pre-flight, benchmarks


def _below_entry():
    return [(m, p) for m, p in modules() if 0 < LEVELS[room_of(m)] < ENTRY]


@pytest.mark.parametrize("module,path", _below_entry(), ids=[m for m, _ in _below_entry()])
def test_no_function_below_the_entry_point_takes_the_whole_config(module, path):
    """Below the entry level a function gets the config section it reads (docs/architecture.md,
    "Configuration"): no import of ``Config``, no parameter named ``cfg`` or typed ``Config``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "fcit_hpc.config":
            found += [
                f"imports Config (line {node.lineno})" for a in node.names if a.name == "Config"
            ]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            for arg in a.posonlyargs + a.args + a.kwonlyargs:
                typed = arg.annotation is not None and "Config" == ast.unparse(arg.annotation)
                if arg.arg == "cfg" or typed:
                    found.append(f"{node.name}({arg.arg}) (line {node.lineno})")
    assert found == [], f"{module}: {found}"


@pytest.mark.parametrize("module,path", list(modules()), ids=[m for m, _ in modules()])
def test_at_most_four_positional_parameters(module, path):
    """A call with more than four arguments names the rest: every function of fcit_hpc takes at
    most four positional parameters (self and cls aside), the others keyword-only; so does every
    dataclass without a base (fields after a ``_: KW_ONLY`` marker are keyword-only; a method's
    settings, which only ``Settings.of`` builds, by keyword, aside)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        dc = isinstance(node, ast.ClassDef) and any(
            "dataclass" in ast.unparse(d) for d in node.decorator_list
        )
        if dc and not node.bases:
            n = 0
            for b in node.body:
                if isinstance(b, ast.AnnAssign) and isinstance(b.target, ast.Name):
                    if "KW_ONLY" in ast.unparse(b.annotation):
                        break
                    n += "ClassVar" not in ast.unparse(b.annotation)
            if n > 4:
                found.append(f"dataclass {node.name} ({n} positional fields, line {node.lineno})")
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            params = node.args.posonlyargs + node.args.args
            n = len([p for p in params if p.arg not in ("self", "cls")])
            if n > 4:
                found.append(f"{node.name} ({n}, line {node.lineno})")
    assert found == [], f"{module}: {found}"

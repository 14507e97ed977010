"""The dependency rule: imports point down the layers, never up.

    core      errors, lm, config, device, launch, presets   facts and settings, no torch state
    parts     data, model, losses, optim, state, checkpoint,  the pieces a loop is built from
              memory, process_memory, cuda_memory, cpu_allocator, metrics, report,
              eval_loss, interrupt, prepare, rng, files
    loop      loop                                          `fit`: runs the parts
    assembly  build, run_folder, resume, run, planner,       builds the parts from a config,
              evaluate, run_data, run_plots, run_report,     runs, plans, evaluates and reports
              cli, __main__

A module may import its own layer or any layer below it. Packages count as the layer of their name
(`minitune.data.batching` is `data`, a part). `__init__.py` of the package itself is the lazy
public face and is not checked. Every import counts, inside functions too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import minitune

PACKAGE = Path(minitune.__file__).parent
LAYERS = {
    "core": ("errors", "lm", "config", "device", "launch", "presets"),
    "parts": ("data", "model", "random_init", "losses", "optim", "state", "checkpoint", "memory", "process_memory", "rss",
              "cuda_memory", "cpu_allocator", "metrics", "report", "eval_loss", "interrupt", "prepare", "rng", "files"),
    "loop": ("loop",),
    "assembly": ("build", "run_folder", "resume", "run", "planner", "evaluate", "run_data", "run_plots", "run_report",
                 "cli", "__main__"),
}
RANK = {name: i for i, names in enumerate(LAYERS.values()) for name in names}


def _top(module: str) -> str:
    """The top-level unit of a dotted module inside the package: 'data' for 'data.batching'."""
    return module.split(".")[0]


def _sources() -> dict[str, str]:
    """Dotted module name (relative to the package) -> source, for every module but the package's face
    (scripts in folders that are not packages, such as assets/, are not modules)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if not (path.parent / "__init__.py").is_file():
            continue
        rel = path.relative_to(PACKAGE).with_suffix("")
        if rel.parts == ("__init__",):
            continue
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = path.read_text()
    return out


def _imported(module: str, source: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, imported unit) for each import of a minitune module in `source`."""
    here = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)] if node.level > 1 else here
                target = [*base, *(node.module.split(".") if node.module else [])]
                if not target:  # `from . import x` at the top: x is the unit
                    found += [(node.lineno, a.name) for a in node.names]
                else:
                    found.append((node.lineno, target[0]))
            elif node.module and node.module.split(".")[0] == "minitune":
                rest = node.module.split(".")[1:]
                found += [(node.lineno, rest[0])] if rest else [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")[1]) for a in node.names
                      if a.name.startswith("minitune.")]
    return found


def upward_imports(sources: dict[str, str], packages: frozenset[str] = frozenset()) -> list[str]:
    """Every import in `sources` that goes up a layer, as 'module:line imports unit (layer a -> b)'."""
    names = {v: k for k, vs in LAYERS.items() for v in vs}
    problems = []
    for module, source in sources.items():
        unit = _top(module)
        if unit not in RANK:
            problems.append(f"{module}: not in any layer (add it to LAYERS)")
            continue
        for line, target in _imported(module, source, module in packages):
            if target in RANK and RANK[target] > RANK[unit]:
                problems.append(f"{module}:{line} imports {target} ({names[unit]} -> {names[target]})")
    return problems


def _packages() -> frozenset[str]:
    return frozenset(".".join(p.parent.relative_to(PACKAGE).parts) for p in PACKAGE.rglob("__init__.py")
                     if p.parent != PACKAGE)


def test_imports_point_down_the_layers():
    assert upward_imports(_sources(), _packages()) == []


def test_a_planted_upward_import_is_caught():
    sources = _sources()
    sources["losses"] += "\n\ndef _planted():\n    from .run import train\n    return train\n"
    sources["state"] = sources.get("state", "") + "\nfrom minitune.loop import fit\n"
    problems = upward_imports(sources, _packages())
    assert any(p.startswith("losses:") and "imports run (parts -> assembly)" in p for p in problems), problems
    assert any(p.startswith("state:") and "imports loop (parts -> loop)" in p for p in problems), problems
    assert len(problems) == 2, problems


def test_every_module_has_a_layer():
    assert {_top(m) for m in _sources()} <= set(RANK), sorted({_top(m) for m in _sources()} - set(RANK))


def test_evaluation_does_not_import_the_training_stack():
    """eval.py's module loads the parts it scores with, not the loop, the planner, the optimizers or
    the run assembly (a fresh interpreter: other tests have imported everything here)."""
    import subprocess
    import sys

    probe = ("import sys, minitune.evaluate, minitune.cli; "
             "print(sorted(m for m in sys.modules if m.startswith('minitune.')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    loaded = {m.removeprefix("minitune.") for m in eval(out.strip().splitlines()[-1])}
    assert "evaluate" in loaded
    assert not loaded & {"build", "run", "loop", "planner", "optim", "memory", "resume", "run_folder"}, sorted(loaded)


def test_no_test_or_benchmark_imports_a_private_name():
    """Tests and benchmarks use what the package offers: `from minitune... import _name` is refused."""
    repo = PACKAGE.parent
    found = []
    for path in sorted([*(repo / "tests").glob("*.py"), *(repo / "bench").glob("*.py"), *(repo / "examples").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "minitune":
                found += [f"{path.relative_to(repo)}:{node.lineno} {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert found == [], found


MAX_MODULE_LINES = 460  # "about 450": one concern a module
MAX_FUNCTION_LINES = 60  # statements of a function, its docstring left out


def test_modules_and_functions_stay_small():
    too_long = []
    for module, source in _sources().items():
        lines = source.count("\n")
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{module}: {lines} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = node.body[0]
                has_doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str)
                start = first.end_lineno + 1 if has_doc and len(node.body) > 1 else first.lineno
                if node.end_lineno - start + 1 > MAX_FUNCTION_LINES:
                    too_long.append(f"{module}.{node.name}: {node.end_lineno - start + 1} lines")
    assert too_long == [], too_long

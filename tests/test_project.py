"""Project-level rules: what CI's log shows, and how the package's layers import each other."""
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_make_test_prints_pytest_summary_line():
    """pytest hides its `N passed` line at -qq: the Makefile's -q and the config's addopts together
    must not quieten it twice."""
    addopts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"].get("addopts", "")
    recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    command = next(line for line in recipe.splitlines() if "pytest" in line)
    quiet = sum(arg.count("q") for arg in (command + " " + addopts).split() if re.fullmatch(r"-q+", arg))
    assert quiet <= 1, f"pytest runs at -{'q' * quiet}: its summary line is hidden"


# Each layer imports only from itself and the layers before it (issue: "layers without cycles").
LAYERS = [
    {"config", "memory", "runtime"},
    {"algos", "tasks", "tools", "monitor"},
    {"envs"},
    {"models"},
    {"rollout"},
    {"training"},
    {"rewards"},
    {"recipes"},
    {"cli"},
]


def import_graph() -> dict[str, set[str]]:
    """steprl module -> the steprl modules it imports, at any depth of the file (lazy imports count)."""
    import ast

    package = ROOT / "steprl"
    graph = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        is_package = parts[-1] == "__init__"
        graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] if node.module else [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t == "steprl" or t.startswith("steprl.")}
    return graph


def layer_of(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else ""
    return next(i for i, layer in enumerate(LAYERS) if top in layer) if top else -1


def test_imports_only_go_down_the_layers():
    upward = [f"{a} -> {b}" for a, targets in import_graph().items() for b in targets
              if b != "steprl" and layer_of(b) > layer_of(a)]
    assert not upward, upward


def test_no_import_cycles():
    graph = import_graph()
    state, cycles = {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt in graph and nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_every_package_has_a_layer():
    tops = {m.split(".")[1] for m in import_graph() if m.count(".")}
    assert tops <= set().union(*LAYERS), tops - set().union(*LAYERS)


def test_recipes_do_not_import_each_others_internals():
    """A recipe may name another stage only to run it (pipeline.py); never to borrow its code."""
    borrowed = [f"{a} -> {b}" for a, targets in import_graph().items() if a.startswith("steprl.recipes.")
                for b in targets if b.startswith("steprl.recipes") and a != "steprl.recipes.pipeline"]
    assert not borrowed, borrowed

"""The import rule of the design card: imports run one way (smpl <- data <- rewards; hygrpo and model below
the scripts), eval.py imports no training script, a training script imports another only to run it, and
no project module is imported inside a function to hide a cycle. Read from the source with `ast`, so
nothing is imported or run."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = ("smpl", "hygrpo", "model", "data", "rewards", "eval", "train_sft", "train_rft")
# train_rft may start stage 1 itself (the main job on a fresh clone): its config and its main, nothing else
RUNS = {("train_rft", "train_sft"): {"main", "SFTConfig", "RECIPES"}}  # to run stage 1, and read its recipe


def parse(name):
    with open(os.path.join(ROOT, f"{name}.py"), encoding="utf-8") as f:
        return ast.parse(f.read())


def imported(node):
    """The project modules an Import / ImportFrom node names."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
        names = [node.module]
    else:
        return []
    return [n for n in names if n in MODULES]


def import_graph(trees):
    return {name: {m for node in ast.walk(tree) for m in imported(node)} for name, tree in trees.items()}


def find_cycle(graph):
    """One import cycle as a list of modules, or None."""
    state = {}

    def visit(m, path):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return path[path.index(n):] + [n]
            if n not in state:
                found = visit(n, path + [n])
                if found:
                    return found
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m, [m])
            if found:
                return found
    return None


def imports_in_functions(tree):
    """(line, module) of every project module imported inside a function body."""
    out = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out += [(node.lineno, m) for node in ast.walk(fn) for m in imported(node)]
    return out


def names_used_from(tree, module):
    """The attributes read from `module` (module.x, as imported with `import module [as alias]`) and the
    names taken with `from module import x`."""
    aliases = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.Import)
               for a in node.names if a.name == module}
    used = {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases}
    used |= {a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module == module
             for a in node.names}
    bare = [node for node in ast.walk(tree) if isinstance(node, ast.Name) and node.id in aliases]
    attributes = [node.value for node in ast.walk(tree) if isinstance(node, ast.Attribute)]
    if any(all(b is not a for a in attributes) for b in bare):
        used.add("<the module itself>")  # passed around whole: anything could be used
    return used


def check(trees):
    """Every breach of the rule, as strings (empty when the rule holds)."""
    graph = import_graph(trees)
    problems = []
    below = {"smpl": set(), "hygrpo": set(), "data": {"smpl"}, "model": {"smpl", "hygrpo"},
             "rewards": {"smpl", "data", "model"}, "eval": {"smpl", "hygrpo", "data", "model", "rewards"}}
    for name, allowed in below.items():
        if graph[name] - allowed:
            problems.append(f"{name}.py imports {sorted(graph[name] - allowed)}; it may import {sorted(allowed)}")
    for script, other in (("train_sft", "train_rft"), ("train_rft", "train_sft")):
        if other in graph[script]:
            extra = names_used_from(trees[script], other) - RUNS.get((script, other), set())
            if extra:
                problems.append(f"{script}.py uses {sorted(extra)} of {other}.py: a training script imports "
                                f"another only to run it; move shared code below both")
    cycle = find_cycle(graph)
    if cycle:
        problems.append("import cycle: " + " -> ".join(cycle))
    for name, tree in trees.items():
        problems += [f"{name}.py:{line} imports {m} inside a function" for line, m in imports_in_functions(tree)]
    return problems


def test_imports_run_one_way():
    """The project's own files keep the rule. Catches eval.py reaching into a training script, train_rft
    borrowing train_sft's helpers again, a cycle hidden by a function-level import, or a lower file
    (smpl, data, model, rewards) importing one above it."""
    trees = {name: parse(name) for name in MODULES}
    assert check(trees) == []


@pytest.mark.parametrize("module, source, expected", [
    ("eval", "import train_rft\n", "eval.py imports ['train_rft']"),
    ("eval", "def f():\n    import train_sft\n    return train_sft.main\n", "inside a function"),
    ("train_rft", "import train_sft\nx = train_sft.collate_fn\n", "uses ['collate_fn'] of train_sft.py"),
    ("smpl", "import data\n", "smpl.py imports ['data']"),
    ("model", "def f():\n    import rewards\n", "model.py imports ['rewards']"),
])
def test_each_breach_is_caught(module, source, expected):
    """The checker itself: each kind of breach, added to an otherwise clean tree, is reported. Catches a
    checker that passes everything (the test above would then prove nothing)."""
    trees = {name: parse(name) for name in MODULES}
    trees[module] = ast.Module(body=trees[module].body + ast.parse(source).body, type_ignores=[])
    assert any(expected in p for p in check(trees)), check(trees)


def test_cycles_are_found():
    """find_cycle reports a two-module cycle and passes a chain."""
    assert find_cycle({"a": {"b"}, "b": {"a"}}) in (["a", "b", "a"], ["b", "a", "b"])
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None

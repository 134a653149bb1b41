"""Imports only run downward: command lines -> metrics/, configs/ -> training/ -> torch_utils/, dnnlib/.

Walks the `ast` of every module of the repository (tests/ and bench/ excepted), imports inside functions
included, and fails on an import of a higher floor. Top-level scripts (train.py, generate.py, fid.py,
dataset_tool.py, ...) and the scripts under docs/ are the command-line floor; no module imports a top-level
script, not even another command line (what two of them share lives in training/, e.g. training.cli_common).
"""

import ast
import pathlib

from conftest import REPO_ROOT

FLOORS = {'dnnlib': 0, 'torch_utils': 0, 'training': 1, 'metrics': 2, 'configs': 2}
CLI_FLOOR = 3
SCRIPT_TARGET = CLI_FLOOR + 1   # importing a top-level script counts as upward from every floor
EXCLUDED = ('tests', 'bench')

def _modules():
    """Every .py file of the repository outside tests/, bench/ and hidden folders, as paths relative to the root."""
    paths = []
    for path in sorted(REPO_ROOT.rglob('*.py')):
        rel = path.relative_to(REPO_ROOT)
        if rel.parts[0] in EXCLUDED or any(part.startswith('.') for part in rel.parts):
            continue
        paths.append(rel)
    return paths


def _floor_of_file(rel):
    return FLOORS.get(rel.parts[0], CLI_FLOOR) if len(rel.parts) > 1 and rel.parts[0] != 'docs' else CLI_FLOOR


def _top_level_scripts():
    return {p.stem for p in REPO_ROOT.glob('*.py')}


def _imported_roots(tree):
    """The first component of every absolute import in `tree` (relative imports stay within their package)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name.split('.')[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split('.')[0]


def _upward_imports():
    """{(file, imported project root)} for every import of a higher floor than the importing file's."""
    scripts = _top_level_scripts()
    found = set()
    for rel in _modules():
        floor = _floor_of_file(rel)
        tree = ast.parse((REPO_ROOT / rel).read_text(encoding='utf-8'), filename=str(rel))
        for root in _imported_roots(tree):
            target = FLOORS.get(root, SCRIPT_TARGET if root in scripts else None)
            if target is not None and target > floor:
                found.add((rel.as_posix(), root))
    return found


def test_floor_classification():
    assert _floor_of_file(pathlib.Path('generate.py')) == CLI_FLOOR
    assert _floor_of_file(pathlib.Path('docs/make_quickstart_grid.py')) == CLI_FLOOR
    assert _floor_of_file(pathlib.Path('metrics/evaluate.py')) == 2
    assert _floor_of_file(pathlib.Path('training/networks/precond.py')) == 1
    assert _floor_of_file(pathlib.Path('torch_utils/misc.py')) == 0
    assert {'train', 'generate', 'fid', 'dataset_tool'} <= _top_level_scripts()


def test_detects_an_upward_import():
    tree = ast.parse('def f():\n    import generate\n    from metrics import metric_main\nimport torch\n')
    assert set(_imported_roots(tree)) == {'generate', 'metrics', 'torch'}


def test_imports_only_run_downward():
    upward = _upward_imports()
    assert not upward, f'upward imports (file, imported package): {sorted(upward)}'


def _module_names():
    """{dotted module name: path} of every module (a package is its __init__)."""
    names = {}
    for rel in _modules():
        parts = list(rel.with_suffix('').parts)
        names['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = rel
    return names


def _import_graph():
    """{module: {project modules it imports}}, imports inside functions included; `from a.b import c` is an edge to
    a.b.c when that is a module, else to a.b."""
    names = _module_names()
    edges = {name: set() for name in names}
    for name, rel in names.items():
        for node in ast.walk(ast.parse((REPO_ROOT / rel).read_text(encoding='utf-8'), filename=str(rel))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [f'{node.module}.{a.name}' if f'{node.module}.{a.name}' in names else node.module
                           for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in names:
                    target = target.rpartition('.')[0]
                if target and target != name:
                    edges[name].add(target)
    return edges


def import_cycles(edges):
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def test_cycle_detection():
    assert import_cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c']]
    assert import_cycles({'a': {'b'}, 'b': set()}) == []


def test_no_import_cycle():
    """No module imports, even inside a function, a module that imports it back (directly or around a circle)."""
    cycles = import_cycles(_import_graph())
    assert not cycles, f'import cycles: {cycles}'


def test_training_has_at_most_ten_modules_outside_its_rooms():
    assert len(list((REPO_ROOT / 'training').glob('*.py'))) <= 10


def _click_exception_subclasses():
    """{file} of every module that defines a subclass of click.ClickException."""
    found = set()
    for rel in _modules():
        tree = ast.parse((REPO_ROOT / rel).read_text(encoding='utf-8'), filename=str(rel))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and any(ast.unparse(b).endswith('ClickException') for b in node.bases):
                found.add(rel.as_posix())
    return found


def test_one_command_error_class():
    """User mistakes are dnnlib.UserError; the one class that turns them into a one-line exit is in cli_common."""
    assert _click_exception_subclasses() == {'training/cli_common.py'}

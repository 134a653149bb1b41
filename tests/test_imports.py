"""Imports only run downward: command lines -> metrics/, configs/ -> training/ -> torch_utils/, dnnlib/.

Walks the `ast` of every module of the repository (tests/ and bench/ excepted), imports inside functions
included, and fails on an import of a higher floor. Top-level scripts (train.py, generate.py, fid.py,
dataset_tool.py, ...) and the scripts under docs/ are the command-line floor; no module imports a top-level
script, not even another command line (what two of them share lives in training/, e.g. training.cli_common).
"""

import ast
import pathlib

from tests.conftest import REPO_ROOT

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

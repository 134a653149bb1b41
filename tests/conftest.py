"""Shared test helpers: the location of the reference fixtures (never copied into the repository) and small
synthetic EDM-format datasets."""

import json
import os
import pathlib
import shutil
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

from training.checkpoints import reader

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES_DIR = REPO_ROOT.parent / 'shared' / 'fixtures'


@pytest.fixture(scope='session')
def fixtures_dir():
    if not FIXTURES_DIR.is_dir():
        raise FileNotFoundError(f'reference fixtures not found at {FIXTURES_DIR} (expected ../shared/fixtures)')
    return FIXTURES_DIR


def load_npz_meta(npz):
    """The JSON `meta` entry of a fixture archive (stored as uint8 bytes)."""
    return json.loads(bytes(npz['meta']).decode())


@pytest.fixture(scope='session')
def edm_forward(fixtures_dir):
    return np.load(fixtures_dir / 'edm_forward.npz')


@pytest.fixture(scope='session')
def edm2_forward(fixtures_dir):
    return np.load(fixtures_dir / 'edm2_forward.npz')


@pytest.fixture(scope='session')
def edm_layouts(fixtures_dir):
    with open(fixtures_dir / 'edm_layouts.json') as f:
        return json.load(f)


@pytest.fixture(scope='session')
def openai_cm(fixtures_dir):
    """Reference numbers of openai/consistency_models (fixtures/openai_cm/README.md)."""
    return np.load(fixtures_dir / 'openai_cm' / 'openai_cm.npz')


# Head widths of the two tiny openai_cm fixture networks (a state dict cannot reveal them).
OPENAI_CM_HEAD_CHANNELS = dict(imagenet_like=16, lsun_like=8)


def load_openai_cm_net(name, parameterization):
    """The tiny fixture network `name` (imagenet_like / lsun_like) as a KarrasDenoiser in eval mode: 'edm' or
    'consistency' form, loaded from its openai state dict through the project's loader."""
    path = FIXTURES_DIR / 'openai_cm' / f'tiny_{name}.pt'
    net, _ = reader.load_network(str(path), resolution=16, parameterization=parameterization,
                                             num_head_channels=OPENAI_CM_HEAD_CHANNELS[name])
    return net.requires_grad_(False)


@pytest.fixture(autouse=True, scope='session')
def single_thread():
    """One intra-op thread for the whole suite: the networks are tiny, and on a shared 2-core machine extra
    threads mostly spin-wait (a tiny forward pass went from 0.2 s to several seconds)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def write_random_dataset(root, num_images=16, resolution=8, num_classes=None, seed=0):
    """An EDM-format folder of random RGB PNGs; with num_classes, dataset.json labels image i as i % num_classes."""
    rng = np.random.default_rng(seed)
    labels = []
    for i in range(num_images):
        name = f'{i // 1000:05d}/img{i:08d}.png'
        os.makedirs(os.path.join(root, os.path.dirname(name)), exist_ok=True)
        image = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
        PIL.Image.fromarray(image).save(os.path.join(root, name))
        labels.append([name, i % num_classes] if num_classes else None)
    if num_classes:
        with open(os.path.join(root, 'dataset.json'), 'w') as f:
            json.dump(dict(labels=labels), f)
    return str(root)


def zip_folder(root, dest):
    """Store every file under `root` in an uncompressed zip (EDM's archive layout); returns the zip's path."""
    with zipfile.ZipFile(dest, 'w', compression=zipfile.ZIP_STORED) as zf:
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                path = os.path.join(dirpath, name)
                zf.write(path, os.path.relpath(path, root).replace(os.sep, '/'))
    return str(dest)


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """Dataset statistics are cached under dnnlib's cache dir: keep the test's own (pytestmark usefixtures)."""
    monkeypatch.setenv('ECT_CACHE_DIR', str(tmp_path / 'cache'))


def once_per_session(tmp_path_factory, name, produce):
    """(folder, result) of `produce(folder)`, run once per test session even under pytest-xdist: the first worker
    that needs it runs it in a folder of the session's shared temporary root while holding a lock (torch depends on
    filelock), the others wait for it and read its JSON result. For expensive end-to-end runs whose files the tests
    only read (or copy), which a module-scoped fixture would repeat on every worker its tests are spread over."""
    import filelock
    shared = os.environ.get('PYTEST_XDIST_WORKER') is not None
    root = tmp_path_factory.getbasetemp().parent if shared else tmp_path_factory.getbasetemp()
    folder, result_file = root / name, root / f'{name}.json'
    with filelock.FileLock(str(root / f'{name}.lock')):
        if not result_file.is_file():
            folder.mkdir()
            try:
                result = produce(folder)
            except BaseException:
                shutil.rmtree(folder)   # a worker that tries again starts clean (and fails the same way)
                raise
            result_file.write_text(json.dumps(result))
    return folder, json.loads(result_file.read_text())


@pytest.fixture(scope='session')
def shapes_zip(tmp_path_factory):
    """96 images of the quickstart's procedural source (dataset_tool.py --source=procedural:shapes), read only."""
    from training.data.dataset_convert import convert_dataset
    path = str(tmp_path_factory.mktemp('data') / 'shapes.zip')
    convert_dataset('procedural:shapes', path, 96, None, None)
    return path

"""Shared test helpers: the location of the reference fixtures (never copied into the repository)."""

import json
import pathlib

import numpy as np
import pytest
import torch

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


@pytest.fixture(autouse=True, scope='session')
def single_thread():
    """One intra-op thread for the whole suite: the networks are tiny, and on a shared 2-core machine extra
    threads mostly spin-wait (a tiny forward pass went from 0.2 s to several seconds)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

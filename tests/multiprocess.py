"""The tests' multi-process runs (gloo ranks on the CPU): `run_ranks(fn, args)` calls fn(rank, *args) in `nprocs`
processes, as torch.multiprocessing.spawn does, and raises a failing rank's traceback.

The ranks are forked, not spawned: they start with torch and the project already imported, where a spawned process
pays 2-3 s of imports (and DDP's constructor about 2 s more for torch._dynamo, imported here once before the fork).
The test process runs one intra-op thread (conftest.single_thread), so forking it is safe, as it is for DataLoader's
forked workers. A stuck rank fails the test after `timeout_s` instead of stalling the suite."""

import importlib
import socket
import time

import pytest
import torch


def free_port():
    """A TCP port on 127.0.0.1 that is free now (the ranks' MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_ranks(fn, args, nprocs=2, timeout_s=120):
    importlib.import_module('torch._dynamo')
    context = torch.multiprocessing.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method='fork')
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=0.05):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f'the {nprocs} ranks did not finish within {timeout_s} s')

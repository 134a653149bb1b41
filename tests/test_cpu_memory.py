"""torch_utils.cpu_memory: freed CPU tensors stay in the process, so re-allocating them costs no page faults."""

import subprocess
import sys

import pytest

from torch_utils import cpu_memory

PROGRAM = '''
import resource, sys, torch
sys.path.insert(0, {root!r})
from torch_utils import cpu_memory
if {retain}:
    assert cpu_memory.retain_freed_memory()
def churn():                                    # a step's activations: live together, then all freed
    kept = [torch.ones(2**18) for _ in range(40)]   # 40 x 1 MiB
    del kept
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    churn()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
'''


def _faults(retain):
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, '-c', PROGRAM.format(root=root, retain=retain)], capture_output=True,
                         text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(cpu_memory._glibc() is None, reason='glibc malloc only (Linux)')
def test_retained_memory_is_reused_without_page_faults():
    pages = 40 * 2**20 // 4096      # one churn's 40 MiB in 4 KiB pages
    assert _faults(retain=False) > pages // 2   # glibc hands at least half a churn back to the kernel
    assert _faults(retain=True) < pages // 4    # measured: 10-20k without, 0.8-1.5k with

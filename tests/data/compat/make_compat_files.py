"""Writes the files of tests/data/compat with the code of the commit that added them (before training/ moved into
rooms), so later code is tested against files written by earlier code:

    python tests/data/compat/make_compat_files.py

A tiny ECT run (tests/test_training.py's options: 8x8 random images, dropout 0.2) of two ticks, once straight
through and once stopped after the first tick:
  network-snapshot.pt      the EMA snapshot written at the end of the first tick
  training-state-tick1.pt  the training state written at the end of the first tick
  final-tick2.pt           the network and EMA weights after the second tick of the uninterrupted run
"""

import os
import pathlib
import shutil
import sys
import tempfile

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[2]), str(HERE.parents[1])]

from conftest import write_random_dataset  # noqa: E402
from test_training import TICK_KIMG, final_weights, tiny_options  # noqa: E402
from training import training_loop as tl  # noqa: E402


def run(run_dir, data, total_kimg):
    os.makedirs(run_dir)
    options = tiny_options(data, dropout=0.2, snap_ticks=1, dump_ticks=1).replace(total_kimg=total_kimg)
    assert tl.training_loop(options, str(run_dir)) == 'done'


def main():
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        data = write_random_dataset(tmp / 'data')
        run(tmp / 'straight', data, 2 * TICK_KIMG)
        run(tmp / 'first', data, TICK_KIMG)
        shutil.copy(tmp / 'first' / 'network-snapshot-000000.pt', HERE / 'network-snapshot.pt')
        shutil.copy(tmp / 'first' / 'training-state-latest.pt', HERE / 'training-state-tick1.pt')
        _, weights = final_weights(tmp / 'straight')
        torch.save(weights, HERE / 'final-tick2.pt')


if __name__ == '__main__':
    main()

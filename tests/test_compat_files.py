"""Files written by earlier code keep loading (tests/data/compat, written by make_compat_files.py there with the
code of the commit that added them): a network snapshot through the command lines' reader, and a training state
whose resumed run continues as the uninterrupted run did."""

import pathlib

import torch

from test_training import TICK_KIMG, data_dir, final_weights, tiny_options  # noqa: F401 (data_dir is a fixture)
from training.loop import training_loop as tl
from training.checkpoints.checkpoint import TrainingState
from training.cli_common import load_network

COMPAT = pathlib.Path(__file__).resolve().parent / 'data' / 'compat'


def test_an_earlier_snapshot_loads_with_its_weights():
    net, metadata = load_network(str(COMPAT / 'network-snapshot.pt'))
    state = TrainingState.read(COMPAT / 'training-state-tick1.pt')
    assert not net.training and metadata['mid_t'] == [0.821] and metadata['nimg'] == 8
    ema = state['ema']['']
    assert ema.keys() == net.state_dict().keys()
    assert all(torch.equal(value, ema[name]) for name, value in net.state_dict().items())


def test_an_earlier_training_state_resumes_where_the_straight_run_went(data_dir, tmp_path):
    """The same data (tests/conftest.py's random images of seed 0) and options as when the files were written; the
    one float32 step after the resume is compared to 1e-6 (bit for bit on the CPU kernels that wrote them)."""
    options = tiny_options(data_dir, dropout=0.2, snap_ticks=1, dump_ticks=1).replace(
        total_kimg=2 * TICK_KIMG, resume_state=str(COMPAT / 'training-state-tick1.pt'))
    assert tl.training_loop(options, str(tmp_path)) == 'done'
    _, weights = final_weights(tmp_path)
    expected = torch.load(COMPAT / 'final-tick2.pt', weights_only=True)
    assert weights.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=1e-6, msg=name)

"""Files written by earlier code keep loading (tests/data/compat, written by make_compat_files.py there with the
code of the commit that added them): a network snapshot through the command lines' reader, and a training state
whose resumed run continues as the uninterrupted run did."""

import pathlib

import pytest
import torch

import dnnlib
from test_training import TICK_KIMG, data_dir, final_weights, tiny_options  # noqa: F401 (data_dir is a fixture)
from training.loop import training_loop as tl
from training.checkpoints import checkpoint
from training.checkpoints.checkpoint import TrainingState
from training.cli_common import load_network
from training.networks.edm2 import Precond

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


def test_a_snapshot_naming_the_earlier_edm2_module_loads(tmp_path):
    """Snapshots written before training/ had rooms (and EDM2's own code) name training.networks_edm2.Precond; the
    producer's way: today's writer, then the class name the earlier writer recorded."""
    net = Precond(img_resolution=8, img_channels=3, label_dim=0, model_channels=16, channel_mult=[1], num_blocks=1,
                  attn_resolutions=[])
    data = dict(checkpoint._with_checksum(dict(format=checkpoint.SNAPSHOT_FORMAT, version=1,
                class_name='training.networks_edm2.Precond', init_kwargs=dict(net.init_kwargs),
                state_dict=net.state_dict(), metadata=dict(kimg=3))))
    data.pop('sha256')
    torch.save(data, tmp_path / 'old-edm2.pt')
    loaded, metadata = load_network(str(tmp_path / 'old-edm2.pt'))
    assert type(loaded) is Precond and metadata == dict(kimg=3)
    assert all(torch.equal(value, net.state_dict()[name]) for name, value in loaded.state_dict().items())


def test_the_format_is_recognised_from_the_bytes_not_the_name(tmp_path):
    """A snapshot named .pkl is read as a snapshot and an openai state dict named .pkl as a state dict: one reader
    each, chosen by the content."""
    snapshot = tmp_path / 'snapshot-named.pkl'
    snapshot.write_bytes((COMPAT / 'network-snapshot.pt').read_bytes())
    net, metadata = load_network(str(snapshot))
    assert metadata['nimg'] == 8 and type(net).__name__ == 'ECMPrecond'
    text = tmp_path / 'notes.pkl'
    text.write_text('hello')
    with pytest.raises(dnnlib.UserError, match='notes.pkl: not a network file'):
        load_network(str(text))

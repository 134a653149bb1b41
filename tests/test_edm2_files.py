"""Files of the official EDM2 code, built as it builds them (tests/edm2_files.py): reference statistics .pkl read
by load_ref and fid.py, safely; hostile variants refused."""

import io
import os
import pickle
import re

import numpy as np
import pytest
from click.testing import CliRunner

import dnnlib
import fid
from edm2_files import StabilityVAEEncoder, write_edm2_reference, write_edm2_snapshot
from metrics import metric_utils
from torch_utils import numpy_pickle
from training.checkpoints import reader


def _stats(width, seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal([width, width])
    return rng.standard_normal(width), a @ a.T / width


@pytest.fixture
def edm2_ref(tmp_path):
    stats = dict(fid=_stats(6, 0), fd_dinov2=_stats(4, 1))
    return write_edm2_reference(str(tmp_path / 'img64.pkl'), stats), stats


def test_load_ref_reads_edm2_reference_pickle(edm2_ref):
    path, stats = edm2_ref
    for kind, key in (('inception', 'fid'), ('dinov2', 'fd_dinov2')):
        ref = metric_utils.load_ref(path, kind=kind)
        assert ref['mu'].dtype == np.float64 and np.array_equal(ref['mu'], stats[key][0])
        assert np.array_equal(ref['sigma'], stats[key][1])
    with pytest.raises(dnnlib.UserError, match=r'--ref=.*img64\.pkl: .*fid, fd_dinov2 only, not for the vgg16'):
        metric_utils.load_ref(path, kind='vgg16')
    with pytest.raises(dnnlib.UserError, match='missing features'):
        metric_utils.load_ref(path, need_features=True)


@pytest.mark.parametrize('protocol', [3, 4, 5])
def test_every_pickle_protocol_and_numpy_1_names(tmp_path, protocol):
    mu, sigma = _stats(5, 2)
    fortran = np.asfortranarray(sigma[:, :3])
    data = pickle.dumps(dict(num_images=np.int64(7), fid=dict(mu=mu, sigma=sigma, extra=fortran)), protocol=protocol)
    # numpy 1.x, which EDM2 ran on, names its module numpy.core (protocol 3 writes names as plain text).
    old_names = data.replace(b'cnumpy._core.multiarray\n', b'cnumpy.core.multiarray\n')
    assert (old_names != data) == (protocol == 3)
    for blob in (data, old_names):
        loaded = numpy_pickle.load(io.BytesIO(blob), 'ref.pkl')
        assert loaded['num_images'] == 7 and np.array_equal(loaded['fid']['mu'], mu)
        assert np.array_equal(loaded['fid']['sigma'], sigma) and np.array_equal(loaded['fid']['extra'], fortran)


class _Call:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize('payload', [
    _Call(os.system, 'true'),
    np.array([1, 'a'], dtype=object),
    dict(fid=dict(mu=np.zeros(3), sigma=_Call(eval, '1'))),
])
def test_hostile_reference_pickles_are_refused(tmp_path, payload):
    path = tmp_path / 'ref.pkl'
    path.write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.raises(dnnlib.UserError, match=r'--ref=.*ref\.pkl: .*refused.*may be malicious'):
        metric_utils.load_ref(str(path))


def test_truncated_array_is_refused(tmp_path):
    data = pickle.dumps(dict(fid=dict(mu=np.zeros(4), sigma=np.zeros([4, 4]))), protocol=4)
    path = tmp_path / 'ref.pkl'
    path.write_bytes(data.replace(b'\x00' * 128, b'\x00' * 120, 1))
    with pytest.raises(dnnlib.UserError, match=r'--ref=.*ref\.pkl'):
        metric_utils.load_ref(str(path))


def test_fid_calc_picks_the_edm2_entry_of_its_detector(tmp_path, edm2_ref):
    path, stats = edm2_ref
    npz = tmp_path / 'same.npz'
    np.savez(npz, mu=stats['fid'][0], sigma=stats['fid'][1])
    for ref in (path, str(npz)):
        assert metric_utils.load_ref(ref)['mu'].tolist() == stats['fid'][0].tolist()
    result = CliRunner().invoke(fid.cli, ['calc', f'--images={tmp_path / "none"}', f'--ref={path}', '--kind=vgg16'])
    assert result.exit_code == 2 and 'not for the vgg16 detector' in result.output


# ----------------------------------------------------------------------------------------------------------
# EDM2 latent-space networks (img512 and larger): the snapshot holds a StabilityVAEEncoder, refused by name.

def test_edm2_latent_network_is_refused_with_one_message(tmp_path):
    from training.networks import edm2 as networks_edm2
    from training.loop import phema
    net = networks_edm2.Precond(img_resolution=8, img_channels=4, label_dim=0, use_fp16=False, model_channels=16,
                                channel_mult=[1], num_blocks=1, attn_resolutions=[])
    path = write_edm2_snapshot(str(tmp_path), 8 << 20, 0.05, net, encoder=StabilityVAEEncoder())
    message = 'an EDM2 latent-space network (its encoder is StabilityVAEEncoder, a VAE): latent-space models are ' \
              'not supported'
    with pytest.raises(dnnlib.UserError, match=r'network-snapshot-0008388-0\.050\.pkl: ' + re.escape(message)):
        reader.load_network(path)[0]
    result = CliRunner().invoke(phema.main, [f'--indir={tmp_path}', f'--outdir={tmp_path / "out"}', '--std=0.05'])
    assert result.exit_code == 2 and 'Traceback' not in result.output
    assert result.stderr.strip().splitlines() == [f'Error: {path}: {message}; use a pixel-space network (e.g. '
                                                  f'EDM2\'s img64 models)']
    assert not (tmp_path / 'out').exists()

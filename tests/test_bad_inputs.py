"""Corrupt inputs and crash cases: each gives one clear line naming the file or flag, before anything is
written; crashes leave nothing behind that a later run trips over."""

import errno
import hashlib
import io
import json
import os
import signal
import struct
import subprocess
import sys
import zipfile
import zlib

import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import dataset_tool
import dnnlib
import fid
import generate
import train
from conftest import REPO_ROOT, write_random_dataset
from configs import presets
from dnnlib import util
from metrics import metric_utils
from training.checkpoints import reader
from training import networks
from training.checkpoints import checkpoint
from training.data import dataset_convert
from training.data.dataset import ImageFolderDataset

# ----------------------------------------------------------------------------------------------------------
# Killed atomic writes.

_KILLED_WRITER = '''
import os, signal, sys
from dnnlib import util
with util.atomic_write(sys.argv[1]) as f:
    f.write(b'half of a training state')
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
'''


def test_killed_atomic_write_leaves_a_recognisable_partial_that_is_cleaned(tmp_path):
    target = tmp_path / 'training-state-latest.pt'
    target.write_bytes(b'previous state')
    proc = subprocess.run([sys.executable, '-c', _KILLED_WRITER, str(target)], cwd=REPO_ROOT)
    assert proc.returncode == -signal.SIGKILL
    partials = [name for name in os.listdir(tmp_path) if name != target.name]
    assert len(partials) == 1 and partials[0].startswith('.training-state-latest.pt.ect-partial-')
    assert target.read_bytes() == b'previous state'
    live = tmp_path / (util.partial_prefix(target) + 'abcdefgh.tmp')   # a write of this (running) process
    live.write_bytes(b'in progress')
    (tmp_path / '.notes.tmp').write_bytes(b'not ours')
    assert util.remove_stale_partials(tmp_path) == partials
    assert sorted(os.listdir(tmp_path)) == sorted(['.notes.tmp', live.name, target.name])


def test_os_error_message_is_one_line():
    error = OSError(28, 'No space left on device', '/runs/00001/training-state-latest.pt')
    assert util.os_error_message(error, '--outdir') == \
        '--outdir /runs/00001/training-state-latest.pt: No space left on device'


def test_output_location_checks(tmp_path):
    (tmp_path / 'file').write_text('')
    for bad in (tmp_path / 'file', tmp_path / 'file' / 'sub'):
        with pytest.raises(dnnlib.UserError, match='not a folder') as info:
            util.check_output_dir(str(bad), '--outdir')
        assert str(info.value).startswith(f'--outdir={bad}: ')
    with pytest.raises(dnnlib.UserError, match='is a folder'):
        util.check_output_file(str(tmp_path), '--dest')
    util.check_output_dir(str(tmp_path / 'new' / 'deeper'), '--outdir')
    assert not (tmp_path / 'new').exists()


# ----------------------------------------------------------------------------------------------------------
# Datasets: images and labels.

def _one_line_cli_error(command, args):
    """The single stderr line of a refused CLI call (exit code 2, no traceback)."""
    result = CliRunner().invoke(command, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    assert 'Traceback' not in result.output and not isinstance(result.exception, (OSError, dnnlib.UserError))
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def _png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format='PNG')
    return buffer.getvalue()


def _png_chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))


def _bomb_png(width=40000, height=40000):
    """A valid-looking PNG header claiming 1.6 G pixels (PIL's limit is 179 M) over a few bytes of data."""
    header = struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0)   # 8-bit greyscale
    return (b'\x89PNG\r\n\x1a\n' + _png_chunk(b'IHDR', header) + _png_chunk(b'IDAT', zlib.compress(b'\0' * 64))
            + _png_chunk(b'IEND', b''))


@pytest.mark.parametrize('which', [0, 5])
def test_decompression_bomb_is_refused_by_name(tmp_path, which):
    root = write_random_dataset(tmp_path / 'data', num_images=8)
    bomb = f'00000/img{which:08d}.png'
    (tmp_path / 'data' / bomb).write_bytes(_bomb_png())
    with pytest.raises(dnnlib.UserError, match=bomb) as info:
        dataset = ImageFolderDataset(path=root)
        dataset[which]
    assert '\n' not in str(info.value)


def test_corrupt_png_in_a_dataloader_worker_is_one_line(tmp_path):
    root = write_random_dataset(tmp_path / 'data', num_images=8)
    png = tmp_path / 'data' / '00000' / 'img00000006.png'
    png.write_bytes(png.read_bytes()[:60])
    loader = torch.utils.data.DataLoader(ImageFolderDataset(path=root), batch_size=4, num_workers=1)
    with pytest.raises(dnnlib.UserError) as info:
        list(loader)
    assert str(info.value).startswith(f'{root}: cannot read 00000/img00000006.png')
    assert len(str(info.value).splitlines()) == 1


def _write_labels(root, labels):
    names = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)
    with open(os.path.join(root, 'dataset.json'), 'w') as f:
        f.write(json.dumps(dict(labels=[[name, label] for name, label in zip(names, labels)]), allow_nan=True))


@pytest.mark.parametrize('labels, message', [
    ([[0.5, 1], [1, 0], [0], [1, 1]], 'differ in length'),
    ([[0.5, float('nan')], [1, 0], [0, 0], [1, 1]], 'NaN or infinity'),
    ([[0.5, 1e300], [1, 0], [0, 0], [1, 1]], 'NaN or infinity'),
    ([0, 1, -1, 2], 'negative class label'),
    ([0, 1, 1000000, 2], 'class label 1000000'),
    ([0, 1, 'cat', 2], 'class indices or equal-length numeric vectors'),
    ([0, 1, True, 2], 'class indices or equal-length numeric vectors'),
])
def test_bad_labels_are_refused_when_the_dataset_opens(tmp_path, labels, message):
    root = write_random_dataset(tmp_path / 'data', num_images=4)
    _write_labels(root, labels)
    with pytest.raises(dnnlib.UserError, match=message) as info:
        ImageFolderDataset(path=root, use_labels=True)
    assert str(info.value).startswith(f'{root}: dataset.json: ')


@pytest.mark.parametrize('label', [-1, 1000000, True, 2.0])
def test_dataset_tool_refuses_bad_class_index_before_writing(tmp_path, label):
    root = write_random_dataset(tmp_path / 'src', num_images=4)
    _write_labels(root, [0, 1, label, 1])
    line = _one_line_cli_error(dataset_tool.main, [f'--source={root}', f'--dest={tmp_path / "out.zip"}'])
    assert 'dataset.json' in line and 'class index' in line and 'img00000002.png' in line
    assert sorted(os.listdir(tmp_path)) == ['src']


# ----------------------------------------------------------------------------------------------------------
# Operating-system errors of the CLIs: one line, naming the path.

def _disk_full(path):
    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return fail


def test_dataset_tool_os_errors(tmp_path, monkeypatch):
    root = write_random_dataset(tmp_path / 'src', num_images=4)
    (tmp_path / 'file').write_text('')
    line = _one_line_cli_error(dataset_tool.main, [f'--source={root}', f'--dest={tmp_path / "file" / "out.zip"}'])
    assert line.startswith('Error: --dest=') and 'not a folder' in line
    monkeypatch.setattr(dataset_convert, 'encode_png', _disk_full(tmp_path / 'out.zip'))
    line = _one_line_cli_error(dataset_tool.main, [f'--source={root}', f'--dest={tmp_path / "out.zip"}'])
    assert line == f'Error: {tmp_path / "out.zip"}: No space left on device'
    assert sorted(os.listdir(tmp_path)) == ['file', 'src']


def test_fid_ref_on_a_bad_image_set_writes_nothing(tmp_path, monkeypatch):
    root = write_random_dataset(tmp_path / 'data', num_images=8)
    (tmp_path / 'data' / '00000' / 'img00000005.png').write_bytes(b'\x89PNG\r\n\x1a\n broken')
    monkeypatch.setattr(fid, '_setup', lambda *args: (lambda x: x.flatten(1).float()[:, :4], 'cpu'))
    line = _one_line_cli_error(fid.cli, ['ref', f'--data={root}', f'--dest={tmp_path / "ref.npz"}'])
    assert 'cannot read 00000/img00000005.png' in line
    assert not (tmp_path / 'ref.npz').exists()
    monkeypatch.setattr(metric_utils.np, 'savez', _disk_full(tmp_path / 'ref.npz'))
    (tmp_path / 'data' / '00000' / 'img00000005.png').unlink()
    line = _one_line_cli_error(fid.cli, ['ref', f'--data={root}', f'--dest={tmp_path / "ref.npz"}'])
    assert line == f'Error: {tmp_path / "ref.npz"}: No space left on device'
    assert _one_line_cli_error(fid.cli, ['ref', f'--data={root}', f'--dest={tmp_path / "data"}.npz/x.npz'])


def test_generate_os_errors(tmp_path, monkeypatch):
    net = networks.EDMPrecond(img_resolution=8, img_channels=3, model_type='SongUNet', model_channels=16,
                              channel_mult=[1], num_blocks=1, attn_resolutions=[])
    checkpoint.save_network_snapshot(str(tmp_path / 'net.pt'), net)
    (tmp_path / 'file').write_text('')
    args = [f'--network={tmp_path / "net.pt"}', '--seeds=0-1', '--steps=2', '--device=cpu']
    line = _one_line_cli_error(generate.cli, args + [f'--outdir={tmp_path / "file"}'])
    assert line.startswith(f'Error: --outdir={tmp_path / "file"}: ') and 'not a folder' in line
    monkeypatch.setattr(PIL.Image.Image, 'save', _disk_full(tmp_path / 'out' / '000000.png'))
    line = _one_line_cli_error(generate.cli, args + [f'--outdir={tmp_path / "out"}'])
    assert line == f'Error: {tmp_path / "out" / "000000.png"}: No space left on device'
    assert not [name for name in os.listdir(tmp_path / 'out') if name.endswith('.tmp')]


# ----------------------------------------------------------------------------------------------------------
# Network snapshots: checksums, absurd recorded sizes.

def _tiny_snapshot(path):
    net = networks.EDMPrecond(img_resolution=8, img_channels=3, model_type='SongUNet', model_channels=16,
                              channel_mult=[1], num_blocks=1, attn_resolutions=[])
    checkpoint.save_network_snapshot(str(path), net, kimg=5)
    return net


def _flip_tensor_byte(path):
    """Flip one byte inside the stored bytes of the largest tensor (torch.save keeps them raw in the archive)."""
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if '/data/' in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    with open(path, 'rb') as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack('<HH', f.read(4))
    offset = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def test_snapshot_with_a_flipped_byte_is_refused(tmp_path):
    path = tmp_path / 'network-snapshot-000005.pt'
    _tiny_snapshot(path)
    checkpoint.load_network_snapshot(str(path))
    _flip_tensor_byte(path)
    with pytest.raises(dnnlib.UserError, match='network-snapshot-000005.pt: the network snapshot is damaged'):
        checkpoint.load_network_snapshot(str(path))
    line = _one_line_cli_error(generate.cli, [f'--network={path}', f'--outdir={tmp_path / "out"}', '--device=cpu'])
    assert 'damaged' in line and not (tmp_path / 'out').exists()


# The shipped quickstart checkpoint as first committed (version 1, no checksum): SHA-256 of its tensors (name,
# dtype, shape and bytes of each, in name order) and of its class, constructor arguments and metadata (JSON).
_QUICKSTART_TENSORS_SHA256 = '987019dd03d26562f1185d749fcfe9bbc076bcb191d20dba62d9ed328d08de36'
_QUICKSTART_RECORD_SHA256 = 'dce03ed3f1481c2b070308017836a3e73fa9aaef2edd3b65321114f58ace929b'


def _tensors_sha256(tensors):
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f'{name}:{t.dtype}:{list(t.shape)};'.encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_shipped_quickstart_checkpoint_carries_its_checksum(tmp_path):
    """The shipped checkpoint is a checksummed snapshot with the original tensors and metadata, so one flipped
    byte in a copy is a one-line refusal naming the file."""
    data = torch.load(presets.QUICKSTART_CHECKPOINT, map_location='cpu', weights_only=True)
    assert data['version'] == checkpoint.SNAPSHOT_VERSION and isinstance(data.get('sha256'), str)
    assert _tensors_sha256(data['state_dict']) == _QUICKSTART_TENSORS_SHA256
    record = json.dumps([data['class_name'], data['init_kwargs'], data['metadata']], sort_keys=True)
    assert hashlib.sha256(record.encode()).hexdigest() == _QUICKSTART_RECORD_SHA256
    net, _ = checkpoint.load_network_snapshot(presets.QUICKSTART_CHECKPOINT)
    assert _tensors_sha256(net.state_dict()) == _QUICKSTART_TENSORS_SHA256
    copy = tmp_path / 'quickstart-edm-shapes16.pt'
    copy.write_bytes(open(presets.QUICKSTART_CHECKPOINT, 'rb').read())
    _flip_tensor_byte(copy)
    with pytest.raises(dnnlib.UserError) as info:
        reader.load_network(str(copy))[0]
    assert str(info.value) == f'{copy}: the network snapshot is damaged: its content does not match its checksum'


def test_snapshot_with_absurd_recorded_sizes_is_refused(tmp_path):
    net = _tiny_snapshot(tmp_path / 'a.pt')
    for channels, message in ((10 ** 5, 'would need .* GiB, more than the .* GiB of memory available'),
                              (10 ** 9, 'a recorded constructor argument is 1000000000')):
        data = torch.load(tmp_path / 'a.pt', weights_only=True)
        data = {k: v for k, v in data.items() if k != 'sha256'}
        data = checkpoint._with_checksum(dict(data, init_kwargs=dict(net.init_kwargs, model_channels=channels)))
        torch.save(data, tmp_path / 'b.pt')
        with pytest.raises(dnnlib.UserError, match=f'b.pt: .*{message}'):
            checkpoint.load_network_snapshot(str(tmp_path / 'b.pt'))


# ----------------------------------------------------------------------------------------------------------
# train.py: every bad flag refused before a run directory exists.

@pytest.fixture(scope='module')
def train_data(tmp_path_factory):
    return write_random_dataset(tmp_path_factory.mktemp('train-data'), num_images=8)


def _train_args(data, outdir, *extra):
    return ['--preset=cifar10-ecm', f'--data={data}', f'--outdir={outdir}', '--transfer=none', '--dry-run',
            '--arch-kwargs={"model_channels": 16, "channel_mult": [1], "num_blocks": 1, "attn_resolutions": []}',
            *extra]


@pytest.mark.parametrize('flags, message', [
    (['--seed=-1'], '--seed: must be an integer in [0, 2^32), got -1'),
    (['--workers=-1'], '--workers: must be a non-negative integer, got -1'),
    (['--ema=-1'], '--ema: the EMA half-life must be positive (Mimg), got -1.0'),
    (['--ema-beta=1.5'], '--ema-beta: must be in [0, 1), got 1.5'),
    (['--arch-kwargs={"model_channles": 16}'], '--arch-kwargs: cannot build training.networks.ECMPrecond'),
    (['--arch-kwargs={"num_blocks": -1}'], '--arch-kwargs: num_blocks=-1 is negative'),
    (['--arch-kwargs={"channel_mult": [1, -2]}'], '--arch-kwargs: channel_mult.1=-2 is negative'),
    (['--mid_t=0.5,2.0'], '--mid-t: the intermediate times must decrease strictly, got [0.5, 2.0]'),
    (['--mid_t=2.0,0.5', '--metrics=two_step_fd_randnet', '--eval-every=1'],
     '--mid-t: two_step_fd_randnet samples in two steps, which take exactly one intermediate time; got [2.0, 0.5]'),
])
def test_train_refuses_bad_flags_before_any_output(train_data, tmp_path, flags, message):
    line = _one_line_cli_error(train.main, _train_args(train_data, tmp_path / 'runs', *flags, f'--ref={train_data}'))
    assert message in line, line
    assert not (tmp_path / 'runs').exists()


@pytest.mark.parametrize('preset, flags, message', [
    ('cifar10-sct', ['--arch-kwargs={"logvar_head": false}'], 'adaptive_weighting: True needs a network built with'),
    ('cifar10-scd', ['--teacher='], '--teacher: required by this recipe'),
    ('cifar10-meanflow', ['--arch=ddpmpp', '--precond=edm', '--augment=0'], 'MeanFlow trains a'),
    ('cifar10-meanflow', ['--arch-kwargs={"augment_dim": 9}'], 'augment_kwargs give 6 augment labels but the network'),
    ('cifar10-tcm', [], 'stage1'),
    ('cifar10-tcm', ['--stage1=missing-stage1.pt'], 'stage1: missing-stage1.pt does not exist'),
])
def test_continuous_time_methods_refuse_bad_input_before_any_output(train_data, tmp_path, preset, flags, message):
    """A JVP method on a network it cannot train, sCD without a teacher, TCM without a stage-1 network: one line."""
    args = ['--preset=' + preset, f'--data={train_data}', f'--outdir={tmp_path / "runs"}', '--transfer=none',
            '--dry-run', '--arch-kwargs={"model_channels": 16, "channel_mult": [1], "num_blocks": 1, '
            '"attn_resolutions": []}', *flags]
    line = _one_line_cli_error(train.main, args)
    assert message in line, line
    assert not (tmp_path / 'runs').exists()


@pytest.mark.parametrize('damage', ['truncated', 'flipped byte', 'other size'])
def test_train_reads_every_image_before_any_output(tmp_path, damage):
    data = write_random_dataset(tmp_path / 'data', num_images=8)
    png = tmp_path / 'data' / '00000' / 'img00000006.png'
    raw = bytearray(png.read_bytes())
    if damage == 'truncated':
        raw = raw[:len(raw) // 2]
    elif damage == 'flipped byte':
        raw[len(raw) // 2] ^= 0xFF   # inside the pixel data: the chunk checksum no longer matches
    else:
        raw = _png_bytes(PIL.Image.new('RGB', (16, 16)))
    png.write_bytes(bytes(raw))
    line = _one_line_cli_error(train.main, _train_args(data, tmp_path / 'runs'))
    assert line.startswith(f'Error: --data: {data}: ') and '00000/img00000006.png' in line, line
    assert not (tmp_path / 'runs').exists()
    result = CliRunner().invoke(train.main, _train_args(data, tmp_path / 'runs', '--no-check-data'))
    assert result.exit_code == 0, result.output


def test_train_outdir_that_is_a_file(train_data, tmp_path):
    (tmp_path / 'file').write_text('')
    line = _one_line_cli_error(train.main, _train_args(train_data, tmp_path / 'file'))
    assert line.startswith(f'Error: --outdir={tmp_path / "file"}: ') and 'not a folder' in line


def test_nosubdir_into_a_finished_run_needs_overwrite(train_data, tmp_path):
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'training-state-latest.pt').write_bytes(b'the finished run')
    stale = run / '.training-state-latest.pt.ect-partial-999999-abcdefgh.tmp'
    stale.write_bytes(b'cut short')
    line = _one_line_cli_error(train.main, _train_args(train_data, run, '--nosubdir'))
    assert '--nosubdir' in line and '--overwrite' in line and 'training-state-latest.pt' in line
    assert sorted(os.listdir(run)) == sorted([stale.name, 'training-state-latest.pt'])
    result = CliRunner().invoke(train.main, _train_args(train_data, run, '--nosubdir', '--overwrite'))
    assert result.exit_code == 0, result.output
    assert f'Removed {stale.name}' in result.output and not stale.exists()


def test_training_state_with_a_flipped_byte_is_refused(tmp_path):
    path = tmp_path / 'training-state-latest.pt'
    state = dict(net=dict(w=torch.arange(4096, dtype=torch.float32)), cur_nimg=128, rng=[1, 2, 3])
    checkpoint.save_training_state(str(path), state)
    assert torch.equal(checkpoint.load_training_state(str(path))['net']['w'], state['net']['w'])
    _flip_tensor_byte(path)
    with pytest.raises(dnnlib.UserError, match='training-state-latest.pt: the training state is damaged'):
        checkpoint.load_training_state(str(path))


def _open_on_a_full_disk(real_fdopen):
    """os.fdopen whose file is /dev/full: every write that reaches the disk fails with ENOSPC, as on a full disk."""
    def fdopen(fd, *args, **kwargs):
        full = os.open('/dev/full', os.O_WRONLY)
        os.dup2(full, fd)
        os.close(full)
        return real_fdopen(fd, *args, **kwargs)
    return fdopen


@pytest.mark.skipif(not os.path.exists('/dev/full'), reason='needs /dev/full (Linux)')
def test_training_state_on_a_full_disk_is_one_line_and_keeps_the_previous_state(tmp_path, monkeypatch):
    """torch.save's zip writer reports the failed write as 'RuntimeError: [enforce fail at inline_container.cc]':
    it is one line naming the file, the previous training-state-latest.pt is unchanged and nothing partial is left."""
    path = tmp_path / 'training-state-latest.pt'
    checkpoint.save_training_state(str(path), dict(net=dict(w=torch.zeros(16)), cur_nimg=64))
    previous = path.read_bytes()
    with monkeypatch.context() as patch:
        patch.setattr(os, 'fdopen', _open_on_a_full_disk(os.fdopen))
        with pytest.raises(dnnlib.UserError) as info:
            checkpoint.save_training_state(str(path), dict(net=dict(w=torch.ones(1 << 16)), cur_nimg=128))
    assert str(info.value) == (f'{path}: No space left on device (not written; a previous file of that name is '
                               f'unchanged)')
    assert path.read_bytes() == previous and os.listdir(tmp_path) == [path.name]

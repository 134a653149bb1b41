"""dataset_tool.py (and training/data/dataset_sources.py, training/data/dataset_convert.py) against docs/ECT.md §8: member
names, pixels (independent numpy/PIL references), labels, errors."""

import io
import json
import os
import pickle
import tarfile
import zipfile

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

import dataset_tool
from training.data import dataset_convert
from training.data import dataset_sources

LANCZOS = PIL.Image.Resampling.LANCZOS

#----------------------------------------------------------------------------
# Synthetic sources.


def write_cifar_tarball(path, per_batch=4, seed=0, extra_member=None):
    """Five batches in CIFAR-10's layout; returns (data [N, 3072] uint8, labels [N])."""
    rng = np.random.default_rng(seed)
    all_data, all_labels = [], []
    with tarfile.open(path, 'w:gz') as tar:
        for batch in range(1, 6):
            data = rng.integers(0, 256, size=[per_batch, 3072], dtype=np.uint8)
            labels = [int(x) for x in rng.integers(0, 10, size=per_batch)]
            record = {'batch_label': f'training batch {batch} of 5', 'labels': labels, 'data': data,
                      'filenames': [f'img_{batch}_{i}.png' for i in range(per_batch)]}
            payload = pickle.dumps(record, protocol=[0, 2, 4][batch % 3])
            if batch == 1:  # as numpy 1.x wrote them (the real tarball's arrays name numpy.core.multiarray)
                payload = payload.replace(b'numpy._core.multiarray', b'numpy.core.multiarray')
            if extra_member is not None and batch == 3:
                payload = extra_member
            info = tarfile.TarInfo(f'cifar-10-batches-py/data_batch_{batch}')
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
            all_data.append(data)
            all_labels += labels
    return np.concatenate(all_data), np.array(all_labels)


def cifar_row_to_hwc(row):
    """Independent of the tool: channel c, row y, column x lives at c*1024 + y*32 + x."""
    out = np.empty([32, 32, 3], dtype=np.uint8)
    for c in range(3):
        for y in range(32):
            out[y, :, c] = row[c * 1024 + y * 32: c * 1024 + y * 32 + 32]
    return out


def save_image(path, arr, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.Image.fromarray(arr).save(path, format=fmt)


def make_folder(root, seed=0, grey=False):
    """Two class folders, PNG and JPEG files of different sizes, a non-image file; returns sorted rel names."""
    rng = np.random.default_rng(seed)
    specs = {'cat/b.png': (20, 30), 'cat/a.jpg': (40, 24), 'dog/c.png': (33, 33), 'dog/sub/d.png': (17, 50)}
    for rel, (h, w) in specs.items():
        save_image(os.path.join(root, rel), rng.integers(0, 256, size=[h, w, 3], dtype=np.uint8))
    if grey:
        save_image(os.path.join(root, 'dog/e.png'), rng.integers(0, 256, size=[28, 36], dtype=np.uint8))
    with open(os.path.join(root, 'cat', 'notes.txt'), 'w') as f:
        f.write('not an image')
    return sorted(list(specs) + (['dog/e.png'] if grey else []))


def invoke(*args):
    result = CliRunner().invoke(dataset_tool.main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def read_dest(dest):
    """{member name: bytes} of an output zip or folder."""
    if str(dest).endswith('.zip'):
        with zipfile.ZipFile(dest) as zf:
            return {name: zf.read(name) for name in zf.namelist()}
    out = {}
    for root, _dirs, files in os.walk(dest):
        for f in files:
            path = os.path.join(root, f)
            out[os.path.relpath(path, dest).replace(os.sep, '/')] = open(path, 'rb').read()
    return out


def decode(data):
    return np.array(PIL.Image.open(io.BytesIO(data)))


def names_for(indices):
    return [f'{i // 1000:05d}/img{i:08d}.png' for i in indices]

#----------------------------------------------------------------------------
# CIFAR-10.


def test_cifar_zip_names_pixels_labels(tmp_path):
    data, labels = write_cifar_tarball(tmp_path / 'cifar-10-python.tar.gz')
    dest = tmp_path / 'out' / 'cifar10-32x32.zip'
    result = invoke('--source', tmp_path / 'cifar-10-python.tar.gz', '--dest', dest)
    assert result.exit_code == 0, result.output
    assert '20 images' in result.stdout and '32x32' in result.stdout and '3 channels' in result.stdout
    with zipfile.ZipFile(dest) as zf:
        assert all(info.compress_type == zipfile.ZIP_STORED for info in zf.infolist())
    members = read_dest(dest)
    assert sorted(members) == sorted(names_for(range(20)) + ['dataset.json'])
    for i, name in enumerate(names_for(range(20))):
        img = PIL.Image.open(io.BytesIO(members[name]))
        assert img.format == 'PNG' and img.mode == 'RGB'
        np.testing.assert_array_equal(np.array(img), cifar_row_to_hwc(data[i]))
    meta = json.loads(members['dataset.json'])
    assert meta == {'labels': [[name, int(label)] for name, label in zip(names_for(range(20)), labels)]}


def test_cifar_folder_max_images_and_resize(tmp_path):
    data, labels = write_cifar_tarball(tmp_path / 'cifar-10-python.tar.gz', seed=1)
    dest = tmp_path / 'cifar-small'
    result = invoke('--source', tmp_path / 'cifar-10-python.tar.gz', '--dest', dest, '--max-images', 7, '--resolution', '16x16')
    assert result.exit_code == 0, result.output
    members = read_dest(dest)
    assert sorted(members) == sorted(names_for(range(7)) + ['dataset.json'])
    for i, name in enumerate(names_for(range(7))):
        expected = np.array(PIL.Image.fromarray(cifar_row_to_hwc(data[i])).resize((16, 16), LANCZOS))
        np.testing.assert_array_equal(decode(members[name]), expected)
    assert json.loads(members['dataset.json'])['labels'] == [[n, int(l)] for n, l in zip(names_for(range(7)), labels[:7])]


def test_cifar_names_past_1000_use_next_folder():
    assert dataset_sources.archive_name(999) == '00000/img00000999.png'
    assert dataset_sources.archive_name(1000) == '00001/img00001000.png'
    assert dataset_sources.archive_name(49999) == '00049/img00049999.png'

#----------------------------------------------------------------------------
# Image folders and zips.


def expected_folder_output(src, rels, prepare):
    return {name: prepare(np.array(PIL.Image.open(os.path.join(src, rel)))) for name, rel in zip(names_for(range(len(rels))), rels)}


def check_output(dest, expected, labels):
    members = read_dest(dest)
    assert sorted(members) == sorted(list(expected) + ['dataset.json'])
    for name, img in expected.items():
        np.testing.assert_array_equal(decode(members[name]), img, err_msg=name)
    expected_labels = None if labels is None else [[name, label] for name, label in zip(sorted(expected), labels)]
    assert json.loads(members['dataset.json']) == {'labels': expected_labels}


def ref_center_crop(arr, res):
    arr = arr if arr.ndim == 3 else np.stack([arr] * 3, axis=-1)
    h, w = arr.shape[:2]
    s = min(h, w)
    crop = arr[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    return np.array(PIL.Image.fromarray(crop).resize((res, res), LANCZOS))


def test_folder_default_transform_labels_from_folders(tmp_path):
    src = tmp_path / 'src'
    rels = make_folder(src)
    assert rels == ['cat/a.jpg', 'cat/b.png', 'dog/c.png', 'dog/sub/d.png']
    dest = tmp_path / 'out.zip'
    result = invoke('--source', src, '--dest', dest, '--resolution', '8x8')
    assert result.exit_code == 0, result.output
    expected = expected_folder_output(src, rels, lambda a: np.array(PIL.Image.fromarray(a).resize((8, 8), LANCZOS)))
    check_output(dest, expected, [0, 0, 1, 1])
    assert '2 classes' in result.stdout


def test_folder_center_crop_with_grey_and_dataset_json(tmp_path):
    src = tmp_path / 'src'
    rels = make_folder(src, seed=2, grey=True)
    custom = {rel: 7 - i for i, rel in enumerate(rels)}
    with open(src / 'dataset.json', 'w') as f:
        json.dump({'labels': [[rel, label] for rel, label in custom.items()]}, f)
    dest = tmp_path / 'out'
    result = invoke('--source', src, '--dest', dest, '--resolution', '16x16', '--transform', 'center-crop')
    assert result.exit_code == 0, result.output
    check_output(dest, expected_folder_output(src, rels, lambda a: ref_center_crop(a, 16)), [custom[r] for r in rels])


def ref_center_crop_wide(arr, width, height):
    arr = arr if arr.ndim == 3 else np.stack([arr] * 3, axis=-1)
    h, w = arr.shape[:2]
    band = int(np.round(width * h / w))
    if w < width or band < height:
        return None
    top = (h - band) // 2
    out = np.zeros([width, width, 3], dtype=np.uint8)
    out[(width - height) // 2:(width - height) // 2 + height] = np.array(PIL.Image.fromarray(arr[top:top + band]).resize((width, height), LANCZOS))
    return out


def test_folder_center_crop_wide_skips_small_images(tmp_path):
    src = tmp_path / 'src'
    rels = make_folder(src, seed=3)
    dest = tmp_path / 'out.zip'
    result = invoke('--source', src, '--dest', dest, '--resolution', '32x16', '--transform', 'center-crop-wide')
    assert result.exit_code == 0, result.output
    refs = [ref_center_crop_wide(np.array(PIL.Image.open(src / rel)), 32, 16) for rel in rels]
    kept = [i for i, r in enumerate(refs) if r is not None]
    assert 0 < len(kept) < len(rels)  # the 30-wide cat/b.png is too narrow for 32 and is skipped
    expected = {names_for([i])[0]: refs[i] for i in kept}
    check_output(dest, expected, [[0, 0, 1, 1][i] for i in kept])


def ref_dhariwal(arr, res):
    """ADM's preprocessing, step by step: halve with BOX while the short side is >= 2*res, BICUBIC, centred crop."""
    img = PIL.Image.fromarray(arr).convert('RGB')
    w, h = img.size
    while w >= 2 * res and h >= 2 * res:
        w, h = w // 2, h // 2
        img = img.resize((w, h), PIL.Image.Resampling.BOX)
    short = min(w, h)
    new_w, new_h = int(round(w * res / short)), int(round(h * res / short))
    img = np.array(img.resize((new_w, new_h), PIL.Image.Resampling.BICUBIC))
    y0, x0 = (new_h - res) // 2, (new_w - res) // 2
    return img[y0:y0 + res, x0:x0 + res]


def test_center_crop_dhariwal_imagenet_synsets(tmp_path):
    src = tmp_path / 'train'
    rng = np.random.default_rng(4)
    sizes = {'n01443537/x.JPEG': (75, 131), 'n01440764/y.JPEG': (300, 200), 'n01440764/z.png': (17, 16), 'n01484850/w.png': (64, 100)}
    for rel, (h, w) in sizes.items():
        save_image(src / rel, rng.integers(0, 256, size=[h, w, 3], dtype=np.uint8), fmt='JPEG' if rel.endswith('JPEG') else None)
    save_image(src / 'n01484850/grey.png', rng.integers(0, 256, size=[40, 45], dtype=np.uint8))
    rels = sorted(list(sizes) + ['n01484850/grey.png'])
    dest = tmp_path / 'imagenet.zip'
    result = invoke('--source', src, '--dest', dest, '--resolution', '8x8', '--transform', 'center-crop-dhariwal')
    assert result.exit_code == 0, result.output
    synsets = sorted({rel.split('/')[0] for rel in rels})
    check_output(dest, expected_folder_output(src, rels, lambda a: ref_dhariwal(a, 8)), [synsets.index(r.split('/')[0]) for r in rels])


def test_dhariwal_halving_sizes():
    """300x200 at res 32: BOX halvings to 150x100 and 75x50 (50 < 64 stops), then BICUBIC to 48x32, crop x 8..40."""
    arr = np.random.default_rng(5).integers(0, 256, size=[200, 300, 3], dtype=np.uint8)
    img = PIL.Image.fromarray(arr).resize((150, 100), PIL.Image.Resampling.BOX).resize((75, 50), PIL.Image.Resampling.BOX)
    expected = np.array(img.resize((48, 32), PIL.Image.Resampling.BICUBIC))[:, 8:40]
    np.testing.assert_array_equal(dataset_convert.transform_center_crop_dhariwal(arr, 32, 32), expected)


def test_zip_source_matches_folder_source(tmp_path):
    src = tmp_path / 'src'
    rels = make_folder(src, seed=6)
    with zipfile.ZipFile(tmp_path / 'src.zip', 'w') as zf:
        for rel in reversed(rels):
            zf.write(src / rel, rel)
    for source, dest in [(src, tmp_path / 'a'), (tmp_path / 'src.zip', tmp_path / 'b')]:
        result = invoke('--source', source, '--dest', dest, '--resolution', '8x8', '--transform', 'center-crop', '--max-images', 3)
        assert result.exit_code == 0, result.output
    assert read_dest(tmp_path / 'a') == read_dest(tmp_path / 'b')
    assert sorted(read_dest(tmp_path / 'a')) == sorted(names_for(range(3)) + ['dataset.json'])


def test_unlabelled_folder_writes_null_labels_and_keeps_grey(tmp_path):
    src = tmp_path / 'flat'
    rng = np.random.default_rng(7)
    grey = [rng.integers(0, 256, size=[8, 8], dtype=np.uint8) for _ in range(3)]
    for i, arr in enumerate(grey):
        save_image(src / f'{i}.png', arr)
    dest = tmp_path / 'out.zip'
    result = invoke('--source', src, '--dest', dest)
    assert result.exit_code == 0, result.output
    members = read_dest(dest)
    assert json.loads(members['dataset.json']) == {'labels': None}
    for i, name in enumerate(names_for(range(3))):
        assert PIL.Image.open(io.BytesIO(members[name])).mode == 'L'
        np.testing.assert_array_equal(decode(members[name]), grey[i])
    assert '1 channel,' in result.stdout and 'no labels' in result.stdout

#----------------------------------------------------------------------------
# Bad input: one line naming the file or flag, exit code 2, nothing under the destination name.


def assert_user_error(tmp_path, result, dest, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.stderr.rstrip().split('\n')  # before the error only the progress line (if work had started)
    assert lines[-1].startswith('Error:') and sum('Error' in line for line in lines) == 1, result.stderr
    assert all(line.startswith('\r') for line in lines[:-1]), result.stderr
    for fragment in fragments:
        assert str(fragment) in lines[-1], (fragment, lines[-1])
    assert not os.path.exists(dest)
    parent = os.path.dirname(os.path.abspath(dest))
    leftovers = [f for f in os.listdir(parent) if f.endswith('.tmp')] if os.path.isdir(parent) else []
    assert leftovers == []


def test_error_missing_source(tmp_path):
    dest = tmp_path / 'out.zip'
    assert_user_error(tmp_path, invoke('--source', tmp_path / 'nope', '--dest', dest), dest, '--source', tmp_path / 'nope')


def test_error_existing_dest_left_untouched(tmp_path):
    write_cifar_tarball(tmp_path / 'cifar-10-python.tar.gz')
    dest = tmp_path / 'out.zip'
    dest.write_bytes(b'precious')
    result = invoke('--source', tmp_path / 'cifar-10-python.tar.gz', '--dest', dest)
    assert result.exit_code == 2 and '--dest' in result.stderr and str(dest) in result.stderr
    assert dest.read_bytes() == b'precious'


@pytest.mark.parametrize('resolution', ['32', '32x', 'axb', '0x32', '32x32x3'])
def test_error_bad_resolution_syntax(tmp_path, resolution):
    write_cifar_tarball(tmp_path / 'cifar-10-python.tar.gz')
    dest = tmp_path / 'out'
    result = invoke('--source', tmp_path / 'cifar-10-python.tar.gz', '--dest', dest, '--resolution', resolution)
    assert_user_error(tmp_path, result, dest, '--resolution', resolution)


def test_error_transform_needs_resolution(tmp_path):
    src = tmp_path / 'src'
    make_folder(src)
    dest = tmp_path / 'out'
    assert_user_error(tmp_path, invoke('--source', src, '--dest', dest, '--transform', 'center-crop'), dest, '--resolution')


def test_error_tarball_not_cifar(tmp_path):
    bogus = tmp_path / 'photos.tar.gz'
    with tarfile.open(bogus, 'w:gz') as tar:
        info = tarfile.TarInfo('photos/readme.txt')
        info.size = 5
        tar.addfile(info, io.BytesIO(b'hello'))
    dest = tmp_path / 'out.zip'
    assert_user_error(tmp_path, invoke('--source', bogus, '--dest', dest), dest, bogus, 'CIFAR-10')


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_error_cifar_pickle_with_code_is_refused(tmp_path):
    marker = str(tmp_path / 'pwned')
    tarball = tmp_path / 'cifar-10-python.tar.gz'
    write_cifar_tarball(tarball, extra_member=pickle.dumps({'data': _Exploit(marker), 'labels': [0]}, protocol=2))
    dest = tmp_path / 'out.zip'
    assert_user_error(tmp_path, invoke('--source', tarball, '--dest', dest), dest, 'data_batch_3', 'refused',
                      'may be malicious', 'os.makedirs')
    assert not os.path.exists(marker)


def test_error_truncated_image_cleans_up(tmp_path):
    src = tmp_path / 'src'
    rels = make_folder(src, seed=8)
    good = (src / rels[2]).read_bytes()
    (src / rels[2]).write_bytes(good[:len(good) // 2])
    for dest in [tmp_path / 'out.zip', tmp_path / 'out']:
        result = invoke('--source', src, '--dest', dest, '--resolution', '8x8', '--transform', 'center-crop')
        assert_user_error(tmp_path, result, dest, src / rels[2])


def test_error_unreadable_image(tmp_path):
    src = tmp_path / 'src'
    make_folder(src, seed=9)
    (src / 'dog' / 'broken.png').write_bytes(b'this is not a png')
    dest = tmp_path / 'out.zip'
    result = invoke('--source', src, '--dest', dest, '--resolution', '8x8')
    assert_user_error(tmp_path, result, dest, src / 'dog' / 'broken.png')


def test_error_mixed_resolutions_without_resolution(tmp_path):
    src = tmp_path / 'src'
    rng = np.random.default_rng(10)
    for rel, size in [('a.png', 8), ('b.png', 8), ('c.png', 16)]:
        save_image(src / rel, rng.integers(0, 256, size=[size, size, 3], dtype=np.uint8))
    dest = tmp_path / 'out'
    assert_user_error(tmp_path, invoke('--source', src, '--dest', dest), dest, src / 'c.png', '16x16', '--resolution')

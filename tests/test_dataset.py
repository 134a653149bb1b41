"""training/data/dataset.py: EDM-format reader (folder and zip) and the resumable InfiniteSampler."""

import itertools
import json
import os
import pickle

import numpy as np
import PIL.Image
import pytest
import torch

import dnnlib
from conftest import zip_folder
from training.data.dataset import ImageFolderDataset, InfiniteSampler


def edm_name(i):
    return f'{i // 1000:05d}/img{i:08d}.png'


def write_edm_folder(root, images, labels=None, write_json=True):
    """An EDM-format folder written directly with PIL (HWC or HW uint8 images)."""
    for i, img in enumerate(images):
        path = os.path.join(root, edm_name(i))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        PIL.Image.fromarray(img).save(path)
    if write_json:
        entries = None if labels is None else [[edm_name(i), int(l)] for i, l in enumerate(labels)]
        with open(os.path.join(root, 'dataset.json'), 'w') as f:
            json.dump({'labels': entries}, f)
    return root




@pytest.fixture
def rgb_set(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=[7, 8, 8, 3], dtype=np.uint8)
    labels = np.array([3, 0, 1, 3, 2, 0, 1])
    return write_edm_folder(str(tmp_path / 'tiny-8x8'), images, labels), images, labels


def test_shapes_properties_and_one_hot_labels(rgb_set):
    path, images, labels = rgb_set
    ds = ImageFolderDataset(path, resolution=8, use_labels=True)
    assert (len(ds), ds.name, ds.resolution, ds.num_channels) == (7, 'tiny-8x8', 8, 3)
    assert (ds.label_dim, ds.has_labels, ds.label_shape, ds.image_shape) == (4, True, [4], [3, 8, 8])
    for i in range(7):
        img, label = ds[i]
        assert img.dtype == np.uint8 and label.dtype == np.float32
        np.testing.assert_array_equal(img, np.moveaxis(images[i], -1, 0))
        np.testing.assert_array_equal(label, np.eye(4, dtype=np.float32)[labels[i]])


def test_unconditional_labels_are_empty(rgb_set):
    path, _, _ = rgb_set
    ds = ImageFolderDataset(path)
    assert ds.label_dim == 0 and not ds.has_labels
    assert ds[0][1].shape == (0,) and ds[0][1].dtype == np.float32


def test_grey_images_have_one_channel(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, size=[3, 4, 4], dtype=np.uint8)
    ds = ImageFolderDataset(write_edm_folder(str(tmp_path / 'g'), images))
    assert ds.num_channels == 1 and ds.image_shape == [1, 4, 4]
    np.testing.assert_array_equal(ds[2][0][0], images[2])


def test_xflip_doubles_with_mirrored_second_half(rgb_set):
    path, images, labels = rgb_set
    ds = ImageFolderDataset(path, use_labels=True, xflip=True)
    assert len(ds) == 14
    for i in range(7):
        np.testing.assert_array_equal(ds[i][0], np.moveaxis(images[i], -1, 0))
        np.testing.assert_array_equal(ds[7 + i][0], np.moveaxis(images[i][:, ::-1], -1, 0))
        np.testing.assert_array_equal(ds[7 + i][1], np.eye(4)[labels[i]])


def test_max_size_takes_seeded_random_subset_in_order(rgb_set):
    path, images, _ = rgb_set
    picks = {}
    for seed in range(4):
        ds = ImageFolderDataset(path, max_size=3, random_seed=seed)
        assert len(ds) == 3
        found = [next(j for j in range(7) if np.array_equal(ds[k][0], np.moveaxis(images[j], -1, 0))) for k in range(3)]
        expected = np.arange(7)
        np.random.RandomState(seed).shuffle(expected)  # EDM's rule: seeded shuffle, first N, sorted
        assert found == sorted(expected[:3].tolist())
        picks[seed] = tuple(found)
    assert len(set(picks.values())) > 1
    assert len(ImageFolderDataset(path, max_size=100)) == 7
    assert len(ImageFolderDataset(path, max_size=3, xflip=True)) == 6


def test_cache_keeps_decoded_images(rgb_set):
    path, images, _ = rgb_set
    cached, uncached = ImageFolderDataset(path, cache=True), ImageFolderDataset(path, cache=False)
    first = cached[1][0]
    uncached[1]
    replacement = 255 - images[1]
    PIL.Image.fromarray(replacement).save(os.path.join(path, edm_name(1)))
    np.testing.assert_array_equal(cached[1][0], first)
    np.testing.assert_array_equal(uncached[1][0], np.moveaxis(replacement, -1, 0))
    cached[1][0][:] = 0  # items are copies: the cache is not modified through them
    np.testing.assert_array_equal(cached[1][0], first)


def test_zip_and_folder_give_the_same_items(rgb_set, tmp_path):
    path, _, _ = rgb_set
    ds_dir = ImageFolderDataset(path, use_labels=True, xflip=True)
    ds_zip = ImageFolderDataset(zip_folder(path, str(tmp_path / 'tiny-8x8.zip')), use_labels=True, xflip=True)
    assert ds_zip.name == ds_dir.name and len(ds_zip) == len(ds_dir) and ds_zip.label_dim == ds_dir.label_dim
    for i in range(len(ds_dir)):
        for a, b in zip(ds_dir[i], ds_zip[i]):
            np.testing.assert_array_equal(a, b)
    clone = pickle.loads(pickle.dumps(ds_zip))  # as spawned DataLoader workers receive it: the open zip is not pickled
    np.testing.assert_array_equal(clone[3][0], ds_dir[3][0])
    images, labels = next(iter(torch.utils.data.DataLoader(ds_zip, batch_size=len(ds_zip), num_workers=1)))  # forked worker
    np.testing.assert_array_equal(images.numpy(), np.stack([ds_dir[i][0] for i in range(len(ds_dir))]))
    np.testing.assert_array_equal(labels.numpy(), np.stack([ds_dir[i][1] for i in range(len(ds_dir))]))


def write_png(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.Image.fromarray(arr).save(path)


@pytest.mark.parametrize('case', ['missing', 'empty', 'not_zip', 'non_square', 'wrong_resolution', 'no_json',
                                  'null_labels', 'label_missing', 'bad_json'])
def test_validation_errors_name_the_dataset(tmp_path, case):
    path = str(tmp_path / 'ds')
    rgb = np.zeros([8, 8, 3], dtype=np.uint8)
    kwargs = {}
    if case == 'empty':
        os.makedirs(path)
    elif case == 'not_zip':
        path = str(tmp_path / 'ds.tar')
        open(path, 'wb').write(b'x')
    elif case == 'non_square':
        write_png(os.path.join(path, edm_name(0)), np.zeros([8, 4, 3], dtype=np.uint8))
    elif case == 'wrong_resolution':
        write_edm_folder(path, [rgb])
        kwargs = dict(resolution=16)
    elif case == 'no_json':
        write_edm_folder(path, [rgb], write_json=False)
        kwargs = dict(use_labels=True)
    elif case == 'null_labels':
        write_edm_folder(path, [rgb], labels=None)
        kwargs = dict(use_labels=True)
    elif case == 'label_missing':
        write_edm_folder(path, [rgb, rgb], labels=[0, 1])
        with open(os.path.join(path, 'dataset.json'), 'w') as f:
            json.dump({'labels': [[edm_name(0), 0]]}, f)
        kwargs = dict(use_labels=True)
    elif case == 'bad_json':
        write_edm_folder(path, [rgb], labels=[0])
        open(os.path.join(path, 'dataset.json'), 'w').write('{"labels": [["00000/img0')
        kwargs = dict(use_labels=True)
    with pytest.raises(dnnlib.UserError) as info:
        ImageFolderDataset(path, **kwargs)
    assert path in str(info.value)
    if case in ('no_json', 'null_labels'):
        assert str(info.value) == f'dataset {path} has no labels (dataset.json) but --cond was given'
    if case == 'label_missing':
        assert edm_name(1) in str(info.value)


def test_later_image_of_other_shape_is_a_user_error(tmp_path):
    path = write_edm_folder(str(tmp_path / 'ds'), [np.zeros([8, 8, 3], np.uint8), np.zeros([4, 4, 3], np.uint8)])
    ds = ImageFolderDataset(path)
    ds[0]
    with pytest.raises(dnnlib.UserError, match=edm_name(1)):
        ds[1]

#----------------------------------------------------------------------------
# InfiniteSampler.


def take(sampler, n, skip=0):
    return list(itertools.islice(iter(sampler), skip, skip + n))


@pytest.mark.parametrize('shuffle', [True, False])
def test_sampler_resume_continues_the_stream(shuffle):
    for k in [0, 1, 6, 7, 13, 50]:
        fresh = take(InfiniteSampler(7, seed=3, shuffle=shuffle), 20, skip=k)
        assert take(InfiniteSampler(7, seed=3, shuffle=shuffle, start_index=k), 20) == fresh


def test_sampler_epochs_are_permutations_that_differ():
    stream = take(InfiniteSampler(11, seed=5), 11 * 6)
    epochs = [stream[i * 11:(i + 1) * 11] for i in range(6)]
    assert all(sorted(e) == list(range(11)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1
    assert take(InfiniteSampler(11, seed=6), 22) != stream[:22]
    assert take(InfiniteSampler(11, seed=5), 30) == stream[:30]
    assert take(InfiniteSampler(4, shuffle=False), 10) == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]


def test_sampler_resume_at_odd_position_keeps_rank_ownership():
    """A start not divisible by num_replicas: rank r still owns exactly the positions p with p % R == r."""
    single = take(InfiniteSampler(5, seed=9), 40)
    for r in range(3):
        assert take(InfiniteSampler(5, rank=r, num_replicas=3, seed=9, start_index=7), 8) == [single[p] for p in range(7, 40) if p % 3 == r][:8]


def test_sampler_ranks_take_disjoint_interleaved_slices():
    size, replicas, per_rank = 9, 3, 12
    single = take(InfiniteSampler(size, seed=1), replicas * per_rank)
    streams = [take(InfiniteSampler(size, rank=r, num_replicas=replicas, seed=1), per_rank) for r in range(replicas)]
    for r in range(replicas):
        assert streams[r] == single[r::replicas]
    for epoch in range(replicas * per_rank // size):  # within an epoch the ranks split the indices disjointly
        taken = [{idx for k, idx in enumerate(streams[r]) if (r + k * replicas) // size == epoch} for r in range(replicas)]
        assert sum(len(s) for s in taken) == size and set().union(*taken) == set(range(size))
    k = 5  # resume: every rank consumed k indices, so replicas*k global positions are done
    for r in range(replicas):
        fresh = take(InfiniteSampler(size, rank=r, num_replicas=replicas, seed=1), 10, skip=k)
        assert take(InfiniteSampler(size, rank=r, num_replicas=replicas, seed=1, start_index=replicas * k), 10) == fresh


def test_sampler_rejects_bad_arguments():
    with pytest.raises(dnnlib.UserError):
        InfiniteSampler(0)
    with pytest.raises(ValueError):
        InfiniteSampler(5, rank=2, num_replicas=2)
    with pytest.raises(ValueError):
        InfiniteSampler(5, start_index=-1)


def test_sampler_with_dataloader(rgb_set):
    path, images, _ = rgb_set
    ds = ImageFolderDataset(path)
    sampler = InfiniteSampler(ds, seed=2)
    loader = iter(torch.utils.data.DataLoader(ds, sampler=sampler, batch_size=4))
    batch, _ = next(loader)
    order = take(sampler, 4)
    np.testing.assert_array_equal(batch.numpy(), np.moveaxis(images[order], -1, 1))

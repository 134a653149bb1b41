"""--data-on-device (training.data.device_data): the same batches as the DataLoader path, on every rank and after a
resume; the same training run; too-large datasets and contradictory flags refused up front."""

import os

import numpy as np
import pytest
import torch

import dnnlib
from conftest import write_random_dataset
from test_training import base_args, final_weights, invoke, tiny_options
from training.data import device_data
from training.loop import runtime
from training.loop import training_loop as tl
from training.data.dataset import ImageFolderDataset

CPU = torch.device('cpu')


@pytest.fixture(scope='module')
def labelled_dir(tmp_path_factory):
    return write_random_dataset(tmp_path_factory.mktemp('labelled'), num_images=13, num_classes=3)


def _take(iterator, steps):
    return [next(iterator) for _ in range(steps)]


@pytest.mark.parametrize('xflip, max_size', [(True, None), (False, None), (True, 9)])
def test_batches_equal_the_data_loader_on_every_rank_and_after_a_resume(labelled_dir, xflip, max_size):
    dataset = ImageFolderDataset(labelled_dir, use_labels=True, xflip=xflip, max_size=max_size, cache=True)
    batch_gpu, world = 3, 2
    for start_nimg in (0, 6, 31):   # fresh, resumed mid-run, resumed across an epoch boundary
        for rank in range(world):
            kwargs = dict(dataset=dataset, data_loader_kwargs=dict(num_workers=0), batch_gpu=batch_gpu, seed=7,
                          start_nimg=start_nimg, device=CPU, rank=rank, num_replicas=world)
            loader = _take(runtime.build_data_iterator(**kwargs), 12)
            on_device = _take(runtime.build_data_iterator(**kwargs, data_on_device=True), 12)
            for (images, labels), (dev_images, dev_labels) in zip(loader, on_device):
                assert dev_images.dtype == torch.uint8 and dev_labels.dtype == torch.float32
                assert torch.equal(images, dev_images) and torch.equal(labels, dev_labels)
    if xflip:   # the mirrored copies were drawn (so the on-device flip was exercised)
        assert any(dataset.index_map()[1])


def test_unlabelled_batches_have_an_empty_label_dimension(tmp_path):
    dataset = ImageFolderDataset(write_random_dataset(tmp_path, num_images=5), xflip=True)
    images, labels = next(runtime.build_data_iterator(dataset, {}, 4, 0, 0, CPU, data_on_device=True))
    assert images.shape == (4, 3, 8, 8) and labels.shape == (4, 0) and labels.dtype == torch.float32


def test_memory_estimate_and_refusal(labelled_dir, monkeypatch):
    dataset = ImageFolderDataset(labelled_dir, use_labels=True, xflip=True, max_size=9)
    # 9 distinct 3x8x8 images with int64 class labels, and an int64 row + a flip flag for each of 18 items
    assert device_data.device_data_nbytes(dataset) == 9 * (3 * 8 * 8 + 8) + 18 * 9
    monkeypatch.setattr(device_data, 'available_bytes', lambda device: 2 * 9 * (3 * 8 * 8 + 8))
    with pytest.raises(dnnlib.UserError, match='--data-on-device: .* GiB, more than 50% of the'):
        device_data.DeviceDataset(dataset, CPU)
    with pytest.raises(dnnlib.UserError, match='--data-on-device: list cannot be held'):
        device_data.check_device_data([1, 2], CPU)


def test_training_run_is_identical_and_resumes_exactly(tmp_path):
    data = write_random_dataset(tmp_path / 'data', num_images=10)
    runs = {}
    for name, on_device, total in [('loader', False, None), ('device', True, None), ('first', True, 0.008)]:
        run_dir = tmp_path / name
        os.makedirs(run_dir)
        options = tiny_options(data, dropout=0.2, xflip=True).replace(data_on_device=on_device)
        options = options.replace(total_kimg=total) if total else options
        assert tl.training_loop(options, str(run_dir)) == 'done'
        runs[name] = run_dir
    resumed = tmp_path / 'resumed'
    os.makedirs(resumed)
    options = tiny_options(data, dropout=0.2, xflip=True).replace(
        data_on_device=True, resume_state=str(runs['first'] / 'training-state-latest.pt'))
    assert tl.training_loop(options, str(resumed)) == 'done'
    _, loader = final_weights(runs['loader'])
    for other in (runs['device'], resumed):
        _, weights = final_weights(other)
        assert all(torch.equal(weights[name], value) for name, value in loader.items())


def test_cli_flag_recorded_and_workers_refused(tmp_path, labelled_dir):
    code, output = invoke(base_args(labelled_dir, tmp_path / 'ok') + ['--data-on-device=1'])
    assert code == 0, output
    (run_dir,) = list((tmp_path / 'ok').iterdir())
    assert '"data_on_device": true' in (run_dir / 'training_options.json').read_text()
    code, output = invoke(base_args(labelled_dir, tmp_path / 'bad') + ['--data-on-device=1', '--workers=2'])
    assert code == 2 and output.strip().count('\n') == 0 and '--workers' in output and '--data-on-device' in output
    assert not (tmp_path / 'bad').exists() or not any((tmp_path / 'bad').iterdir())


def test_index_map_matches_items(labelled_dir):
    dataset = ImageFolderDataset(labelled_dir, use_labels=True, xflip=True, max_size=9)
    raw_idx, mirrored = dataset.index_map()
    for i in range(len(dataset)):
        image = dataset.read_raw_image(raw_idx[i])
        assert np.array_equal(dataset[i][0], image[:, :, ::-1] if mirrored[i] else image)

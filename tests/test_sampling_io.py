"""What keeps sampling and scoring off the host's critical path: PNGs written on background threads
(training.sampling.generation.BackgroundWriter, generate.py), batches handed to the host (host_batches), and feature
statistics summed where the features are (metrics.metric_utils.FeatureStats with torch input)."""

import threading
import time

import numpy as np
import pytest
import torch

import generate
from metrics import metric_utils
from training.sampling import generation


def png_bytes_written_serially(path, image):
    generation.save_png(path, image)
    return path.read_bytes()


def test_write_images_gives_the_serial_writer_bytes(tmp_path):
    """generate.write_images (background threads) writes byte for byte what save_png writes in the caller."""
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, size=[6, 8, 8, 3], dtype=np.uint8))
    batches = [([0, 1, 2], images[:3]), ([1003, 1004, 1005], images[3:])]
    generate.write_images(iter(batches), str(tmp_path / 'out'), True, False, 6)
    for seed, image in zip([0, 1, 2, 1003, 1004, 1005], images.numpy()):
        expected = png_bytes_written_serially(tmp_path / f'ref-{seed}.png', image)
        assert (tmp_path / 'out' / generate.image_path('', seed, True)).read_bytes() == expected
    leftovers = [p.name for p in (tmp_path / 'out').rglob('*') if p.is_file() and not p.name.endswith('.png')]
    assert leftovers == []  # no temporary files left behind


def test_background_writer_raises_the_first_failure():
    done = []

    def write(i):
        if i == 3:
            raise OSError(28, 'No space left on device', f'file-{i}')
        done.append(i)

    with pytest.raises(OSError, match='No space left'):
        with generation.BackgroundWriter(num_threads=1) as writer:
            for i in range(6):
                writer.submit(write, i)
    assert 3 not in done and {0, 1, 2} <= set(done)


def test_background_writer_bounds_the_queue():
    """With max_pending=2 and the writes held, the third submit waits until a write finishes."""
    gate = threading.Event()
    threading.Timer(0.3, gate.set).start()
    with generation.BackgroundWriter(num_threads=1, max_pending=2) as writer:
        start = time.perf_counter()
        writer.submit(gate.wait)
        writer.submit(gate.wait)
        assert time.perf_counter() - start < 0.25
        writer.submit(gate.wait)
        assert gate.is_set() and time.perf_counter() - start >= 0.25


def test_host_batches_on_cpu_gives_numpy_in_order():
    batches = [([0], torch.zeros([1, 2, 2, 3], dtype=torch.uint8)), ([1], torch.ones([1, 2, 2, 3], dtype=torch.uint8))]
    out = list(generation.host_batches(iter(batches)))
    assert [seeds for seeds, _ in out] == [[0], [1]]
    assert all(isinstance(images, np.ndarray) for _, images in out) and out[1][1].max() == 1


def test_feature_stats_from_torch_batches_match_float64_reference():
    """Torch batches (summed on their device) and numpy batches give numpy's float64 mean and covariance; kept
    features come back as float64 numpy rows in order."""
    rng = np.random.default_rng(1)
    features = rng.standard_normal([50, 7]).astype(np.float32) * 3 + 1
    stats = metric_utils.FeatureStats()
    for chunk in np.array_split(features, 4):
        stats.append(torch.from_numpy(chunk))
    numpy_half = metric_utils.FeatureStats()
    numpy_half.append(features[:20])
    torch_half = metric_utils.FeatureStats()
    torch_half.append(torch.from_numpy(features[20:]))
    merged = numpy_half.merge(torch_half)
    kept = metric_utils.FeatureStats(capture_all=True, capture_mean_cov=False)
    for chunk in np.array_split(features, 3):
        kept.append(torch.from_numpy(chunk))
    reference = features.astype(np.float64)
    assert kept.get_all().dtype == np.float64 and np.array_equal(kept.get_all(), reference)
    for result in (stats, merged):
        mu, sigma = result.get_mean_cov()
        assert result.num_items == 50
        np.testing.assert_allclose(mu, reference.mean(axis=0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(sigma, np.cov(reference, rowvar=False), rtol=1e-10, atol=1e-12)

"""fid.py --ref with an openai/ADM reference batch (VIRTUAL_imagenet64_labeled.npz layout: arr_0 images, arr_1
labels, mu, sigma, mu_s, sigma_s)."""

import numpy as np
import pytest

from metrics import metric_utils
from test_fid_cli import independent_stats, invoke, reference_frechet, setup  # noqa: F401 (setup is a fixture)


def test_openai_reference_batch_as_ref(setup):  # noqa: F811
    s = setup
    mu_a, sigma_a = independent_stats(s['images_a'], s['det'])
    ref = s['root'] / 'VIRTUAL_tiny_labeled.npz'
    np.savez(ref, arr_0=np.stack(s['images_a']), arr_1=np.arange(24) % 10, mu=mu_a, sigma=sigma_a,
             mu_s=np.zeros(7), sigma_s=np.eye(7))
    arrays = metric_utils.load_ref(str(ref))
    assert 'arr_0' not in arrays and 'arr_1' not in arrays
    np.testing.assert_array_equal(arrays['mu'], mu_a)
    score = float(invoke(['calc', f'--images={s["data_b"]}', f'--ref={ref}', '--num=24', f'--detector={s["det"]}',
                          '--allow-unsafe-pickle'])[-1])
    mu_b, sigma_b = independent_stats(s['images_b'], s['det'])
    assert score == pytest.approx(reference_frechet(mu_b, sigma_b, mu_a, sigma_a), rel=1e-4)


def test_net_mode_samples_an_openai_state_dict(setup, tmp_path):  # noqa: F811
    import shutil
    from conftest import FIXTURES_DIR
    s = setup
    network = tmp_path / 'cd_imagenet64_l2.pt'
    shutil.copy(FIXTURES_DIR / 'openai_cm' / 'tiny_imagenet_like.pt', network)
    ref = tmp_path / 'ref.npz'
    invoke(['ref', f'--data={s["data_a"]}', f'--dest={ref}', f'--detector={s["det"]}', '--allow-unsafe-pickle'])
    lines = invoke(['net', f'--network={network}', '--resolution=16', '--num_head_channels=16', f'--ref={ref}',
                    '--num=4', '--sampler=multistep', '--ts=0,22,39', f'--detector={s["det"]}', '--allow-unsafe-pickle'])
    assert "'sampler': 'multistep'" in '\n'.join(lines) and np.isfinite(float(lines[-1])) and float(lines[-1]) > 0

"""docs/ADDING_A_METHOD.md works as written: its module and preset are the repository's, its command trains, and the
toy method computes its documented loss and schedule."""

import json
import pathlib
import re
import shlex

import numpy as np
import torch
from click.testing import CliRunner

import train
from configs import presets
from conftest import write_random_dataset
from training.checkpoints import checkpoint
from training.methods.base import Progress
from training.methods.toy import ToyDenoising

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = (REPO_ROOT / 'docs' / 'ADDING_A_METHOD.md').read_text()


def _code_blocks(language):
    return re.findall(rf'```{language}\n(.*?)```', DOC, flags=re.S)


def test_walkthrough_shows_the_repository_module_and_preset():
    module, preset = _code_blocks('python')
    assert module == (REPO_ROOT / 'training' / 'methods' / 'toy.py').read_text()
    assert preset in (REPO_ROOT / 'configs' / 'presets.py').read_text()
    assert presets.resolve('toy-denoising', dict(data='x')).method_kwargs['class_name'] == 'training.methods.toy.ToyDenoising'


def test_walkthrough_command_trains(tmp_path):
    (command,) = [line for line in _code_blocks('bash')[0].splitlines() if line.startswith('python train.py')]
    args = shlex.split(command)[2:]
    data = write_random_dataset(tmp_path / 'data')
    args = [f'--data={data}' if a.startswith('--data=') else f'--outdir={tmp_path / "runs"}' if a.startswith('--outdir=')
            else a for a in args]
    result = CliRunner().invoke(train.main, args)
    assert result.exit_code == 0, result.output
    (run_dir,) = list((tmp_path / 'runs').iterdir())
    status = [line for line in result.output.splitlines() if line.startswith('tick ')]
    assert len(status) == 3 and all('sigma_max' in line for line in status)
    stats = [json.loads(line) for line in (run_dir / 'stats.jsonl').read_text().splitlines()]
    sigma_max = [s['Progress/sigma_max']['mean'] for s in stats]
    np.testing.assert_allclose(sigma_max, [1 + 79 * k / 6 for k in (1, 3, 5)])   # before steps 2, 4, 6 of 6
    assert all(np.isfinite(s['Loss/loss']['mean']) for s in stats)
    net, _ = checkpoint.load_network_snapshot(run_dir / 'network-snapshot-latest.pt')
    assert type(net).__name__ == 'EDMPrecond' and (run_dir / 'training-state-latest.pt').is_file()


class _Shrink(torch.nn.Module):
    """D(x, σ) = x / (1 + σ²): a denoiser whose loss is easy to recompute."""

    def forward(self, x, sigma, labels=None):
        return x / (1 + sigma ** 2)


def test_toy_loss_and_schedule_match_their_formulas():
    method = ToyDenoising(sigma_min=0.01, sigma_start=2.0, sigma_end=50.0, sigma_data=0.5)
    method.setup(_Shrink(), torch.device('cpu'))
    for cur_nimg, expected in [(0, 2.0), (500, 26.0), (1000, 50.0), (2000, 50.0)]:
        assert method.schedule(Progress(cur_nimg, 10, 1000, 0.1)) == dict(sigma_max=expected)
    method.schedule(Progress(250, 10, 1000, 0.1))   # sigma_max = 14
    images = torch.rand(5, 3, 4, 4) * 2 - 1
    torch.manual_seed(1)
    got = method.loss(_Shrink(), images).double().numpy()
    torch.manual_seed(1)
    u = torch.rand([5, 1, 1, 1]).double().numpy()
    n = torch.randn(5, 3, 4, 4).double().numpy()
    x = images.double().numpy()
    sigma = 0.01 * (14.0 / 0.01) ** u
    denoised = (x + sigma * n) / (1 + sigma ** 2)
    weight = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    expected = (weight * (denoised - x) ** 2).reshape(5, -1).sum(1)
    np.testing.assert_allclose(got, expected, rtol=1e-4)

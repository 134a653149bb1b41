"""Consistency Models through train.py and the training loop on a tiny openai-style network: a CD run and a CT
run of a few steps resume exactly (target network and the method's step counter included), --dry-run of every
CM preset prints the released recipe, and missing teachers / LPIPS weights are one clear message."""

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import train
from configs import presets
from conftest import write_random_dataset
from training.methods import lpips as lpips_mod
from training.checkpoints.checkpoint import TrainingState

TINY_ARCH = dict(model_channels=32, channel_mult=[1, 1], num_blocks=1, attn_resolutions=[8], channels_per_head=16)
TICK = 0.008        # 8 images = two steps of batch 4 per tick


@pytest.fixture(scope='module')
def files(tmp_path_factory, fixtures_dir):
    root = tmp_path_factory.mktemp('cm')
    data = write_random_dataset(root / 'data', num_images=16, resolution=16, num_classes=10)
    teacher = root / 'teacher.pt'      # not a released name: read as the EDM form at the data's resolution
    shutil.copy(fixtures_dir / 'openai_cm' / 'tiny_imagenet_like.pt', teacher)
    cm = np.load(fixtures_dir / 'openai_cm' / 'openai_cm.npz')
    vgg, lin = root / 'vgg.pth', root / 'lin.pt'
    torch.save({f'features.{i}.{k}': torch.from_numpy(cm[f'lpips/vgg/{i}.{k}'])
                for i in lpips_mod.VGG16_CONVS for k in ('weight', 'bias')}, vgg)
    torch.save([torch.from_numpy(cm[f'lpips/lin/{k}']) for k in range(5)], lin)
    return dict(data=str(data), teacher=str(teacher), vgg=str(vgg), lin=str(lin))


def invoke(args):
    result = CliRunner().invoke(train.main, args)
    return result.exit_code, result.output


def run_args(preset, files, outdir, duration_images, extra=()):
    return [f'--preset={preset}', f'--data={files["data"]}', f'--teacher={files["teacher"]}', f'--outdir={outdir}',
            '--nosubdir', '--cond=True', '--arch-kwargs=' + json.dumps(TINY_ARCH), '--batch=4', f'--tick={TICK}',
            f'--duration={duration_images / 1e6}', '--precision=fp32', '--workers=0', '--sample-every=0',
            '--snap=0', '--dump=1', *extra]


def final_state(run_dir):
    return TrainingState.read(run_dir / 'training-state-latest.pt')


@pytest.mark.parametrize('preset,extra', [
    ('cm-imagenet64-cd-l2', ()),
    ('cm-imagenet64-ct', ('--lpips-vgg={vgg}', '--lpips-lin={lin}')),
])
def test_cm_run_resumes_exactly(files, tmp_path, preset, extra):
    extra = [e.format(**files) for e in extra]
    code, output = invoke(run_args(preset, files, tmp_path / 'whole', 16, extra))
    assert code == 0, output
    code, output = invoke(run_args(preset, files, tmp_path / 'part', 8, extra))
    assert code == 0, output
    state_file = tmp_path / 'part' / 'training-state-latest.pt'
    code, output = invoke(run_args(preset, files, tmp_path / 'resumed', 16, extra) + [f'--resume={state_file}'])
    assert code == 0, output
    whole, resumed = final_state(tmp_path / 'whole'), final_state(tmp_path / 'resumed')
    assert whole['method']['step'] == resumed['method']['step'] == 4
    for key in ('net', 'optimizer'):
        assert key in whole
    for name, value in whole['net'].items():
        torch.testing.assert_close(resumed['net'][name], value, rtol=0, atol=0, msg=name)
    for name, value in whole['method']['target'].items():
        torch.testing.assert_close(resumed['method']['target'][name], value, rtol=0, atol=0, msg=name)
    for suffix, ema in whole['ema'].items():
        for name, value in ema.items():
            torch.testing.assert_close(resumed['ema'][suffix][name], value, rtol=0, atol=0, msg=name)
    # The target moved away from the student (it is an EMA, not a copy) and the student from the teacher.
    assert any(not torch.equal(whole['method']['target'][k], v) for k, v in whole['net'].items())


@pytest.mark.parametrize('preset', [name for name in presets.PRESETS if name.startswith('cm-')])
def test_dry_run_prints_the_released_recipe(files, tmp_path, preset):
    args = [f'--preset={preset}', f'--data={files["data"]}', f'--outdir={tmp_path}', '--cond=True', '--dry-run',
            '--arch-kwargs=' + json.dumps(TINY_ARCH)]
    if not preset.endswith('-edm'):
        args.append(f'--teacher={files["teacher"]}')
    code, output = invoke(args)
    assert code == 0, output
    (run_dir,) = list(tmp_path.iterdir())
    options = json.loads((run_dir / 'training_options.json').read_text())
    assert json.dumps(options['method_kwargs']) in json.dumps(options)
    recipe = presets.PRESETS[preset]
    assert options['batch_size'] == recipe['batch'] and options['optimizer_kwargs']['lr'] == recipe['optimizer']['lr']
    assert options['network_kwargs']['class_name'] == 'training.networks.karras.KarrasDenoiser'
    assert [t['beta'] for t in options['ema_kwargs']['trackers']] == [t['beta'] for t in recipe['ema']['trackers']]
    assert '"method_kwargs"' in output


def test_released_recipe_numbers():
    cd, ct = presets.PRESETS['cm-imagenet64-cd-lpips'], presets.PRESETS['cm-imagenet64-ct']
    assert (cd['batch'], cd['optimizer']['lr'], cd['duration_mimg']) == (2048, 8e-6, 600000 * 2048 / 1e6)
    assert cd['method_kwargs']['loss_norm'] == 'lpips' and cd['dropout'] == 0.0
    assert (ct['optimizer']['lr'], ct['method_kwargs']['end_scales'], ct['method_kwargs']['total_steps']) == \
        (1e-4, 200, 800000)
    lsun = presets.PRESETS['cm-lsun256-ct']
    assert (lsun['batch'], lsun['optimizer']['lr'], lsun['method_kwargs']['end_scales']) == (256, 5e-5, 150)
    assert [t['beta'] for t in cd['ema']['trackers']] == [0.999, 0.9999, 0.9999432189950708]
    edm = presets.PRESETS['cm-imagenet64-edm']
    assert (edm['batch'], edm['dropout'], edm['network_kwargs']['parameterization']) == (4096, 0.1, 'edm')


def test_missing_teacher_and_lpips_weights_are_one_clear_message(files, tmp_path):
    args = [f'--data={files["data"]}', f'--outdir={tmp_path}', '--cond=True', '--dry-run']
    code, output = invoke(['--preset=cm-imagenet64-cd-l2'] + args)
    assert code == 2 and '--teacher' in output and len(output.strip().splitlines()) == 1, output
    code, output = invoke(['--preset=cifar10-ecm', '--loss-norm=l1'] + args)
    assert code == 2 and '--loss-norm' in output and len(output.strip().splitlines()) == 1, output
    code, output = invoke(run_args('cm-imagenet64-ct', files, tmp_path / 'run', 8,
                                   [f'--lpips-vgg={tmp_path / "absent.pth"}']))
    assert code == 2 and '--lpips-vgg' in output and len(output.strip().splitlines()) == 1, output

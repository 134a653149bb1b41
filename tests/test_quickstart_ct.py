"""The quickstart's continuous-time presets (configs/presets_ct.py quickstart-scd / -tcm / -meanflow) resolve and
build through `train.py --dry-run` on a small procedural dataset; no training runs here (docs/QUICKSTART.md)."""

import json
import math

import pytest
import torch
from click.testing import CliRunner

import dnnlib
import train
from configs import presets
from training.checkpoints import checkpoint
from training.methods import tcm
from training.sampling import samplers

pytestmark = pytest.mark.usefixtures('private_cache')


def _dry_run(tmp_path, shapes_zip, preset, *flags):
    """The training_options.json of a dry run of `preset` on `shapes_zip` (16x16 procedural shapes)."""
    outdir = tmp_path / preset
    args = [f'--preset={preset}', f'--outdir={outdir}', f'--data={shapes_zip}', f'--ref={shapes_zip}', '--dry-run',
            *flags]
    result = CliRunner().invoke(train.main, args)
    assert result.exit_code == 0, result.output
    run_dir, = [d for d in outdir.iterdir() if d.is_dir()]
    with open(run_dir / 'training_options.json') as f:
        return json.load(f)


def _sampler_family(options):
    """The few-step family the samplers give the preset's network (built on the meta device)."""
    kwargs = dict(options['network_kwargs'])
    with torch.device('meta'):
        net = dnnlib.util.construct_class_by_name(**kwargs, img_resolution=16, img_channels=3, label_dim=0)
    return samplers.few_step_family(net)


@pytest.mark.parametrize('preset', ['quickstart-scd', 'quickstart-tcm', 'quickstart-meanflow'])
def test_presets_use_the_quickstarts_data_and_scores(preset):
    flat = presets.merge(preset, {})
    quickstart = presets.merge('quickstart', {})
    for key in ('data', 'data_source', 'data_max_images', 'metrics_ref', 'metrics', 'metric_samples', 'precision'):
        assert flat[key] == quickstart[key], key
    for key in ('model_channels', 'channel_mult', 'num_blocks', 'attn_resolutions'):
        assert flat.network_kwargs[key] == quickstart.network_kwargs[key], key


def test_scd_preset_builds_from_the_quickstart_checkpoint(tmp_path, shapes_zip):
    options = _dry_run(tmp_path, shapes_zip, 'quickstart-scd')
    assert options['network_kwargs']['class_name'] == 'training.networks.trigflow.TrigFlowPrecond'
    method = options['method_kwargs']
    assert method['class_name'] == 'training.methods.scm.SCD'
    assert method['teacher'] == options['transfer'] == presets.QUICKSTART_CHECKPOINT
    assert options['grid_sampler'] == _sampler_family(options) == 'trigflow'
    mid_t, = options['mid_t']                                 # radians: the quickstart's 2-step σ = 0.5·tan(t)
    assert 0 < mid_t < math.pi / 2 and math.isclose(0.5 * math.tan(mid_t), presets.QUICKSTART_MID_T, rel_tol=1e-12)
    assert options['eval_init_metrics'] == ['fd_randnet', 'two_step_fd_randnet']


def test_tcm_preset_takes_the_quickstarts_ect_network_as_stage1(tmp_path, shapes_zip):
    stage1 = presets.QUICKSTART_CHECKPOINT   # any network of the quickstart's shape passes a dry run
    options = _dry_run(tmp_path, shapes_zip, 'quickstart-tcm', f'--stage1={stage1}')
    assert options['transfer'] == options['method_kwargs']['stage1'] == stage1
    assert options['network_kwargs']['class_name'] == 'training.networks.ECMPrecond'
    assert options['network_kwargs']['sigma_min'] == 0.0
    assert options['grid_sampler'] == _sampler_family(options) == 'consistency'
    assert options['mid_t'] == [presets.QUICKSTART_MID_T] and options['mid_t'][0] >= 1.0   # ≥ t′ = 1
    # The quickstart's snapshots are ECMPrecond with ECT's sigma_min: every tensor fits the stage-2 network
    # (sigma_min is a constructor argument, not a tensor), so TCM's frozen stage-1 copy accepts them.
    interface = dict(img_resolution=16, img_channels=3, label_dim=0)
    ect_kwargs = dict(presets.resolve('quickstart', {}).network_kwargs)
    ect = dnnlib.util.construct_class_by_name(**ect_kwargs, **interface)
    trained = dnnlib.util.construct_class_by_name(**options['network_kwargs'], **interface)
    frozen = tcm.frozen_stage1(trained, ect, 'quickstart snapshot')
    assert all(torch.equal(a, b) for a, b in zip(frozen.state_dict().values(), ect.state_dict().values()))
    assert checkpoint.transfer_weights(ect, trained).untouched == []


def test_meanflow_preset_builds_from_scratch(tmp_path, shapes_zip):
    options = _dry_run(tmp_path, shapes_zip, 'quickstart-meanflow')
    assert options['transfer'] is None
    assert options['network_kwargs']['class_name'] == 'training.networks.meanflow_unet.MeanFlowPrecond'
    assert options['method_kwargs']['class_name'] == 'training.methods.meanflow.MeanFlow'
    assert options['grid_sampler'] == _sampler_family(options) == 'meanflow'
    assert all(0 < t < 1 for t in options['mid_t'])

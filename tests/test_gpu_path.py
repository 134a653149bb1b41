"""The GPU path's pieces that can be tested on the CPU: --precision=auto, the fused optimiser choice and its
survival across resumes, the host-only flag exchange of the loop. (What needs CUDA is in bench/gpu_check.sh.)"""

import copy
import os

import pytest
import torch

from configs import presets
from multiprocess import free_port, run_ranks
from torch_utils import distributed as dist
from training.loop import runtime

CUDA = torch.device('cuda', 0)   # a device object only: nothing is allocated on it
CPU = torch.device('cpu')


@pytest.mark.parametrize('capability, expected', [((9, 0), 'bf16'), ((8, 0), 'bf16'), ((7, 5), 'fp32')])
def test_auto_precision_is_bf16_on_bf16_gpus_and_fp32_elsewhere(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: capability)
    assert runtime.resolve_precision('auto', CUDA) == expected
    assert runtime.resolve_precision('auto', CPU) == 'fp32'
    for explicit in ('fp32', 'tf32', 'bf16', 'fp16'):
        assert runtime.resolve_precision(explicit, CUDA) == runtime.resolve_precision(explicit, CPU) == explicit


def test_ect_presets_default_to_auto_and_the_quickstart_to_fp32():
    for name in ['cifar10-ecm', 'cifar10-ecm-1gpu-hour'] + [f'imagenet64-ecm-{s}' for s in presets.IMAGENET64_SIZES]:
        assert presets.resolve(name, dict(data='x')).precision == 'auto', name
    assert presets.resolve('quickstart', {}).precision == 'fp32'
    assert presets.resolve('cifar10-ecm', dict(data='x', precision='fp32')).precision == 'fp32'


def test_auto_on_the_cpu_trains_exactly_as_fp32(tmp_path):
    from test_training import final_weights, tiny_options
    from training.loop import training_loop as tl
    from conftest import write_random_dataset
    data = write_random_dataset(tmp_path / 'data', num_images=8)
    weights = []
    for precision in ('auto', 'fp32'):
        os.makedirs(tmp_path / precision)
        options = tiny_options(data, dropout=0.2).replace(total_kimg=0.008, precision=precision)
        assert tl.training_loop(options, str(tmp_path / precision)) == 'done'
        state, w = final_weights(tmp_path / precision)
        assert state['options']['precision'] == 'fp32'   # the resolved precision is what the run records
        weights.append(w)
    assert all(torch.equal(weights[0][name], value) for name, value in weights[1].items())


def test_fused_only_on_cuda_and_only_where_torch_has_it():
    for name in ('torch.optim.Adam', 'torch.optim.AdamW'):
        kwargs = dict(class_name=name, lr=1e-3, foreach=True)
        assert runtime.optimizer_kwargs_for(kwargs, CUDA) == dict(kwargs, foreach=False, fused=True)
        assert runtime.optimizer_kwargs_for(kwargs, CPU) == kwargs
        assert runtime.optimizer_kwargs_for(dict(kwargs, fused=False), CUDA) == dict(kwargs, fused=False)
    radam = dict(class_name='torch.optim.RAdam', lr=1e-4, foreach=True)   # no fused kernel in torch 2.13
    assert runtime.optimizer_kwargs_for(radam, CUDA) == radam
    plain = dict(class_name='torch.optim.Adam', lr=1e-3)                 # no foreach asked for: left alone
    assert runtime.optimizer_kwargs_for(plain, CUDA) == plain


def _steps(optimizer, params, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        optimizer.step()


@pytest.mark.parametrize('saved, loaded', [(dict(foreach=True), dict(fused=True)),
                                           (dict(fused=True), dict(foreach=True))])
def test_states_move_between_fused_and_foreach_optimisers(saved, loaded):
    """A state saved by one implementation continues under the other (torch's CPU fused Adam stands in for CUDA's):
    the loading run's flags are kept, not the saved ones, and the steps continue the saved trajectory."""
    start = [torch.nn.Parameter(torch.randn(5, 3, generator=torch.Generator().manual_seed(i))) for i in range(2)]
    params = [p.detach().clone().requires_grad_(True) for p in start]
    first = torch.optim.Adam(params, lr=1e-2, **saved)
    _steps(first, params, 3, seed=0)
    saved_state = copy.deepcopy(first.state_dict())   # loading may alias step tensors: each load gets a copy
    reference = [p.detach().clone().requires_grad_(True) for p in params]
    continued = torch.optim.Adam(reference, lr=1e-2, **saved)
    continued.load_state_dict(copy.deepcopy(saved_state))
    _steps(continued, reference, 2, seed=1)
    resumed_params = [p.detach().clone().requires_grad_(True) for p in params]
    resumed = torch.optim.Adam(resumed_params, lr=1e-2, **loaded)
    implementation = [{key: g.get(key) for key in runtime.IMPLEMENTATION_KEYS} for g in resumed.param_groups]
    resumed.load_state_dict(copy.deepcopy(saved_state))
    runtime.restore_optimizer_implementation(resumed, implementation)
    assert all(bool(g.get('fused')) == bool(loaded.get('fused')) for g in resumed.param_groups)
    assert all(bool(g.get('foreach')) == bool(loaded.get('foreach')) for g in resumed.param_groups)
    assert all(resumed.state[p]['step'].dtype == torch.float32 and resumed.state[p]['step'].item() == 3
               for p in resumed_params)
    _steps(resumed, resumed_params, 2, seed=1)
    for a, b, before in zip(resumed_params, reference, params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert not torch.equal(a, before)


def _flag_worker(rank, port, out):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.distributed.init_process_group('gloo', rank=rank, world_size=2)
    try:
        group = torch.distributed.new_group(backend='gloo')
        results = [runtime.agree_any(rank == 1, False, group=group), runtime.agree_any(rank == 0, rank == 1),
                   dist.all_reduce_sum(torch.tensor([rank + 1.0]), group=group).item()]
        torch.save(results, os.path.join(out, f'flags{rank}.pt'))
    finally:
        torch.distributed.destroy_process_group()


def test_agree_any_over_a_host_group(tmp_path):
    run_ranks(_flag_worker, (free_port(), str(tmp_path)))
    for rank in range(2):
        assert torch.load(tmp_path / f'flags{rank}.pt') == [[True, False], [True, True], 3.0]
    assert dist.host_group() is None   # one process: nothing to agree over

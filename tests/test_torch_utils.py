"""torch_utils: distributed helpers, training statistics, RNG states, seeding, parameter utilities."""

import io
import json
import os
import random

import numpy as np
import pytest
import torch

import dnnlib
from multiprocess import free_port, run_ranks
from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils import training_stats

_TORCHRUN_VARS = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')

#----------------------------------------------------------------------------
# training_stats, single process.

def test_collector_mean_std_num_match_numpy():
    acc = training_stats.StatsAccumulator()
    rng = np.random.default_rng(0)
    a_parts = [rng.normal(size=shape) for shape in [(5,), (2, 3), ()]]
    b_parts = [rng.uniform(size=7)]
    for part in a_parts:
        assert training_stats.report('Loss/a', torch.as_tensor(part), accumulator=acc) is not None
    training_stats.report('Loss/b', b_parts[0], accumulator=acc)
    training_stats.report('Timing/x', 3.5, accumulator=acc)
    collector = training_stats.Collector(regex='Loss/.*', accumulator=acc)
    collector.update()
    a = np.concatenate([np.ravel(p) for p in a_parts])
    assert collector.names() == ['Loss/a', 'Loss/b']
    assert collector.num('Loss/a') == a.size
    assert collector.mean('Loss/a') == pytest.approx(a.mean(), rel=1e-12)
    assert collector.std('Loss/a') == pytest.approx(a.std(), rel=1e-10)
    stats = collector.as_dict()
    assert stats['Loss/b'].num == 7 and stats['Loss/b'].mean == pytest.approx(b_parts[0].mean(), rel=1e-12)
    assert stats['Loss/b'].std == pytest.approx(b_parts[0].std(), rel=1e-10)
    assert np.isnan(collector.mean('Timing/x')) and collector.num('Timing/x') == 0


def test_collector_update_spans_and_keep_previous():
    acc = training_stats.StatsAccumulator()
    keep = training_stats.Collector(accumulator=acc)
    fresh = training_stats.Collector(keep_previous=False, accumulator=acc)
    training_stats.report('x', torch.tensor([1.0, 2.0, 3.0]), accumulator=acc)
    training_stats.report('y', torch.tensor([10.0]), accumulator=acc)
    keep.update()
    fresh.update()
    training_stats.report('x', torch.tensor([7.0, 9.0]), accumulator=acc)
    keep.update()
    fresh.update()
    for collector in (keep, fresh):  # only the data since the previous update
        assert collector.num('x') == 2 and collector.mean('x') == pytest.approx(8.0)
        assert collector.std('x') == pytest.approx(1.0)
    assert keep.num('y') == 1 and keep.mean('y') == pytest.approx(10.0)
    assert fresh.num('y') == 0 and np.isnan(fresh.mean('y'))


def test_report0_single_process_reports_and_default_accumulator():
    name = 'test_torch_utils/report0'
    collector = training_stats.Collector(regex=name)
    training_stats.report0(name, torch.tensor([2.0, 4.0]))
    collector.update()
    assert collector.num(name) == 2 and collector.mean(name) == pytest.approx(3.0)


def test_collector_rejects_bad_regex():
    with pytest.raises(dnnlib.UserError):
        training_stats.Collector(regex='(')

#----------------------------------------------------------------------------
# distributed, single process.

def test_single_process_without_torchrun_env(monkeypatch):
    for name in _TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    dist.init()
    assert not dist.is_distributed()
    assert (dist.get_rank(), dist.get_world_size(), dist.get_local_rank()) == (0, 1, 0)
    dist.barrier()
    expected = torch.device('cuda', 0) if torch.cuda.is_available() else torch.device('cpu')
    assert dist.device() == expected
    x = torch.tensor([1.5, -2.0])
    assert torch.equal(dist.all_reduce_sum(x), x) and torch.equal(dist.all_reduce_mean(x), x)


def test_partial_torchrun_env_is_a_user_error(monkeypatch):
    for name in _TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv('RANK', '0')
    with pytest.raises(dnnlib.UserError, match='WORLD_SIZE'):
        dist.init()


def test_print0_prints_on_rank0(capsys):
    dist.print0('hello', 3)
    assert capsys.readouterr().out == 'hello 3\n'

#----------------------------------------------------------------------------
# Two processes over gloo.

class _BoundaryNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)

    def forward(self, x, sigma, class_labels=None, boundary=True):
        return self.lin(x)


def _gloo_worker(rank, world_size, port, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    from training.methods import loss as loss_lib
    dist.init()
    result = dict(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=dist.get_local_rank(),
                  distributed=dist.is_distributed())
    acc = training_stats.StatsAccumulator()
    values = torch.arange(3, dtype=torch.float64) + 10 * rank  # rank 0: 0 1 2, rank 1: 10 11 12
    training_stats.report('Loss/all', values, accumulator=acc)
    training_stats.report0('Loss/rank0', torch.tensor([5.0, 7.0]), accumulator=acc)
    if rank == 1:
        training_stats.report('Loss/only1', torch.tensor([4.0]), accumulator=acc)
    collector = training_stats.Collector(accumulator=acc)
    collector.update()
    result['stats'] = collector.as_dict()
    result['mean'] = float(dist.all_reduce_mean(torch.tensor([float(rank)]))[0])

    torch.manual_seed(0)
    net = _BoundaryNet()
    misc.check_ddp_consistency(net)
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    result['tuning_kwargs'] = loss_lib.tuning_kwargs(ddp)
    x = torch.full([2, 4], float(rank + 1))
    with misc.ddp_sync(ddp, False):
        ddp(x, None).sum().backward()
    result['grad_nosync'] = net.lin.weight.grad.flatten().tolist()
    net.zero_grad()
    with misc.ddp_sync(ddp, True):
        ddp(x, None).sum().backward()
    result['grad_sync'] = net.lin.weight.grad.flatten().tolist()
    with torch.no_grad():
        net.lin.bias.add_(rank)
    try:
        misc.check_ddp_consistency(net)
        result['inconsistency_detected'] = False
    except RuntimeError as e:
        result['inconsistency_detected'] = 'lin.bias' in str(e)
    dist.barrier()
    with dnnlib.util.atomic_write(os.path.join(out_dir, f'rank{rank}.json'), 'w') as f:
        json.dump(result, f)
    torch.distributed.destroy_process_group()


def test_two_process_gloo_stats_and_helpers(tmp_path):
    run_ranks(_gloo_worker, (2, free_port(), str(tmp_path)))
    results = [json.loads((tmp_path / f'rank{rank}.json').read_text()) for rank in range(2)]
    everything = np.array([0, 1, 2, 10, 11, 12], dtype=np.float64)
    for rank, result in enumerate(results):
        assert (result['rank'], result['world_size'], result['local_rank'], result['distributed']) == (rank, 2, rank, True)
        stats = result['stats']
        assert sorted(stats) == ['Loss/all', 'Loss/only1', 'Loss/rank0']
        assert stats['Loss/all']['num'] == 6
        assert stats['Loss/all']['mean'] == pytest.approx(everything.mean())
        assert stats['Loss/all']['std'] == pytest.approx(everything.std())
        assert stats['Loss/rank0']['num'] == 2 and stats['Loss/rank0']['mean'] == pytest.approx(6.0)
        assert stats['Loss/only1']['num'] == 1 and stats['Loss/only1']['mean'] == pytest.approx(4.0)
        assert result['mean'] == pytest.approx(0.5)
        assert result['tuning_kwargs'] == {'boundary': False}
        assert result['grad_nosync'] == pytest.approx([2.0 * (rank + 1)] * 4)  # own data only
        assert result['grad_sync'] == pytest.approx([3.0] * 4)                 # mean of 2 and 4
        assert result['inconsistency_detected'] == (rank == 1)

#----------------------------------------------------------------------------
# RNG states and seeding.

def _draw_all():
    return (random.random(), random.gauss(0, 1), float(np.random.standard_normal()), float(np.random.rand()),
            torch.randn(4).tolist())


def test_rng_states_round_trip_through_weights_only_save():
    random.gauss(0, 1)  # leave a cached Gaussian in Python's state
    np.random.standard_normal()  # and in NumPy's legacy state
    states = misc.get_rng_states()
    buffer = io.BytesIO()
    torch.save(states, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    expected = _draw_all()
    misc.set_rng_states(loaded)
    assert _draw_all() == expected
    misc.set_rng_states(states)
    assert _draw_all() == expected


def test_set_rng_states_rejects_malformed_record():
    with pytest.raises(dnnlib.UserError):
        misc.set_rng_states({'python': {}})


def test_set_seed_is_deterministic_and_rank_dependent():
    draws = []
    for seed, rank in [(0, 0), (0, 0), (0, 1), (1, 0)]:
        misc.set_seed(seed, rank)
        draws.append(_draw_all())
    assert draws[0] == draws[1]
    assert draws[0] != draws[2] and draws[0] != draws[3] and draws[2] != draws[3]
    for part in zip(*draws[1:]):  # every generator is seeded, not just one
        assert part[0] != part[1] and part[0] != part[2]

#----------------------------------------------------------------------------
# Parameters, buffers, summaries.

def _small_net():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 4 * 4, 2))


def test_copy_params_and_buffers():
    torch.manual_seed(0)
    src, dst = _small_net(), _small_net()
    with torch.no_grad():
        src[1].running_mean.add_(1.0)
    misc.copy_params_and_buffers(src, dst, require_all=True)
    for (name, a), (_, b) in zip(misc.named_params_and_buffers(src), misc.named_params_and_buffers(dst)):
        assert torch.equal(a, b), name
    assert [n for n, _ in misc.named_params_and_buffers(src)] == \
        [n for n, _ in src.named_parameters()] + [n for n, _ in src.named_buffers()]


def test_copy_params_and_buffers_missing_and_mismatch():
    src = torch.nn.Sequential(torch.nn.Linear(3, 2))
    dst = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    before = dst[1].weight.detach().clone()
    misc.copy_params_and_buffers(src, dst)
    assert torch.equal(dst[0].weight, src[0].weight) and torch.equal(dst[1].weight, before)
    with pytest.raises(dnnlib.UserError, match='1.weight'):
        misc.copy_params_and_buffers(src, dst, require_all=True)
    with pytest.raises(dnnlib.UserError, match='0.weight'):
        misc.copy_params_and_buffers(torch.nn.Sequential(torch.nn.Linear(5, 2)), src)


def test_print_module_summary_counts_and_shapes(capsys):
    net = _small_net().eval()
    x = torch.randn(2, 3, 4, 4)
    out = misc.print_module_summary(net, [x])
    assert torch.equal(out, net(x))
    text = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.strip()}
    assert rows['0'][1] == str(3 * 4 * 9 + 4) and rows['0'][3:7] == ['[2,', '4,', '4,', '4]']
    assert rows['1'][1] == '8' and rows['1'][2] == str(4 + 4 + 1)
    assert rows['3'][1] == str(64 * 2 + 2) and rows['3'][-1] == 'float32'
    total_params = sum(p.numel() for p in net.parameters())
    assert rows['Total'][1:3] == [str(total_params), '9']


def test_ddp_sync_on_plain_module_is_transparent():
    net = torch.nn.Linear(2, 1)
    with misc.ddp_sync(net, False):
        net(torch.ones(1, 2)).sum().backward()
    assert torch.equal(net.weight.grad, torch.ones(1, 2))


def test_prefetch_hands_out_in_order_runs_ahead_by_depth_and_raises_in_place():
    import threading
    started, handed = [], []
    main_thread = threading.get_ident()

    def work(item):
        assert threading.get_ident() != main_thread                      # off the consumer's thread
        started.append(item)
        if item == 7:
            raise ValueError('item 7')
        return item * item

    results = misc.prefetch(work, range(10), depth=2)
    for expected in range(7):
        value = next(results)
        handed.append(value)
        assert value == expected * expected
        assert max(started) <= expected + 2          # never more than `depth` items ahead of what was handed out
    with pytest.raises(ValueError, match='item 7'):
        next(results)
    assert handed == [i * i for i in range(7)]
    assert list(misc.prefetch(work, [], depth=2)) == []

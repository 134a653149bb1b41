"""CUDA-only behaviour emulated on the CPU build (issue 22): per-rank CUDA noise streams, RNG states across
visible-device counts, per-process GPUs, the device-to-host copy event, and generate.py's one-file outputs
under torchrun. Each test says why its emulation stands for the GPU behaviour."""

import inspect
import os

import numpy as np
import pytest
import torch

import dnnlib
import generate
from multiprocess import free_port, run_ranks
from test_generate import snapshot  # noqa: F401 (fixtures)
from test_samplers import ecm_net  # noqa: F401
from test_training import data_dir, tiny_options  # noqa: F401
from torch_utils import distributed as dist
from torch_utils import misc
from training.checkpoints import checkpoint
from training.sampling import generation
from training.loop import training_loop as tl
from training.loop.callbacks import Callback


def queued_cuda_seed():
    """The seed every CUDA generator of this process would start from. On a build without CUDA,
    torch.manual_seed(s) queues torch.cuda.manual_seed_all(s) (torch/cuda/random.py: a closure over `seed`) on
    torch.cuda's lazy seed tracker, which replays it when CUDA initialises; on a GPU the same call seeds the
    generators at once. Reading the latest queued call is reading what a GPU run's generators hold."""
    calls = [call for call in torch.cuda._lazy_seed_tracker.get_calls() if call is not None]
    return inspect.getclosurevars(calls[-1][0]).nonlocals['seed']


def _fresh_run_worker(rank, port, data, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE='2', LOCAL_RANK=str(rank), MASTER_ADDR='127.0.0.1',
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init()
    try:
        tl.Trainer(tiny_options(data, seed=7), os.path.join(out, f'run{rank}'))
        torch.save(queued_cuda_seed(), os.path.join(out, f'seed{rank}.pt'))
    finally:
        torch.distributed.destroy_process_group()


def test_every_rank_of_a_fresh_run_has_its_own_cuda_stream(data_dir, tmp_path):
    """Two processes build the real Trainer: each rank's CUDA generators start from rank_seed(seed, rank), the
    rule of its CPU stream (building the network used to reseed every CUDA generator with the plain seed)."""
    run_ranks(_fresh_run_worker, (free_port(), data_dir, str(tmp_path)))
    seeds = [torch.load(tmp_path / f'seed{rank}.pt') for rank in range(2)]
    assert seeds == [misc.rank_seed(7, 0), misc.rank_seed(7, 1)]
    assert seeds[0] != seeds[1]


def test_a_resumed_run_reseeds_its_cuda_stream_by_the_same_rule():
    """A state written by another number of processes is continued from rank_seed(seed + images seen, rank), the
    CPU streams' rule, on the CUDA generators too."""
    states = misc.get_rng_states(torch.device('cpu'))
    checkpoint._restore_rng([states, states], seed=7, cur_nimg=96)
    assert queued_cuda_seed() == misc.rank_seed(7 + 96, 0)


class FakeCudaGenerators:
    """The CUDA generator API of torch.cuda (state per visible device) over plain tensors, for a CPU build."""

    def __init__(self, monkeypatch, count):
        self.states = {i: torch.full([4], 10 + i, dtype=torch.uint8) for i in range(count)}
        monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
        monkeypatch.setattr(torch.cuda, 'device_count', lambda: len(self.states))
        monkeypatch.setattr(torch.cuda, 'get_rng_state', lambda device='cuda': self.states[self._index(device)].clone())
        monkeypatch.setattr(torch.cuda, 'set_rng_state', self.set)
        monkeypatch.setattr(torch.cuda, 'get_rng_state_all', lambda: [self.states[i].clone() for i in self.states])
        monkeypatch.setattr(torch.cuda, 'set_rng_state_all', lambda states: [self.set(s, i) for i, s in enumerate(states)])

    @staticmethod
    def _index(device):
        device = torch.device(device)
        return device.index or 0

    def set(self, state, device='cuda'):
        self.states[self._index(device)] = state.clone()


def test_rng_states_move_to_a_process_that_sees_another_number_of_gpus(monkeypatch):
    """Saved by rank 1 of a node where every process saw both GPUs (it drew from cuda:1), resumed where each
    process sees only its own GPU (cuda:0): the state of the generator the rank drew from lands on the one it
    draws from now (saving every visible device's state made such a resume a refusal)."""
    saving = FakeCudaGenerators(monkeypatch, 2)
    saved = misc.get_rng_states(torch.device('cuda', 1))
    resuming = FakeCudaGenerators(monkeypatch, 1)
    assert misc.set_rng_states(saved, torch.device('cuda', 0))
    assert torch.equal(resuming.states[0], saving.states[1])


def test_rng_states_of_older_versions_hold_every_device(monkeypatch):
    """Records written before hold torch.cuda.get_rng_state_all(): the entry of the rank's device is used."""
    fake = FakeCudaGenerators(monkeypatch, 2)
    old = dict(misc.get_rng_states(torch.device('cpu')), cuda=[torch.full([4], 1, dtype=torch.uint8),
                                                               torch.full([4], 2, dtype=torch.uint8)])
    misc.set_rng_states(old, torch.device('cuda', 1))
    assert fake.states[1].tolist() == [2] * 4
    with pytest.raises(dnnlib.UserError, match='2 CUDA devices.*cuda:2'):
        misc.set_rng_states(old, torch.device('cuda', 2))


def test_a_cpu_state_resumed_on_a_gpu_seeds_the_gpu_by_the_rule(monkeypatch):
    FakeCudaGenerators(monkeypatch, 1)
    monkeypatch.setattr(dist, 'device', lambda: torch.device('cuda', 0))
    states = misc.get_rng_states(torch.device('cpu'))
    assert not misc.set_rng_states(states, torch.device('cuda', 0))
    checkpoint._restore_rng([states], seed=3, cur_nimg=40)
    assert queued_cuda_seed() == misc.rank_seed(3 + 40, 0)


def _torchrun_env(monkeypatch, rank, local_rank, world_size, visible=None):
    env = dict(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank), MASTER_ADDR='127.0.0.1',
               MASTER_PORT='29500')
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if visible is None:
        monkeypatch.delenv('CUDA_VISIBLE_DEVICES', raising=False)
    else:
        monkeypatch.setenv('CUDA_VISIBLE_DEVICES', visible)


def test_a_launcher_giving_each_process_one_gpu_is_accepted(monkeypatch):
    """SLURM's --gpus-per-task=1 (CUDA_VISIBLE_DEVICES per process): LOCAL_RANK 3 sees one GPU, cuda:0, and
    joins NCCL on it. torch.cuda and init_process_group are recorded (no GPU here); the group is not formed."""
    FakeCudaGenerators(monkeypatch, 1)
    calls = []
    monkeypatch.setattr(torch.cuda, 'set_device', lambda index: calls.append(('set_device', index)))
    monkeypatch.setattr(torch.distributed, 'init_process_group', lambda backend, **kw: calls.append(('init', backend)))
    monkeypatch.setattr(dist, 'host_group', lambda: None)
    monkeypatch.setattr(dist, 'check_distinct_devices', lambda group: calls.append(('distinct', group)))
    _torchrun_env(monkeypatch, rank=3, local_rank=3, world_size=4, visible='3')
    dist.init()
    assert calls == [('set_device', 0), ('init', 'nccl'), ('distinct', None)]
    assert dist.cuda_index(3) == 0
    _torchrun_env(monkeypatch, rank=3, local_rank=3, world_size=4)   # one GPU visible, nothing says why
    with pytest.raises(dnnlib.UserError, match='LOCAL_RANK=3 but only 1 CUDA devices'):
        dist.cuda_index(3)


def test_two_ranks_on_one_gpu_are_refused_in_one_line(monkeypatch):
    """All ranks' (host, GPU uuid) are gathered: a repeat is a UserError instead of an NCCL failure later."""
    monkeypatch.setattr(torch.cuda, 'current_device', lambda: 0)
    monkeypatch.setattr(torch.cuda, 'get_device_properties', lambda index: type('P', (), dict(uuid='GPU-1'))())
    monkeypatch.setattr(dist, 'get_world_size', lambda: 2)
    for others, refused in [(('node', 'GPU-1'), True), (('node', 'GPU-2'), False), (('other', 'GPU-1'), False)]:
        def gather(out, mine, group=None, others=others):
            out[:] = [mine, others]
        monkeypatch.setattr(torch.distributed, 'all_gather_object', gather)
        monkeypatch.setattr(dist.socket, 'gethostname', lambda: 'node')
        if refused:
            with pytest.raises(dnnlib.UserError, match='several processes drive the same GPU'):
                dist.check_distinct_devices(None)
        else:
            dist.check_distinct_devices(None)


def test_the_copy_event_is_recorded_on_the_images_device(monkeypatch):
    """generate.py --device=cuda:1 without set_device: the device-to-host copy is queued on cuda:1's stream, so
    the event that says it finished must be recorded there, not on the current device's (cuda:0) stream.
    torch.cuda's streams and events are recorded; the batch stands in for a cuda:1 tensor."""
    log = []

    class Batch:
        device, shape, dtype = torch.device('cuda', 1), (2, 4), torch.uint8

    class Host:
        def copy_(self, images, non_blocking=False):
            log.append(('copy', images.device.index))

        def numpy(self):
            return np.zeros(Batch.shape, np.uint8)

    class Event:
        def record(self, stream=None):
            log.append(('record', stream))

        def synchronize(self):
            log.append(('wait',))

    monkeypatch.setattr(torch, 'empty', lambda *args, **kwargs: Host())
    monkeypatch.setattr(torch.cuda, 'Event', Event)
    monkeypatch.setattr(torch.cuda, 'current_device', lambda: 0)
    monkeypatch.setattr(torch.cuda, 'current_stream', lambda device=None: f'stream of cuda:{torch.device(device).index}')
    assert [seeds for seeds, _ in generation.host_batches([([0, 1], Batch())])] == [[0, 1]]
    assert log == [('copy', 1), ('record', 'stream of cuda:1'), ('wait',)]


def _generate_worker(rank, port, network, out, counts):
    os.environ.update(RANK=str(rank), WORLD_SIZE='2', LOCAL_RANK=str(rank), MASTER_ADDR='127.0.0.1',
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    sampled = []
    generate.generate_batches = lambda *args, _next=generate.generate_batches, **kwargs: (
        sampled.append(b[0]) or b for b in _next(*args, **kwargs))
    try:
        generate.main(['--device=cpu', f'--network={network}', f'--outdir={out}', '--seeds=0-9', '--batch=2',
                       '--grid', f'--npz={out}/samples.npz', '--no-progress'])
    except SystemExit as e:
        assert e.code in (0, None)
    finally:
        torch.save(sampled, os.path.join(counts, f'sampled{rank}.pt'))
        if dist.is_distributed():
            torch.distributed.destroy_process_group()


def test_one_file_outputs_are_sampled_by_every_rank(snapshot, tmp_path, capsys):
    """generate.py --grid --npz under torchrun (2 gloo processes): each rank samples its share (rank 0 used to
    sample every seed while the others waited in a collective: NCCL's watchdog kills such a wait after 10 minutes),
    and rank 0's files equal one process's, byte for byte."""
    run_ranks(_generate_worker, (free_port(), snapshot, str(tmp_path / 'two'), str(tmp_path)))
    sampled = [torch.load(tmp_path / f'sampled{rank}.pt') for rank in range(2)]
    assert sampled == [[[0, 1], [4, 5], [8]], [[2, 3], [6, 7], [9]]]
    _run_single(snapshot, tmp_path / 'one')
    assert (tmp_path / 'two' / 'grid.png').read_bytes() == (tmp_path / 'one' / 'grid.png').read_bytes()
    two, one = np.load(tmp_path / 'two' / 'samples.npz'), np.load(tmp_path / 'one' / 'samples.npz')
    assert two.files == one.files and all(np.array_equal(two[k], one[k]) for k in one.files)
    assert len(one['arr_0']) == 10


def _run_single(network, out):
    with pytest.raises(SystemExit) as e:
        generate.main(['--device=cpu', f'--network={network}', f'--outdir={out}', '--seeds=0-9', '--batch=2', '--grid',
                       f'--npz={out}/samples.npz', '--no-progress'])
    assert e.value.code == 0


def test_rank0s_files_are_waited_for_on_the_host_before_any_collective(data_dir, tmp_path, monkeypatch):
    """Rank 0 alone writes snapshots and the training state; the callbacks (metrics) and the tick statistics that
    follow are collectives on the default group, NCCL's on GPUs, whose watchdog kills a wait of 10 minutes. The
    other ranks must therefore wait for those files at a host (gloo) barrier first: the order of the calls shows it
    (a gloo run cannot time out the way NCCL does, so the order is what the CPU can check)."""
    log = []
    trainer = tl.Trainer(tiny_options(data_dir, snap_ticks=1, dump_ticks=1), str(tmp_path))
    monkeypatch.setattr(tl.run_files, 'save_snapshots', lambda *args: log.append('snapshots'))
    monkeypatch.setattr(tl.dist, 'barrier', lambda group=None: log.append('host barrier'))
    monkeypatch.setattr(trainer, 'write_state', lambda: log.append('state'))

    class Recorder(Callback):
        def on_tick(self, run_ctx, stopping):
            log.append('callback')
    trainer.callbacks = [Recorder()]
    trainer.maintenance(stopping=True)
    assert log == ['snapshots', 'host barrier', 'callback', 'state', 'host barrier']


def test_a_cached_statistics_file_is_used_only_when_every_rank_sees_it(tmp_path, monkeypatch):
    """A node-local cache seen by rank 0 only: rank 0 would read it while rank 1 computes the statistics, whose
    all-reduces then pair with rank 0's generated-image ones. Another rank missing the file is emulated by the
    all-reduce adding its 1."""
    from metrics import metric_main
    cache = tmp_path / 'stats.npz'
    cache.write_bytes(b'x')
    assert metric_main._on_every_rank(str(cache))
    monkeypatch.setattr(dist, 'all_reduce_sum', lambda tensor, group=None: tensor + 1)
    assert not metric_main._on_every_rank(str(cache))


def test_a_device_index_under_torchrun_must_be_the_processs_own(monkeypatch):
    """Under torchrun --device=cuda:0 would put every rank's network on GPU 0 while its collectives run on its own."""
    FakeCudaGenerators(monkeypatch, 2)
    monkeypatch.setattr(dist, 'is_distributed', lambda: True)
    monkeypatch.setenv('LOCAL_RANK', '1')
    assert dist.resolve_device('cuda:1') == torch.device('cuda', 1)
    assert dist.resolve_device('cuda') == torch.device('cuda')
    with pytest.raises(dnnlib.UserError, match='--device=cuda:0: under torchrun each process uses its own GPU'):
        dist.resolve_device('cuda:0')

"""The run-time pieces of a training run: seeding, batch split, data, the trained network, DDP, pre-emption.

Each is a small function the training loop (training/loop/training_loop.py) calls once; train.py uses the checks
(check_batch, build_dataset, check_transfer_compatible) to validate a run before it starts.
"""

import contextlib
import inspect
import signal
import threading

import torch

import dnnlib
from torch_utils import cpu_memory
from torch_utils import distributed as dist
from torch_utils import misc
from training.checkpoints import checkpoint
from training.checkpoints import reader
from training.data import device_data
from training.data.dataset import InfiniteSampler


def setup_runtime(seed, precision):
    """Seed this rank and set the matmul precision switches; returns the device."""
    misc.set_seed(seed, dist.get_rank())
    allow_tf32 = precision == 'tf32'
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32
    torch.backends.cudnn.benchmark = True
    device = dist.device()
    if device.type == 'cpu':
        cpu_memory.retain_freed_memory()   # no page faults for the step's recurring allocations
    return device


def resolve_precision(precision, device):
    """The arithmetic of a run: 'auto' is bf16 autocast on a CUDA device with native bf16 (compute capability 8.0
    or newer: A100, H100, ...), fp32 anywhere else (the CPU: bit-identical to --precision=fp32); other values
    are kept."""
    if precision != 'auto':
        return precision
    if device.type == 'cuda' and torch.cuda.get_device_capability(device) >= (8, 0):
        return 'bf16'
    return 'fp32'


def optimizer_kwargs_for(optimizer_kwargs, device):
    """The optimiser's kwargs on `device`: on CUDA an optimiser asked for foreach=True runs its fused kernel
    instead where it has one (Adam and AdamW in torch 2.13; RAdam has none and keeps foreach). Fused steps under
    the fp16 GradScaler skip overflowing steps on the device, without a host sync. The CPU path is unchanged."""
    kwargs = dict(optimizer_kwargs)
    optimizer_class = dnnlib.util.get_obj_by_name(kwargs['class_name'])
    if device.type == 'cuda' and kwargs.get('foreach') and 'fused' not in kwargs \
            and 'fused' in inspect.signature(optimizer_class).parameters:
        kwargs.update(foreach=False, fused=True)
    return kwargs


IMPLEMENTATION_KEYS = ('foreach', 'fused', 'capturable')


def restore_optimizer_implementation(optimizer, implementation):
    """After optimizer.load_state_dict: the implementation flags this run chose (`implementation`: one dict of
    IMPLEMENTATION_KEYS per parameter group, taken before loading), since loading brings back those of the run
    that saved the state; the step counters are moved where that implementation keeps them (fused and
    capturable: float32 on the parameter's device; otherwise on the CPU). Old states load on any device."""
    for group, flags in zip(optimizer.param_groups, implementation):
        group.update(flags)
        on_device = bool(flags.get('fused') or flags.get('capturable'))
        for param in group['params']:
            state = optimizer.state.get(param, {})
            if torch.is_tensor(state.get('step')):
                state['step'] = state['step'].to(device=param.device if on_device else 'cpu', dtype=torch.float32)


def check_batch(batch_size, batch_gpu, world_size):
    """(batch_gpu, rounds): micro-batch size per rank and accumulation rounds; one UserError if inconsistent."""
    if batch_size <= 0 or (batch_gpu is not None and batch_gpu <= 0):
        raise dnnlib.UserError(f'--batch/--batch-gpu: must be positive, got {batch_size}/{batch_gpu}')
    if batch_size % world_size != 0:
        raise dnnlib.UserError(f'--batch: {batch_size} is not divisible by the number of processes {world_size}')
    per_rank = batch_size // world_size
    batch_gpu = per_rank if batch_gpu is None or batch_gpu > per_rank else batch_gpu
    if per_rank % batch_gpu != 0:
        raise dnnlib.UserError(f'--batch/--batch-gpu: batch {batch_size} is not divisible by processes '
                               f'({world_size}) x batch-gpu ({batch_gpu})')
    return batch_gpu, per_rank // batch_gpu


def build_dataset(dataset_kwargs):
    return dnnlib.util.construct_class_by_name(**dataset_kwargs)


def build_data_iterator(dataset, data_loader_kwargs, batch_gpu, seed, start_nimg, device, data_on_device=False,
                        rank=None, num_replicas=None):
    """Endless iterator of (uint8 images, labels) micro-batches continuing at global image `start_nimg`, for this
    rank (or `rank` of `num_replicas`): from a DataLoader, or with `data_on_device` gathered on the device from
    the whole dataset held there (training.data.device_data; the same batches, no workers)."""
    rank = dist.get_rank() if rank is None else rank
    num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
    sampler = InfiniteSampler(len(dataset), rank=rank, num_replicas=num_replicas, seed=seed, start_index=start_nimg)
    if data_on_device:
        return device_data.device_batches(device_data.DeviceDataset(dataset, device), sampler, batch_gpu)
    kwargs = dict(data_loader_kwargs)
    if kwargs.get('num_workers', 0) == 0:
        kwargs.pop('prefetch_factor', None)
    kwargs['pin_memory'] = kwargs.get('pin_memory', False) and device.type == 'cuda'
    # A private generator: creating the iterator must not consume the global RNG (exact resume).
    loader = torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=batch_gpu,
                                         generator=torch.Generator().manual_seed(seed), **kwargs)
    return iter(loader)


def check_transfer_compatible(src_net, dataset, name):
    """UserError when a transferred network does not fit the data (resolution, channels, labels)."""
    want = dict(img_resolution=dataset.resolution, img_channels=dataset.num_channels, label_dim=dataset.label_dim)
    have = {key: getattr(src_net, key, None) for key in want}
    if have != want:
        raise dnnlib.UserError(f'--transfer: {name} is a network for {have} but the data (--data/--cond) gives {want}')


def load_transfer_source(transfer, network_kwargs, resolution):
    """The --transfer network from any network file; an openai state dict (edm_*.pt, ...) is read at the data's
    `resolution`, with the trained network's parameterization and attention head width."""
    net, _ = reader.load_network(transfer, resolution=resolution,
                                             parameterization=network_kwargs.get('parameterization', 'edm'),
                                             num_head_channels=network_kwargs.get('channels_per_head', 64))
    return net


def build_network(network_kwargs, dataset, transfer, device, seed=0):
    """The trained network (train mode), initialised from `transfer` (docs/ECT.md §2) when given.

    The random initialisation uses its own seed, identical on every rank (so the EMA copies made before DDP
    broadcasts rank 0's weights agree too), without touching the per-rank RNG streams: the network is built on
    the CPU, so only the CPU generator is seeded (torch.manual_seed would also seed every CUDA generator, which
    fork_rng(devices=[]) does not restore, and every rank would then draw the same CUDA noise).
    """
    interface = dict(img_resolution=dataset.resolution, img_channels=dataset.num_channels, label_dim=dataset.label_dim)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        net = dnnlib.util.construct_class_by_name(**network_kwargs, **interface)
    if transfer is not None:
        src = load_transfer_source(transfer, network_kwargs, dataset.resolution)
        check_transfer_compatible(src, dataset, transfer)
        report = checkpoint.transfer_weights(src, net)
        dist.print0(f'Transfer from {transfer}: {report.summary()}')
    if hasattr(net, 'normalize_weights_'):
        # EDM2 forced weight normalisation precedes every training forward in EDM2; once here and then after
        # every optimiser step (optimizer_step) gives each step the same weights EDM2's would see.
        net.normalize_weights_()
    return net.train().requires_grad_(True).to(device)


def wrap_ddp(net, device, find_unused_parameters):
    """DDP around `net` when there are several processes (the net itself otherwise)."""
    if dist.get_world_size() == 1:
        return net
    ddp_class = torch.nn.parallel.DistributedDataParallel
    # Buffers (fixed resampling filters) are never trained: no per-forward sync (the option's newer name first).
    no_buffer_sync = 'forward_sync_buffers' if 'forward_sync_buffers' in inspect.signature(ddp_class).parameters \
        else 'broadcast_buffers'
    return ddp_class(net, device_ids=[device] if device.type == 'cuda' else None,
                     find_unused_parameters=find_unused_parameters, **{no_buffer_sync: False})


class PreemptionHandler:
    """Turns SIGTERM/SIGUSR1 (cluster pre-emption) into a flag the loop reads at the next step boundary."""

    def __init__(self,
                 signums=(signal.SIGTERM, signal.SIGUSR1),   # signals that request a state dump and exit
                 ):
        self.signums = tuple(signums)
        self.received = None
        self._previous = {}

    def __call__(self, signum, frame):
        self.received = signum

    @property
    def requested(self):
        return self.received is not None

    @contextlib.contextmanager
    def installed(self):
        """Install the handler for the duration of the block (only possible from the main thread)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        self._previous = {s: signal.signal(s, self) for s in self.signums}
        try:
            yield self
        finally:
            for s, handler in self._previous.items():
                signal.signal(s, handler)


def agree_any(*flags, group=None):
    """The flags OR-ed over all ranks (one tiny all-reduce of host memory when distributed: over `group`, a
    dist.host_group(), else the default group), so every rank stops together."""
    local = torch.tensor([float(bool(f)) for f in flags])
    return [bool(v > 0) for v in dist.all_reduce_sum(local, group=group).tolist()]

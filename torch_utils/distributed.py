"""Process-group setup and rank helpers for single-process and torchrun (multi-process) training.

Launched by torchrun, the environment carries RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT and
`init()` joins the process group (NCCL when CUDA is available, else gloo). Launched as a plain script there
is no such environment: `init()` creates no process group and every helper answers for a single process
(rank 0 of 1, barrier a no-op). All state lives in `torch.distributed` itself; nothing here is cached.
"""

import datetime
import os
import socket

import torch
import torch.distributed

import dnnlib

_TORCHRUN_VARS = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')

# How long a rank waits on the host for the others (host_group, gloo's default group): rank 0 alone building a
# dataset, writing and checksumming a large training state or a 50k-image npz may take longer than NCCL's
# 10-minute watchdog allows a collective; a host wait has no watchdog, only this limit.
HOST_WAIT = datetime.timedelta(hours=2)


def _launched_by_torchrun():
    present = [name for name in _TORCHRUN_VARS if name in os.environ]
    if present and len(present) != len(_TORCHRUN_VARS):
        missing = [name for name in _TORCHRUN_VARS if name not in os.environ]
        raise dnnlib.UserError(f'environment: {", ".join(present)} set but {", ".join(missing)} missing '
                               f'(launch with torchrun, or unset them for a single process)')
    return bool(present)


def _env_int(name):
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise dnnlib.UserError(f'environment: {name}="{value}" is not an integer') from None


def is_distributed():
    """True when a process group is initialised (so collectives are needed)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def cuda_index(local_rank):
    """The visible CUDA device of the process with `local_rank`: device LOCAL_RANK when the node's GPUs are all
    visible, device 0 when the launcher gave each process its own single GPU (CUDA_VISIBLE_DEVICES set per
    process, as SLURM's --gpus-per-task=1 does); any other combination is a UserError."""
    count = torch.cuda.device_count()
    if local_rank < count:
        return local_rank
    if count == 1 and os.environ.get('CUDA_VISIBLE_DEVICES'):
        return 0
    raise dnnlib.UserError(f'environment: LOCAL_RANK={local_rank} but only {count} CUDA devices are visible '
                           f'(CUDA_VISIBLE_DEVICES={os.environ.get("CUDA_VISIBLE_DEVICES")!r})')


def init():
    """Join the torchrun process group if launched by torchrun; otherwise run as a single process."""
    if is_distributed() or not _launched_by_torchrun():
        return
    rank, world_size, local_rank = _env_int('RANK'), _env_int('WORLD_SIZE'), _env_int('LOCAL_RANK')
    if not 0 <= rank < world_size:
        raise dnnlib.UserError(f'environment: RANK={rank} is not in [0, WORLD_SIZE={world_size})')
    if not torch.cuda.is_available():
        torch.distributed.init_process_group(backend='gloo', init_method='env://', rank=rank, world_size=world_size,
                                             timeout=HOST_WAIT)
        return
    torch.cuda.set_device(cuda_index(local_rank))
    torch.distributed.init_process_group(backend='nccl', init_method='env://', rank=rank, world_size=world_size)
    check_distinct_devices(host_group())


def check_distinct_devices(group):
    """UserError unless every rank drives its own GPU (two ranks on one device would fail deep inside NCCL)."""
    index = torch.cuda.current_device()
    mine = (socket.gethostname(), str(torch.cuda.get_device_properties(index).uuid))
    everyone = [None] * get_world_size()
    torch.distributed.all_gather_object(everyone, mine, group=group)
    if len(set(everyone)) != len(everyone):
        raise dnnlib.UserError(f'environment: several processes drive the same GPU (rank {get_rank()} on '
                               f'cuda:{index} of {mine[0]}); give each process its own device')


def host_group():
    """A process group whose collectives run in host memory with the HOST_WAIT limit: under NCCL a new gloo group
    (created by every rank together: call it on every rank, once, and keep it); None (the default group, gloo
    already) for a gloo run or a single process."""
    if not is_distributed() or torch.distributed.get_backend() == 'gloo':
        return None
    return torch.distributed.new_group(backend='gloo', timeout=HOST_WAIT)


def get_rank():
    return torch.distributed.get_rank() if is_distributed() else 0


def get_world_size():
    return torch.distributed.get_world_size() if is_distributed() else 1


def get_local_rank():
    """Index of this process on its node (torchrun's LOCAL_RANK); 0 for a single process."""
    return int(os.environ.get('LOCAL_RANK', '0')) if is_distributed() else 0


def device():
    """The device this process trains on: its CUDA device (cuda_index) when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device('cuda', cuda_index(get_local_rank()))
    return torch.device('cpu')


def collective_device():
    """The device tensors must live on for collectives of the current backend (CUDA for NCCL)."""
    if is_distributed() and torch.distributed.get_backend() == 'nccl':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def barrier(group=None):
    """Wait for every rank of `group` (None = the default group; pass a host_group() where one rank may work
    alone for long, so the others wait on the host instead of in an NCCL collective)."""
    if is_distributed():
        torch.distributed.barrier(group=group)


def gather_to_rank0(obj, group=None):
    """The list of every rank's picklable `obj` on rank 0 (in rank order), None on the others; over `group` (a
    host_group() moves large objects through host memory instead of the GPU)."""
    if not is_distributed():
        return [obj]
    gathered = [None] * get_world_size() if get_rank() == 0 else None
    torch.distributed.gather_object(obj, gathered, dst=0, group=group)
    return gathered


def all_reduce_sum(tensor, group=None):
    """Sum `tensor` over all ranks of `group` (None = the default group; a gloo group of an NCCL run reduces in
    host memory); returns a new tensor on the tensor's own device (a copy when alone)."""
    on_host = group is not None and torch.distributed.get_backend(group) != 'nccl'
    result = tensor.detach().to('cpu' if on_host else collective_device(), copy=True)
    if is_distributed():
        torch.distributed.all_reduce(result, op=torch.distributed.ReduceOp.SUM, group=group)
    return result.to(tensor.device)


def all_reduce_mean(tensor):
    """Mean of `tensor` over all ranks (floating point)."""
    return all_reduce_sum(tensor) / get_world_size()


def print0(*args, **kwargs):
    """print() on rank 0 only."""
    if get_rank() == 0:
        print(*args, **kwargs)


def resolve_device(name=None):
    """The torch.device for a --device flag: None = this process's device (see device()); else the named one."""
    if name is None:
        return device()
    try:
        result = torch.device(name)
    except RuntimeError:
        raise dnnlib.UserError(f'--device={name}: not a device name such as cpu, cuda or cuda:1') from None
    if result.type == 'cuda' and not torch.cuda.is_available():
        raise dnnlib.UserError(f'--device={name}: CUDA is not available on this machine')
    if result.type == 'cuda' and result.index is not None and is_distributed() and result.index != device().index:
        raise dnnlib.UserError(f'--device={name}: under torchrun each process uses its own GPU (this one '
                               f'{device()}); leave --device out or give plain cuda')
    return result

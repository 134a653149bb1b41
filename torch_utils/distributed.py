"""Process-group setup and rank helpers for single-process and torchrun (multi-process) training.

Launched by torchrun, the environment carries RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT and
`init()` joins the process group (NCCL when CUDA is available, else gloo). Launched as a plain script there
is no such environment: `init()` creates no process group and every helper answers for a single process
(rank 0 of 1, barrier a no-op). All state lives in `torch.distributed` itself; nothing here is cached.
"""

import os

import torch
import torch.distributed

import dnnlib

_TORCHRUN_VARS = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')


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


def init():
    """Join the torchrun process group if launched by torchrun; otherwise run as a single process."""
    if is_distributed() or not _launched_by_torchrun():
        return
    rank, world_size, local_rank = _env_int('RANK'), _env_int('WORLD_SIZE'), _env_int('LOCAL_RANK')
    if not 0 <= rank < world_size:
        raise dnnlib.UserError(f'environment: RANK={rank} is not in [0, WORLD_SIZE={world_size})')
    backend = 'nccl' if torch.cuda.is_available() else 'gloo'
    if backend == 'nccl':
        if local_rank >= torch.cuda.device_count():
            raise dnnlib.UserError(f'environment: LOCAL_RANK={local_rank} but only '
                                   f'{torch.cuda.device_count()} CUDA devices are visible')
        torch.cuda.set_device(local_rank)
    torch.distributed.init_process_group(backend=backend, init_method='env://', rank=rank, world_size=world_size)


def get_rank():
    return torch.distributed.get_rank() if is_distributed() else 0


def get_world_size():
    return torch.distributed.get_world_size() if is_distributed() else 1


def get_local_rank():
    """Index of this process on its node (torchrun's LOCAL_RANK); 0 for a single process."""
    return int(os.environ.get('LOCAL_RANK', '0')) if is_distributed() else 0


def device():
    """The device this process trains on: cuda:LOCAL_RANK when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device('cuda', get_local_rank())
    return torch.device('cpu')


def collective_device():
    """The device tensors must live on for collectives of the current backend (CUDA for NCCL)."""
    if is_distributed() and torch.distributed.get_backend() == 'nccl':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def barrier():
    if is_distributed():
        torch.distributed.barrier()


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
    return result

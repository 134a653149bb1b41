"""Training helpers: seeding and RNG state, DDP gradient sync, parameter copying, module summaries.

The endless, resumable data sampler (`InfiniteSampler`) lives with the dataset in training/data/dataset.py.
"""

import collections
import concurrent.futures
import contextlib
import random
import re

import numpy as np
import torch

import dnnlib
from torch_utils import distributed as dist

#----------------------------------------------------------------------------
# Seeding and RNG states.

def rank_seed(seed, rank):
    """A 31-bit seed for (seed, rank), distinct for every pair (NumPy's SeedSequence mixing)."""
    return int(np.random.SeedSequence([int(seed), int(rank)]).generate_state(1)[0] >> 1)


def set_seed(seed, rank=0):
    """Seed Python's random, NumPy and torch (CPU and all CUDA devices) with rank_seed(seed, rank)."""
    value = rank_seed(seed, rank)
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)
    return value


def get_rng_states(device=None):
    """Python, NumPy, torch CPU RNG states and, when `device` (default: this process's, dist.device()) is a CUDA
    device, that device's generator state ('cuda_device'): a rank saves the one CUDA stream it draws from, so a
    resume does not depend on how many GPUs each process sees.

    The result saves with torch.save and loads with torch.load(weights_only=True).
    """
    device = dist.device() if device is None else torch.device(device)
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    states = dict(
        python=dict(version=py_version, state=torch.tensor(py_state, dtype=torch.int64), gauss_next=py_gauss),
        numpy=dict(kind=np_kind, keys=torch.from_numpy(np_keys.astype(np.int64)), pos=int(np_pos),
                   has_gauss=int(np_has_gauss), cached_gaussian=float(np_gauss)),
        torch=torch.get_rng_state(),
    )
    if device.type == 'cuda':
        states['cuda_device'] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states, device=None):
    """Restore what get_rng_states() returned; the CUDA state onto `device` (default dist.device()), whatever
    device index it was saved from. Records of older versions hold every visible device's state ('cuda'): the
    entry of `device`'s index is used. Returns False when `device` is a CUDA device and the record has no state
    for it (e.g. it was saved on the CPU), else True."""
    device = dist.device() if device is None else torch.device(device)
    try:
        py, npy = states['python'], states['numpy']
        random.setstate((py['version'], tuple(int(v) for v in py['state'].tolist()), py['gauss_next']))
        np.random.set_state((npy['kind'], npy['keys'].numpy().astype(np.uint32), npy['pos'],
                             npy['has_gauss'], npy['cached_gaussian']))
        torch.set_rng_state(states['torch'].cpu())
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise dnnlib.UserError(f'RNG states: malformed or incompatible record ({type(e).__name__}: {e})') from None
    if device.type != 'cuda':
        return True
    cuda_state = states.get('cuda_device')
    if cuda_state is None and states.get('cuda') is not None:
        old = states['cuda']
        if device.index >= len(old):
            raise dnnlib.UserError(f'RNG states: saved (by an older version) for {len(old)} CUDA devices; '
                                   f'this process draws from cuda:{device.index}')
        cuda_state = old[device.index]
    if cuda_state is None:
        return False
    torch.cuda.set_rng_state(cuda_state.cpu(), device)
    return True

#----------------------------------------------------------------------------
# Parameters, buffers and DDP.

class TorchRNGSnapshot:
    """torch's global CPU generator state and, for a CUDA `device`, that device's, captured at construction.
    `replay(fn)` runs fn() from those states inside fork_rng: fn draws what the code after the capture drew, and
    the streams continue afterwards as if fn had not run (a second pass sharing the first pass's random draws)."""

    def __init__(self, device):
        self.devices = [device] if device.type == 'cuda' else []
        self.cpu_state = torch.get_rng_state()
        self.cuda_states = [torch.cuda.get_rng_state(d) for d in self.devices]

    def replay(self, fn):
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.cpu_state)
            for device, state in zip(self.devices, self.cuda_states):
                torch.cuda.set_rng_state(state, device)
            return fn()


def to_device_async(tensor, device):
    """`tensor` on `device`; CPU to CUDA through pinned memory without blocking, so the host prepares the next
    batch while the device works instead of waiting for its queue to drain first."""
    device = torch.device(device)
    if device.type == 'cuda' and tensor.device.type == 'cpu':
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def prefetch(fn, items, depth=2):
    """fn(item) for every item, in order, computed on one background thread up to `depth` items ahead of the
    consumer (e.g. image decoding, which releases the GIL, behind feature extraction). fn runs on that one thread
    only, one call at a time; an error is raised where its item would have been handed out."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='prefetch') as pool:
        pending = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def named_params_and_buffers(module):
    """List of (name, tensor) for all parameters and buffers of `module`."""
    return list(module.named_parameters()) + list(module.named_buffers())


@torch.no_grad()
def copy_params_and_buffers(src_module, dst_module, require_all=False):
    """Copy tensors of `src_module` into the same-named tensors of `dst_module` (in place, any device)."""
    src_tensors = dict(named_params_and_buffers(src_module))
    for name, tensor in named_params_and_buffers(dst_module):
        if name not in src_tensors:
            if require_all:
                raise dnnlib.UserError(f'copy_params_and_buffers: tensor "{name}" missing in the source')
            continue
        if src_tensors[name].shape != tensor.shape:
            raise dnnlib.UserError(f'copy_params_and_buffers: tensor "{name}" has shape '
                                   f'{tuple(src_tensors[name].shape)} in the source, {tuple(tensor.shape)} in the target')
        tensor.copy_(src_tensors[name])


@contextlib.contextmanager
def ddp_sync(module, sync):
    """Inside the block, DDP synchronises gradients only if `sync` (no_sync() for accumulation rounds)."""
    if isinstance(module, torch.nn.parallel.DistributedDataParallel) and not sync:
        with module.no_sync():
            yield
    else:
        yield


@torch.no_grad()
def check_ddp_consistency(module, ignore_regex=None):
    """Raise if any parameter or buffer differs from rank 0's (a no-op for a single process)."""
    if not dist.is_distributed():
        return
    for name, tensor in named_params_and_buffers(module):
        if ignore_regex is not None and re.fullmatch(ignore_regex, name):
            continue
        local = tensor.detach().to(dist.collective_device(), copy=True)
        reference = local.clone()
        torch.distributed.broadcast(reference, src=0)
        if not torch.equal(local.nan_to_num(), reference.nan_to_num()):
            raise RuntimeError(f'DDP consistency: "{name}" on rank {dist.get_rank()} differs from rank 0')


def _memory_order(tensor):
    """`tensor` with its dimensions in memory order (largest stride first): a contiguous view of a dense tensor."""
    return tensor.permute(sorted(range(tensor.dim()), key=lambda dim: -tensor.stride(dim)))


@torch.no_grad()
def nan_to_num_grads_(params, nan, posinf, neginf):
    """torch.nan_to_num(p.grad, nan, posinf, neginf, out=p.grad) for every parameter with a gradient, bit for bit
    and without a host sync, in three ops per (device, dtype) group instead of one per tensor: the group's gradients
    are packed into one buffer (torch.cat, each in its memory order), sanitised there and copied back
    (torch._foreach_copy_, one multi-tensor kernel on a GPU). The buffer, one gradient-sized temporary per group, is
    freed on return. (No foreach op maps NaN to a number, and clamping would change finite values beyond ±1e5.)"""
    groups = collections.defaultdict(list)
    for param in params:
        if param.grad is not None:
            groups[param.grad.device, param.grad.dtype].append(_memory_order(param.grad))
    for grads in groups.values():
        flat = torch.cat([grad.reshape(-1) for grad in grads]).nan_to_num_(nan, posinf, neginf)
        pieces = flat.split([grad.numel() for grad in grads])
        torch._foreach_copy_(grads, [piece.view(grad.shape) for piece, grad in zip(pieces, grads)])

#----------------------------------------------------------------------------
# Module summary.

def _flatten_tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _flatten_tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _flatten_tensors(item)]
    return []


def _count(tensors):
    return str(sum(t.numel() for t in tensors)) if tensors else '-'


def _summary_rows(entries, max_nesting):
    """Table rows (name, params, buffers, output shape, dtype) for modules no deeper than max_nesting.

    Forward hooks fire children first, so each tensor is counted at its innermost shown owner and the
    tensors of hidden deeper modules fold into their nearest shown ancestor.
    """
    seen = set()
    rows = []
    for name, submodule, outputs in entries:
        depth = name.count('.') + 1 if name else 0
        if depth > max_nesting:
            continue
        params = [t for t in submodule.parameters() if id(t) not in seen]
        buffers = [t for t in submodule.buffers() if id(t) not in seen]
        seen.update(id(t) for t in params + buffers)
        label = name or '<top-level>'
        for index, out in enumerate(outputs or [None]):
            rows.append([
                label if index == 0 else f'{label}:{index}',
                _count(params) if index == 0 else '-',
                _count(buffers) if index == 0 else '-',
                str(list(out.shape)) if out is not None else '-',
                str(out.dtype).split('.')[-1] if out is not None else '-',
            ])
    return rows


def print_module_summary(module, inputs, max_nesting=3):
    """Run `module(*inputs)` once and print a table of its submodules; returns the outputs.

    Columns: name, parameter count, buffer count, output shape, output dtype. Submodules deeper than
    `max_nesting` levels are folded into their ancestors; each tensor is counted once.
    """
    names = {submodule: name for name, submodule in module.named_modules()}
    entries = []

    def hook(submodule, _inputs, outputs):
        entries.append((names.get(submodule, '?'), submodule, _flatten_tensors(outputs)))

    handles = [submodule.register_forward_hook(hook) for submodule in names]
    try:
        with torch.no_grad():
            outputs = module(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    rows = _summary_rows(entries, max_nesting)
    total_params = sum(t.numel() for t in module.parameters())
    total_buffers = sum(t.numel() for t in module.buffers())
    header = [type(module).__name__, 'Parameters', 'Buffers', 'Output shape', 'Datatype']
    table = [header, ['---'] * len(header)] + rows + [['---'] * len(header),
                                                      ['Total', str(total_params), str(total_buffers), '', '']]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    print()
    for row in table:
        print('  '.join(cell + ' ' * (width - len(cell)) for cell, width in zip(row, widths)).rstrip())
    print()
    return outputs

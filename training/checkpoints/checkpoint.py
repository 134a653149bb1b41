"""This project's own files: network snapshots (written and read), weight transfer between networks, and
training-state files (docs/ECT.md §2 and §7). Any network file is read by training.checkpoints.reader."""

import dataclasses
import hashlib
import importlib
import json
import os

import torch

import dnnlib
from dnnlib.util import UserError
from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils import persistence
from training.checkpoints.network_classes import LEGACY_NETWORK_MODULES, NETWORK_CLASS_MODULE, NETWORK_CLASS_NAMES
from training.checkpoints.safe_pickle import (file_name, instantiate, load_state_strict, name_list, network_class, refusal,
    torch_refused_global, unreadable)

SNAPSHOT_FORMAT = 'ect-network-snapshot'
SNAPSHOT_VERSION = 2   # 2: with a checksum of the content (version 1 files, without, are still read)

# ----------------------------------------------------------------------------------------------------------
# Plain-data checks shared by snapshots and training states.

_PRIMITIVES = (type(None), bool, int, float, str)


def _plain(value, where, allow_tensors):
    """A copy of `value` made of dicts, lists, tuples, primitives (and tensors if allowed) — what a
    weights_only torch.load reads back; anything else raises TypeError naming where it is."""
    if isinstance(value, _PRIMITIVES) or (allow_tensors and isinstance(value, torch.Tensor)):
        return value
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, _PRIMITIVES)]
        if bad:
            raise TypeError(f'{where}: dict key {bad[0]!r} is not a str/int/float/bool/None')
        return {k: _plain(v, f'{where}[{k!r}]', allow_tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(v, f'{where}[{i}]', allow_tensors) for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(f'{where}: {type(value).__module__}.{type(value).__qualname__} cannot be stored '
                    f'(only tensors, python primitives, lists, tuples and dicts)')


def read_weights_only(file, name, what, mmap=False):
    """torch.load(weights_only=True) on the CPU; a missing, truncated or corrupt file is a one-line UserError,
    content a weights-only load refuses is a refusal naming it (the file may be malicious)."""
    try:
        if isinstance(file, (str, os.PathLike)):
            if mmap:
                return torch.load(file, map_location='cpu', weights_only=True, mmap=True)
            with open(file, 'rb') as f:
                return torch.load(f, map_location='cpu', weights_only=True)
        return torch.load(file, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise UserError(f'{name}: no such {what} file') from None
    except Exception as e:
        refused = torch_refused_global(e)
        raise UserError(refusal(name, refused) if refused else unreadable(name, f'{what} file', e)) from None


def _feed_digest(h, value):
    """Hash a plain structure: the kind, keys and length of each container, the dtype, shape and bytes of each
    tensor, the repr of each primitive."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f'T{t.dtype}{list(t.shape)};'.encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(value, dict):
        h.update(f'D{len(value)};'.encode())
        for key, item in value.items():
            h.update(f'{key!r}:'.encode())
            _feed_digest(h, item)
    elif isinstance(value, (list, tuple)):
        h.update(f'{type(value).__name__[0]}{len(value)};'.encode())
        for item in value:
            _feed_digest(h, item)
    else:
        h.update(f'{value!r};'.encode())


def content_sha256(value):
    """SHA-256 of a plain structure (what save_network_snapshot and save_training_state store), independent of
    how torch.save lays it out: a flipped byte in any tensor or field changes it."""
    h = hashlib.sha256()
    _feed_digest(h, value)
    return h.hexdigest()


def _with_checksum(data):
    return dict(data, sha256=content_sha256(data))


def _verify_checksum(data, name, what):
    """The dict without its 'sha256' field, after checking the field against the content."""
    stored = data.get('sha256')
    content = {k: v for k, v in data.items() if k != 'sha256'}
    if not isinstance(stored, str) or content_sha256(content) != stored:
        raise UserError(f'{name}: the {what} is damaged: its content does not match its checksum'
                        f'{"" if isinstance(stored, str) else " (no checksum stored)"}')
    return content


def _os_error(error):
    """The OSError behind `error` (torch.save reports a failed write as a RuntimeError of its zip writer), or None."""
    while error is not None and not isinstance(error, OSError):
        error = error.__cause__ or error.__context__
    return error


def _save_torch(path, data):
    """torch.save to `path`, atomically; a failed write (disk full, ...) is one UserError naming the file, which is
    left as it was (no partial file)."""
    try:
        with dnnlib.util.atomic_write(path, 'wb') as f:
            torch.save(data, f)
    except (OSError, RuntimeError) as e:
        os_error = _os_error(e)
        if os_error is None:
            raise
        raise UserError(f'{file_name(path)}: {os_error.strerror or os_error} (not written; a previous file of that '
                        f'name is unchanged)') from None


# ----------------------------------------------------------------------------------------------------------
# Our own network snapshots.

def _constructor_kwargs(net):
    """The keyword arguments that rebuild `net` (networks of this project are built by keyword only)."""
    if not persistence.is_persistent(net):
        raise TypeError(f'{type(net).__qualname__} is not a @persistent_class network; it cannot be snapshotted')
    if net.init_args:
        raise TypeError(f'{type(net).__qualname__} was built with positional arguments; build it by keyword '
                        f'so a snapshot can record its configuration')
    return net.init_kwargs


def _public_class_name(cls):
    """The dotted name snapshots record for `cls`: the module that exports it (e.g. 'training.networks.ECMPrecond',
    although the class is defined in training.networks.precond)."""
    module = NETWORK_CLASS_MODULE.get(cls.__qualname__)
    if module is None or network_class(cls.__qualname__) is not cls:
        raise TypeError(f'{cls.__module__}.{cls.__qualname__} is not one of the network classes a snapshot may hold')
    return f'{module}.{cls.__qualname__}'


def save_network_snapshot(path, net, **metadata):
    """Write `net` to `path` in this project's safe snapshot format (a weights_only-loadable torch.save file).
    `metadata` (e.g. kimg, stage, ema, mid_t) must be JSON-serialisable; it is stored as its JSON round trip."""
    class_name = _public_class_name(type(net))
    try:
        metadata = json.loads(json.dumps(metadata))
    except (TypeError, ValueError) as e:
        raise TypeError(f'save_network_snapshot: metadata is not JSON-serialisable: {e}') from None
    data = dict(format=SNAPSHOT_FORMAT, version=SNAPSHOT_VERSION, class_name=class_name,
                init_kwargs=_plain(_constructor_kwargs(net), 'init_kwargs', allow_tensors=False),
                state_dict={k: v.detach().cpu() for k, v in net.state_dict().items()}, metadata=metadata)
    _save_torch(path, _with_checksum(data))


def _check_snapshot(data, name):
    """The snapshot's dict, checked (version 2 and later: against its checksum)."""
    if not isinstance(data, dict) or data.get('format') != SNAPSHOT_FORMAT:
        raise UserError(f'{name}: not an {SNAPSHOT_FORMAT} file')
    if data.get('version') not in (1, SNAPSHOT_VERSION):
        raise UserError(f'{name}: unsupported snapshot version {data.get("version")!r} (expected {SNAPSHOT_VERSION})')
    if data['version'] >= 2:
        data = _verify_checksum(data, name, 'network snapshot')
    if data.get('class_name') not in NETWORK_CLASS_NAMES:
        raise UserError(refusal(name, f'class "{data.get("class_name")}"'))
    for key in ('init_kwargs', 'state_dict', 'metadata'):
        if not isinstance(data.get(key), dict):
            raise UserError(f'{name}: snapshot field "{key}" is missing or not a dict')
    return data


def load_network_snapshot(path, *, name=None):
    """(net, metadata) from a file written by save_network_snapshot (a path or binary file object);
    the network is in eval mode on the CPU."""
    name = name if name is not None else file_name(path)
    return network_from_snapshot(read_weights_only(path, name, 'network snapshot'), name)


def network_from_snapshot(data, name):
    """(net, metadata) from the dict of a snapshot file already read by read_weights_only."""
    data = _check_snapshot(data, name)
    return build_network(data['class_name'], data['init_kwargs'], data['state_dict'], name), data['metadata']


def build_network(class_name, init_kwargs, tensors, name):
    """The network `class_name` (a dotted name on the allow-list of network classes) built from keyword
    arguments and loaded with `tensors` under the strict name and shape check; eval mode, CPU. Shared by every
    safe format (snapshots, model.safetensors)."""
    if class_name not in NETWORK_CLASS_NAMES:
        raise UserError(refusal(name, f'class "{class_name}"'))
    if not isinstance(init_kwargs, dict):
        raise UserError(f'{name}: the constructor arguments of {class_name} are not a dict')
    module_name, _, short_name = class_name.rpartition('.')
    module_name = LEGACY_NETWORK_MODULES.get(module_name, module_name)
    net = instantiate(getattr(importlib.import_module(module_name), short_name), (), init_kwargs, name)
    load_state_strict(net, tensors, name)
    return net.eval()


def snapshot_class_name(net):
    """The dotted class name a snapshot or an export records for `net`; TypeError for a class not on the list."""
    return _public_class_name(type(net))


def snapshot_init_kwargs(net):
    """The constructor keyword arguments of `net` as plain data (what a snapshot records to rebuild it)."""
    return _plain(_constructor_kwargs(net), 'init_kwargs', allow_tensors=False)


# ----------------------------------------------------------------------------------------------------------
# Weight transfer (docs/ECT.md §2: the inner U-Net of an EDM VP checkpoint into the ECM preconditioner).

@dataclasses.dataclass
class TransferReport:
    """What transfer_weights did, by dotted tensor name."""
    copied: list        # In both networks; copied from source to target.
    skipped: list       # In the source only (e.g. model.map_augment.weight when augmentation is off).
    untouched: list     # In the target only; left as initialised.

    def summary(self):
        return (f'transferred {len(self.copied)} tensors; skipped {len(self.skipped)} absent from the target '
                f'[{name_list(self.skipped)}]; left {len(self.untouched)} target tensors as initialised '
                f'[{name_list(self.untouched)}]')

    def __str__(self):
        return self.summary()


def transfer_weights(src_net, dst_net):
    """Copy every parameter and buffer that `src_net` and `dst_net` share by name; a shape mismatch is a
    UserError naming the tensor (checked before anything is copied)."""
    src, dst = src_net.state_dict(), dst_net.state_dict()
    copied = [k for k in dst if k in src]
    for key in copied:
        if src[key].shape != dst[key].shape:
            raise UserError(f'transfer_weights: tensor "{key}" has shape {list(src[key].shape)} in the source '
                            f'network but {list(dst[key].shape)} in the target')
    with torch.no_grad():
        for key in copied:
            dst[key].copy_(src[key])
    return TransferReport(copied=copied, skipped=[k for k in src if k not in dst],
                          untouched=[k for k in dst if k not in src])


# ----------------------------------------------------------------------------------------------------------
# Training state files: low-level save/load of plain data.

def save_training_state(path, state):
    """Atomically write the training state (tensors, python primitives, lists, tuples and dicts only) with a
    checksum of its content."""
    if not isinstance(state, dict):
        raise TypeError('save_training_state: state must be a dict')
    _save_torch(path, _with_checksum(_plain(state, 'training state', allow_tensors=True)))


def load_training_state(path):
    """The dict written by save_training_state (weights_only, on the CPU), checked against its checksum (files
    written before states carried one are read unchecked); a missing, truncated, corrupt or damaged file is a
    UserError naming it."""
    name = file_name(path)
    state = read_weights_only(path, name, 'training state')
    if not isinstance(state, dict):
        raise UserError(f'{name}: not a training state file')
    return _verify_checksum(state, name, 'training state') if 'sha256' in state else state

# ----------------------------------------------------------------------------------------------------------
# The training state of a run: one dataclass, one save/read/resume path.


@dataclasses.dataclass
class LoopProgress:
    """The loop's counters (saved in every training state; the sampler position is cur_nimg)."""
    cur_nimg: int = 0           # images seen, all ranks together
    cur_tick: int = 0           # ticks completed
    tick_start_nimg: int = 0    # cur_nimg at the start of the current tick
    elapsed_sec: float = 0.0    # training time before now, over all resumes


@dataclasses.dataclass
class TrainingState:
    """Everything a run needs to continue exactly: the trained network, its EMAs, the method's state, the
    optimiser, the fp16 GradScaler and the loop's progress; the RNG states of every rank are gathered when it is
    saved. The data order is a function of (seed, images seen), so progress.cur_nimg is the sampler position."""
    FORMAT = 'ect-training-state'
    VERSION = 2

    net: torch.nn.Module                # the trained network (not DDP-wrapped)
    ema: object                         # EMA tracker(s) of net (training.loop.ema.*: state_dict/load_state_dict/get)
    method: object                      # the training method (training.methods.base.Method)
    optimizer: torch.optim.Optimizer    # optimiser of net's parameters
    scaler: object = None               # torch.amp.GradScaler under fp16, else None
    progress: LoopProgress = dataclasses.field(default_factory=LoopProgress)
    trackers: dict = dataclasses.field(default_factory=dict)   # experiment-tracker ids (e.g. the W&B run id)

    def to_dict(self, options=None):
        """The plain-data record of the state (a collective when distributed: every rank's RNG is gathered)."""
        return dict(format=self.FORMAT, version=self.VERSION, net=self.net.state_dict(), ema=self.ema.state_dict(),
                    method=self.method.state_dict(), optimizer=self.optimizer.state_dict(),
                    scaler=self.scaler.state_dict() if self.scaler is not None else None,
                    progress=dataclasses.asdict(self.progress), rng=_gather_rng_states(),
                    world_size=dist.get_world_size(), sampler_position=self.progress.cur_nimg,
                    trackers=json.loads(json.dumps(self.trackers)),
                    options=json.loads(json.dumps(options)))

    def save(self, run_dir, options=None):
        """training-state-{kimg:06d}.pt and training-state-latest.pt (every rank calls; rank 0 writes, atomically)."""
        data = self.to_dict(options)
        if dist.get_rank() != 0:
            return
        for name in (f'training-state-{self.progress.cur_nimg // 1000:06d}.pt', 'training-state-latest.pt'):
            save_training_state(os.path.join(run_dir, name), data)

    @classmethod
    def read(cls, path):
        """The record of a training-state file, checked; a file that is not one is a UserError naming it."""
        data = load_training_state(path)
        if data.get('format') != cls.FORMAT or data.get('version') != cls.VERSION:
            raise UserError(f'{path}: not an ECT training state of version {cls.VERSION} (format '
                            f'{data.get("format")!r}, version {data.get("version")!r})')
        missing = [k for k in ('net', 'ema', 'method', 'optimizer', 'progress', 'rng') if k not in data]
        if missing:
            raise UserError(f'{path}: training state lacks {missing}')
        return data

    def resume(self, path, seed):
        """Load everything from the file at `path` into this state, the RNG states of this rank last."""
        data = self.read(path)
        try:
            self.net.load_state_dict(data['net'])
            self.optimizer.load_state_dict(data['optimizer'])
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(f'--resume: {path} does not match this network/optimiser configuration: '
                            f'{str(e).splitlines()[0]}') from None
        self.ema.load_state_dict(data['ema'])
        self.method.load_state_dict(data['method'])
        if self.scaler is not None and data.get('scaler') is not None:
            self.scaler.load_state_dict(data['scaler'])
        self.progress = LoopProgress(**data['progress'])
        self.trackers = dict(data.get('trackers') or {})
        _restore_rng(data['rng'], seed, self.progress.cur_nimg)


def _gather_rng_states():
    """The RNG states of every rank, in rank order (a collective)."""
    states = misc.get_rng_states()
    if dist.get_world_size() == 1:
        return [states]
    gathered = [None] * dist.get_world_size()
    torch.distributed.all_gather_object(gathered, states)
    return gathered


def _restore_rng(rng, seed, cur_nimg):
    """This rank's RNG states from `rng` (one per rank); with a different number of ranks the run cannot continue
    bit-for-bit, so each rank is reseeded from (seed, images seen) instead and that is said."""
    if len(rng) == dist.get_world_size():
        if not misc.set_rng_states(rng[dist.get_rank()]):
            # A state saved on the CPU resumed on a GPU: the CUDA stream follows the reseeding rule below.
            torch.cuda.manual_seed(misc.rank_seed(seed + cur_nimg, dist.get_rank()))
        return
    dist.print0(f'Resume: the state was written by {len(rng)} processes, this run has {dist.get_world_size()}; '
                f'reseeding RNGs (the continuation is statistically, not bitwise, equivalent)')
    misc.set_seed(seed + cur_nimg, dist.get_rank())

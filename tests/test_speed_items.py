"""The speed items of issue 22, checked on the CPU build: host-sync-free Karras samplers, the foreach target update,
grouped gradient sanitising, fp32 dropout scaling under bf16 and synchronised tick timing. Each test says why its
emulation stands for the GPU behaviour; each compares with the old arithmetic, written out, where it is kept."""

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from test_training import data_dir, tiny_options  # noqa: F401 (fixtures)
from torch_utils import misc
from training.loop import run_files
from training.sampling import samplers_karras
from training.loop import training_loop as tl
from training.methods.consistency_models import update_target
from training.networks.randomness import DrawTape, dropout

META = torch.device('meta')     # a device whose values the host can never read: each read would be a GPU sync

# ----------------------------------------------------------------------------------------------------------
# Recording aten ops.


def _devices(args):
    return {a.device for a in args if isinstance(a, torch.Tensor)}


class HostSyncs(TorchDispatchMode):
    """Refuses every op that makes the host wait for a device: reading a value (`.item()`, bool(), float():
    aten._local_scalar_dense) or copying between the host and a device. A 0-d CPU tensor in a device op is
    allowed: CUDA kernels take it as a scalar read on the host. Factory calls from python data (torch.tensor,
    torch.as_tensor) bypass the dispatcher; `watch_factories` refuses those onto a device."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        devices = _devices(args) | ({torch.device(kwargs['device'])} if kwargs.get('device') else set())
        if func is torch.ops.aten._local_scalar_dense.default and devices != {torch.device('cpu')}:
            raise AssertionError(f'host sync: a value read from {devices}')
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default) and len(devices) > 1:
            raise AssertionError(f'host sync: a copy between {devices}')
        return func(*args, **kwargs)


def watch_factories(monkeypatch):
    """torch.tensor and torch.as_tensor refuse to copy host data onto a device (a blocking copy on a GPU)."""
    for name in ('tensor', 'as_tensor'):
        def refusing(data, *args, _make=getattr(torch, name), **kwargs):
            device = kwargs.get('device')
            if device is not None and torch.device(device).type != 'cpu' and \
                    not (isinstance(data, torch.Tensor) and data.device == torch.device(device)):
                raise AssertionError(f'host sync: torch.{_make.__name__} copies host data to {device}')
            return _make(data, *args, **kwargs)
        monkeypatch.setattr(torch, name, refusing)


class KernelOps(TorchDispatchMode):
    """The aten ops that compute (views, which launch nothing on a GPU, left out), in call order."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func is not torch.ops.aten.detach.default:
            self.ops.append(func)
        return func(*args, **(kwargs or {}))

# ----------------------------------------------------------------------------------------------------------
# 1. Karras samplers without a host sync per step.


def toy_net(x, sigma, labels):
    """A deterministic denoiser that depends on x and on sigma in a nonlinear way."""
    return torch.tanh(x * 0.7) / (1 + sigma.reshape(-1, 1, 1, 1))


SAMPLER_CASES = [('heun', dict(s_churn=5.0, s_tmin=0.05, s_tmax=20.0)), ('dpm', dict(s_churn=5.0, s_tmin=0.05)),
                 ('heun', {}), ('dpm', {}), ('euler', {}), ('ancestral', {}), ('progdist', {}),
                 ('onestep', {}), ('multistep', dict(ts=[0, 3, 5]))]


@pytest.mark.parametrize('sampler, kwargs', SAMPLER_CASES)
def test_karras_samplers_never_read_a_device_value(monkeypatch, sampler, kwargs):
    """The whole sampler on the meta device: like a CUDA tensor, a meta tensor's value is not on the host, so any
    comparison of a device level with a python number, `.item()`, float() or host-to-device copy of a level (each
    one cudaStreamSynchronize per step on a GPU) is refused by HostSyncs. The old code fails every case: it copied
    the level grid to the device (one sync per call); heun and dpm then compared device levels and multistep
    copied each level from the host (one sync per step)."""
    watch_factories(monkeypatch)
    latents = torch.empty([2, 3, 4, 4], device=META)
    with HostSyncs():
        x = samplers_karras.karras_sample(toy_net, latents, sampler=sampler, steps=6, **kwargs)
    assert x.shape == latents.shape and x.device == META


def old_karras_sample(net, latents, randn_like, sampler, steps, s_churn=0.0, s_tmin=0.0, s_tmax=float('inf')):
    """The samplers before the fix, written out: levels as 0-d tensors on the latents' device."""
    sigmas = samplers_karras.karras_sigmas(steps + (sampler == 'progdist')).to(latents.device)
    sigmas = sigmas[:-1] if sampler == 'progdist' else sigmas

    def denoise(x, sigma):
        s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(1).expand(x.shape[0])
        return net(x, s, None).to(x.dtype).clamp(-1, 1)
    x = latents * 80.0
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        if sampler in ('euler', 'progdist'):
            x = x + (x - denoise(x, sigma)) / sigma * (sigma_next - sigma)
            continue
        if sampler == 'ancestral':
            d = (x - denoise(x, sigma)) / sigma
            up = (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5
            x = x + d * ((sigma_next ** 2 - up ** 2) ** 0.5 - sigma) + randn_like(x) * up
            continue
        gamma = min(s_churn / steps, 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        eps, sigma_hat = randn_like(x), sigma * (gamma + 1)
        x = x + eps * (sigma_hat ** 2 - sigma ** 2) ** 0.5 if gamma > 0 else x
        d = (x - denoise(x, sigma_hat)) / sigma_hat
        mid = sigma_next if sampler == 'heun' else ((sigma_hat ** (1 / 3) + sigma_next ** (1 / 3)) / 2) ** 3
        x_2 = x + d * (mid - sigma_hat)
        if sampler == 'heun' and sigma_next == 0:
            x = x_2
            continue
        d_2 = (x_2 - denoise(x_2, mid)) / mid
        x = x + ((d + d_2) / 2 if sampler == 'heun' else d_2) * (sigma_next - sigma_hat)
    return x.clamp(-1, 1)


@pytest.mark.parametrize('sampler, kwargs', SAMPLER_CASES[:7])
def test_karras_samplers_are_bit_identical_to_the_old_arithmetic(sampler, kwargs):
    """On the CPU the levels' float32 arithmetic and the images are unchanged, bit for bit."""
    latents = torch.randn([3, 3, 8, 8], generator=torch.Generator().manual_seed(1))
    gens = [torch.Generator().manual_seed(2) for _ in range(2)]
    new = samplers_karras.karras_sample(toy_net, latents, sampler=sampler, steps=6, sigma_max=80.0,
                                        randn_like=lambda x: torch.randn(x.shape, generator=gens[0]), **kwargs)
    old = old_karras_sample(toy_net, latents, lambda x: torch.randn(x.shape, generator=gens[1]), sampler, 6,
                            **kwargs)
    assert torch.equal(new, old)

# ----------------------------------------------------------------------------------------------------------
# 2. The CD/CT target update with foreach ops.

SHAPES = [[7], [33, 3], [4, 5, 3, 3], [], [1000]]


def params(shapes, seed, dtype=torch.float32, scale=1.0):
    """Random parameters of these shapes."""
    g = torch.Generator().manual_seed(seed)
    return torch.nn.ParameterList([torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype) * scale)
                                   for s in shapes])


@pytest.mark.parametrize('mu', [0.0, 1.0, 0.5, 0.95, 0.999943])
@pytest.mark.parametrize('net_dtype', [torch.float32, torch.float64])
def test_target_update_is_bit_identical_to_the_old_formula(mu, net_dtype):
    target, net = params(SHAPES, 0).requires_grad_(False), params(SHAPES, 1, net_dtype, scale=3.0)
    expected = [t.detach().clone().mul_(mu).add_(p.detach().to(t.dtype), alpha=1 - mu)   # the old per-tensor update
                for t, p in zip(target, net)]
    update_target(target, net, mu)
    assert all(t.dtype == torch.float32 and torch.equal(t, e) for t, e in zip(target, expected))
    if mu == 1.0:
        assert all(torch.equal(t, e) for t, e in zip(target, params(SHAPES, 0)))


def test_target_update_is_two_foreach_ops_whatever_the_number_of_tensors():
    """What the dispatcher sees is what a GPU launches: each aten op on a CUDA tensor is at least one kernel, and
    a _foreach_ op is one multi-tensor kernel per few hundred tensors (the old loop: 2 ops per tensor)."""
    for count in (2, 40):
        target, net = params([[3]] * count, 0).requires_grad_(False), params([[3]] * count, 1)
        with KernelOps() as recorded:
            update_target(target, net, 0.9)
        assert recorded.ops == [torch.ops.aten._foreach_mul_.Scalar, torch.ops.aten._foreach_add_.List]

# ----------------------------------------------------------------------------------------------------------
# 3. Gradient sanitising in O(1) ops per (device, dtype) group.

INT_VIEWS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
             torch.bfloat16: torch.int16}
SPECIAL = [float('nan'), -float('nan'), float('inf'), -float('inf'), 1e30, -1e30, 1e5, 3e5, -7e4, -0.0, 0.0,
           1e-40, -1e-45, 6e-8, -1e-310, 1.5, -2.75]


def bits(tensor):
    """The tensor's bit patterns (so -0.0 differs from 0.0)."""
    return tensor.contiguous().view(INT_VIEWS[tensor.dtype])


def grads_with_specials(seed):
    """Parameters whose gradients hold NaN, ±inf, huge, tiny, subnormal and signed-zero values, in every dtype,
    in contiguous, channels-last, transposed and strided (non-dense) layouts, one 0-d; one without a gradient."""
    g = torch.Generator().manual_seed(seed)
    shapes = [[5, 3, 3, 3], [5, 3, 3, 3], [6, 4], [4, 6], [], [17]]
    layouts = [lambda t: t, lambda t: t.to(memory_format=torch.channels_last), lambda t: t,
               lambda t: t.t().contiguous().t(), lambda t: t, lambda t: torch.stack([t, t], 1)[:, 0]]
    params = []
    for dtype in INT_VIEWS:
        for shape, layout in zip(shapes, layouts):
            values = torch.randn(shape, generator=g, dtype=torch.float64) * 1e3
            flat = values.view(-1)
            flat[torch.randperm(flat.numel(), generator=g)[:len(SPECIAL)]] = torch.tensor(SPECIAL[:flat.numel()],
                                                                                          dtype=torch.float64)
            param = torch.nn.Parameter(layout(torch.zeros(shape, dtype=dtype)))
            param.grad = layout(values.to(dtype))
            params.append(param)
    return params + [torch.nn.Parameter(torch.zeros(3))]


def test_nan_to_num_grads_equals_torch_nan_to_num_bit_for_bit():
    """The same elementwise nan_to_num kernel runs on the packed buffer, and packing and copying back are exact
    copies, so a GPU gives torch.nan_to_num's bits as the CPU does; in place, each gradient's layout kept."""
    params = grads_with_specials(0)
    expected = [None if p.grad is None else torch.nan_to_num(p.grad, nan=0.0, posinf=1e5, neginf=-1e5)
                for p in params]
    layouts = [None if p.grad is None else (p.grad.stride(), p.grad.data_ptr()) for p in params]
    misc.nan_to_num_grads_(params, nan=0.0, posinf=1e5, neginf=-1e5)
    for p, e, layout in zip(params, expected, layouts):
        if e is None:
            assert p.grad is None
            continue
        assert torch.equal(bits(p.grad), bits(e)), p.grad.dtype
        assert (p.grad.stride(), p.grad.data_ptr()) == layout     # in place, layout kept
    float32 = [p.grad for p in params[6:12]]
    assert any((g == 1e5).any() for g in float32) and any((bits(g) == bits(torch.tensor(-0.0))).any()
                                                           for g in float32)


def test_optimizer_step_sanitises_in_a_fixed_number_of_ops():
    """What the dispatcher sees is what a GPU launches: each aten op on a CUDA tensor is at least one kernel (the
    foreach copy one multi-tensor kernel per few hundred tensors); the old loop ran one nan_to_num per tensor."""
    optimizer = type('NoStep', (), dict(param_groups=[{}], step=lambda self: None))()
    counts = []
    for count in (2, 40):
        net = params([[3, 2]] * count, 0)
        for p in net:
            p.grad = torch.full_like(p, float('nan'))
        with KernelOps() as recorded:
            tl.optimizer_step(net, optimizer, 0.1)
        assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in net)
        counts.append(len(recorded.ops))
    assert counts[0] == counts[1] <= 3

# ----------------------------------------------------------------------------------------------------------
# 4. Dropout scaled in float32 under bf16.


def test_bf16_dropout_scales_in_float32_once():
    """torch's CUDA dropout (fused) computes x · m · (1 / (1 − p)) in float32 and rounds once to bf16; the CPU
    draw-then-div_ rounded the scale to bf16 first (1.6640625 for p = 0.4), which moves about one bf16 value in
    five by an ulp. The same masks (the same draws from the generator) as before."""
    x = torch.randn([4, 8, 16, 16], generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    torch.manual_seed(5)
    got, after = dropout(x, 0.4, True), torch.get_rng_state()
    torch.manual_seed(5)
    mask = torch.empty(x.shape, dtype=torch.bfloat16).bernoulli_(0.6)
    assert torch.equal(torch.get_rng_state(), after)
    scale = torch.tensor(1.0) / torch.tensor(0.6)                           # float32 arithmetic
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, (x.float() * mask.float() * scale).to(torch.bfloat16))
    old = x * mask.clone().div_(0.6)                                        # the old bf16 noise
    assert (got != old).float().mean() > 0.05


def test_float32_dropout_is_unchanged_bit_for_bit():
    """float32: the old noise m / (1 − p) multiplied in, written out, and torch's own CPU dropout."""
    x = torch.randn([3, 5, 7, 9], generator=torch.Generator().manual_seed(1)) * 1e3
    for p in (0.1, 0.3, 0.4, 0.5, 0.9, 1 / 3, 0.77):
        torch.manual_seed(2)
        old = x * torch.empty(x.shape).bernoulli_(1 - p).div_(1 - p)
        torch.manual_seed(2)
        tape = DrawTape()
        with tape.recording():
            got = dropout(x, p, True, tape)
        torch.manual_seed(2)
        assert torch.equal(got, old) and torch.equal(got, torch.nn.functional.dropout(x, p, True))
        with tape.replaying(torch.tensor([2, 0])):
            assert torch.equal(dropout(x[[2, 0]], p, True, tape), old[[2, 0]])

# ----------------------------------------------------------------------------------------------------------
# 5. Tick timing after a device synchronisation, and each tick's own peak memory.

CUDA = torch.device('cuda', 0)  # a device object only: nothing is allocated on it


@pytest.fixture
def cuda_events(monkeypatch):
    """torch.cuda's synchronize, reset_peak_memory_stats and max_memory_allocated replaced by recorders (a CPU
    build has no CUDA: the loop calls them with the device object only, which is what these calls see on a GPU)."""
    events = []
    for name, event in [('synchronize', 'sync'), ('reset_peak_memory_stats', 'reset'),
                        ('max_memory_allocated', 'peak')]:
        def record(device=None, _event=event):
            assert device == CUDA
            events.append(_event)
            return 0
        monkeypatch.setattr(torch.cuda, name, record)
    return events


def test_tick_clock_reads_the_time_after_synchronising(monkeypatch, cuda_events):
    monkeypatch.setattr(run_files.time, 'time', lambda: cuda_events.append('time') or 12.5)
    assert run_files.tick_clock(CUDA) == 12.5
    assert run_files.tick_clock(CUDA, starting=True) == 12.5
    assert cuda_events == ['sync', 'time', 'sync', 'reset', 'time']
    cuda_events.clear()
    run_files.tick_clock(torch.device('cpu'), starting=True)
    assert cuda_events == ['time']


def test_each_status_line_follows_a_sync_and_reports_its_own_ticks_peak(data_dir, tmp_path, cuda_events):
    """The real Trainer.run on a CUDA device object, its step replaced (nothing runs on the device): the tick's
    end time is read after a synchronize, and the peak counter is reset at every tick's start, after the previous
    status line (the old loop did neither: the events were only the three status lines' 'peak')."""
    trainer = tl.Trainer(tiny_options(data_dir), str(tmp_path))
    trainer.run_ctx = dataclasses.replace(trainer.run_ctx, device=CUDA)
    trainer.step = lambda: setattr(trainer.run_ctx.state.progress, 'cur_nimg',
                                   trainer.run_ctx.state.progress.cur_nimg + 4)
    assert trainer.run(type('NoSignal', (), dict(requested=False))()) == 'done'
    assert cuda_events == ['sync', 'reset'] + ['sync', 'peak', 'sync', 'reset'] * 3

"""Where the JVP methods' extra step time goes: the passes of one micro-batch of ECT, sCT and MeanFlow timed apart
(interleaved rounds, same network width and batch), the JVP's time split by operator kind (torch.profiler, self
CPU time), and the JVP again without the convolution that torch's forward-mode AD wastes.

    python bench/bench_jvp_cost.py --device=cpu --batch=8 --threads=1 --arch-kwargs='{"model_channels":64}'

The passes are the ones the methods run (training/methods/loss.py, scm.py, meanflow_loss.py): ECT's prediction
(forward and backward) and its no-grad target pass over the whole batch; sCT's and MeanFlow's no-grad JVP in
float32 (training.networks.jvp.network_jvp, as scm_loss.jvp_autograd and meanflow_loss.average_velocity_target call
it) and their gradient-carrying forward and backward; the plain no-grad
forward of each network for scale. `--precision=bf16` puts the prediction/gradient passes and ECT's target under
bf16 autocast; the JVPs stay float32, as in the methods.

'JVP, input-only conv tangent': torch's forward-AD formula of a convolution (convolution_jvp in torch's
derivatives.yaml) is conv(ẋ, W) + conv(x, Ẇ), and a weight without a tangent gets a materialised zero tangent,
so every convolution of a JVP runs three times instead of twice. This row replaces torch.nn.functional.conv2d,
for the duration of the call, by an autograd.Function whose jvp is conv(ẋ, W) (set_materialize_grads(False)):
the same tangent, bit for bit, one convolution fewer per layer.
"""

import contextlib
import os
import statistics
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dnnlib  # noqa: E402
from torch_utils import distributed as dist  # noqa: E402
from training.loop import runtime  # noqa: E402
from training.methods import scm_loss  # noqa: E402
from training.methods.loss import tuning_kwargs  # noqa: E402
from training.networks.jvp import network_jvp  # noqa: E402
from bench.bench_train import SyntheticData, StepRunner, resolve_preset, synchronize  # noqa: E402

TORCH_CONV2D = torch.nn.functional.conv2d


class InputTangentConv2d(torch.autograd.Function):
    """conv2d whose JVP is conv(ẋ, W) (+ conv(x, Ẇ) and ḃ only when they have tangents)."""

    @staticmethod
    def forward(x, weight, bias, stride, padding, dilation, groups):
        return TORCH_CONV2D(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, stride, padding, dilation, groups = inputs
        ctx.set_materialize_grads(False)   # an input without a tangent gets None, not a zero tensor
        ctx.save_for_forward(x, weight)
        ctx.args = (stride, padding, dilation, groups)

    @staticmethod
    def jvp(ctx, x_t, weight_t, bias_t, *_):
        x, weight = ctx.saved_tensors
        out = TORCH_CONV2D(x_t, weight, None, *ctx.args) if x_t is not None else 0
        if weight_t is not None:
            out = out + TORCH_CONV2D(x, weight_t, None, *ctx.args)
        return out if bias_t is None else out + bias_t.reshape(1, -1, 1, 1)


def _input_tangent_conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return InputTangentConv2d.apply(x, weight, bias, stride, padding, dilation, groups)


@contextlib.contextmanager
def input_tangent_convolutions():
    """torch.nn.functional.conv2d replaced by InputTangentConv2d while the block runs (this process only)."""
    torch.nn.functional.conv2d = _input_tangent_conv2d
    try:
        yield
    finally:
        torch.nn.functional.conv2d = TORCH_CONV2D


def _autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def passes(method, net, x, dtype):
    """({name: callable} of the passes of `method` ('ECT', 'SCT', 'MeanFlow') on `net` for images `x`, the JVP as
    a callable returning its tangent output, or None for ECT)."""
    n, device = x.shape[0], x.device
    t = torch.full([n], 0.8, device=device)
    if method == 'ECT':
        kwargs = tuning_kwargs(net)
        call, jvp = (lambda: net(x, t.reshape(-1, 1, 1, 1), None, **kwargs)), None
    elif method == 'SCT':
        def call(force_fp32=False):
            return net(x, t, None, force_fp32=force_fp32, trigflow=True)
        jvp = (lambda: scm_loss.jvp_autograd(lambda a, b: net(a, b, None, force_fp32=True, trigflow=True), x, t,
                                             torch.randn_like(x)))
    else:
        kwargs = dict(augment_labels=torch.zeros([n, net.model.map_augment.in_features], device=device)) \
            if net.model.map_augment is not None else {}
        call = (lambda: net(x, t * 0.5, t, **kwargs))
        jvp = (lambda: network_jvp(lambda z, r, s: net(z, r, s, **kwargs), (x, t * 0.5, t),
                                   (torch.randn_like(x), torch.zeros_like(t), torch.ones_like(t)))[1])

    def forward_backward():
        with _autocast(device, dtype):
            out = call()
        out.float().square().sum().backward()

    def no_grad(function, cast=dtype):
        def run():
            with torch.no_grad(), _autocast(device, cast):
                function()
        return run
    result = {'forward (no grad)': no_grad(call), 'forward + backward': forward_backward}
    if jvp is not None:
        result['JVP (float32)'] = no_grad(jvp, None)

        def jvp_fixed():
            with input_tangent_convolutions():
                no_grad(jvp, None)()
        result['JVP, input-only conv tangent'] = jvp_fixed
    return result, jvp


def check_same_tangent(name, jvp):
    """Print the relative difference of the JVP with and without InputTangentConv2d (same random tangent)."""
    with torch.no_grad():
        torch.manual_seed(1)
        plain = jvp()
        torch.manual_seed(1)
        with input_tangent_convolutions():
            fixed = jvp()
    diff = (torch.linalg.vector_norm(fixed - plain) / torch.linalg.vector_norm(plain)).item()
    print(f'{name}: input-only conv tangent vs torch\'s JVP: relative difference {diff:.3g}')


def timed(function, device):
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


OP_KINDS = (('convolution', ('conv',)), ('attention (math path)', ('scaled_dot_product_attention',)),
            ('group norm', ('group_norm',)), ('linear', ('aten::mm', 'aten::addmm', 'aten::matmul', 'aten::linear')))


def _kind(name):
    return next((kind for kind, keys in OP_KINDS if any(key in name for key in keys)), None)


def op_breakdown(function):
    """{kind: seconds} of one call's self CPU time, each operator counted under the kind of its outermost
    enclosing operator of OP_KINDS (a group norm's decomposed JVP is 'group norm'); 'elementwise and other'
    for the rest."""
    with torch.profiler.profile() as prof:
        function()
    totals = {}
    for event in prof.events():
        kind, parent = _kind(event.name), event.cpu_parent
        while parent is not None:
            kind = _kind(parent.name) or kind
            parent = parent.cpu_parent
        kind = kind or 'elementwise and other'
        totals[kind] = totals.get(kind, 0.0) + event.self_cpu_time_total / 1e6
    return totals


@click.command()
@click.option('--preset', 'preset_text', help='Comma list of presets', metavar='LIST', type=str,
              default='cifar10-ecm,cifar10-sct,cifar10-meanflow', show_default=True)
@click.option('--device', help='Device  [default: cuda if available, else cpu]', metavar='STR', type=str, default=None)
@click.option('--batch', help='Batch', metavar='INT', type=click.IntRange(min=1), default=8, show_default=True)
@click.option('--precision', help='fp32 or bf16 (autocast of all but the JVPs)', type=click.Choice(['fp32', 'bf16']), default='fp32', show_default=True)
@click.option('--rounds', help='Timed rounds', metavar='INT', type=click.IntRange(min=1), default=5, show_default=True)
@click.option('--threads', help='CPU threads', metavar='INT', type=click.IntRange(min=1), default=None)
@click.option('--arch-kwargs', help='Network kwargs over each preset\'s, as JSON', metavar='JSON', type=str, default=None)
def main(preset_text, device, batch, precision, rounds, threads, arch_kwargs):
    """Time the passes of ECT, sCT and MeanFlow apart on the same network width and batch."""
    try:
        device = dist.resolve_device(device)
        network_kwargs = dnnlib.util.json_object(arch_kwargs, '--arch-kwargs') if arch_kwargs else None
        option_list = [resolve_preset(name, batch, None, network_kwargs, False, None) for name in preset_text.split(',')]
    except dnnlib.UserError as e:
        raise click.UsageError(str(e)) from None
    if threads is not None:
        torch.set_num_threads(threads)
    runtime.setup_runtime(0, precision)
    dtype = torch.bfloat16 if precision == 'bf16' else None
    x = torch.randn([batch, 3, 32, 32], device=device) * 0.5
    jobs = []
    for options in option_list:
        runner = StepRunner(options, SyntheticData(32, 3, 0), precision, device)
        method = type(runner.state.method).__name__
        functions, jvp = passes(method, runner.state.net, x, dtype)
        jobs += [(f'{method}: {name}', function) for name, function in functions.items()]
        if jvp is not None:
            check_same_tangent(method, jvp)
    seconds = {name: [] for name, _ in jobs}
    for i in range(rounds + 1):   # round 0: warm-up
        for name, function in jobs[i % len(jobs):] + jobs[:i % len(jobs)]:
            value = timed(function, device)
            if i:
                seconds[name].append(value)
    print(f'batch {batch}, {precision}, {torch.get_num_threads()} thread(s), {device}, arch-kwargs {arch_kwargs}, '
          f'median of {rounds} interleaved rounds')
    for name, values in seconds.items():
        print(f'{name:<44}{statistics.median(values):>9.3f} s')
    for name, function in jobs:
        if 'JVP' in name:
            parts = op_breakdown(function)
            print(f'{name} by operator (self CPU s): ' + ', '.join(f'{k} {v:.3f}' for k, v in sorted(parts.items())))


if __name__ == '__main__':
    main()

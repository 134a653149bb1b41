"""Correctness checks that need a CUDA device, and the report of bench/gpu_check.sh.

    python bench/gpu_check.py checks                                   # shared dropout (ECT, CD/CT), fp16 GradScaler
    python bench/gpu_check.py nosync                                   # no host sync inside training steps
    python bench/gpu_check.py compile                                  # torch.compile vs eager, graph breaks
    torchrun --standalone --nproc_per_node=2 bench/gpu_check.py ddp    # the Trainer under DDP (bench/ddp_check.py)
    python bench/gpu_check.py report DIR --out=bench/results/NAME      # DIR/*.json -> NAME.json + NAME.md

Every check prints one `PASS`/`FAIL` (or `INFO`/`SKIP`) line with its measured numbers (`report` reads them back
from gpu_check.sh's log, so a section cut short keeps the lines it printed), and the command exits with status 1
when any failed. The networks are small DDPM++
U-Nets (random weights) so the checks take seconds. `--allow-cpu` runs the code on the CPU (a dry run: the
CUDA-only parts report SKIP).
"""

import glob
import json
import os
import re
import sys
import tempfile
import traceback

import click
import numpy as np
import PIL.Image
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dnnlib  # noqa: E402
from torch_utils import distributed as dist  # noqa: E402
from configs import presets  # noqa: E402
from training.loop import runtime  # noqa: E402
from training.compile import compile_counters, compile_network, reset_compile_counters  # noqa: E402
from training.loop import training_loop as tl  # noqa: E402
from training.methods.loss import ECTLoss, tuning_kwargs  # noqa: E402
from training.methods.loss_cm import consistency_loss  # noqa: E402
from training.methods.consistency_models import frozen_copy  # noqa: E402
from bench import ddp_check, gpu_report  # noqa: E402
from bench.bench_train import SyntheticData, synthetic_batches  # noqa: E402

SMALL_NET = dict(model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[16])
DATA = SyntheticData(32, 3, 0)


def small_net(device, dropout, seed=0):
    """A small DDPM++ ECMPrecond (train mode) of the cifar10-ecm preset with the given dropout."""
    options = presets.resolve('cifar10-ecm', dict(transfer='none', dropout=dropout, network_kwargs=SMALL_NET))
    return runtime.build_network(options.network_kwargs, DATA, None, device, seed)


CHECK_LINE = re.compile(r'^(PASS|FAIL|INFO|SKIP)  ([^:]+): (.*)$')   # report()'s lines, read back by `report`


def report(name, ok, detail, status=None):
    """Print one check line: status PASS/FAIL from `ok` unless given (INFO, SKIP)."""
    print(f'{status or ("PASS" if ok else "FAIL")}  {name}: {detail}', flush=True)
    return bool(ok)


def write_json(path, value):
    with dnnlib.util.atomic_write(path, 'w') as f:
        json.dump(value, f, indent=1)


def _passes(net, device, dtype, shared):
    """(f_t, f_r, the CUDA generator's next draw) of ECT's two passes with r = t, batch 16."""
    gen = torch.Generator(device).manual_seed(1)
    x0 = torch.randn([16, 3, 32, 32], device=device, generator=gen)
    eps = torch.randn(x0.shape, device=device, generator=gen)
    t = torch.rand([16, 1, 1, 1], device=device, generator=gen) * 2 + 0.1
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        f_t, f_r = ECTLoss().prediction_and_target(net, x0, t, t, eps, None, tuning_kwargs(net), shared_dropout=shared)
    return f_t.detach(), f_r, torch.rand([4], device=device)


def check_shared_dropout(device):
    """ECT's prediction and target passes with r = t and dropout 0.5 agree bit for bit (masks replayed)."""
    net = small_net(device, dropout=0.5)
    with torch.no_grad():   # away from the (near) zero initialisation of the output layers, so masks show
        gen = torch.Generator().manual_seed(2)
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(device) * 0.05)
    ok = True
    for name, dtype in [('fp32', None), ('bf16', torch.bfloat16), ('fp16', torch.float16)]:
        _passes(net, device, dtype, True)   # warm-up: cudnn.benchmark picks its algorithms here
        torch.manual_seed(5)
        f_t, f_r, after = _passes(net, device, dtype, True)
        torch.manual_seed(5)
        g_t, g_r, _ = _passes(net, device, dtype, False)
        torch.manual_seed(5)
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            net(torch.zeros(16, 3, 32, 32, device=device), torch.ones(16, 1, 1, 1, device=device), **tuning_kwargs(net))
        alone = torch.rand([4], device=device)
        detail = (f'{name}: shared max|f_t - f_r| = {(f_t - f_r).abs().max().item():.3g}, '
                  f'fresh masks max diff = {(g_t - g_r).abs().max().item():.3g}, RNG continues as after one pass: '
                  f'{torch.equal(after, alone)}')
        ok &= report('shared dropout', torch.equal(f_t, f_r) and not torch.equal(g_t, g_r) and torch.equal(after, alone),
                     detail)
    return ok


ADAM = dict(class_name='torch.optim.Adam', lr=1e-4, betas=[0.9, 0.999], eps=1e-8, foreach=True)   # fused on CUDA


def check_grad_scaler(device, optimizer=None):
    """fp16 + GradScaler: overflowing steps are skipped (weights unchanged, scale backs off), later ones apply;
    with the preset's RAdam (foreach) or an Adam (`optimizer`; fused on CUDA: the skip happens on the device)."""
    options = presets.resolve('cifar10-ecm', dict(transfer='none', batch=8, network_kwargs=SMALL_NET,
                                                  precision='fp16', optimizer=optimizer))
    state = tl.build_state(options, DATA, device)
    kind = type(state.optimizer).__name__ + (' fused' if state.optimizer.param_groups[0].get('fused') else '')
    init_exp = 40 if device.type == 'cuda' else 24   # fewer overflowing steps in a CPU dry run (slow fp16)
    state.scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** init_exp)
    net, iterator = state.net, synthetic_batches(DATA, 8)
    before = [p.detach().clone() for p in net.parameters()]
    tl.training_step(net, net, state.method.loss, state.optimizer, iterator, 1, 8, 1e-4, device, torch.float16,
                     state.scaler)
    skipped = all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    first_scale = state.scaler.get_scale()
    for steps in range(2, 61):   # each overflow halves the scale; stop at the first step that applies
        scale = state.scaler.get_scale()
        tl.training_step(net, net, state.method.loss, state.optimizer, iterator, 1, 8, 1e-4, device, torch.float16,
                         state.scaler)
        if state.scaler.get_scale() >= scale:
            break
    moved = not all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    finite = all(bool(torch.isfinite(p).all()) for p in net.parameters())
    return report(f'fp16 GradScaler ({kind})', skipped and first_scale == 2.0 ** (init_exp - 1) and moved and finite,
                  f'first step skipped: {skipped}, scale 2^{init_exp} -> {first_scale:g}, applied after {steps} steps at '
                  f'scale {state.scaler.get_scale():g}: {moved}, weights finite: {finite}')


def write_dataset(root, num_images=64, resolution=32):
    """An EDM-format folder of random 32x32 RGB PNGs (what the Trainer reads)."""
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, '00000'))
    for i in range(num_images):
        image = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
        PIL.Image.fromarray(image).save(os.path.join(root, '00000', f'img{i:08d}.png'))
    return root


def _first_repo_frame(error):
    """'file:line: code' of the innermost frame of this repository in `error`'s traceback."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename.startswith(root)]
    frame = frames[-1] if frames else traceback.extract_tb(error.__traceback__)[-1]
    return f'{os.path.relpath(frame.filename, root)}:{frame.lineno}: {frame.line}'


def check_no_sync(device, precision, optimizer=None, expect_sync=False, steps=5):
    """Trainer.step() (the loop's own step: data on the device, loss, backward, optimiser, EMA, statistics) under
    torch.cuda.set_sync_debug_mode('error') after warm-up steps: no host synchronisation inside a step."""
    name = f'no host sync per step ({precision}, {(optimizer or {}).get("class_name", "preset RAdam")})'
    with tempfile.TemporaryDirectory() as tmp:
        options = presets.resolve('cifar10-ecm', dict(
            data=write_dataset(os.path.join(tmp, 'data')), transfer='none', batch=16, network_kwargs=SMALL_NET,
            dropout=0.2, precision=precision, optimizer=optimizer, workers=0, data_on_device=True))
        trainer = tl.Trainer(options, tmp)
        for _ in range(3 if device.type == 'cuda' else 1):   # warm-up: cudnn.benchmark, allocator, lazy state
            trainer.step()
        if device.type != 'cuda':
            return report(name, True, 'the steps ran; sync detection needs CUDA', status='SKIP')
        torch.cuda.synchronize(device)
        torch.cuda.set_sync_debug_mode('error')
        try:
            for _ in range(steps):
                trainer.step()
            error = None
        except RuntimeError as e:
            error = e
        finally:
            torch.cuda.set_sync_debug_mode(0)
    resolved = trainer.run_ctx.options.precision
    if error is None:
        return report(name, True, f'{steps} steps in {resolved}, no synchronising CUDA call')
    where = f'{str(error).splitlines()[0]} at {_first_repo_frame(error)}'
    return report(name, expect_sync, f'{resolved}: {where}' + (' (expected: a non-fused optimiser under the '
                                                              'GradScaler reads found_inf on the host)' if expect_sync else ''),
                  status='INFO' if expect_sync else None)


def check_graph_breaks(net, *args, **kwargs):
    """torch._dynamo.explain of one call: PASS when the network compiles into one graph."""
    explanation = torch._dynamo.explain(net)(*args, **kwargs)
    reasons = sorted({str(getattr(r, 'reason', r)).splitlines()[0] for r in explanation.break_reasons})
    torch._dynamo.reset()
    mode = 'train' if net.training else 'eval'
    return report(f'graph breaks ({mode})', explanation.graph_break_count == 0,
                  f'{explanation.graph_count} graph(s), {explanation.graph_break_count} break(s)'
                  + (f': {"; ".join(reasons[:3])}' if reasons else ''))


def check_compile(device):
    """torch.compile of the network: eval output vs eager, shared dropout compiled, graph breaks (dynamo)."""
    eager = small_net(device, dropout=0.5)
    x = torch.randn(16, 3, 32, 32, device=device)
    sigma = torch.rand(16, device=device) + 0.1
    breaks_ok = [check_graph_breaks(eager.eval(), x, sigma, **tuning_kwargs(eager)),
                 check_graph_breaks(eager.train(), x, sigma, **tuning_kwargs(eager))]
    compiled = compile_network(eager)   # what --compile uses
    with torch.no_grad():
        eager.eval()
        diff = (compiled(x, sigma, **tuning_kwargs(eager)) - eager(x, sigma, **tuning_kwargs(eager))).abs().max().item()
        eager.train()
    torch.manual_seed(5)
    f_t, f_r, _ = _passes(compiled, device, None, True)
    return all(breaks_ok) & report('compiled vs eager', diff < 1e-4 and torch.equal(f_t, f_r),
                  f'eval max|compiled - eager| = {diff:.3g}; compiled passes with r = t bit-identical: '
                  f'{torch.equal(f_t, f_r)} (max diff {(f_t - f_r).abs().max().item():.3g})')


def _one_level_losses(model, target, teacher, shared, device):
    """CD (with `teacher`) or CT per-sample losses of batch 16 on one noise level (σmin = σmax: x̂ = x_t)."""
    gen = torch.Generator(device).manual_seed(1)
    x0 = torch.randn([16, 3, 32, 32], device=device, generator=gen)
    noise = torch.randn(x0.shape, device=device, generator=gen)
    return consistency_loss(model, target, x0, noise, torch.zeros([16], dtype=torch.long, device=device), 2,
                            teacher=teacher, shared_dropout=shared, sigma_min=1.0, sigma_max=1.0)


def check_cm_shared_dropout(device, compiled=False):
    """CT's and CD's student and target (θ⁻ = θ) see the same input at dropout 0.5: losses exactly 0 with shared
    masks, positive with fresh ones; eager, or compiled (the target runs the student's graph with θ⁻), where no
    frame compiles after the first step."""
    net = small_net(device, dropout=0.5, seed=2)
    with torch.no_grad():   # away from the zero initialisation of the output layers, so masks show
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model, target = compile_network(net) if compiled else net, frozen_copy(net, train=True)
    ok = True
    for name, teacher in [('CT', None), ('CD', frozen_copy(net, train=False))]:
        _one_level_losses(model, target, teacher, True, device).sum().backward()   # warm-up: compile, cudnn
        reset_compile_counters()
        torch.manual_seed(5)
        shared = _one_level_losses(model, target, teacher, True, device)
        fresh = _one_level_losses(model, target, teacher, False, device)
        frames = compile_counters()['frames']
        ok &= report(f'{name} shared dropout ({"compiled" if compiled else "eager"})',
                     bool((shared == 0).all() and (fresh > 0).all()) and frames == 0,
                     f'shared masks max loss = {shared.max().item():.3g}, fresh masks min loss = '
                     f'{fresh.min().item():.3g}, frames compiled after the first step: {frames}')
    return ok


@click.group()
def main():
    """CUDA correctness checks of the training step, and the report of bench/gpu_check.sh."""


def _device(allow_cpu):
    """This process's CUDA device (the training loop's flags set); the CPU only with --allow-cpu (a dry run)."""
    device = runtime.setup_runtime(0, 'fp32')
    if device.type != 'cuda' and not allow_cpu:
        raise click.ClickException('no CUDA device: these checks need a GPU (--allow-cpu for a dry run)')
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'
    print(f'device: {name}, torch {torch.__version__}', flush=True)
    return device


ALLOW_CPU = click.option('--allow-cpu', help='Run on the CPU when there is no GPU (a dry run of the code)', is_flag=True)


@main.command()
@ALLOW_CPU
def checks(allow_cpu):
    """Shared dropout (ECT, CD/CT) and the fp16 GradScaler (RAdam foreach, Adam fused on CUDA) on this process's
    device."""
    device = _device(allow_cpu)
    sys.exit(0 if all([check_shared_dropout(device), check_cm_shared_dropout(device), check_grad_scaler(device),
                       check_grad_scaler(device, ADAM)]) else 1)


@main.command()
@ALLOW_CPU
def nosync(allow_cpu):
    """No host synchronisation inside steady-state training steps (fp32, auto = bf16 on CUDA, fp16 fused Adam)."""
    device = _device(allow_cpu)
    results = [check_no_sync(device, 'fp32'), check_no_sync(device, 'auto'), check_no_sync(device, 'fp16', ADAM),
               check_no_sync(device, 'fp16', expect_sync=True)]
    sys.exit(0 if all(results) else 1)


@main.command(name='compile')
@ALLOW_CPU
def compile_check(allow_cpu):
    """torch.compile of the network against eager, its graph breaks, CD/CT's shared dropout compiled (compile time
    included)."""
    device = _device(allow_cpu)
    sys.exit(0 if all([check_compile(device), check_cm_shared_dropout(device, compiled=True)]) else 1)


@main.command()
@ALLOW_CPU
def ddp(allow_cpu):
    """One step of the real Trainer under DDP equals one process's step on the whole batch, with every rank
    drawing its own noise; run under torchrun with 2 processes (a GPU each, or sharing one GPU over gloo; gloo on
    the CPU)."""
    print(f'process group: {ddp_check.init_processes()}', flush=True)
    ok = ddp_check.check_trainer_ddp(_device(allow_cpu), report, write_dataset=write_dataset)
    if dist.is_distributed():
        torch.distributed.destroy_process_group()
    sys.exit(0 if ok else 1)


@main.command(name='report')
@click.argument('results_dir', type=click.Path(exists=True, file_okay=False))
@click.option('--out', 'out_prefix', help='Write OUT.json and OUT.md', metavar='OUT', type=str, required=True)
@click.option('--header', help='Lines above the tables (device, versions, budget)', metavar='TEXT', type=str, default='')
def report_command(results_dir, out_prefix, header):
    """Merge RESULTS_DIR's check lines (log.txt: also those of a section cut short by its limit) and JSON files
    (benchmark rows, sections) into OUT.json and a markdown OUT.md."""
    records = []
    if os.path.isfile(os.path.join(results_dir, 'log.txt')):
        with open(os.path.join(results_dir, 'log.txt')) as f:
            matches = [CHECK_LINE.match(line.rstrip('\n')) for line in f]
        records += [dict(kind='check', status=m[1], name=m[2], detail=m[3]) for m in matches if m]
    for path in sorted(glob.glob(os.path.join(results_dir, '*.json'))):
        with open(path) as f:
            loaded = json.load(f)
        records += [dict(r, source=os.path.basename(path)) for r in (loaded if isinstance(loaded, list) else [loaded])]
    write_json(out_prefix + '.json', dict(header=header, records=records))
    with dnnlib.util.atomic_write(out_prefix + '.md', 'w') as f:
        f.write(gpu_report.markdown(header, records))
    print(f'wrote {out_prefix}.json and {out_prefix}.md ({len(records)} records)')


if __name__ == '__main__':
    main()

"""Does Winograd F(4x4,3x3) pay on this CPU? Per-convolution timings against the direct conv2d, interleaved.

    python bench/bench_winograd.py                      # the DDPM++ CIFAR-10 shapes at batch 4, one thread
    python bench/bench_winograd.py --batch=8 --threads=2 --json=rows.json

For each layer shape, the direct convolution (oneDNN) and training.networks.winograd.conv3x3 (compiled tile
transforms, as train.py --winograd runs them) alternate for --rounds rounds; each round times one forward pass
without gradients (the ECT target pass) and one forward + backward (the prediction pass). Medians per shape, their
ratio (winograd / direct) and the maximum error of both against float64, relative to the output's range. The
first call of each shape compiles its transforms and is timed on its own ('compile s').
"""

import json
import os
import statistics
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dnnlib  # noqa: E402
from training.networks import winograd  # noqa: E402

# (input channels, output channels, side): the 3x3 convolutions of DDPM++ at CIFAR-10 width.
DDPMPP_SHAPES = [(256, 256, 32), (512, 256, 32), (384, 256, 32), (128, 256, 32), (256, 256, 16), (512, 256, 16),
                 (256, 256, 8)]


def direct(x, w):
    return torch.nn.functional.conv2d(x, w, padding=1)


def timed(fn, x, w, upstream, backward):
    start = time.perf_counter()
    if backward:
        torch.autograd.backward(fn(x, w), upstream)
    else:
        with torch.no_grad():
            fn(x, w)
    return time.perf_counter() - start


def relative_error(fn, x, w):
    with torch.no_grad():
        expected = direct(x.double(), w.double())
        return float((fn(x, w).double() - expected).abs().max() / expected.abs().max())


def measure(batch, cin, cout, side, rounds):
    """One row: medians of forward / forward+backward per algorithm, compile seconds, errors."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cin, side, side, generator=gen).requires_grad_(True)
    w = (torch.randn(cout, cin, 3, 3, generator=gen) / (3 * cin ** 0.5)).requires_grad_(True)
    upstream = torch.randn(batch, cout, side, side, generator=gen)
    start = time.perf_counter()
    timed(winograd.conv3x3, x, w, upstream, True)
    timed(winograd.conv3x3, x, w, upstream, False)
    compile_s = time.perf_counter() - start
    algorithms = dict(direct=direct, winograd=winograd.conv3x3)
    times = {(name, b): [] for name in algorithms for b in (False, True)}
    for _ in range(rounds):
        for name, fn in algorithms.items():
            for b in (False, True):
                times[name, b].append(timed(fn, x, w, upstream, b))
    med = {key: statistics.median(v) for key, v in times.items()}
    return dict(batch=batch, cin=cin, cout=cout, side=side, compile_s=compile_s,
                direct_fwd_ms=med['direct', False] * 1e3, direct_fwd_bwd_ms=med['direct', True] * 1e3,
                winograd_fwd_ms=med['winograd', False] * 1e3, winograd_fwd_bwd_ms=med['winograd', True] * 1e3,
                fwd_ratio=med['winograd', False] / med['direct', False],
                fwd_bwd_ratio=med['winograd', True] / med['direct', True],
                direct_error=relative_error(direct, x, w), winograd_error=relative_error(winograd.conv3x3, x, w))


@click.command()
@click.option('--batch', help='Images per convolution', metavar='INT', type=click.IntRange(min=1), default=4, show_default=True)
@click.option('--threads', help='torch threads', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--rounds', help='Interleaved rounds per shape', metavar='INT', type=click.IntRange(min=1), default=6, show_default=True)
@click.option('--json', 'json_path', help='Also write the rows to this JSON file', metavar='FILE', type=str, default=None)
def main(batch, threads, rounds, json_path):
    """Time Winograd F(4x4,3x3) against direct 3x3 convolutions on the CPU."""
    torch.set_num_threads(threads)
    rows = [measure(batch, cin, cout, side, rounds) for cin, cout, side in DDPMPP_SHAPES]
    print(f'3x3 convolutions, batch {batch}, {threads} thread(s), {rounds} rounds, fp32 CPU; times in ms')
    print(f'{"shape":>18}{"direct fwd":>12}{"wino fwd":>10}{"ratio":>7}{"direct f+b":>12}{"wino f+b":>10}{"ratio":>7}'
          f'{"compile s":>11}{"err direct":>12}{"err wino":>10}')
    for r in rows:
        shape = f'{r["cin"]}->{r["cout"]} @{r["side"]}'
        print(f'{shape:>18}{r["direct_fwd_ms"]:>12.1f}{r["winograd_fwd_ms"]:>10.1f}{r["fwd_ratio"]:>7.2f}'
              f'{r["direct_fwd_bwd_ms"]:>12.1f}{r["winograd_fwd_bwd_ms"]:>10.1f}{r["fwd_bwd_ratio"]:>7.2f}'
              f'{r["compile_s"]:>11.1f}{r["direct_error"]:>12.1e}{r["winograd_error"]:>10.1e}')
    if json_path:
        with dnnlib.util.atomic_write(json_path, 'w') as f:
            json.dump([dict(r, threads=threads, rounds=rounds) for r in rows], f, indent=1)


if __name__ == '__main__':
    main()

"""torch.compile for the project's networks, shared by sampling (generate.py, fid.py, metrics.evaluate) and
training, with the compiler's counters (graph breaks, recompilations) for tests and benchmarks.

Compiling costs time once per distinct input shape (on this project's 2-core CPU: 1-3 minutes even for a
0.1M-parameter test network, for 1.1-1.2x the eager img/s; bench/bench_fid.py measures it), then every call runs
the compiled graphs. A compiled module shares its parameters with
the module it wraps and forwards attribute reads to it (`net.img_resolution`, `net.round_sigma`, ...).
"""

import collections

import torch

import dnnlib

COMPILE_HELP = ('torch.compile the network: a one-time compile per batch size before the first images (minutes on a '
                'CPU, where it barely pays: 1-3 min for a 0.1M-parameter net, 1.1x img/s; meant for long GPU runs)')


def compile_network(net, enabled=True, dynamic=False, **compile_kwargs):
    """`net` wrapped by torch.compile when `enabled` (else `net` itself). `dynamic=False` compiles one static graph
    per input shape: a sampling run meets one batch size (training.sampling.generation pads a short batch for a compiled
    network), and static graphs are the fastest. `compile_kwargs` go to torch.compile (e.g. mode='max-autotune')."""
    if not enabled:
        return net
    if not hasattr(torch, 'compile'):
        raise dnnlib.UserError(f'--compile: torch {torch.__version__} has no torch.compile (needs torch >= 2.0)')
    return torch.compile(net, dynamic=dynamic, **compile_kwargs)


def is_compiled(net):
    return isinstance(net, torch._dynamo.eval_frame.OptimizedModule)


def compile_counters():
    """A snapshot of the compiler's counters since the last reset: frames compiled ('frames', a recompilation
    adds one), graphs made ('graphs'), graph breaks ('graph_breaks', with their reasons in 'break_reasons')."""
    counters = torch._dynamo.utils.counters
    breaks = collections.Counter(counters['graph_break'])
    return dict(frames=int(counters['frames']['ok']), graphs=int(counters['stats']['unique_graphs']),
                graph_breaks=int(breaks.total()), break_reasons=dict(breaks))


def reset_compile_counters():
    torch._dynamo.utils.counters.clear()

"""The target passes of ECT and of CD/CT through a torch.compile'd network (train.py --compile).

The training loop compiles the trained network and puts DDP around the compiled module (`compiled_network`
finds it again); EMA copies, snapshots and training states always hold the plain module. torch's DDP notes
recommend the other order, compile(DDP(net)), whose DDPOptimizer splits the graph at gradient buckets so the
all-reduce overlaps the backward; DDP(compile(net)) gives that overlap up (the all-reduce starts when the
compiled backward ends) for two things: the target pass can call the compiled module without DDP (below), and
DDP's no_sync() for gradient accumulation (torch_utils.misc.ddp_sync) works unchanged.

The eager path (training.methods.loss.ECTLoss.prediction_and_target) records the prediction pass's masks on a DrawTape
and replays them; a compiled network draws no tape (none is lent to it): the tape's Python state (mode, cursor,
recorded list) would be traced into the graph, making the recording and the replaying pass different graphs.
Instead the compiled path restores the RNG state, as the official code does. Why the two passes then share
dropout masks exactly: inductor lowers every random op of a graph to its own counter-based generator, seeded by one seed tensor that
each CALL of the compiled graph draws from torch's global generator (the CPU one, or the CUDA one of the
device). Saving the global RNG state before the prediction pass and restoring it for the target pass therefore
gives the target call the same seeds; and since the target runs the very same compiled graph (same kernels,
same random offsets), it draws the same masks. The target pass runs with gradients enabled (its output
detached) rather than under no_grad: no_grad would compile a second, inference graph (another compile, and its
fusions may round differently), while the same graph reproduces the prediction bit for bit when r = t.
torch._inductor.config.fallback_random is not needed. Under compilation the networks' dropout draws its masks
functionally (training/networks/randomness.dropout: inductor mis-orders the eager path's in-place bernoulli_);
tests/test_compile_train.py checks r = t bit for bit at dropout 0.5, compiled and eager.

CD/CT's target θ⁻ (an EMA of the student, a separate module whose eager draws can never match the graph's) runs
the student's graph too (`target_pass`, with its own parameters and buffers lent by torch.func.functional_call).
They go in as Parameter views with the student's requires_grad, which is what the graph's guards check: plain
tensors recompile once, detached ones compile a second graph that rounds differently (4.8e-7 at θ⁻ = θ).
tests/test_compile_cm.py checks CD/CT's loss 0 on one noise level with θ⁻ = θ and no recompilation.
"""

import torch

from torch_utils import misc


def compiled_network(net):
    """The torch.compile'd module `net` is, or that DDP wraps (DDP(compile(net)), as the training loop builds it);
    None for an eager network."""
    if isinstance(net, torch.nn.parallel.DistributedDataParallel):
        net = net.module
    return net if isinstance(net, torch._dynamo.eval_frame.OptimizedModule) else None


def prediction_and_target(net, compiled, x0, t, r, eps, labels, kwargs, shared_dropout):
    """(f_t, f_r) of docs/ECT.md §3 steps 3-5 for a compiled network: f_t through `net` (DDP or the compiled module)
    with gradients, f_r through `compiled` (the same graph, outside DDP: a second grad-enabled call through DDP
    would prepare its reducer for a backward that never comes), detached; same dropout masks unless
    `shared_dropout` is False."""
    rng = misc.TorchRNGSnapshot(x0.device)
    f_t = net(x0 + t * eps, t, labels, **kwargs)

    def target():
        return target_pass(compiled, (x0 + r * eps, r, labels), kwargs)
    f_r = rng.replay(target) if shared_dropout else target()
    f_r = f_r.to(f_t.dtype).nan_to_num()
    return f_t, torch.where(r > 0, f_r, x0.to(f_t.dtype))


def target_pass(compiled, args, kwargs=None, weights=None):
    """compiled(*args, **kwargs), detached, through the graph of the grad-enabled prediction pass (so with
    gradients enabled), run with the parameters and buffers of `weights` (a module of the compiled one's
    architecture and mode: CD/CT's target θ⁻) when given, else with its own (ECT)."""
    with torch.enable_grad():
        if weights is None:
            return compiled(*args, **(kwargs or {})).detach()
        if weights.training != compiled.training:
            raise ValueError('target_pass: `weights` must be in the mode of the compiled module (train or eval)')
        own = dict(compiled.named_parameters())
        tensors = {f'_orig_mod.{name}': b for name, b in weights.named_buffers()}
        for name, p in weights.named_parameters():
            key = f'_orig_mod.{name}'
            tensors[key] = torch.nn.Parameter(p.detach(), requires_grad=own[key].requires_grad)
        return torch.func.functional_call(compiled, tensors, args, kwargs, strict=True).detach()

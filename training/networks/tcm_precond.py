"""The two-network consistency function of Truncated Consistency Models' stage 2 (Lee et al. 2024, docs/TCM.md §2).

TCM's stage 2 trains a network only on [t′, T]; below the transition time t′ the consistency function is the frozen
stage-1 network's. NVlabs/TCM (training/networks_tcm.py, TCMPrecond) evaluates the frozen network on the whole batch
without gradients wherever some t < t′, the trained network on the whole batch wherever some t ≥ t′, both with the
same dropout masks (it restores the CUDA RNG state in between), and keeps each sample's output from its side of t′.
Here each network evaluates only its own samples, and the masks are shared through a DrawTape
(training/networks/randomness.py): the caller records the masks in one pass and this function replays their rows.

Only training uses this function: sampling a TCM snapshot needs the stage-2 network alone (NVlabs/TCM's
ct_eval.generator_fn samples its `ema` at t_max and the intermediate times, never the stage-1 network).
"""

import contextlib

import torch


def to_device(tensor, device):
    """`tensor` (on the CPU) on `device` without waiting for the device's queue: a pinned, non-blocking copy on CUDA."""
    if device.type != 'cuda':
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _replaying(tape, rows):
    return tape.replaying(rows) if tape is not None else contextlib.nullcontext()


class TCMPrecond:
    """f(x, t) of TCM's stage 2: the trained network for t ≥ t′, the frozen stage-1 network below (docs/TCM.md §2).

    Not a torch.nn.Module: it holds the networks without owning their parameters (the trained one may be DDP-wrapped).
    """

    def __init__(self,
        stage1,             # frozen stage-1 network (train mode for dropout, no gradients), used for t < t′
        stage2,             # trained network, used for t ≥ t′
        transition_t,       # t′
    ):
        self.stage1 = stage1
        self.stage2 = stage2
        self.transition_t = float(transition_t)

    def rows(self, sigma_cpu):
        """(rows below t′, rows at or above t′) of a CPU tensor of noise levels, as CPU index tensors."""
        below = sigma_cpu.flatten() < self.transition_t
        return below.nonzero().flatten(), (~below).nonzero().flatten()

    # docs/TCM.md §2, eq. (2): f(x, t) = F_stage2(x, t) if t ≥ t′ else F_stage1(x, t) (F_stage1 without gradients).
    def __call__(self, x, sigma_cpu, class_labels=None, tape=None, **model_kwargs):
        """f(x, σ) per sample. `sigma_cpu` [N] lies on the CPU, so choosing the rows never waits for the device; with a
        `tape` holding a recorded pass, both networks replay its draws (the rows of their samples)."""
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        for net, rows_cpu in zip((self.stage1, self.stage2), self.rows(sigma_cpu)):
            if len(rows_cpu) == 0:
                continue
            rows = to_device(rows_cpu, x.device)
            sigma = to_device(sigma_cpu.flatten()[rows_cpu], x.device)
            labels = None if class_labels is None else class_labels[rows]
            grad = torch.is_grad_enabled() and net is self.stage2
            with torch.set_grad_enabled(grad), _replaying(tape, rows):
                out[rows] = net(x[rows], sigma, labels, **model_kwargs).to(torch.float32)
        return out

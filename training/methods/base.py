"""The interface between the training loop and a training method (ECT, EDM pretraining, CD, CT, ...).

A method is one class that owns everything specific to it: its loss, the extra networks it uses (a frozen
teacher, a target network with its own EMA rule, a stage-1 model) and how they are built, updated and saved,
and its schedule as a function of training progress. The loop owns everything shared: data, the trained
network, DDP, optimiser, learning rate, precision, the EMA trackers of the trained network, ticks, snapshots,
training states and pre-emption. The loop never asks which method it runs; it only calls the hooks below, in
this order:

    method = construct_class_by_name(**method_kwargs)           # hyperparameters only, no heavy work
    method.setup(net, device)                                    # once, after the trained net exists
    method.load_state_dict(state)                                # on resume only
    every step:
        scalars = method.schedule(progress)                      # before the step: stage, N(k), mu(k), ...
        loss = method.loss(net=ddp, images=images, labels=labels)   # per micro-batch: per-sample losses [N]
        (the loop sums, divides by the GLOBAL batch size, backpropagates, steps the optimiser)
        method.after_step(net, progress)                         # after the optimiser step: target EMA, ...
    method.state_dict()                                          # into every training state
    method.snapshot_metadata()                                   # into every network snapshot

`progress` is a `Progress` (below). Hooks a method does not need are inherited as no-ops.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Progress:
    """Where training stands when a hook is called (immutable; the loop makes a new one every step)."""
    cur_nimg: int          # images seen before this step (all ranks together)
    batch_size: int        # global batch size
    total_nimg: int        # training length in images
    tick_kimg: float       # images per tick, thousands

    @property
    def step(self):
        """Optimiser steps taken so far (the official codes' iteration counter)."""
        return self.cur_nimg // self.batch_size

    @property
    def tick(self):
        """Ticks completed so far (the ECT curriculum counts stages in ticks)."""
        return int(self.cur_nimg // (self.tick_kimg * 1000))


class Method:
    """Base class of training methods: every hook but `loss` is optional (a no-op here)."""

    def setup(self, net, device):
        """Build the method's own networks (teacher, target, ...) for the trained network `net` on `device`."""

    def schedule(self, progress):
        """Update the method's schedule from `progress` before a step; returns {name: number} to log."""
        return {}

    def loss(self, net, images, labels=None):
        """Per-sample losses [N] of one micro-batch (`images` in [-1, 1], float32); `net` may be DDP-wrapped."""
        raise NotImplementedError

    def after_step(self, net, progress):
        """Called after every optimiser step (e.g. the update of a target network's EMA)."""

    def state_dict(self):
        """What the method needs to continue exactly (tensors, numbers, strings): saved in training states."""
        return {}

    def load_state_dict(self, state):
        """Restore what `state_dict` returned."""

    def snapshot_metadata(self):
        """Extra metadata for network snapshots (e.g. the curriculum stage); JSON-serialisable."""
        return {}

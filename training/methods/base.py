"""The interface between the training loop and a training method (ECT, EDM pretraining, CD, CT, ...).

A method is one class that owns everything specific to it: its loss, the extra networks it uses (a frozen
teacher, a target network with its own EMA rule, a stage-1 model) and how they are built, updated and saved,
and its schedule as a function of training progress. The loop owns everything shared: data, the trained
network, DDP, optimiser, learning rate, precision, the EMA trackers of the trained network, ticks, snapshots,
training states and pre-emption. The loop never asks which method it runs; it only calls the hooks below, in
this order (presets name the method as method_kwargs=dict(class_name='training.methods.ect.ECT', ...)):

    method = construct_class_by_name(**method_kwargs)            # hyperparameters only, no heavy work
    method.check_network(net)                                     # train.py, before any work: net on 'meta'
    method.setup(net, device)                                     # once, after the trained net exists
    method.load_state_dict(state)                                 # on resume only, after setup
    method.steps_before()                                         # once: steps of an earlier run this one continues
    every step:
        scalars = method.schedule(progress)                       # before the step: stage, N(k), mu(k), ...
        loss = method.loss(net=ddp, images=images, labels=labels) # per micro-batch: per-sample losses [N]
        (the loop sums, divides by the GLOBAL batch size, backpropagates, steps the optimiser)
        method.after_step(net, progress)                          # after the optimiser step: target EMA, ...
    method.state_dict()                                           # into every training state
    method.snapshot_metadata(), method.snapshot_networks()        # with every network snapshot

`progress` is a `Progress` (below). Hooks a method does not need are inherited as no-ops.

Extra networks: build them in `setup` (from the trained `net`, e.g. copy.deepcopy(net).eval().requires_grad_(False),
or from a file named in the method's kwargs via training.checkpoints.reader.load_network) and move them to `device`;
return their tensors from `state_dict` (e.g. dict(target=target.state_dict())) and load them in
`load_state_dict`, so a resumed run continues bit-for-bit; return them from `snapshot_networks` to have them
written next to the EMA snapshots. The RNG streams are the loop's: draw from the global torch RNG only inside
`loss` (and identically on resume, which the loop guarantees by restoring every rank's RNG state).
"""

import dataclasses

from training.methods.loss import tuning_kwargs


@dataclasses.dataclass(frozen=True)
class Progress:
    """Where training stands when a hook is called (immutable; the loop makes a new one every step)."""
    cur_nimg: int          # images seen (all ranks together): before the step in schedule, after it in after_step
    batch_size: int        # global batch size
    total_nimg: int        # training length in images
    tick_kimg: float       # images per tick, thousands

    @property
    def step(self):
        """Optimiser steps taken so far (the official codes' iteration counter)."""
        return self.cur_nimg // self.batch_size

    @property
    def total_steps(self):
        """Optimiser steps of the whole run (the K of CT's N(k) schedule)."""
        return -(-self.total_nimg // self.batch_size)


class Method:
    """Base class of training methods: every hook but `loss` is optional (a no-op here)."""

    def check_network(self, net):
        """Refuse, with one dnnlib.UserError, a network this method cannot train (another form, no JVP, augment
        labels of another width). train.py calls it before any work, with the network built on the 'meta' device
        (shapes, no values); methods also call it from setup."""

    def setup(self, net, device):
        """Build the method's own networks (teacher, target, ...) for the trained network `net` on `device`,
        and decide anything that depends on the network once (e.g. the keyword arguments of its calls)."""

    def steps_before(self):
        """Optimiser steps of an earlier run that this one continues (TCM: stage 1's). The loop's learning-rate
        schedule and EMA count on from them, as if the runs were one; `Progress` still counts this run's steps.
        Called once, after setup and load_state_dict."""
        return 0

    def schedule(self, progress):
        """Update the method's schedule from `progress` before a step; returns {name: number}, which the loop
        logs every tick (status line, stats.jsonl as Progress/<name>)."""
        return {}

    def loss(self, net, images, labels=None):
        """Per-sample losses [N] of one micro-batch (`images` in [-1, 1], float32); `net` is the trained
        network, DDP-wrapped when distributed: call it (its gradients are the ones the optimiser steps on)."""
        raise NotImplementedError

    def after_step(self, net, progress):
        """Called after every optimiser step with the unwrapped trained `net` (e.g. to update a target EMA)."""

    def state_dict(self):
        """What the method needs to continue exactly (tensors, numbers, strings, lists, dicts): saved in
        training states."""
        return {}

    def load_state_dict(self, state):
        """Restore what `state_dict` returned (called after `setup`)."""

    def snapshot_metadata(self):
        """Extra metadata for network snapshots (e.g. the curriculum stage); JSON-serialisable."""
        return {}

    def snapshot_networks(self):
        """Extra networks to write with every snapshot, as {suffix: net}: network-snapshot-{kimg}{suffix}.pt."""
        return {}


class LossMethod(Method):
    """A method around one loss object of training/methods/loss.py, `self.loss_fn(net, images, labels, net_kwargs)`;
    the keyword arguments of the network calls (`tuning_kwargs`, e.g. boundary=False) are decided once in setup."""

    loss_fn = None      # set by the subclass constructor
    net_kwargs = None   # decided in setup

    def setup(self, net, device):
        self.net_kwargs = tuning_kwargs(net)

    def loss(self, net, images, labels=None):
        if self.net_kwargs is None:
            raise RuntimeError(f'{type(self).__name__}.loss: call setup(net, device) first')
        return self.loss_fn(net, images, labels, self.net_kwargs)

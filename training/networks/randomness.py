"""The random draws inside a network's forward pass (dropout, label dropout), and ECT's shared dropout.

ECT evaluates the network twice per step, f(x_t, t) with gradients and f(x_r, r) without, and both passes must
see the same dropout masks (docs/ECT.md §3 step 5). The official code draws every mask twice, restoring the RNG
state in between. Here the first pass *records* what it draws on a `DrawTape` and the second pass *replays* it:
the masks are identical by construction, the second pass draws nothing (the global RNG streams continue exactly as
with the official restore), and the replay may evaluate a subset of the batch's samples (their rows of each mask).

Modules whose forward draws random numbers declare a class attribute `draw_tape = None` and route each draw
through `draw(self.draw_tape, make)`; `sharing_draws(net)` lends one tape to all of them for one step.
"""

import contextlib
import math

import torch


class DrawTape:
    """The random tensors of one recorded forward pass, in call order (batch dimension first)."""

    def __init__(self):
        self.mode = None        # None (draw), 'record' (draw and keep) or 'replay' (reuse)
        self.draws = []         # recorded tensors, in call order
        self.cursor = 0         # next tensor to replay
        self.rows = None        # replay only these samples (index tensor); None = the whole batch

    @contextlib.contextmanager
    def recording(self):
        """Draws inside the block are kept (any previous recording is dropped)."""
        self.mode, self.draws = 'record', []
        try:
            yield self
        finally:
            self.mode = None

    @contextlib.contextmanager
    def replaying(self, rows=None):
        """Draws inside the block return the recorded tensors in order (`rows` of each: a subset of samples)."""
        self.mode, self.cursor, self.rows = 'replay', 0, rows
        try:
            yield self
        finally:
            self.mode, self.rows = None, None

    def take(self, make):
        """`make()` drawn now (and kept when recording), or the next recorded draw when replaying."""
        if self.mode != 'replay':
            value = make()
            if self.mode == 'record':
                value = _plain(value)
                self.draws.append(value)
            return value
        if self.cursor >= len(self.draws):
            raise RuntimeError('DrawTape: the replayed pass draws more often than the recorded one')
        value = self.draws[self.cursor]
        self.cursor += 1
        return value if self.rows is None else value[self.rows]


def _plain(value):
    """`value` as a plain tensor: a draw made inside torch.func.jvp comes wrapped for that call's level (with no
    tangent), and a recorded draw must stay valid, the same tensor, in every later pass, inside a JVP or not."""
    if torch.compiler.is_compiling():
        return value
    while torch._C._functorch.is_functorch_wrapped_tensor(value):
        value = torch._C._functorch.get_unwrapped(value)
    return value


def draw(tape, make):
    """A random tensor from `make()`, through `tape` when one is lent to the calling module."""
    return make() if tape is None else tape.take(make)


@contextlib.contextmanager
def sharing_draws(net):
    """Lend one DrawTape to every module of `net` (DDP-wrapped or not) that draws; yields the tape."""
    tape = DrawTape()
    modules = [m for m in net.modules() if hasattr(type(m), 'draw_tape')]
    for module in modules:
        module.draw_tape = tape
    try:
        yield tape
    finally:
        for module in modules:
            del module.draw_tape    # back to the class attribute (None): nothing is pickled with a snapshot

#----------------------------------------------------------------------------
# Dropout (Srivastava et al. 2014): x · m / (1 − p), m ~ Bernoulli(1 − p) per element.

def _float32(value):
    """`value` rounded to the nearest float32 (ties to even), as a python float (normal magnitudes)."""
    mantissa, exponent = math.frexp(value)
    return math.ldexp(round(mantissa * 2 ** 24), exponent - 24)


def dropout(x, p, training, tape=None):
    """Dropout whose mask m is drawn in the logical (NCHW) element order whatever x's memory layout.

    The mask is drawn as torch's CPU dropout draws it (bernoulli_(1 − p) into an empty contiguous tensor of x's
    dtype) and x · m is scaled by 1 / (1 − p) computed in float32 (float32 arithmetic, one rounding to x's dtype,
    as torch's CUDA dropout under bf16/fp16, not the scale rounded to bf16 first), so on the CPU the result equals
    torch.nn.functional.dropout bit for bit for a contiguous float32 x; a channels-last x gets the same masks as
    its contiguous twin. The tape records the masks.
    """
    if not training or p == 0:
        return x
    if p >= 1:
        return x * 0
    keep = 1 - p

    def make():
        if torch.compiler.is_compiling():
            # torch 2.13's inductor runs the in-place bernoulli_ of an empty buffer after the kernel that reads
            # it (NaN outputs on the CPU): a functional draw there (its own masks, shared by the compiled passes),
            # uniform in float32 (a bf16 uniform keeps 0.6016 of the units at keep 0.6, 0.8984 at 0.9).
            return (torch.rand(x.shape, dtype=torch.float32, device=x.device) < keep).to(x.dtype)
        return torch.empty(x.shape, dtype=x.dtype, device=x.device).bernoulli_(keep)
    return (x * draw(tape, make)).mul_(_float32(1 / _float32(keep)))


# Classifier-free-guidance label dropout (Ho & Salimans 2022): each sample's label is zeroed with prob. p.
def drop_labels(class_labels, label_dropout, training, tape=None):
    if not (training and label_dropout):
        return class_labels
    keep = draw(tape, lambda: torch.rand([class_labels.shape[0], 1], device=class_labels.device) >= label_dropout)
    return class_labels * keep.to(class_labels.dtype)

"""CD/CT under train.py --compile: the target θ⁻ runs the student's compiled graph with its own weights
(training.methods.loss_compiled.target_pass), so the student's and the target's passes share dropout masks as in eager mode.

On the CPU, with inductor, on a tiny ECMPrecond (8x8 DhariwalUNet, one level). It stands for the GPU because the
mechanism is the device's own generator: a compiled graph draws its masks from one seed per call taken from the
global generator of its device (the CPU's here, the CUDA device's on a GPU), and misc.TorchRNGSnapshot restores
both; bench/gpu_check.py repeats the loss-0 check on CUDA, eager and compiled.

With σmin = σmax every level of the Karras grid is the same σ and the ODE step moves nothing (x̂ = x_t exactly),
so student and target see the same input: with θ⁻ = θ and shared masks their outputs, and the loss, are exactly 0.
Two inductor compiles (dropout 0.5 and 0): a minute or two each on a busy CPU the first time, seconds once
torch's compile cache holds them.
"""

import pytest
import torch

from training.checkpoints import checkpoint
from training import compile as tc
from training.methods import loss_cm
from training.methods import loss_compiled
from training import networks
from training.methods import consistency_models as cmm
from training.methods.base import Progress

TINY = dict(img_resolution=8, img_channels=3, label_dim=0, model_type='DhariwalUNet', model_channels=16,
            channel_mult=[1], num_blocks=1, attn_resolutions=[])
ONE_LEVEL = dict(sigma_min=1.0, sigma_max=1.0, loss_norm='l2')
BATCH = 4


def tiny_ecm(dropout):
    """A train-mode ECMPrecond with every weight perturbed (the output layer starts at zero, where masks would not
    show)."""
    torch.manual_seed(0)
    net = networks.ECMPrecond(sigma_min=0.002, dropout=dropout, **TINY).train()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return net


def images(seed=0):
    return torch.rand(BATCH, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def progress(step):
    return Progress(cur_nimg=step * BATCH, batch_size=BATCH, total_nimg=100 * BATCH, tick_kimg=1.0)


def compiled_warm(net):
    """(`net` compiled and warmed up by one student-shaped call and its backward, the compiler counters of a first
    target pass with θ⁻ after that: it must reuse the student's graph)."""
    compiled = tc.compile_network(net)
    compiled(images(), torch.ones(BATCH), None).sum().backward()
    net.zero_grad(set_to_none=True)
    tc.reset_compile_counters()
    loss_compiled.target_pass(compiled, (images(), torch.ones(BATCH), None), weights=cmm.frozen_copy(net, True))
    return compiled, tc.compile_counters()


@pytest.fixture(scope='module')
def masked():
    """(eager, compiled, first target pass's counters) at dropout 0.5."""
    net = tiny_ecm(dropout=0.5)
    return net, *compiled_warm(net)


@pytest.fixture(scope='module')
def plain():
    """(eager, compiled) at dropout 0."""
    net = tiny_ecm(dropout=0.0)
    return net, compiled_warm(net)[0]


@pytest.fixture(scope='module')
def teacher_file(tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp('teacher') / 'teacher.pt'
    checkpoint.save_network_snapshot(str(path), networks.EDMPrecond(dropout=0.1, **TINY))
    return str(path)


def methods(net, teacher_file, shared_dropout=True):
    """CT and CD on one noise level, set up for `net` (θ⁻ = θ), scheduled for step 0."""
    found = [cmm.ConsistencyTraining(shared_dropout=shared_dropout, **ONE_LEVEL),
             cmm.ConsistencyDistillation(teacher=teacher_file, shared_dropout=shared_dropout, **ONE_LEVEL)]
    for method in found:
        method.setup(net, torch.device('cpu'))
        method.schedule(progress(0))
    return found


def test_shared_masks_give_loss_zero_compiled_as_eager(masked, teacher_file):
    """θ⁻ = θ, same input, dropout 0.5: CT's and CD's per-sample losses are exactly 0 eager and compiled (the old
    compiled path, an eager target, drew other masks: losses ~0.1); fresh masks give a positive loss (masks matter)."""
    for net in masked[:2]:
        for method in methods(net, teacher_file):
            torch.manual_seed(3)
            losses = method.loss(net, images())
            assert torch.equal(losses, torch.zeros(BATCH)), (type(method).__name__, losses)
        for method in methods(net, teacher_file, shared_dropout=False):
            torch.manual_seed(3)
            assert (method.loss(net, images()) > 1e-2).all()


def test_compiled_target_runs_the_targets_weights(plain):
    """Dropout 0, θ⁻ ≠ θ: the compiled target pass gives the eager target's output (float32 rounding), far from
    the student's; CT's loss and every student gradient match eager (the student's weights are back for backward)."""
    net, compiled = plain
    target = cmm.frozen_copy(net, train=True)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x, sigma = images(1), torch.rand(BATCH) + 0.5
    got = loss_compiled.target_pass(compiled, (x, sigma, None), weights=target)
    with torch.no_grad():
        expected, student = target(x, sigma, None), net(x, sigma, None)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert (got - student).abs().max() > 1e-2
    noise, results = torch.randn(BATCH, 3, 8, 8, generator=torch.Generator().manual_seed(4)), []
    for model in (net, compiled):
        net.zero_grad(set_to_none=True)
        losses = loss_cm.consistency_loss(model, target, images(2), noise, torch.tensor([0, 5, 20, 38]), 40)
        losses.sum().backward()
        results.append((losses.detach(), [p.grad.clone() for p in net.parameters()]))
    (eager_losses, eager_grads), (losses, grads) = results
    torch.testing.assert_close(losses, eager_losses, rtol=1e-4, atol=1e-6)
    scale = max(grad.abs().max().item() for grad in eager_grads)
    for grad, eager_grad in zip(grads, eager_grads):
        torch.testing.assert_close(grad, eager_grad, rtol=1e-4, atol=1e-5 * scale)


def test_training_steps_compile_nothing_more(masked, teacher_file):
    """After the student's first compiled call, the first target pass with θ⁻ and then CT and CD steps (student,
    target, backward, SGD, target EMA) compile no frame and graph more and break no graph: the target reuses the
    student's graph (plain tensors for θ⁻ would recompile once, at the first target pass)."""
    net, compiled, first_target = masked
    assert first_target['frames'] == 0 and first_target['graphs'] == 0, first_target
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-2)
    tc.reset_compile_counters()
    for method in methods(net, teacher_file):
        for step in range(2):
            method.schedule(progress(step))
            method.loss(compiled, images(step)).sum().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            method.after_step(net, progress(step + 1))
    counters = tc.compile_counters()
    assert counters['frames'] == 0 and counters['graphs'] == 0 and counters['graph_breaks'] == 0, counters


def test_target_pass_refuses_weights_in_another_mode():
    """θ⁻ in eval mode for a train-mode graph: an error rather than the graph's train-mode dropout on θ⁻ (raised
    before the compiled module is called: nothing compiles)."""
    net = tiny_ecm(dropout=0.5)
    with pytest.raises(ValueError, match='mode of the compiled module'):
        loss_compiled.target_pass(tc.compile_network(net), (images(), torch.ones(BATCH), None),
                                  weights=cmm.frozen_copy(net, train=False))

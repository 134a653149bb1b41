"""The 2D adaptive-weighting study (ECT Appendix B): loss formula, metrics and the CLI end to end."""

import math

import torch
from click.testing import CliRunner

from training.methods import toy_swissroll as toy


class _ConstantVelocity(torch.nn.Module):
    def __init__(self, velocity):
        super().__init__()
        self.velocity = torch.nn.Parameter(torch.tensor(velocity))

    def forward(self, x, t):
        return self.velocity.expand(x.shape[0], 2)


def _loss_and_reference(p, eps):
    data = torch.randn(16, 2, generator=torch.Generator().manual_seed(3))
    net = _ConstantVelocity([0.3, -0.2])
    loss = toy.adaptive_flow_matching_loss(net, data, p, eps, torch.Generator().manual_seed(7))
    # Independent float64 recomputation with the same draws (noise first, then t).
    gen = torch.Generator().manual_seed(7)
    noise = torch.randn(data.shape, generator=gen).double()
    torch.rand(data.shape[0], generator=gen)
    sq = ((net.velocity.detach().double() - (data.double() - noise)) ** 2).sum(dim=1)
    return loss, float((sq / (sq + eps) ** p).mean())


def test_loss_is_plain_flow_matching_at_p0_and_weighted_otherwise():
    for p in (0.0, 0.5, 1.0):
        loss, reference = _loss_and_reference(p, eps=1e-3)
        assert math.isclose(loss.item(), reference, rel_tol=1e-5), p


def test_adaptive_weight_is_stop_gradient():
    # With p = 1 the weighted loss's gradient is that of log(‖Δ‖² + ε), not of the ratio ‖Δ‖²/(‖Δ‖²+ε).
    data = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    net = _ConstantVelocity([0.1, 0.4])
    toy.adaptive_flow_matching_loss(net, data, 1.0, 1e-3, torch.Generator().manual_seed(1)).backward()
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(data.shape, generator=gen)
    torch.rand(data.shape[0], generator=gen)
    velocity = net.velocity.detach().clone().requires_grad_(True)
    sq = ((velocity - (data - noise)) ** 2).sum(dim=1)
    torch.log(sq + 1e-3).mean().backward()
    assert torch.allclose(net.velocity.grad, velocity.grad, rtol=1e-5, atol=1e-7)


def test_sliced_wasserstein_of_translation_has_closed_form():
    points = torch.randn(256, 2, generator=torch.Generator().manual_seed(0)).double()
    shift = torch.tensor([0.5, -1.0], dtype=torch.float64)
    assert toy.sliced_wasserstein(points, points) == 0.0
    gen = torch.Generator().manual_seed(5)
    directions = torch.randn(64, 2, generator=gen, dtype=torch.float64)
    directions = directions / directions.norm(dim=1, keepdim=True)
    expected = float((directions @ shift).square().mean().sqrt())
    assert math.isclose(toy.sliced_wasserstein(points + shift, points, num_projections=64, seed=5), expected, rel_tol=1e-9)


def test_manifold_distance_is_nearest_neighbour_mean():
    reference = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    samples = torch.tensor([[0.0, 1.0], [3.0, -2.0]])
    assert math.isclose(toy.manifold_distance(samples, reference), 1.5)


def test_cli_writes_figure_and_table(tmp_path):
    result = CliRunner().invoke(toy.main, ['--outdir', str(tmp_path), '--p', '0,1', '--nfe', '1,2', '--steps', '5', '--batch', '64'])
    assert result.exit_code == 0, result.output
    assert 'distance from samples to the roll' in result.output
    assert (tmp_path / 'swissroll.png').stat().st_size > 0
    table = (tmp_path / 'swissroll.txt').read_text().splitlines()
    assert table[1].split() == ['p', '1', '2'] and table[2].startswith('0.00') and table[3].startswith('1.00')


def test_cli_rejects_bad_lists(tmp_path):
    result = CliRunner().invoke(toy.main, ['--outdir', str(tmp_path), '--nfe', '1,x'])
    assert result.exit_code == 2 and '--nfe' in result.output

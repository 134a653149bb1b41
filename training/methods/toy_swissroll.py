"""The paper's 2D study of adaptive weighting (ECT paper, Appendix B, Fig. 6).

Flow matching on a swiss roll with a small MLP, trained with the adaptive weighting
w = sg(1 / (‖Δ‖² + ε)^p), Δ = v_θ(x_t, t) − (x1 − x0), for strengths p from 0 (plain flow matching) to 1.
Few-step Euler sampling is scored two ways against fresh data samples: the mean distance from each generated
point to its nearest data point (how far samples fall off the roll: the sharpness that Fig. 6 shows), and the
sliced Wasserstein-2 distance (whether the whole distribution is covered).

    python -m training.methods.toy_swissroll [--outdir=out/toy-swissroll] [--steps=4000]

prints two tables (rows: p, columns: Euler steps) and writes `swissroll.png` (one panel per p × steps).
The paper's extracted text lost the value of ε; we use ε = 1e-3 (`--eps`).
"""

import math
import os

import click
import torch
from PIL import Image, ImageDraw

import dnnlib

#----------------------------------------------------------------------------
# Data: a 2D swiss roll scaled to roughly unit variance.

def sample_swissroll(n, generator):
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    angle = 1.5 * math.pi * (1 + 2 * u)
    points = torch.stack([angle * torch.cos(angle), angle * torch.sin(angle)], dim=1)
    points = points + 0.3 * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    return (points / 7.0).float()

#----------------------------------------------------------------------------
# Velocity network: MLP on (x, t) with a sinusoidal time embedding.

class VelocityMLP(torch.nn.Module):
    def __init__(self, hidden=128, depth=3, time_freqs=8):
        super().__init__()
        self.register_buffer('freqs', 2 ** torch.arange(time_freqs, dtype=torch.float32) * math.pi)  # Time embedding frequencies.
        layers, width = [], 2 + 2 * time_freqs
        for _ in range(depth):
            layers += [torch.nn.Linear(width, hidden), torch.nn.SiLU()]
            width = hidden
        layers.append(torch.nn.Linear(width, 2))
        self.net = torch.nn.Sequential(*layers)

    def forward(self, x, t):
        angles = t[:, None] * self.freqs[None]
        return self.net(torch.cat([x, angles.sin(), angles.cos()], dim=1))

#----------------------------------------------------------------------------
# Flow-matching loss with the adaptive weighting of ECT Appendix B: sg(1/(‖Δ‖²+ε)^p)·‖Δ‖².

def adaptive_flow_matching_loss(net, data, p, eps, generator):
    noise = torch.randn(data.shape, generator=generator)
    t = torch.rand(data.shape[0], generator=generator)
    x_t = (1 - t[:, None]) * noise + t[:, None] * data
    delta = net(x_t, t) - (data - noise)
    sq = delta.square().sum(dim=1)
    weight = (sq.detach() + eps).pow(-p)
    return (weight * sq).mean()


def train_flow(p, eps, steps, batch, lr, seed):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = VelocityMLP()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for step in range(steps):
        for group in opt.param_groups:
            group['lr'] = lr * min(1.0, 2 * (1 - step / steps))  # Linear decay over the second half.
        loss = adaptive_flow_matching_loss(net, sample_swissroll(batch, generator), p, eps, generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval()

#----------------------------------------------------------------------------
# Euler sampling from t = 0 (noise) to t = 1 (data).

@torch.no_grad()
def euler_sample(net, noise, num_steps):
    x = noise.clone()
    t_grid = torch.linspace(0, 1, num_steps + 1)
    for t_cur, t_next in zip(t_grid[:-1], t_grid[1:]):
        x = x + (t_next - t_cur) * net(x, t_cur.expand(x.shape[0]))
    return x

#----------------------------------------------------------------------------
# Sliced Wasserstein-2 distance between two equally sized point sets (float64).

def sliced_wasserstein(a, b, num_projections=256, seed=0):
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(num_projections, a.shape[1], generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=1, keepdim=True)
    proj_a = torch.sort(a.double() @ directions.T, dim=0).values
    proj_b = torch.sort(b.double() @ directions.T, dim=0).values
    return float((proj_a - proj_b).square().mean().sqrt())

#----------------------------------------------------------------------------
# Mean Euclidean distance from each sample to its nearest reference point.

def manifold_distance(samples, reference):
    return float(torch.cdist(samples.double(), reference.double()).min(dim=1).values.mean())

#----------------------------------------------------------------------------
# Figure: a grid of scatter panels drawn with PIL (no plotting dependency).

def draw_panels(panels, rows, cols, labels, panel_px=160, extent=2.2):
    label_px = 14
    image = Image.new('RGB', (cols * panel_px, rows * (panel_px + label_px)), 'white')
    draw = ImageDraw.Draw(image)
    for index, (points, label) in enumerate(zip(panels, labels)):
        row, col = divmod(index, cols)
        x0, y0 = col * panel_px, row * (panel_px + label_px)
        draw.text((x0 + 4, y0 + 1), label, fill='black')
        draw.rectangle([x0, y0 + label_px, x0 + panel_px - 1, y0 + label_px + panel_px - 1], outline='grey')
        pix = ((points.clamp(-extent, extent) / extent + 1) / 2 * (panel_px - 1)).numpy()
        for px, py in pix:
            draw.point((x0 + px, y0 + label_px + (panel_px - 1 - py)), fill=(30, 60, 160))
    return image


def run_study(p_values, step_counts, train_steps, batch, lr, eps, num_eval, seed):
    """Train one flow per p and score Euler sampling at each step count.

    Returns {metric: {p: {steps: value}}} for 'manifold' and 'sw2', the data's own baseline per metric, and
    the sample panels for the figure.
    """
    eval_gen = torch.Generator().manual_seed(seed + 1)
    reference = sample_swissroll(num_eval, eval_gen)
    held_out = sample_swissroll(num_eval, eval_gen)
    noise = torch.randn(num_eval, 2, generator=eval_gen)
    tables, panels = {'manifold': {}, 'sw2': {}}, []
    for p in p_values:
        net = train_flow(p, eps, train_steps, batch, lr, seed)
        tables['manifold'][p], tables['sw2'][p] = {}, {}
        for n in step_counts:
            samples = euler_sample(net, noise, n)
            tables['manifold'][p][n] = manifold_distance(samples, reference)
            tables['sw2'][p][n] = sliced_wasserstein(samples, reference)
            panels.append(samples[:2000])
    baseline = {'manifold': manifold_distance(held_out, reference), 'sw2': sliced_wasserstein(held_out, reference)}
    return tables, baseline, panels


def format_table(title, table, baseline, step_counts):
    lines = [f'{title} (lower is better; fresh data scores {baseline:.4f}); rows: adaptive-weighting strength p, '
             f'columns: Euler steps',
             'p     ' + ''.join(f'{n:>9d}' for n in step_counts)]
    for p, row in table.items():
        lines.append(f'{p:<6.2f}' + ''.join(f'{row[n]:9.4f}' for n in step_counts))
    return '\n'.join(lines)


@click.command()
@click.option('--outdir', help='Where to save the figure and table', default='out/toy-swissroll', show_default=True)
@click.option('--p', 'p_values', help='Adaptive-weighting strengths p', default='0,0.25,0.5,0.75,1', show_default=True)
@click.option('--nfe', 'step_counts', help='Euler step counts to evaluate', default='1,2,4,8,32', show_default=True)
@click.option('--steps', 'train_steps', help='Training iterations per p', type=click.IntRange(min=1), default=2000, show_default=True)
@click.option('--batch', help='Batch size', type=click.IntRange(min=1), default=512, show_default=True)
@click.option('--lr', help='Adam learning rate', type=click.FloatRange(min=0, min_open=True), default=2e-3, show_default=True)
@click.option('--eps', help='ε in the adaptive weighting 1/(‖Δ‖²+ε)^p', type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True)
@click.option('--seed', help='Random seed', type=int, default=0, show_default=True)
def main(outdir, p_values, step_counts, train_steps, batch, lr, eps, seed):
    """Reproduce the adaptive-weighting swiss-roll study of the ECT paper (Appendix B)."""
    try:
        p_list = [float(v) for v in p_values.split(',')]
        n_list = [int(v) for v in step_counts.split(',')]
    except ValueError:
        raise click.BadParameter('expected comma-separated numbers', param_hint='--p/--nfe') from None
    if any(n < 1 for n in n_list) or any(p < 0 for p in p_list):
        raise click.BadParameter('step counts must be >= 1 and p >= 0', param_hint='--p/--nfe')
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    tables, baseline, panels = run_study(p_list, n_list, train_steps, batch, lr, eps, num_eval=4096, seed=seed)
    text = '\n\n'.join([
        format_table('distance from samples to the roll', tables['manifold'], baseline['manifold'], n_list),
        format_table('sliced W2 to data', tables['sw2'], baseline['sw2'], n_list)])
    print(text)
    labels = [f'p={p:g}, {n} step{"s" if n > 1 else ""}' for p in p_list for n in n_list]
    image = draw_panels(panels, rows=len(p_list), cols=len(n_list), labels=labels)
    with dnnlib.util.atomic_write(os.path.join(outdir, 'swissroll.png')) as f:
        image.save(f, format='png')
    with dnnlib.util.atomic_write(os.path.join(outdir, 'swissroll.txt'), 'w') as f:
        f.write(text + '\n')
    print(f'Saved {os.path.join(outdir, "swissroll.png")}')


if __name__ == '__main__':
    main()

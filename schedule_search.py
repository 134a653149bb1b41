"""Search the few-step sampling schedule of a consistency model for the lowest FID.

    # openai's ternary search: ts = 0,p,39 on the 40-point grid, p in [0, 39], FID of 10k samples
    python schedule_search.py --network=cd_imagenet64_l2.pt --ref=VIRTUAL_imagenet64_labeled.npz --begin=0 --end=39
    # an ECM's 2-step mid_t on the same grid, or continuously (golden section, 12 evaluations)
    python schedule_search.py --network=ecm.pt --ref=cifar10-32x32.npz --begin=0 --end=39 --num=10000
    python schedule_search.py --network=ecm.pt --ref=cifar10-32x32.npz --mid_t-range=0.1,5 --evals=12

Every point is scored with the same seeds. Each point tried is written to --outdir (schedule-search.csv and
schedule-search.json) as soon as it is measured; the winner is printed as the flags to pass to generate.py.
"""

import os

import click

import dnnlib
from metrics import detectors, metric_main, metric_utils
from torch_utils import distributed as dist
from torch_utils import progress
from training.networks import karras as networks_cm
from training.sampling import samplers
from training.sampling import samplers_karras
from training.sampling import ternary_search
from training.cli_common import load_consistency_network, parse_float_list, state_dict_options, user_errors
from training.sampling.generation import generate_images

# ----------------------------------------------------------------------------------------------------------
# Points -> sampler settings.


def parse_indices(text, flag):
    try:
        return tuple(int(v) for v in text.split(','))
    except ValueError:
        raise dnnlib.UserError(f'{flag}={text}: expected grid indices such as 0 or 0,22') from None


def is_openai_net(net):
    """True for openai's networks (cd_*.pt, ct_*.pt), sampled by karras_sample's multistep sampler."""
    return isinstance(net, networks_cm.KarrasDenoiser)


def grid_schedule(net, ts, steps, t_min, t_max, rho):
    """(sampler, kwargs) of the grid schedule `ts`: openai's multistep sampler for openai networks; for our ECMs the
    consistency sampler at the Karras-grid times of ts (the last index, steps - 1, standing for the final 0)."""
    if is_openai_net(net):
        return 'karras', dict(sampler='multistep', ts=list(ts), steps=steps, sigma_min=t_min, sigma_max=t_max, rho=rho)
    if ts[-1] != steps - 1:
        raise dnnlib.UserError(f'--end: the last index must be steps - 1 = {steps - 1} (the clean end), got {ts[-1]}')
    times = samplers_karras.multistep_times(ts[:-1], steps, t_min, t_max, rho)
    return 'consistency', dict(t_steps=samplers.make_consistency_steps(times[0], times[1:]))


def winner_flags(kwargs):
    """The generate.py flags of a schedule."""
    if kwargs.get('sampler') == 'multistep':
        return f'--sampler=multistep --ts={",".join(map(str, kwargs["ts"]))} --steps={kwargs["steps"]}'
    t_steps = kwargs['t_steps']
    if len(t_steps) == 2:
        return f'--t-max={t_steps[0]:.6g} --steps=1'
    return f'--t-max={t_steps[0]:.6g} --mid_t={",".join(f"{t:.6g}" for t in t_steps[1:-1])}'


class FIDScore:
    """FID of the images of `seeds` (the same for every point) under the schedule a point stands for."""

    def __init__(self, net, schedule_fn, detector, ref, seeds, batch_size, device):
        self.net, self.schedule_fn, self.detector, self.ref = net, schedule_fn, detector, ref
        self.seeds, self.batch_size, self.device = seeds, batch_size, device

    def __call__(self, point):
        sampler, kwargs = self.schedule_fn(point)
        batches = generate_images(self.net, self.seeds, None, sampler, kwargs, self.batch_size, self.device,
                                  dist.get_rank(), dist.get_world_size())
        stats = metric_utils.compute_generator_stats(batches, self.detector, metric_utils.FeatureStats(),
                                                     self.device, num_images=len(self.seeds))
        mu, sigma = stats.get_mean_cov()
        return metric_utils.frechet_distance(mu, sigma, self.ref['mu'], self.ref['sigma'])

# ----------------------------------------------------------------------------------------------------------
# The two searches.


def ternary_upper_bound(left, right):
    """The most evaluations the ternary search can make on [left, right] (for the progress bar)."""
    count = 0
    while right - left >= 3:
        third = int((right - left) / 3.0)
        count += 2
        right = left + (right - left) - third  # The larger of the two brackets it can keep.
    return count + (right - left + 1)


def grid_search(net, begin, end, steps, t_min, t_max, rho, make_objective):
    """Ternary search over p in [begin[-1], end[0]] of ts = begin + (p,) + end; (objective, winner p, flags)."""
    def schedule(p):
        ts = samplers_karras.check_ts(dict.fromkeys(begin + (p,) + end), steps)
        return grid_schedule(net, ts, steps, t_min, t_max, rho)

    def describe(p):
        return dict(ts=list(dict.fromkeys(begin + (p,) + end)), t_steps=list(schedule(p)[1].get('t_steps', [])))

    for p in (begin[-1], end[0]):
        schedule(p)  # Bad indices fail here, before any sampling.
    objective = make_objective(schedule, describe, ternary_upper_bound(begin[-1], end[0]))
    p = ternary_search.ternary_search(objective, begin[-1], end[0])
    return objective, p, winner_flags(schedule(p)[1])


def continuous_search(net, mid_t_range, num_evals, t_max, rho, make_objective, family='consistency'):
    """Golden-section search of a 2-step mid_t in u = t^(1/rho) over `mid_t_range` with the `family` sampler
    (rho 1 for TrigFlow and MeanFlow times); (objective, winner u, flags)."""
    if is_openai_net(net):
        raise dnnlib.UserError('--mid_t-range: openai networks sample on the grid of --steps; search it with '
                               '--begin/--end')
    if len(mid_t_range) != 2 or not 0 < mid_t_range[0] < mid_t_range[1] < t_max:
        raise dnnlib.UserError(f'--mid_t-range={",".join(map(str, mid_t_range))}: need LO,HI with 0 < LO < HI < {t_max}')
    lo, hi = mid_t_range

    def schedule(u):
        return family, dict(t_steps=samplers.FEW_STEP[family].make_steps(t_max, [u ** rho]))

    objective = make_objective(schedule, lambda u: dict(mid_t=u ** rho), num_evals)
    u = ternary_search.golden_section_search(objective, lo ** (1 / rho), hi ** (1 / rho), num_evals)
    return objective, u, winner_flags(schedule(u)[1])

# ----------------------------------------------------------------------------------------------------------
# Command line.


def _result_paths(outdir):
    return os.path.join(outdir, 'schedule-search.csv'), os.path.join(outdir, 'schedule-search.json')


def _objective_factory(score_setup, outdir, bars):
    """make_objective(schedule, describe, total) -> a recording Objective with a progress bar (rank 0)."""
    paths = _result_paths(outdir) if dist.get_rank() == 0 else None

    def make_objective(schedule, describe, total):
        bar = progress.bar(total=total, desc='schedule search', unit='point')
        bars.append(bar)

        def on_point(row):
            bar.set_postfix_str(f'{row.get("ts", row.get("mid_t"))}: fid {row["fid"]:.4g}')
            bar.update(1)
        return ternary_search.Objective(FIDScore(schedule_fn=schedule, **score_setup), describe, paths, on_point)
    return make_objective


def run_search(net, family, begin, end, steps, mid_t_range, num_evals, t_min, t_max, rho, make_objective):
    """(objective, winner point, generate.py flags) of the grid or the continuous search; `family`: the network's
    few-step sampler (samplers.FEW_STEP). TrigFlow and MeanFlow networks are searched continuously, in their own
    time variable."""
    if family != 'consistency':
        if mid_t_range is None:
            raise dnnlib.UserError(f'--mid_t-range: a {family} network samples in its own time variable; search its '
                                   f'2-step mid_t with --mid_t-range=LO,HI (within (0, {samplers.FEW_STEP[family].t_max:.6g}))')
        return continuous_search(net, parse_float_list(mid_t_range, '--mid_t-range'), num_evals,
                                 samplers.FEW_STEP[family].t_max, 1.0, make_objective, family)
    if mid_t_range is not None:
        return continuous_search(net, parse_float_list(mid_t_range, '--mid_t-range'), num_evals, t_max, rho,
                                 make_objective)
    end = parse_indices(str(steps - 1) if end is None else end, '--end')
    return grid_search(net, parse_indices(begin, '--begin'), end, steps, t_min, t_max, rho, make_objective)


@click.command(context_settings=dict(help_option_names=['-h', '--help']))
@click.option('--network', help='Consistency network: snapshot, pickle or openai cd_*/ct_*.pt', metavar='PATH|URL', required=True)
@click.option('--ref', 'ref_path', help='Reference statistics (.npz with mu, sigma)', metavar='NPZ|URL', required=True)
@click.option('--outdir', help='Where to write schedule-search.csv / .json', metavar='DIR', default='.', show_default=True)
@click.option('--num', '--num_samples', 'num_samples', help='Samples per point', metavar='INT', type=click.IntRange(min=2), default=10000, show_default=True)
@click.option('--seed', 'first_seed', help='First seed (the same seeds for every point)', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--steps', help='Grid size of the ts indices', metavar='INT', type=click.IntRange(min=2), default=40, show_default=True)
@click.option('--begin', help='Fixed leading ts indices; the search starts at the last', metavar='LIST', default='0', show_default=True)
@click.option('--end', help='Fixed trailing ts indices; the search ends at the first', metavar='LIST', default=None, show_default='steps - 1')
@click.option('--mid_t-range', '--mid-t-range', 'mid_t_range', help='ECMs: search a 2-step mid_t continuously in [LO, HI] instead', metavar='LO,HI', default=None)
@click.option('--evals', 'num_evals', help='Evaluations of the continuous search', metavar='INT', type=click.IntRange(min=2), default=12, show_default=True)
@click.option('--sigma_min', 't_min', help='Grid: lowest time', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=0.002, show_default=True)
@click.option('--sigma_max', 't_max', help='Grid: highest time (and the first step)', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=80.0, show_default=True)
@click.option('--rho', help='Grid exponent', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=7.0, show_default=True)
@state_dict_options
@click.option('--kind', help='Feature network', type=click.Choice(detectors.FEATURE_KINDS), default='inception', show_default=True)
@click.option('--detector', help='Feature network file  [default: official]', metavar='PATH|URL', default=None)
@click.option('--batch', 'batch_size', help='Maximum batch size', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--allow-unsafe-pickle', help='Trust the network and detector files (legacy pickles, TorchScript)', is_flag=True)
@click.option('--device', help='Device  [default: cuda if available, else cpu]', metavar='STR', default=None)
@progress.no_progress_option
def cli(network, ref_path, outdir, num_samples, first_seed, steps, begin, end, mid_t_range, num_evals, t_min, t_max,
        rho, resolution, parameterization, num_head_channels, kind, detector, batch_size, allow_unsafe_pickle, device, no_progress):
    """Find the intermediate time of a few-step consistency schedule with the lowest FID."""
    bars = []
    with user_errors(), progress.disabled_if(no_progress):
        dist.init()
        device = dist.resolve_device(device)
        ref = metric_utils.load_ref(ref_path)
        if os.path.exists(outdir) and not os.path.isdir(outdir):
            raise dnnlib.UserError(f'--outdir={outdir}: exists and is not a directory')
        net, family = load_consistency_network(network, allow_unsafe_pickle, resolution=resolution,
                                               parameterization=parameterization, num_head_channels=num_head_channels)
        net = net.to(device)
        det = detectors.get_detector(kind, detector, allow_unsafe_pickle, device=device)
        metric_main.check_ref_width(ref, det, [net.img_channels, net.img_resolution, net.img_resolution], device)
        setup = dict(net=net, detector=det, ref=ref, seeds=list(range(first_seed, first_seed + num_samples)),
                     batch_size=batch_size, device=device)
        make_objective = _objective_factory(setup, outdir, bars)
        objective, winner, flags = run_search(net, family, begin, end, steps, mid_t_range, num_evals, t_min, t_max,
                                              rho, make_objective)
    for bar in bars:
        bar.total = bar.n
        bar.close()
    row = objective.row(winner)
    if dist.get_rank() == 0:
        objective.write(*_result_paths(outdir), winner=row, generate_flags=flags)
    dist.print0(f'winner after {len(objective.rows)} points: {row}')
    dist.print0(f'python generate.py --network={network} {flags}')


def main(args=None):
    cli.main(args=args, prog_name='schedule_search.py')


if __name__ == '__main__':
    main()

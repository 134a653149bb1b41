"""Post-hoc EMA reconstruction (Karras et al. 2024, EDM2, Section 3 and Appendix C.2).

During training, PowerFunctionEMA (training/loop/ema.py) keeps power-function averages of the weights and the
training loop snapshots them as network-snapshot-{kimg:06d}-{std:.3f}.pt. EDM2's own raw snapshots,
network-snapshot-{kimg:07d}-{std:.3f}.pkl, are read too (safely, by training.checkpoints.checkpoint's restricted
unpickler), their training time taken from the name as EDM2's reconstruct_phema.py does. Each snapshot, taken at time t
with exponent gamma, is the average of the weight trajectory theta(tau) under the profile
p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t]. The average under any other power-function
profile (another sigma_rel, another time) is approximated by a linear combination of the stored snapshots
whose profiles best match it in the least-squares sense; since averaging is linear in the profile, the same
coefficients combine the stored weights.

Times may be given in any unit (images, steps, kimg): the coefficients do not depend on it.

    python -m training.loop.phema --indir=RUN_DIR --outdir=DIR --std=0.05,0.1 [--time-kimg=...]
"""

import copy
import os
import re

import click
import numpy as np
import torch

import dnnlib
from torch_utils import progress
from training.checkpoints import checkpoint
from training.checkpoints import reader
from training import cli_common
from training.loop.ema import MAX_STD, std_to_exp

SNAPSHOT_PATTERN = re.compile(r'^network-snapshot-(\d+)-(\d+\.\d+)\.(pt|pkl)$')   # power-EMA snapshot names
SUFFIX_PATTERN = re.compile(r'^-(\d+\.\d+)$')                               # their metadata['ema'] suffix


# ----------------------------------------------------------------------------------------------------------
# The mathematics: power-function profiles, their inner products, the least-squares fit.

# EDM2 Section 3.1, Eq. 2: the normalised averaging profile of a power-function EMA taken at time t.
def power_function_response(tau, t, std):
    """p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) for 0 <= tau <= t, else 0 (integrates to 1 over tau)."""
    tau, t = np.asarray(tau, dtype=np.float64), np.asarray(t, dtype=np.float64)
    gamma = std_to_exp(std)
    inside = (tau >= 0) & (tau <= t)
    ratio = np.where(inside, tau / t, 0.0)
    return np.where(inside, (gamma + 1) * ratio ** gamma / t, 0.0)


# EDM2 Appendix C.2: <p_a, p_b> = int_0^min(t_a, t_b) p_a(tau) p_b(tau) dtau, in closed form.
def profile_inner_product(t_a, std_a, t_b, std_b):
    """With m = min(t_a, t_b), M = max(t_a, t_b) and g_M the exponent of the longer profile:
    int_0^m (g_a+1)(g_b+1) tau^(g_a+g_b) / (t_a^(g_a+1) t_b^(g_b+1)) dtau
        = (g_a+1)(g_b+1) / (g_a+g_b+1) * (m/M)^g_M / M        (written with ratios; no overflow).
    Arguments broadcast; times must be positive."""
    t_a, t_b = np.asarray(t_a, dtype=np.float64), np.asarray(t_b, dtype=np.float64)
    g_a, g_b = std_to_exp(std_a), std_to_exp(std_b)
    t_min, t_max = np.minimum(t_a, t_b), np.maximum(t_a, t_b)
    g_longer = np.where(t_a >= t_b, g_a, g_b)
    return (g_a + 1) * (g_b + 1) / (g_a + g_b + 1) * (t_min / t_max) ** g_longer / t_max


def _gram(times_a, stds_a, times_b, stds_b):
    """Matrix of inner products <p_a[i], p_b[j]> between two lists of profiles."""
    col = lambda x: np.asarray(x, dtype=np.float64).reshape(-1, 1)
    row = lambda x: np.asarray(x, dtype=np.float64).reshape(1, -1)
    return profile_inner_product(col(times_a), col(stds_a), row(times_b), row(stds_b))


def _profile_lists(times, stds, what):
    times, stds = np.broadcast_arrays(np.asarray(times, dtype=np.float64), np.asarray(stds, dtype=np.float64))
    if times.size == 0:
        raise dnnlib.UserError(f'{what}: no profiles given')
    if not np.all(times > 0):
        raise dnnlib.UserError(f'{what}: every time must be positive, got {times.ravel().tolist()}')
    return times.ravel(), stds.ravel()


# EDM2 Appendix C.2 and Algorithm 3: least-squares coefficients X minimising ||sum_i X[i, j] p_in[i] - p_out[j]||^2
# in L2, then each column divided by its sum so the combined weights average (sum to 1) as EDM2's code does.
def solve_posthoc_coefficients(in_times, in_stds, out_times, out_stds):
    """Float64 matrix [num_in, num_out]: the normal equations A X = B with A = <p_in, p_in>, B = <p_in, p_out>,
    solved by least squares (A is often ill-conditioned), each column normalised to sum to 1 (a network's
    weights are not scaled by the reconstruction). Times and stds broadcast within each pair."""
    in_times, in_stds = _profile_lists(in_times, in_stds, 'solve_posthoc_coefficients: input profiles')
    out_times, out_stds = _profile_lists(out_times, out_stds, 'solve_posthoc_coefficients: output profiles')
    gram_in = _gram(in_times, in_stds, in_times, in_stds)
    gram_cross = _gram(in_times, in_stds, out_times, out_stds)
    coefs = np.linalg.lstsq(gram_in, gram_cross, rcond=None)[0]
    return coefs / np.sum(coefs, axis=0, keepdims=True)


def posthoc_fit_error(in_times, in_stds, out_times, out_stds, coefs):
    """Relative L2 error ||sum_i X[i, j] p_in[i] - p_out[j]|| / ||p_out[j]|| of the fitted profiles, per output:
    expanded as (X^T A X - 2 X^T B + C) / C with the closed-form inner products."""
    in_times, in_stds = _profile_lists(in_times, in_stds, 'posthoc_fit_error: input profiles')
    out_times, out_stds = _profile_lists(out_times, out_stds, 'posthoc_fit_error: output profiles')
    coefs = np.asarray(coefs, dtype=np.float64).reshape(len(in_times), len(out_times))
    gram_in = _gram(in_times, in_stds, in_times, in_stds)
    gram_cross = _gram(in_times, in_stds, out_times, out_stds)
    norm_out = profile_inner_product(out_times, out_stds, out_times, out_stds)
    squared = (np.einsum('ij,ik,kj->j', coefs, gram_in, coefs) - 2 * np.einsum('ij,ij->j', coefs, gram_cross)
               + norm_out)
    return np.sqrt(np.maximum(squared, 0) / norm_out)


# ----------------------------------------------------------------------------------------------------------
# Snapshots on disk.

def find_snapshots(indir):
    """Sorted paths of the power-EMA snapshots network-snapshot-{kimg}-{std}.pt/.pkl in `indir` (not *-latest-*)."""
    if not os.path.isdir(indir):
        raise dnnlib.UserError(f'--indir: no such directory: {indir}')
    names = sorted(name for name in os.listdir(indir) if SNAPSHOT_PATTERN.match(name))
    if not names:
        raise dnnlib.UserError(f'--indir: {indir} holds no power-function EMA snapshots '
                               f'(network-snapshot-KIMG-STD.pt, or EDM2\'s network-snapshot-KIMG-STD.pkl)')
    return [os.path.join(indir, name) for name in names]


def _read_header(path):
    """The snapshot's dict with its tensors memory-mapped (nothing is built): format, class, config, metadata."""
    data = checkpoint.read_weights_only(path, path, 'network snapshot', mmap=True)
    if not isinstance(data, dict) or data.get('format') != checkpoint.SNAPSHOT_FORMAT \
            or not isinstance(data.get('metadata'), dict):
        raise dnnlib.UserError(f'{path}: not an {checkpoint.SNAPSHOT_FORMAT} file')
    return data


def _snapshot_std(path, metadata):
    """sigma_rel of a snapshot: metadata ema_std, else its metadata 'ema' suffix (-0.050), else its file name."""
    if metadata.get('ema_std') is not None:
        return float(metadata['ema_std'])
    suffix = SUFFIX_PATTERN.match(str(metadata.get('ema', '')))
    if suffix is not None:
        return float(suffix.group(1))
    name = SNAPSHOT_PATTERN.match(os.path.basename(path))
    if name is None:
        raise dnnlib.UserError(f'{path}: not a power-function EMA snapshot (no ema_std in its metadata and no '
                               f'-STD suffix in its name)')
    return float(name.group(2))


def _snapshot_nimg(path, metadata):
    """Training time of a snapshot in images: metadata nimg, else metadata kimg * 1000, else its file name."""
    if metadata.get('nimg') is not None:
        return float(metadata['nimg'])
    if metadata.get('kimg') is not None:
        return float(metadata['kimg']) * 1000
    match = SNAPSHOT_PATTERN.match(os.path.basename(path))
    if match is None:
        raise dnnlib.UserError(f'{path}: no kimg/nimg in its metadata and no KIMG in its name')
    return float(match.group(1)) * 1000


def edm2_kimg_to_nimg(kimg):
    """EDM2 reconstruct_phema.py: the image count behind a name's kimg (= nimg // 1000), EDM2 taking snapshots
    at multiples of 1024 images."""
    return (int(kimg) * 1000 + 999) // 1024 * 1024


def _pickle_info(path):
    """An EDM2 raw snapshot (.pkl): time and sigma_rel from its name, as EDM2 reads them; its network
    configuration is checked when it is loaded."""
    match = SNAPSHOT_PATTERN.match(os.path.basename(path))
    if match is None:
        raise dnnlib.UserError(f'{path}: an EDM2 snapshot must be named network-snapshot-KIMG-STD.pkl')
    try:
        with open(path, 'rb') as f:
            head = f.read(1)
    except OSError as e:
        raise dnnlib.UserError(f'{path}: cannot read ({e.strerror})') from None
    if head != b'\x80':
        raise dnnlib.UserError(f'{path}: not a network pickle')
    return dnnlib.EasyDict(path=path, class_name=None, init_kwargs=None, metadata={}, std=float(match.group(2)),
                           nimg=float(edm2_kimg_to_nimg(match.group(1))))


def _snapshot_info(path):
    if str(path).lower().endswith('.pkl'):
        return _pickle_info(path)
    data = _read_header(path)
    return dnnlib.EasyDict(path=path, class_name=data.get('class_name'), init_kwargs=data.get('init_kwargs'),
                           metadata=data['metadata'], std=_snapshot_std(path, data['metadata']),
                           nimg=_snapshot_nimg(path, data['metadata']))


def read_snapshot_infos(paths):
    """Per snapshot: EasyDict(path, nimg, std, class_name, init_kwargs, metadata); checks they are power-EMA
    snapshots of one and the same network configuration (EDM2 pickles: when combine_snapshots loads them)."""
    infos = []
    for path in paths:
        info = _snapshot_info(path)
        if not 0 < info.std < MAX_STD:
            raise dnnlib.UserError(f'{path}: sigma_rel {info.std} is not that of a power-function EMA '
                                   f'(must be in (0, {MAX_STD:.4f}))')
        first = next((other for other in infos if other.class_name is not None), None)
        if info.class_name is not None and first is not None and \
                (info.class_name, info.init_kwargs) != (first.class_name, first.init_kwargs):
            raise dnnlib.UserError(f'{path}: network configuration differs from {first.path} '
                                   f'({info.class_name} vs {first.class_name}, or different init_kwargs); '
                                   f'snapshots of different runs cannot be combined')
        infos.append(info)
    return infos


# ----------------------------------------------------------------------------------------------------------
# Reconstruction.

def _check_out_stds(out_stds):
    out_stds = [float(s) for s in np.atleast_1d(out_stds)]
    if not out_stds:
        raise dnnlib.UserError('--std: give at least one sigma_rel')
    bad = [s for s in out_stds if not 0 < s < MAX_STD]
    if bad:
        raise dnnlib.UserError(f'--std: sigma_rel must be in (0, {MAX_STD:.4f}) (the widest power-function '
                               f'profile), got {bad}')
    return out_stds


def _usable_sources(infos, out_nimg):
    """The snapshots taken after time 0 and no later than the output time (later ones would average in
    weights from the future of the reconstructed EMA)."""
    latest = max(info.nimg for info in infos)
    if out_nimg is None:
        out_nimg = latest
    if not 0 < out_nimg <= latest:
        raise dnnlib.UserError(f'--time-kimg: must be in (0, {latest / 1000:g}] (the latest snapshot), '
                               f'got {out_nimg / 1000:g}')
    sources = [info for info in infos if 0 < info.nimg <= out_nimg]
    if not sources:
        raise dnnlib.UserError(f'--time-kimg={out_nimg / 1000:g}: no snapshot taken after kimg 0 and by then')
    return sources, out_nimg


def plan_reconstruction(infos, out_stds, out_nimg=None, max_fit_error=0.1):
    """(sources, out_nimg, out_stds, coefs [num_sources, num_out], fit errors [num_out]); a target the stored
    profiles cannot reproduce to within `max_fit_error` (relative L2 error of the profile) is a UserError."""
    out_stds = _check_out_stds(out_stds)
    sources, out_nimg = _usable_sources(infos, out_nimg)
    in_nimg, in_stds = [s.nimg for s in sources], [s.std for s in sources]
    coefs = solve_posthoc_coefficients(in_nimg, in_stds, out_nimg, out_stds)
    errors = posthoc_fit_error(in_nimg, in_stds, out_nimg, out_stds, coefs)
    bad = [f'{std:g} (error {err:.3f})' for std, err in zip(out_stds, errors) if not err <= max_fit_error]
    if bad:
        raise dnnlib.UserError(f'--std: the stored profiles (sigma_rel {sorted(set(in_stds))}, {len(sources)} '
                               f'snapshots) cannot reproduce sigma_rel {", ".join(bad)} at kimg '
                               f'{out_nimg / 1000:g} within relative error {max_fit_error} (--max-error)')
    return sources, out_nimg, out_stds, coefs, errors


def _load_source(info, config):
    """The network of one snapshot (ours or an EDM2 pickle, told apart by content); a configuration (class,
    constructor kwargs) other than `config` (that of the first source, or None) is a UserError naming the file."""
    net = reader.load_network(info.path)[0]
    if config is not None and (type(net), net.init_kwargs) != config:
        raise dnnlib.UserError(f'{info.path}: network configuration differs from the other snapshots '
                               f'({type(net).__name__} {net.init_kwargs} vs {config[0].__name__} {config[1]}); '
                               f'snapshots of different runs cannot be combined')
    return net


@torch.no_grad()
def combine_snapshots(sources, coefs):
    """One network per column of `coefs`: parameters sum_i coefs[i, j] * theta_i (accumulated in float64),
    buffers those of the latest source (EMA trackers copy buffers rather than average them)."""
    latest = max(sources, key=lambda s: s.nimg)
    sums, template, config = None, None, None
    rows = np.asarray(coefs, dtype=np.float64)
    for info, row in progress.bar(list(zip(sources, rows)), desc='post-hoc EMA', unit='snapshot'):
        net = _load_source(info, config)
        config = config or (type(net), net.init_kwargs)
        params = {name: p.detach().to(torch.float64) for name, p in net.named_parameters()}
        sums = sums or [{name: torch.zeros_like(p) for name, p in params.items()} for _ in row]
        for acc, coef in zip(sums, row):
            for name, p in params.items():
                acc[name].add_(p, alpha=float(coef))
        template = net if info is latest else template
    outs = [copy.deepcopy(template) for _ in sums]
    for out, acc in zip(outs, sums):
        for name, p in out.named_parameters():
            p.copy_(acc[name].to(p.dtype))
    return outs


def _output_metadata(latest, std, out_nimg, sources, coefs, fit_error):
    """The latest source's metadata (stage, mid_t, training options) with the reconstruction's own fields."""
    return dict(latest.metadata, kimg=int(out_nimg // 1000), nimg=int(round(out_nimg)), ema=f'-{std:.3f}',
                ema_std=std, phema=dict(sources=[os.path.basename(s.path) for s in sources],
                                        source_nimg=[s.nimg for s in sources], source_stds=[s.std for s in sources],
                                        coefficients=[float(c) for c in coefs], fit_error=float(fit_error)))


def reconstruct(snapshots, out_stds, outdir, out_time_kimg=None, max_fit_error=0.1, log=print):
    """Reconstruct power-function EMA networks of sigma_rel `out_stds` at `out_time_kimg` (default: the latest
    snapshot) from a run directory or a list of snapshot paths; writes outdir/phema-{kimg:06d}-{std:.3f}.pt
    with save_network_snapshot and returns the written paths. Everything is validated before loading weights."""
    paths = find_snapshots(snapshots) if isinstance(snapshots, (str, os.PathLike)) else list(snapshots)
    if not paths:
        raise dnnlib.UserError('--indir: no snapshots given')
    if out_time_kimg is not None and not out_time_kimg > 0:
        raise dnnlib.UserError(f'--time-kimg: must be positive, got {out_time_kimg}')
    dnnlib.util.check_output_dir(outdir, '--outdir')
    infos = read_snapshot_infos(paths)
    out_nimg = None if out_time_kimg is None else float(out_time_kimg) * 1000
    sources, out_nimg, out_stds, coefs, errors = plan_reconstruction(infos, out_stds, out_nimg, max_fit_error)
    nets = combine_snapshots(sources, coefs)
    log(f'Reconstructed sigma_rel {out_stds} at kimg {out_nimg / 1000:g} from {len(sources)} snapshots '
        f'(relative profile errors {[round(float(e), 5) for e in errors]})')
    latest = max(sources, key=lambda s: s.nimg)
    os.makedirs(outdir, exist_ok=True)
    written = []
    for j, (std, net) in enumerate(zip(out_stds, nets)):
        path = os.path.join(outdir, f'phema-{int(out_nimg // 1000):06d}-{std:.3f}.pt')
        checkpoint.save_network_snapshot(path, net, **_output_metadata(latest, std, out_nimg, sources, coefs[:, j],
                                                                       errors[j]))
        log(f'Wrote {path}')
        written.append(path)
    return written


# ----------------------------------------------------------------------------------------------------------
# Command line.

@click.command()
@click.option('--indir', help='Run directory with network-snapshot-KIMG-STD.pt files', metavar='DIR', required=True)
@click.option('--outdir', help='Where to write phema-KIMG-STD.pt', metavar='DIR', required=True)
@click.option('--std', 'std_text', help='Target sigma_rel values, comma separated', metavar='LIST', required=True)
@click.option('--time-kimg', help='Training time to reconstruct  [default: the latest snapshot]', metavar='KIMG',
              type=float, default=None)
@click.option('--max-error', help='Largest accepted relative L2 error of the fitted profile', metavar='FLOAT',
              type=float, default=0.1, show_default=True)
@progress.no_progress_option
def main(indir, outdir, std_text, time_kimg, max_error, no_progress):
    """Post-hoc EMA reconstruction (EDM2) of power-function EMA snapshots."""
    with cli_common.user_errors(os_errors=True), progress.disabled_if(no_progress):
        stds = cli_common.parse_float_list(std_text, '--std') or []
        reconstruct(indir, stds, outdir, out_time_kimg=time_kimg, max_fit_error=max_error)


if __name__ == '__main__':
    main()

"""Benchmark sampling and scoring throughput: img/s of 1-step and 2-step consistency sampling, and the FID-50k wall
time split into sampling / feature extraction / I/O (PNG writing and reading), eager and torch.compile'd.

    python bench/bench_fid.py                                  # CUDA: DDPM++ CIFAR-10, batch 512, 10,240 images
    python bench/bench_fid.py --device=cpu --net=tiny --num=256 --batch=64 --detector=randnet   # a quick CPU run

Every measurement runs the project's own code: training.sampling.generation.generate_images (per-seed generators, uint8
images), the detector on each batch with metrics.metric_utils.FeatureStats, fid.py net's pipelined in-memory path
(metric_utils.compute_generator_stats), generate.py's PNG writer (background threads; the one-thread serial
writer for comparison) and fid.py calc's reader (training.data.dataset.ImageFolderDataset). Times for `--num` images are
extrapolated linearly to 50,000. The networks have random weights (speed does not depend on them):
`--net=ddpmpp` is the CIFAR-10 ECM network (55.7M parameters), `--net=tiny` a 16-channel one for CPU smoke runs;
`--detector=standin` is an Inception-v3 of full width with random weights (the real file needs a download),
`randnet` the small random-feature detector, or give a detector file. Compile time is reported, not counted.
"""

import os
import sys
import tempfile
import time

import click
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(1, os.path.join(ROOT, 'tests'))  # nvidia_detectors: the Inception stand-in of the tests

import dnnlib  # noqa: E402
import generate  # noqa: E402
from configs import presets  # noqa: E402
from metrics import detectors, metric_utils  # noqa: E402
from torch_utils import distributed as dist  # noqa: E402
from training import compile as tc
from training.sampling import generation
from training.sampling import samplers  # noqa: E402
from training.data.dataset import ImageFolderDataset  # noqa: E402

NETS = dict(
    ddpmpp=dict(class_name=presets.PRECONDS['ecm'], img_resolution=32, img_channels=3, label_dim=0, dropout=0.0,
                **presets.ARCHS['ddpmpp']),
    tiny=dict(class_name=presets.PRECONDS['ecm'], img_resolution=32, img_channels=3, label_dim=0, dropout=0.0,
              model_type='SongUNet', model_channels=16, channel_mult=[1, 1], num_blocks=1, attn_resolutions=[16]),
)
STEPS = {1: (samplers.T_MAX, 0.0), 2: (samplers.T_MAX, samplers.CIFAR10_MID_T, 0.0)}


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed(fn, device):
    """(seconds, result) of fn(), the device drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def load_detector(name, device, tmpdir):
    if name == 'standin':
        import nvidia_detectors
        path = nvidia_detectors.write_pickle(os.path.join(tmpdir, 'inception-standin.pkl'),
                                             nvidia_detectors.make_standin('inception', div=1).float())
        return detectors.get_detector('inception', path, device=device)
    if name == 'randnet':
        return detectors.get_detector('randnet', device=device)
    return detectors.get_detector('inception', name, device=device)


def sample(net, seeds, steps, batch_size, device):
    """Every uint8 batch (N,H,W,C, on the device) of 1- or 2-step consistency sampling."""
    kwargs = dict(t_steps=STEPS[steps])
    return [images for _, images in generation.generate_images(net, seeds, None, 'consistency', kwargs, batch_size,
                                                                device)]


def features(batches, detector):
    stats = metric_utils.FeatureStats()
    for images in batches:
        stats.append(detector(images.permute(0, 3, 1, 2)))
    return stats.get_mean_cov()


def pipelined(net, seeds, detector, batch_size, device):
    """fid.py net: sampling and features interleaved batch by batch, statistics at the end."""
    batches = generation.generate_images(net, seeds, None, 'consistency', dict(t_steps=STEPS[1]), batch_size, device)
    return metric_utils.compute_generator_stats(batches, detector, metric_utils.FeatureStats(), device).get_mean_cov()


def write_pngs(batches, seeds, outdir, serial):
    """generate.py's writer (background threads), or one PNG after the other in this thread (serial)."""
    host = [images.cpu().numpy() for images in batches]
    if serial:
        for seed, image in zip(seeds, np.concatenate(host)):
            generation.save_png(generate.image_path(outdir, seed, True), image)
    else:
        split = np.cumsum([len(h) for h in host])[:-1]
        generate.write_images(zip(np.split(np.asarray(seeds), split), map(torch.from_numpy, host)), outdir, True,
                              False, len(seeds))


def read_pngs(folder):
    dataset = ImageFolderDataset(path=folder)
    return [dataset[i][0] for i in range(len(dataset))]


def measure(net, detector, num, batch_size, device, tmpdir, label):
    """Rows (measure, seconds for `num` images) of one network (eager or compiled)."""
    seeds = list(range(num))
    rows = []
    for steps in (1, 2):
        seconds, batches = timed(lambda: sample(net, seeds, steps, batch_size, device), device)
        rows.append((f'{steps}-step sampling', seconds))
    rows.append(('features (detector + statistics)', timed(lambda: features(batches, detector), device)[0]))
    rows.append(('fid.py net: sampling + features, pipelined', timed(
        lambda: pipelined(net, seeds, detector, batch_size, device), device)[0]))
    for serial in (True, False):
        outdir = os.path.join(tmpdir, f'{label}-{"serial" if serial else "threads"}')
        name = 'PNG writing, one thread' if serial else f'PNG writing, {generation.BackgroundWriter().num_threads} threads'
        rows.append((name, timed(lambda: write_pngs(batches, seeds, outdir, serial), device)[0]))
    rows.append(('PNG reading (fid.py calc\'s dataset)', timed(lambda: read_pngs(outdir), device)[0]))
    return rows


def compile_for(net, num, batch_size, device):
    """The compiled network and the seconds its compile took (one warm-up call per batch size met)."""
    compiled = tc.compile_network(net)
    sizes = sorted({len(b) for b in generation.split_batches(list(range(num)), batch_size)})
    seconds = sum(timed(lambda: generation.sample_batch(compiled, list(range(size)), sampler='consistency',
                                                        sampler_kwargs=dict(t_steps=STEPS[1]), device=device),
                        device)[0] for size in sizes)
    return compiled, seconds


def device_name(device):
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    models = [line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo') if line.startswith('model name')]
    return f'{models[0] if models else "cpu"} ({torch.get_num_threads()} thread(s))'


def print_table(rows_by_mode, num, header):
    print(header)
    modes = list(rows_by_mode)
    print('| measure | ' + ' | '.join(f'{m}: s per {num} img | {m}: img/s | {m}: s per 50k' for m in modes) + ' |')
    print('|---|' + '---:|' * 3 * len(modes))
    for i, (name, _) in enumerate(rows_by_mode[modes[0]]):
        cells = []
        for mode in modes:
            seconds = rows_by_mode[mode][i][1]
            cells += [f'{seconds:.2f}', f'{num / seconds:.1f}', f'{seconds * 50000 / num:.0f}']
        print(f'| {name} | ' + ' | '.join(cells) + ' |')


@click.command()
@click.option('--device', help='Device  [default: cuda if available, else cpu]', metavar='STR', type=str, default=None)
@click.option('--net', 'net_name', help='Network', type=click.Choice(list(NETS)), default='ddpmpp', show_default=True)
@click.option('--batch', 'batch_size', help='Batch size', metavar='INT', type=click.IntRange(min=1), default=512, show_default=True)
@click.option('--num', help='Images per measurement (rounded up to whole batches)', metavar='INT', type=click.IntRange(min=2), default=10240, show_default=True)
@click.option('--detector', help='standin | randnet | a detector file', metavar='NAME|PATH', type=str, default='standin', show_default=True)
@click.option('--modes', help='eager, compiled or both', type=click.Choice(['eager', 'compiled', 'both']), default='both', show_default=True)
def main(device, net_name, batch_size, num, detector, modes):
    """Time sampling, features and PNG I/O of FID-50k, eager and compiled."""
    try:
        device = dist.resolve_device(device)
    except dnnlib.UserError as e:
        raise click.UsageError(str(e)) from None
    num = -(-num // batch_size) * batch_size
    load_before = os.getloadavg()
    torch.manual_seed(0)
    net = dnnlib.util.construct_class_by_name(**NETS[net_name]).eval().requires_grad_(False).to(device)
    rows_by_mode, notes = {}, []
    with tempfile.TemporaryDirectory() as tmpdir:
        det = load_detector(detector, device, tmpdir)
        for mode in (['eager', 'compiled'] if modes == 'both' else [modes]):
            tc.reset_compile_counters()
            used, compile_s = compile_for(net, num, batch_size, device) if mode == 'compiled' else (net, 0.0)
            rows_by_mode[mode] = measure(used, det, num, batch_size, device, tmpdir, mode)
            if mode == 'compiled':
                counters = tc.compile_counters()
                notes.append(f'compile: {compile_s:.1f} s, {counters["frames"]} frame(s), {counters["graphs"]} '
                             f'graph(s), {counters["graph_breaks"]} graph break(s) {counters["break_reasons"] or ""}')
    params_m = sum(p.numel() for p in net.parameters()) / 1e6
    header = (f'{net_name} ECMPrecond ({params_m:.1f}M params), batch {batch_size}, {num} images, detector {detector}, '
              f'{device_name(device)}, load average {load_before[0]:.2f} before / {os.getloadavg()[0]:.2f} after')
    print_table(rows_by_mode, num, header)
    for note in notes:
        print(note)
    if device.type == 'cuda':
        print(f'peak memory allocated: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB')


if __name__ == '__main__':
    main()

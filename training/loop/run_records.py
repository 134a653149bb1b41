"""Reading what a training run records in its directory: stats.jsonl (one line per tick: every reported
statistic as {num, mean, std}, plus timestamp) and metric-<name>.jsonl (one line per evaluated snapshot: results,
metric, snapshot_pkl, sampler, nfe, num_samples, ...). Used by the plots, the exporter's config and model card,
and the experiment trackers. Lines that do not parse are a UserError naming the file and line."""

import glob
import os
import re

import dnnlib

STATS_FILE = 'stats.jsonl'
METRIC_FILE_PATTERN = re.compile(r'^metric-(.+)\.jsonl$')


def read_jsonl(path):
    """The JSON objects of a .jsonl file, in order (blank lines skipped); [] when the file does not exist."""
    if not os.path.isfile(path):
        return []
    records = []
    with open(path, 'r', encoding='utf-8') as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            records.append(dnnlib.util.json_object(line, f'{path}: line {line_no}'))
    return records


def stats_records(run_dir):
    """The per-tick records of <run_dir>/stats.jsonl."""
    return read_jsonl(os.path.join(run_dir, STATS_FILE))


def metric_names(run_dir):
    """Names of the metrics recorded in `run_dir` (from the metric-<name>.jsonl files), sorted."""
    names = [METRIC_FILE_PATTERN.match(os.path.basename(p)) for p in glob.glob(os.path.join(run_dir, 'metric-*.jsonl'))]
    return sorted(m.group(1) for m in names if m)


def metric_records(run_dir, snapshot_name=None):
    """Every metric record of `run_dir` (metric name order, then file order); only those of the snapshot file
    name `snapshot_name` when given."""
    records = [r for name in metric_names(run_dir) for r in read_jsonl(os.path.join(run_dir, f'metric-{name}.jsonl'))]
    return [r for r in records if snapshot_name is None or r.get('snapshot_pkl') == snapshot_name]


def stat_mean(record, name):
    """The mean of statistic `name` in one stats.jsonl record (None when that tick did not report it)."""
    value = record.get(name)
    if isinstance(value, dict):
        value = value.get('mean')
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def snapshot_kimg(name):
    """Training kimg from a snapshot file name such as network-snapshot-000048-0.050.pt (None if it has none;
    'initial-network.pt', the network before training, is kimg 0)."""
    if name is None:
        return None
    if os.path.basename(name).startswith('initial-network'):
        return 0.0
    match = re.search(r'snapshot-(\d+)', os.path.basename(name))
    return float(match.group(1)) if match else None


def snapshot_suffix(name):
    """The suffix after the kimg of a snapshot file name (the EMA, e.g. '-0.050' of network-snapshot-000048-0.050.pt;
    '' when there is none)."""
    name = os.path.basename(str(name or ''))
    if 'snapshot-' not in name:
        return ''
    return name.rsplit('.', 1)[0].split('snapshot-', 1)[-1].lstrip('0123456789')


def record_value(record):
    """(label suffix, value) pairs of a metric record's results, e.g. [('fid50k_full', 3.85)]."""
    return [(key, float(value)) for key, value in record.get('results', {}).items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)]

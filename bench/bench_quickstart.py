"""Time `python train.py --preset=quickstart` as a new user runs it: from a fresh copy of the committed tree (no
datasets/, no caches), dataset build and every score included, and split the wall time into its phases.

    python bench/bench_quickstart.py                          # one run of the committed HEAD, in a temporary copy
    python bench/bench_quickstart.py --repeats=3 --json=bench/results/quickstart-cpu.json

The copy is `git archive HEAD` of this checkout (uncommitted changes are not timed) with a private ECT_CACHE_DIR,
so nothing a previous run built or cached is reused. Phases come from the run's own output: the dataset build
(until the run directory is announced), the start (until the first status line's tick began), tuning (the ticks'
sec/tick), and the rest (scores after the last tick, snapshots, the summary). The last lines of each run's metric
table are printed too, so a faster run can be checked for the same numbers; --json also keeps the status and
metric lines with the second each was printed.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import time

import click

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fresh_copy(dest):
    """The committed tree of this checkout, unpacked into `dest`."""
    archive = subprocess.run(['git', '-C', ROOT, 'archive', 'HEAD'], check=True, capture_output=True).stdout
    subprocess.run(['tar', '-x', '-C', dest], input=archive, check=True)


def timed_run(workdir, extra):
    """Run the quickstart in `workdir`; returns (wall seconds, [(seconds since start, line)])."""
    env = dict(os.environ, ECT_CACHE_DIR=os.path.join(workdir, 'cache'), ECT_NO_PROGRESS='1')
    command = [sys.executable, 'train.py', '--preset=quickstart', f'--outdir={os.path.join(workdir, "runs")}', *extra]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    lines = [(time.perf_counter() - start, line.rstrip('\n')) for line in process.stdout]
    if process.wait() != 0:
        raise click.ClickException('the quickstart failed:\n' + '\n'.join(line for _, line in lines[-20:]))
    return time.perf_counter() - start, lines


def phases(wall, lines):
    """{phase: seconds} from the timestamped output of one run."""
    at = {}
    for seconds, line in lines:
        if line.startswith('Run directory:'):
            at.setdefault('run_dir', seconds)
        if line.startswith('tick '):
            at.setdefault('first_tick', seconds - float(re.search(r'sec/tick\s+([\d.]+)', line).group(1)))
            at['last_tick'] = seconds
    tuning = at['last_tick'] - at['first_tick']
    return dict(total=wall, build_and_checks=at['run_dir'], start=at['first_tick'] - at['run_dir'], tuning=tuning,
                end=wall - at['last_tick'])


@click.command()
@click.option('--repeats', help='Runs, each from its own fresh copy', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--json', 'json_path', help='Also write the runs to this JSON file', metavar='FILE', type=str, default=None)
@click.argument('extra', nargs=-1)
def main(repeats, json_path, extra):
    """Wall time of the quickstart from a fresh copy, by phase (EXTRA: more train.py flags, after --)."""
    runs = []
    for i in range(repeats):
        with tempfile.TemporaryDirectory(prefix='ect-quickstart-') as workdir:
            fresh_copy(workdir)
            wall, lines = timed_run(workdir, list(extra))
        split = phases(wall, lines)
        table = [line for _, line in lines if '|' in line]
        progress = [(round(seconds, 1), line) for seconds, line in lines
                    if line.startswith(('tick ', 'Curriculum', 'Building')) or re.match(r'\w+: \w+ [\d.]+ \(', line)]
        runs.append(dict(phases=split, table=table, progress=progress))
        print(f'run {i}: ' + '  '.join(f'{name} {seconds:.1f} s' for name, seconds in split.items()))
        print('\n'.join(table))
    if json_path:
        with open(json_path, 'w') as f:
            json.dump(dict(cpu_count=os.cpu_count(), runs=runs), f, indent=2)


if __name__ == '__main__':
    main()

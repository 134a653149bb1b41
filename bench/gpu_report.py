"""The markdown report of bench/gpu_check.sh (`python bench/gpu_check.py report`): check lines, throughput
rows and section timings, from the records the sections wrote as JSON.

Record kinds: 'check' (gpu_check.py: name, status, detail), 'train' (bench_train.py --json), 'sampling'
(bench_sampling.py --json), 'vs_official' (bench_vs_official.py --out), 'missing' (what, reason: a row that
could not be measured) and 'section' (gpu_check.sh: name, exit status, seconds, limit).
"""


def _table(head, rows):
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    return lines + ['| ' + ' | '.join(str(cell) for cell in row) + ' |' for row in rows]


def _number(value, digits=1):
    return '-' if value is None else f'{value:,.{digits}f}'


def throughput_rows(records):
    """(what, precision, batch, img/s, sec/step or ms/call, peak GiB) of every measured or missing row."""
    rows = []
    order = ['train', 'vs_official', 'sampling', 'missing']
    for r in sorted((r for r in records if r.get('kind') in order), key=lambda r: order.index(r['kind'])):
        kind = r['kind']
        if kind == 'train':
            ratio = (f', {r["ratio_to_baseline"]:.2f}x {r["baseline"]} ({r["ratio_min"]:.2f}-{r["ratio_max"]:.2f})'
                     if r.get('baseline') not in (None, r['preset']) else '')
            rows.append((f'{r.get("method", "ECT")} train step, {r["preset"]} {r["resolution"]}x{r["resolution"]} (ours)'
                         f'{ratio}', r['precision'], r['batch'], _number(r['img_per_s']), f'{r["sec_per_step"]:.4f} s',
                         _number(r['peak_gib'], 2)))
        elif kind == 'vs_official':
            for side in ('ours', 'official'):
                rows.append((f'ECT train step, DDPM++ CIFAR-10, stage {r["stage"]} ({side}: '
                             f'{"this code" if side == "ours" else "locuslab/ect arithmetic"}, same process setup)',
                             r['precision'], r['batch'], _number(r[f'{side}_img_per_s']), f'{r[f"{side}_s"]:.4f} s', '-'))
        elif kind == 'sampling':
            rows.append((f'{r["steps"]}-step sampling, DDPM++ CIFAR-10 ({r["run"]})', r['precision'], r['batch'],
                         _number(r['img_per_s']), f'{r["ms_per_call"]:.2f} ms', _number(r.get('peak_gib'), 2)))
        elif kind == 'missing':
            rows.append((r['what'], '-', '-', 'not measured', r['reason'], '-'))
    return rows


def speedups(records):
    """Lines comparing our fastest DDPM++ CIFAR-10 step with the official arithmetic's (same machine)."""
    ours = [r for r in records if r.get('kind') == 'train' and r.get('preset', '').startswith('cifar10')
            and r.get('method', 'ECT') == 'ECT' and r.get('arch_kwargs') is None]   # the preset's own DDPM++ ECT step
    if not ours:
        return []
    best = max(ours, key=lambda r: r['img_per_s'])
    official = [r for r in records if r.get('kind') == 'vs_official' and r['batch'] == best['batch']]
    return [f'- ours {best["precision"]} ({best["img_per_s"]:,.1f} img/s at batch {best["batch"]}) vs official '
            f'{r["precision"]} ({r["official_img_per_s"]:,.1f} img/s): '
            f'{best["img_per_s"] / r["official_img_per_s"]:.2f}x the official throughput' for r in official]


def markdown(header, records):
    """The whole report as markdown text."""
    checks = [r for r in records if r.get('kind') == 'check']
    sections = [r for r in records if r.get('kind') == 'section']
    lines = ['# bench/gpu_check.sh', '', *[f'    {line}' for line in header.splitlines() if line.strip()], '',
             '## Checks', '']
    lines += _table(['status', 'check', 'detail'], [(r['status'], r['name'], r['detail'].replace('|', '\\|'))
                                                    for r in checks])
    lines += ['', '## Throughput', '']
    lines += _table(['what', 'precision', 'batch', 'img/s', 'time per step/call', 'peak GiB'], throughput_rows(records))
    lines += ['', *speedups(records), '', '## Sections', '']
    lines += _table(['section', 'exit', 'seconds', 'limit s'], [(r['name'], r['exit'], r['seconds'], r['limit'])
                                                               for r in sections])
    return '\n'.join(lines) + '\n'

"""Run directories of train.py: EDM-style `<outdir>/<id:05d>-<desc>` folders, finding the newest training state
(for `--resume=DIR|auto`), making the next run directory (or `--nosubdir`'s, refused over a finished run unless
told to overwrite) and recording the resolved options in it (`training_options.json`, written atomically)."""

import json
import os
import re

import dnnlib


def _run_dirs(outdir):
    """(id, name) of the EDM-style run directories in outdir."""
    if not os.path.isdir(outdir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(outdir)
             if (m := re.fullmatch(r'(\d+)-(.*)', name)) and os.path.isdir(os.path.join(outdir, name))]
    return sorted(found)


def newest_state(run_dir):
    """The newest training-state file in run_dir (training-state-latest.pt first), or None."""
    latest = os.path.join(run_dir, 'training-state-latest.pt')
    if os.path.isfile(latest):
        return latest
    states = sorted(f for f in os.listdir(run_dir) if re.fullmatch(r'training-state-\d+\.pt', f))
    return os.path.join(run_dir, states[-1]) if states else None


def resolve_resume(resume, outdir, desc, nosubdir):
    """(state file or None, run dir to continue in or None) for --resume."""
    if resume is None:
        return None, None
    if resume == 'auto':
        candidates = [outdir] if nosubdir else [os.path.join(outdir, name) for _, name in _run_dirs(outdir)
                                                if name.split('-', 1)[1] == desc]
        for run_dir in reversed(candidates):
            state = newest_state(run_dir) if os.path.isdir(run_dir) else None
            if state is not None:
                return state, run_dir
        return None, None
    if os.path.isdir(resume):
        state = newest_state(resume)
        if state is None:
            raise dnnlib.UserError(f'--resume: {resume} holds no training-state-*.pt file')
        return state, None
    if not os.path.isfile(resume):
        raise dnnlib.UserError(f'--resume: no such file or directory: {resume} (give a state file, a run dir or "auto")')
    return resume, None


def make_run_dir(outdir, desc, nosubdir, dry_run, overwrite=False):
    """outdir/{id:05d}-{desc} with the next free id (or outdir itself with --nosubdir, refused when it holds a
    run's training state or snapshots unless `overwrite`)."""
    if nosubdir:
        taken = sorted(f for f in os.listdir(outdir) if re.fullmatch(r'(training-state|network-snapshot)-.*\.pt', f)) \
            if os.path.isdir(outdir) else []
        if taken and not overwrite:
            raise dnnlib.UserError(f'--nosubdir: {outdir} already holds a run ({taken[0]}, ...); continue it with '
                                   f'--resume=auto, or give --overwrite to replace it')
        return outdir
    ids = [run_id for run_id, _ in _run_dirs(outdir)]
    run_dir = os.path.join(outdir, f'{max(ids, default=-1) + 1:05d}-{desc}')
    if os.path.exists(run_dir) and not dry_run:
        raise dnnlib.UserError(f'--outdir: {run_dir} already exists')
    return run_dir


def save_options(run_dir, options):
    os.makedirs(run_dir, exist_ok=True)
    with dnnlib.util.atomic_write(os.path.join(run_dir, 'training_options.json'), 'w') as f:
        json.dump(options.to_dict(), f, indent=2)

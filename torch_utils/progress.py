"""Progress bars for long jobs (tqdm), shown only where a person is watching.

A bar appears on rank 0 when its stream (stderr) is a terminal. It stays silent on other ranks, when the output
goes to a file, a pipe or a captured log, after `--no-progress` on the command line, and whenever the
environment has ECT_NO_PROGRESS=1 (any value except '', 0, false, no, off).
"""

import contextlib
import os
import sys

import click
from tqdm import tqdm

ENV_SWITCH = 'ECT_NO_PROGRESS'
_OFF_VALUES = ('', '0', 'false', 'no', 'off')


def switched_off():
    """True when the environment switch ECT_NO_PROGRESS turns the bars off."""
    return os.environ.get(ENV_SWITCH, '').strip().lower() not in _OFF_VALUES


def is_rank0():
    """True on rank 0, read from torchrun's RANK variable (set for every process it starts, before any process
    group exists); no torch import, so light CLIs such as dataset_tool.py stay light."""
    try:
        return int(os.environ.get('RANK', '0') or 0) == 0
    except ValueError:
        return True


def enabled(stream=None):
    """True when a bar on `stream` (default stderr) would be seen: rank 0, a terminal, not switched off."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, 'isatty', None)
    return not switched_off() and is_rank0() and callable(isatty) and bool(isatty())


def bar(iterable=None, total=None, desc=None, unit='img', leave=True, **kwargs):
    """A tqdm bar on stderr over `iterable` (or updated by hand with .update(n)); a silent pass-through where
    progress is off (see the module docstring). `unit` names what is counted; tqdm shows its rate (img/s)."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, file=sys.stderr, dynamic_ncols=True,
                disable=not enabled(sys.stderr), **kwargs)


@contextlib.contextmanager
def disabled_if(no_progress):
    """Within the block, bars are off when `no_progress` is true (a CLI's --no-progress flag): sets the
    environment switch, so code deep inside (metrics, loaders) and child processes see it; restored after."""
    if not no_progress:
        yield
        return
    previous = os.environ.get(ENV_SWITCH)
    os.environ[ENV_SWITCH] = '1'
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(ENV_SWITCH, None)
        else:
            os.environ[ENV_SWITCH] = previous


def no_progress_option(fn):
    """The --no-progress click flag of the CLIs (pass it to disabled_if)."""
    return click.option('--no-progress', 'no_progress', is_flag=True,
                        help=f'No progress bars (also: {ENV_SWITCH}=1; bars only appear on a terminal)')(fn)

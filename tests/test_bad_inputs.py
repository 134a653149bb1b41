"""Corrupt inputs and crash cases: each gives one clear line naming the file or flag, before anything is
written; crashes leave nothing behind that a later run trips over."""

import os
import signal
import subprocess
import sys

import pytest

import dnnlib
from dnnlib import util
from conftest import REPO_ROOT

# ----------------------------------------------------------------------------------------------------------
# Killed atomic writes.

_KILLED_WRITER = '''
import os, signal, sys
from dnnlib import util
with util.atomic_write(sys.argv[1]) as f:
    f.write(b'half of a training state')
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
'''


def test_killed_atomic_write_leaves_a_recognisable_partial_that_is_cleaned(tmp_path):
    target = tmp_path / 'training-state-latest.pt'
    target.write_bytes(b'previous state')
    proc = subprocess.run([sys.executable, '-c', _KILLED_WRITER, str(target)], cwd=REPO_ROOT)
    assert proc.returncode == -signal.SIGKILL
    partials = [name for name in os.listdir(tmp_path) if name != target.name]
    assert len(partials) == 1 and partials[0].startswith('.training-state-latest.pt.ect-partial-')
    assert target.read_bytes() == b'previous state'
    live = tmp_path / (util.partial_prefix(target) + 'abcdefgh.tmp')   # a write of this (running) process
    live.write_bytes(b'in progress')
    (tmp_path / '.notes.tmp').write_bytes(b'not ours')
    assert util.remove_stale_partials(tmp_path) == partials
    assert sorted(os.listdir(tmp_path)) == sorted(['.notes.tmp', live.name, target.name])


def test_os_error_message_is_one_line():
    error = OSError(28, 'No space left on device', '/runs/00001/training-state-latest.pt')
    assert util.os_error_message(error, '--outdir') == \
        '--outdir /runs/00001/training-state-latest.pt: No space left on device'


def test_output_location_checks(tmp_path):
    (tmp_path / 'file').write_text('')
    for bad in (tmp_path / 'file', tmp_path / 'file' / 'sub'):
        with pytest.raises(dnnlib.UserError, match='not a folder') as info:
            util.check_output_dir(str(bad), '--outdir')
        assert str(info.value).startswith(f'--outdir={bad}: ')
    with pytest.raises(dnnlib.UserError, match='is a folder'):
        util.check_output_file(str(tmp_path), '--dest')
    util.check_output_dir(str(tmp_path / 'new' / 'deeper'), '--outdir')
    assert not (tmp_path / 'new').exists()

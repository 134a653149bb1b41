"""Progress bars (torch_utils.progress): shown on a terminal, silent when the output is captured, on ranks other
than 0, with --no-progress and with ECT_NO_PROGRESS=1. The CLIs run as real (forked) processes on a
pseudo-terminal."""

import fcntl
import io
import os
import pty
import runpy
import select
import signal
import struct
import sys
import termios
import traceback

import pytest

from test_generate import snapshot  # noqa: F401 (a fixture: a tiny ECM snapshot)
from test_samplers import ecm_net  # noqa: F401 (a fixture used by `snapshot`)
from torch_utils import progress

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in (progress.ENV_SWITCH, 'RANK')}
    return dict(env, PYTHONPATH=REPO_ROOT, **extra)


def _run_script_here(args, env):
    """In a forked child whose fds 0-2 are set: `python args[0] args[1:]` with `env`, as the interpreter runs a
    script (runpy, as __main__), on fresh text streams over those fds; exits the child with the script's code."""
    code = 1
    try:
        os.chdir(REPO_ROOT)
        os.environ.clear()
        os.environ.update(env)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, 'w', buffering=1, closefd=False)
        sys.stderr = open(2, 'w', buffering=1, closefd=False)
        sys.argv = list(args)
        try:
            runpy.run_path(args[0], run_name='__main__')
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (e.code is not None)
    except BaseException:   # noqa: B902 -- whatever happens in the child is reported on its output
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _read_all(fd, pid):
    """(exit code of child `pid`, everything it wrote to `fd`) once the child has closed it."""
    chunks = []
    while True:
        ready, _, _ = select.select([fd], [], [], 60)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError('no output for 60 s')
        try:
            data = os.read(fd, 4096)
        except OSError:   # EIO: the terminal's child side is closed (the process exited)
            break
        if not data:
            break
        chunks.append(data)
    os.close(fd)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), b''.join(chunks).decode('utf-8', 'replace')


# The CLIs run as real processes, forked from the test process: a spawned interpreter would spend seconds importing
# torch again, and the script runs as `python script.py` runs it (runpy, __main__) on the same files.

def run_on_pty(args, env):
    """(exit code, everything written to stdout and stderr) of a process whose output is a pseudo-terminal."""
    pid, fd = pty.fork()
    if pid == 0:
        fcntl.ioctl(1, termios.TIOCSWINSZ, struct.pack('HHHH', 40, 120, 0, 0))   # a 120-column terminal
        _run_script_here(args, env)
    return _read_all(fd, pid)


def run_captured(args, env):
    """The same with stdout and stderr a pipe (captured output, as in a batch job's log)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        devnull = os.open(os.devnull, os.O_RDONLY)
        for fd, source in ((0, devnull), (1, write), (2, write)):
            os.dup2(source, fd)
        _run_script_here(args, env)
    os.close(write)
    return _read_all(read, pid)


def dataset_args(tmp_path, name):
    return ['dataset_tool.py', '--source=procedural:shapes', f'--dest={tmp_path / name}', '--max-images=24',
            '--resolution=8x8']


def test_enabled_needs_terminal_rank0_and_no_switch(monkeypatch):
    monkeypatch.delenv(progress.ENV_SWITCH, raising=False)
    monkeypatch.delenv('RANK', raising=False)
    assert progress.enabled(FakeTerminal()) and not progress.enabled(io.StringIO())
    monkeypatch.setenv('RANK', '1')
    assert not progress.enabled(FakeTerminal())
    monkeypatch.setenv('RANK', '0')
    for value, shown in (('1', False), ('yes', False), ('0', True), ('', True), ('off', True)):
        monkeypatch.setenv(progress.ENV_SWITCH, value)
        assert progress.enabled(FakeTerminal()) == shown, value


def test_disabled_if_restores_the_environment(monkeypatch):
    monkeypatch.delenv(progress.ENV_SWITCH, raising=False)
    with progress.disabled_if(True):
        assert progress.switched_off()
    assert progress.ENV_SWITCH not in os.environ
    with progress.disabled_if(False):
        assert not progress.switched_off()


def test_dataset_tool_bar_on_terminal_only(tmp_path):
    code, out = run_on_pty(dataset_args(tmp_path, 'a.zip'), clean_env())
    assert code == 0, out
    assert '24/24' in out and 'img/s' in out, out
    code, out = run_captured(dataset_args(tmp_path, 'b.zip'), clean_env())
    assert code == 0, out
    assert '24/24' not in out and 'img/s' not in out and '\r' not in out, out
    assert '24 images, 8x8' in out   # the summary line is still printed


def test_dataset_tool_no_progress_flag_and_switch(tmp_path):
    for args, env in ((dataset_args(tmp_path, 'c.zip') + ['--no-progress'], clean_env()),
                      (dataset_args(tmp_path, 'd.zip'), clean_env(**{progress.ENV_SWITCH: '1'}))):
        code, out = run_on_pty(args, env)
        assert code == 0, out
        assert '24/24' not in out and 'img/s' not in out and '24 images, 8x8' in out, out


def test_generate_bar_counts_images_with_rate(tmp_path, snapshot):  # noqa: F811 (fixture)
    args = ['generate.py', f'--network={snapshot}', f'--outdir={tmp_path / "out"}', '--seeds=0-5', '--batch=2',
            '--device=cpu']
    code, out = run_on_pty(args, clean_env())
    assert code == 0, out
    assert '6/6' in out and 'img/s' in out, out
    assert len(os.listdir(tmp_path / 'out')) == 6


def test_generate_no_progress_flag(tmp_path, snapshot, monkeypatch):  # noqa: F811 (fixture)
    import generate
    monkeypatch.delenv(progress.ENV_SWITCH, raising=False)
    monkeypatch.delenv('RANK', raising=False)
    for flags, shown in (([], True), (['--no-progress'], False)):
        terminal = FakeTerminal()
        monkeypatch.setattr(sys, 'stderr', terminal)
        with pytest.raises(SystemExit) as e:
            generate.cli.main(args=[f'--network={snapshot}', f'--outdir={tmp_path / "out"}', '--seeds=0-1',
                                    '--device=cpu', *flags], prog_name='generate.py')
        assert e.value.code == 0
        assert ('2/2' in terminal.getvalue()) == shown, terminal.getvalue()
    assert progress.ENV_SWITCH not in os.environ   # --no-progress did not leak out of the command


@pytest.mark.parametrize('rank', ['1', '3'])
def test_other_ranks_stay_silent(tmp_path, rank):
    code, out = run_on_pty(dataset_args(tmp_path, f'r{rank}.zip'), clean_env(RANK=rank))
    assert code == 0 and '24/24' not in out, out


def test_metric_feature_bars_on_terminal(monkeypatch):
    import numpy as np
    import torch
    from metrics import metric_utils
    monkeypatch.delenv(progress.ENV_SWITCH, raising=False)
    monkeypatch.delenv('RANK', raising=False)
    detector = lambda images: images.to(torch.float64).mean(dim=(2, 3))  # noqa: E731 (a stand-in feature net)
    batches = [(None, np.full([2, 4, 4, 3], i, dtype=np.uint8)) for i in range(3)]
    for stream, shown in ((FakeTerminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, 'stderr', stream)
        stats = metric_utils.compute_generator_stats(iter(batches), detector, metric_utils.FeatureStats(),
                                                     num_images=6)
        assert stats.num_items == 6
        assert ('sampling + features' in stream.getvalue() and '/6 [' in stream.getvalue()) == shown

"""The initial network's metrics in a background process, while training starts (train.py --eval-init-background).

Scoring the transferred diffusion model (e.g. EDM's Heun sampler at 35 NFE) before the first step costs as long as
minutes of training on a small CPU run, and the network it scores is fixed: it does not need to hold up the loop.
`InitialEvaluation.start` writes the network to <run_dir>/initial-network.pt (the name its metric records carry)
and scores it in a spawned process with the same code as the in-loop path (metrics.training_callback
.evaluate_metrics, then grid-initial-*.png). On the CPU the child takes `child_threads` intra-op threads and the
training process gives them up until the child is done, so the two never oversubscribe the cores. The child's
report lines are printed by the training process (so they reach log.txt) when it is found finished at a tick, and
at the end of training the loop waits for it before the summary table. A failure in the child is raised in the
training process as one error naming the metric run. A pre-emption stops the child; the run that resumes in the
same directory (--resume=auto) scores what has no record yet from the initial-network.pt already there.
"""

import contextlib
import io
import multiprocessing
import os
import traceback

import torch

from metrics import metric_main
from metrics import scoring
from torch_utils import progress
from training.checkpoints import checkpoint
from training.checkpoints import reader

SNAPSHOT_NAME = 'initial-network.pt'


def _score_snapshot(snapshot_path, job, child_threads, connection):
    """Child process: load the snapshot, score and draw it, send ('ok', lines) or ('error', text) back."""
    os.environ[progress.ENV_SWITCH] = '1'           # bars of two processes on one terminal would interleave
    torch.set_num_threads(child_threads)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            net = reader.load_network(snapshot_path)[0].eval().requires_grad_(False)
            scoring.score_initial_network(net, **job)
        connection.send(('ok', out.getvalue().splitlines()))
    except BaseException:   # noqa: B902 -- everything goes back to the training process, which raises it
        connection.send(('error', traceback.format_exc()))
    finally:
        connection.close()


class InitialEvaluation:
    """A running background evaluation of the initial network (see the module docstring)."""

    def __init__(self, process, connection, restore_threads):
        self.process = process                  # the spawned child
        self.connection = connection            # its end of the pipe: one (status, payload) message
        self.restore_threads = restore_threads  # intra-op threads the training process gets back; None = unchanged

    @classmethod
    def start_or_resume(cls, net, run_dir, job, device, resumed):
        """`start` for a fresh run; for a resumed one, the metrics of `job` that the snapshot of the run it
        continues has no records of yet (its run was pre-empted before the child finished), else None."""
        if not resumed:
            return cls.start(net, run_dir, job, device)
        path = os.path.join(run_dir, SNAPSHOT_NAME)
        done = {r['metric'] for r in metric_main.all_records(run_dir) if r.get('snapshot_pkl') == SNAPSHOT_NAME}
        missing = [m for m in job['metrics'] if m not in done]
        if not missing or not os.path.isfile(path):
            return None
        return cls.start(None, run_dir, dict(job, metrics=missing, grids=False), device)

    @classmethod
    def start(cls, net, run_dir, job, device, child_threads=1):
        """Snapshot `net` (None: the snapshot is there already) and score it in the background with `job`
        (score_initial_network's keyword arguments)."""
        path = os.path.join(run_dir, SNAPSHOT_NAME)
        if net is not None:
            checkpoint.save_network_snapshot(path, net, kimg=0, mid_t=list(job['mid_t']))
        context = multiprocessing.get_context('spawn')
        receiver, sender = context.Pipe(duplex=False)
        process = context.Process(target=_score_snapshot, args=(path, dict(job, device=str(device)), child_threads,
                                                                sender), daemon=True)
        process.start()
        sender.close()
        restore = None
        if device.type == 'cpu':
            restore = torch.get_num_threads()
            torch.set_num_threads(max(1, restore - child_threads))
        return cls(process, receiver, restore)

    def done(self):
        """True once the child has reported or ended (finish() then returns at once)."""
        return not self.process.is_alive() or self.connection.poll()

    def finish(self):
        """Wait for the child; returns its report lines (raises RuntimeError with its traceback if it failed)."""
        try:
            status, payload = self.connection.recv() if self._has_message() else ('error', self._silent_exit())
        finally:
            self.process.join()
            self.connection.close()
            self._give_threads_back()
        if status != 'ok':
            raise RuntimeError(f'the background evaluation of {SNAPSHOT_NAME} failed:\n{payload}')
        return payload

    def cancel(self):
        """Stop the child without waiting for its result (pre-emption, errors)."""
        self.process.terminate()
        self.process.join()
        self.connection.close()
        self._give_threads_back()

    def _has_message(self):
        while self.process.is_alive() and not self.connection.poll(1.0):
            pass
        return self.connection.poll()

    def _silent_exit(self):
        return f'the process ended with exit code {self.process.exitcode} before reporting'

    def _give_threads_back(self):
        if self.restore_threads is not None:
            torch.set_num_threads(self.restore_threads)
            self.restore_threads = None

"""--eval-init-background: a failure in the spawned process that scores the initial network (metrics.background)
reaches the caller, and a cancelled child stops; the scores it gives in a run are tested by the quickstart's run
(tests/test_quickstart.py)."""

import pytest
import torch

from configs import presets
from metrics import background
from training.checkpoints import reader


pytestmark = pytest.mark.usefixtures('private_cache')


def test_a_failing_background_evaluation_is_raised(tmp_path):
    job = dict(metrics=['fd_randnet'], metrics_ref=str(tmp_path), mid_t=[1.5], run_dir=str(tmp_path), num_samples=8,
               detector_files={}, grids=False)
    threads = torch.get_num_threads()
    # No snapshot in the run directory: the child fails at once (reader.load_network), with its own message.
    evaluation = background.InitialEvaluation.start(None, str(tmp_path), job, torch.device('cpu'))
    with pytest.raises(RuntimeError, match=f'no such file: {tmp_path / background.SNAPSHOT_NAME}'):
        evaluation.finish()
    assert torch.get_num_threads() == threads


def test_cancel_stops_the_child(tmp_path):
    net = reader.load_network(presets.QUICKSTART_CHECKPOINT)[0]
    job = dict(metrics=['fd_randnet_heun'], metrics_ref=str(tmp_path), mid_t=[1.5], run_dir=str(tmp_path),
               num_samples=50000, detector_files={}, grids=True)
    threads = torch.get_num_threads()
    evaluation = background.InitialEvaluation.start(net, str(tmp_path), job, torch.device('cpu'))
    evaluation.cancel()
    assert not evaluation.process.is_alive() and torch.get_num_threads() == threads

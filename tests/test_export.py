"""Shareable checkpoints (training.checkpoints.export, training.checkpoints.hub): model.safetensors + config.json round trips bit for bit
and loads with every unpickling entry point disabled; exported folders and hf:// paths load wherever a network
path is accepted; the model card carries the recipe and the measured metrics; missing packages and no network
are one clear message."""

import hashlib
import json
import os
import subprocess
import sys
import types

import pytest
from click.testing import CliRunner

import dnnlib
from test_samplers import ecm_net  # noqa: F401 (a fixture: the reference ECM network)
from training.checkpoints import safetensors_io
from training.checkpoints import reader
from training import cli_common
from training.checkpoints import checkpoint
from training.checkpoints import export
from training.checkpoints import hub
from training.sampling import samplers

pytest.importorskip('safetensors', reason='the safetensors package (an optional extra, installed by CI) is not installed')

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SNAPSHOT = 'network-snapshot-000048.pt'
OPTIONS = dict(loss_kwargs=dict(class_name='training.methods.loss.ECTLoss', q=2.0), batch_size=32, total_kimg=48,
               optimizer_kwargs=dict(class_name='torch.optim.RAdam', lr=1e-4), run_dir='/not/recipe')
RECORDS = [dict(results=dict(fd_randnet=0.1683), metric='fd_randnet', snapshot_pkl=SNAPSHOT, sampler='consistency',
                nfe=1, num_samples=500),
           dict(results=dict(fd_randnet=0.5), metric='fd_randnet', snapshot_pkl='network-snapshot-000024.pt',
                sampler='consistency', nfe=1, num_samples=500)]


def tensor_digests(net):
    """name -> (dtype, shape, sha256 of the raw bytes): equal digests mean bit-identical tensors."""
    return {k: (str(v.dtype), list(v.shape), hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest())
            for k, v in net.state_dict().items()}


@pytest.fixture(scope='module')
def run_dir(ecm_net, tmp_path_factory):  # noqa: F811 (fixture)
    """A run directory with one snapshot and metric records of it and of another snapshot."""
    root = tmp_path_factory.mktemp('run')
    checkpoint.save_network_snapshot(root / SNAPSHOT, ecm_net, kimg=48, nimg=48000, stage=5, ema='', mid_t=[0.821],
                                     training_options=OPTIONS)
    with open(root / 'metric-fd_randnet.jsonl', 'w') as f:
        f.write(''.join(json.dumps(r) + '\n' for r in RECORDS))
    return root


@pytest.fixture(scope='module')
def exported(run_dir, tmp_path_factory):
    outdir = tmp_path_factory.mktemp('export')
    paths, config = export.export_network(str(run_dir / SNAPSHOT), str(outdir))
    assert [os.path.basename(p) for p in paths] == ['model.safetensors', 'config.json']
    return outdir, config


def test_round_trip_is_bit_identical(ecm_net, exported):  # noqa: F811 (fixture)
    outdir, _config = exported
    for path in (outdir, outdir / 'model.safetensors', outdir / 'config.json'):
        net, metadata = safetensors_io.load_safetensors_network(str(path))
        assert type(net) is type(ecm_net) and not net.training
        assert net.init_kwargs == ecm_net.init_kwargs
        assert tensor_digests(net) == tensor_digests(ecm_net)
        assert metadata['mid_t'] == [0.821] and metadata['kimg'] == 48


def test_config_holds_architecture_recipe_sampling_and_metrics(ecm_net, exported):  # noqa: F811 (fixture)
    config = exported[1]
    assert config['architecture']['class_name'] == 'training.networks.ECMPrecond'
    assert config['architecture']['init_kwargs'] == json.loads(json.dumps(ecm_net.init_kwargs))
    assert config['preconditioner'] == dict(class_name='ECMPrecond', consistency_model=True,
                                            sigma_data=ecm_net.sigma_data)
    assert config['sampling'] == dict(sampler='consistency', t_max=80.0, mid_t=[0.821])
    assert config['training'] == dict(kimg=48, nimg=48000, stage=5, ema='')
    assert config['recipe'] == {k: v for k, v in OPTIONS.items() if k != 'run_dir'}
    assert config['metrics'] == [RECORDS[0]]   # only this snapshot's records


def test_loads_without_any_unpickling(ecm_net, exported):  # noqa: F811 (fixture)
    """torch itself imports the pickle module, so 'no pickle' is proved by making every unpickling entry point
    (pickle/_pickle load, loads, Unpickler, torch.load) raise before anything of the project is imported."""
    script = '''
import hashlib, json, pickle, _pickle, sys
import torch
def refuse(*args, **kwargs):
    raise AssertionError('unpickling attempted')
class Refused:
    def __init__(self, *args, **kwargs):
        refuse()
for module in (pickle, _pickle):
    module.load = module.loads = refuse
    module.Unpickler = Refused
torch.load = refuse
from training import cli_common
from training.checkpoints import export
net, _ = cli_common.load_network(sys.argv[1], False)
print(json.dumps({k: (str(v.dtype), list(v.shape), hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest())
                  for k, v in net.state_dict().items()}))
'''
    result = subprocess.run([sys.executable, '-c', script, str(exported[0])], capture_output=True, text=True,
                            cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=REPO_ROOT), timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == json.loads(json.dumps(tensor_digests(ecm_net)))


def test_every_loader_accepts_an_export(ecm_net, exported):  # noqa: F811 (fixture)
    outdir = str(exported[0])
    net, metadata = cli_common.load_network(outdir, False)
    assert tensor_digests(net) == tensor_digests(ecm_net)
    assert samplers.resolve_sampler(net, metadata=metadata)[1] == samplers.resolve_sampler(
        ecm_net, metadata=dict(mid_t=[0.821]))[1]
    assert tensor_digests(reader.load_network(outdir)[0]) == tensor_digests(ecm_net)


def test_bad_exports_are_one_clear_message(exported, tmp_path):
    outdir, config = exported
    broken = tmp_path / 'broken'
    broken.mkdir()
    (broken / 'model.safetensors').write_bytes((outdir / 'model.safetensors').read_bytes()[:1000])
    (broken / 'config.json').write_text(json.dumps(config))
    with pytest.raises(dnnlib.UserError, match='cannot read safetensors file'):
        safetensors_io.load_safetensors_network(str(broken))
    (broken / 'model.safetensors').write_bytes((outdir / 'model.safetensors').read_bytes())
    evil = dict(config, architecture=dict(config['architecture'], class_name='os.system'))
    (broken / 'config.json').write_text(json.dumps(evil))
    with pytest.raises(dnnlib.UserError, match='refused to load: the file refers to class "os.system".*may be malicious'):
        safetensors_io.load_safetensors_network(str(broken))
    os.remove(broken / 'config.json')
    with pytest.raises(dnnlib.UserError, match='config.json is missing'):
        safetensors_io.load_safetensors_network(str(broken / 'model.safetensors'))


def test_cli_writes_the_files_and_needs_safetensors(run_dir, tmp_path, monkeypatch):
    result = CliRunner().invoke(export.main, [str(run_dir / SNAPSHOT), f'--outdir={tmp_path / "a"}'])
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path / 'a')) == ['config.json', 'model.safetensors']
    monkeypatch.setitem(sys.modules, 'safetensors', None)   # as if not installed
    monkeypatch.setitem(sys.modules, 'safetensors.torch', None)
    result = CliRunner().invoke(export.main, [str(run_dir / SNAPSHOT), f'--outdir={tmp_path / "b"}'])
    assert result.exit_code == 2 and 'pip install safetensors' in result.output
    assert not os.path.exists(tmp_path / 'b')

# --- hf:// and the model card ---------------------------------------------------------------------------------


def fake_hub(repo_folder, calls):
    """A stand-in huggingface_hub whose downloads come from `repo_folder` (the repository's files)."""
    def hf_hub_download(repo_id, filename, revision=None, cache_dir=None):
        calls.append((repo_id, filename, revision))
        path = os.path.join(repo_folder, filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(f'{filename} not in {repo_id}')
        return path

    class HfApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(('create_repo', repo_id, kwargs))
            return f'https://hub.example/{repo_id}'

        def upload_folder(self, **kwargs):
            calls.append(('upload_folder', kwargs['repo_id'], sorted(os.listdir(kwargs['folder_path']))))

    errors = types.SimpleNamespace(HfHubHTTPError=type('HfHubHTTPError', (Exception,), {}))
    return types.SimpleNamespace(hf_hub_download=hf_hub_download, HfApi=HfApi, errors=errors)


def test_hf_paths_load_through_the_hub(ecm_net, exported, run_dir, monkeypatch):  # noqa: F811 (fixture)
    calls = []
    monkeypatch.setitem(sys.modules, 'huggingface_hub', fake_hub(str(exported[0]), calls))
    net, metadata = cli_common.load_network('hf://someone/ect-net', False)
    assert tensor_digests(net) == tensor_digests(ecm_net) and metadata['mid_t'] == [0.821]
    assert calls == [('someone/ect-net', 'config.json', None), ('someone/ect-net', 'model.safetensors', None)]
    monkeypatch.setitem(sys.modules, 'huggingface_hub', fake_hub(str(run_dir), calls))
    net = reader.load_network(f'hf://someone/run@v1/{SNAPSHOT}')[0]
    assert tensor_digests(net) == tensor_digests(ecm_net) and calls[-1] == ('someone/run', SNAPSHOT, 'v1')


@pytest.mark.parametrize('url', ['hf://justone', 'hf:///repo', 'hf://a b/c'])
def test_malformed_hf_paths(url):
    with pytest.raises(dnnlib.UserError, match='OWNER/REPO'):
        hub.parse_hf_url(url)


def test_hf_path_without_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, 'huggingface_hub', None)
    with pytest.raises(dnnlib.UserError, match=r'hf://someone/net: .*pip install huggingface_hub'):
        cli_common.load_network('hf://someone/net', False)


def test_hf_path_without_network_is_one_line(tmp_path):
    pytest.importorskip('huggingface_hub', reason='the huggingface_hub package (an optional extra) is not installed')
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path / 'hf'))
    result = subprocess.run([sys.executable, 'generate.py', '--network=hf://someone/ect-net', f'--outdir={tmp_path}'],
                            capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert 'hf://someone/ect-net' in lines[0] and 'offline?' in lines[0] and 'Hugging Face Hub' in lines[0]


def test_upload_writes_a_model_card(run_dir, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, 'huggingface_hub', fake_hub(str(tmp_path), calls))
    result = CliRunner().invoke(export.main, [str(run_dir / SNAPSHOT), f'--outdir={tmp_path / "up"}',
                                              '--upload=someone/ect-shapes', '--private'])
    assert result.exit_code == 0, result.output
    card = (tmp_path / 'up' / 'README.md').read_text()
    assert '| fd_randnet | consistency | 1 | 500 | 0.1683 |' in card and '0.5000' not in card
    assert "- `batch_size`: `32`" in card and 'torch.optim.RAdam' in card and 'trained for 48 kimg' in card
    assert 'python generate.py --network=hf://someone/ect-shapes' in card
    assert calls == [('create_repo', 'someone/ect-shapes', dict(repo_type='model', private=True, exist_ok=True)),
                     ('upload_folder', 'someone/ect-shapes', ['README.md', 'config.json', 'model.safetensors'])]
    result = CliRunner().invoke(export.main, [str(run_dir / SNAPSHOT), f'--outdir={tmp_path / "x"}', '--upload=bad'])
    assert result.exit_code == 2 and 'OWNER/REPO' in result.output and not os.path.exists(tmp_path / 'x')


def test_evaluate_scores_an_export_into_its_folder(exported):
    from metrics import evaluate
    outdir = str(exported[0])
    assert evaluate.find_snapshots(outdir) == (outdir, [outdir])

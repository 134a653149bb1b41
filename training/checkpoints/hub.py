"""Networks on the Hugging Face Hub: hf://OWNER/REPO[@REVISION][/FILE] paths, and uploading an export with a
model card (the recipe and the measured metrics).

    python generate.py --network=hf://OWNER/REPO --outdir=out            # model.safetensors + config.json
    python generate.py --network=hf://OWNER/REPO/network-snapshot-000048.pt --outdir=out

Downloads go through `huggingface_hub` and its cache (HF_HOME; HF_HUB_OFFLINE=1 uses only what is cached).
Files from the Hub are then loaded exactly as local ones: model.safetensors without any pickle, snapshots with a
weights-only load, official pickles with the restricted unpickler. `huggingface_hub` is optional
(pip install huggingface_hub): without it, or without a network, an hf:// path is one clear message.
"""

import contextlib
import importlib
import logging
import os
import re

import dnnlib
from training.checkpoints import safetensors_io
from training.loop import run_records

HF_PREFIX = 'hf://'
_REPO_ID = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$')


def is_hf_url(path):
    return isinstance(path, str) and path.startswith(HF_PREFIX)


def check_repo_id(repo_id, flag):
    if not _REPO_ID.match(repo_id or ''):
        raise dnnlib.UserError(f'{flag}={repo_id}: expected a Hub repository OWNER/REPO')
    return repo_id


def parse_hf_url(url):
    """hf://OWNER/REPO[@REVISION][/FILE] -> (repo id, revision or None, file path in the repository or None)."""
    parts = url[len(HF_PREFIX):].split('/', 2)
    if len(parts) < 2 or not all(parts[:2]):
        raise dnnlib.UserError(f'{url}: expected hf://OWNER/REPO or hf://OWNER/REPO/FILE')
    name, _, revision = parts[1].partition('@')
    repo_id = check_repo_id(f'{parts[0]}/{name}', url)
    filename = parts[2] if len(parts) == 3 and parts[2] else None
    return repo_id, revision or None, filename


def _hub_module(what):
    try:
        import huggingface_hub
    except ImportError:
        raise dnnlib.UserError(f'{what}: the Hugging Face Hub needs the huggingface_hub package '
                               f'(pip install huggingface_hub); it is an optional dependency') from None
    return huggingface_hub


@contextlib.contextmanager
def _quiet_hub_logs():
    """huggingface_hub logs each retry; the caller reports the outcome as one message instead. Its logging module
    sets the library's log level when first imported, so it is imported before the level is lowered."""
    with contextlib.suppress(ImportError):
        importlib.import_module('huggingface_hub.utils.logging')
    logger = logging.getLogger('huggingface_hub')
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _download(hub, url, repo_id, filename, revision, cache_dir):
    try:
        with _quiet_hub_logs():
            return hub.hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir)
    except (OSError, ValueError, hub.errors.HfHubHTTPError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise dnnlib.UserError(f'{url}: cannot get {filename} from the Hugging Face Hub ({type(e).__name__}: '
                               f'{reason[:200]}); offline? HF_HUB_OFFLINE=1 uses files already in the cache, or '
                               f'download the files elsewhere and pass their local path') from None


def resolve(url, cache_dir=None):
    """The local path of what hf://... names: a downloaded model.safetensors (with its config.json beside it),
    or the downloaded FILE (a snapshot or pickle)."""
    repo_id, revision, filename = parse_hf_url(url)
    hub = _hub_module(url)
    if filename is None or filename.endswith('.safetensors') or os.path.basename(filename) == safetensors_io.CONFIG_FILE:
        folder = os.path.dirname(filename) if filename else ''
        weights = filename if filename and filename.endswith('.safetensors') else \
            '/'.join(p for p in (folder, safetensors_io.SAFETENSORS_FILE) if p)
        _download(hub, url, repo_id, '/'.join(p for p in (folder, safetensors_io.CONFIG_FILE) if p), revision, cache_dir)
        return _download(hub, url, repo_id, weights, revision, cache_dir)
    return _download(hub, url, repo_id, filename, revision, cache_dir)

# ----------------------------------------------------------------------------------------------------------
# Upload with a model card.


def _value_text(value):
    return f'{value:.4g}' if isinstance(value, float) else str(value)


def metrics_table(records):
    """Markdown rows (metric, sampler, NFE, samples, value) of metric records."""
    rows = ['| metric | sampler | NFE | samples | value |', '|---|---|---|---|---|']
    for record in records:
        for key, value in run_records.record_value(record):
            rows.append(f'| {key} | {record.get("sampler")} | {record.get("nfe")} | {record.get("num_samples")} | '
                        f'{value:.4f} |')
    return rows if len(rows) > 2 else ['No metric was recorded for this snapshot.']


def recipe_lines(config):
    """Markdown bullet lines of the training recipe in an export's config."""
    recipe = config.get('recipe') or {}
    lines = [f'- `{key}`: `{_value_text(value)}`' for key, value in recipe.items()]
    training = config.get('training') or {}
    lines += [f'- trained for {training.get("kimg")} kimg (curriculum stage {training.get("stage")}, '
              f'EMA {training.get("ema") or "default"})']
    return lines


def model_card(config, repo_id):
    """The README.md (model card) text of an exported network: usage, architecture, recipe, measured metrics."""
    arch, sampling = config['architecture'], config.get('sampling') or {}
    return '\n'.join([
        '---', 'library_name: ect', 'tags:', '- consistency-models', '- easy-consistency-tuning', '- image-generation',
        '---', '', f'# {repo_id}', '',
        'A network exported by the ECT codebase (Easy Consistency Tuning, "Consistency Models Made Easy", '
        'Geng et al. 2024) as `model.safetensors` + `config.json`.', '',
        '```bash', f'python generate.py --network=hf://{repo_id} --outdir=out --seeds=0-63', '```', '',
        '## Architecture', '',
        f'`{arch["class_name"]}`, {arch.get("img_resolution")}x{arch.get("img_resolution")}, '
        f'{arch.get("img_channels")} channels, {arch.get("label_dim") or "no"} classes; sampling defaults: '
        f'{", ".join(f"{k}={v}" for k, v in sampling.items())}.', '',
        '## Training recipe', '', *recipe_lines(config), '',
        '## Measured metrics', '', *metrics_table(config.get('metrics') or []), ''])


def write_model_card(outdir, config, repo_id):
    """Write outdir/README.md (the model card); returns its path."""
    path = os.path.join(outdir, 'README.md')
    with dnnlib.util.atomic_write(path, 'w') as f:
        f.write(model_card(config, repo_id))
    return path


def upload_folder(outdir, repo_id, private=False):
    """Create the model repository if needed and upload `outdir` to it; returns the repository URL."""
    hub = _hub_module('--upload')
    try:
        with _quiet_hub_logs():
            api = hub.HfApi()
            url = api.create_repo(repo_id, repo_type='model', private=private, exist_ok=True)
            api.upload_folder(repo_id=repo_id, folder_path=outdir, repo_type='model',
                              commit_message='Upload ECT network (model.safetensors, config.json, model card)')
    except (OSError, ValueError, hub.errors.HfHubHTTPError) as e:
        raise dnnlib.UserError(f'--upload={repo_id}: the upload failed ({type(e).__name__}: '
                               f'{str(e).strip()[:200]}); logged in? (hf auth login, or HF_TOKEN)') from None
    return str(url)

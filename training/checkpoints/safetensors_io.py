"""Exported networks: `model.safetensors` + `config.json`, written and read back without any pickle.

`model.safetensors` holds the network's tensors exactly (names, dtypes, bits) in the safetensors format (a JSON
header and raw little-endian data: nothing is executed or unpickled to read it). `config.json` holds what
rebuilds and uses it: the architecture (an allow-listed class name and its keyword arguments), the
preconditioner, the training recipe, the sampling defaults (sampler, t_max, mid_t), the training progress (kimg,
curriculum stage, EMA) and the metric records of the snapshot. Needs the optional `safetensors` package
(pip install safetensors). The command line that writes them is training.checkpoints.export.
"""

import json
import os

import dnnlib
from training.checkpoints import checkpoint
from training.sampling import samplers

SAFETENSORS_FILE = 'model.safetensors'
CONFIG_FILE = 'config.json'
EXPORT_FORMAT = 'ect-safetensors'
EXPORT_VERSION = 1
RECIPE_KEYS = ('dataset_kwargs', 'network_kwargs', 'method_kwargs', 'loss_kwargs', 'optimizer_kwargs', 'lr_kwargs',
               'ema_kwargs', 'batch_size', 'total_kimg', 'tick_kimg', 'double_ticks', 'precision', 'transfer', 'seed')


def safetensors_module():
    try:
        import safetensors.torch
    except ImportError:
        raise dnnlib.UserError('model.safetensors networks need the safetensors package (pip install safetensors); '
                               'it is an optional dependency') from None
    return safetensors.torch

# ----------------------------------------------------------------------------------------------------------
# config.json


def make_config(net, metadata=None, metrics=()):
    """The config.json dict of `net` with its snapshot `metadata` and metric records (all plain JSON)."""
    metadata = json.loads(json.dumps(metadata or {}))
    options = metadata.get('training_options') if isinstance(metadata.get('training_options'), dict) else {}
    consistency = samplers.is_consistency_net(net)
    mid_t = metadata.get('mid_t')
    return dict(
        format=EXPORT_FORMAT, version=EXPORT_VERSION,
        architecture=dict(class_name=checkpoint.snapshot_class_name(net), init_kwargs=checkpoint.snapshot_init_kwargs(net),
                          img_resolution=net.img_resolution, img_channels=net.img_channels, label_dim=net.label_dim),
        preconditioner=dict(class_name=type(net).__name__, consistency_model=consistency,
                            sigma_data=_number(getattr(net, 'sigma_data', None))),
        recipe={key: options[key] for key in RECIPE_KEYS if key in options},
        sampling=dict(sampler='consistency', t_max=samplers.T_MAX, mid_t=mid_t if isinstance(mid_t, list) else
                      ([mid_t] if mid_t is not None else None)) if consistency else dict(sampler='heun', num_steps=samplers.HEUN_NUM_STEPS),
        training=dict(kimg=metadata.get('kimg'), nimg=metadata.get('nimg'), stage=metadata.get('stage'),
                      ema=metadata.get('ema')),
        metrics=json.loads(json.dumps(list(metrics))),
        metadata=metadata)


def _number(value):
    return float(value) if isinstance(value, (int, float)) else None


def check_config(config, name):
    """UserError unless `config` is an ECT export config.json this version reads."""
    if not isinstance(config, dict) or config.get('format') != EXPORT_FORMAT:
        raise dnnlib.UserError(f'{name}: not an {EXPORT_FORMAT} config.json')
    if config.get('version') != EXPORT_VERSION:
        raise dnnlib.UserError(f'{name}: unsupported export version {config.get("version")!r} (expected {EXPORT_VERSION})')
    architecture = config.get('architecture')
    if not isinstance(architecture, dict) or not isinstance(architecture.get('init_kwargs'), dict):
        raise dnnlib.UserError(f'{name}: "architecture" with "class_name" and "init_kwargs" is missing')

# ----------------------------------------------------------------------------------------------------------
# Writing and reading.


def save_safetensors_network(outdir, net, metadata=None, metrics=()):
    """Write outdir/model.safetensors (the exact state_dict) and outdir/config.json, each atomically; returns
    the two paths."""
    st = safetensors_module()
    config = make_config(net, metadata, metrics)
    tensors = {key: value.detach().cpu().contiguous() for key, value in net.state_dict().items()}
    paths = os.path.join(outdir, SAFETENSORS_FILE), os.path.join(outdir, CONFIG_FILE)
    with dnnlib.util.atomic_write(paths[0], 'wb') as f:
        f.write(st.save(tensors, metadata=dict(format='pt', ect_format=EXPORT_FORMAT)))
    with dnnlib.util.atomic_write(paths[1], 'w') as f:
        f.write(json.dumps(config, indent=2) + '\n')
    return paths


def safetensors_files(path):
    """(model.safetensors path, config.json path) for a folder, either file, or None when `path` is neither."""
    path = os.fspath(path)
    if '://' in path:   # URLs (http, hf) are resolved to local files first
        return None
    if os.path.isdir(path):
        folder = path
    elif os.path.basename(path) == CONFIG_FILE or path.endswith('.safetensors'):
        folder = os.path.dirname(os.path.abspath(path))
    else:
        return None
    weights = path if path.endswith('.safetensors') else os.path.join(folder, SAFETENSORS_FILE)
    return weights, os.path.join(folder, CONFIG_FILE)


def is_safetensors_path(path):
    """True when `path` names an exported network (folder with model.safetensors, or one of its files)."""
    files = safetensors_files(path)
    return files is not None and (os.path.isfile(files[0]) or not os.path.isdir(path))


def load_safetensors_network(path):
    """(net, metadata) from an exported network (folder or either file): eval mode, CPU, tensors bit-identical to
    the exported ones; `metadata` is the snapshot's (mid_t etc.) plus the config's metric records."""
    files = safetensors_files(path)
    if files is None:
        raise dnnlib.UserError(f'{path}: not a model.safetensors file, its config.json or their folder')
    weights, config_path = files
    for file, what in ((weights, 'the tensors'), (config_path, 'the architecture')):
        if not os.path.isfile(file):
            raise dnnlib.UserError(f'{path}: {file} is missing (it holds {what})')
    try:
        with open(config_path, 'r', encoding='utf-8') as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise dnnlib.UserError(f'{config_path}: not JSON ({e.msg}, line {e.lineno})') from None
    check_config(config, config_path)
    try:
        tensors = safetensors_module().load_file(weights, device='cpu')
    except dnnlib.UserError:
        raise
    except Exception as e:   # safetensors reports a bad header or truncated data as SafetensorError/OSError
        raise dnnlib.UserError(f'{weights}: cannot read safetensors file (truncated or corrupt?): {e}') from None
    architecture = config['architecture']
    net = checkpoint.build_network(architecture.get('class_name'), architecture['init_kwargs'], tensors, weights)
    metadata = dict(config.get('metadata') or {}, metrics=config.get('metrics', []))
    if config.get('sampling', {}).get('mid_t') is not None:
        metadata.setdefault('mid_t', config['sampling']['mid_t'])
    return net, metadata

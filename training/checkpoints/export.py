"""Shareable checkpoints: a network as `model.safetensors` + `config.json`, loaded back without any pickle.

    python -m training.checkpoints.export training-runs/<run>/network-snapshot-000048.pt --outdir=exported/ect-shapes16
    python -m training.checkpoints.export <snapshot> --outdir=DIR --upload=OWNER/REPO   # + model card, to the Hugging Face Hub

`model.safetensors` holds the network's tensors exactly (names, dtypes, bits) in the safetensors format (a JSON
header and raw little-endian data: nothing is executed or unpickled to read it). `config.json` holds what
rebuilds and uses it: the architecture (an allow-listed class name and its keyword arguments), the
preconditioner, the training recipe, the sampling defaults (sampler, t_max, mid_t), the training progress (kimg,
curriculum stage, EMA) and the metric records of the snapshot (metric-*.jsonl in its run directory). The folder,
either file, or hf://OWNER/REPO[/FILE] (training.checkpoints.hub) is accepted wherever a network path is
(training.checkpoints.reader). Needs the optional `safetensors` package (pip install safetensors).
"""

import json
import os

import click

from training.checkpoints import hub
from training.checkpoints import reader
from training.checkpoints import safetensors_io
from training.loop import run_records
from training.cli_common import user_errors

# ----------------------------------------------------------------------------------------------------------
# Converting a snapshot.


def read_source(network):
    """(net, metadata, metric records) of a snapshot file or official pickle (local path or URL); the metric
    records are those of a local snapshot's run directory."""
    local = reader.locate(network)
    net, metadata = reader.load_network(local)
    run_dir = os.path.dirname(os.path.abspath(local))
    return net, metadata, run_records.metric_records(run_dir, snapshot_name=os.path.basename(local))


def export_network(network, outdir):
    """Convert snapshot `network` into outdir/{model.safetensors, config.json}; returns (paths, config)."""
    safetensors_io.safetensors_module()   # the one clear message before any loading
    net, metadata, metrics = read_source(network)
    paths = safetensors_io.save_safetensors_network(outdir, net, metadata, metrics)
    with open(paths[1], 'r', encoding='utf-8') as f:
        return paths, json.load(f)


@click.command(context_settings=dict(help_option_names=['-h', '--help']))
@click.argument('network', metavar='SNAPSHOT')
@click.option('--outdir', help='Folder for model.safetensors and config.json', metavar='DIR', required=True)
@click.option('--upload', 'repo_id', help='Also upload the folder (with a model card) to this Hub repository', metavar='OWNER/REPO', default=None)
@click.option('--private', help='Create the Hub repository as private', is_flag=True)
def main(network, outdir, repo_id, private):
    """Export a network snapshot as model.safetensors + config.json (optionally to the Hugging Face Hub)."""
    with user_errors():
        if repo_id is not None:
            hub.check_repo_id(repo_id, '--upload')
        paths, config = export_network(network, outdir)
        click.echo(f'Wrote {paths[0]} and {paths[1]}')
        if repo_id is not None:
            card = hub.write_model_card(outdir, config, repo_id)
            click.echo(f'Wrote {card}')
            click.echo(f'Uploaded to {hub.upload_folder(outdir, repo_id, private=private)}')


if __name__ == '__main__':
    main()

"""One way to read a network file: `load_network(path_or_url)`.

First the bytes are found (`locate`): a local path as it is, an http(s) URL through dnnlib's verified download
cache, hf://OWNER/REPO[/FILE] through the Hugging Face Hub client (training.checkpoints.hub). Then the format is
recognised from them and the file goes to exactly one reader, which knows only its own format:

| what the bytes are                                   | format                                  | reader                                      |
|------------------------------------------------------|-----------------------------------------|---------------------------------------------|
| a folder, a *.safetensors or a config.json           | an exported network                     | safetensors_io.load_safetensors_network     |
| a pickle (first byte 0x80)                           | an official EDM/EDM2/ECT network pickle | safe_pickle (its `ema`, rebuilt without running code) |
| a torch zip whose record is an ect-network-snapshot  | one of our snapshots                    | checkpoint.network_from_snapshot            |
| a torch zip holding a state dict of tensors          | an openai consistency_models checkpoint | openai_state.karras_denoiser_from_state_dict |

The torch zips are read once (torch.load, weights_only) and the record decides between the last two.
"""

import os
import zipfile

import dnnlib
from dnnlib.util import UserError
from training.checkpoints import checkpoint
from training.checkpoints import hub
from training.checkpoints import openai_state
from training.checkpoints import safe_pickle
from training.checkpoints import safetensors_io

_PICKLE_PROTOCOL_BYTE = b'\x80'


def locate(path_or_url, cache_dir=None):
    """The local path of a network file or exported folder: hf:// paths are downloaded by the Hub client, URLs into
    the verified cache (once); local paths are returned as they are."""
    if hub.is_hf_url(path_or_url):
        return hub.resolve(path_or_url, cache_dir=cache_dir)
    if safetensors_io.safetensors_files(path_or_url) is not None:
        return os.fspath(path_or_url)
    return dnnlib.util.open_url(path_or_url, cache_dir=cache_dir, return_filename=True)


def load_network(path_or_url, *, allow_unsafe_pickle=False, cache_dir=None, resolution=None, parameterization=None,
                 num_head_channels=64):
    """(network in eval mode on the CPU, metadata) of any network file (see the module docstring). Metadata is the
    snapshot's or export's (mid_t, kimg, ...), {} for pickles and state dicts. `resolution`, `parameterization`
    and `num_head_channels` serve openai state dicts only (None: inferred from the file name)."""
    name = os.fspath(path_or_url)
    path = locate(path_or_url, cache_dir)
    if safetensors_io.is_safetensors_path(path):
        return safetensors_io.load_safetensors_network(path)
    if zipfile.is_zipfile(path):
        data = checkpoint.read_weights_only(path, name, 'network file')
        if openai_state.is_openai_state_dict(data):
            return openai_state.karras_denoiser_from_state_dict(data, name, resolution, parameterization,
                                                                num_head_channels), {}
        return checkpoint.network_from_snapshot(data, name)
    with open(path, 'rb') as f:
        if not f.read(1).startswith(_PICKLE_PROTOCOL_BYTE):
            raise UserError(f'{name}: not a network file (neither a network pickle, a snapshot, an openai state '
                            f'dict nor an exported model.safetensors)')
        f.seek(0)
        net = safe_pickle.pickled_ema(safe_pickle.load_pkl(f, name, allow_unsafe_pickle), name)
    if allow_unsafe_pickle:
        net = net.to('cpu')   # Executed source may have restored CUDA tensors; our rebuilds are on the CPU.
    return net.eval(), {}

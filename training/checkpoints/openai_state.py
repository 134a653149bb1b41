"""openai/consistency_models checkpoints: the released `.pt` files are plain state dicts of guided-diffusion's
`UNetModel`. They are read with `torch.load(weights_only=True)`, the architecture is inferred from the tensor
shapes, and the weights are mapped into this project's `KarrasDenoiser` (training.networks.karras). Files reach
it through training.checkpoints.reader.

Name mapping (openai -> ours, inside `model.`): `time_embed.0/2` -> `map_layer0/1`, `label_emb` -> `map_label`
(transposed), `input_blocks.i` -> the i-th `enc` module, `middle_block.0-1` -> `dec.*_in0`, `middle_block.2` ->
`dec.*_in1`, `output_blocks.j.0-1` -> the j-th non-upsampling `dec` block and `output_blocks.j.{1|2}` (a second
ResBlock) -> the `dec.*_up` block after it, `out.0/2` -> `out_norm/out_conv`. Inside a block: `in_layers.0/2` ->
`norm0/conv0`, `emb_layers.1` -> `affine`, `out_layers.0/3` -> `norm1/conv1`, `skip_connection` -> `skip`, and the
attention's `norm/qkv/proj_out` -> `norm2/qkv/proj`, where qkv channels are reordered from openai's
(3, heads, head_dim) to EDM's (heads, head_dim, 3).
"""

import os

import torch

from dnnlib.util import UserError
from training.networks.karras import KarrasDenoiser

# Resolution of the released files by a part of their name (the resolution is not in a state dict).
RELEASED_RESOLUTIONS = {'imagenet64': 64, 'bedroom256': 256, 'cat256': 256}
# Parameterization of the released files by their name prefix.
RELEASED_PARAMETERIZATIONS = {'edm_': 'edm', 'cd_': 'consistency', 'ct_': 'consistency'}

_BLOCK_TENSORS = (('norm0', 'R.in_layers.0'), ('conv0', 'R.in_layers.2'), ('affine', 'R.emb_layers.1'),
                  ('norm1', 'R.out_layers.0'), ('conv1', 'R.out_layers.3'), ('skip', 'R.skip_connection'),
                  ('norm2', 'A.norm'), ('qkv', 'A.qkv'), ('proj', 'A.proj_out'))

# ----------------------------------------------------------------------------------------------------------
# Options that a state dict cannot reveal.


def resolution_from_name(name, resolution=None):
    """`resolution` if given, else the resolution of a released file name (e.g. cd_imagenet64_l2.pt -> 64)."""
    if resolution is not None:
        return int(resolution)
    base = os.path.basename(name).lower()
    for key, value in RELEASED_RESOLUTIONS.items():
        if key in base:
            return value
    raise UserError(f'{name}: pass --resolution (the image resolution is not stored in a state dict; released '
                    f'file names containing {", ".join(RELEASED_RESOLUTIONS)} give it)')


def parameterization_from_name(name, parameterization=None):
    """`parameterization` if given, else 'edm' for edm_*.pt and 'consistency' for cd_*.pt / ct_*.pt."""
    if parameterization is not None:
        return parameterization
    base = os.path.basename(name).lower()
    for prefix, value in RELEASED_PARAMETERIZATIONS.items():
        if base.startswith(prefix):
            return value
    raise UserError(f'{name}: pass --parameterization=edm|consistency (only released file names edm_*, cd_*, ct_* '
                    f'tell the form of the denoiser)')

# ----------------------------------------------------------------------------------------------------------
# Architecture from tensor shapes.


def _shape(shapes, key, name):
    if key not in shapes:
        raise UserError(f'{name}: tensor "{key}" is missing; not a consistency_models UNetModel state dict')
    return list(shapes[key])


def _levels_and_blocks(shapes, name):
    """(levels, blocks per level) from the output blocks: every level but the first ends in an upsampling
    ResBlock, stored as a second ResBlock inside an output block."""
    num_out = len({int(k.split('.')[1]) for k in shapes if k.startswith('output_blocks.')})
    ups = sum(1 for j in range(num_out) for s in (1, 2) if f'output_blocks.{j}.{s}.in_layers.0.weight' in shapes)
    levels = ups + 1
    if num_out == 0 or num_out % levels:
        raise UserError(f'{name}: {num_out} output blocks do not form {levels} levels; not a consistency_models '
                        f'UNetModel state dict')
    return levels, num_out // levels - 1


def infer_unet_kwargs(shapes, resolution, name='state dict'):
    """KarrasDenoiser / DhariwalUNet arguments of a UNetModel state dict given as {name: shape}."""
    model_channels, img_channels = _shape(shapes, 'input_blocks.0.0.weight', name)[:2]
    emb_channels = _shape(shapes, 'time_embed.0.weight', name)[0]
    levels, num_blocks = _levels_and_blocks(shapes, name)
    channel_mult, attn_resolutions = [], []
    for level in range(levels):
        first = f'input_blocks.{level * (num_blocks + 1) + 1}'
        channels = _shape(shapes, f'{first}.0.out_layers.3.weight', name)[0]
        channel_mult.append(max(channels // model_channels, 1))
        if f'{first}.1.qkv.weight' in shapes:
            attn_resolutions.append(resolution >> level)
    emb_out = _shape(shapes, 'input_blocks.1.0.emb_layers.1.weight', name)[0]
    label = shapes.get('label_emb.weight')
    return dict(img_resolution=resolution, img_channels=img_channels, label_dim=int(label[0]) if label else 0,
                model_channels=model_channels, channel_mult=channel_mult, num_blocks=num_blocks,
                attn_resolutions=attn_resolutions, channel_mult_emb=max(emb_channels // model_channels, 1),
                adaptive_scale=emb_out == 2 * _shape(shapes, 'input_blocks.1.0.out_layers.3.weight', name)[0])

# ----------------------------------------------------------------------------------------------------------
# Name mapping.


def _block_prefixes(unet):
    """(our block name, openai ResBlock prefix, openai attention prefix) for every UNetBlock, in openai's order."""
    out = [(f'enc.{key}', f'input_blocks.{i}.0', f'input_blocks.{i}.1') for i, key in enumerate(unet.enc) if i > 0]
    j, has_attn = -1, False
    for key, block in unet.dec.items():
        if key.endswith('_in0'):
            out.append((f'dec.{key}', 'middle_block.0', 'middle_block.1'))
        elif key.endswith('_in1'):
            out.append((f'dec.{key}', 'middle_block.2', None))
        elif key.endswith('_up'):
            out.append((f'dec.{key}', f'output_blocks.{j}.{2 if has_attn else 1}', None))
        else:
            j, has_attn = j + 1, bool(block.num_heads)
            out.append((f'dec.{key}', f'output_blocks.{j}.0', f'output_blocks.{j}.1'))
    return out


def tensor_map(net):
    """[(openai name, our state-dict name, kind, heads)] in openai's state-dict order; kind is 'copy',
    'transpose' (label_emb) or 'qkv' (channels reordered for `heads` heads)."""
    unet, ours = net.model, net.state_dict()
    pairs = [('time_embed.0', 'map_layer0', 'copy'), ('time_embed.2', 'map_layer1', 'copy'),
             ('label_emb', 'map_label', 'transpose'), ('input_blocks.0.0', f'enc.{next(iter(unet.enc))}', 'copy')]
    heads = {}
    for block_name, res, attn in _block_prefixes(unet):
        heads[block_name] = unet.get_submodule(block_name).num_heads
        for mine, theirs in _BLOCK_TENSORS:
            prefix = res if theirs.startswith('R.') else attn
            if prefix is not None:
                pairs.append((f'{prefix}.{theirs[2:]}', f'{block_name}.{mine}', 'qkv' if mine == 'qkv' else 'copy'))
    pairs += [('out.0', 'out_norm', 'copy'), ('out.2', 'out_conv', 'copy')]
    return [(f'{theirs}.{p}', f'model.{mine}.{p}', kind, heads.get(mine.rsplit('.', 1)[0], 0))
            for theirs, mine, kind in pairs for p in ('weight', 'bias') if f'model.{mine}.{p}' in ours]


def openai_layout(net):
    """[(openai name, shape)] of the state dict openai's UNetModel of this architecture has."""
    ours = net.state_dict()
    return [(theirs, list(ours[mine].shape)[::-1] if kind == 'transpose' else list(ours[mine].shape))
            for theirs, mine, kind, _ in tensor_map(net)]


def check_layout(shapes, net, name):
    """UserError naming the first tensor in which `shapes` ({openai name: shape}) differs from `net`'s layout."""
    expected = openai_layout(net)
    for key, shape in expected:
        if key not in shapes:
            raise UserError(f'{name}: tensor "{key}" (shape {shape}) is missing; the state dict does not fit the '
                            f'ADM U-Net inferred from its shapes')
        if list(shapes[key]) != shape:
            raise UserError(f'{name}: tensor "{key}" has shape {list(shapes[key])}, the ADM U-Net inferred from the '
                            f'state dict expects {shape}')
    known = {key for key, _ in expected}
    extra = [key for key in shapes if key not in known]
    if extra:
        raise UserError(f'{name}: unexpected tensor "{extra[0]}"; the state dict does not fit the ADM U-Net '
                        f'inferred from its shapes')


def _qkv_to_ours(tensor, heads):
    """Reorder qkv output channels from openai's (3, heads, head_dim) to EDM's (heads, head_dim, 3)."""
    rest = tensor.shape[1:]
    return tensor.reshape(3, heads, -1, *rest).movedim(0, 2).reshape(-1, *rest)


def _convert(tensor, kind, heads):
    if kind == 'transpose':
        return tensor.t()
    return _qkv_to_ours(tensor, heads) if kind == 'qkv' else tensor


def load_openai_state(net, state_dict, name='state dict'):
    """Copy an openai UNetModel state dict into `net` (a KarrasDenoiser of the same architecture)."""
    check_layout({k: v.shape for k, v in state_dict.items()}, net, name)
    ours = net.state_dict()
    for theirs, mine, kind, heads in tensor_map(net):
        ours[mine] = _convert(state_dict[theirs], kind, heads)
    net.load_state_dict(ours, strict=True)
    return net

# ----------------------------------------------------------------------------------------------------------
# Building and loading.


def build_karras_denoiser(shapes, resolution, parameterization, num_head_channels=64, name='state dict', **kwargs):
    """A KarrasDenoiser with the architecture of the state dict `shapes` ({openai name: shape}); its layout is
    checked, and the weights are left as initialised. Pass device='meta' to build without memory."""
    kwargs = dict(infer_unet_kwargs(shapes, resolution, name), parameterization=parameterization,
                  channels_per_head=num_head_channels, **kwargs)
    for key, shape in shapes.items():
        if key.endswith('.qkv.weight') and (shape[1] % num_head_channels or shape[1] < num_head_channels):
            raise UserError(f'{name}: --num_head_channels={num_head_channels} does not divide the {shape[1]} '
                            f'channels of "{key}"')
    device = kwargs.pop('device', None)
    with torch.device(device or 'cpu'):
        net = KarrasDenoiser(**kwargs)
    check_layout(shapes, net, name)
    return net


def _state_dict_shapes(data, name):
    if not isinstance(data, dict) or not data or not all(isinstance(k, str) and torch.is_tensor(v)
                                                         for k, v in data.items()):
        raise UserError(f'{name}: not a consistency_models checkpoint (expected a state dict of tensors)')
    return {k: v.shape for k, v in data.items()}


def karras_denoiser_from_state_dict(data, name, resolution=None, parameterization=None, num_head_channels=64):
    """A KarrasDenoiser (eval mode, CPU) holding the openai state dict `data` loaded from file `name`."""
    shapes = _state_dict_shapes(data, name)
    resolution = resolution_from_name(name, resolution)
    parameterization = parameterization_from_name(name, parameterization)
    net = build_karras_denoiser(shapes, resolution, parameterization, num_head_channels, name)
    return load_openai_state(net, data, name).eval()


def is_openai_state_dict(data):
    return isinstance(data, dict) and 'format' not in data and any(k == 'input_blocks.0.0.weight' for k in data)

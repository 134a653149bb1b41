"""py-meanflow's checkpoints (Gsunshine/py-meanflow, meanflow/training/load_and_save.py) as this project's MeanFlow
networks (training.networks.meanflow_unet.MeanFlowPrecond), and back (docs/MEANFLOW.md §5).

A py-meanflow checkpoint is a torch.save dict {'model', 'optimizer', 'lr_schedule', 'epoch', 'args'}; 'model' is
the state dict of its MeanFlow module: 'num_updates', the trained U-Net under 'net.', its EMAs under 'net_ema.'
(decay --ema_decay, 0.9999) and 'net_ema1.', 'net_ema2.', ... (--ema_decays, 0.99995 and 0.9996; the demo notebook
samples net_ema1). The U-Net's tensor names are ours under 'model.', except that the rows of every attention
block's qkv weight and bias are in py-meanflow's channel order ([q | k | v][head][channel]), which the mapping
rearranges into EDM's. Every py-meanflow attention block has one head (unet.py SongUNet: num_heads=1).
"""

import argparse

import torch

import dnnlib
from dnnlib.util import UserError
from training.checkpoints.safe_pickle import file_name, load_state_strict, refusal, torch_refused_global, unreadable
from training.networks.meanflow_unet import MeanFlowPrecond, qkv_to_edm_order, qkv_to_meanflow_order

MEANFLOW_NUM_HEADS = 1      # py-meanflow unet.py SongUNet block_kwargs: num_heads=1
_QKV = ('.qkv.weight', '.qkv.bias')

# py-meanflow's CIFAR-10 U-Net (meanflow/models/model_configs.py MODEL_CONFIGS['unet'], the SongUNet defaults of
# models/unet.py for the rest) as MeanFlowPrecond keyword arguments; dropout and augment_dim come from the run.
MEANFLOW_CIFAR10_UNET = dict(model_type='MeanFlowUNet', model_channels=128, channel_mult=[2, 2, 2],
    channel_mult_emb=4, num_blocks=4, attn_resolutions=[16], embedding_type='positional', channel_mult_noise=2,
    encoder_type='standard', decoder_type='standard', resample_filter=[1, 3, 3, 1])


def meanflow_to_ours(state, network='net_ema1'):
    """MeanFlowPrecond tensors from py-meanflow tensors: `state` is a MeanFlow module's state dict, of which the
    network `network` ('net', 'net_ema', 'net_ema1', ...) is taken, or a bare SongUNet state dict (network=None)."""
    if network is not None:
        prefix = network + '.'
        if not any(key.startswith(prefix) for key in state):
            found = sorted({key.split('.')[0] for key in state if '.' in key})
            raise UserError(f'py-meanflow state has no network "{network}" (it has {", ".join(found)})')
        state = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    return {f'model.{key}': qkv_to_edm_order(value, MEANFLOW_NUM_HEADS) if key.endswith(_QKV) else value
            for key, value in state.items()}


def ours_to_meanflow(state):
    """A bare py-meanflow SongUNet state dict from MeanFlowPrecond tensors (inverse of meanflow_to_ours)."""
    return {key[len('model.'):]: qkv_to_meanflow_order(value, MEANFLOW_NUM_HEADS) if key.endswith(_QKV) else value
            for key, value in state.items() if key.startswith('model.')}


def meanflow_network_kwargs(tensors, dropout=0.2):
    """MeanFlowPrecond keyword arguments of py-meanflow's CIFAR-10 U-Net holding `tensors` (ours, from
    meanflow_to_ours): the configuration of model_configs.py, augment_dim read from the augment layer's width."""
    augment = tensors.get('model.map_augment.weight')
    return dict(MEANFLOW_CIFAR10_UNET, img_resolution=32, img_channels=3, dropout=float(dropout),
                augment_dim=int(augment.shape[1]) if augment is not None else 0)


def load_meanflow_checkpoint(path, network='net_ema1', network_kwargs=None):
    """(MeanFlowPrecond in eval mode on the CPU, metadata) from a py-meanflow checkpoint file (e.g. the demo's
    model.pth): the network `network`, read weights-only (its argparse.Namespace 'args' allowed, nothing else),
    built with `network_kwargs` (None: py-meanflow's CIFAR-10 U-Net, meanflow_network_kwargs)."""
    name = file_name(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            data = torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise UserError(f'{name}: no such py-meanflow checkpoint file') from None
    except Exception as e:
        refused = torch_refused_global(e)
        raise UserError(refusal(name, refused) if refused else unreadable(name, 'py-meanflow checkpoint', e)) \
            from None
    if not isinstance(data, dict) or not isinstance(data.get('model'), dict):
        raise UserError(f'{name}: not a py-meanflow checkpoint (expected a dict with a "model" state dict)')
    args = data.get('args')
    tensors = meanflow_to_ours(data['model'], network)
    if network_kwargs is None:
        network_kwargs = meanflow_network_kwargs(tensors, getattr(args, 'dropout', 0.2))
    try:
        net = MeanFlowPrecond(**network_kwargs)
    except dnnlib.UserError as e:
        raise UserError(f'{name}: {e}') from None
    load_state_strict(net, tensors, name)
    return net.eval(), dict(source='py-meanflow', network=network, epoch=data.get('epoch'))

"""The network classes a file may name (official pickles' persistent records, our snapshots), by the module that
defines them here: the allow-list of every reader of training/checkpoints/ (nothing else is ever built)."""

NETWORK_MODULES = {
    'training.networks': ('VPPrecond', 'VEPrecond', 'EDMPrecond', 'ECMPrecond', 'SongUNet', 'DhariwalUNet',
                          'Linear', 'Conv2d', 'GroupNorm', 'UNetBlock', 'PositionalEmbedding', 'FourierEmbedding'),
    'training.networks.edm2': ('Precond', 'UNet', 'Block', 'MPConv', 'MPFourier'),
    'training.networks.karras': ('KarrasDenoiser',),
    'training.networks.trigflow': ('TrigFlowPrecond',),
    'training.networks.meanflow_unet': ('MeanFlowPrecond', 'MeanFlowUNet'),
}
NETWORK_CLASS_MODULE = {name: module for module, names in NETWORK_MODULES.items() for name in names}
# Where those modules were before training/ had rooms: snapshots written then (and EDM2's own code) name them.
LEGACY_NETWORK_MODULES = {'training.networks_edm2': 'training.networks.edm2',
                          'training.networks_cm': 'training.networks.karras'}
NETWORK_CLASS_NAMES = frozenset(
    [f'{module}.{name}' for name, module in NETWORK_CLASS_MODULE.items()]
    + [f'{old}.{name}' for old, new in LEGACY_NETWORK_MODULES.items() for name in NETWORK_MODULES[new]])

"""LPIPS perceptual distance (Zhang et al. 2018) on VGG16 features, in the two variants the project uses.

- `variant='piq'` — what openai/consistency_models trains with, `piq.LPIPS(replace_pooling=True)` (piq 0.7):
  inputs in [0, 1] normalised with the ImageNet mean/std, VGG16 `features` with every 2x2 max pool replaced
  by a 2x2 average pool.
- `variant='lpips'` — standard LPIPS v0.1 (VGG) of richzhang/PerceptualSimilarity: inputs in [0, 1] mapped to
  [-1, 1] and through its scaling layer ((x − shift)/scale), VGG16 with its max pools.

Both then take the features after relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3, unit-normalise them over
channels (x / (‖x‖ + 1e-10)), square the differences, weight the channels with the learned linear weights,
average over space and sum over layers and channels: one distance per image.

Weights: the VGG16 trunk from torchvision's ImageNet file and the five linear layers from piq's or
PerceptualSimilarity's file, each from a local path or a URL (downloaded once into the cache). Accepted
layouts: torchvision state dicts (`features.{i}.weight`) or bare `{i}.weight`; linear weights as
PerceptualSimilarity's dict (`lin{k}.model.1.weight`), piq's list of five tensors, or a dict `{k: tensor}`.
"""

import torch

import dnnlib
from training.checkpoints import checkpoint

VGG16_URL = 'https://download.pytorch.org/models/vgg16-397923af.pth'
# torchvision names its files by the sha256 prefix; the full hash as published by genforce (models/perceptual_model.py).
VGG16_SHA256 = '397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0'
PIQ_LIN_URL = 'https://github.com/photosynthesis-team/photosynthesis.metrics/releases/download/v0.4.0/lpips_weights.pt'
LPIPS_V01_LIN_URL = 'https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth'
LPIPS_V01_LIN_SHA256 = 'a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868'

VGG16_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)    # conv indices of torchvision's vgg16().features
VGG16_POOLS = (4, 9, 16, 23)                                         # pools before relu5_3 (the 5th, at 30, is unused)
VGG16_TAPS = (3, 8, 15, 22, 29)                                      # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LPIPS_SHIFT = (-0.030, -0.088, -0.188)                               # PerceptualSimilarity's ScalingLayer
LPIPS_SCALE = (0.458, 0.448, 0.450)
FEATURE_EPS = 1e-10
VARIANTS = ('piq', 'lpips')


def _tensor_dict(obj, source):
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise dnnlib.UserError(f'{source}: not a state dict of tensors')
    return obj


def vgg16_conv_weights(state, source='VGG16 weights'):
    """[(weight, bias)] of the 13 convs of VGG16 `features` from a torchvision (or bare) state dict."""
    state = _tensor_dict(state, source)
    convs = []
    for i in VGG16_CONVS:
        pair = [state.get(f'features.{i}.{kind}', state.get(f'{i}.{kind}')) for kind in ('weight', 'bias')]
        if pair[0] is None or pair[1] is None:
            raise dnnlib.UserError(f'{source}: no tensor features.{i}.weight/bias (not a VGG16 state dict)')
        convs.append(tuple(t.detach().float() for t in pair))
    for (w0, _), (w1, _) in zip(convs, convs[1:]):
        if w1.ndim != 4 or w1.shape[1] != w0.shape[0]:
            raise dnnlib.UserError(f'{source}: conv shapes {list(w0.shape)} -> {list(w1.shape)} do not chain')
    return convs


def lpips_linear_weights(obj, source='LPIPS linear weights'):
    """The five per-channel weights [C] of the LPIPS linear layers from any of the accepted layouts."""
    if isinstance(obj, (list, tuple)):
        weights = list(obj)
    elif isinstance(obj, dict):
        keys = [next((k for k in (f'lin{i}.model.1.weight', f'lin{i}.model.0.weight', f'{i}', i) if k in obj), None)
                for i in range(5)]
        if None in keys:
            raise dnnlib.UserError(f'{source}: no linear weight for layer {keys.index(None)} '
                                   f'(expected lin{{k}}.model.1.weight or a list of five tensors)')
        weights = [obj[k] for k in keys]
    else:
        raise dnnlib.UserError(f'{source}: expected a list of five tensors or a state dict, got {type(obj).__name__}')
    if len(weights) != 5 or not all(isinstance(w, torch.Tensor) for w in weights):
        raise dnnlib.UserError(f'{source}: expected five tensors, got {len(weights)} entries')
    return [w.detach().float().flatten() for w in weights]


def load_weights_file(url_or_path, what, cache_dir=None, sha256=None):
    """torch.load(weights_only=True) of a local file or a URL (cached); one UserError when it is absent."""
    try:
        path = dnnlib.util.open_url(url_or_path, cache_dir=cache_dir, sha256=sha256, return_filename=True)
    except dnnlib.UserError as e:
        raise dnnlib.UserError(f'LPIPS: the {what} are not available ({e}); pass a local copy '
                               f'(--lpips-vgg / --lpips-lin)') from None
    return checkpoint.read_weights_only(path, url_or_path, what)


class LPIPS(torch.nn.Module):
    """LPIPS distance, Zhang et al. 2018 eq. 1: d(x, y) = Σ_l mean_hw Σ_c w_lc (x̂_lc − ŷ_lc)², x, y in [0, 1]."""

    def __init__(self,
        convs,              # [(weight, bias)] of the 13 VGG16 convs (vgg16_conv_weights)
        linear,             # five per-channel weights [C_l] (lpips_linear_weights)
        variant = 'piq',    # 'piq' (average pools, ImageNet normalisation) or 'lpips' (v0.1: max pools, scaling layer)
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise dnnlib.UserError(f'LPIPS: variant must be one of {VARIANTS}, got {variant!r}')
        self.variant = variant
        for i, (weight, bias) in zip(VGG16_CONVS, convs):
            self.register_buffer(f'conv{i}_weight', weight.clone())
            self.register_buffer(f'conv{i}_bias', bias.clone())
        taps = [convs[VGG16_CONVS.index(t - 1)][0].shape[0] for t in VGG16_TAPS]
        for k, (w, channels) in enumerate(zip(linear, taps)):
            if w.numel() != channels:
                raise dnnlib.UserError(f'LPIPS: linear layer {k} has {w.numel()} weights, the VGG16 layer has '
                                       f'{channels} channels')
            self.register_buffer(f'lin{k}', w.reshape(1, -1, 1, 1).clone())
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if variant == 'piq' else (LPIPS_SHIFT, LPIPS_SCALE)
        self.register_buffer('mean', torch.tensor(mean).reshape(1, 3, 1, 1))
        self.register_buffer('std', torch.tensor(std).reshape(1, 3, 1, 1))

    def _normalise_input(self, x):
        if self.variant == 'lpips':
            x = 2 * x - 1     # v0.1 works on [-1, 1]
        return (x - self.mean) / self.std

    def features(self, x):
        """Unit-normalised features at the five taps for images x in [0, 1]."""
        x = self._normalise_input(x)
        pool = torch.nn.functional.avg_pool2d if self.variant == 'piq' else torch.nn.functional.max_pool2d
        out = []
        for i in range(VGG16_TAPS[-1] + 1):
            if i in VGG16_CONVS:
                x = torch.nn.functional.conv2d(x, getattr(self, f'conv{i}_weight'), getattr(self, f'conv{i}_bias'),
                                               padding=1)
            elif i in VGG16_POOLS:
                x = pool(x, kernel_size=2, stride=2)
            else:
                x = torch.relu(x)
            if i in VGG16_TAPS:
                out.append(x / (x.square().sum(dim=1, keepdim=True).sqrt() + FEATURE_EPS))
        return out

    def forward(self, x, y):
        """Per-image distances [N] between x and y (N, 3, H, W), both in [0, 1]."""
        total = 0
        for k, (fx, fy) in enumerate(zip(self.features(x), self.features(y))):
            total = total + ((fx - fy).square() * getattr(self, f'lin{k}')).mean(dim=(2, 3)).sum(dim=1)
        return total


def load_lpips(variant='piq', vgg=None, lin=None, cache_dir=None):
    """An LPIPS module (eval mode, no trainable parameters) with weights from files or URLs (None = the defaults)."""
    if variant not in VARIANTS:
        raise dnnlib.UserError(f'--lpips-variant: must be one of {VARIANTS}, got {variant!r}')
    vgg, vgg_sha = (VGG16_URL, VGG16_SHA256) if vgg is None else (vgg, None)
    default_lin, sha = (PIQ_LIN_URL, None) if variant == 'piq' else (LPIPS_V01_LIN_URL, LPIPS_V01_LIN_SHA256)
    lin, sha = (default_lin, sha) if lin is None else (lin, None)
    convs = vgg16_conv_weights(load_weights_file(vgg, 'VGG16 weights', cache_dir, vgg_sha), str(vgg))
    linear = lpips_linear_weights(load_weights_file(lin, 'LPIPS linear weights', cache_dir, sha), str(lin))
    return LPIPS(convs, linear, variant).eval()

"""Feature detectors for the metrics: Inception-v3 (FID, KID, IS), VGG16 (precision/recall), DINOv2 (FD_DINOv2),
and a fixed seeded random convolutional network (fd_randnet: needs no download).

Every detector is called as `detector(images)` with uint8 images N,C,H,W (3 channels) and returns float32
features N,D. The official Inception and VGG16 files are NVIDIA's persistence pickles of pure-Python networks;
they (and their TorchScript twins) are read without running any code (metrics.detector_files) and their tensors
loaded into this project's own graphs (metrics.detector_nets). Running a TorchScript file's code, or a pickle's,
needs the user's opt-in
(`allow_unsafe_pickle`, `--allow-unsafe-pickle`) for a file they trust.
"""

import math

import numpy as np
import torch

import dnnlib
from metrics import detector_files, detector_nets

INCEPTION_URL = 'https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/inception-2015-12-05.pkl'
VGG16_URL = 'https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/vgg16.pkl'
DINOV2_URL = 'https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth'

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_CALL_KWARGS = dict(inception=dict(return_features=True), inception_probs=dict(no_output_bias=True),
                    vgg16=dict(return_features=True))


def load_detector_net(kind, url_or_path, allow_unsafe_pickle=False, cache_dir=None):
    """The network of detector `kind` ('inception', 'inception_probs', 'vgg16') stored at `url_or_path`: our own
    graph with the file's tensors (NVIDIA pickle or state dict), or, with the opt-in, the file's own network
    (TorchScript, or a pickle rebuilt by running its code) called with the official keyword arguments."""
    data = detector_files.read_bytes(url_or_path, cache_dir)
    net_kind = 'vgg16' if kind == 'vgg16' else 'inception'
    if detector_files.is_torchscript(data) and allow_unsafe_pickle:
        return detector_files.load_torchscript(data, url_or_path, allow_unsafe_pickle), _CALL_KWARGS[kind]
    if allow_unsafe_pickle and data[:1] and data[0] == detector_files.PICKLE_PROTO:
        return detector_files.load_unsafe_pickle(data, url_or_path), _CALL_KWARGS[kind]
    if not detector_files.is_torchscript(data):
        return detector_nets.build_detector_net(net_kind, detector_files.read_detector_tensors(data, url_or_path),
                                                url_or_path), None
    tensors = detector_files.torchscript_tensors(data, url_or_path)  # NVIDIA's TorchScript twins (.pt), as data
    try:
        return detector_nets.build_detector_net(net_kind, tensors, url_or_path), None
    except dnnlib.UserError as e:
        raise dnnlib.UserError(f'{e} (a TorchScript file is read for its tensors only; its code is not run)') from None


# ----------------------------------------------------------------------------------------------------------
# Detector wrappers: uint8 N,C,H,W in, float32 features out.


def _as_rgb(images):
    if images.ndim != 4 or images.dtype != torch.uint8:
        raise ValueError(f'detector input must be uint8 N,C,H,W, got {images.dtype} {list(images.shape)}')
    return images.repeat([1, 3, 1, 1]) if images.shape[1] == 1 else images


class ModuleDetector:
    """A detector network: this project's graph (its `features` or `class_probs`), or, with the user's opt-in, a
    file's own network called as `module(images_uint8, **call_kwargs)` (the official convention)."""

    def __init__(self, module, name, call_kwargs=None, probs=False):
        self.module = module                                       # detector network
        self.name = name                                           # label used in records and error messages
        self.call_kwargs = call_kwargs                             # e.g. dict(return_features=True); None = our graph
        self.probs = probs                                         # our graph: class probabilities, not features

    def to(self, device):
        self.module = self.module.to(device)
        return self

    @torch.no_grad()
    def __call__(self, images):
        images = _as_rgb(images)
        if self.call_kwargs is not None:
            return self.module(images, **self.call_kwargs).to(torch.float32)
        return (self.module.class_probs(images) if self.probs else self.module.features(images)).to(torch.float32)


class DINOv2Detector:
    """DINOv2 CLS features, EDM2's protocol: bicubic resize to 224, ImageNet mean/std, ViT-L/14 CLS token."""

    def __init__(self, model, name='dinov2_vitl14', resolution=224):
        self.model = model                                         # maps normalised float images to CLS features
        self.name = name                                           # label used in records
        self.resolution = resolution                               # square input size of the ViT

    def to(self, device):
        self.model = self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, images):
        x = _as_rgb(images).to(torch.float32)
        x = torch.nn.functional.interpolate(x, size=(self.resolution, self.resolution), mode='bicubic',
                                            antialias=True)
        x = x / 255
        mean = torch.tensor(_IMAGENET_MEAN, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
        std = torch.tensor(_IMAGENET_STD, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
        return self.model((x - mean) / std).to(torch.float32)


# ----------------------------------------------------------------------------------------------------------
# A small ViT-L/14 that reads the official DINOv2 state_dict (tensor names as facebookresearch/dinov2).


class _Attention(torch.nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads                                 # attention heads
        self.qkv = torch.nn.Linear(dim, dim * 3)                   # joint query/key/value projection
        self.proj = torch.nn.Linear(dim, dim)                      # output projection

    # Multi-head self-attention (Vaswani et al. 2017, Eq. 1): softmax(q kᵀ / √d) v per head.
    def forward(self, x):
        n, t, c = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(n, t, c))


class _LayerScale(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = torch.nn.Parameter(torch.ones(dim))           # per-channel residual scale

    def forward(self, x):
        return x * self.gamma


class _Mlp(torch.nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = torch.nn.Linear(dim, hidden_dim)                # expansion
        self.fc2 = torch.nn.Linear(hidden_dim, dim)                # projection back

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class _SwiGLU(torch.nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.w12 = torch.nn.Linear(dim, 2 * hidden_dim)            # gate and value projections, fused
        self.w3 = torch.nn.Linear(hidden_dim, dim)                 # projection back

    # SwiGLU feed-forward (Shazeer 2020, Eq. 6), as DINOv2's ViT-g uses it: w3(silu(x W) * (x V)).
    def forward(self, x):
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(torch.nn.functional.silu(gate) * value)


def _swiglu_hidden(dim, mlp_ratio):
    """DINOv2's fused SwiGLU width: 2/3 of the MLP width, rounded up to a multiple of 8."""
    return (int(dim * mlp_ratio * 2 / 3) + 7) // 8 * 8


class _Block(torch.nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, swiglu=False):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(dim, eps=1e-6)             # pre-attention norm
        self.attn = _Attention(dim, num_heads)                     # self-attention
        self.ls1 = _LayerScale(dim)                                # attention branch scale
        self.norm2 = torch.nn.LayerNorm(dim, eps=1e-6)             # pre-MLP norm
        self.mlp = _SwiGLU(dim, _swiglu_hidden(dim, mlp_ratio)) if swiglu else _Mlp(dim, int(dim * mlp_ratio))  # FFN
        self.ls2 = _LayerScale(dim)                                # MLP branch scale

    # Pre-norm transformer block with LayerScale (DINOv2, Oquab et al. 2023, Sec. 4; CaiT, Touvron et al. 2021).
    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoViT(torch.nn.Module):
    """DINOv2 ViT backbone returning the normalised CLS token (ViT-L/14: dim 1024, depth 24, 16 heads of 64 channels;
    ViT-g/14 uses a SwiGLU feed-forward: `swiglu`)."""

    def __init__(self, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0, patch_size=14, pretrain_size=518,
                 interpolate_offset=0.1, swiglu=False):
        super().__init__()
        self.patch_size = patch_size                               # pixels per patch side
        self.interpolate_offset = interpolate_offset               # DINOv2's offset in the pos-embed rescale
        num_patches = (pretrain_size // patch_size) ** 2
        self.patch_embed = torch.nn.Module()
        self.patch_embed.proj = torch.nn.Conv2d(3, embed_dim, patch_size, stride=patch_size)  # patchify
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, embed_dim))                    # class token
        self.pos_embed = torch.nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))      # 37×37 grid + cls
        self.blocks = torch.nn.ModuleList([_Block(embed_dim, num_heads, mlp_ratio, swiglu) for _ in range(depth)])
        self.norm = torch.nn.LayerNorm(embed_dim, eps=1e-6)                                  # final norm

    # Position embeddings resized to the input grid as DINOv2 does (Oquab et al. 2023, code of
    # interpolate_pos_encoding): bicubic with scale factor (grid + offset) / pretrain grid.
    def interpolate_pos_embed(self, grid_h, grid_w):
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        m = int(math.sqrt(patch_pos.shape[1]))
        if (grid_h, grid_w) == (m, m):
            return self.pos_embed
        patch_pos = patch_pos.reshape(1, m, m, -1).permute(0, 3, 1, 2).to(torch.float32)
        scale = ((grid_h + self.interpolate_offset) / m, (grid_w + self.interpolate_offset) / m)
        patch_pos = torch.nn.functional.interpolate(patch_pos, scale_factor=scale, mode='bicubic')
        if patch_pos.shape[-2:] != (grid_h, grid_w):
            raise ValueError(f'pos-embed interpolation gave {list(patch_pos.shape[-2:])}, expected {[grid_h, grid_w]}')
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1).to(self.pos_embed.dtype)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def forward(self, x):
        grid_h, grid_w = x.shape[2] // self.patch_size, x.shape[3] // self.patch_size
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.interpolate_pos_embed(grid_h, grid_w)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]


def load_dinov2_model(url_or_path, allow_unsafe_pickle=False, cache_dir=None, **vit_kwargs):
    """DINOv2 from an official state_dict (`.pth`, read with weights_only=True), or, with the opt-in for a trusted
    file, a TorchScript file that maps ImageNet-normalised float images N,3,224,224 to CLS features N,D.
    `vit_kwargs` override what the state dict implies (e.g. num_heads, by default 64 channels per head)."""
    data = detector_files.read_bytes(url_or_path, cache_dir)
    if detector_files.is_torchscript(data):
        return detector_files.load_torchscript(data, url_or_path, allow_unsafe_pickle)
    state = detector_files.read_detector_tensors(data, url_or_path) if data[:4] == detector_files.ZIP_MAGIC else None
    if not isinstance(state, dict) or 'pos_embed' not in state:
        raise dnnlib.UserError(f'{url_or_path}: not a DINOv2 state_dict (no "pos_embed" tensor)')
    return _build_vit(state, url_or_path, **vit_kwargs)


def _num_heads(embed_dim, num_heads, source):
    """The given head count, else DINOv2's: 64 channels per head in every size (S/B/L/g: 6/12/16/24 heads,
    facebookresearch/dinov2 models/vision_transformer.py); the width must split evenly into the heads."""
    if num_heads is None:
        if embed_dim % 64:
            raise dnnlib.UserError(f'{source}: DINOv2 width {embed_dim} is not a multiple of 64 (the head width)')
        return embed_dim // 64
    if not isinstance(num_heads, int) or num_heads < 1 or embed_dim % num_heads:
        raise dnnlib.UserError(f'{source}: DINOv2 width {embed_dim} is not divisible by num_heads={num_heads!r}')
    return num_heads


def _build_vit(state, source, num_heads=None, **vit_kwargs):
    """DinoViT shaped by the state dict (SwiGLU in ViT-g), with `num_heads` heads (default: 64 channels each)."""
    embed_dim = state['pos_embed'].shape[-1]
    depth = len({k.split('.')[1] for k in state if k.startswith('blocks.')})
    patch_size = state['patch_embed.proj.weight'].shape[-1]
    pretrain_size = int(math.sqrt(state['pos_embed'].shape[1] - 1)) * patch_size
    kwargs = dict(embed_dim=embed_dim, depth=depth, num_heads=_num_heads(embed_dim, num_heads, source),
                  patch_size=patch_size, pretrain_size=pretrain_size, swiglu='blocks.0.mlp.w12.weight' in state)
    kwargs.update(vit_kwargs)
    model = DinoViT(**kwargs)
    state = {name: value for name, value in state.items() if name != 'mask_token'}  # Used only in pretraining.
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise dnnlib.UserError(f'{source}: DINOv2 state_dict does not match ViT layout '
                               f'(missing {missing[:3]}, unexpected {unexpected[:3]})')
    return model.eval()


class RandomConvDetector:
    """Features of a fixed random convolutional network, identical on every machine (no download, no training).

    Random-feature Frechet distance (a stand-in for FID when no pretrained detector is available, cf. Naeem et
    al. 2020 "Reliable fidelity and diversity metrics", random-embedding evaluation): images in [-1, 1] pass
    through 3x3 convolutions of widths `widths`, each followed by leaky ReLU (0.2) and 2x2 average pooling;
    the features are the spatial means of every layer's activations (sum(widths) of them).
    The weights are He-normal draws (float64) from a CPU torch.Generator seeded with `seed`; the network runs in
    float32, so features agree across machines up to float32 rounding.
    """

    def __init__(self,
                 seed=0,                 # seed of the weights: part of the metric's definition
                 widths=(32, 64, 128),   # output channels of the convolutions
                 ):
        self.name = f'randnet-seed{seed}-' + 'x'.join(str(w) for w in widths)
        generator = torch.Generator(device='cpu').manual_seed(seed)
        self.weights = []
        in_channels = 3
        for width in widths:
            fan_in = in_channels * 9
            self.weights.append((torch.randn([width, in_channels, 3, 3], generator=generator, dtype=torch.float64)
                                 * np.sqrt(2 / fan_in)).to(torch.float32))
            in_channels = width

    def to(self, device):
        self.weights = [w.to(device) for w in self.weights]
        return self

    @torch.no_grad()
    def __call__(self, images):
        x = _as_rgb(images).to(self.weights[0].device, torch.float32) / 127.5 - 1
        features = []
        for weight in self.weights:
            x = torch.nn.functional.leaky_relu(torch.nn.functional.conv2d(x, weight, padding=1), 0.2)
            features.append(x.mean(dim=[2, 3]))
            x = torch.nn.functional.avg_pool2d(x, 2) if min(x.shape[2:]) >= 2 else x
        return torch.cat(features, dim=1).to(torch.float32)


# ----------------------------------------------------------------------------------------------------------
# Named detectors.


# The feature networks a Frechet distance can be taken in (fid.py and schedule_search.py --kind); 'randnet' is the
# quickstart's download-free fd_randnet (its numbers are not FID and compare only with each other).
FEATURE_KINDS = ('inception', 'dinov2', 'vgg16', 'randnet')


def get_detector(kind, url_or_path=None, allow_unsafe_pickle=False, cache_dir=None, device='cpu'):
    """Detector for `kind` ('inception', 'inception_probs', 'vgg16', 'dinov2', 'randnet') from a URL/path or the
    default; 'randnet' takes no file (`url_or_path` is refused)."""
    if kind == 'randnet':
        if url_or_path is not None:
            raise dnnlib.UserError(f'--detector={url_or_path}: the random-network metrics build their detector from a '
                                   f'fixed seed and take no file')
        return RandomConvDetector().to(device)
    if kind == 'dinov2':
        model = load_dinov2_model(url_or_path or DINOV2_URL, allow_unsafe_pickle, cache_dir)
        return DINOv2Detector(model).to(device)
    if kind not in _CALL_KWARGS:
        known = sorted(_CALL_KWARGS) + ['dinov2', 'randnet']
        raise dnnlib.UserError(f'unknown detector kind "{kind}" (expected one of {known})')
    url_or_path = url_or_path or (VGG16_URL if kind == 'vgg16' else INCEPTION_URL)
    net, call_kwargs = load_detector_net(kind, url_or_path, allow_unsafe_pickle, cache_dir)
    return ModuleDetector(net, name=f'{kind}:{url_or_path}', call_kwargs=call_kwargs,
                          probs=kind == 'inception_probs').to(device)


def feature_dim(detector, image_shape, device='cpu'):
    """The feature width of `detector` on images of shape C,H,W (one probe image)."""
    probe = torch.zeros([1, *image_shape], dtype=torch.uint8, device=device)
    return int(np.prod(detector(probe).shape[1:]))

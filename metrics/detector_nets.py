"""This project's own graphs of NVIDIA's metric detectors, built from the tensors of the published files.

Inception-v3, FID variant (`inception-2015-12-05.pkl` of StyleGAN3/EDM/EDM2, a PyTorch translation of
http://download.tensorflow.org/models/image/imagenet/inception-2015-12-05.tgz). Its layout, established from the
code that reads the file (NVlabs/stylegan3 metrics/frechet_inception_distance.py and inception_score.py, NVlabs/edm2
calculate_metrics.py: `pickle.load(f)` then `model(images_uint8, return_features=True)` or
`no_output_bias=True`) and from published ports of the network class the pickle embeds (NVIDIA's InceptionV3
module, e.g. in autonomousvision/stylegan-xl): a torch_utils.persistence record of class `InceptionV3` whose
`layers` (torch.nn.Sequential) holds `conv, conv_1, conv_2, pool0, conv_3, conv_4, pool1, mixed, mixed_1 ..
mixed_10, pool2` and whose `output` is a torch.nn.Linear(2048, 1008). Every convolution is a `Conv2dLayer`
record with tensors `weight` (no bias), `beta`, `mean`, `var`: conv, batch norm (eps 1e-3, no scale), ReLU.
Images are resized to 299x299 as TF's resize_bilinear does (affine grid shifted by half a source pixel minus half
a target pixel, bilinear, border) and scaled by (x - 128) / 128; the features are the 2048 pooled activations,
the Inception Score uses softmax(features @ output.weight.T) (no bias).

VGG16 (`vgg16.pkl`, precision/recall). Tensor names are those of its TorchScript twin (`vgg16.pt` of
stylegan2-ada-pytorch, as read by published ports, e.g. genforce's perceptual model): `layers.conv1` ..
`layers.conv13` (3x3, bias), `layers.fc1` .. `layers.fc3`, `lpips0` .. `lpips4` (LPIPS weights, unused here).
Images are resized to 224x224 the same TF-aligned way, scaled to [0, 1] and normalised with the ImageNet
mean/std; the features are fc2's 4096 activations after ReLU. The exact preprocessing of NVIDIA's VGG16 was
taken from those ports, not from NVIDIA's source (see docs/EVALUATION.md, "Feature detectors").

Widths are read from the tensors, so the same graph runs stand-ins with tiny widths in tests; kernel sizes,
strides and paddings are fixed by the graph and checked against the tensors.
"""

import torch

import dnnlib

# Inception-v3 topology. A branch is a list of ops: a convolution by its dotted name ('/2' = stride 2; stride-1
# convolutions in blocks pad to keep the size) or a pooling op. Branch outputs are concatenated on channels.
_AVG3, _MAX3, _MAX3S2 = 'avg3', 'max3', 'max3s2'
_BLOCKS = dict(
    A=[['conv'], ['tower.conv', 'tower.conv_1'], ['tower_1.conv', 'tower_1.conv_1', 'tower_1.conv_2'],
       [_AVG3, 'tower_2.conv']],
    B=[['conv/2'], ['tower.conv', 'tower.conv_1', 'tower.conv_2/2'], [_MAX3S2]],
    C=[['conv'], ['tower.conv', 'tower.conv_1', 'tower.conv_2'],
       ['tower_1.conv', 'tower_1.conv_1', 'tower_1.conv_2', 'tower_1.conv_3', 'tower_1.conv_4'], [_AVG3, 'tower_2.conv']],
    D=[['tower.conv', 'tower.conv_1/2'], ['tower_1.conv', 'tower_1.conv_1', 'tower_1.conv_2', 'tower_1.conv_3/2'],
       [_MAX3S2]],
    E=[['conv'], ['tower_conv', 'tower_mixed_conv'], ['tower_conv', 'tower_mixed_conv_1'],
       ['tower_1_conv', 'tower_1_conv_1', 'tower_1_mixed_conv'], ['tower_1_conv', 'tower_1_conv_1', 'tower_1_mixed_conv_1'],
       [_AVG3, 'tower_2_conv']],
)
_INCEPTION_LAYERS = [('conv', 'stem', 2, 0), ('conv_1', 'stem', 1, 0), ('conv_2', 'stem', 1, 1), ('pool0', _MAX3S2),
                     ('conv_3', 'stem', 1, 0), ('conv_4', 'stem', 1, 0), ('pool1', _MAX3S2),
                     ('mixed', 'A'), ('mixed_1', 'A'), ('mixed_2', 'A'), ('mixed_3', 'B'), ('mixed_4', 'C'),
                     ('mixed_5', 'C'), ('mixed_6', 'C'), ('mixed_7', 'C'), ('mixed_8', 'D'), ('mixed_9', 'E'),
                     ('mixed_10', 'E_max')]
INCEPTION_RESOLUTION = 299
VGG16_RESOLUTION = 224
_VGG16_POOL_AFTER = (2, 4, 7, 10, 13)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _pool(x, op):
    if op == _AVG3:
        return torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    if op == _MAX3:
        return torch.nn.functional.max_pool2d(x, 3, stride=1, padding=1)
    return torch.nn.functional.max_pool2d(x, 3, stride=2)


# TF's resize_bilinear without corner alignment (as NVIDIA's translation emulates it): sample points are shifted
# by half a source pixel minus half a target pixel relative to torch's align_corners=False grid.
def tf_resize_bilinear(x, size):
    n, c, height, width = x.shape
    theta = torch.zeros([2, 3], dtype=x.dtype, device=x.device)
    theta[0, 0] = theta[1, 1] = 1
    theta[0, 2] = 1 / width - 1 / size
    theta[1, 2] = 1 / height - 1 / size
    grid = torch.nn.functional.affine_grid(theta.expand(n, 2, 3), [n, c, size, size], align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode='bilinear', padding_mode='border', align_corners=False)


class ConvBN(torch.nn.Module):
    """NVIDIA's Conv2dLayer: convolution without bias, batch norm with fixed statistics and no scale, ReLU."""

    def __init__(self, shape, stride=1, padding=0):
        super().__init__()
        self.stride = stride                                          # convolution stride
        self.padding = padding                                        # int or (pad_h, pad_w)
        self.weight = torch.nn.Parameter(torch.zeros(shape))          # out, in, kh, kw
        self.beta = torch.nn.Parameter(torch.zeros(shape[0]))         # batch-norm offset
        self.mean = torch.nn.Parameter(torch.zeros(shape[0]))         # batch-norm mean
        self.var = torch.nn.Parameter(torch.ones(shape[0]))           # batch-norm variance

    # Batch normalisation in inference form (Ioffe & Szegedy 2015, Alg. 2): (x - mean) / sqrt(var + eps) + beta.
    def forward(self, x):
        x = torch.nn.functional.conv2d(x, self.weight, stride=self.stride, padding=self.padding)
        x = torch.nn.functional.batch_norm(x, self.mean, self.var, bias=self.beta, eps=1e-3)
        return torch.nn.functional.relu(x)


def _attach(root, dotted, module):
    """Register `module` under the dotted path `dotted` of `root`, creating empty parents as needed."""
    *parents, leaf = dotted.split('.')
    for part in parents:
        if not hasattr(root, part):
            root.add_module(part, torch.nn.Module())
        root = getattr(root, part)
    root.add_module(leaf, module)


def _shape(shapes, name, ndim=4):
    """The shape of tensor `name`, which must exist with `ndim` dimensions (4: convolution, 2: linear weight)."""
    if name not in shapes or len(shapes[name]) != ndim:
        raise dnnlib.UserError(f'missing or malformed tensor "{name}" (expected a {ndim}-d weight)')
    return list(shapes[name])


class InceptionV3(torch.nn.Module):
    """Inception-v3 of the FID detector; `shapes` maps tensor names ('layers.conv.weight', ...) to their shapes."""

    def __init__(self, shapes):
        super().__init__()
        shapes = {name: list(shape) for name, shape in shapes.items()}  # tensor name -> shape
        self.branches = {}
        for name, kind, *conv_args in _INCEPTION_LAYERS:
            if kind == 'stem':
                _attach(self, f'layers.{name}', ConvBN(_shape(shapes, f'layers.{name}.weight'), *conv_args))
            elif kind in _BLOCKS or kind == 'E_max':
                self.branches[name] = self._block(shapes, name, kind)
        self.output = torch.nn.Linear(*reversed(_shape(shapes, 'output.weight', 2)))  # logits of 1008 classes

    def _block(self, shapes, name, kind):
        branches = [list(b) for b in _BLOCKS['E' if kind == 'E_max' else kind]]
        if kind == 'E_max':
            branches[-1][0] = _MAX3
        for branch in branches:
            for op in branch:
                if op in (_AVG3, _MAX3, _MAX3S2):
                    continue
                conv, stride = op.split('/')[0], 2 if op.endswith('/2') else 1
                path = f'layers.{name}.{conv}'
                shape = _shape(shapes, f'{path}.weight')
                padding = (0, 0) if stride == 2 else (shape[2] // 2, shape[3] // 2)
                if _get(self, path) is None:
                    _attach(self, path, ConvBN(shape, stride, padding))
        return branches

    def _run_block(self, x, name):
        cache, outputs = {}, []
        for branch in self.branches[name]:
            y, key = x, ()
            for op in branch:
                key = key + (op,)
                if key not in cache:
                    cache[key] = _pool(y, op) if op in (_AVG3, _MAX3, _MAX3S2) else \
                        _get(self, f'layers.{name}.{op.split("/")[0]}')(y)
                y = cache[key]
            outputs.append(y)
        return torch.cat(outputs, dim=1)

    def features(self, images):
        """The pooled activations (2048 for the real network) of uint8 or [0, 255] float images N,3,H,W."""
        x = tf_resize_bilinear(images.to(torch.float32), INCEPTION_RESOLUTION)
        x = (x - 128) / 128
        for name, kind, *_ in _INCEPTION_LAYERS:
            if kind == 'stem':
                x = _get(self, f'layers.{name}')(x)
            elif kind == _MAX3S2:
                x = _pool(x, kind)
            else:
                x = self._run_block(x, name)
        return torch.nn.functional.avg_pool2d(x, 8).flatten(1)

    def class_probs(self, images):
        """Softmax over the 1008 logits without the output bias (StyleGAN3's Inception Score convention)."""
        logits = torch.nn.functional.linear(self.features(images), self.output.weight)
        return torch.softmax(logits, dim=1)


def _get(root, dotted, default=None):
    """The submodule at dotted path `dotted` of `root`, or `default` when there is none."""
    for part in dotted.split('.'):
        root = getattr(root, part, None)
        if root is None:
            return default
    return root


class VGG16(torch.nn.Module):
    """VGG16 of the precision/recall detector; `shapes` maps tensor names ('layers.conv1.weight', ...) to shapes."""

    def __init__(self, shapes):
        super().__init__()
        shapes = {name: list(shape) for name, shape in shapes.items()}  # tensor name -> shape
        self.layers = torch.nn.Module()
        for i in range(1, 14):
            out_channels, in_channels, kh, kw = _shape(shapes, f'layers.conv{i}.weight')
            self.layers.add_module(f'conv{i}', torch.nn.Conv2d(in_channels, out_channels, (kh, kw), padding=(kh // 2, kw // 2)))
        for i in range(1, 4):
            out_features, in_features = _shape(shapes, f'layers.fc{i}.weight', 2)
            self.layers.add_module(f'fc{i}', torch.nn.Linear(in_features, out_features))

    # Simonyan & Zisserman 2015, Table 1 (configuration D): 13 3x3 convolutions with ReLU, five 2x2 max-pools,
    # then fully connected layers; the features are fc2's activations (Kynkaanniemi et al. 2019, Sec. 3).
    def features(self, images):
        x = tf_resize_bilinear(images.to(torch.float32), VGG16_RESOLUTION) / 255
        mean = torch.tensor(_IMAGENET_MEAN, device=x.device).reshape(1, -1, 1, 1)
        std = torch.tensor(_IMAGENET_STD, device=x.device).reshape(1, -1, 1, 1)
        x = (x - mean) / std
        for i in range(1, 14):
            x = torch.relu(getattr(self.layers, f'conv{i}')(x))
            if i in _VGG16_POOL_AFTER:
                x = torch.nn.functional.max_pool2d(x, 2)
        x = torch.relu(self.layers.fc1(x.flatten(1)))
        return torch.relu(self.layers.fc2(x))


def build_detector_net(kind, tensors, source):
    """InceptionV3 ('inception') or VGG16 ('vgg16') with `tensors` loaded under a strict name and shape check."""
    from training.checkpoints import safe_pickle
    cls = dict(inception=InceptionV3, vgg16=VGG16)[kind]
    tensors = {k: v for k, v in tensors.items() if not (kind == 'vgg16' and k.startswith('lpips'))}
    try:
        net = cls({name: value.shape for name, value in tensors.items()})
    except dnnlib.UserError as e:
        raise dnnlib.UserError(f'{source}: not an NVIDIA {cls.__name__} detector: {e}') from None
    safe_pickle.load_state_strict(net, tensors, source)
    return net.eval().requires_grad_(False)

"""Stand-ins for NVIDIA's detector pickles, built the way the originals are built, and independent references.

NVIDIA's `inception-2015-12-05.pkl` is `pickle.dump` of a network whose classes carry
`@torch_utils.persistence.persistent_class` (StyleGAN3's persistence: each such object pickles as
`_reconstruct_persistent_obj({type: 'class', version: 6, module_src, class_name, state})`), with standard
torch.nn containers, pools and Linear layers pickled by reference (NVlabs/stylegan3 torch_utils/persistence.py;
the readers are stylegan3 metrics/metric_utils.py get_feature_detector and edm2 calculate_metrics.py). The
classes below mirror the record layout and tensor names of the network class the pickle embeds (InceptionV3 with
`layers` = Sequential(conv, conv_1, ..., mixed_10, pool2) and `output` = Linear; Conv2dLayer with
weight/beta/mean/var) with every width divided by `div`, so files stay tiny. Their forward passes, run in float64
with a separately written TF-style resize, are the independent reference the tests compare against.
"""

import collections
import pickle

import numpy as np
import torch

from torch_utils import persistence


def _w(channels, div):
    return max(1, channels // div)


@persistence.persistent_class
class Conv2dLayer(torch.nn.Module):
    def __init__(self, in_channels, out_channels, kh, kw, stride=1, padding=0):
        super().__init__()
        self.stride, self.padding = stride, padding
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, kh, kw) / np.sqrt(in_channels * kh * kw))
        self.beta = torch.nn.Parameter(torch.randn(out_channels) * 0.1)
        self.mean = torch.nn.Parameter(torch.randn(out_channels) * 0.1)
        self.var = torch.nn.Parameter(torch.rand(out_channels) + 0.5)

    def forward(self, x):
        x = torch.nn.functional.conv2d(x, self.weight.to(x.dtype), stride=self.stride, padding=self.padding)
        x = torch.nn.functional.batch_norm(x, self.mean.to(x.dtype), self.var.to(x.dtype), bias=self.beta.to(x.dtype),
                                           eps=1e-3)
        return torch.relu(x)


def _seq(**layers):
    return torch.nn.Sequential(collections.OrderedDict(layers))


def _avg3():
    return torch.nn.AvgPool2d(kernel_size=3, stride=1, padding=1, count_include_pad=False)


@persistence.persistent_class
class InceptionA(torch.nn.Module):
    def __init__(self, cin, tmp, div):
        super().__init__()
        self.conv = Conv2dLayer(cin, _w(64, div), 1, 1)
        self.tower = _seq(conv=Conv2dLayer(cin, _w(48, div), 1, 1), conv_1=Conv2dLayer(_w(48, div), _w(64, div), 5, 5, padding=2))
        self.tower_1 = _seq(conv=Conv2dLayer(cin, _w(64, div), 1, 1),
                            conv_1=Conv2dLayer(_w(64, div), _w(96, div), 3, 3, padding=1),
                            conv_2=Conv2dLayer(_w(96, div), _w(96, div), 3, 3, padding=1))
        self.tower_2 = _seq(pool=_avg3(), conv=Conv2dLayer(cin, tmp, 1, 1))

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], dim=1)


@persistence.persistent_class
class InceptionB(torch.nn.Module):
    def __init__(self, cin, div):
        super().__init__()
        self.conv = Conv2dLayer(cin, _w(384, div), 3, 3, stride=2)
        self.tower = _seq(conv=Conv2dLayer(cin, _w(64, div), 1, 1), conv_1=Conv2dLayer(_w(64, div), _w(96, div), 3, 3, padding=1),
                          conv_2=Conv2dLayer(_w(96, div), _w(96, div), 3, 3, stride=2))
        self.pool = torch.nn.MaxPool2d(kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.pool(x)], dim=1)


@persistence.persistent_class
class InceptionC(torch.nn.Module):
    def __init__(self, cin, tmp, div):
        super().__init__()
        c192 = _w(192, div)
        self.conv = Conv2dLayer(cin, c192, 1, 1)
        self.tower = _seq(conv=Conv2dLayer(cin, tmp, 1, 1), conv_1=Conv2dLayer(tmp, tmp, 1, 7, padding=[0, 3]),
                          conv_2=Conv2dLayer(tmp, c192, 7, 1, padding=[3, 0]))
        self.tower_1 = _seq(conv=Conv2dLayer(cin, tmp, 1, 1), conv_1=Conv2dLayer(tmp, tmp, 7, 1, padding=[3, 0]),
                            conv_2=Conv2dLayer(tmp, tmp, 1, 7, padding=[0, 3]), conv_3=Conv2dLayer(tmp, tmp, 7, 1, padding=[3, 0]),
                            conv_4=Conv2dLayer(tmp, c192, 1, 7, padding=[0, 3]))
        self.tower_2 = _seq(pool=_avg3(), conv=Conv2dLayer(cin, c192, 1, 1))

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], dim=1)


@persistence.persistent_class
class InceptionD(torch.nn.Module):
    def __init__(self, cin, div):
        super().__init__()
        c192 = _w(192, div)
        self.tower = _seq(conv=Conv2dLayer(cin, c192, 1, 1), conv_1=Conv2dLayer(c192, _w(320, div), 3, 3, stride=2))
        self.tower_1 = _seq(conv=Conv2dLayer(cin, c192, 1, 1), conv_1=Conv2dLayer(c192, c192, 1, 7, padding=[0, 3]),
                            conv_2=Conv2dLayer(c192, c192, 7, 1, padding=[3, 0]), conv_3=Conv2dLayer(c192, c192, 3, 3, stride=2))
        self.pool = torch.nn.MaxPool2d(kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([self.tower(x), self.tower_1(x), self.pool(x)], dim=1)


@persistence.persistent_class
class InceptionE(torch.nn.Module):
    def __init__(self, cin, use_avg_pool, div):
        super().__init__()
        c384 = _w(384, div)
        self.conv = Conv2dLayer(cin, _w(320, div), 1, 1)
        self.tower_conv = Conv2dLayer(cin, c384, 1, 1)
        self.tower_mixed_conv = Conv2dLayer(c384, c384, 1, 3, padding=[0, 1])
        self.tower_mixed_conv_1 = Conv2dLayer(c384, c384, 3, 1, padding=[1, 0])
        self.tower_1_conv = Conv2dLayer(cin, _w(448, div), 1, 1)
        self.tower_1_conv_1 = Conv2dLayer(_w(448, div), c384, 3, 3, padding=1)
        self.tower_1_mixed_conv = Conv2dLayer(c384, c384, 1, 3, padding=[0, 1])
        self.tower_1_mixed_conv_1 = Conv2dLayer(c384, c384, 3, 1, padding=[1, 0])
        self.tower_2_pool = _avg3() if use_avg_pool else torch.nn.MaxPool2d(kernel_size=3, stride=1, padding=1)
        self.tower_2_conv = Conv2dLayer(cin, _w(192, div), 1, 1)

    def forward(self, x):
        a, b = self.tower_conv(x), self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a), self.tower_1_mixed_conv(b),
                          self.tower_1_mixed_conv_1(b), self.tower_2_conv(self.tower_2_pool(x))], dim=1)


def _out_a(div, tmp):
    return _w(64, div) + _w(64, div) + _w(96, div) + tmp


@persistence.persistent_class
class InceptionV3(torch.nn.Module):
    def __init__(self, div=32):
        super().__init__()
        a0 = _out_a(div, _w(32, div))
        a1 = _out_a(div, _w(64, div))
        b = _w(384, div) + _w(96, div) + a1
        c = 4 * _w(192, div)
        d = _w(320, div) + _w(192, div) + c
        e = _w(320, div) + 4 * _w(384, div) + _w(192, div)
        self.layers = _seq(
            conv=Conv2dLayer(3, _w(32, div), 3, 3, stride=2), conv_1=Conv2dLayer(_w(32, div), _w(32, div), 3, 3),
            conv_2=Conv2dLayer(_w(32, div), _w(64, div), 3, 3, padding=1), pool0=torch.nn.MaxPool2d(3, stride=2),
            conv_3=Conv2dLayer(_w(64, div), _w(80, div), 1, 1), conv_4=Conv2dLayer(_w(80, div), _w(192, div), 3, 3),
            pool1=torch.nn.MaxPool2d(3, stride=2), mixed=InceptionA(_w(192, div), _w(32, div), div),
            mixed_1=InceptionA(a0, _w(64, div), div), mixed_2=InceptionA(a1, _w(64, div), div), mixed_3=InceptionB(a1, div),
            mixed_4=InceptionC(b, _w(128, div), div), mixed_5=InceptionC(c, _w(160, div), div),
            mixed_6=InceptionC(c, _w(160, div), div), mixed_7=InceptionC(c, _w(192, div), div), mixed_8=InceptionD(c, div),
            mixed_9=InceptionE(d, True, div), mixed_10=InceptionE(e, False, div), pool2=torch.nn.AvgPool2d(kernel_size=8))
        self.output = torch.nn.Linear(e, 1008)

    @torch.no_grad()
    def reference(self, images):
        """Independent float64 computation: features and bias-free class probabilities."""
        x = (torch.from_numpy(tf_resize_reference(images.numpy().astype(np.float64), 299)) - 128) / 128
        features = self.layers(x).flatten(1)
        logits = features @ self.output.weight.to(torch.float64).T
        return features, torch.softmax(logits, dim=1)


@persistence.persistent_class
class VGG16(torch.nn.Module):
    """The VGG16 record: `layers` holds conv1..conv13 and fc1..fc3, LPIPS weights lpips0..lpips4 beside it."""

    def __init__(self, div=32):
        super().__init__()
        widths = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
        layers, cin = collections.OrderedDict(), 3
        for i, width in enumerate(widths, start=1):
            layers[f'conv{i}'] = torch.nn.Conv2d(cin, _w(width, div), 3, padding=1)
            cin = _w(width, div)
        layers['fc1'] = torch.nn.Linear(cin * 7 * 7, _w(4096, div))
        layers['fc2'] = torch.nn.Linear(_w(4096, div), _w(4096, div))
        layers['fc3'] = torch.nn.Linear(_w(4096, div), 1000)
        self.layers = torch.nn.Sequential(layers)
        for i, width in enumerate([64, 128, 256, 512, 512]):
            setattr(self, f'lpips{i}', torch.nn.Parameter(torch.rand(_w(width, div), 1, 1)))

    @torch.no_grad()
    def reference(self, images):
        """Independent float64 computation of the fc2 features (ImageNet-normalised 224x224 input)."""
        x = torch.from_numpy(tf_resize_reference(images.numpy().astype(np.float64), 224)) / 255
        x = (x - torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).reshape(1, 3, 1, 1)) \
            / torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).reshape(1, 3, 1, 1)
        for i in range(1, 14):
            x = torch.relu(self.layers[i - 1](x))
            x = torch.nn.functional.max_pool2d(x, 2) if i in (2, 4, 7, 10, 13) else x
        return torch.relu(self.layers.fc2(torch.relu(self.layers.fc1(x.flatten(1)))))


class FeatureTrace(torch.nn.Module):
    """The stand-in's module tree (`layers`, `output`) behind a plain forward, for torch.jit.trace."""

    def __init__(self, net):
        super().__init__()
        self.layers, self.output = net.layers, net.output

    def forward(self, x):
        return self.output(self.layers(x).flatten(1))


def tf_resize_reference(images, size):
    """tf.image.resize_bilinear(align_corners=False) of TF 1.x, written out: output pixel j samples source
    coordinate j * in / out, bilinear, indices clamped at the last pixel."""
    def axis(n_in):
        src = np.arange(size) * (n_in / size)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo
    (y0, y1, fy), (x0, x1, fx) = axis(images.shape[2]), axis(images.shape[3])
    rows = images[:, :, y0] * (1 - fy)[:, None] + images[:, :, y1] * fy[:, None]
    return rows[:, :, :, x0] * (1 - fx) + rows[:, :, :, x1] * fx


def write_pickle(path, net):
    """pickle.dump of the network, as NVIDIA wrote the detector files."""
    with open(path, 'wb') as f:
        pickle.dump(net, f)
    return str(path)


def make_standin(kind, seed=0, div=32):
    """A double-precision stand-in network of `kind` ('inception' or 'vgg16') with seeded random weights."""
    torch.manual_seed(seed)
    net = (InceptionV3 if kind == 'inception' else VGG16)(div=div)
    return net.eval()

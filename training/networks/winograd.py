"""3x3 convolutions by Winograd's minimal filtering F(4x4, 3x3), for fp32 training on the CPU (train.py --winograd).

Per output pixel and input channel a direct 3x3 convolution spends 9 multiplications; the Winograd form spends 36
per 4x4 output tile, i.e. 2.25, as one batched matrix product over the 36 tile positions. On the CPU the direct
convolutions already run at about the core's peak (oneDNN, ~100 GFLOP/s per core of the project's EPYC), so fewer
multiplications is the only way left to a faster fp32 step; on CUDA, cuDNN picks Winograd kernels itself and this
module is not used.

The tile transforms are cheap in arithmetic but touch every element several times: eager PyTorch runs them as
separate passes over memory and loses the gain, so they are compiled (torch.compile, one static graph per input
shape and grad mode, a few seconds each the first time, cached on disk after; layers.set_conv_algorithm limits a
run to one batch size). The batched product and the weight transform stay eager matrix products. Rounding differs
from the direct convolution: about 1e-5 of the output's range against 3e-7, far below bf16's 4e-3.
bench/bench_winograd.py times single convolutions, bench/bench_vs_official.py --winograd the training step.
"""

import contextlib
import functools

import torch

import dnnlib

#----------------------------------------------------------------------------
# Winograd F(4, 3) with interpolation points 0, 1, -1, 2, -2, infinity (Lavin & Gray 2016, "Fast Algorithms for
# Convolutional Neural Networks", eq. 5-8): for a 6-tap input tile d and a 3-tap filter g, the 4 outputs of the
# valid correlation are Y = A^T [(G g) * (B^T d)], and in 2-D Y = A^T [(G g G^T) * (B^T d B)] A.

TILE_OUT = 4                    # m: outputs per tile side
TILE_IN = TILE_OUT + 2          # m + r - 1: inputs per tile side
B_T = ((4, 0, -5, 0, 1, 0),
       (0, -4, -4, 1, 1, 0),
       (0, 4, -4, -1, 1, 0),
       (0, -2, -1, 2, 1, 0),
       (0, 2, -1, -2, 1, 0),
       (0, 4, 0, -5, 0, 1))
G = ((1 / 4, 0, 0),
     (-1 / 6, -1 / 6, -1 / 6),
     (-1 / 6, 1 / 6, -1 / 6),
     (1 / 24, 1 / 12, 1 / 6),
     (1 / 24, -1 / 12, 1 / 6),
     (0, 0, 1))
A_T = ((1, 1, 1, 1, 1, 0),
       (0, 1, -1, 2, -2, 0),
       (0, 1, 1, 4, 4, 0),
       (0, 1, -1, 8, -8, 1))

MIN_SIDE = 32   # smaller sides do not pay: 8x8 takes 2x the direct time; 16x16 gains 15% per convolution alone but
                # nothing measurable in the DDPM++ step (6 interleaved rounds), and would add compiled graphs


def applies(x, weight, padding):
    """Whether conv3x3 computes conv2d(x, weight, padding=padding) here and pays: a 3x3 kernel with padding 1 on
    fp32 CPU data whose sides are multiples of 4 and at least MIN_SIDE, outside autocast (any memory layout: the
    compiled transforms read it as it is)."""
    return (weight is not None and weight.shape[-2:] == (3, 3) and padding == 1 and x.device.type == 'cpu'
            and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.shape[-1] % TILE_OUT == 0 and x.shape[-2] % TILE_OUT == 0 and min(x.shape[-2:]) >= MIN_SIDE
            and not torch.is_autocast_enabled('cpu'))


def _transform(matrix, x, dim):
    """matrix @ x along `dim`, written out as sums of slices (the transform matrices are small and sparse, so a
    compiled graph fuses this into one pass)."""
    taps = x.unbind(dim)
    rows = [sum(c * taps[j] for j, c in enumerate(row) if c != 0) for row in matrix]
    return torch.stack(rows, dim)


def input_tiles(x):
    """B^T d B for every overlapping 6x6 tile (stride 4) of x padded by 1: [36, C, N * H/4 * W/4]."""
    n, c, h, w = x.shape
    d = torch.nn.functional.pad(x, (1, 1, 1, 1)).unfold(2, TILE_IN, TILE_OUT).unfold(3, TILE_IN, TILE_OUT)
    v = _transform(B_T, _transform(B_T, d, 4), 5)                   # [N, C, H/4, W/4, 6, 6]
    return v.permute(4, 5, 1, 0, 2, 3).reshape(TILE_IN ** 2, c, n * (h // TILE_OUT) * (w // TILE_OUT))


def output_tiles(m, h, w):
    """A^T M A for the [36, K, N * H/4 * W/4] tile products m, assembled into the [N, K, H, W] output."""
    k = m.shape[1]
    th, tw = h // TILE_OUT, w // TILE_OUT
    n = m.shape[2] // (th * tw)
    m = m.view(TILE_IN, TILE_IN, k, n, th, tw)
    y = _transform(A_T, _transform(A_T, m, 0), 1)                   # [4, 4, K, N, H/4, W/4]
    return y.permute(3, 2, 4, 0, 5, 1).reshape(n, k, h, w)


def _weight_matrix(device, dtype):
    """G (x) G as a [36, 9] matrix: (G g G^T) flattened = this @ g flattened (324 numbers: rebuilt per call)."""
    g = torch.tensor(G, dtype=torch.float64)
    return torch.kron(g, g).to(device=device, dtype=dtype)


def filter_tiles(weight):
    """G g G^T for every [K, C, 3, 3] filter: [36, K, C] (one matrix product, eager)."""
    k, c = weight.shape[:2]
    flat = weight.permute(2, 3, 0, 1).reshape(9, k * c)
    return (_weight_matrix(weight.device, weight.dtype) @ flat).view(TILE_IN ** 2, k, c)


class Transforms:
    """The two tile transforms, compiled once per input shape and grad mode (`compiled=False`: eager, as traced
    into a compiled network and as the tests check the arithmetic)."""

    RECOMPILE_LIMIT = 64    # static graphs per transform: a run meets a few layer shapes at one batch size
                            # (layers.set_conv_algorithm), times two grad modes (prediction and target pass)

    def __init__(self, compiled=True):
        self.compiled = compiled
        self.input_tiles = torch.compile(input_tiles, dynamic=False) if compiled else input_tiles
        self.output_tiles = torch.compile(output_tiles, dynamic=False) if compiled else output_tiles

    def __call__(self, x, weight):
        limit = torch._dynamo.config.patch(recompile_limit=self.RECOMPILE_LIMIT) if self.compiled \
            else contextlib.nullcontext()
        with limit:
            return self.output_tiles(torch.bmm(filter_tiles(weight), self.input_tiles(x)), *x.shape[-2:])


@functools.cache
def compiled_transforms():
    """The process's compiled Transforms (one set of graphs shared by every layer)."""
    return Transforms(compiled=True)


def check_compiles():
    """Compile and run the transforms once on a 4x4 image, so that a missing C++ toolchain (torch.compile's CPU
    kernels need one) is one clear error before training starts."""
    try:
        conv3x3(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 3, 3))
    except Exception as e:   # whatever the compiler stack raises, the user gets one line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise dnnlib.UserError(f'--winograd: torch.compile cannot build CPU kernels here (a C++ compiler is '
                               f'needed): {reason}') from e


def conv3x3(x, weight, transforms=None):
    """conv2d(x, weight, padding=1) for a [K, C, 3, 3] weight by Winograd F(4x4, 3x3); x is [N, C, H, W] with H and
    W multiples of 4 (see applies()). Differentiable in x and weight. Inside a compiled network (train.py --compile)
    the eager transforms are traced into the network's own graph."""
    if torch.compiler.is_compiling():
        transforms = Transforms(compiled=False)
    return (transforms or compiled_transforms())(x, weight)

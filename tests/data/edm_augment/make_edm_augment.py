"""Reference outputs of NVlabs/edm's AugmentPipe and EDMLoss (training/augment.py, training/loss.py), run on the CPU.

    python tests/data/edm_augment/make_edm_augment.py /path/to/extracted/edm [output.npz]

Writes edm_augment.npz next to this script (README.md there describes the keys). The official classes are
imported from the checkout as they are (they need only torch, numpy and the checkout's torch_utils).
"""

import json
import os
import sys

import numpy as np
import torch

CIFAR10 = dict(p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)  # edm train.py:144-145
MEANFLOW = dict(p=0.12, xflip=1e8, yflip=0, scale=1, rotate_frac=0, aniso=1, translate_frac=1)  # py-meanflow train_loop.py:68
COLOR = dict(brightness=1, contrast=1, lumaflip=1, hue=1, saturation=1)
EVERY = dict(xflip=1, yflip=1, rotate_int=1, translate_int=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1, **COLOR)
CUSTOM = dict(translate_int_max=0.25, scale_std=0.3, rotate_frac_max=0.5, aniso_std=0.35, aniso_rotate_prob=0.7,
              translate_frac_std=0.2, brightness_std=0.3, contrast_std=0.4, hue_max=0.5, saturation_std=0.8)

# name: (pipe kwargs, image shape [N, C, H, W], torch seed); the seeds of the p = 0.12 cases were picked so that every
# label column is non-zero for some sample
CASES = {
    'cifar10': (CIFAR10, [8, 3, 16, 16], 155),
    'cifar10_p0': (dict(CIFAR10, p=0), [4, 3, 16, 16], 2),
    'color': (dict(p=0.5, xflip=1, **COLOR), [8, 3, 8, 8], 3),
    'every_p1': (dict(p=1, **EVERY), [6, 3, 12, 12], 4),
    'every_p1_custom': (dict(p=1, **EVERY, **CUSTOM), [6, 3, 12, 12], 5),
    'grey_p1': (dict(p=1, **EVERY), [4, 1, 12, 12], 6),
    'nonsquare_p1': (dict(p=1, **dict(EVERY, rotate_int=0)), [4, 3, 8, 12], 7),
    'meanflow': (MEANFLOW, [8, 3, 16, 16], 21),
}
LOSS_CASE = (dict(CIFAR10, p=0.5), [4, 3, 8, 8], 9)   # EDMLoss with the pipe and toy_denoiser below
NEXT_DRAWS = 5   # torch.rand draws taken after each call: the state the call leaves the global RNG in


def toy_denoiser(x, sigma, class_labels=None, augment_labels=None):
    """A parameter-free stand-in for the network that depends on every input (tests/test_augment.py has the same)."""
    return x / (1 + sigma ** 2) + 0.1 * augment_labels.sum(dim=1).reshape(-1, 1, 1, 1) * torch.tanh(x)


def images_for(shape, seed):
    return np.random.RandomState(seed).uniform(-1, 1, size=shape).astype(np.float32)


def run_cases(AugmentPipe):
    arrays = {}
    for name, (kwargs, shape, seed) in CASES.items():
        images = images_for(shape, seed)
        torch.manual_seed(seed)
        out, labels = AugmentPipe(**kwargs)(torch.from_numpy(images))
        arrays.update({f'{name}__images': images, f'{name}__out': out.numpy(), f'{name}__labels': labels.numpy(),
                       f'{name}__next': torch.rand([NEXT_DRAWS]).numpy()})
    return arrays


def run_loss(AugmentPipe, EDMLoss):
    kwargs, shape, seed = LOSS_CASE
    images = images_for(shape, seed)
    torch.manual_seed(seed)
    loss = EDMLoss()(net=toy_denoiser, images=torch.from_numpy(images), augment_pipe=AugmentPipe(**kwargs))
    return {'loss__images': images, 'loss__elementwise': loss.numpy(), 'loss__next': torch.rand([NEXT_DRAWS]).numpy()}


def main(edm_dir, out_path):
    sys.path.insert(0, os.path.abspath(edm_dir))
    from training.augment import AugmentPipe
    from training.loss import EDMLoss
    commit = os.popen(f'git -C {edm_dir} rev-parse HEAD 2>/dev/null').read().strip() or 'see README.md'
    meta = dict(commit=commit, torch=torch.__version__, next_draws=NEXT_DRAWS,
                cases={name: dict(kwargs=k, shape=s, seed=seed) for name, (k, s, seed) in CASES.items()},
                loss=dict(kwargs=LOSS_CASE[0], shape=LOSS_CASE[1], seed=LOSS_CASE[2], P_mean=-1.2, P_std=1.2, sigma_data=0.5))
    arrays = dict(run_cases(AugmentPipe), **run_loss(AugmentPipe, EDMLoss))
    arrays['meta'] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez_compressed(out_path, **arrays)
    print(f'wrote {out_path} ({os.path.getsize(out_path)} bytes, {len(arrays)} arrays)')


if __name__ == '__main__':
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else os.path.join(os.path.dirname(__file__), 'edm_augment.npz'))

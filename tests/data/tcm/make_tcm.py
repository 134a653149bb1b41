"""Reference numbers of NVlabs/TCM for tests/test_tcm.py: its stage-2 loss, time sampler and sampler, run on the CPU.

Usage: python tests/data/tcm/make_tcm.py /path/to/extracted/NVlabs-TCM [--out tests/data/tcm/tcm.npz]

Runs the official code itself (training/loss.py ECMLoss, training/networks_tcm.py TCMPrecond, training/networks.py
ECMPrecond with SongUNet / DhariwalUNet, torch_utils/misc.py truncated_t, ct_eval.py generator_fn) on tiny networks.
Two stubs make it run on a CPU-only machine: torch.cuda.get_rng_state / set_rng_state become the CPU generator's (on
the CPU the dropout masks come from that generator, so the official restore still shares them), and an empty
`torchvision` module satisfies an import of ct_eval's metrics package that generator_fn does not use.
Network weights come from `tiny_weights` (a seeded numpy recipe over the parameters in sorted name order), which
tests/test_tcm.py repeats for the project's networks. README.md describes every key.
"""

import argparse
import json
import os
import sys
import types

import numpy as np
import torch

N = 8                   # batch of the loss cases
RES = 8                 # image resolution
PROJECTIONS = 8         # fixed directions the full gradient is projected on
SONG = dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard', decoder_type='standard',
            channel_mult_noise=1, resample_filter=[1, 1], model_channels=16, channel_mult=[1, 2], num_blocks=1,
            attn_resolutions=[4], dropout=0.2)
# 64 channels at 4x4: one attention head (EDM's DhariwalUNet has none below 64 channels, the project's at least one).
DHARIWAL = dict(model_type='DhariwalUNet', model_channels=16, channel_mult=[1, 4], num_blocks=1, attn_resolutions=[4],
                dropout=0.2, label_dropout=0.25)
# Loss cases: network, labels, ECMLoss kwargs, curriculum stage, w_boundary, batch, seeds (torch, numpy).
CASES = {
    'cifar': dict(net=SONG, label_dim=0, stage=12, w_boundary=0.1, batch=N, seeds=(11, 21),
                  loss=dict(P_mean=0.0, P_std=0.2, t_lower=1.0, t_upper=80.0, q=2.0, c=1e-8, ratio_limit=0.999,
                            weighting='default', boundary_prob=0.25, tdist='t', df=0.01)),
    'imagenet': dict(net=DHARIWAL, label_dim=4, stage=1, w_boundary=0.1, batch=N, seeds=(12, 22),
                     loss=dict(P_mean=0.0, P_std=0.2, t_lower=1.0, t_upper=80.0, q=4.0, c=0.06, ratio_limit=0.9961,
                               weighting='cout_sq', boundary_prob=0.25, tdist='t', df=0.01)),
    'no_boundary': dict(net=SONG, label_dim=0, stage=0, w_boundary=0.1, batch=3, seeds=(13, 23),
                        loss=dict(P_mean=0.0, P_std=0.2, t_lower=1.0, t_upper=80.0, q=2.0, c=0.0, ratio_limit=0.999,
                                  weighting='default', boundary_prob=0.25, tdist='t', df=0.01)),
}
TRANSITION_T = 1.0
# Time-sampler cases: truncated_t arguments (mu, sigma, t_lower, t_upper, df), draws, numpy seed.
SAMPLER_CASES = {
    'recipe': dict(mu=0.0, sigma=0.2, lower=1.0, upper=80.0, df=0.01, num=64, seed=31),
    'wide': dict(mu=-0.5, sigma=1.0, lower=0.5, upper=80.0, df=2.0, num=64, seed=32),
}
GRAD_KEYS = ['model.enc.8x8_conv.weight', 'model.map_layer0.weight']   # stored in full (both architectures have them)


def tiny_weights(net, seed):
    """Every parameter from numpy's default_rng(seed) in sorted name order: N(0,1)/sqrt(fan_in) for matrices and
    kernels, 1 + 0.1·N(0,1) for normalisation weights, 0.1·N(0,1) for other vectors."""
    rng = np.random.default_rng(seed)
    params = dict(net.named_parameters())
    with torch.no_grad():
        for name in sorted(params):
            shape = tuple(params[name].shape)
            x = rng.standard_normal(shape)
            if len(shape) >= 2:
                x = x / np.sqrt(np.prod(shape[1:]))
            elif 'norm' in name and name.endswith('weight'):
                x = 1 + 0.1 * x
            else:
                x = 0.1 * x
            params[name].copy_(torch.from_numpy(x.astype(np.float32)))
    return net


def import_official(root):
    """The official modules, with the two CPU stubs installed."""
    sys.path.insert(0, root)
    sys.modules.setdefault('torchvision', types.ModuleType('torchvision'))
    sys.modules.setdefault('torchvision.utils', types.SimpleNamespace(save_image=None))
    torch.cuda.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    import ct_eval
    from torch_utils import misc
    from training import loss, networks, networks_tcm
    return types.SimpleNamespace(ct_eval=ct_eval, misc=misc, loss=loss, networks=networks, tcm=networks_tcm)


def build_net(official, net_kwargs, label_dim, seed):
    net = official.networks.ECMPrecond(img_resolution=RES, img_channels=3, label_dim=label_dim, **net_kwargs)
    return tiny_weights(net, seed)


class Recorder:
    """Wraps a function and keeps every value it returns (the official draws, observed where they are made)."""

    def __init__(self, owner, name):
        self.owner, self.name, self.original, self.values = owner, name, getattr(owner, name), []
        setattr(owner, name, self)

    def __call__(self, *args, **kwargs):
        value = self.original(*args, **kwargs)
        self.values.append(value)
        return value

    def restore(self):
        setattr(self.owner, self.name, self.original)


def recording_tcm(official):
    """TCMPrecond whose calls keep their outputs: the official predictions f(x_t, t) and f(x_r, r)."""
    class RecordingTCMPrecond(official.tcm.TCMPrecond):
        def __call__(self, *args, **kwargs):
            out = super().__call__(*args, **kwargs)
            self.outputs.append(out.detach().clone())
            return out
    return RecordingTCMPrecond


def flat_grad(net):
    params = dict(net.named_parameters())
    return torch.cat([params[k].grad.flatten().double() for k in sorted(params)])


def projections(flat):
    """The gradient's dot products with PROJECTIONS fixed directions d_k[i] = cos(0.61803·(k+1)·i + k)."""
    i = np.arange(flat.numel(), dtype=np.float64)
    return np.array([np.cos(0.61803 * (k + 1) * i + k) @ flat.numpy() for k in range(PROJECTIONS)])


def run_loss_case(official, name, case):
    """Run ECMLoss through TCMPrecond once; the step objective and its gradient, every draw and per-sample loss."""
    batch = case['batch']
    student = build_net(official, case['net'], case['label_dim'], seed=0).train().requires_grad_(True)
    teacher = build_net(official, case['net'], case['label_dim'], seed=1).train().requires_grad_(False)
    tcm = recording_tcm(official)(teacher, student, transition_t=TRANSITION_T)
    tcm.outputs = []
    loss_fn = official.loss.ECMLoss(**case['loss'])
    loss_fn.update_schedule(case['stage'])
    gen = np.random.default_rng(100 + len(name))
    images = torch.from_numpy(gen.uniform(-1, 1, (batch, 3, RES, RES)).astype(np.float32))
    labels = None
    if case['label_dim']:
        classes = gen.integers(0, case['label_dim'], batch)
        labels = torch.from_numpy(np.eye(case['label_dim'], dtype=np.float32)[classes])
    torch_seed, np_seed = case['seeds']
    np.random.seed(np_seed)
    uniforms = np.random.random_sample(batch)
    torch.manual_seed(torch_seed)
    np.random.seed(np_seed)
    draws = dict(log_t=Recorder(official.misc, 'truncated_t'), perm=Recorder(torch, 'randperm'),
                 eps=Recorder(torch, 'randn_like'))
    try:
        loss_unweighted, loss, _, _, loss_boundary = loss_fn(net=tcm, images=images, labels=labels)
    finally:
        for recorder in draws.values():
            recorder.restore()
    objective = loss.mean() + loss_boundary.mean() * case['w_boundary']
    objective.backward()
    grad = flat_grad(student)
    perm = draws['perm'].values[0]
    boundary = np.zeros(batch, dtype=bool)
    boundary[perm[:int(batch * case['loss']['boundary_prob'])].numpy()] = True
    params = dict(student.named_parameters())
    out = dict(images=images.numpy(), uniforms=uniforms, log_t=draws['log_t'].values[0], perm=perm.numpy(),
               eps=draws['eps'].values[0].numpy(), boundary=boundary, ratio=np.float64(loss_fn.ratio),
               loss=loss.detach().double().numpy(), loss_boundary=loss_boundary.detach().double().numpy(),
               loss_unweighted=loss_unweighted.detach().double().numpy(), objective=objective.detach().double().numpy(),
               grad_norm=np.float64(grad.norm()), grad_projections=projections(grad),
               f_t=tcm.outputs[0].numpy(), f_r=tcm.outputs[1].numpy())
    out.update({f'grad:{k}': params[k].grad.numpy() for k in GRAD_KEYS})
    if labels is not None:
        out['labels'] = labels.numpy()
    return {f'{name}/{k}': v for k, v in out.items()}


def run_sampler_cases(official):
    out = {}
    for name, case in SAMPLER_CASES.items():
        np.random.seed(case['seed'])
        uniforms = np.random.random_sample(case['num'])
        np.random.seed(case['seed'])
        log_t = official.misc.truncated_t(case['num'], mu=case['mu'], sigma=case['sigma'], lower=np.log(case['lower']),
                                          upper=np.log(case['upper']), df=case['df'])
        out.update({f'sampler_{name}/uniforms': uniforms, f'sampler_{name}/log_t': log_t})
    return out


def run_generation(official):
    """generator_fn (ct_eval.py) on the tiny SongUNet in eval mode: 1 step, and 2 steps at mid_t 1.0 and 0.821."""
    net = build_net(official, SONG, 0, seed=0).eval().requires_grad_(False)
    gen = np.random.default_rng(7)
    latents = torch.from_numpy(gen.standard_normal((4, 3, RES, RES)).astype(np.float32))
    noise = torch.from_numpy(gen.standard_normal((4, 3, RES, RES)).astype(np.float32))
    out = {'generate/latents': latents.numpy(), 'generate/noise': noise.numpy()}
    for key, mid_t in (('1step', None), ('2step_1.0', [1.0]), ('2step_0.821', [0.821])):
        x = official.ct_eval.generator_fn(net, latents, None, mid_t=mid_t, noise=noise)
        out[f'generate/{key}'] = x.numpy()
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('official_root', help='extracted NVlabs/TCM checkout')
    parser.add_argument('--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tcm.npz'))
    args = parser.parse_args()
    torch.set_num_threads(1)
    official = import_official(os.path.abspath(args.official_root))
    out = {}
    for name, case in CASES.items():
        out.update(run_loss_case(official, name, case))
    out.update(run_sampler_cases(official))
    out.update(run_generation(official))
    meta = dict(cases=CASES, sampler_cases=SAMPLER_CASES, transition_t=TRANSITION_T, grad_keys=GRAD_KEYS,
                projections=PROJECTIONS, song=SONG, dhariwal=DHARIWAL,
                param_names={name: sorted(n for n, _ in build_net(official, kwargs, label_dim, 0).named_parameters())
                             for name, kwargs, label_dim in (('song', SONG, 0), ('dhariwal', DHARIWAL, 4))})
    out['meta'] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez_compressed(args.out, **out)
    print(f'wrote {args.out} ({os.path.getsize(args.out)} bytes)')


if __name__ == '__main__':
    main()

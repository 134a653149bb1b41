"""Reference numbers of NVlabs/FastGen's sCM for tests/test_scm.py, produced by running its code on the CPU.

Usage: python tests/data/fastgen_scm/make_fastgen_scm.py /path/to/extracted/NVlabs-FastGen [--commit SHA]
       [--out tests/data/fastgen_scm/fastgen_scm.npz]

Runs FastGen's own files — fastgen/methods/consistency_model/sCM.py (SCMModel, TrigFlowPrecond),
fastgen/networks/noise_schedule.py and fastgen/networks/network.py — loaded from the checkout by path. What they
import from the rest of FastGen is either taken from the checkout too (`expand_like` of fastgen/utils/__init__.py and
`PRECISION_MAP` of fastgen/utils/basic_utils.py, cut out of their files so their heavy imports are skipped) or stubbed:
`diffusers` (two scheduler classes noise_schedule.py names but the EDM/Trig schedules never use), a silent logger,
`convert_cfg_to_dict` (unused here) and `CMModel` (the base class; SCMModel's methods are called on an object built
without its constructor, with the attributes those methods read set by hand).

The networks are tiny closed-form stand-ins written here and repeated in tests/test_scm.py (`stub_raw`): an EDM
denoiser D(x, σ) = c_skip·x + c_out·tanh(A·(c_in x) + b·c_noise + L·label) per pixel, EDM's c_skip, c_out, c_in,
c_noise = ln(σ)/4, and a log-variance u(σ) = a·c_noise + a0; the weights are fixed numpy draws stored in the file.
README.md describes every key.
"""

import argparse
import ast
import importlib.util
import json
import os
import sys
import types

import numpy as np
import torch

SIGMA_DATA = 0.5
N, C, RES, K = 4, 2, 3, 3           # batch, channels, resolution, classes of the stand-in networks
STEP, WARMUP = 3, 10                # iteration and tangent_warmup_steps: r = 0.3
JVP_SIGMA = [0.05, 0.3, 2.0, 10.0]   # noise levels of the JVP cases
SEEDS = dict(weights=5, inputs=6, sample_t=0, sct=11, scd=12, dropout=13)
# _scm_pred_to_loss configurations: (prior_weighting_enabled, g_norm_spatial_invariance, divide_x_0_spatial_dim)
LOSS_CASES = {'paper': (True, False, False), 'defaults': (True, True, True), 'rms': (True, True, False),
              'no_prior': (False, False, False)}


def _module(name, path=None, **attrs):
    module = types.ModuleType(name)
    if path is not None:
        module.__path__ = [path]
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def _cut(path, names):
    """The top-level definitions `names` of an official file, compiled alone (its imports are not run)."""
    tree = ast.parse(open(path).read())
    body = [node for node in tree.body if getattr(node, 'name', None) in names
            or (isinstance(node, ast.Assign) and any(getattr(t, 'id', None) in names for t in node.targets))]
    namespace = dict(torch=torch)
    exec(compile(ast.Module(body=body, type_ignores=[]), path, 'exec'), namespace)   # official code, by path
    return {name: namespace[name] for name in names}


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def import_official(root):
    """(sCM module, noise_schedule module) of the checkout at `root`, with the stubs described above."""
    pkg = os.path.join(root, 'fastgen')
    silent = types.SimpleNamespace(**{k: (lambda *a, **kw: None) for k in ('debug', 'info', 'warning', 'critical',
                                                                           'error')})
    _module('diffusers', DDIMScheduler=object, CogVideoXDPMScheduler=object)
    _module('fastgen', pkg)
    _module('fastgen.utils', os.path.join(pkg, 'utils'), **_cut(os.path.join(pkg, 'utils', '__init__.py'),
                                                                 ['expand_like']))
    _module('fastgen.utils.logging_utils', **vars(silent))
    sys.modules['fastgen.utils'].logging_utils = sys.modules['fastgen.utils.logging_utils']
    _module('fastgen.utils.basic_utils', convert_cfg_to_dict=dict,
            **_cut(os.path.join(pkg, 'utils', 'basic_utils.py'), ['PRECISION_MAP']))
    _module('fastgen.networks', os.path.join(pkg, 'networks'))
    schedule = _load('fastgen.networks.noise_schedule', os.path.join(pkg, 'networks', 'noise_schedule.py'))
    _load('fastgen.networks.network', os.path.join(pkg, 'networks', 'network.py'))
    _module('fastgen.methods', os.path.join(pkg, 'methods'), CMModel=object)
    scm = _load('fastgen.methods.consistency_model.sCM',
                os.path.join(pkg, 'methods', 'consistency_model', 'sCM.py'))
    return scm, schedule


def stub_weights():
    rng = np.random.default_rng(SEEDS['weights'])
    return dict(A=rng.standard_normal((C, C)) / np.sqrt(C), b=rng.standard_normal(C), L=rng.standard_normal((K, C)),
                a=np.array([0.7]), a0=np.array([-0.2]),
                A_teacher=rng.standard_normal((C, C)) / np.sqrt(C), b_teacher=rng.standard_normal(C),
                L_teacher=rng.standard_normal((K, C)))


def stub_raw(x_in, c_noise, labels, A, b, L):
    """The stand-in U-Net output: tanh(A·x_in + b·c_noise + L·label) per pixel (float32 arithmetic)."""
    h = torch.einsum('oc,nchw->nohw', A, x_in) + c_noise.reshape(-1, 1, 1, 1) * b.reshape(1, -1, 1, 1)
    if labels is not None:
        h = h + (labels @ L).reshape(-1, C, 1, 1)
    return torch.tanh(h)


def make_edm_stub(network_module, w, suffix='', dropout=0.0, masks=None):
    """A FastGen x0-prediction network (EDM schedule) around stub_raw, logging its dropout masks into `masks`."""
    tensors = {k: torch.tensor(w[k + suffix] if k + suffix in w else w[k], dtype=torch.float32)
               for k in ('A', 'b', 'L', 'a', 'a0')}

    class EDMStub(network_module.FastGenNetwork):
        def forward(self, x_t, t, condition=None, return_logvar=False, fwd_pred_type='x0', **kwargs):
            sigma = t.to(torch.float32).reshape(-1, 1, 1, 1)
            c_skip = SIGMA_DATA ** 2 / (sigma ** 2 + SIGMA_DATA ** 2)
            c_out = sigma * SIGMA_DATA / (sigma ** 2 + SIGMA_DATA ** 2).sqrt()
            c_in = 1 / (SIGMA_DATA ** 2 + sigma ** 2).sqrt()
            c_noise = sigma.flatten().log() / 4
            raw = stub_raw(c_in * x_t, c_noise, condition, tensors['A'], tensors['b'], tensors['L'])
            if dropout:
                mask = (torch.rand(raw.shape) >= dropout).to(raw.dtype)
                masks.append(mask)
                raw = raw * mask / (1 - dropout)
            out = c_skip * x_t + c_out * raw
            logvar = (tensors['a'] * c_noise + tensors['a0']).reshape(-1, 1)
            return (out, logvar) if return_logvar else out

    return EDMStub(net_pred_type='x0', schedule_type='edm')


def make_model(scm, schedule, net, teacher=None, use_cd=False, finite_diff=False, guidance=None, case='paper'):
    """An SCMModel with the attributes its loss methods read (its constructor needs FastGen's whole config)."""
    prior, spatial, divide = LOSS_CASES[case]
    model = object.__new__(scm.SCMModel)
    model.sigma_data, model.device, model.precision_amp_jvp = SIGMA_DATA, torch.device('cpu'), None
    model.loss_config = types.SimpleNamespace(use_cd=use_cd, tangent_warmup_steps=WARMUP, tangent_warmup_const=0.1,
        prior_weighting_enabled=prior, g_norm_spatial_invariance=spatial, divide_x_0_spatial_dim=divide,
        use_jvp_finite_diff=finite_diff, jvp_finite_diff_eps=1e-3)
    model.sample_t_cfg = types.SimpleNamespace(quantize=False)
    model.config = types.SimpleNamespace(guidance_scale=guidance, skip_layers=None)
    model.net = net
    model.net_trigflow = scm.TrigFlowPrecond(net, sigma_data=SIGMA_DATA)
    model.teacher_trigflow = scm.TrigFlowPrecond(teacher, sigma_data=SIGMA_DATA) if teacher is not None else None
    return model


def inputs():
    rng = np.random.default_rng(SEEDS['inputs'])
    images = np.clip(rng.standard_normal((N, C, RES, RES)) * 0.5, -1, 1)
    sigma = np.array([0.002, 0.3, 2.0, 80.0])
    labels = np.eye(K)[rng.integers(0, K, N)]
    return dict(images=images.astype(np.float32), sigma=sigma, labels=labels.astype(np.float32),
                F_theta=rng.standard_normal((N, C, RES, RES)).astype(np.float32),
                F_jvp=rng.standard_normal((N, C, RES, RES)).astype(np.float32),
                dxdt=rng.standard_normal((N, C, RES, RES)).astype(np.float32),
                logvar=rng.standard_normal((N, 1)).astype(np.float32) * 0.3,
                teacher_dxdt=rng.standard_normal((N, C, RES, RES)).astype(np.float32))


def pred_to_loss_cases(scm, schedule, net, x):
    """FastGen's _scm_pred_to_loss, loss and gradients w.r.t. F_theta and logvar, per configuration."""
    out = {}
    sigma = torch.tensor(x['sigma'])
    t_hat = torch.atan2(sigma, torch.ones_like(sigma) * SIGMA_DATA)
    x_hat = torch.tensor(x['images'])   # any fixed tensor: the loss takes x̂ as an input
    for case in LOSS_CASES:
        model = make_model(scm, schedule, net, case=case)
        F = torch.tensor(x['F_theta'], requires_grad=True)
        logvar = torch.tensor(x['logvar'], requires_grad=True)
        loss, unweighted, r = model._scm_pred_to_loss(F, torch.tensor(x['F_jvp']), x_hat, torch.tensor(x['dxdt']),
                                                       logvar, sigma, t_hat, STEP)
        loss.sum().backward()
        out.update({f'loss_{case}': loss.detach().numpy(), f'grad_F_{case}': F.grad.numpy(),
                    f'grad_logvar_{case}': logvar.grad.numpy().reshape(-1), f'r_{case}': np.array(r)})
    out['t_hat'] = t_hat.numpy()
    return out


def full_loss_cases(scm, schedule, w, x):
    """FastGen's sampling of t and _compute_scm_loss, sCT (unconditional) and sCD (conditional, guidance 2)."""
    network = sys.modules['fastgen.networks.network']
    out = {}
    images = torch.tensor(x['images'])
    for name, cd in (('sct', False), ('scd', True)):
        labels = torch.tensor(x['labels']) if cd else None
        net = make_edm_stub(network, w)
        teacher = make_edm_stub(network, w, suffix='_teacher') if cd else None
        model = make_model(scm, schedule, net, teacher, use_cd=cd, guidance=2.0 if cd else None)
        torch.manual_seed(SEEDS[name])
        t = net.noise_scheduler.sample_t(N, time_dist_type='lognormal', train_p_mean=-1.0, train_p_std=1.4,
                                         min_t=0.002, max_t=80.0)
        loss = model._compute_scm_loss(images, t, condition=labels, neg_condition=torch.zeros(N, K) if cd else None,
                                       iteration=STEP)[0]
        out[f'full_loss_{name}'] = loss.detach().numpy()
    return out


def jvp_cases(scm, schedule, w, x):
    """FastGen's _jvp for sCD with a teacher tangent: forward-mode AD vs its finite difference."""
    network = sys.modules['fastgen.networks.network']
    net = make_edm_stub(network, w)
    sigma = torch.tensor(JVP_SIGMA)   # FastGen's difference steps beyond its EDM schedule's [0.002, 80] at the ends
    t_hat = torch.atan2(sigma, torch.ones_like(sigma) * SIGMA_DATA)
    images, noise = torch.tensor(x['images']), torch.tensor(x['F_theta']) * SIGMA_DATA
    trig = scm.TrigFlowPrecond(net, sigma_data=SIGMA_DATA).noise_scheduler
    x_hat = trig.forward_process(images, noise, t_hat)
    teacher_dxdt = torch.tensor(x['teacher_dxdt'])
    out = dict(jvp_t_hat=t_hat.numpy(), jvp_x_hat=x_hat.numpy(), jvp_noise=noise.numpy(),
               cond_velocity=trig.cond_velocity(images, noise, t_hat).numpy())
    for key, finite, dxdt in (('jvp_ad_teacher', False, teacher_dxdt), ('jvp_fd_teacher', True, teacher_dxdt),
                              ('jvp_ad_path', False, torch.tensor(out['cond_velocity']))):
        model = make_model(scm, schedule, net, use_cd=True, finite_diff=finite)
        out[key] = model._jvp(images, noise, x_hat, t_hat, dxdt).to(torch.float32).numpy()
    return out


def dropout_case(scm, schedule, w, x):
    """FastGen's _compute_scm_loss (sCT) on a stand-in with dropout 0.5: the masks of its gradient pass and its JVP."""
    network = sys.modules['fastgen.networks.network']
    masks = []
    net = make_edm_stub(network, w, dropout=0.5, masks=masks)
    model = make_model(scm, schedule, net)
    torch.manual_seed(SEEDS['dropout'])
    t = torch.tensor(JVP_SIGMA, dtype=torch.float64)
    model._compute_scm_loss(torch.tensor(x['images']), t, iteration=STEP)
    return dict(dropout_mask_grad=masks[0].numpy(), dropout_mask_jvp=masks[1].numpy())


def sample_t_case(schedule):
    torch.manual_seed(SEEDS['sample_t'])
    t = schedule.EDMNoiseSchedule().sample_t(64, time_dist_type='lognormal', train_p_mean=-1.0, train_p_std=1.4,
                                             min_t=0.002, max_t=80.0)
    return dict(sample_t=t.numpy())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('root', help='extracted NVlabs/FastGen checkout')
    parser.add_argument('--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fastgen_scm.npz'))
    parser.add_argument('--commit', default='unknown', help='the checkout\'s commit, recorded in the file')
    args = parser.parse_args()
    torch.set_num_threads(1)
    scm, schedule = import_official(os.path.abspath(args.root))
    w, x = stub_weights(), inputs()
    net = make_edm_stub(sys.modules['fastgen.networks.network'], w)
    data = dict(**{f'w_{k}': v for k, v in w.items()}, **x)
    data.update(pred_to_loss_cases(scm, schedule, net, x))
    data.update(full_loss_cases(scm, schedule, w, x))
    data.update(jvp_cases(scm, schedule, w, x))
    data.update(dropout_case(scm, schedule, w, x))
    data.update(sample_t_case(schedule))
    data['meta'] = np.array(json.dumps(dict(torch=torch.__version__, commit=args.commit, step=STEP,
                                            warmup=WARMUP, sigma_data=SIGMA_DATA)))
    np.savez_compressed(args.out, **data)
    print(f'wrote {args.out}: {len(data)} arrays')


if __name__ == '__main__':
    main()

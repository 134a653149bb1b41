"""Checks of resolved flat options (configs/presets.py): every value a run would otherwise accept silently is refused
here with one dnnlib.UserError naming its flag, before any work."""

import dnnlib
from training.sampling.samplers import FEW_STEP

PRECISIONS = ('auto', 'fp32', 'tf32', 'bf16', 'fp16')   # auto: bf16 on CUDA with native bf16, else fp32 (runtime)
GRID_SAMPLERS = ('edm', *FEW_STEP)   # EDM's Heun, or the 1- and 2-step grids of a few-step sampler family


def choice(flag, value, choices):
    """`value`, after checking it is one of `choices`."""
    if value not in choices:
        raise dnnlib.UserError(f'{flag}: "{value}" is not one of {", ".join(sorted(choices))}')
    return value


def check_numbers(o):
    """Sizes, rates and choices: positive where they must be, in range, one of the known names."""
    positive = dict(batch=('--batch', o.batch), duration_mimg=('--duration', o.duration_mimg),
                    tick_kimg=('--tick', o.tick_kimg), lr=('--lr', o.optimizer.get('lr', 1) if o.lr is None else o.lr))
    for flag, value in positive.values():
        if not value > 0:
            raise dnnlib.UserError(f'{flag}: must be positive, got {value}')
    if o.batch_gpu is not None and not o.batch_gpu > 0:
        raise dnnlib.UserError(f'--batch-gpu: must be positive, got {o.batch_gpu}')
    if not 0 <= o.dropout < 1:
        raise dnnlib.UserError(f'--dropout: must be in [0, 1), got {o.dropout}')
    if o.double_ticks is not None and not o.double_ticks > 0:
        raise dnnlib.UserError(f'--double: must be positive, got {o.double_ticks}')
    if o.grad_clip is not None and not o.grad_clip >= 0:
        raise dnnlib.UserError(f'--grad-clip: must be a positive norm (0 = no clipping), got {o.grad_clip}')
    if o.max_hours is not None and not o.max_hours > 0:
        raise dnnlib.UserError(f'--max-hours: must be positive, got {o.max_hours}')
    choice('--grid-sampler', o.grid_sampler, GRID_SAMPLERS)
    t_max = FEW_STEP[o.grid_sampler].t_max if o.grid_sampler in FEW_STEP else FEW_STEP['consistency'].t_max
    if any(not 0 < t < t_max for t in o.mid_t):
        raise dnnlib.UserError(f'--mid-t: every value must be in (0, {t_max:g}) (the {o.grid_sampler} sampler\'s '
                               f'times), got {list(o.mid_t)}')
    if o.metric_samples is not None and not o.metric_samples > 1:
        raise dnnlib.UserError(f'--metric-samples: must be at least 2, got {o.metric_samples}')
    if o.metrics and not o.eval_ticks:
        raise dnnlib.UserError('--metrics: needs --eval-every=N (ticks between evaluations)')
    choice('--precision', o.precision, PRECISIONS)


def _negative_entry(value, where):
    """The first 'key=value' holding a negative number in a (nested) network_kwargs, or None."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        name = f'{where}.{key}' if where else str(key)
        if isinstance(item, (int, float)) and not isinstance(item, bool) and item < 0:
            return f'{name}={item}'
        found = _negative_entry(item, name)
        if found is not None:
            return found
    return None


def check_run_flags(o):
    """Seed, workers, EMA, --arch-kwargs and --mid-t: the values a run would otherwise accept silently."""
    if not isinstance(o.seed, int) or not 0 <= o.seed < 2 ** 32:
        raise dnnlib.UserError(f'--seed: must be an integer in [0, 2^32), got {o.seed}')
    if not isinstance(o.workers, int) or o.workers < 0:
        raise dnnlib.UserError(f'--workers: must be a non-negative integer, got {o.workers}')
    if o.ema_mimg is not None and not o.ema_mimg > 0:
        raise dnnlib.UserError(f'--ema: the EMA half-life must be positive (Mimg), got {o.ema_mimg}')
    if o.ema_beta is not None and not 0 <= o.ema_beta < 1:
        raise dnnlib.UserError(f'--ema-beta: must be in [0, 1), got {o.ema_beta}')
    negative = _negative_entry(o.network_kwargs, '')
    if negative is not None:
        raise dnnlib.UserError(f'--arch-kwargs: {negative} is negative')
    if list(o.mid_t) != sorted(o.mid_t, reverse=True) or len(set(o.mid_t)) != len(o.mid_t):
        raise dnnlib.UserError(f'--mid-t: the intermediate times must decrease strictly, got {list(o.mid_t)}')
    two_step = [m for m in list(o.metrics) + list(o.eval_init_metrics) if str(m).startswith('two_step_')]
    if two_step and len(o.mid_t) != 1:
        raise dnnlib.UserError(f'--mid-t: {two_step[0]} samples in two steps, which take exactly one '
                               f'intermediate time; got {list(o.mid_t)}')

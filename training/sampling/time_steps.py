"""The time steps of the few-step samplers (consistency in σ, TrigFlow in radians, MeanFlow in flow time): one check
that they decrease strictly from t_max to a final 0, each family with its own bound on t_max."""

import math

import dnnlib


def check_time_steps(steps, family, flags, t_max_limit=math.inf, t_max_text='above 0'):
    """`steps` as a tuple of floats, after checking that they are finite and decrease strictly from a t_max of at
    most `t_max_limit` (said as `t_max_text` in the message) to a final 0; otherwise one UserError naming `flags`."""
    steps = tuple(float(t) for t in steps)
    decreasing = all(a > b for a, b in zip(steps[:-1], steps[1:]))
    if len(steps) < 2 or steps[-1] != 0 or not decreasing or not all(math.isfinite(t) for t in steps) \
            or steps[0] > t_max_limit:
        raise dnnlib.UserError(f'{flags}: {family} steps must decrease strictly from a t_max {t_max_text} to 0, '
                               f'got {list(steps)}')
    return steps

"""What every command line of the project shares: the one-line error for a user's mistake (exit code 2),
list-valued flags, and loading a network from a path or URL.

Library code raises `dnnlib.UserError` with a message naming the file or flag; only command lines turn it into
one line on stderr and an exit code, through `user_errors()`.
"""

import contextlib
import re

import click

import dnnlib

EXIT_USER_ERROR = 2     # exit code of a user's mistake, the same as click's own usage errors


class CommandError(click.ClickException):
    """A user mistake, shown as one line on stderr; exit code EXIT_USER_ERROR."""
    exit_code = EXIT_USER_ERROR


@contextlib.contextmanager
def user_errors(os_errors=False):
    """Turn a dnnlib.UserError raised inside the block into a CommandError (one line, exit code 2); with
    `os_errors`, an OSError too (read-only location, disk full, ...: its path and the system's reason)."""
    try:
        yield
    except dnnlib.UserError as e:
        raise CommandError(str(e)) from None
    except OSError as e:
        if not os_errors:
            raise
        raise CommandError(dnnlib.util.os_error_message(e)) from None


def parse_int_list(text, flag='--seeds'):
    """'1,3-5,8' -> [1, 3, 4, 5, 8] (EDM's seed syntax); a UserError naming `flag` if malformed."""
    values = []
    for part in text.split(','):
        m = re.fullmatch(r'\s*(\d+)\s*(?:-\s*(\d+)\s*)?', part)
        if not m:
            raise dnnlib.UserError(f'{flag}="{text}": expected non-negative integers and ranges such as 0-63,100')
        lo, hi = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
        if hi < lo:
            raise dnnlib.UserError(f'{flag}="{text}": range {lo}-{hi} is empty')
        values.extend(range(lo, hi + 1))
    return values


def parse_float_list(values, flag):
    """Floats from one comma list ('0.821,1.2') or from the values of a repeated flag (('0.5', '0.2,0.1'));
    None when there are none. A UserError naming `flag` for anything that is not a number."""
    texts = [values] if isinstance(values, str) else list(values or ())
    try:
        floats = [float(v) for text in texts for v in text.split(',') if v.strip()]
    except ValueError:
        raise dnnlib.UserError(f'{flag}={",".join(texts)}: expected numbers separated by commas, such as 0.821 '
                               f'or 1.5,0.4') from None
    return floats or None


def parse_double(text):
    """--double: ticks per stage, or 'inf'/'never' (inf: the stage never grows)."""
    if text is None:
        return None
    if str(text).lower() in ('inf', 'never', 'none'):
        return float('inf')
    try:
        return float(text)
    except ValueError:
        raise dnnlib.UserError(f'--double: expected a number of ticks or "never", got "{text}"') from None


def parse_json_dict(text, flag):
    """A JSON object given on the command line (e.g. --arch-kwargs), as a dict; None when not given."""
    return None if text is None else dnnlib.util.json_object(text, flag)


def parse_metric_list(text):
    """--metrics / --eval-init: None = the preset's list; '' or 'none' = no metrics; else the comma list."""
    if text is None:
        return None
    if text.strip().lower() == 'none':
        return []
    return [m.strip() for m in text.split(',') if m.strip()]


def state_dict_options(fn):
    """The flags of openai consistency_models state dicts (`--resolution --parameterization --num_head_channels`),
    which a `.pt` file cannot reveal; pass them to load_network."""
    options = [
        click.option('--resolution', help='openai state dicts: image resolution  [default: from the released file name]',
                     metavar='INT', type=click.IntRange(min=1), default=None),
        click.option('--parameterization', help='openai state dicts: denoiser form  [default: from the file name]',
                     type=click.Choice(['edm', 'consistency']), default=None),
        click.option('--num_head_channels', help='openai state dicts: attention head width', metavar='INT',
                     type=click.IntRange(min=1), default=64, show_default=True),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def load_network(network, allow_unsafe_pickle=False, **state_dict_options):
    """(network in eval mode on the CPU, snapshot metadata) of a path or URL: one of our snapshots, an official
    pickle or an openai consistency_models state dict (metadata {}); `state_dict_options` (resolution,
    parameterization, num_head_channels; None = default) serve the last."""
    from training.checkpoints import reader  # Deferred: keeps `--help` of every command line light.
    options = {k: v for k, v in state_dict_options.items() if v is not None}
    return reader.load_network(network, allow_unsafe_pickle=allow_unsafe_pickle, **options)


def load_consistency_network(network, allow_unsafe_pickle=False, **state_dict_options):
    """(network in eval mode on the CPU, its few-step sampler family) from any network file load_network reads
    that a few-step sampler serves: our ECM, sCM and MeanFlow snapshots, official ECT pickles, or openai's
    consistency-form cd_*/ct_*.pt. Diffusion models (EDM, EDM2, openai's edm_*.pt) are refused with one message."""
    from training.sampling import samplers  # Deferred: keeps `--help` of every command line light.
    net, metadata = load_network(network, allow_unsafe_pickle, **state_dict_options)
    if samplers.is_karras_net(net) and not net.is_consistency:
        raise dnnlib.UserError(f'--network={network}: an EDM-form (edm_*.pt) network is a diffusion model, not a '
                               f'consistency model; pass a cd_*/ct_* network or --parameterization=consistency')
    family = samplers.few_step_family(net, metadata)
    if family is None:
        raise dnnlib.UserError(f'--network={network}: a diffusion model; this needs a consistency model')
    return net, family

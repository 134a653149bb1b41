"""Named scalar statistics reported anywhere during training and collected once per tick (EDM-style).

`report(name, value)` adds the elements of `value` to running moments (count, sum, sum of squares) kept
per name and per device, without synchronising the device. A `Collector` reads the moments accumulated
since its previous `update()`, sums them over all ranks, and serves count / mean / std per name.

State: the moments live in a `StatsAccumulator` object. `report`, `report0` and `Collector` use the
module's single default accumulator (`default_accumulator()`), the one documented module-level object,
so any module can report without threading an object through; tests and tools may pass their own.
"""

import re

import numpy as np
import torch

import dnnlib
from torch_utils import distributed as dist

_NUM_MOMENTS = 3  # count, sum, sum of squares


def _moments_of(value):
    elems = torch.as_tensor(value).detach().flatten()
    dtype = torch.float64 if elems.device.type in ('cpu', 'cuda') else torch.float32
    elems = elems.to(dtype)
    return torch.stack([torch.ones_like(elems).sum(), elems.sum(), elems.square().sum()])


class StatsAccumulator:
    """Cumulative moments per (name, device); never reset, so any number of Collectors can read deltas."""

    def __init__(self):
        self._moments = {}  # name -> {device: float tensor [3]}, cumulative since creation

    def add(self, name, value):
        moments = _moments_of(value)
        per_device = self._moments.setdefault(name, {})
        if moments.device in per_device:
            per_device[moments.device].add_(moments.to(per_device[moments.device].dtype))
        else:
            per_device[moments.device] = moments.clone()

    def register(self, name):
        """Make `name` known without adding data (keeps the set of names equal across ranks)."""
        self._moments.setdefault(name, {})

    def names(self):
        return list(self._moments)

    def cumulative(self, name):
        """Total moments of `name` on this rank as a float64 CPU tensor [count, sum, sum of squares]."""
        total = torch.zeros(_NUM_MOMENTS, dtype=torch.float64)
        for moments in self._moments.get(name, {}).values():
            total += moments.to('cpu', torch.float64)
        return total


# The one module-level object: the process-wide accumulator that report(), report0() and Collector() use
# when none is passed. It only ever grows (names and cumulative moments); nothing reassigns it.
_DEFAULT_ACCUMULATOR = StatsAccumulator()


def default_accumulator():
    """The process-wide accumulator used by report(), report0() and Collector() by default."""
    return _DEFAULT_ACCUMULATOR


def report(name, value, accumulator=None):
    """Add the elements of `value` (tensor, array or number) to the statistic `name`; returns `value`."""
    (accumulator or default_accumulator()).add(name, value)
    return value


def report0(name, value, accumulator=None):
    """report() on rank 0 only; other ranks register the name so collections stay in step."""
    if dist.get_rank() == 0:
        return report(name, value, accumulator)
    (accumulator or default_accumulator()).register(name)
    return value


def _gather_names(local_names):
    """Sorted union of the statistic names of all ranks."""
    if not dist.is_distributed():
        return sorted(local_names)
    gathered = [None] * dist.get_world_size()
    torch.distributed.all_gather_object(gathered, sorted(local_names))
    return sorted(set().union(*gathered))


class Collector:
    """Collects the statistics whose names match `regex`, summed over ranks, for the span between updates."""

    def __init__(self,
        regex           = '.*',     # Only names matching this regular expression are collected.
        keep_previous   = True,     # Keep a statistic's last values when it received no new data.
        accumulator     = None,     # StatsAccumulator to read; None = the module's default one.
    ):
        try:
            self._regex = re.compile(regex if regex is not None else '.*')
        except re.error as e:
            raise dnnlib.UserError(f'training_stats.Collector: invalid regex "{regex}": {e}') from None
        self._keep_previous = keep_previous
        self._accumulator = accumulator or default_accumulator()
        self._seen = {}     # name -> cumulative moments (this rank) at the last update
        self._moments = {}  # name -> moments summed over ranks for the last update span

    def _matching_names(self):
        return [name for name in self._accumulator.names() if self._regex.fullmatch(name)]

    def update(self):
        """Take the moments reported since the last update, summed over all ranks (a collective call)."""
        names = _gather_names(self._matching_names())
        if not self._keep_previous:
            self._moments = {}
        if not names:
            return
        deltas = []
        for name in names:
            cumulative = self._accumulator.cumulative(name)
            deltas.append(cumulative - self._seen.get(name, torch.zeros_like(cumulative)))
            self._seen[name] = cumulative
        totals = dist.all_reduce_sum(torch.stack(deltas)).cpu()
        for name, moments in zip(names, totals):
            if moments[0] > 0 or name not in self._moments:
                self._moments[name] = moments

    def names(self):
        """Names collected by the last update, sorted."""
        return sorted(self._moments)

    def num(self, name):
        """Number of scalars reported for `name` in the last update span (all ranks)."""
        moments = self._moments.get(name)
        return 0 if moments is None else int(moments[0])

    def mean(self, name):
        """Mean of the scalars (nan when there were none)."""
        moments = self._moments.get(name)
        if moments is None or moments[0] == 0:
            return float('nan')
        return float(moments[1] / moments[0])

    def std(self, name):
        """Population standard deviation of the scalars (nan when there were none)."""
        moments = self._moments.get(name)
        if moments is None or moments[0] == 0:
            return float('nan')
        mean = moments[1] / moments[0]
        variance = moments[2] / moments[0] - mean.square()
        return float(np.sqrt(max(float(variance), 0.0)))

    def as_dict(self):
        """{name: EasyDict(num, mean, std)} for every collected statistic."""
        return {name: dnnlib.EasyDict(num=self.num(name), mean=self.mean(name), std=self.std(name))
                for name in self.names()}

    def __getitem__(self, name):
        return self.mean(name)

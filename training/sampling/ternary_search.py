"""Searching a few-step sampling schedule: which intermediate time gives the best score?

openai's `scripts/ternary_search.py` searches the multistep schedule `ts = begin + (p,) + end` of a
`steps`-point Karras grid for the integer p in [begin[-1], end[0]] that minimises the FID of N samples,
assuming the FID is unimodal in p. `ternary_search` is that search (with the final bracket searched
exhaustively, where the official script can return a point outside it); `golden_section_search` is its
continuous counterpart for ECM's `mid_t`, searched in the Karras coordinate u = t^(1/rho).
`Objective` memoises the scores (every point is evaluated once, with the same seeds) and records every
point tried in a CSV and a JSON file.
"""

import csv
import io
import json
import math
import time

import dnnlib

# ----------------------------------------------------------------------------------------------------------
# The searches.


def _check_bracket(left, right, what):
    if not left <= right:
        raise dnnlib.UserError(f'{what}: the search range [{left}, {right}] is empty')


# Integer ternary search (openai/consistency_models, scripts/ternary_search.py) for a unimodal `f` on
# [left, right]: probe m1 = int(left + (right - left)/3) and m2 = int(right - (right - left)/3), keep
# [left, m2] if f(m1) < f(m2) else [m1, right], until fewer than 4 points remain; then the best of those.
def ternary_search(f, left, right):
    left, right = int(left), int(right)
    _check_bracket(left, right, '--begin/--end')
    while right - left >= 3:
        m1 = int(left + (right - left) / 3.0)
        m2 = int(right - (right - left) / 3.0)
        if f(m1) < f(m2):
            right = m2
        else:
            left = m1
    return min(range(left, right + 1), key=f)


GOLDEN = (math.sqrt(5) - 1) / 2    # 0.618...: the bracket shrinks by this factor per evaluation.


# Golden-section search (Kiefer 1953) for a unimodal `f` on [lo, hi] with `num_evals` evaluations
# (at least 2): the continuous form of the ternary search, reusing one probe per step. Returns the best
# point evaluated.
def golden_section_search(f, lo, hi, num_evals):
    _check_bracket(lo, hi, '--mid_t-range')
    if num_evals < 2:
        raise dnnlib.UserError(f'--evals={num_evals}: the golden-section search needs at least 2 evaluations')
    a, b = lo, hi
    c, d = b - GOLDEN * (b - a), a + GOLDEN * (b - a)
    fc, fd = f(c), f(d)
    best = min((fc, c), (fd, d))
    for _ in range(num_evals - 2):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - GOLDEN * (b - a)
            fc = f(c)
            best = min(best, (fc, c))
        else:
            a, c, fc = c, d, fd
            d = a + GOLDEN * (b - a)
            fd = f(d)
            best = min(best, (fd, d))
    return best[1]

# ----------------------------------------------------------------------------------------------------------
# The objective and its record.


class Objective:
    """A memoised objective point -> score that records every point evaluated.

    `score_fn(point)` returns the score (lower is better); `describe(point)` a dict of the settings it stands
    for (e.g. ts, mid_t), stored with it. After each new point `on_point(row)` is called and, with `paths`
    (csv, json), both files are rewritten atomically, so an interrupted search keeps what it measured.
    """

    def __init__(self,
                 score_fn,              # point -> float, lower is better (e.g. FID)
                 describe=None,         # point -> dict of the settings the point stands for
                 paths=None,            # (csv path, json path) to rewrite after each point, or None
                 on_point=None,         # called with each new row (e.g. to advance a progress bar)
                 score_name='fid',      # column name of the score
                 ):
        self.score_fn, self.describe, self.paths, self.on_point = score_fn, describe, paths, on_point
        self.score_name = score_name
        self.cache, self.rows = {}, []

    def __call__(self, point):
        if point not in self.cache:
            start = time.time()
            score = float(self.score_fn(point))
            self.cache[point] = score
            row = dict(point=point, **(self.describe(point) if self.describe else {}), **{self.score_name: score},
                       seconds=round(time.time() - start, 3))
            self.rows.append(row)
            if self.paths:
                self.write(*self.paths)
            if self.on_point:
                self.on_point(row)
        return self.cache[point]

    def row(self, point):
        """The recorded row of an evaluated point."""
        return next(row for row in self.rows if row['point'] == point)

    def best(self):
        """The row with the lowest score (None before any evaluation)."""
        return min(self.rows, key=lambda row: row[self.score_name]) if self.rows else None

    def write(self, csv_path, json_path, **extra):
        """Rewrite the CSV (one row per point, in evaluation order) and the JSON (rows, lowest score, `extra`)."""
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(self.rows[0]), lineterminator='\n')
        writer.writeheader()
        writer.writerows({k: _csv_value(v) for k, v in row.items()} for row in self.rows)
        with dnnlib.util.atomic_write(csv_path, 'w') as f:
            f.write(text.getvalue())
        with dnnlib.util.atomic_write(json_path, 'w') as f:
            json.dump(dict(points=self.rows, lowest=self.best(), **extra), f, indent=2)


def _csv_value(value):
    return ','.join(str(v) for v in value) if isinstance(value, (list, tuple)) else value

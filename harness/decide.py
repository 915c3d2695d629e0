"""
The harness's decision on one run: keep, rerun, discard or crash, with the facts it was taken on.
`analyze.py run` applies it to the branch, and it is the first line of the run's analysis.md, whose
other lines are written from the same facts.

    from harness.decide import decide
    decision = decide(row, history)  # history: results.tsv rows up to and including row
    print(decision.line())           # decision: keep — delta -0.004321 vs best 1a2b3c4 (band ±0.002100, ...

On a fixed time budget val_bpb depends on how many steps the machine allowed, so a code is judged
by the mean of its runs against the mean of the best code's runs, inside the noise band measured from
repeats, and only while the machine runs as fast as during the best's runs: the evaluator's fixed
matmul (GFLOP/s, the `machine_speed` column) tells a quieter box from a better idea, which a step count
cannot do once the code changed.
"""
import io
import os
import subprocess
import tokenize
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np

from harness.archive import best_after_each, on_branch, own_comparable, row_bpb, row_gpu
from harness.identity import row_code, same_code
from harness.noise import Noise, difference_band, noise_band

ENOUGH_RUNS = 3            # runs of one code after which its mean is decided on, whatever the machine did
MACHINE_DRIFT = 0.10       # this run's machine speed off the median of the best's runs by more than 10% ...
PROBE_SPREAD = 0.25        # ... or its two probes (before and after the evaluation) apart by more than 25%
UNFINISHED = "interrupted"  # stopped by the user: no verdict on the code, so it is rerun


# ---------------------------------------------------------------------------
# What a decision says

@dataclass
class Decision:
    kind: str                # keep | rerun | discard | crash
    reason: str              # one phrase
    delta: float | None      # mean val_bpb of this code's clean runs minus the mean of the best code's
    band: float | None       # noise band for that difference of means
    n: int                   # runs of this code in it
    m: int                   # runs of the best's code in it
    best_id: str | None
    measured: bool = True    # val_bpb is the harness's measurement (`analyze.py run`), not train.py's own

    def line(self):
        """One line, the first of analysis.md: the kind, the numbers it rests on, and why."""
        if self.best_id is None:
            facts = f"no best yet (n {self.n})"
        elif self.n == 0:  # no number of this run: nothing to set against the best's
            facts = f"vs best {self.best_id}"
        else:
            delta = "n/a" if self.delta is None else f"{self.delta:+.6f}"
            band = "unknown" if self.band is None else f"±{self.band:.6f}"
            facts = f"delta {delta} vs best {self.best_id} (band {band}, n {self.n} vs {self.m})"
        bare = ("" if self.measured or not self.n else
                "; val_bpb is train.py's own number, not measured by the harness (archived without `analyze.py run`)")
        return f"decision: {self.kind} — {facts}: {self.reason}{bare}"


# ---------------------------------------------------------------------------
# The facts it is taken on

def machine_speed(row):
    """The machine's speed during a run (GFLOP/s from the harness's evaluator), or None for a bare archive."""
    try:
        value = float(row.get("machine_speed") or "nan")
    except ValueError:
        return None
    return value if np.isfinite(value) and value > 0 else None


@dataclass
class Machine:
    """This run's machine against the best's runs: the evaluator's speed, and, for a run of a code run
    before, its step count against that code's usual one (noise.py: a busier or quieter box)."""
    speed: float | None      # this run's GFLOP/s
    usual: float | None      # median GFLOP/s of the best code's runs
    runs: int                # the best code's runs with a speed
    probes: tuple | None     # (before, after) GFLOP/s of this run's evaluation, from measurement.json
    steps: tuple | None      # (this run's steps, its code's usual steps) when they differ beyond the speed noise

    @property
    def drift(self):
        return None if self.speed is None or self.usual is None else self.speed / self.usual - 1

    @property
    def spread(self):
        return None if not self.probes else max(self.probes) / min(self.probes) - 1

    def moved(self):
        """Why this run's machine was not the best's runs' machine, one phrase; None when nothing says so."""
        if self.drift is not None and abs(self.drift) > MACHINE_DRIFT:
            return (f"the machine ran {abs(self.drift):.0%} {'faster' if self.drift > 0 else 'slower'} than during "
                    f"the best's runs ({self.speed:,.0f} vs {self.usual:,.0f} GFLOP/s)")
        if self.spread is not None and self.spread > PROBE_SPREAD:
            before, after = self.probes
            return (f"the machine's speed changed by {after / before - 1:+.0%} during the run's evaluation "
                    f"({before:,.0f} -> {after:,.0f} GFLOP/s)")
        if self.steps:
            steps, usual = self.steps
            return (f"the machine ran {'slower' if steps < usual else 'faster'}: {steps:.0f} steps where this code "
                    f"usually takes {usual:.0f} ({steps / usual - 1:+.0%})")
        return None


def machine_of(row, ref, noise, measurement):
    """The Machine of `row` against `ref`, the best code's runs (itself left out); its probes from
    measurement.json, which the row does not hold."""
    probes = tuple(((measurement or {}).get("machine_speed") or {}).get(k) for k in ("before", "after"))
    speeds = [s for r in ref if r.get("run_id") != row.get("run_id") and (s := machine_speed(r)) is not None]
    return Machine(machine_speed(row), float(np.median(speeds)) if speeds else None, len(speeds),
                   probes if all(isinstance(p, (int, float)) and p > 0 for p in probes) else None,
                   noise.disturbed.get(row.get("run_id")))


@dataclass
class Standing:
    """Where a run stands against the best: everything a decision reads."""
    row: dict
    best: dict | None
    noise: Noise
    own: list                # this code's runs in the mean: those at their code's usual speed
    ref: list                # the best code's runs in the mean
    runs: int                # every finished run of this code, disturbed ones included
    machine: Machine

    @property
    def delta(self):
        if not self.own or not self.ref:
            return None
        return float(np.mean([row_bpb(r) for r in self.own]) - np.mean([row_bpb(r) for r in self.ref]))

    @property
    def band(self):
        return difference_band(self.noise.pooled_std, len(self.own), len(self.ref)) if self.own and self.ref else None

    @cached_property
    def lines(self):
        """(code lines of this run's train.py, of the best's), or None when git lacks either."""
        lines = tuple(train_py_lines(os.getcwd(), r.get("commit", "")) for r in (self.row, self.best))
        return None if None in lines else lines


def best_before(row, history):
    """The best `row` is judged against: its worker's most recently kept comparable run on its branch before it
    (best_for's rule; the audit's vetting is left to the archive, whose record.json names the best)."""
    before = next((history[:i] for i, r in enumerate(history)
                   if r is row or (row.get("run_id") and r.get("run_id") == row["run_id"])), history)
    pool = own_comparable(on_branch(before, row), row.get("harness", ""), row_gpu(row), row.get("worker"))
    return best_after_each(pool)[-1] if pool else None


def standing(row, history, best, measurement=None):
    """The facts of `row` (the last of `history`) against `best` (a row, or None)."""
    noise = noise_band(history, row)
    group, own = runs_of(noise, row)
    ref = runs_of(noise, best)[1] if best is not None else []
    return Standing(row, best, noise, own if row_bpb(row) is not None else [], ref, len(group),
                    machine_of(row, ref, noise, measurement))


def runs_of(noise, row):
    """(every finished run of row's code, those in its mean): the runs at their code's usual speed, or all of
    them when none is. The row counts even when noise_band left it out (a row without a code identity)."""
    group = noise.groups.get(row_code(row), [])
    if row_bpb(row) is not None and all(r.get("run_id") != row.get("run_id") for r in group):
        group = group + [row]
    clean = [r for r in group if r.get("run_id") not in noise.disturbed]
    return group, clean or group


# ---------------------------------------------------------------------------
# The rules, in order: the first that applies decides

def did_not_finish(s):
    if row_bpb(s.row) is None and UNFINISHED not in (s.row.get("status"), s.row.get("outcome")):
        outcome = s.row.get("outcome")
        return "crash", "the run did not finish " + (f"(outcome {outcome})" if outcome not in (None, "", "ok") else
                                                     f"(status {s.row.get('status')}, val_bpb {s.row.get('val_bpb')})")


def was_interrupted(s):
    if UNFINISHED in (s.row.get("status"), s.row.get("outcome")):
        return "rerun", "the run was interrupted before its number was measured"


def was_caught(s):
    if s.row.get("caught"):
        return "discard", f"caught: {s.row['caught']}"
    if s.row.get("status") == "invalid":
        return "discard", "invalid: its harness is not the branch's pinned one"


def is_baseline(s):
    if s.best is None:
        return "keep", "nothing kept yet: this run is the baseline"


def repeats_best(s):
    if same_code(s.row, s.best):
        if s.runs < ENOUGH_RUNS:
            return "rerun", f"the best's code (comments aside), run {s.runs} of {ENOUGH_RUNS}: measuring the noise band"
        return "discard", "a repeat of the best's code (comments aside)"


def no_band_yet(s):
    if s.band is None:
        return "rerun", "no noise band yet: no code has two runs at its usual speed, and a rerun of this one measures it"


def machine_moved(s):
    why = s.machine.moved()
    if why and s.runs < ENOUGH_RUNS:
        return "rerun", f"{why}, so val_bpb measures the machine as much as the code"


def beyond_band(s):
    if s.delta < -s.band:
        return "keep", "lower beyond the noise band"
    if s.delta > s.band:
        return "discard", "higher beyond the noise band"


def simpler(s):
    if s.lines and s.lines[0] < s.lines[1]:
        return "keep", f"simpler at equal val_bpb: {s.lines[0]} code lines where the best's train.py has {s.lines[1]}"


def promising(s):
    if s.delta < 0 and len(s.own) < ENOUGH_RUNS:
        return "rerun", f"lower but inside the noise band, on {len(s.own)} run(s): another run of this code firms up its mean"


def inside_band(s):
    return "discard", "inside the noise band: no better than the best"


RULES = (did_not_finish, was_interrupted, was_caught, is_baseline, repeats_best, no_band_yet, machine_moved,
         beyond_band, simpler, promising, inside_band)


def judge(s):
    """The Decision of the first rule of RULES that applies to the standing `s`. A run on another machine
    that is decided all the same (its code has ENOUGH_RUNS) says so."""
    index, (kind, reason) = next((i, found) for i, rule in enumerate(RULES) if (found := rule(s)))
    why = s.machine.moved()
    if why and index > RULES.index(machine_moved):
        reason += f" (decided on the means of this code's {s.runs} runs, although {why})"
    return Decision(kind, reason, s.delta, s.band, len(s.own), len(s.ref),
                    (s.best.get("run_id") or s.best.get("commit")) if s.best is not None else None,
                    bool(s.row.get("measured")))


def decide(row, history, measurement=None):
    """The decision on `row`, the last of `history` (results.tsv rows), against its worker's most
    recently kept comparable run. `measurement`: the run's measurement.json, whose two machine-speed
    probes the row does not hold."""
    return judge(standing(row, history, best_before(row, history), measurement))


# ---------------------------------------------------------------------------
# Code lines, for "simpler at equal val_bpb"

@lru_cache(maxsize=64)
def train_py_lines(repo, commit):
    """Lines of code of train.py at `commit` of the repository at `repo`, or None when git has no such file."""
    out = subprocess.run(["git", "show", f"{commit}:train.py"], cwd=repo, capture_output=True) if commit else None
    return code_lines(out.stdout.decode("utf-8", errors="replace")) if out and out.returncode == 0 else None


def code_lines(source):
    """Lines holding code: a statement split over three lines counts three, a comment or blank line none."""
    skipped = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
               tokenize.ENCODING, tokenize.ENDMARKER)
    try:
        tokens = tokenize.generate_tokens(io.StringIO(source).readline)
        return len({row for tok in tokens if tok.type not in skipped for row in range(tok.start[0], tok.end[0] + 1)})
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return sum(1 for line in source.splitlines() if line.strip() and not line.strip().startswith("#"))

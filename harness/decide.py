"""The harness's verdict on one run: the best it is judged against, the caught cases (ways a number can be
bought outside the rules), and the decision: keep, rerun, discard or crash.

    best = best_of(runs, run)                 # the run the branch stands on, or None
    run.caught = caught(run, best, runs)      # [Caught]: each case a pure function of (run, best's runs)
    decision = decide(run, runs)              # the first rule of RULES that applies

val_bpb on a fixed time budget is a draw, so a code is judged by the mean of its runs against the mean of the
best code's runs (never the best's luckiest draw), beyond the noise band of that difference. tests/bench.py
simulates nights of experiments through decide() to show what these rules cost and buy.
"""
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from harness.record import Caught, Decision, code_size, number, train_py_at
from harness.stats import NOISE_SIGMAS, as_of, code_runs, comparable, difference_band, machine, noise

# The caught cases: fixed names (analysis.md, audit and the tests use them), and their limits
TRAINED_ON_VAL = "trained on validation data"
NOT_THE_MODELS = "val_bpb reported by train.py is not the model's"
SLOWED_CLOCK = "slowed clock"
UNTIMED_WORK = "untimed work outside the loop"
SEES_AHEAD = "the model sees later tokens"

LEAK_ABS, LEAK_REL = 0.01, 0.02              # held-out gap grown beyond the best's by max(0.01, 2% of val_bpb)
LEAK_ALONE_ABS, LEAK_ALONE_REL = 0.05, 0.05  # no best: the gap itself beyond 0.05 + 5% of val_bpb
REPORTED_TOLERANCE = 1e-3                    # |train.py's val_bpb - the measured one| beyond this
FUTURE_TOLERANCE = 1e-2                      # logits that move by more when only later tokens change: not causal
CLOCK_SLACK_S, CLOCK_SLACK_REL = 5.0, 0.05   # the harness's clock beyond train.py's timings by 5 s + 5%
OUTSIDE_SLACK_S, OUTSIDE_SLACK_BUDGET = 5.0, 0.10   # outside time beyond the best's by 5 s + 10% of the budget
LOOP_TIMINGS = ("warmup_s", "eval_s", "final_eval_s")  # train.py's timings after its first row; startup_s before it


@dataclass(frozen=True)
class Rules:
    """The decision's knobs: decide() uses the defaults, tests/bench.py shows what others cost and buy."""
    sigmas: float = NOISE_SIGMAS  # keep or discard beyond ±sigmas std of the difference of means
    promising: float = 1.0        # inside the band, rerun while lower by more than this many std of the difference
    enough: int = 6               # runs of a change after which its mean is decided on, whatever the machine did
    repeats: int = 3              # runs of the best's code (comments aside) that measure the noise band


# The best
def best_of(runs, run):
    """The ONE best rule: the latest kept run comparable with `run`, of its worker on its branch, archived before it
    (another branch's keep is another experiment's). Runs without branch or worker (older archives) are everyone's."""
    pool = [r for r in comparable(runs, run) if r.status == "keep" and r.archived_at < run.archived_at
            and r.id != run.id and (not run.branch or r.branch in (run.branch, None))
            and (not r.worker or r.worker == run.worker)]
    return max(pool, key=lambda r: r.archived_at, default=None)


# The caught cases: pure functions of (run, best, runs)
def best_code_runs(runs, run, best):
    """The best code's runs that `run` is checked against (comparable, archived before it, itself left out)."""
    return [r for r in code_runs(comparable(as_of(runs, run), run), best.code_sha) if r.id != run.id] if best else []


def caught(run, best, runs):
    """[Caught] of a measured run against `best` (None before there is one) and the history `runs`."""
    if run.measured is None or run.measured.val_bpb is None:
        return []
    ref = best_code_runs(runs, run, best)
    return [Caught(name, detail) for name, check in CHECKS if (detail := check(run, ref))]


def trained_on_val(run, ref):
    """Better on the validation rows than on unseen text of their kind, beyond the best's gap: it has seen them."""
    val, heldout = run.measured.val_bpb, run.measured.heldout_bpb
    if heldout is None:
        return None
    gap, said = heldout - val, f"held-out bpb {heldout:.4f} minus val_bpb {val:.4f} is {heldout - val:+.4f}"
    gaps = [r.measured.heldout_bpb - r.val_bpb for r in ref if r.measured and r.measured.heldout_bpb is not None]
    if gaps:
        limit, usual = max(LEAK_ABS, LEAK_REL * val), float(np.mean(gaps))
        if gap - usual > limit:
            return f"{said}, {gap - usual:+.4f} beyond the best's {usual:+.4f} (limit {limit:.4f})"
    elif gap > (limit := LEAK_ALONE_ABS + LEAK_ALONE_REL * val):
        return f"{said}, beyond {limit:.4f} (no best to compare with)"


def not_the_models(run, ref):
    """train.py printed a val_bpb (it should print none under the harness) that is not its model's score."""
    reported, val = run.trained.reported_val_bpb, run.measured.val_bpb
    if reported is not None and abs(reported - val) > REPORTED_TOLERANCE:
        return (f"train.py printed val_bpb {reported:.6f}, the harness measured {val:.6f} "
                f"({reported - val:+.6f}, tolerance {REPORTED_TOLERANCE:g})")


def slowed_clock(run, ref):
    """The process took longer on the harness's clock than train.py's own timings of it say: from its first
    metrics row to its exit, or from its spawn to its exit (a slowed clock slows the first row too)."""
    m, train = run.measured, run.trained.training_seconds
    if m.wall_s is None or train is None:
        return None
    loop = train + claimed(run, LOOP_TIMINGS)
    spans = (("from the first metrics row to the exit", None if m.first_row_s is None else m.wall_s - m.first_row_s,
              loop), ("from the spawn to the exit", m.wall_s, loop + claimed(run, ("startup_s",))))
    for span, took, said in spans:
        limit = said * (1 + CLOCK_SLACK_REL) + CLOCK_SLACK_S
        if took is not None and took > limit:
            return (f"{took:.1f} s {span} on the harness's clock, but train.py's timings of it add up to "
                    f"{said:.1f} s (limit {limit:.1f} s)")


def claimed(run, keys):
    """The seconds train.py's own timings give for `keys` (a missing or broken one counts 0)."""
    return sum(number(run.trained.timings.get(k)) or 0.0 for k in keys)


def untimed_work(run, ref):
    """More work outside the budget than the best code's runs did, in what a busy machine cannot inflate: the CPU
    seconds before the first metrics row and after the hand-off, plus the loop's timings (slowed_clock checks them)."""
    def work(r):
        cpu = r.measured.outside_cpu_s if r.measured else None
        return None if cpu is None else cpu + claimed(r, LOOP_TIMINGS)

    mine, refs = work(run), [w for w in map(work, ref) if w is not None]
    if mine is None or not refs:
        return None
    budget = float(run.harness.get("TIME_BUDGET") or run.trained.training_seconds)
    limit = max(refs) + OUTSIDE_SLACK_S + OUTSIDE_SLACK_BUDGET * budget
    if mine > limit:
        return (f"{mine:.1f} s of work outside the {budget:g} s budget (CPU seconds before the first metrics row "
                f"and after the hand-off, plus the loop's timings), against the best code's {max(refs):.1f} s "
                f"(limit {limit:.1f} s)")


def sees_ahead(run, ref):
    """Logits moved when only later tokens changed: the model is not causal (harness/evaluate.py's future_leak)."""
    leak = run.measured.future_leak
    if leak is not None and leak > FUTURE_TOLERANCE:
        return f"changing later tokens moved earlier logits by up to {leak:.3g} (tolerance {FUTURE_TOLERANCE:g})"


CHECKS = ((TRAINED_ON_VAL, trained_on_val), (NOT_THE_MODELS, not_the_models), (SLOWED_CLOCK, slowed_clock),
          (UNTIMED_WORK, untimed_work), (SEES_AHEAD, sees_ahead))


# Where a run stands against the best
def interrupted(run):
    return run.trained.outcome == "interrupted" or (run.measured is not None and run.measured.stopped == "interrupted")


class Standing:
    """Everything a decision reads: `own` and `ref` are every comparable run of this code and of the best's, `sd`
    the std of the difference of their means, `peeked` this code's runs stopped unmeasured once their curve showed."""

    def __init__(self, run, history, rules, size):
        self.run, self.rules, self.size = run, rules, size  # size: commit -> tokens of code of its train.py
        self.best = best_of(history, run)
        pool = comparable(history, run)
        self.own = code_runs(pool, run.code_sha)
        self.ref = code_runs(pool, self.best.code_sha) if self.best else []
        self.machine = machine(run, self.ref)
        self.delta = (float(np.mean([r.val_bpb for r in self.own]) - np.mean([r.val_bpb for r in self.ref]))
                      if self.own and self.ref else None)
        std = noise(history, run).pooled_std
        self.band, self.sd = (difference_band(std, len(self.own), len(self.ref), k) for k in (rules.sigmas, 1.0))
        self.peeked = [r for r in history if r.code_sha == run.code_sha and interrupted(r) and r.val_bpb is None
                       and r.measured is not None and r.measured.first_row_s is not None]


# The rules, in order: the first that applies decides
def did_not_finish(s):
    if s.run.val_bpb is None and interrupted(s.run):
        return "rerun", "the run was interrupted before its number was measured"
    if s.run.val_bpb is None:
        m, outcome = s.run.measured, s.run.trained.outcome
        why = (m.error if m and m.error else f"outcome {outcome}" if outcome != "ok" else "no val_bpb was measured")
        return "crash", f"the run did not finish ({why})"


def was_caught(s):
    if s.run.caught:
        return "discard", "caught: " + "; ".join(c.case for c in s.run.caught)
    if s.run.status == "invalid":
        return "discard", "invalid: its harness is not the branch's pinned one"


def is_baseline(s):
    if s.best is None:
        return "keep", "nothing kept yet: this run is the baseline"


def repeats_best(s):
    if s.run.code_sha == s.best.code_sha:
        if len(s.own) < s.rules.repeats:
            return "rerun", (f"the best's code (comments aside), run {len(s.own)} of {s.rules.repeats}: "
                             "measuring the noise band")
        return "discard", "a repeat of the best's code (comments aside)"


def too_soon(s):
    if s.band is None:
        return "rerun", "no noise band yet: no code has two runs, and a rerun of this one measures it"
    if (why := s.machine.moved()) and len(s.own) < s.rules.enough:
        return "rerun", f"{why}, so val_bpb measures the machine as much as the code"


def beyond_band(s):
    if s.delta < -s.band:
        return keep_unless_peeked(s, "lower beyond the noise band")
    if s.delta > s.band:
        return "discard", "higher beyond the noise band"


def simpler(s):
    mine, best = s.size(s.run.commit), s.size(s.best.commit)
    if None not in (mine, best) and mine < best:
        return keep_unless_peeked(s, f"simpler at equal val_bpb: {mine} code tokens where the best's train.py "
                                     f"has {best}")


def keep_unless_peeked(s, reason):
    if s.peeked:
        return "discard", (f"{reason}, but {len(s.peeked)} of this code's runs were interrupted after their curve "
                           "was visible: a code is not kept on the runs that were let finish")
    return "keep", reason


def inside_band(s):
    if s.delta < -s.rules.promising * s.sd and len(s.own) < s.rules.enough:
        return "rerun", (f"lower but inside the noise band, on {len(s.own)} run(s): another run of this code "
                         "firms up its mean")
    return "discard", "inside the noise band: no better than the best"


RULES = (did_not_finish, was_caught, is_baseline, repeats_best, too_soon, beyond_band, simpler, inside_band)


@lru_cache(maxsize=256)
def size_at(commit):
    """Tokens of code of train.py at `commit` (record.code_size: `;` joins remove none), or None."""
    source = train_py_at(commit)
    return None if source is None else code_size(source)


def decide(run, runs, rules=Rules(), size=size_at):
    """The Decision of the first rule of RULES that applies to `run`, against best_of(runs, run), on the runs
    archived up to it. A run decided although its machine moved (its code has enough runs) says so."""
    s = Standing(run, as_of(runs, run), rules, size)
    index, (kind, reason) = next((i, found) for i, rule in enumerate(RULES) if (found := rule(s)))
    if index > RULES.index(too_soon) and (why := s.machine.moved()):
        reason += f" (decided on the means of this code's {len(s.own)} runs, although {why})"
    return Decision(kind, reason, s.delta, s.band, len(s.own), len(s.ref), s.best.id if s.best else None)


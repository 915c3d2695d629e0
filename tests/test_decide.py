"""The harness's verdict as pure functions over typed Runs: the best rule, each caught case at both sides of
its limit, each rule of the decision table in the order it applies, and the odds of a night (tests/bench.py)."""
import numpy as np
import pytest

from harness.decide import (NOT_THE_MODELS, SEES_AHEAD, SLOWED_CLOCK, TRAINED_ON_VAL, UNTIMED_WORK, Rules, best_of,
                            caught, decide)
from harness.record import Caught
from harness.stats import NOISE_SIGMAS
from tests.bench import simulate
from tests.factory import history, make_run

pytestmark = pytest.mark.quick

MEAN = np.mean([1.000, 1.004, 0.998])  # the best's code run three times (with_band)
BAND = NOISE_SIGMAS * np.std([1.000, 1.004, 0.998], ddof=1) * np.sqrt(1 + 1 / 3)  # one run against those three
REPEATS, ENOUGH = Rules().repeats, Rules().enough


def with_band(**overrides):
    """The best kept at 1.000 and two repeats of its code: a noise band from three runs."""
    return history(1.000, 1.004, 0.998, **overrides)


def decided(runs, size=lambda commit: None):
    return decide(runs[-1], runs, size=size)


def idea(runs, bpb, **overrides):
    runs.append(make_run(bpb, code_sha="idea", **overrides))
    return runs


# The best
def test_the_best_is_the_latest_kept_comparable_run_of_the_workers_branch_archived_before():
    kept, later_kept = make_run(status="keep"), make_run(status="keep")
    others = [make_run(status="keep", branch="autoresearch/other"), make_run(status="keep", worker="w2"),
              make_run(status="keep", gpu="NVIDIA H100"), make_run(status="pending")]
    older, run = make_run(status="keep", branch=None, worker=""), make_run()
    assert best_of([kept, later_kept] + others + [run], run) is later_kept
    assert best_of([kept, later_kept, run], later_kept) is kept, "only runs archived before it"
    assert best_of(others + [run], run) is None
    assert best_of([older, run], run) is older, "runs of older archives, without branch or worker, are everyone's"


# The caught cases, each at both sides of its limit
@pytest.mark.parametrize("best, overrides, found", [
    # the best's held-out gap is 0.04: trained on val beyond it by max(0.01, 2% of val_bpb)
    (True, {"heldout_bpb": 1.061}, [TRAINED_ON_VAL]), (True, {"heldout_bpb": 1.059}, []),
    # with no best, the gap itself beyond 0.05 + 5% of val_bpb
    (False, {"heldout_bpb": 1.101}, [TRAINED_ON_VAL]), (False, {"heldout_bpb": 1.099}, []),
    (True, {"reported_val_bpb": 1.0011}, [NOT_THE_MODELS]), (True, {"reported_val_bpb": 1.0009}, []),
    (True, {"future_leak": 0.011}, [SEES_AHEAD]), (True, {"future_leak": 0.009}, []),
    # train.py's timings: 60 + 3 + 1 s after its first row (limit 64 x 1.05 + 5 = 72.2 s), 68 s from the spawn (76.4 s)
    (True, {"wall_s": 76.3}, [SLOWED_CLOCK]), (True, {"wall_s": 76.1}, []),
    (True, {"wall_s": 76.5, "first_row_s": None}, [SLOWED_CLOCK]), (True, {"wall_s": 76.3, "first_row_s": None}, []),
    # work outside: the best's 4 CPU s + 3 s curve + 1 s hand-off, limit 8 + 5 + 10% of 60 = 19 s, at any probed speed
    (True, {"outside_cpu_s": 15.1}, [UNTIMED_WORK]), (True, {"outside_cpu_s": 14.9}, []),
    (True, {"outside_cpu_s": 4.0, "speed": 125.0}, []), (True, {"outside_cpu_s": 15.1, "speed": 5.0}, [UNTIMED_WORK])])
def test_each_caught_case_is_found_just_beyond_its_limit_and_not_just_inside_it(best, overrides, found):
    runs = (with_band() if best else []) + [make_run(1.0, **overrides)]
    got = caught(runs[-1], best_of(runs, runs[-1]), runs)
    assert [c.case for c in got] == found, got


# The rules, in order
@pytest.mark.parametrize("runs, kind, reason", [
    (idea(with_band(), None, outcome="crash"), "crash", "the run did not finish (outcome crash)"),
    (idea(with_band(), None, outcome="diverged"), "crash", "the run did not finish (outcome diverged)"),
    (idea(with_band(), None, outcome="timeout"), "crash", "the run did not finish (outcome timeout)"),
    (idea(with_band(), None, measured=None, outcome="crash"), "crash", "the run did not finish (outcome crash)"),
    (idea(with_band(), None, outcome="interrupted"), "rerun", "the run was interrupted before"),
    (idea(with_band(), None, measured=None, outcome="interrupted"), "rerun", "the run was interrupted before"),
    (idea(with_band(), 0.5, status="invalid", caught=[Caught(TRAINED_ON_VAL, ""), Caught(SLOWED_CLOCK, "")]),
     "discard", f"caught: {TRAINED_ON_VAL}; {SLOWED_CLOCK}"),  # however low its val_bpb
    (idea(with_band(), 0.5, status="invalid"), "discard", "invalid: its harness"),
    ([make_run(0.9), make_run(1.0, code_sha="idea")], "keep", "nothing kept yet"),  # the first run is the baseline
    (idea([make_run(1.0, status="keep")], 0.9), "rerun", "no noise band yet")])
def test_the_first_rules_in_order_an_unfinished_run_a_caught_one_the_baseline_and_no_band_yet(runs, kind, reason):
    d = decided(runs)
    assert d.kind == kind and d.reason.startswith(reason), d


def test_a_repeat_of_the_best_is_rerun_until_it_measured_the_band_then_discarded_whatever_its_val_bpb():
    runs = [make_run(1.0, status="keep")]
    for n in range(2, REPEATS + 2):
        runs.append(make_run(0.5, commit=f"{n:040x}"))  # comments only: another commit, the same code_sha
        d = decided(runs)
        assert d.kind == ("rerun" if n < REPEATS else "discard"), (n, d)
        assert "the best's code (comments aside)" in d.reason, d
        runs[-1].statuses[-1].status = "discard"


@pytest.mark.parametrize("delta, kind, reason", [
    (-BAND - 1e-4, "keep", "lower beyond"), (BAND + 1e-4, "discard", "higher beyond"),
    (-BAND + 1e-4, "rerun", "lower but inside"), (-0.0017, "discard", "inside"), (BAND - 1e-4, "discard", "inside")])
def test_one_run_beyond_the_band_is_decided_and_inside_it_rerun_only_when_lower_by_a_std_of_the_difference(
        delta, kind, reason):
    """Lower by less than one std of the difference (0.0035 here), a rerun could not make it a keep."""
    d = decided(idea(with_band(), MEAN + delta))
    assert (d.kind, d.n, d.m) == (kind, 1, 3) and d.reason.startswith(reason), d
    assert d.delta == pytest.approx(delta) and d.band == pytest.approx(BAND)


def test_the_bests_number_is_the_mean_of_every_run_of_its_code_its_fast_lucky_run_too():
    runs = with_band() + [make_run(0.990, status="discard", speed=40.0)]
    d = decided(idea(runs, 0.995))
    assert d.m == 4 and d.delta == pytest.approx(0.995 - np.mean([1.000, 1.004, 0.998, 0.990]))


def test_inside_the_band_a_simpler_train_py_counted_in_tokens_is_kept():
    runs = idea(with_band(), 1.003)
    d = decided(runs, {runs[0].commit: 120, runs[-1].commit: 119}.get)
    assert (d.kind, d.reason) == ("keep", "simpler at equal val_bpb: 119 code tokens where the best's train.py has 120")
    assert decided(runs, {runs[0].commit: 120, runs[-1].commit: 120}.get).kind == "discard"


@pytest.mark.parametrize("bpb, overrides, kind", [(None, {}, "discard"),
                                                  (None, {"first_row_s": None}, "keep"),  # stopped before training
                                                  (0.95, {}, "keep")])  # its handed-off model was measured
def test_a_code_whose_runs_were_interrupted_after_their_curve_was_visible_is_not_kept(bpb, overrides, kind):
    runs = idea(with_band(), bpb, outcome="interrupted", stopped="interrupted", **overrides)
    d = decided(idea(runs, 0.95))
    assert d.kind == kind and (kind == "keep" or "interrupted after their curve was visible" in d.reason), d


@pytest.mark.parametrize("bpbs, speed, rerun_reason, final", [
    ((0.950, 0.951), 40.0, "the machine ran 60% faster", ("keep", "lower beyond the noise band (decided on the means "
                                                         f"of this code's {ENOUGH} runs, although the machine ran")),
    ((0.994, 0.998), 25.0, "lower but inside the noise band, on {n} run(s)", ("discard", "inside the noise band"))])
def test_a_code_is_rerun_while_its_machine_moved_or_while_lower_inside_the_band_until_it_has_enough_runs(
        bpbs, speed, rerun_reason, final):
    runs = with_band()  # the best's three runs at 25 GFLOP/s
    decisions = [decided(idea(runs, bpbs[i % 2], speed=speed)) for i in range(ENOUGH)]
    assert [(d.kind, d.n) for d in decisions] == [("rerun", n) for n in range(1, ENOUGH)] + [(final[0], ENOUGH)]
    assert all(d.reason.startswith(rerun_reason.format(n=d.n)) for d in decisions[:-1]), decisions
    assert decisions[-1].m == 3 and decisions[-1].reason.startswith(final[1]), decisions[-1]


# The odds of a night, simulated through decide() (tests/bench.py prints them with more trials)
def test_a_night_of_no_ops_is_rarely_kept_and_a_change_three_sigma_better_usually_is():
    night = simulate(effect=0.0, experiments=20, trials=10, seed=1)
    assert night["p_kept"] < 0.02 and 1.0 <= night["runs_per_experiment"] < 2.0, night
    better = simulate(effect=3.0, experiments=1, trials=100, seed=2)
    assert better["p_kept"] >= 0.65 and better["best_below"] < 1.0, better

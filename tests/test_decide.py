"""The harness's verdict as pure functions over typed Runs: the best rule, each caught case at both sides of
its limit, each rule of the decision table in the order it applies, and the simulated night's odds."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: harness, tests.factory
from harness.decide import (BEST_REPEATS,  # noqa: E402
                            ENOUGH_RUNS, NOT_THE_MODELS, SEES_AHEAD, SLOWED_CLOCK, TRAINED_ON_VAL,
                            UNTIMED_WORK, Rules, best_of, caught, decide, simulate)
from harness.record import Caught  # noqa: E402
from harness.stats import NOISE_SIGMAS  # noqa: E402
from tests.factory import history, make_run  # noqa: E402

pytestmark = pytest.mark.quick

STD = np.std([1.000, 1.004, 0.998], ddof=1)  # the best's code run three times (with_band)


def with_band(**overrides):
    """The best kept at 1.000 and two repeats of its code: a noise band from three runs."""
    return history(1.000, 1.004, 0.998, **overrides)


def band(n, m=3):
    return NOISE_SIGMAS * STD * np.sqrt(1 / n + 1 / m)


def decided(runs, size=lambda commit: None, **rules):
    return decide(runs[-1], runs, Rules(**rules), size)


def idea(runs, bpb, **overrides):
    runs.append(make_run(bpb, code_sha="idea", **overrides))
    return runs


# ---------------------------------------------------------------------------
# The best

def test_the_best_is_the_latest_kept_comparable_run_of_the_workers_branch_archived_before():
    kept = make_run(status="keep")
    later_kept = make_run(status="keep")
    others = [make_run(status="keep", branch="autoresearch/other"), make_run(status="keep", worker="w2"),
              make_run(status="keep", gpu="NVIDIA H100"), make_run(status="keep", harness={"profile": "gpu"}),
              make_run(status="pending"), make_run(status="keep", val_bpb=None)]
    older = make_run(status="keep", branch=None, worker="")
    run = make_run()
    assert best_of([kept, later_kept] + others + [run], run) is later_kept
    assert best_of([kept, later_kept, run], later_kept) is kept, "only runs archived before it"
    assert best_of(others + [run], run) is None
    assert best_of([older, run], run) is older, "runs of older archives, without branch or worker, are everyone's"


# ---------------------------------------------------------------------------
# The caught cases, each at both sides of its limit

def cases(run, runs):
    return [c.case for c in caught(run, best_of(runs, run), runs)]


@pytest.mark.parametrize("grown, found", [(0.021, True), (0.019, False)])
def test_trained_on_val_when_the_held_out_gap_grew_beyond_the_bests(grown, found):
    runs = with_band()
    runs.append(make_run(1.0, heldout_bpb=1.04 + grown))  # the best's gap is 0.04; the limit max(0.01, 2% of 1.0)
    assert (cases(runs[-1], runs) == [TRAINED_ON_VAL]) == found
    alone = make_run(1.0, heldout_bpb=1.0 + 0.1 + grown - 0.02)  # no best: 0.05 + 5% of val_bpb
    assert (cases(alone, [alone]) == [TRAINED_ON_VAL]) == found


@pytest.mark.parametrize("reported, found", [(1.0011, True), (1.0009, False), (None, False)])
def test_a_printed_val_bpb_that_is_not_the_models(reported, found):
    run = make_run(1.0, reported_val_bpb=reported)
    assert (cases(run, [run]) == [NOT_THE_MODELS]) == found


@pytest.mark.parametrize("wall, first_row, found", [(76.3, 4.0, True), (76.1, 4.0, False), (76.5, None, True),
                                                    (76.3, None, False)])
def test_a_slowed_clock_against_train_pys_own_timings(wall, first_row, found):
    """train.py says 60 s of training + 3 s of curve + 1 s of hand-off after its first row (limit 64 x 1.05 + 5
    = 72.2 s), and 4 s of start-up before it (limit 76.4 s)."""
    run = make_run(1.0, wall_s=wall, first_row_s=first_row)
    assert (cases(run, with_band() + [run]) == [SLOWED_CLOCK]) == found


def work_outside(seconds, speed=25.0):
    """A run that spent `seconds` outside its 60 s of training, all of it in a start-up its timings own to."""
    startup = seconds - 4.0
    return make_run(1.0, outside_s=seconds, first_row_s=startup, speed=speed,
                    timings={"startup_s": startup, "warmup_s": 0.0, "eval_s": 3.0, "final_eval_s": 1.0})


@pytest.mark.parametrize("outside, speed, found", [(19.1, 25.0, True), (18.9, 25.0, False), (19.1, 12.5, False),
                                                   (38.5, 12.5, True)])
def test_untimed_work_beyond_the_bests_outside_time_at_the_bests_machine_speed(outside, speed, found):
    """The best's runs spent 8 s outside the budget: the limit is 8 + 5 s + 10% of 60 s = 19 s, its seconds
    scaled by the machine's speed, so a slower machine is no excuse and no false alarm."""
    runs = with_band() + [work_outside(outside, speed)]
    assert (cases(runs[-1], runs) == [UNTIMED_WORK]) == found, caught(runs[-1], runs[0], runs)


@pytest.mark.parametrize("leak, found", [(0.011, True), (0.009, False)])
def test_a_model_that_sees_later_tokens(leak, found):
    run = make_run(1.0, future_leak=leak)
    assert (cases(run, [run]) == [SEES_AHEAD]) == found


# ---------------------------------------------------------------------------
# The rules, in order

@pytest.mark.parametrize("outcome", ["crash", "diverged", "timeout"])
def test_a_run_that_did_not_finish_is_a_crash(outcome):
    d = decided(idea(with_band(), None, outcome=outcome))
    assert (d.kind, d.reason, d.n) == ("crash", f"the run did not finish (outcome {outcome})", 0), d
    assert decided(idea(with_band(), None, measured=None, outcome=outcome)).kind == "crash"


def test_an_interrupted_run_is_rerun():
    d = decided(idea(with_band(), None, outcome="interrupted"))
    assert (d.kind, d.reason) == ("rerun", "the run was interrupted before its number was measured")


def test_a_caught_run_is_discarded_naming_the_cases_however_low_its_val_bpb():
    runs = idea(with_band(), 0.5, status="invalid", caught=[Caught(TRAINED_ON_VAL, "x"), Caught(SLOWED_CLOCK, "y")])
    assert (decided(runs).kind, decided(runs).reason) == ("discard", f"caught: {TRAINED_ON_VAL}; {SLOWED_CLOCK}")
    runs = idea(with_band(), 0.5, status="invalid")
    assert decided(runs).kind == "discard" and "harness" in decided(runs).reason


def test_the_first_run_is_the_baseline_and_an_undecided_run_before_it_sets_no_bar():
    runs = [make_run(0.9), make_run(1.0, code_sha="idea")]
    d = decided(runs)
    assert (d.kind, d.best_id) == ("keep", None) and d.line().endswith("nothing kept yet: this run is the baseline")


def test_a_repeat_of_the_best_is_rerun_until_it_measured_the_band_then_discarded_whatever_its_val_bpb():
    runs = [make_run(1.0, status="keep")]
    for n in range(2, BEST_REPEATS + 2):
        runs.append(make_run(0.5, commit=f"{n:040x}"))  # comments only: another commit, the same code_sha
        d = decided(runs)
        expected = "rerun" if n < BEST_REPEATS else "discard"
        assert d.kind == expected and "the best's code (comments aside)" in d.reason, (n, d)
        runs[-1].statuses[-1].status = "discard"


def test_a_change_without_a_noise_band_is_rerun():
    runs = idea([make_run(1.0, status="keep")], 0.9)
    d = decided(runs)
    assert d.kind == "rerun" and d.reason.startswith("no noise band yet") and d.band is None, d


@pytest.mark.parametrize("speed, kind", [(27.4, "keep"), (27.6, "rerun"), (22.4, "rerun")])
def test_a_machine_off_the_bests_runs_by_more_than_a_tenth_is_rerun(speed, kind):
    d = decided(idea(with_band(), 0.98, speed=speed))
    assert d.kind == kind and (kind == "keep" or d.reason.startswith("the machine ran")), d


def test_with_enough_runs_a_code_is_decided_on_its_means_and_says_the_machine_moved():
    runs = with_band()
    for i in range(ENOUGH_RUNS):
        idea(runs, 0.95 + 0.001 * i, speed=40.0)
    d = decided(runs)
    assert (d.kind, d.n, d.m) == ("keep", ENOUGH_RUNS, 3), d
    assert d.reason.startswith(f"lower beyond the noise band (decided on the means of this code's {ENOUGH_RUNS} runs, "
                               "although the machine ran 60% faster"), d.reason


@pytest.mark.parametrize("side, kind, reason", [(-1, "keep", "lower beyond the noise band"),
                                                (+1, "discard", "higher beyond the noise band")])
def test_beyond_the_band_lower_is_kept_and_higher_discarded(side, kind, reason):
    mean = np.mean([1.000, 1.004, 0.998])
    d = decided(idea(with_band(), mean + side * (band(1) + 1e-4)))
    assert (d.kind, d.reason, d.n, d.m) == (kind, reason, 1, 3), d
    assert d.delta == pytest.approx(side * (band(1) + 1e-4)) and d.band == pytest.approx(band(1))
    assert decided(idea(with_band(), mean + side * (band(1) - 1e-4))).kind in ("rerun", "discard")


def test_the_bests_number_is_the_mean_of_every_run_of_its_code_its_fast_lucky_run_too():
    runs = with_band() + [make_run(0.990, status="discard", speed=40.0)]
    d = decided(idea(runs, 0.995))
    assert d.m == 4 and d.delta == pytest.approx(0.995 - np.mean([1.000, 1.004, 0.998, 0.990]))


def test_inside_the_band_a_simpler_train_py_counted_in_tokens_is_kept():
    runs = idea(with_band(), 1.003)
    tokens = {runs[0].commit: 120, runs[-1].commit: 119}
    assert decided(runs, tokens.get).reason == \
        "simpler at equal val_bpb: 119 code tokens where the best's train.py has 120"
    assert decided(runs, {runs[0].commit: 120, runs[-1].commit: 120}.get).kind == "discard"


def test_a_code_whose_runs_were_interrupted_after_their_curve_was_visible_is_not_kept():
    runs = idea(with_band(), None, outcome="interrupted", stopped="interrupted")
    d = decided(idea(runs, 0.95))
    assert d.kind == "discard" and "interrupted after their curve was visible" in d.reason, d
    runs = idea(with_band(), None, outcome="interrupted", first_row_s=None)  # stopped before training: no peek
    assert decided(idea(runs, 0.95)).kind == "keep"
    runs = idea(with_band(), 0.95, outcome="interrupted", stopped="interrupted")  # its handed-off model was measured
    assert decided(idea(runs, 0.95)).kind == "keep"


def test_a_lower_mean_inside_the_band_is_rerun_until_the_code_has_enough_runs_then_discarded():
    runs = with_band()
    while len(runs) < 3 + ENOUGH_RUNS:
        d = decided(idea(runs, (0.994, 0.998)[(len(runs) + 1) % 2]))
        assert len(runs) == 3 + ENOUGH_RUNS or d.reason.startswith("lower but inside the noise band"), d
    assert (decided(runs).kind, decided(runs).n) == ("discard", ENOUGH_RUNS)


def test_a_mean_barely_lower_or_higher_is_discarded_on_one_run():
    """A single run settles it when it is not lower by a std of the difference: a rerun could not make it a keep."""
    for bpb in (0.999, 1.003):
        d = decided(idea(with_band(), bpb))
        assert (d.kind, d.reason) == ("discard", "inside the noise band: no better than the best"), d


# ---------------------------------------------------------------------------
# The odds of a night (tests/bench.py prints them with more trials)

def test_a_night_of_no_ops_is_rarely_kept_and_a_change_three_sigma_better_usually_is():
    night = simulate(effect=0.0, experiments=20, trials=10, seed=1)
    assert night["p_kept"] < 0.02 and 1.0 <= night["runs_per_experiment"] < 2.0, night
    better = simulate(effect=3.0, experiments=1, trials=100, seed=2)
    assert better["p_kept"] >= 0.65 and better["best_below"] < 1.0, better

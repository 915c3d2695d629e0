"""The figures of harness/stats.py on planted runs and curves: each figure is found with its number, and a
difference inside the spread of the best's own repeats is called noise."""
import numpy as np
import pytest

from harness.stats import (NOISE_SIGMAS, STEPS_DRIFT, as_of, comparable, compare_curves, difference_band,
                           equal_step_spread, equal_steps, last_tenth_trend, loss_spikes, machine, noise, read_metrics,
                           steps_vs, throughput_stats)
from tests.factory import history, make_metrics, make_run

pytestmark = pytest.mark.quick


def test_read_metrics_skips_bad_lines_and_names_a_half_written_last_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert read_metrics(path) == (None, [f"{path} is missing: no training curves for this run"])
    path.write_text('{"step": 1, "train/loss": 3.0}\nnot json\n{"step": 0, "train/loss": 4.0}\n{"step": 2, "tr')
    m, notes = read_metrics(path)
    assert [list(x) for x in m.series("train/loss")[1:]] == [[0, 1], [4.0, 3.0]]
    assert notes == [f"{path}: the last line (line 4) is half-written (stopped mid-write): skipped",
                     f"{path}: 1 unreadable line(s) skipped (lines 2)"], notes


def test_comparable_runs_share_harness_and_device_and_finished_valid():
    run = make_run()
    others = [make_run(), make_run(status="invalid"), make_run(status="crash"), make_run(None),
              make_run(gpu="NVIDIA H100"), make_run(harness={"profile": "cpu", "TIME_BUDGET": 30})]
    assert comparable(others, run) == others[:1]


def test_the_noise_band_pools_every_repeat_of_each_code_up_to_the_run():
    base = history(1.000, 1.004, 0.998)
    idea = history(0.990, 0.994, code_sha="idea", first="pending")
    later = make_run(0.500)  # archived after the run: not known when it was decided
    n = noise(base + idea + [later], idea[-1])
    squares = sum(((np.array(g) - np.mean(g)) ** 2).sum() for g in ([1.000, 1.004, 0.998], [0.990, 0.994]))
    assert n.dof == 3 and n.runs == 5 and n.pooled_std == pytest.approx(np.sqrt(squares / 3))
    assert n.band == pytest.approx(NOISE_SIGMAS * n.pooled_std * np.sqrt(2))
    assert difference_band(0.01, 4, 4) == pytest.approx(difference_band(0.01, 1, 1) / 2), "means of 4 runs: half"
    assert noise(base[:1], base[0]).band is None, "one run has no noise band"
    assert as_of(base + [later], base[1]) == base[:2]
    faster = history(1.000, 1.004) + [make_run(0.950, speed=40.0)]  # a run on a moved machine counts as any other
    assert noise(faster, faster[-1]).pooled_std == pytest.approx(np.std([1.000, 1.004, 0.950], ddof=1))


@pytest.mark.parametrize("run, moved", [
    ({"speed": 27.4}, None), ({"speed": 22.6}, None),  # within a tenth of the best's median speed
    ({"speed": 28.0}, "the machine ran 12% faster"), ({"speed": 22.0}, "the machine ran 12% slower"),
    ({"speed_before": 22.4, "speed_after": 27.6}, None),  # the probes under a quarter apart
    ({"speed_before": 22.0, "speed_after": 27.6}, "the machine's speed changed by +25% during the run's evaluation"),
])
def test_the_machine_moved_beyond_a_tenth_of_the_bests_median_speed_or_by_a_quarter_during_the_run(run, moved):
    said = machine(make_run(**run), history(1.0, 1.0, 1.0, speed=25.0)).moved()
    assert said is None if moved is None else said.startswith(moved), said


def test_a_drift_within_the_spread_of_the_bests_own_speeds_is_no_move():
    best = [make_run(speed=s) for s in (20.0, 25.0, 28.0)]
    m = machine(make_run(speed=31.0), best)
    assert m.spread == pytest.approx(8 / 25) and m.drift == pytest.approx(0.24) and m.moved() is None
    assert machine(best[0], best).runs == 2, "a run is never its own reference"


def test_the_step_count_against_the_best_with_the_spread_of_its_repeats():
    best = [make_run(steps=n) for n in (30, 31, 29)]
    assert steps_vs(make_run(steps=31), best).beyond is False, "one step more is within the best's own spread"
    fewer = steps_vs(make_run(steps=24), best)
    assert fewer.change == pytest.approx(-0.2) and fewer.spread == pytest.approx(2 / 30) and fewer.beyond
    assert steps_vs(make_run(steps=24), best[:1]).beyond is False, "no spread from one run: no cause"


@pytest.mark.parametrize("steps, beyond", [(985, False), (1015, False), (1020, False), (970, True), (1030, True)])
def test_reruns_a_step_or_two_percent_apart_are_noise_however_tight_the_bests_repeats(steps, beyond):
    best = history(1.0, 1.0, 1.0, steps=1000)
    best[1].trained.num_steps = 1001  # three repeats within 0.1% of each other: a spread far under reruns' noise
    s = steps_vs(make_run(steps=steps, code_sha="base"), best)
    assert s.beyond is beyond, f"{steps} steps vs {s.usual:.0f}: {s.change:+.2%}, the best's spread {s.spread:.2%}"
    assert s.spread == pytest.approx(1 / 1000.33, rel=1e-3) and s.limit == STEPS_DRIFT, s


def test_a_better_learner_is_ahead_at_equal_steps_beyond_the_spread_of_the_bests_repeats():
    rng = np.random.default_rng(0)
    curve = lambda s: 2.5 + 4.0 / (1 + 0.05 * s)  # noqa: E731
    repeats = [make_metrics(200, loss=lambda s, e=rng.normal(0, 0.02, 400): curve(s) + e[s]) for _ in range(3)]
    better = make_metrics(200, loss=lambda s: curve(s) - 0.1)
    gap, spread = equal_steps(better, repeats[0]), equal_step_spread(repeats)
    assert gap.steps[-1] == 199 and gap.lr == pytest.approx((0.01, 0.01)) and gap.parted is None, gap
    assert spread < 0.03 and gap.gaps[gap.judged] == pytest.approx(-0.1, abs=0.02), (spread, gap)  # beyond the spread
    assert gap.steps[gap.departs] < 20, gap
    outlier = make_metrics(200, loss=lambda s: curve(s) + 0.5)  # an old repeat far off: it no longer widens the spread
    assert equal_step_spread([outlier] + repeats * 3) == pytest.approx(spread), "the last SPREAD_REPEATS decide"


def test_identical_code_on_a_slower_machine_learns_alike_per_step():
    gap = equal_steps(make_metrics(150), make_metrics(200))
    assert gap.steps[-1] == 149 and abs(gap.gaps[gap.judged]) < gap.threshold and gap.departs is None, gap
    assert gap.parted is not None and gap.judged < 149, "the schedules part once the slower run anneals earlier"


def test_a_late_departure_is_found_near_sixty_percent_of_training():
    base = make_metrics(200)
    late = make_metrics(200, loss=lambda s: 2.5 + 4.0 / (1 + 0.05 * s) + (0.05 if s >= 120 else 0.0))
    points, gap, start, limit = compare_curves(late, base)
    assert 0.6 <= points[start] <= 0.7 and gap[-1] == pytest.approx(0.05, abs=0.005), points[start]
    val = compare_curves(make_metrics(200, val_every=20), make_metrics(200, val_every=20), "val/bpb", 0.01)
    assert val[2] is None and len(val[0]) == 10


def test_a_loss_spike_and_a_stall_are_found_at_their_steps_and_a_falling_loss_has_a_trend():
    m = make_metrics(300, loss=lambda s: 3.0 + (2.0 if s == 200 else 0.0) + 0.001 * np.sin(s),
                     step_ms=lambda s: 500.0 if s == 40 else 100.0)
    assert [(e["step"], round(e["loss"], 2)) for e in loss_spikes(m)] == [(200, 5.0)]
    assert throughput_stats(m)["stalls"] == [(40, 500.0)]
    trend = last_tenth_trend(make_metrics(300))
    assert trend["steps"] == 31 and trend["change"] < 0, trend
    assert last_tenth_trend(make_metrics(100)) == {"steps": 11}, "eleven steps say nothing about a trend"

"""The figures of harness/stats.py on planted runs and curves: each figure is found with its number, and a
difference inside the spread of the best's own repeats is called noise."""
import numpy as np
import pytest

from harness.stats import (NOISE_SIGMAS, comparable, compare_curves, equal_step_spread, equal_steps,
                           last_tenth_trend, machine, noise, read_metrics, steps_vs)
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


def test_the_noise_band_pools_every_repeat_of_each_comparable_code_up_to_the_run():
    base = history(1.000, 1.004, 0.998)
    idea = history(0.990, 0.994, code_sha="idea", first="pending", speed=40.0)  # a moved machine's runs count too
    later = make_run(0.500)  # archived after the run: not known when it was decided
    n = noise(base + idea + [later], idea[-1])
    squares = sum(((np.array(g) - np.mean(g)) ** 2).sum() for g in ([1.000, 1.004, 0.998], [0.990, 0.994]))
    assert n.dof == 3 and n.runs == 5 and n.pooled_std == pytest.approx(np.sqrt(squares / 3)), n  # `later` left out
    assert n.band == pytest.approx(NOISE_SIGMAS * n.pooled_std * np.sqrt(2)), n
    others = [make_run(status="invalid"), make_run(status="crash"), make_run(None), make_run(gpu="NVIDIA H100"),
              make_run(harness={"profile": "cpu", "TIME_BUDGET": 30})]  # none finished valid on this harness and device
    assert comparable(base + others, base[0]) == base


@pytest.mark.parametrize("best, run, moved", [
    ((25, 25, 25), {"speed": 27.4}, None), ((25, 25, 25), {"speed": 22.6}, None),  # within a tenth of the median
    ((25, 25, 25), {"speed": 28.0}, "the machine ran 12% faster"),
    ((25, 25, 25), {"speed": 22.0}, "the machine ran 12% slower"),
    ((20, 25, 28), {"speed": 31.0}, None),  # +24%, within the 32% spread of the best's own speeds
    ((20, 25, 28), {"speed": 33.5}, "the machine ran 34% faster"),  # against the median 25 (a mean says 38%)
    ((25, 25, 25), {"speed_before": 22.4, "speed_after": 27.6}, None),  # the probes under a quarter apart
    ((25, 25, 25), {"speed_before": 22.0, "speed_after": 27.6}, "the machine's speed changed by +25% during the run"),
])
def test_the_machine_moved_beyond_a_tenth_or_the_spread_of_the_bests_speeds_or_by_a_quarter_during_the_run(
        best, run, moved):
    best = [make_run(speed=s) for s in best]
    said = machine(make_run(**run), best).moved()
    assert said is None if moved is None else said.startswith(moved), said
    assert machine(best[0], best).runs == 2, "a run is never its own reference"


@pytest.mark.parametrize("best, steps, beyond", [
    ((100, 110, 90), 115, False), ((100, 110, 90), 125, True),  # within and beyond the 20% spread of the repeats
    ((100,), 150, False),  # one run of the best shows no spread: no cause
    ((1000, 1001, 1000), 1020, False), ((1000, 1001, 1000), 985, False),  # repeats 0.1% apart: reruns' 2% decides
    ((1000, 1001, 1000), 1030, True), ((1000, 1001, 1000), 970, True),
])
def test_a_step_count_is_a_cause_only_beyond_the_larger_of_two_percent_and_the_spread_of_the_bests_repeats(
        best, steps, beyond):
    s = steps_vs(make_run(steps=steps), [make_run(steps=n) for n in best])
    assert s.beyond is beyond, f"{steps} steps vs {s.usual:.0f}: {s.change:+.2%}, limit {s.limit:.2%}"


def test_a_better_learner_is_ahead_at_equal_steps_beyond_the_spread_of_the_bests_repeats():
    rng = np.random.default_rng(0)
    curve = lambda s: 2.5 + 4.0 / (1 + 0.05 * s)  # noqa: E731
    repeats = [make_metrics(200, loss=lambda s, e=rng.normal(0, 0.02, 400): curve(s) + e[s]) for _ in range(3)]
    gap, spread = equal_steps(make_metrics(200, loss=lambda s: curve(s) - 0.1), repeats[0]), equal_step_spread(repeats)
    assert gap.judged == 199 and gap.gaps[-1] == pytest.approx(-0.1, abs=0.02) and gap.steps[gap.departs] < 20, gap
    assert spread < 0.03, spread  # the better learner's gap is far beyond the spread of the best's repeats
    outlier = make_metrics(200, loss=lambda s: curve(s) + 0.5)  # an old repeat far off: it no longer widens the spread
    assert equal_step_spread([outlier] + repeats * 3) == pytest.approx(spread), "the last SPREAD_REPEATS decide"


def test_a_late_departure_is_found_near_sixty_percent_of_training():
    base = make_metrics(200)
    late = make_metrics(200, loss=lambda s: 2.5 + 4.0 / (1 + 0.05 * s) + (0.05 if s >= 120 else 0.0))
    points, gap, start, limit = compare_curves(late, base)
    assert 0.6 <= points[start] <= 0.7 and gap[-1] == pytest.approx(0.05, abs=0.005), points[start]
    val = compare_curves(make_metrics(200, val_every=20), make_metrics(200, val_every=20), "val/bpb", 0.01)
    assert val[2] is None and len(val[0]) == 10


def test_eleven_steps_in_the_last_tenth_tell_no_trend():
    assert last_tenth_trend(make_metrics(100)) == {"steps": 11}

"""analysis.md names what was planted, with its number, and nothing else: runs with one known feature each (CAUSES,
and a gain inside the band) set against a best run three times. Then the printed lines and the commands' texts."""
import json
import re

import numpy as np
import pytest

from harness.decide import decide
from harness.record import Archive, Caught
from harness.stats import difference_band
from harness.report import best_text, compare_text, draw_progress, list_text, run_lines, show_text, write_analysis
from tests.factory import make_run, metrics_rows

NOISE = np.random.default_rng(0).normal(0.0, 1.0, 5000)  # the same draw at the same step: one seed
pytestmark = pytest.mark.quick


def plateau(s):
    return 3.0 + 5.0 * np.exp(-s / 40.0) + 0.02 * NOISE[s]


def planted(archive, val_bpb, steps=400, loss=plateau, lr=None, step_ms=None, code_sha="idea", **kw):
    """A finished run whose metrics.jsonl is planted: loss(step), lr(step), step_ms(step) (60 s over `steps` steps)."""
    run = make_run(val_bpb, steps=steps, code_sha=code_sha, **kw)
    rows = metrics_rows(steps, loss=loss, lr=lr, step_ms=step_ms or (lambda s: 60000.0 / steps))
    archive.run_dir(run.id).mkdir(parents=True)
    (archive.run_dir(run.id) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def best_repeats(archive, steps=(400, 396, 404), shape=lambda n: {}, **kw):
    """The best (kept) and two repeats: val_bpb 1.000 ± 0.002, 25 ± 0.5 GFLOP/s; planted(**shape(steps), **kw)."""
    return [planted(archive, bpb, steps=n, speed=speed, code_sha="base", status="keep" if i == 0 else "discard",
                    **shape(n), **kw)
            for i, (bpb, n, speed) in enumerate(zip((1.000, 1.002, 0.998), steps, (25.0, 25.5, 24.5)))]


# features, and the phrase that names each: a planted run names its own and none of the others
NAMES = {"departure": "departs from the best at progress", "spike": "spike at step", "falling": "still falling",
         "speed": "  - speed: 4", "machine": "the machine ran", "learning": "learning per step: ahead",
         "schedule": "the clock-driven schedule", "identical": "identical code"}


@pytest.fixture
def archive(tmp_path):
    return Archive(tmp_path / "archive")


def clocked(steps):
    """A warmdown over the last tenth of training, on the clock, and a loss that follows the LR."""
    lr = lambda s: min(1.0, 10.0 * (1 - (s + 1) / steps))  # noqa: E731
    return {"lr": lr, "loss": lambda s: plateau(s) + 0.5 * lr(s)}


BAND = f"±{difference_band(0.002, 1, 3):.6f}"  # one run against the best's three, their std 0.002
NOTHING = "- explained by: nothing beyond the noise of repeats\n"
CAUSES = {  # planted run, the best's shape, every feature named, what explains it and says it with its numbers
    "a gain inside the band": (
        dict(val_bpb=0.999), None, set(),
        [NOTHING, "delta -0.001000 vs best", f"(band {BAND}, n 1 vs 3)", "delta -0.001000 (n 1 vs 3: the mean of "
         f"this code's runs minus the best code's, as the decision), within the noise band {BAND}",  # one verdict
         "learning per step: within noise: +0.0000 at step 399, within 0.0",
         "speed: within noise: 400 steps vs 400, the mean of the best's 3 run(s) (+0%), within 2%"]),
    "spike and stall": (
        dict(val_bpb=1.001, loss=lambda s: plateau(s) + 2.0 * (s == 250),
             step_ms=lambda s: 1500.0 if s == 100 else 150.0),
        None, {"spike", "departure"},  # the smoothed loss carries the spike a while
        [NOTHING, "- loss spikes: 1;", "spike at step 250 (progress 0.63): loss 5.",
         "median step): 1, step 100 (1500 ms)"]),
    "faster code": (
        dict(val_bpb=0.990, steps=480), None, {"speed", "departure"},  # ahead on progress: from speed
        ["- explained by: speed\n", "learning per step: within noise: +0.0000 at step 219, the last where the LR "
         "schedules agree", "speed: 480 steps vs 400, the mean of the best's 3 run(s) (+20%), beyond 2% (the larger of "
         "2% and the 2% spread of the best's runs): the code's"]),
    "slower machine, caught": (
        dict(val_bpb=1.060, steps=300, speed=18.0, code_sha="base", caught=[Caught("trained on validation data", "x")]),
        None, {"identical", "machine", "departure"},
        ["- explained by: the machine\n", "the machine: 300 steps vs 400, the mean of the best's 3 run(s) (-25%), "
         "beyond 2%", "the machine was slower, since the code is the best's", "- caught: trained on validation data: x",
         "- machine speed 18 GFLOP/s vs 25, the median of the best's 3 run(s): -28%"]),
    "better learner": (
        dict(val_bpb=0.950, loss=lambda s: plateau(s) - 0.1 * (1 - np.exp(-s / 100))), None, {"learning", "departure"},
        ["- explained by: learning per step\n", "learning per step: ahead of the best at equal steps: -0.09",
         "at step 399, beyond 0.0", "- at equal steps -0.09"]),
    "clock-driven schedule": (
        dict(val_bpb=0.996, steps=294, code_sha="base", **clocked(294)), {"steps": (300, 294, 306), "shape": clocked},
        {"identical", "schedule", "falling"},  # falling: the warmdown, named but no cause
        ["- explained by: the clock-driven schedule\n", "at step 293 the LR multiplier is 0.00 here and 0.20 in the "
         "best", "the machine: within noise: 294 steps vs 300, the mean of the best's 3 run(s) (-2%)",
         "; the LR schedules part at step 267;", "last tenth of training: fitted change -0.5",
         "% of the loss): still falling when time ran out"]),
}


@pytest.mark.parametrize("run, best, features, says", CAUSES.values(), ids=CAUSES)
def test_a_planted_feature_is_named_with_its_number_and_nothing_else(archive, run, best, features, says):
    runs = best_repeats(archive, **(best or {})) + [planted(archive, **run)]
    runs[-1].decision = decide(runs[-1], runs)
    text, printed = write_analysis(runs[-1], runs, archive), run_lines(runs[-1], runs[0], None, runs, archive)
    shared = [x for x in text.splitlines() if x.startswith(("- machine", "- caught"))]  # the same line, printed
    assert [x for x in shared if x[2:] not in printed] == [], printed
    found = {feature for feature, phrase in NAMES.items() if phrase in text}
    assert found == features, found
    assert [said for said in says if said not in text] == [], text
    if "identical" in features:  # identical code learns alike per step: no such cause is weighed
        assert "learning per step" not in text


def test_a_hand_archived_run_has_no_decision_line_keeps_notes_on_status_and_is_plotted_and_compared(archive):
    best, run = best_repeats(archive)[0], planted(archive, 0.990, measured=None)  # in this order: archived after
    patch = "--- a/train.py\n+++ b/train.py\n@@ -1 +1,2 @@\n-A = 1\n+A = 2\n+B = 3\n"  # the file header counts no line
    (archive.run_dir(run.id) / "diff.patch").write_text(patch)
    text = write_analysis(run, [best, run], archive)
    assert "decision:" not in text and "train.py's own number (archived by hand" in text
    assert f"\n- vs best {best.id} (1.000000): -0.010000, noise band unknown\n" in text, text
    assert "- code: +2 -1 lines in train.py, 1 hunk(s): the lines are in diff.patch" in text, text
    (archive.run_dir(run.id) / "analysis.md").write_text(text + "tried a wider MLP\n")
    run.statuses[-1].status = "discard"
    again = write_analysis(run, [best, run], archive)
    assert "status `discard`" in again and again.endswith("## Agent notes\ntried a wider MLP\n"), again
    assert show_text(run, archive) == again
    (archive.run_dir(run.id) / "analysis.md").write_text("notes under no heading\n")  # never lost to a rewrite
    assert write_analysis(run, [best, run], archive) == "notes under no heading\n" == show_text(run, archive)
    assert {"loss.png", "schedules.png", "throughput.png"} <= {p.name for p in archive.run_dir(run.id).iterdir()}
    compared = compare_text(best, run, archive)
    assert "- val_bpb B - A: -0.010000" in compared and "loss.png" in compared.splitlines()[-1], compared


# What `analyze.py run` prints, and the other commands' texts
OOM = ('Traceback (most recent call last):\n  File "train.py", line 500, in <module>\n    loss = model(x, y)\n'
       "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79 GiB")


def test_a_crash_prints_its_exception_never_a_negative_time_and_no_delta_of_its_codes_earlier_runs(archive):
    runs = best_repeats(archive) + [planted(archive, 0.95)]  # the crash's code ran before
    runs.append(make_run(None, code_sha="idea", training_seconds=0.0, total_seconds=24.5, wall_s=24.5,
                         outcome="crash", error=OOM))
    archive.run_dir(runs[-1].id).mkdir()
    runs[-1].decision = decide(runs[-1], runs)
    headline = write_analysis(runs[-1], runs, archive).split("## Headline\n")[1].split("\n## ")[0]
    assert runs[-1].decision.delta is not None, runs[-1].decision  # the mean of the code's earlier run
    assert "this run has no number" in headline and "delta" not in headline, headline
    lines = run_lines(runs[-1], runs[0], None, runs, archive)
    assert lines[0].startswith("decision: crash"), lines
    assert "out of memory: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB." in lines[-2], lines
    assert any("did not train (no counted training second), wall 24.5 s" in x for x in lines), lines
    assert not any(re.search(r"-\d+(\.\d+)? s outside", x) for x in lines), lines
    syntax = make_run(None, outcome="crash")  # undecided, its traceback in run.log only
    archive.run_dir(syntax.id).mkdir()
    (archive.run_dir(syntax.id) / "run.log").write_text(
        'Traceback (most recent call last):\n  File "train.py", line 3\n    x = (\n        ^\n'
        "SyntaxError: '(' was never closed\n")
    lines = run_lines(syntax, runs[0], None, runs + [syntax], archive)
    assert not lines[0].startswith("decision:") and "error: SyntaxError: '(' was never closed" in lines, lines
    assert lines[-1].startswith("analysis: ") and lines[-1].endswith("analysis.md"), lines


def test_the_list_and_best_texts_mark_each_workers_best():
    best, other = make_run(1.0, status="keep", worker="a"), make_run(0.98, status="keep", worker="b")
    runs = [best, make_run(0.5, status="invalid", worker="a"), other]  # an invalid run is never a best
    listing = list_text(runs).splitlines()
    assert len(listing) == 4 and re.match(rf"{best.id} +\* +1\.000000", listing[1]), listing
    assert best_text(runs, "a").startswith(f"{best.id}\t") and best_text(runs, "b").startswith(f"{other.id}\t")
    assert best_text(runs, "z") == "no best run yet: no run kept by worker z"


def test_progress_plots_the_workers_best_by_the_best_rule_not_the_luckiest_kept_draw(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr("harness.report.save", lambda fig, path: figures.append(fig))
    runs = [make_run(0.950, status="keep", code_sha="lucky"),
            make_run(0.900, status="keep", code_sha="theirs", worker="other"),  # another worker's experiment
            make_run(0.970, status="keep", code_sha="later"),  # kept after the lucky draw: the best from here on
            make_run(0.980, status="discard", code_sha="later"),  # a repeat of the best's code moves its mean
            make_run(0.960, status="discard", code_sha="idea")]
    draw_progress(runs, tmp_path / "progress.png")
    (line,) = figures[0].axes[0].get_lines()  # the best so far; the runs are points, the band an area
    assert line.get_ydata() == pytest.approx([0.950, 0.950, 0.970, 0.975, 0.975, 0.975]), line.get_ydata()


"""The harness's decision on a run, from results.tsv rows alone: each rule of harness/decide.py on a
fabricated history, in the order the rules apply, and the issue's two runs: a smaller batch on a box
that got quieter (146 steps where the best's runs took 27) is rerun, not kept, and a comment-only
change is never kept, whatever its val_bpb."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from harness.decide import ENOUGH_RUNS, MACHINE_DRIFT, PROBE_SPREAD, Decision, code_lines, decide  # noqa: E402

BASE, IDEA = "base00000000", "idea00000000"  # code identities (code_sha): the best's train.py, and a change to it
BASE_STD = np.std([1.000, 1.004, 0.998], ddof=1)  # the best's code run three times (with_band)


@pytest.fixture(autouse=True)
def outside_git(tmp_path, monkeypatch):
    """No repository: train.py's code lines are unknown (so no rule reads them) unless a test makes one."""
    monkeypatch.chdir(tmp_path)


def run(history, bpb, code=BASE, status="pending", steps=400, speed=100.0, commit=None, **fields):
    """Append a results.tsv row of a finished run of `code` as `analyze.py run` records it (speed: the
    machine's GFLOP/s, None for a bare archive) and return it."""
    n = len(history)
    row = {"commit": commit or f"{n:07x}", "val_bpb": f"{bpb:.6f}", "memory_gb": "45.0", "status": status,
           "description": f"run {n}", "run_id": f"r{n}", "outcome": "ok", "harness": "gpu:h", "code_sha": code,
           "num_steps": str(steps), "worker": "w", "gpu": "H100 80GB HBM3", "measured": "harness",
           "machine_speed": "" if speed is None else f"{speed:.1f}", "caught": "", **fields}
    history.append(row)
    return row


def decided(history, measurement=None):
    """The decision on the last row of `history`."""
    return decide(history[-1], history, measurement)


def with_band(speed=100.0, steps=400):
    """The best kept at 1.000 and two repeats of its code (1.004, 0.998): a noise band from three runs."""
    history = []
    for bpb, status in ((1.000, "keep"), (1.004, "discard"), (0.998, "discard")):
        run(history, bpb, status=status, speed=speed, steps=steps)
    return history


def band(n, m=3, std=BASE_STD):
    """The decision's band for n runs of the idea against the best code's m, the best's repeats alone."""
    return 2 * std * np.sqrt(1 / n + 1 / m)


# ---------------------------------------------------------------------------
# The line

def test_the_line_carries_kind_delta_band_runs_and_reason():
    d = Decision("keep", "beyond the noise band", -0.004321, 0.0021, 1, 3, "1a2b3c4")
    assert d.line() == ("decision: keep — delta -0.004321 vs best 1a2b3c4 (band ±0.002100, n 1 vs 3): beyond the "
                        "noise band")
    assert Decision("rerun", "no noise band yet", -0.01, None, 1, 1, "1a2b3c4").line() == \
        "decision: rerun — delta -0.010000 vs best 1a2b3c4 (band unknown, n 1 vs 1): no noise band yet"
    assert Decision("keep", "the baseline", None, None, 1, 0, None).line() == \
        "decision: keep — no best yet (n 1): the baseline"
    assert Decision("crash", "the run did not finish", None, 0.01, 0, 3, "1a2b3c4").line() == \
        "decision: crash — vs best 1a2b3c4: the run did not finish"


def test_a_bare_archived_run_is_decided_and_says_its_number_is_train_pys_own():
    history = with_band(speed=None)
    run(history, 0.980, code=IDEA, speed=None, measured="")
    line = decided(history).line()
    assert line.startswith("decision: keep — delta -0.020667") and line.endswith(
        "lower beyond the noise band; val_bpb is train.py's own number, not measured by the harness (archived "
        "without `analyze.py run`)"), line


# ---------------------------------------------------------------------------
# The rules, in order

@pytest.mark.parametrize("outcome", ["crash", "diverged", "timeout", "no_summary"])
def test_a_run_that_did_not_finish_is_a_crash(outcome):
    history = with_band()
    run(history, 0.0, code=IDEA, status="crash", outcome=outcome)
    d = decided(history)
    assert (d.kind, d.reason, d.n) == ("crash", f"the run did not finish (outcome {outcome})", 0), d


def test_an_interrupted_run_is_rerun():
    history = with_band()
    run(history, 0.0, code=IDEA, status="interrupted", outcome="interrupted")
    d = decided(history)
    assert (d.kind, d.reason) == ("rerun", "the run was interrupted before its number was measured"), d


def test_a_caught_run_is_discarded_naming_the_case_however_low_its_val_bpb():
    history = with_band()
    run(history, 0.500, code=IDEA, status="invalid", caught="trained on validation data; slowed clock")
    d = decided(history)
    assert (d.kind, d.reason) == ("discard", "caught: trained on validation data; slowed clock"), d
    history = with_band()
    run(history, 0.500, code=IDEA, status="invalid")  # a bare archive whose harness differs from the pin
    assert decided(history).kind == "discard" and "harness" in decided(history).reason


def test_the_first_run_is_the_baseline_and_an_undecided_run_before_it_is_no_best():
    history = []
    run(history, 0.900)  # the README's quick start, archived and never decided
    run(history, 1.000, code=IDEA)
    d = decided(history)
    assert (d.kind, d.best_id) == ("keep", None), d
    assert d.line() == "decision: keep — no best yet (n 1): nothing kept yet: this run is the baseline"


def test_a_repeat_of_the_best_is_rerun_until_its_code_has_three_runs_then_discarded():
    history = []
    run(history, 1.000, status="keep")
    run(history, 0.990)
    d = decided(history)
    assert (d.kind, d.reason) == ("rerun", "the best's code (comments aside), run 2 of 3: measuring the noise band"), d
    history[-1]["status"] = "pending"
    run(history, 0.900)
    d = decided(history)
    assert (d.kind, d.reason) == ("discard", "a repeat of the best's code (comments aside)"), d


def test_a_change_without_a_noise_band_is_rerun():
    history = []
    run(history, 1.000, status="keep")
    run(history, 0.900, code=IDEA)
    d = decided(history)
    assert d.kind == "rerun" and d.reason.startswith("no noise band yet") and d.band is None, d


@pytest.mark.parametrize("speed, kind, word", [(100.0 * (1 + MACHINE_DRIFT) + 5, "rerun", "faster"),
                                               (100.0 * (1 - MACHINE_DRIFT) - 5, "rerun", "slower"),
                                               (100.0 * (1 + MACHINE_DRIFT) - 1, "keep", None)])
def test_a_machine_off_the_bests_runs_by_more_than_a_tenth_is_rerun(speed, kind, word):
    history = with_band()
    run(history, 0.980, code=IDEA, speed=speed)
    d = decided(history)
    assert d.kind == kind, d
    if word:
        assert d.reason.startswith(f"the machine ran {abs(speed / 100 - 1):.0%} {word} than during the best's runs "
                                   f"({speed:,.0f} vs 100 GFLOP/s)"), d.reason


@pytest.mark.parametrize("before, after, kind", [(90.0, 115.0, "rerun"), (92.0, 112.0, "keep")])
def test_probes_further_apart_than_a_quarter_are_rerun(before, after, kind):
    history = with_band()
    run(history, 0.980, code=IDEA, speed=(before + after) / 2)  # the row holds their mean, the best's machine's
    d = decided(history, {"machine_speed": {"before": before, "after": after}})
    assert after / before - 1 > PROBE_SPREAD if kind == "rerun" else after / before - 1 < PROBE_SPREAD
    assert d.kind == kind, d
    if kind == "rerun":
        assert d.reason.startswith(f"the machine's speed changed by +{after / before - 1:.0%} during the run's "
                                   f"evaluation ({before:.0f} -> {after:.0f} GFLOP/s)"), d.reason


def test_with_three_runs_a_code_is_decided_on_its_means_and_the_line_says_the_machine_moved():
    history = with_band()
    for bpb in (0.950, 0.952, 0.948):
        run(history, bpb, code=IDEA, speed=150.0)  # the machine stayed 50% faster for all three
    d = decided(history)
    assert (d.kind, d.n, d.m) == ("keep", ENOUGH_RUNS, 3), d
    assert d.reason == ("lower beyond the noise band (decided on the means of this code's 3 runs, although the "
                        "machine ran 50% faster than during the best's runs (150 vs 100 GFLOP/s))"), d.reason


@pytest.mark.parametrize("bpb, kind, reason", [(0.990, "keep", "lower beyond the noise band"),
                                               (1.010, "discard", "higher beyond the noise band")])
def test_beyond_the_band_lower_is_kept_and_higher_discarded(bpb, kind, reason):
    history = with_band()
    run(history, bpb, code=IDEA)
    d = decided(history)
    assert (d.kind, d.reason, d.n, d.m, d.best_id) == (kind, reason, 1, 3, "r0"), d
    assert d.delta == pytest.approx(bpb - 1.000667, abs=1e-6) and d.band == pytest.approx(band(1)), d


def test_inside_the_band_a_lower_mean_is_rerun_until_the_code_has_three_runs_then_discarded():
    history = with_band()
    run(history, 0.998, code=IDEA)
    d = decided(history)
    assert d.kind == "rerun" and d.reason.startswith("lower but inside the noise band, on 1 run(s)"), d
    run(history, 0.999, code=IDEA)
    run(history, 0.997, code=IDEA)
    d = decided(history)
    assert (d.kind, d.reason, d.n) == ("discard", "inside the noise band: no better than the best", 3), d


def test_inside_the_band_a_higher_mean_is_discarded():
    history = with_band()
    run(history, 1.003, code=IDEA)
    assert (decided(history).kind, decided(history).reason) == ("discard", "inside the noise band: no better than the best")


def test_inside_the_band_a_simpler_train_py_is_kept(tmp_path):
    def commit(text):
        (tmp_path / "train.py").write_text(text)
        subprocess.run(["git", "add", "train.py"], check=True)
        subprocess.run(["git", "commit", "-qm", "x"], check=True)
        return subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], check=True, capture_output=True,
                              text=True).stdout.strip()
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run(["git", "config", "user.email", "t@example.com"], check=True)
    subprocess.run(["git", "config", "user.name", "test"], check=True)
    best = commit("DEPTH = 8\nVALUE_EMBEDS = True\nMATRIX_LR = 0.04\n")
    history = []
    for bpb, status in ((1.000, "keep"), (1.004, "discard"), (0.998, "discard")):
        run(history, bpb, status=status, commit=best)
    run(history, 1.002, code=IDEA, commit=commit("DEPTH = 8\n# value embeddings removed\n\nMATRIX_LR = 0.04\n"))
    d = decided(history)
    assert (d.kind, d.reason) == ("keep", "simpler at equal val_bpb: 2 code lines where the best's train.py has 3"), d
    history[-1]["status"] = "discard"
    run(history, 1.002, code="more00000000", commit=commit("DEPTH = 8\nVALUE_EMBEDS = True\nMATRIX_LR = 0.04\nX = 1\n"))
    assert decided(history).kind == "discard"


# ---------------------------------------------------------------------------
# The two runs

def test_a_smaller_batch_on_a_quieter_machine_is_rerun_not_kept():
    """TOTAL_BATCH_SIZE halved: 146 steps where the best's runs took 27, because the box got quieter; its
    val_bpb is far below the best's, beyond any band, and the machine's speed alone tells why."""
    history = []
    for bpb, status, steps in ((1.500, "keep", 27), (1.504, "discard", 27), (1.498, "discard", 28)):
        run(history, bpb, status=status, steps=steps, speed=100.0)
    run(history, 1.300, code=IDEA, steps=146, speed=180.0)
    d = decided(history, {"machine_speed": {"before": 179.0, "after": 181.0}})
    assert d.line() == (f"decision: rerun — delta -0.200667 vs best r0 (band ±{band(1):.6f}, n 1 vs 3): the machine ran "
                        "80% faster than during the best's runs (180 vs 100 GFLOP/s), so val_bpb measures the machine "
                        "as much as the code"), d.line()
    history[-1]["status"] = "pending"
    run(history, 1.302, code=IDEA, steps=146, speed=101.0)  # rerun on the machine of the best's runs
    assert decided(history).kind == "keep", decided(history)


@pytest.mark.parametrize("bpb", [0.900, 0.999, 1.000, 1.100])
@pytest.mark.parametrize("steps, speed", [(400, 100.0), (480, 100.0), (480, 130.0), (480, None)])
def test_a_comment_only_change_is_never_kept(bpb, steps, speed):
    """Comments and blank lines aside, train.py is the best's (one code_sha under another commit), so its
    run is a repeat of the best, on whatever machine and with whatever val_bpb."""
    for repeats in range(1, ENOUGH_RUNS + 1):
        history = with_band()[:repeats]
        run(history, bpb, steps=steps, speed=speed, commit="c0mment")
        d = decided(history)
        assert d.kind in ("rerun", "discard") and "the best's code (comments aside)" in d.reason, (repeats, d)


def test_without_machine_speeds_a_change_off_its_own_codes_usual_steps_is_rerun_not_kept():
    """A bare archive has no machine speed: a second run of a changed train.py that took 50% more steps
    than its first ran on a quieter box, however low its val_bpb."""
    history = with_band(speed=None)
    run(history, 0.999, code=IDEA, speed=None, measured="")
    run(history, 0.950, code=IDEA, speed=None, steps=600, measured="")
    d = decided(history)
    assert d.kind == "rerun" and d.reason.startswith(
        "the machine ran faster: 600 steps where this code usually takes 400 (+50%)"), d


def test_code_lines_count_statements_not_comments_or_blank_lines():
    source = "# header\n\nDEPTH = 8  # layers\nLR = dict(\n    a=1,\n)\n\n\ndef f():\n    '''doc'''\n    return 1\n"
    assert code_lines(source) == 7, code_lines(source)
    assert code_lines("x = (\n") == 1, "a file that does not tokenize counts its non-comment lines"


def test_a_run_kept_on_another_branch_is_not_this_branchs_best():
    """A new experiment branch starts from nothing, whatever an earlier branch of the same worker kept."""
    history = []
    run(history, 0.900, status="keep", branch="autoresearch/mar4")
    first = run(history, 1.000, branch="autoresearch/mar5")
    d = decide(first, history)
    assert (d.kind, d.best_id) == ("keep", None), d.line()
    history[-1]["status"] = "keep"
    second = run(history, 1.100, code=IDEA, branch="autoresearch/mar5")
    assert decide(second, history).best_id == first["run_id"]

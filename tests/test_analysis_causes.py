"""analysis.md tells learning from speed: runs planted with a known cause (a pure speed-up, the same code
on a slower machine, a better learner at the same speed, a comment-only change) are each explained as
that cause, and the noise band from repeats on a disturbed machine stays tight and names the disturbed
runs. On a fixed time budget a run that gets more steps is ahead at every point of progress without
learning anything more per step, so these are the mistakes an agent keeping and discarding on
val_bpb would make."""
import re

import numpy as np
import pytest

from test_analyze import (ARCHIVE, GPU_HARNESS, analysis, archive_run, commit, measure, repo,  # noqa: F401 (repo: fixture)
                          results, run_analyze, section)
from harness.noise import noise_band

BASE_PY = "DEPTH = 8\nMATRIX_LR = 0.04\n"  # the repo fixture's baseline commit


def per_step(steps, better=0.0):
    """A loss curve planted per step, as write_run's loss(progress) of a run of `steps` steps: the same
    loss at the same step whatever the step count. `better` lowers it by up to that much as steps go on."""
    def loss(p):
        i = np.asarray(p) * (steps - 1)
        return 3.0 + 5.0 * np.exp(-i / 60.0) - better * (1.0 - np.exp(-i / 100.0))
    return loss


def planted(val_bpb, steps=400, step_ms=750.0, better=0.0, age_s=0.0):
    """Archive a run of the checked-out train.py whose per-step losses are the baseline's (same seed:
    the same noise at the same step) unless `better`; returns its results.tsv row."""
    row, _ = archive_run(val_bpb=val_bpb, loss=per_step(steps, better), steps=steps, step_ms=step_ms, age_s=age_s)
    return row


def kept_baseline():
    best = planted(1.000)
    assert run_analyze("status", best["run_id"], "keep") == 0
    return best


def contradictions(text):
    """Lines after the decision that take a decision of their own: the old verdicts, or a second decision."""
    return [line for line in text.splitlines()[1:]
            if re.search(r"verdict|improvement|regression|beyond the noise band|^decision:", line)]


def headline_and_cause(run_id):
    headline = section(analysis(run_id), "Headline")
    line = next((x for x in headline.splitlines() if "at equal steps" in x), None)
    assert line, f"no 'at equal steps' line:\n{headline}"
    cause = next(x for x in headline.splitlines() if x.startswith("- explained by: "))
    gap = float(re.search(r"at equal steps ([+-]\d+\.\d+)", line).group(1))
    steps = tuple(int(n) for n in re.search(r"steps (\d+) vs (\d+)", line).groups())
    return headline, line, cause, gap, steps


# ---------------------------------------------------------------------------
# One planted cause per test

def test_a_pure_speed_up_is_explained_by_speed_not_learning(repo):
    best = kept_baseline()
    commit("faster attention kernel", BASE_PY + "FAST_KERNEL = True\n")
    row = planted(0.990, steps=480, step_ms=625.0, age_s=-5)  # 20% more steps, the same loss at each step
    headline, line, cause, gap, steps = headline_and_cause(row["run_id"])
    assert steps == (480, 400), line
    assert abs(gap) < 1e-3, f"same per-step losses, yet a gap of {gap:+.4f} at equal steps: {line}"
    progress_gap = float(re.search(r"at equal progress ([+-]\d+\.\d+)", line).group(1))
    assert progress_gap < -0.005, f"20% more steps should put it ahead on progress, gap {progress_gap:+.4f}: {line}"
    assert cause.startswith("- explained by: speed: per step it learns as the best does") and "20% more steps" in cause, cause
    assert "the machine, not the code" not in headline, f"a code change's speed was blamed on the machine:\n{headline}"
    assert "the code differs, so from the code or the machine" in cause, cause
    departs = section(analysis(row["run_id"]), "Where it departs")
    assert "at equal steps" in departs and "per step this run learns as the best does" in departs, departs


def test_the_same_code_on_a_slower_machine_is_the_machine(repo):
    best = kept_baseline()
    row = planted(1.060, steps=100, step_ms=3000.0, age_s=-5)  # a rerun of the best's commit, every step 4x slower
    text = analysis(row["run_id"])
    headline, line, cause, gap, steps = headline_and_cause(row["run_id"])
    assert steps == (100, 400) and abs(gap) < 1e-3, line
    assert cause.startswith("- explained by: speed:") and "75% fewer steps with the best's code, so from the machine" \
        in cause, cause
    machine = next((x for x in headline.splitlines() if x.startswith("- the machine, not the code")), "")
    assert "100 steps where that code's other runs take 400 (-75%" in machine and "the machine was slower" in machine, \
        headline
    assert text.splitlines()[0].startswith("decision: rerun — ") and \
        text.splitlines()[0].endswith("the best's code (comments aside), run 2 of 3: measuring the noise band; val_bpb is "
                                      "train.py's own number, not measured by the harness (archived without "
                                      "`analyze.py run`)"), text.splitlines()[0]
    assert not contradictions(text), contradictions(text)
    assert f"{row['run_id']} 100 steps vs 400 (-75%" in section(text, "Noise"), section(text, "Noise")
    # judged against the same code's other run, every step is slow; against its own median, none would be
    throughput = section(text, "Throughput")
    assert re.search(r"every step slow: median step time \d{4} ms, 4\.0x the 7[45]\d ms of the same code's run "
                     + best["run_id"], throughput), throughput
    assert "Per-layer health" not in text, "a repeat of the best's code got a per-layer comparison with the best"


def test_a_better_learner_at_the_same_speed_is_explained_by_learning(repo):
    kept_baseline()
    commit("better init", BASE_PY + "INIT_SCALE = 0.5\n")
    row = planted(0.950, better=0.2, age_s=-5)  # 400 steps again, lower loss from the early steps on
    headline, line, cause, gap, steps = headline_and_cause(row["run_id"])
    assert steps == (400, 400), line
    assert gap < -0.15, f"planted 0.2 lower per step by the end, gap at equal steps {gap:+.4f}: {line}"
    assert cause.startswith("- explained by: learning per step: ahead of the best at equal steps") \
        and "with as many steps" in cause, cause


def test_a_comment_only_change_is_a_repeat_of_the_best(repo):
    best = kept_baseline()
    commit("explain MATRIX_LR", "DEPTH = 8\n\n# Muon's learning rate, tuned at depth 8\nMATRIX_LR = 0.04  # per matrix\n")
    row = planted(1.001, steps=398, age_s=-5)
    assert row["code_sha"] and row["code_sha"] == results()[0]["code_sha"], results()
    assert row["train_py_sha"] != results()[0]["train_py_sha"]
    text = analysis(row["run_id"])
    assert "only in comments and blank lines" in section(text, "What changed"), section(text, "What changed")
    headline, line, cause, gap, steps = headline_and_cause(row["run_id"])
    assert cause.startswith("- explained by: neither:"), cause
    assert "the machine, not the code" not in headline, headline  # 398 vs 400 steps: within the speed noise
    assert ": the best's code (comments aside), run 2 of 3: measuring the noise band" in text.splitlines()[0], \
        text.splitlines()[0]
    assert f"2 runs ({best['run_id']}, {row['run_id']})" in section(text, "Noise"), section(text, "Noise")


# ---------------------------------------------------------------------------
# The two runs: the machine changed, and the analysis called it the code

def test_a_smaller_batch_on_a_quieter_machine_is_rerun_and_kept_once_the_machine_is_back(repo):
    # the run: TOTAL_BATCH_SIZE halved, 146 steps where the best's runs took 27, because the box got
    # quieter; the evaluator's machine speed tells this from the code, which the step counts cannot
    commit("baseline", "TOTAL_BATCH_SIZE = 2**12\n")
    best = planted(1.500, steps=27, step_ms=300000.0 / 27)
    assert run_analyze("status", best["run_id"], "keep") == 0
    measure(best, 100.0)
    for i, (bpb, steps, speed) in enumerate(((1.504, 27, 101.0), (1.497, 28, 99.0))):
        measure(planted(bpb, steps=steps, step_ms=300000.0 / steps, age_s=-5 * (i + 1)), speed)
    commit("TOTAL_BATCH_SIZE 2**12 -> 2**11", "TOTAL_BATCH_SIZE = 2**11\n")
    row = measure(planted(1.300, steps=146, step_ms=300000.0 / 146, age_s=-20), 180.0, probes=(178.0, 182.0))
    text = analysis(row["run_id"])
    first = text.splitlines()[0]
    assert first.startswith(f"decision: rerun — delta -0.200333 vs best {best['run_id']} (band ±") and first.endswith(
        "n 1 vs 3): the machine ran 80% faster than during the best's runs (180 vs 100 GFLOP/s), so val_bpb measures "
        "the machine as much as the code"), first
    headline = section(text, "Headline")
    assert ("- machine speed 180 GFLOP/s (probes 178 before and 182 after the evaluation, 2% apart) vs 100, the median "
            "of the best's 3 run(s): +80%, beyond 10%: the machine was faster") in headline, headline
    cause = next(x for x in headline.splitlines() if x.startswith("- explained by: "))
    assert "more steps while the machine ran 80% faster than during the best's runs" in cause, cause
    assert not contradictions(text), contradictions(text)
    again = measure(planted(1.302, steps=146, step_ms=300000.0 / 146, age_s=-25), 102.0)  # the machine as it was
    first = analysis(again["run_id"]).splitlines()[0]
    assert first.startswith(f"decision: keep — delta -0.199333 vs best {best['run_id']}") and \
        first.endswith("n 2 vs 3): lower beyond the noise band"), first


def test_a_comment_only_change_on_a_quieter_machine_is_never_kept_and_no_line_says_otherwise(repo):
    # the issue's other run: a comment-only change, 20% more steps on a quieter box, was "an improvement beyond the
    # noise band" in one line and "from the machine" in the next
    best = kept_baseline()
    planted(1.002, steps=398, age_s=-5)
    commit("explain MATRIX_LR", "DEPTH = 8\n# Muon's learning rate\nMATRIX_LR = 0.04\n")
    row = planted(0.960, steps=480, step_ms=625.0, age_s=-10)
    text = analysis(row["run_id"])
    assert text.startswith(f"decision: discard — delta +0.000000 vs best {best['run_id']} (band ±"), text.splitlines()[0]
    assert ": a repeat of the best's code (comments aside)" in text.splitlines()[0], text.splitlines()[0]
    machine = next(x for x in section(text, "Headline").splitlines() if x.startswith("- the machine, not the code"))
    assert "480 steps where that code's other runs take 399" in machine and "the machine was faster" in machine, machine
    assert not contradictions(text), contradictions(text)


# ---------------------------------------------------------------------------
# The band from repeats on a disturbed machine

def test_repeats_on_a_busy_machine_keep_the_band_tight_and_name_the_disturbed_ones(repo):
    # the step counts of the shape: two clean repeats, two that a busy machine slowed down, so the
    # median step count belongs to a disturbed run
    kept_baseline()
    for i, (bpb, steps) in enumerate(((1.002, 396), (1.080, 180), (1.400, 60))):
        planted(bpb, steps=steps, step_ms=300000.0 / steps, age_s=-5 * (i + 1))
    commit("better schedule", BASE_PY + "WARMDOWN_RATIO = 0.6\n")
    row = planted(0.990, better=0.05, age_s=-30)
    text = analysis(row["run_id"])
    clean = 2 * np.sqrt(2) * np.std([1.000, 1.002], ddof=1)
    noise = section(text, "Noise")
    assert f"noise band: +-{clean:.6f}" in noise, f"band {clean:.6f} expected from the two clean repeats:\n{noise}"
    ids = [r["run_id"] for r in results()]
    assert f"{ids[2]} 180 steps vs 398 (-55%, val_bpb 1.080000); {ids[3]} 60 steps vs 398 (-85%" in noise, noise
    assert ids[1] not in noise.split("left out")[1], "a clean repeat was left out"
    means = 2 * np.std([1.000, 1.002], ddof=1) * np.sqrt(1 + 1 / 2)  # one run against the best code's two clean ones
    assert text.startswith(f"decision: keep — delta -0.011000 vs best {ids[0]} (band ±{means:.6f}, n 1 vs 2): lower "
                           "beyond the noise band"), text.splitlines()[0]
    everyone = 2 * np.sqrt(2) * np.std([1.000, 1.002, 1.080, 1.400], ddof=1)
    assert everyone > 0.5, "the planted repeats no longer show the problem: with them in, the band would be tiny"


def test_one_more_disturbed_repeat_leaves_the_band_as_it_was():
    rows = [{"run_id": f"r{i}", "harness": "h", "status": "discard", "outcome": "ok", "val_bpb": bpb,
             "num_steps": steps, "code_sha": "base"}
            for i, (bpb, steps) in enumerate((("1.000", "400"), ("1.004", "398"), ("0.998", "400")))]
    before = noise_band(rows, rows[-1])
    disturbed = {**rows[0], "run_id": "r3", "val_bpb": "1.300", "num_steps": "120"}
    after = noise_band(rows + [disturbed], disturbed)
    assert after.band == pytest.approx(before.band), f"band {before.band:.6f} -> {after.band:.6f}"
    assert after.disturbed == {"r3": (120.0, 400.0)}, after.disturbed


def test_the_usual_speed_is_the_faster_half_so_half_the_repeats_may_be_disturbed():
    rows = [{"run_id": f"r{i}", "harness": "h", "status": "discard", "outcome": "ok", "val_bpb": "1.0",
             "num_steps": str(n), "code_sha": "base"} for i, n in enumerate((113, 54, 17, 137))]
    noise = noise_band(rows, rows[-1])
    assert set(noise.disturbed) == {"r1", "r2"}, f"the clean runs (113, 137 steps) flagged: {noise.disturbed}"

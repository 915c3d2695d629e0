"""analyze.py archives every run exactly once, never tears its log, guards the harness, and reports
the features planted in synthetic training curves. Each test builds runs in its own temporary git
repository: run_summary.json, metrics.jsonl and run.log written as train.py would write them."""
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
ANALYZE_PY = ROOT / "analyze.py"
sys.path.insert(0, str(ROOT))
import analyze  # noqa: E402
from harness import capture, commands, report  # noqa: E402  (the modules whose functions tests replace)
from harness.archive import COLUMNS, Run, best_after_each, comparable, pick_best, row_bpb  # noqa: E402
from harness.changes import diff_hunks  # noqa: E402
from harness.metrics import Metrics, throughput_stats  # noqa: E402
from harness.noise import compare_curves  # noqa: E402
from harness.plots import draw_layer_heatmap  # noqa: E402
from harness.report import layer_outliers, section_throughput  # noqa: E402

ARCHIVE = Path(".auto-log-research")
STEPS = 400                  # training steps of a synthetic run
ANALYZE_SHA = "b" * 64       # recorded by the summary, but no analyze.py is tracked in the test repository
GPU_HARNESS = {"profile": "gpu", "MAX_SEQ_LEN": 2048, "TIME_BUDGET": 300, "EVAL_TOKENS": 20971520,
               "VOCAB_SIZE": 8192, "overrides": {}}


# ---------------------------------------------------------------------------
# Synthetic runs

def sh(*args):
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sh("git", "init", "-q", "-b", "main")
    sh("git", "config", "user.email", "t@example.com")
    sh("git", "config", "user.name", "test")
    Path("prepare.py").write_text("MAX_SEQ_LEN = 2048\n")
    commit("baseline", "DEPTH = 8\nMATRIX_LR = 0.04\n")
    return tmp_path


def commit(message, train_py):
    Path("train.py").write_text(train_py)
    sh("git", "add", "-A")
    sh("git", "commit", "-q", "-m", message)
    return sh("git", "rev-parse", "HEAD")


def falling(p):
    """A loss curve that has flattened out by the end of training."""
    return 3.0 + 5.0 * np.exp(-12.0 * p)


def write_run(val_bpb=1.0, status="ok", loss=falling, noise=0.01, seed=0, spike=None, layer_scale=None,
              prepare_sha=None, harness_sha=None, harness=GPU_HARNESS, config=None, summary=True, log=None, age_s=0.0,
              steps=STEPS, step_ms=750.0):
    """Write the three run files for the checked-out train.py. spike=(step, size) adds a loss spike;
    layer_scale={name: factor} scales one layer's grad_norm; age_s backdates the whole run; step_ms is
    the typical step time, at which a step holds the same tokens (tokens/s scales with 1 / step_ms)."""
    rng = np.random.default_rng(seed)
    head = sh("git", "rev-parse", "HEAD")
    now = time.time() - age_s
    start = now - 330.0
    p = np.linspace(0.0, 1.0, steps)
    losses = loss(p) + noise * rng.standard_normal(steps)
    if spike:
        losses[spike[0]] += spike[1]
    rows, ema = [], 0.0
    for i in range(steps):
        ema = 0.9 * ema + 0.1 * losses[i]
        row = {"step": i, "time": start + 10 + 300 * p[i], "elapsed_s": 300 * p[i], "train/loss": losses[i],
               "train/loss_smooth": ema / (1 - 0.9 ** (i + 1)), "train/progress": p[i],
               "train/lr_multiplier": min(1.0, 2 * (1 - p[i])), "train/muon_momentum": 0.95,
               "train/weight_decay": 0.2 * (1 - p[i]), "perf/step_time_ms": step_ms + rng.normal(0, 5),
               "perf/tokens_per_sec": 700000.0 * 750.0 / step_ms, "perf/mfu_percent": 40.0}
        if i % (steps // 10) == 0 or i == steps - 1:
            row["val/bpb"] = float(loss(p[i:i + 1])[0]) / 3.0
        if i % 25 == 0:
            for block in range(4):
                for module in ("attn.c_q", "mlp.c_fc"):
                    name = f"{block}.{module}"
                    row[f"layer/{name}/grad_norm"] = 0.5 * (layer_scale or {}).get(name, 1.0)
                    row[f"layer/{name}/update_ratio"] = 1e-3
                row[f"layer/{block}/act_rms"] = 1.0
        rows.append(row)
    Path("metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train_sha = hashlib.sha256(Path("train.py").read_bytes()).hexdigest()
    prepare_sha = prepare_sha or hashlib.sha256(Path("prepare.py").read_bytes()).hexdigest()  # as it ran
    if summary:
        Path("run_summary.json").write_text(json.dumps({
            "status": status, "val_bpb": val_bpb if status == "ok" else None, "training_seconds": 300.0,
            "total_seconds": 330.0, "peak_vram_mb": 46080.0, "mfu_percent": 40.0, "total_tokens_M": 210.0,
            "num_steps": steps, "num_params_M": 50.3, "depth": 8,
            "config": config or {"DEPTH": 8, "MATRIX_LR": 0.04},
            "harness": harness,
            "git": {"commit": head, "dirty": False, "train_py_sha256": train_sha,
                    "prepare_py_sha256": prepare_sha, "analyze_py_sha256": ANALYZE_SHA,
                    **({"harness_sha256": harness_sha} if harness_sha else {})},
            "env": {"python": "3.11", "torch": "2.9.1", "cuda": None, "gpu_name": None, "driver": None},
            "timings": {"started_at": start, "finished_at": now, "startup_s": 8.0, "warmup_s": 12.0,
                        "eval_s": 4.0, "final_eval_s": 20.0},
            "error": None if status == "ok" else "Traceback (most recent call last):\nRuntimeError: boom"}))
        os.utime("run_summary.json", (now, now))
    Path("run.log").write_text(log if log is not None else f"step 399 loss 3.0\n---\nval_bpb: {val_bpb:.6f}\n")
    os.utime("run.log", (now + 0.5, now + 0.5))
    os.utime("metrics.jsonl", (now, now))
    return head


def run_analyze(*argv):
    """analyze.py in this process; returns its exit code."""
    return analyze.main(list(argv))


def results():
    lines = (ARCHIVE / "results.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"))) for line in lines[1:]]


def analysis(run_id):
    return (ARCHIVE / run_id / "analysis.md").read_text()


def section(text, title):
    match = re.search(rf"^## {re.escape(title)}.*?(?=^## |\Z)", text, re.M | re.S)
    assert match, f"no '## {title}' section in:\n{text}"
    return match.group(0)


def archive_run(**kwargs):
    head = write_run(**kwargs)
    assert run_analyze() == 0
    return results()[-1], head


def measure(row, speed, probes=None, heldout=None, reported=None, caught=(), status=None):
    """What `analyze.py run` adds to an archived run: its results.tsv columns and measurement.json (the
    machine's speed in GFLOP/s, `caught` as (case, detail) pairs). The run's analysis.md is rebuilt with
    them; returns the row as results.tsv now holds it."""
    bpb = float(row["val_bpb"])
    heldout = bpb + 0.01 if heldout is None else heldout
    fields = {"measured": "harness", "machine_speed": f"{speed:.1f}", "heldout_bpb": f"{heldout:.6f}",
              "wall_s": "331.2", "outside_s": "31.2", "caught": "; ".join(case for case, _ in caught),
              **({"status": status} if status else {})}
    lines = (ARCHIVE / "results.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    rows = [dict(zip(header, line.split("\t"))) for line in lines[1:]]
    for r in rows:
        if r["run_id"] == row["run_id"]:
            r.update(fields)
    (ARCHIVE / "results.tsv").write_text("".join("\t".join(r[h] for h in header) + "\n"
                                                 for r in [dict(zip(header, header)), *rows]))
    before, after = probes or (speed, speed)
    measurement = {"by": "analyze.py run", "status": "invalid" if caught else "ok", "exit_code": 0, "wall_s": 331.2,
                   "outside_s": 31.2, "final_block": True, "reported_val_bpb": bpb if reported is None else reported,
                   "val_bpb": bpb, "heldout_bpb": heldout, "machine_speed": {"before": before, "after": after},
                   "caught": [{"case": case, "detail": detail} for case, detail in caught], "error": None}
    run_dir = ARCHIVE / row["run_id"]
    (run_dir / "measurement.json").write_text(json.dumps(measurement))
    record = json.loads((run_dir / "record.json").read_text())  # evidence, as `run` records it: audit reads it
    record["files"]["measurement.json"] = hashlib.sha256((run_dir / "measurement.json").read_bytes()).hexdigest()
    record.update({"status": status} if status else {})
    (run_dir / "record.json").write_text(json.dumps(record))
    (run_dir / "analysis.md").unlink()
    assert run_analyze("show", row["run_id"]) == 0
    return next(r for r in results() if r["run_id"] == row["run_id"])


# ---------------------------------------------------------------------------
# Archive and results.tsv

def test_finished_run_is_archived_with_karpathy_columns_files_and_small_plots(repo):
    row, head = archive_run(val_bpb=0.998765)
    header = (ARCHIVE / "results.tsv").read_text().splitlines()[0].split("\t")
    assert header[:5] == ["commit", "val_bpb", "memory_gb", "status", "description"]
    assert (row["commit"], row["val_bpb"], row["memory_gb"], row["status"], row["description"]) == \
        (head[:7], "0.998765", "45.0", "pending", "baseline")
    run_dir = ARCHIVE / head[:7]
    for name in ("run_summary.json", "metrics.jsonl", "run.log", "analysis.md", "diff.patch", "loss.png",
                 "val_bpb.png", "schedules.png", "throughput.png", "layers_grad_norm.png"):
        assert (run_dir / name).exists(), f"{name} missing from {sorted(p.name for p in run_dir.iterdir())}"
    for png in [*run_dir.glob("*.png"), ARCHIVE / "progress.png"]:
        assert png.stat().st_size <= 200_000, f"{png} is {png.stat().st_size} bytes"
    text = analysis(head[:7])
    for title in ("Headline", "What changed", "Trajectory", "Where it departs from the best", "Stability",
                  "Throughput", "Per-layer health", "Noise", "Agent notes"):
        section(text, title)
    for boilerplate in ("Lineage", "Files"):  # program.md says where a run's files are; `list` shows the kept runs
        assert f"## {boilerplate}" not in text, text
    assert text.rstrip().endswith("## Agent notes"), "the Agent notes section must be last and empty"
    assert "MUST" not in text and "you should" not in text.lower()


def test_second_invocation_for_the_same_run_adds_nothing(repo, capsys):
    row, head = archive_run()
    before = {p: p.stat().st_mtime_ns for p in ARCHIVE.rglob("*") if p.is_file()}
    assert run_analyze() == 0
    assert "already archived" in capsys.readouterr().out
    after = {p: p.stat().st_mtime_ns for p in ARCHIVE.rglob("*") if p.is_file()}
    assert len(results()) == 1 and after == before, f"files changed: {set(after.items()) ^ set(before.items())}"


def test_rerun_of_the_same_commit_gets_its_own_directory_and_measures_noise(repo):
    first, head = archive_run(val_bpb=1.000)
    second, _ = archive_run(val_bpb=1.004, age_s=-5)  # a later run of the same commit
    assert [first["run_id"], second["run_id"]] == [head[:7], f"{head[:7]}-2"]
    noise = section(analysis(second["run_id"]), "Noise")
    assert "2 runs" in noise and "range 0.004000" in noise, noise


def test_crash_with_summary_is_a_crash_row_with_its_error(repo):
    row, head = archive_run(status="crash")
    assert (row["val_bpb"], row["memory_gb"], row["status"], row["outcome"]) == ("0.000000", "0.0", "crash", "crash")
    assert "RuntimeError: boom" in section(analysis(row["run_id"]), "Crash")
    assert "## Per-layer health" not in analysis(row["run_id"]), "a crash's layers compared as if it had finished"


def test_a_crash_can_never_be_kept_not_even_through_discard(repo):
    row, _ = archive_run(status="crash")
    run_analyze("status", row["run_id"], "discard")
    with pytest.raises(SystemExit, match="cannot be kept"):
        run_analyze("status", row["run_id"], "keep")
    assert pick_best(results(), results()[-1]["harness"]) is None, "a crash (val_bpb 0.000000) became the best"


def test_crash_without_summary_is_recorded_for_head_with_the_traceback_from_run_log(repo):
    base, _ = archive_run()
    run_analyze("status", base["run_id"], "keep")  # diff.patch is against the best
    head = commit("use a broken attention", "DEPTH = 8\ndef f(:\n")
    for name in ("run_summary.json", "metrics.jsonl"):
        Path(name).unlink()
    Path("run.log").write_text('Traceback (most recent call last):\n  File "train.py", line 2\n'
                               "    def f(:\n          ^\nSyntaxError: invalid syntax\n")
    assert run_analyze() == 0
    row = results()[-1]
    assert (row["commit"], row["status"], row["outcome"]) == (head[:7], "crash", "no_summary")
    assert row["description"] == "use a broken attention"
    crash = section(analysis(row["run_id"]), "Crash")
    assert "SyntaxError: invalid syntax" in crash, crash
    assert "+def f(:" in (ARCHIVE / row["run_id"] / "diff.patch").read_text()


def test_stale_summary_is_recorded_as_a_crash_of_the_commit_actually_run(repo):
    first, old_head = archive_run(age_s=600)
    head = commit("typo in train.py", "DEPTH = 8\nimport nonexistent_module\n")
    Path("run.log").write_text("Traceback (most recent call last):\nModuleNotFoundError: No module named 'nonexistent_module'\n")
    assert run_analyze() == 0
    row = results()[-1]
    assert (row["commit"], row["status"], row["outcome"]) == (head[:7], "crash", "stale_summary"), row
    assert not (ARCHIVE / row["run_id"] / "metrics.jsonl").exists(), "the earlier run's curves were archived as this run's"
    text = analysis(row["run_id"])
    assert "earlier run" in text and "ModuleNotFoundError" in section(text, "Crash")
    assert len(results()) == 2 and results()[0]["run_id"] == old_head[:7]
    kept = ARCHIVE / row["run_id"] / "stale_run_summary.json"
    assert json.loads(kept.read_text())["git"]["commit"] == old_head, "the stale summary was dropped"
    assert "kept as stale_run_summary.json" in section(text, "Headline")


def test_finished_run_archived_after_the_next_commit_is_ok_under_its_own_commit(repo):
    best, base = archive_run(val_bpb=1.0)
    run_analyze("status", best["run_id"], "keep")
    ran = commit("deeper", "DEPTH = 9\nMATRIX_LR = 0.04\n")
    write_run(val_bpb=0.99, age_s=-5)
    head = commit("deeper still", "DEPTH = 10\nMATRIX_LR = 0.04\n")  # committed before analyze.py ran
    assert run_analyze() == 0
    row = results()[-1]
    assert (row["commit"], row["status"], row["outcome"], row["val_bpb"], row["description"]) == \
        (ran[:7], "pending", "ok", "0.990000", "deeper"), row
    assert (ARCHIVE / row["run_id"] / "metrics.jsonl").exists()
    patch = (ARCHIVE / row["run_id"] / "diff.patch").read_text()
    assert "+DEPTH = 9" in patch and "DEPTH = 10" not in patch, patch
    assert f"HEAD has moved to {head[:7]}" in section(analysis(row["run_id"]), "Headline")


def test_archiving_again_after_the_next_commit_adds_nothing(repo, capsys):
    archive_run()
    commit("next idea", "DEPTH = 9\n")
    capsys.readouterr()
    assert run_analyze() == 0
    assert "already archived" in capsys.readouterr().out
    later = time.time() + 600  # run.log touched, not rewritten: its contents are what was archived
    os.utime("run.log", (later, later))
    assert run_analyze() == 0
    assert "already archived" in capsys.readouterr().out
    assert len(results()) == 1


def test_archived_summary_with_a_rewritten_run_log_is_stale_even_within_the_time_slack(repo):
    first, _ = archive_run()
    mtime = Path("run.log").stat().st_mtime
    head = commit("typo", "DEPTH = 8\nimport nonexistent_module\n")
    Path("run.log").write_text("Traceback (most recent call last):\nModuleNotFoundError: nonexistent_module\n")
    os.utime("run.log", (mtime + 1, mtime + 1))  # a fast crash: no time lag to go by
    assert run_analyze() == 0
    row = results()[-1]
    assert (row["commit"], row["status"], row["outcome"]) == (head[:7], "crash", "stale_summary"), row
    assert f"archived as {first['run_id']}, whose run.log differs" in section(analysis(row["run_id"]), "Headline")


def test_summary_older_than_run_log_is_stale_even_for_the_same_commit(repo):
    archive_run(age_s=600)  # summary finished 10 minutes ago; now train.py fails before writing a new one
    Path("run.log").write_text("Traceback (most recent call last):\nOSError: data shard missing\n")
    assert run_analyze() == 0
    row = results()[-1]
    assert (row["status"], row["outcome"]) == ("crash", "stale_summary"), row
    assert "s after it finished" in analysis(row["run_id"])


def test_changed_prepare_py_makes_the_run_invalid_and_it_can_never_be_kept(repo):
    first, _ = archive_run(val_bpb=1.0)
    run_analyze("status", first["run_id"], "keep")
    pin = sh("git", "rev-parse", "refs/auto-log-research/pins/main")
    assert pin == sh("git", "rev-parse", "HEAD"), "the first run pins the branch where it began"
    commit("edit the metric", "DEPTH = 8\nMATRIX_LR = 0.05\n")
    row, _ = archive_run(val_bpb=0.5, prepare_sha="c" * 64, age_s=-5)  # prepare.py was edited while it ran
    assert row["status"] == "invalid"
    assert f"prepare.py (sha256 cccccccc when it ran vs pinned" in section(analysis(row["run_id"]), "Headline")
    for status in ("discard", "keep", "crash"):  # discard-then-keep used to launder it into the best
        with pytest.raises(SystemExit, match="is `invalid`: its harness differs from its branch's pin") as err:
            run_analyze("status", row["run_id"], status)
        assert "\n" not in str(err.value)
    assert results()[1]["status"] == "invalid"
    assert pick_best(results(), row["harness"])["run_id"] == first["run_id"]
    assert row["run_id"] not in [r["run_id"] for r in comparable(results(), row["harness"])]


def test_run_of_uncommitted_train_py_is_flagged_and_cannot_be_kept(repo):
    Path("train.py").write_text("DEPTH = 8\nMATRIX_LR = 0.08\n")  # edited, never committed
    row, head = archive_run()
    headline = section(analysis(row["run_id"]), "Headline")
    assert "[uncommitted changes]: train.py as run" in headline and f"not commit {head[:7]}'s" in headline, headline
    with pytest.raises(SystemExit, match=f"run {row['run_id']} ran train.py with uncommitted changes") as err:
        run_analyze("status", row["run_id"], "keep")
    assert "\n" not in str(err.value) and "commit the change and rerun" in str(err.value)
    assert results()[0]["status"] == "pending"
    assert run_analyze("status", row["run_id"], "discard") == 0


def test_a_measured_run_shows_the_harnesss_number_held_out_machine_speed_and_caught_cases(repo):
    base, _ = archive_run(val_bpb=1.000)
    run_analyze("status", base["run_id"], "keep")
    measure(base, 100.0, heldout=1.012)
    commit("train on the validation shard", "DEPTH = 8\nMATRIX_LR = 0.04\nSPLIT = 'val'\n")
    row, _ = archive_run(val_bpb=0.950, age_s=-5)
    gap = "held-out minus val_bpb 0.130000 against the best's 0.012000"
    row = measure(row, 104.0, probes=(103.0, 105.0), heldout=1.080, reported=0.951, status="invalid",
                  caught=[("trained on validation data", gap)])
    text = analysis(row["run_id"])
    assert text.splitlines()[0] == (f"decision: discard — delta -0.050000 vs best {base['run_id']} (band unknown, "
                                    "n 1 vs 1): caught: trained on validation data"), text.splitlines()[0]
    headline = section(text, "Headline").splitlines()
    assert headline[1] == ("- val_bpb **0.950000**, status `invalid`, outcome `ok`; measured by the harness (train.py "
                           "printed 0.951000); held-out bpb 1.080000"), headline
    assert "331.2 s wall (31.2 s outside the budget)" in headline[2], headline
    assert ("- machine speed 104 GFLOP/s (probes 103 before and 105 after the evaluation, 2% apart) vs 100, the "
            "median of the best's 1 run(s): +4%, within 10%: the same machine") in headline, headline
    assert f"- caught: trained on validation data: {gap}" in headline, headline


def test_runs_under_another_harness_are_not_compared(repo):
    archive_run(val_bpb=1.0)
    cpu = {**GPU_HARNESS, "profile": "cpu", "TIME_BUDGET": 60}
    row, _ = archive_run(val_bpb=1.5, harness=cpu, age_s=-5)
    headline = section(analysis(row["run_id"]), "Headline")
    assert "vs best: no earlier comparable run" in headline, headline
    assert row["harness"].startswith("cpu:")


def test_status_keep_updates_results_and_rewrites_only_the_current_best_section(repo, capsys):
    ARCHIVE.mkdir()
    (ARCHIVE / "insights.md").write_text("# Insights\n\n## Current Best\nold\n\n## Findings\n- depth 12 OOMs\n")
    row, head = archive_run(val_bpb=0.987654)
    assert run_analyze("status", row["run_id"], "keep") == 0
    assert results()[0]["status"] == "keep"
    insights = (ARCHIVE / "insights.md").read_text()
    best = section(insights, "Current Best")
    assert head[:7] in best and "0.987654" in best and "old" not in best, insights
    assert "## Findings\n- depth 12 OOMs" in insights
    assert run_analyze("best") == 0 and row["run_id"] in capsys.readouterr().out


def test_status_keep_creates_insights_md_and_discarding_the_best_updates_it(repo):
    row, head = archive_run()
    run_analyze("status", row["run_id"], "keep")
    assert head[:7] in section((ARCHIVE / "insights.md").read_text(), "Current Best")
    run_analyze("status", row["run_id"], "discard")
    assert "no run kept" in section((ARCHIVE / "insights.md").read_text(), "Current Best")


def test_best_is_the_most_recently_kept_run_even_when_its_val_bpb_is_higher(repo, capsys):
    base, _ = archive_run(val_bpb=1.000)
    run_analyze("status", base["run_id"], "keep")
    head = commit("remove value embeddings", "DEPTH = 8\n")  # a simplification, inside the noise
    simple, _ = archive_run(val_bpb=1.002, age_s=-5)
    run_analyze("status", simple["run_id"], "keep")
    capsys.readouterr()
    run_analyze("best")
    assert capsys.readouterr().out.startswith(f"{simple['run_id']}\tcommit {head[:7]}\t")
    run_analyze("list")
    marked = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line[11:12] == "*"]
    assert marked == [simple["run_id"]], marked
    assert head[:7] in section((ARCHIVE / "insights.md").read_text(), "Current Best")
    commit("next idea", "DEPTH = 9\n")
    row, _ = archive_run(val_bpb=1.001, age_s=-10)
    assert f"vs best ({simple['run_id']}, 1.002000)" in section(analysis(row["run_id"]), "Headline")


def test_a_pending_run_is_never_the_best_so_an_undecided_quick_start_run_sets_no_bar(repo, capsys):
    quick, _ = archive_run(val_bpb=0.900)  # the README's quick start, archived and never decided
    capsys.readouterr()
    run_analyze("best")
    assert capsys.readouterr().out.startswith("no best run yet"), "a pending run became the best"
    commit("the agent's baseline", "DEPTH = 9\n")
    row, _ = archive_run(val_bpb=1.000, age_s=-5)
    text = analysis(row["run_id"])
    assert text.startswith("decision: keep — no best yet (n 1): nothing kept yet: this run is the baseline"), text[:300]
    assert "vs best: no earlier comparable run" in section(text, "Headline")
    run_analyze("status", row["run_id"], "keep")
    run_analyze("status", row["run_id"], "discard")
    assert "no run kept" in section((ARCHIVE / "insights.md").read_text(), "Current Best")


def test_a_rebuilt_analysis_compares_with_the_best_its_diff_was_written_against(repo):
    base, _ = archive_run(val_bpb=1.000)
    run_analyze("status", base["run_id"], "keep")
    commit("idea", "DEPTH = 9\n")
    row, _ = archive_run(val_bpb=1.010, age_s=-5)
    run_analyze("status", base["run_id"], "discard")  # a later decision changes which run is best
    (ARCHIVE / row["run_id"] / "analysis.md").unlink()
    run_analyze("show", row["run_id"])
    assert f"## What changed (against best {base['run_id']})" in analysis(row["run_id"])


def test_best_over_time_follows_the_last_kept_run_and_may_step_up():
    rows = [{"status": s, "val_bpb": v} for s, v in
            (("pending", "1.01"), ("pending", "1.00"), ("keep", "1.00"), ("discard", "0.99"), ("keep", "1.002"))]
    assert [b and row_bpb(b) for b in best_after_each(rows)] == [None, None, 1.00, 1.00, 1.002]
    assert pick_best([{**r, "harness": ""} for r in rows], "")["val_bpb"] == "1.002"


def test_status_rewrites_the_headline_of_analysis_md_but_not_the_agent_notes(repo, capsys):
    row, _ = archive_run()
    path = ARCHIVE / row["run_id"] / "analysis.md"
    path.write_text(path.read_text() + "\n- status `pending` was my first guess\n")
    run_analyze("status", row["run_id"], "keep")
    text = path.read_text()
    assert "status `keep`" in section(text, "Headline"), section(text, "Headline")
    assert section(text, "Agent notes").endswith("- status `pending` was my first guess\n")
    capsys.readouterr()
    run_analyze("show", row["run_id"])
    assert "status `keep`" in capsys.readouterr().out


def test_concurrent_invocations_for_one_run_archive_it_once(repo):
    write_run()
    procs = [subprocess.Popen([sys.executable, str(ANALYZE_PY)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(4)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1].decode()[-500:] for o in outs]
    assert len(results()) == 1, results()
    assert sorted(p.name for p in ARCHIVE.iterdir() if p.is_dir()) == [results()[0]["run_id"]]


def test_concurrent_status_updates_are_all_kept(repo):
    ids = []
    for i in range(4):
        commit(f"idea {i}", f"DEPTH = {9 + i}\n")
        ids.append(archive_run(val_bpb=1.0 - 0.01 * i, age_s=-5 * i)[0]["run_id"])
    wanted = dict(zip(ids, ("keep", "discard", "keep", "discard")))
    procs = [subprocess.Popen([sys.executable, str(ANALYZE_PY), "status", rid, st], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for rid, st in wanted.items()]
    for p in procs:
        assert p.wait(timeout=60) == 0, p.stderr.read().decode()
    got = {r["run_id"]: r["status"] for r in results()}
    assert got == wanted, f"lost updates: {got} != {wanted}"


def test_killed_invocation_never_leaves_a_torn_log(repo):
    write_run()
    for delay in (0.3, 0.8):
        proc = subprocess.Popen([sys.executable, str(ANALYZE_PY)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if (ARCHIVE / "results.tsv").exists():
            assert all(len(r) == len(COLUMNS) for r in results()), "torn results.tsv"
    assert run_analyze() == 0
    assert len(results()) == 1 and (ARCHIVE / results()[0]["run_id"] / "analysis.md").exists()


def test_failure_while_storing_leaves_no_row_and_the_next_invocation_archives_cleanly(repo, monkeypatch):
    head = write_run()

    def broken_diff(*args):
        raise OSError("disk full")
    monkeypatch.setattr(capture, "train_py_diff", broken_diff)
    with pytest.raises(OSError):
        run_analyze()
    assert not (ARCHIVE / "results.tsv").exists()
    monkeypatch.undo()
    monkeypatch.chdir(repo)
    assert run_analyze() == 0
    assert [r["run_id"] for r in results()] == [head[:7]]
    assert not list(ARCHIVE.glob(".tmp-*"))


def test_failure_while_analysing_keeps_the_record_and_a_rerun_completes_the_analysis(repo, monkeypatch):
    write_run()

    def broken_plot(*args):
        raise RuntimeError("no display")
    monkeypatch.setattr(report, "draw_overlays", broken_plot)
    with pytest.raises(RuntimeError):
        run_analyze()
    assert len(results()) == 1
    monkeypatch.setattr(report, "draw_overlays", lambda *args: [])
    assert run_analyze() == 0
    assert len(results()) == 1 and (ARCHIVE / results()[0]["run_id"] / "analysis.md").exists()


def test_run_stored_but_not_logged_is_adopted_not_archived_twice(repo, monkeypatch):
    head = write_run()

    def killed(rows):  # the process died between renaming the run directory and writing results.tsv
        raise OSError("killed")
    monkeypatch.setattr(commands, "write_results", killed)
    with pytest.raises(OSError):
        run_analyze()
    assert (ARCHIVE / head[:7]).is_dir()
    monkeypatch.undo()
    monkeypatch.chdir(repo)
    assert run_analyze() == 0
    assert [r["run_id"] for r in results()] == [head[:7]]
    assert sorted(p.name for p in ARCHIVE.iterdir() if p.is_dir()) == [head[:7]]


def test_torn_row_is_reported_set_aside_and_its_run_adopted_again(repo, capsys):
    first, _ = archive_run(val_bpb=1.0)
    commit("deeper", "DEPTH = 9\n")
    second, _ = archive_run(val_bpb=0.99, age_s=-5)
    lines = (ARCHIVE / "results.tsv").read_text().splitlines()
    torn = "\t".join(lines[2].split("\t")[:3])
    (ARCHIVE / "results.tsv").write_text("\n".join([*lines[:2], torn]) + "\n")
    capsys.readouterr()
    assert run_analyze("list") == 0
    out, err = capsys.readouterr()
    assert "results.tsv line 3 is torn (3 fields)" in err and first["run_id"] in out, (out, err)
    assert run_analyze() == 0  # the run files of the torn row's run are still in the working directory
    assert [r["run_id"] for r in results()] == [first["run_id"], second["run_id"]]
    assert all(len(r) == len(COLUMNS) for r in results()), "a row was padded with blanks"
    assert (ARCHIVE / "results.tsv.torn").read_text() == torn + "\n"
    assert not (ARCHIVE / f"{second['run_id']}-2").exists()


def test_karpathy_five_column_results_tsv_lists_and_names_the_last_kept_best(repo, capsys):
    ARCHIVE.mkdir()
    (ARCHIVE / "results.tsv").write_text("commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
                                         "a1b2c3d\t0.997900\t44.0\tkeep\tbaseline\n"
                                         "b2c3d4e\t0.993200\t44.2\tkeep\tincrease LR to 0.04\n"
                                         "c3d4e5f\t1.005000\t44.0\tdiscard\tswitch to GeLU\n")
    assert run_analyze("list") == 0
    out = capsys.readouterr().out
    assert "increase LR to 0.04" in out and "switch to GeLU" in out, out
    assert [line.split()[0] for line in out.splitlines() if line[11:12] == "*"] == ["b2c3d4e"], out
    assert run_analyze("best") == 0
    assert capsys.readouterr().out.startswith("b2c3d4e\tcommit b2c3d4e\t")


def test_non_utf8_results_tsv_is_one_clear_line(repo):
    ARCHIVE.mkdir()
    (ARCHIVE / "results.tsv").write_bytes(b"commit\tval_bpb\nab\xe9cdef\t1.0\n")
    with pytest.raises(SystemExit, match="results.tsv is not UTF-8 text") as err:
        run_analyze("list")
    assert "\n" not in str(err.value)


def test_temporary_files_of_killed_invocations_are_cleaned_up(repo):
    row, _ = archive_run()
    leftovers = [ARCHIVE / ".results.tsv.999.tmp", ARCHIVE / ".progress.999.png", ARCHIVE / ".progress.png.999.tmp",
                 ARCHIVE / ".insights.md.999.tmp", ARCHIVE / row["run_id"] / ".analysis.md.999.tmp"]
    for path in leftovers:
        path.write_text("half")
    (ARCHIVE / ".tmp-abc1234").mkdir()
    run_analyze("status", row["run_id"], "keep")
    (ARCHIVE / row["run_id"] / "analysis.md").unlink()
    run_analyze("show", row["run_id"])  # rebuilds the analysis, in the run's directory
    left = [p.name for p in ARCHIVE.rglob(".*") if p.name != ".lock"]
    assert not left, f"left behind: {left}"


def test_show_and_status_never_pin_the_harness(repo):
    row, _ = archive_run()
    sh("git", "update-ref", "-d", "refs/auto-log-research/pins/main")
    (ARCHIVE / row["run_id"] / "analysis.md").unlink()
    run_analyze("show", row["run_id"])
    run_analyze("status", row["run_id"], "discard")
    assert not sh("git", "for-each-ref", "refs/auto-log-research/"), "rebuilding an analysis pinned the harness"
    commit("next idea", "DEPTH = 9\n")
    nxt, _ = archive_run(age_s=-5)  # runs were archived on main: its lost pin is not silently re-made
    assert nxt["status"] == "invalid" and not sh("git", "for-each-ref", "refs/auto-log-research/")
    assert "branch main has no pin although 1 run(s)" in section(analysis(nxt["run_id"]), "Headline")


# ---------------------------------------------------------------------------
# Bad input

def test_half_written_last_line_and_corrupt_lines_of_metrics_are_skipped_and_reported(repo):
    write_run()
    lines = Path("metrics.jsonl").read_text().splitlines(keepends=True)
    lines[100] = "{not json\n"
    Path("metrics.jsonl").write_text("".join(lines) + '{"step": 400, "train/lo')
    assert run_analyze() == 0
    headline = section(analysis(results()[0]["run_id"]), "Headline")
    assert "half-written" in headline and "1 unreadable line(s) skipped (lines 101)" in headline, headline
    assert results()[0]["status"] == "pending"


def test_corrupt_summary_is_kept_and_the_run_recorded_as_a_crash(repo):
    write_run()
    Path("run_summary.json").write_text('{"status": "ok", "val_')
    assert run_analyze() == 0
    row = results()[0]
    assert (row["status"], row["outcome"]) == ("crash", "corrupt_summary")
    assert (ARCHIVE / row["run_id"] / "run_summary.json.corrupt").exists()
    assert "run_summary.json is not valid JSON" in analysis(row["run_id"])


def test_outside_git_and_with_nothing_to_archive_the_error_is_one_clear_line(tmp_path_factory, monkeypatch, repo):
    with pytest.raises(SystemExit, match="nothing to archive"):
        run_analyze()
    monkeypatch.chdir(tmp_path_factory.mktemp("not_a_repo"))
    with pytest.raises(SystemExit, match="not a git repository") as err:
        run_analyze()
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------
# Curves with known features

def test_loss_spike_at_a_known_step_is_reported_with_its_size(repo):
    row, _ = archive_run(spike=(250, 2.0))
    stability = section(analysis(row["run_id"]), "Stability")
    match = re.search(r"step (\d+) \(progress [\d.]+\): loss [\d.]+ vs [\d.]+ typical \(\+([\d.]+)", stability)
    assert match and int(match.group(1)) == 250, stability
    assert abs(float(match.group(2)) - 2.0) < 0.1, f"spike size {match.group(2)} != 2.0"


def test_departure_from_the_best_is_found_at_the_known_progress_fraction(repo):
    best, _ = archive_run(val_bpb=1.0)
    run_analyze("status", best["run_id"], "keep")
    commit("higher lr", "DEPTH = 8\nMATRIX_LR = 0.08\n")
    def worse(p):  # the best's curve until progress 0.4, then a growing gap
        return falling(p) + 0.5 * np.clip(p - 0.4, 0, None)
    row, _ = archive_run(val_bpb=1.05, loss=worse, config={"DEPTH": 8, "MATRIX_LR": 0.08}, seed=1, age_s=-5)
    text = analysis(row["run_id"])
    loss_line = next(line for line in section(text, "Where it departs").splitlines() if "train loss" in line)
    found = float(re.search(r"departs from the best at progress ([\d.]+)", loss_line).group(1))
    assert 0.38 <= found <= 0.47, f"departure at {found}, planted at 0.40: {loss_line}"
    assert "this run is behind" in loss_line and ": grows;" in loss_line, loss_line
    assert "MATRIX_LR: 0.04 -> 0.08" in section(text, "What changed")


def test_identical_curves_do_not_depart(repo):
    best, _ = archive_run(val_bpb=1.0)
    run_analyze("status", best["run_id"], "keep")
    row, _ = archive_run(val_bpb=1.0, seed=1, age_s=-5)
    departs = section(analysis(row["run_id"]), "Where it departs")
    assert "within" in departs and "departs from the best at" not in departs, departs


def cpu_rows(steps, val, loss=None, warmup=11, val_rows=True):
    """metrics.jsonl rows as the cpu profile writes them: `warmup` compile steps at progress 0, then
    `steps` counted steps. val/bpb is measured before the first step at or past each tenth of progress,
    in its own row at that progress (val_rows) or, as older runs logged it, in that step's training row."""
    loss = loss or val
    rows, before, val_at = [], 0.0, [k / 10 for k in range(10)]
    for step in range(warmup + steps):
        after = max(0.0, (step - warmup + 1) / steps)
        row = {"step": step, "train/progress": after, "train/loss": float(loss(after)),
               "train/loss_smooth": float(loss(after)), "perf/step_time_ms": 300.0}
        if val_at and before >= val_at[0]:
            val_at = [x for x in val_at if x > before]
            if val_rows:
                rows.append({"step": step, "train/progress": before, "val/bpb": float(val(before))})
            else:
                row["val/bpb"] = float(val(before))
        rows.append(row)
        before = after
    rows.append({"step": warmup + steps, "train/progress": 1.0, "val/bpb": float(val(1.0))})
    return rows


def curve_lines(rows_a, rows_b, val_band=None):
    """{'train loss (smoothed)': line, 'in-training val/bpb': line} of run a against run b."""
    lines = compare_curves(Metrics(rows_a), Metrics(rows_b), val_band, "this run", "the best")
    return {line[2:].split(":")[0]: line for line in lines}


def steep(p):
    """A cpu-profile val curve: most of its fall in the first tenth of training."""
    return 2.2 + 1.5 * np.exp(-15.0 * np.asarray(p))


@pytest.mark.parametrize("val_rows", [True, False], ids=["val-in-own-row", "val-in-training-row"])
def test_repeats_whose_steps_fall_at_other_progress_do_not_depart_on_a_steep_val_curve(val_rows):
    # one train.py, two machines' speeds: 73 and 64 counted steps, so the val points sit up to a step apart
    line = curve_lines(cpu_rows(73, steep, val_rows=val_rows), cpu_rows(64, steep, val_rows=val_rows))["in-training val/bpb"]
    assert "within the threshold of the best" in line, line
    assert "for one step of misalignment" in line, line


def test_val_departure_holds_for_two_val_points_and_a_single_blip_is_none():
    def blip(at):
        return lambda p: steep(p) + 0.05 * np.isin(np.round(np.asarray(p), 3), at)
    best = cpu_rows(64, steep)
    one = cpu_rows(64, blip([0.5]))
    line = curve_lines(one, best, val_band=0.01)["in-training val/bpb"]
    assert "within the threshold" in line, f"one val point off the curve read as a departure: {line}"
    two = cpu_rows(64, blip([0.5, 0.609]))
    points = [r["train/progress"] for r in two if "val/bpb" in r]
    assert {0.5, 0.609} <= {round(x, 3) for x in points}, points
    line = curve_lines(two, best, val_band=0.01)["in-training val/bpb"]
    assert "departs from the best at progress 0.50 (gap +0.0500" in line, line


def test_loss_alignment_starts_after_the_warm_up_steps_at_progress_zero():
    def flat(p):
        return 3.0 + 0.0 * np.asarray(p)
    a, b = cpu_rows(40, flat, warmup=11), cpu_rows(40, flat, warmup=3)
    for rows, warm_loss in ((a, 6.0), (b, 4.0)):  # compile steps: their own losses, all at progress 0
        for r in rows:
            if "train/loss" in r and r["train/progress"] == 0:
                r["train/loss"] = r["train/loss_smooth"] = warm_loss
    line = curve_lines(a, b)["train loss (smoothed)"]
    assert "within the threshold of the best at all 200 points of progress 0.03-1.00" in line, line


def test_gap_trend_compares_the_gap_at_the_departure_with_the_gap_at_the_end():
    def base(p):
        return 3.0 + 0.0 * np.asarray(p)

    def rises_then_holds(p):  # the gap grows from progress 0.5 to 0.8, then holds at 0.3
        return base(p) + 0.3 * np.clip((np.asarray(p) - 0.5) / 0.3, 0.0, 1.0)

    def rises_then_closes(p):  # up to 0.3 at progress 0.7, back to 0.1 at the end
        q = np.asarray(p)
        return base(p) + np.where(q < 0.7, 1.5 * np.clip(q - 0.5, 0.0, None), 0.3 - (q - 0.7) * 2 / 3)
    best = cpu_rows(400, base, warmup=0)
    line = curve_lines(cpu_rows(400, rises_then_holds, warmup=0), best)["train loss (smoothed)"]
    match = re.search(r"the gap goes ([+-][\d.]+) -> ([+-][\d.]+) from there to progress 1.00, the last common "
                      r"point: (\w+)", line)
    assert match, line
    assert float(match.group(1)) < 0.02 and abs(float(match.group(2)) - 0.3) < 1e-3 and match.group(3) == "grows", line
    line = curve_lines(cpu_rows(400, rises_then_closes, warmup=0), best)["train loss (smoothed)"]
    assert ": grows;" in line, line  # departs at ~0.5 with a tiny gap, ends at 0.1
    late = cpu_rows(400, rises_then_closes, warmup=0)
    for r in late:  # the same gap, seen from where it is already large
        if "train/loss" in r and r["train/progress"] < 0.7:
            r["train/loss"] = r["train/loss_smooth"] = 3.0
    line = curve_lines(late, best)["train loss (smoothed)"]
    assert "departs from the best at progress 0.70" in line and ": closes;" in line, line


def test_gap_names_its_largest_value_and_the_other_runs_stalls():
    def base(p):
        return 3.0 + 0.0 * np.asarray(p)

    def bump(p):  # a gap of 0.3 at progress 0.6 that closes again by the end
        return base(p) + 0.3 * np.exp(-(((np.asarray(p) - 0.6) / 0.08) ** 2))
    best = cpu_rows(400, base, warmup=3)
    for r in best:
        if "perf/step_time_ms" in r and r["train/progress"] == 0:
            r["perf/step_time_ms"] = 20000.0  # compilation: not counted, so no stall
        elif "perf/step_time_ms" in r and r["train/progress"] in (0.5, 0.55):
            r["perf/step_time_ms"] = 3000.0
    lines = compare_curves(Metrics(cpu_rows(400, bump, warmup=3)), Metrics(best), None,
                                   "this run", "the best")
    loss = next(line for line in lines if line.startswith("- train loss"))
    match = re.search(r"largest \|gap\| ([+-][\d.]+) at progress ([\d.]+)", loss)
    assert match and abs(float(match.group(1)) - 0.3) < 2e-3 and match.group(2) == "0.60", loss
    assert "- stalls (counted step > 3x median): the best: 2 at progress 0.50-0.55 (6.0 s in them)" in lines, lines


def test_still_falling_loss_and_plateaued_loss_are_told_apart(repo):
    def still(p):
        return 3.0 + 3.0 * np.exp(-5.0 * p) - 0.4 * p
    row, _ = archive_run(loss=still)
    trajectory = section(analysis(row["run_id"]), "Trajectory")
    assert "over 40 steps" in trajectory and "still improving" in trajectory, trajectory
    row, _ = archive_run(loss=lambda p: 3.0 + 5.0 * np.exp(-30.0 * p), age_s=-5)
    assert "plateaued" in section(analysis(row["run_id"]), "Trajectory")


def measured_base_and_two_repeats():
    """The best kept at 1.000 and two repeats of its code: a band from 3 runs, 2 degrees of freedom."""
    base, _ = archive_run(val_bpb=1.000)
    run_analyze("status", base["run_id"], "keep")
    for i, bpb in enumerate((1.006, 0.997)):
        archive_run(val_bpb=bpb, age_s=-5 * (i + 1))
    return base, np.std([1.000, 1.006, 0.997], ddof=1)


def test_gain_inside_the_noise_band_is_rerun_and_a_large_gain_is_kept(repo):
    row, _ = archive_run(val_bpb=1.000)
    assert "unknown" in section(analysis(row["run_id"]), "Noise")
    run_analyze("status", row["run_id"], "keep")
    for i, bpb in enumerate((1.006, 0.997)):
        archive_run(val_bpb=bpb, age_s=-5 * (i + 1))
    band = 2 * np.std([1.000, 1.006, 0.997], ddof=1) * np.sqrt(1 + 1 / 3)  # one run against the mean of three
    commit("small tweak", "DEPTH = 8\nMATRIX_LR = 0.041\n")
    small, _ = archive_run(val_bpb=0.995, age_s=-20)
    assert analysis(small["run_id"]).splitlines()[0].startswith(
        f"decision: rerun — delta -0.006000 vs best {row['run_id']} (band ±{band:.6f}, n 1 vs 3): lower but inside "
        "the noise band, on 1 run(s): another run of this code firms up its mean")
    commit("big tweak", "DEPTH = 8\nMATRIX_LR = 0.03\n")
    big, _ = archive_run(val_bpb=0.950, age_s=-25)
    assert analysis(big["run_id"]).splitlines()[0].startswith(
        f"decision: keep — delta -0.051000 vs best {row['run_id']} (band ±{band:.6f}, n 1 vs 3): lower beyond the "
        "noise band")


def test_noise_band_is_two_sqrt_two_sigma_of_a_difference_and_names_its_degrees_of_freedom(repo):
    base, std = measured_base_and_two_repeats()
    band = 2 * np.sqrt(2) * std  # 0.012961; 2 sigma alone would be 0.009165
    commit("small tweak", "DEPTH = 8\nMATRIX_LR = 0.041\n")
    row, _ = archive_run(val_bpb=0.989, age_s=-20)
    noise = section(analysis(row["run_id"]), "Noise")
    assert f"noise band: +-{band:.6f}" in noise and "from 3 runs of 1 repeated code(s) at their usual speed, 2 " \
        "degrees of freedom" in noise, noise
    means = 2 * std * np.sqrt(1 / 1 + 1 / 3)  # the decision's: one run against the mean of the best's three
    assert f"for the decision's means of 1 vs 3 runs: +-{means:.6f}" in noise, noise
    assert f"(band ±{means:.6f}, n 1 vs 3)" in analysis(row["run_id"]).splitlines()[0]


def test_noise_band_leaves_out_a_repeat_that_ran_far_fewer_steps_and_names_it(repo):
    base, _ = archive_run(val_bpb=1.000)
    run_analyze("status", base["run_id"], "keep")
    second, _ = archive_run(val_bpb=1.002, age_s=-5)
    row, _ = archive_run(val_bpb=1.030, steps=300, age_s=-10)  # a repeat on a busy machine: fewer steps, worse
    text = analysis(row["run_id"])
    noise = section(text, "Noise")
    assert f"{row['run_id']} 300 steps vs 400 (-25%, val_bpb 1.030000)" in noise, noise
    clean = 2 * np.sqrt(2) * np.std([1.000, 1.002], ddof=1)  # the band leaves the disturbed repeat out
    assert f"noise band: +-{clean:.6f}" in noise and "from 2 runs of 1 repeated code(s)" in noise, noise
    headline = section(text, "Headline")
    assert "the machine was slower" in headline and "300 steps where that code's other runs take 400" in headline
    means = 2 * np.std([1.000, 1.002], ddof=1) * np.sqrt(1 / 2 + 1 / 2)  # this code's clean runs are the best code's
    assert text.splitlines()[0] == (f"decision: discard — delta +0.000000 vs best {base['run_id']} (band ±{means:.6f}, "
                                    "n 2 vs 2): a repeat of the best's code (comments aside); val_bpb is train.py's "
                                    "own number, not measured by the harness (archived without `analyze.py run`)")


def test_last_tenth_with_few_steps_calls_no_trend(repo):
    # 70 noisy steps: a line through the last 7 raw losses would read as rising or falling at random
    row, _ = archive_run(steps=70, noise=0.05, seed=3)
    trajectory = section(analysis(row["run_id"]), "Trajectory")
    assert "last tenth" not in trajectory, f"a trend line for 7 steps in the last tenth:\n{trajectory}"
    assert not re.search(r"rising|plateaued|still improving|LR multiplier", trajectory), trajectory


def test_repeated_code_is_decided_on_its_mean_against_the_best_codes_mean(repo):
    base, _ = measured_base_and_two_repeats()
    commit("small tweak", "DEPTH = 8\nMATRIX_LR = 0.041\n")
    first, _ = archive_run(val_bpb=0.993, age_s=-20)
    assert analysis(first["run_id"]).splitlines()[0].startswith(
        f"decision: rerun — delta -0.008000 vs best {base['run_id']} (band ±")
    row, _ = archive_run(val_bpb=0.991, age_s=-25)
    old, new = np.array([1.000, 1.006, 0.997]), np.array([0.993, 0.991])
    pooled = np.sqrt((((old - old.mean()) ** 2).sum() + ((new - new.mean()) ** 2).sum()) / 3)
    band = 2 * pooled * np.sqrt(1 / 2 + 1 / 3)
    text = analysis(row["run_id"])
    # this run alone is 0.010 below the best's 1.000 run; the decision is on the means, 0.992 against 1.001
    assert text.splitlines()[0] == (f"decision: keep — delta -0.009000 vs best {base['run_id']} (band ±{band:.6f}, "
                                    "n 2 vs 3): lower beyond the noise band; val_bpb is train.py's own number, not "
                                    "measured by the harness (archived without `analyze.py run`)"), text.splitlines()[0]
    assert "verdict" not in text, "a second verdict beside the decision"


def test_trajectory_names_the_lr_annealing_and_says_stopped_for_an_unfinished_run(repo):
    def still(p):
        return 3.0 + 3.0 * np.exp(-5.0 * p) - 0.4 * p
    row, _ = archive_run(loss=still)
    trajectory = section(analysis(row["run_id"]), "Trajectory")
    assert "still improving when time ran out" in trajectory, trajectory
    # write_run's LR multiplier is min(1, 2 (1 - p)): 0.2 at progress 0.9, 0 at the end
    assert "LR multiplier over that window: 0.200 -> 0.000; part of the fall is this annealing" in trajectory
    row, _ = archive_run(loss=still, status="timeout", age_s=-5)
    trajectory = section(analysis(row["run_id"]), "Trajectory")
    assert "still improving when it stopped" in trajectory and "time ran out" not in trajectory, trajectory


def test_stalls_and_nan_losses_are_reported_but_the_compile_step_is_no_stall(repo):
    write_run()
    rows = [json.loads(line) for line in Path("metrics.jsonl").read_text().splitlines()]
    rows[0]["perf/step_time_ms"] = 20000.0  # compilation, before the clock starts (progress 0)
    rows[200]["perf/step_time_ms"] = 5000.0
    for row in rows[390:]:
        row["train/loss"] = float("nan")
    Path("metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run_analyze() == 0
    text = analysis(results()[0]["run_id"])
    assert "stalls (counted step > 3x median): 1: step 200 (5000 ms)" in section(text, "Throughput"), \
        section(text, "Throughput")
    assert "train/loss from step 390 (10 rows)" in section(text, "Stability"), section(text, "Stability")


def test_stall_count_and_list_agree_when_the_list_is_cut(repo):
    write_run()
    rows = [json.loads(line) for line in Path("metrics.jsonl").read_text().splitlines()]
    for i in range(100, 110):
        rows[i]["perf/step_time_ms"] = 5000.0 + i
    Path("metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run_analyze() == 0
    line = next(x for x in section(analysis(results()[0]["run_id"]), "Throughput").splitlines() if "stalls" in x)
    shown = re.findall(r"step (\d+) \(", line)
    assert line.startswith("- stalls (counted step > 3x median): 10: ") and line.endswith(", and 2 more"), line
    assert shown == [str(i) for i in range(100, 108)], f"10 stalls counted, {len(shown)} listed: {line}"


def test_a_layer_with_outsized_gradient_norm_stands_out(repo):
    row, _ = archive_run(layer_scale={"2.attn.c_q": 10.0})
    layers = section(analysis(row["run_id"]), "Per-layer health")
    grad = next(line for line in layers.splitlines() if line.startswith("- grad_norm"))
    assert "2.attn.c_q" in grad and "10.0x" in grad and "mlp" not in grad, grad


def test_layers_are_compared_with_the_best_so_a_stable_pattern_is_not_listed(repo):
    pattern = {"0.attn.c_q": 0.1, "2.attn.c_q": 0.1}  # as blocks without value embeddings: ~0.2x every run
    best, _ = archive_run(layer_scale=pattern)
    run_analyze("status", best["run_id"], "keep")
    commit("wider mlp", "DEPTH = 8\nMATRIX_LR = 0.04\nMLP_RATIO = 5\n")
    row, _ = archive_run(layer_scale={**pattern, "1.mlp.c_fc": 3.0}, age_s=-5)
    layers = section(analysis(row["run_id"]), "Per-layer health")
    assert f"this run / best {best['run_id']}'s same layer" in layers, layers
    grad = next(line for line in layers.splitlines() if line.startswith("- grad_norm"))
    assert "1.mlp.c_fc at 3.00x (1.5 vs 0.5)" in grad and "attn.c_q" not in grad, grad


def test_without_a_best_a_layer_is_compared_with_the_other_blocks_only():
    out = layer_outliers({"0.mlp.c_fc": 1.0, "1.mlp.c_fc": 1.0, "2.mlp.c_fc": 4.0, "3.mlp.c_fc": 4.0})
    assert "2.mlp.c_fc 4 (4.0x the median 1 of the other blocks)" in out, out  # with itself the median is 2.5


def test_throughput_counts_only_counted_steps_and_compares_tokens_per_sec():
    def run(name, ms, tokens):
        rows = cpu_rows(40, steep, warmup=11)
        for r in rows:
            if "perf/step_time_ms" in r:
                warm = r["train/progress"] == 0  # compile steps, outside the budget
                r["perf/step_time_ms"], r["perf/tokens_per_sec"] = (5000.0, 100.0) if warm else (ms, tokens)
        return Run(name, {}, {"num_steps": 51}, Metrics(rows), [])
    best, this = run("best", 300.0, 10000.0), run("this", 150.0, 6000.0)  # half the batch: fewer tokens/s
    stats = throughput_stats(this.metrics)
    assert (stats["step_ms"], stats["p90_ms"], stats["tokens_per_sec"]) == (150.0, 150.0, 6000.0), stats
    text = section_throughput(SimpleNamespace(run=this, best=best, prev=None))
    assert "vs best (best): step time 150.0 vs 300.0 ms (-50.0%); tokens/s 6,000 vs 10,000 (-40.0%)" in text, text


def test_progress_png_lists_kept_subjects_without_cutting_them_and_draws_the_band(repo, monkeypatch):
    import matplotlib.figure
    drawn, savefig = [], matplotlib.figure.Figure.savefig

    def keep_figure(fig, *args, **kwargs):
        drawn.append(" | ".join(t.get_text() for t in fig.findobj(matplotlib.text.Text)))
        return savefig(fig, *args, **kwargs)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep_figure)
    base, _ = archive_run(val_bpb=1.000)
    run_analyze("status", base["run_id"], "keep")
    archive_run(val_bpb=1.004, age_s=-5)
    subject = "MATRIX_LR 0.04 -> 0.05 and EMBEDDING_LR 0.6 -> 0.8, warmdown 0.5"  # 63 characters
    commit(subject, "DEPTH = 8\nMATRIX_LR = 0.05\n")
    row, _ = archive_run(val_bpb=0.990, age_s=-10)
    drawn.clear()
    run_analyze("status", row["run_id"], "keep")
    texts = drawn[-1]
    band = 2 * np.sqrt(2) * np.std([1.000, 1.004], ddof=1)
    assert f"noise band of the best (+-{band:.4f})" in texts, texts
    assert f"{row['run_id']}  {subject[:60]}" in texts, f"kept subject cut short: {texts}"
    assert "below the band yet discarded: within noise, or discarded by the agent" in texts, texts


def test_layer_heatmap_is_skipped_quietly_when_layers_were_logged_at_one_progress_point(tmp_path):
    rows = [{"step": i, "train/progress": i / 2, "train/loss": 3.0} for i in range(3)]
    rows[0].update({f"layer/{b}.attn.c_q/grad_norm": 0.5 for b in range(4)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert draw_layer_heatmap(tmp_path, Metrics(rows)) == []
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------
# Subcommands and cost

def test_what_changed_shows_the_changed_lines_not_the_hunk_header_context(repo):
    def train_py(lr, shift):
        return ('WINDOW_PATTERN = "SSSL"\n' + "".join(f"# note {i}\n" for i in range(8)) + f"MATRIX_LR = {lr}\n"
                + "".join(f"X{i} = {i + shift}\n" for i in range(10)))
    commit("long train.py", train_py(0.04, 0))
    best, _ = archive_run()
    run_analyze("status", best["run_id"], "keep")
    commit("higher lr", train_py(0.08, 1))
    row, _ = archive_run(age_s=-5)
    changes = section(analysis(row["run_id"]), "What changed")
    assert "WINDOW_PATTERN" not in changes, f"git's hunk-header context shown as the change:\n{changes}"
    assert "+11 -11 lines in train.py, 1 hunk(s)" in changes and "@@ line 7 @@" in changes, changes
    assert "-MATRIX_LR = 0.04" in changes and "+MATRIX_LR = 0.08" in changes and "(18 more changed lines)" in changes


def test_diff_hunks_keep_only_changed_lines_even_around_a_blank_context_line():
    patch = "--- a/train.py\n+++ b/train.py\n@@ -1,4 +1,4 @@\n x\n\n-a = 1\n+a = 2\n"
    assert diff_hunks(patch) == [(1, ["-a = 1", "+a = 2"])]


def test_compare_prints_the_difference_and_writes_an_overlay(repo, capsys):
    a, _ = archive_run(val_bpb=1.0)
    commit("deeper", "DEPTH = 12\n")
    b, _ = archive_run(val_bpb=0.99, config={"DEPTH": 12}, age_s=-5)
    capsys.readouterr()
    assert run_analyze("compare", a["run_id"], b["run_id"]) == 0
    out = capsys.readouterr().out
    assert "val_bpb B - A: -0.010000" in out and "DEPTH: 8 -> 12" in out, out
    assert "- train loss (smoothed) at equal steps, steps 0-399: within" in out, out
    assert (ARCHIVE / f"compare_{a['run_id']}_{b['run_id']}" / "loss.png").exists()


def test_compare_shows_a_code_change_that_is_no_config_constant(repo, capsys):
    commit("softcap", "DEPTH = 8\nMATRIX_LR = 0.04\nlogits = 15 * torch.tanh(logits / 15)\n")
    a, _ = archive_run(val_bpb=1.0)
    commit("remove logit softcap", "DEPTH = 8\nMATRIX_LR = 0.04\n")
    b, _ = archive_run(val_bpb=0.99, age_s=-5)
    capsys.readouterr()
    assert run_analyze("compare", a["run_id"], b["run_id"]) == 0
    out = capsys.readouterr().out
    assert "- config: identical" in out, out
    assert f"- code (git diff {a['commit']} {b['commit']} -- train.py): +0 -1 lines in train.py, 1 hunk(s)" in out, out
    assert "-logits = 15 * torch.tanh(logits / 15)" in out, out


def test_show_into_a_closed_pipe_ends_quietly(repo):
    row, _ = archive_run()
    proc = subprocess.Popen([sys.executable, str(ANALYZE_PY), "show", row["run_id"]], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # as `show ID | head` does once it has its lines
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0 and not err, f"exit {proc.returncode}: {err[-500:]}"


def test_a_run_without_vram_shows_memory_as_n_a_everywhere(repo, capsys):
    head = write_run(val_bpb=1.0)
    summary = json.loads(Path("run_summary.json").read_text())
    summary["peak_vram_mb"] = None  # a CPU run
    mtime = Path("run_summary.json").stat().st_mtime
    Path("run_summary.json").write_text(json.dumps(summary))
    os.utime("run_summary.json", (mtime, mtime))
    assert run_analyze() == 0
    row = results()[0]
    assert row["memory_gb"] == "n/a", row
    assert "peak VRAM n/a" in section(analysis(row["run_id"]), "Headline")
    capsys.readouterr()
    run_analyze("list")
    listed = next(x for x in capsys.readouterr().out.splitlines() if x.startswith(head[:7]))
    assert "n/a" in listed and " 0.0 " not in listed, listed
    run_analyze("status", row["run_id"], "keep")
    best = section((ARCHIVE / "insights.md").read_text(), "Current Best")
    assert "memory n/a," in best and "n/a GB" not in best, best


def test_list_and_show(repo, capsys):
    row, _ = archive_run()
    capsys.readouterr()
    run_analyze("list")
    assert row["run_id"] in capsys.readouterr().out
    run_analyze("show", row["run_id"])
    assert f"# Run {row['run_id']}" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no run 'zzz'"):
        run_analyze("show", "zzz")


def test_cost_does_not_grow_with_history_only_compared_runs_are_read(repo):
    best, _ = archive_run(val_bpb=1.0)
    run_analyze("status", best["run_id"], "keep")
    # 300 earlier runs whose directories do not exist: reading any of them would fail loudly
    lines = (ARCHIVE / "results.tsv").read_text().splitlines()
    fake = [f"f{i:06x}\t1.1\t45.0\tdiscard\tidea {i}\tf{i:06x}\tok\t{best['harness']}\t{i:012x}\t400\t40.00\t300.0\t\tk{i}"
            f"\t{best['branch']}\t{i:012x}\t{best['worker']}\t{best['gpu']}" + "\t" * (len(COLUMNS) - 18)
            for i in range(300)]
    (ARCHIVE / "results.tsv").write_text("\n".join([lines[0], *fake, *lines[1:]]) + "\n")
    commit("next idea", "DEPTH = 9\n")
    row, _ = archive_run(val_bpb=0.99, age_s=-5)
    assert row["status"] == "pending" and len(results()) == 302
    assert f"vs best ({best['run_id']}" in section(analysis(row["run_id"]), "Headline")

"""`analyze.py run` (harness/runner.py), piece by piece and fast: the caught cases as functions of a
measurement and the best's row, preflight's refusals on a temporary git repository, the child's clock
and hard cap, what `run` prints, the train.py restore after a discard, and analyze.py's own imports,
which no file in the repository can shadow. Whole runs, honest and cheating, are tests/test_cheats.py."""
import hashlib
import importlib.util
import json
import marshal
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from test_analyze import ARCHIVE, archive_run, commit, repo, results, run_analyze, sh, write_run  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
from harness import runner  # noqa: E402
from harness.decide import Decision  # noqa: E402

BUDGET = 300.0               # the gpu profile's TIME_BUDGET, which the design's limits are stated for


def measurement(**fields):
    """measurement.json of an honest gpu-profile run, with `fields` changed."""
    m = {"by": "analyze.py run", "status": "ok", "exit_code": 0, "wall_s": 345.0, "first_row_s": 30.0,
         "loop_s": 315.0, "time_budget": BUDGET, "outside_s": 45.0, "final_block": True, "reported_val_bpb": 0.99,
         "claimed_loop_s": 312.0, "claimed_wall_s": 340.0, "val_bpb": 0.99, "heldout_bpb": 1.0, "eval_s": 12.0,
         "machine_speed": {"before": 600.0, "after": 600.0}, "caught": [], "error": None}
    if "val_bpb" in fields and "reported_val_bpb" not in fields:  # train.py printed the model's number
        fields["reported_val_bpb"] = fields["val_bpb"]
    return {**m, **fields}


def best_row(val_bpb=1.0, heldout_bpb=1.01, outside_s=45.0, machine_speed=600.0):
    """The results.tsv row of the best run, as `analyze.py run` writes its columns."""
    return {"run_id": "b3a1c00", "commit": "b3a1c00", "status": "keep", "outcome": "ok", "val_bpb": f"{val_bpb:.6f}",
            "heldout_bpb": f"{heldout_bpb:.6f}", "outside_s": f"{outside_s:.1f}", "machine_speed": f"{machine_speed:.1f}",
            "measured": "harness"}


def caught(m, best=None):
    return [c["case"] for c in runner.caught_cases(m, best)]

# ---------------------------------------------------------------------------
# The caught cases

@pytest.mark.parametrize("best", [None, best_row()], ids=["no_best", "with_best"])
def test_an_honest_run_is_caught_by_nothing(best):
    assert caught(measurement(), best) == []


def test_training_on_validation_data_widens_the_held_out_gap_beyond_the_best():
    best = best_row(val_bpb=1.0, heldout_bpb=1.01)  # gap +0.01
    assert caught(measurement(val_bpb=0.95, heldout_bpb=0.965), best) == [], "a gap of +0.015: within 0.01 of the best's"
    found = runner.caught_cases(measurement(val_bpb=0.95, heldout_bpb=0.99), best)
    assert [c["case"] for c in found] == [runner.TRAINED_ON_VAL], found  # +0.04 > max(0.01, 2% of 0.95)
    assert "+0.0400" in found[0]["detail"] and "+0.0100" in found[0]["detail"], found[0]["detail"]


def test_without_a_best_only_a_large_held_out_gap_is_caught():
    assert caught(measurement(val_bpb=1.0, heldout_bpb=1.09)) == []  # 0.05 + 5%: 0.10
    assert caught(measurement(val_bpb=1.0, heldout_bpb=1.11)) == [runner.TRAINED_ON_VAL]


def test_a_best_without_a_held_out_number_counts_as_no_best():
    bare = {**best_row(), "heldout_bpb": "", "measured": ""}  # archived with bare `analyze.py`
    assert caught(measurement(val_bpb=1.0, heldout_bpb=1.09), bare) == []
    assert caught(measurement(val_bpb=1.0, heldout_bpb=1.11), bare) == [runner.TRAINED_ON_VAL]


@pytest.mark.parametrize("reported", [0.99 * 0.97, 0.9915, 0.9885], ids=["scaled", "over", "under"])
def test_a_printed_val_bpb_other_than_the_models_is_caught(reported):
    found = runner.caught_cases(measurement(reported_val_bpb=reported), None)
    assert [c["case"] for c in found] == [runner.NOT_THE_MODELS], found
    assert f"{reported:.6f}" in found[0]["detail"] and "0.990000" in found[0]["detail"]


def test_float_rounding_between_train_py_and_the_evaluator_is_not_caught():
    assert caught(measurement(reported_val_bpb=0.99 + 9e-4)) == []


def test_a_loop_longer_on_the_harness_clock_than_train_py_says_is_a_slowed_clock():
    # claimed 312 s: the limit is 312 * 1.05 + 5 = 332.6 s
    assert caught(measurement(loop_s=332.0, wall_s=362.0, outside_s=62.0)) == []
    found = runner.caught_cases(measurement(loop_s=333.0, wall_s=363.0, outside_s=63.0), best_row(outside_s=62.0))
    assert [c["case"] for c in found] == [runner.SLOWED_CLOCK], found
    assert "333.0 s from the first metrics row" in found[0]["detail"] and "312.0 s" in found[0]["detail"]


def test_a_slowed_clock_that_also_delays_the_first_row_is_caught_on_the_whole_process():
    # the first row came late (flushes slowed too): the loop looks short, the process does not. claimed
    # 340 s in all (28 s start-up and the 312 s loop): the limit is 340 * 1.05 + 5 = 362 s
    late = dict(first_row_s=60.0, loop_s=302.0, outside_s=62.0, time_budget=BUDGET)
    assert caught(measurement(wall_s=362.0, **late), best_row(outside_s=62.0)) == []
    found = runner.caught_cases(measurement(wall_s=363.0, **{**late, "outside_s": 63.0}), best_row(outside_s=62.0))
    assert [c["case"] for c in found] == [runner.SLOWED_CLOCK] and "from the spawn to the exit" in found[0]["detail"]


def untimed(outside_s, **fields):
    """A run that did `outside_s` seconds of work outside the budget before its loop, which train.py's own
    start-up timing holds (its clock is not slowed)."""
    wall = BUDGET + outside_s
    return measurement(outside_s=outside_s, wall_s=wall, first_row_s=wall - 315.0, claimed_wall_s=wall - 5.0, **fields)


def test_time_outside_the_budget_beyond_the_slowest_of_the_best_codes_runs_is_untimed_work():
    best = best_row(outside_s=45.0, machine_speed=600.0)  # the limit: 45 + 5 + 10% of the 300 s budget
    assert caught(untimed(80.0), best) == []
    assert caught(untimed(81.0), best) == [runner.UNTIMED_WORK]
    cold = {**best, "outside_ref_s": 75.0}  # the best code's first run compiled cold: that is the reference
    assert caught(untimed(110.0), cold) == [] and caught(untimed(111.0), cold) == [runner.UNTIMED_WORK]


@pytest.mark.parametrize("speed", [{"before": 300.0, "after": 300.0}, {"before": 600.0, "after": 400.0}],
                         ids=["a slower machine than the best's", "a machine whose speed changed during the run"])
def test_time_outside_the_budget_is_not_judged_while_the_machine_moved(speed):
    """On a busy machine start-up, compilation and evaluation take longer: the decision reruns instead."""
    assert caught(untimed(200.0, machine_speed=speed), best_row(outside_s=45.0, machine_speed=600.0)) == []


def test_without_a_best_time_outside_the_budget_is_not_judged():
    """The first run is the pinned code itself; a busy machine made an honest one spend 69 s outside a 10 s budget."""
    assert caught(untimed(600.0)) == []


def test_a_model_whose_past_logits_move_with_later_tokens_is_caught():
    assert caught(measurement(future_leak=0.0)) == [] and caught(measurement(future_leak=0.009)) == []
    found = runner.caught_cases(measurement(future_leak=0.8), None)
    assert [c["case"] for c in found] == [runner.SEES_AHEAD] and "0.8" in found[0]["detail"], found


def test_a_run_that_did_not_finish_has_nothing_to_check():
    m = measurement(status="crash", val_bpb=None, heldout_bpb=None, reported_val_bpb=None, loop_s=None,
                    claimed_loop_s=None)
    assert [c for c in runner.CHECKS if c(m, None) and c is not runner.untimed_work] == []

# ---------------------------------------------------------------------------
# How the child ended, and the clock

@pytest.mark.parametrize("code, stopped, status", [
    (0, None, "ok"), (1, None, "crash"), (2, None, "diverged"), (3, None, "timeout"), (130, None, "interrupted"),
    (-9, None, "crash"), (7, None, "crash"), (3, "timeout", "timeout"), (130, "interrupted", "interrupted"),
    (-9, "interrupted", "interrupted")])
def test_the_childs_exit_code_and_the_parents_stop_give_the_status(code, stopped, status):
    got, error = runner.child_status(runner.Child(code, 1.0, 5.0, stopped))
    assert got == status and (error is None) == (status == "ok"), (got, error)
    if code == -9 and not stopped:
        assert "SIGKILL" in error, error


@pytest.mark.parametrize("profile, budget, cap", [("gpu", 300, 600), ("gpu", 10, 310), ("gpu", 500, 600),
                                                  ("cpu", 60, 360), ("cpu", 400, 800)])
def test_the_hard_cap(profile, budget, cap):
    assert runner.Plan("b", "p", profile, budget, False).hard_cap_s == cap


def test_the_child_is_timed_from_spawn_and_stopped_at_the_hard_cap(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("train.py").write_text(textwrap.dedent("""\
        import time
        time.sleep(1.0)
        open("metrics.jsonl", "w").write('{"step": 0}\\n')
        time.sleep(600)
        """))
    child = runner.train(SimpleNamespace(hard_cap_s=3.0), tmp_path / "model.pt", tmp_path / "pycache")
    assert child.stopped == "timeout" and child.exit_code == -15, child  # SIGTERM to the group
    assert 1.0 <= child.first_row_s <= child.wall_s and child.wall_s >= 3.0, child
    assert runner.child_status(child)[0] == "timeout"


def test_the_child_gets_the_hand_off_path_and_a_bytecode_cache_outside_the_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "pycache_prefix", None)  # as in-process here; analyze.py sets its own
    Path("train.py").write_text("import os, sys\nprint(os.environ['AUTORESEARCH_HANDOFF'], sys.pycache_prefix)\n")
    child = runner.train(SimpleNamespace(hard_cap_s=60.0), tmp_path / "h" / "model.pt", tmp_path / "pycache")
    assert (child.exit_code, child.stopped, child.first_row_s) == (0, None, None), child
    assert Path("run.log").read_text().split() == [str(tmp_path / "h" / "model.pt"), str(tmp_path / "pycache")]

# ---------------------------------------------------------------------------
# Preflight, on a temporary repository

@pytest.fixture
def harness_repo(repo):
    """The test repository with a harness package, pinned, and the archive ignored."""
    Path("harness").mkdir()
    Path("harness/report.py").write_text("NOISE_SIGMAS = 2\n")
    Path(".gitignore").write_text(".auto-log-research/\nrun.log\nmetrics.jsonl\nrun_summary.json\n")
    sh("git", "add", "-A")
    sh("git", "commit", "-q", "-m", "harness package")
    return repo


def refusal(description=None):
    with pytest.raises(runner.Refused) as e:
        runner.preflight(description)
    return str(e.value)


@pytest.mark.parametrize("name", ["argparse.py", "json", "torch.py", "mylib.py", "fast.cpython-311-x86_64-linux-gnu.so"])
def test_an_untracked_module_at_the_root_is_refused(harness_repo, name):
    if name == "json":
        Path("json").mkdir()
        Path("json/__init__.py").write_text("")
    else:
        Path(name).write_text("")
    assert f"{name} at the repository root is not tracked by git" in refusal()


def test_a_directory_that_is_no_package_and_files_that_are_no_modules_are_fine(harness_repo):
    Path("notes").mkdir()
    Path("notes.txt").write_text("")
    Path("README.md").write_text("")
    runner.refuse_shadowing()


def test_a_tracked_root_module_named_like_a_stdlib_or_installed_one_is_refused(harness_repo):
    for name in ("json.py", "numpy.py"):
        Path(name).write_text("")
        sh("git", "add", name)
        sh("git", "commit", "-q", "-m", f"add {name}")
        assert f"{name} at the repository root shadows the module" in refusal()
        sh("git", "rm", "-q", name)
        sh("git", "commit", "-q", "-m", f"rm {name}")
    Path("helpers.py").write_text("")  # a name nothing else has is the project's own
    sh("git", "add", "helpers.py")
    sh("git", "commit", "-q", "-m", "helpers")
    runner.refuse_shadowing()


def test_a_detached_head_is_refused(harness_repo):
    sh("git", "checkout", "-q", "--detach")
    assert refusal().startswith("HEAD is detached")


def test_the_pin_is_made_on_first_use_and_a_harness_off_it_is_refused(harness_repo, monkeypatch):
    monkeypatch.setattr(runner, "harness_settings", lambda: ("cpu", 3.0))
    plan = runner.preflight(None)
    assert sh("git", "rev-parse", "refs/auto-log-research/pins/main") == sh("git", "rev-parse", "HEAD") == plan.pin
    Path("harness/report.py").write_text("NOISE_SIGMAS = 0\n")
    assert "harness files differ from the branch's pin: harness/report.py (changed)" in refusal()


def test_tracked_files_other_than_train_py_modified_are_refused(harness_repo):
    Path(".gitignore").write_text("")
    assert "tracked files other than train.py are modified (.gitignore)" in refusal()


def test_a_changed_train_py_needs_a_description(harness_repo, monkeypatch):
    monkeypatch.setattr(runner, "harness_settings", lambda: ("cpu", 3.0))
    assert runner.preflight(None).changed is False
    Path("train.py").write_text("DEPTH = 9\n")
    assert refusal().startswith("train.py differs from HEAD: say what changed")
    assert runner.preflight("DEPTH 8 -> 9").changed is True


def test_a_changed_train_py_after_a_pending_rerun_of_head_is_refused(harness_repo, monkeypatch):
    monkeypatch.setattr(runner, "harness_settings", lambda: ("cpu", 3.0))
    row, _ = archive_run(val_bpb=1.0)
    lines = (ARCHIVE / "results.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    fields = lines[1].split("\t")
    fields[header.index("decision")] = "rerun"  # what `run` writes for a rerun; the status stays pending
    (ARCHIVE / "results.tsv").write_text("\n".join([lines[0], "\t".join(fields)]) + "\n")
    Path("train.py").write_text("DEPTH = 9\n")
    assert f"run {row['run_id']} of HEAD is a pending rerun" in refusal("DEPTH 8 -> 9")
    run_analyze("status", row["run_id"], "discard")
    assert runner.preflight("DEPTH 8 -> 9").changed


def test_missing_data_is_refused_with_what_to_run(harness_repo, monkeypatch, tmp_path):
    import prepare
    monkeypatch.setattr(prepare, "DATA_DIR", tmp_path / "nodata")
    assert refusal().endswith("run `uv run prepare.py`")


def test_a_second_run_in_the_same_worktree_is_refused(harness_repo):
    with runner.run_lock():
        with pytest.raises(runner.Refused, match=f"in progress in this worktree \\(pid {os.getpid()}\\)"):
            with runner.run_lock():
                pass
    with runner.run_lock():  # released with the first
        pass


def test_cmd_run_refuses_in_one_line_with_exit_2_and_records_nothing(harness_repo, capsys):
    Path("argparse.py").write_text("")
    assert runner.cmd_run(None) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("analyze.py run: refused: argparse.py"), err
    assert not (ARCHIVE / "results.tsv").exists() and not Path("run.log").exists()

# ---------------------------------------------------------------------------
# Archive and decide, on synthetic run files (no training)

def archive_measured(branch, val_bpb, **fields):
    """What `run` does once train.py and the evaluator are done: the run files of tests/test_analyze.py's
    write_run, archived with a measurement of that val_bpb."""
    head = write_run(val_bpb=val_bpb)
    m = measurement(val_bpb=val_bpb, heldout_bpb=val_bpb + 0.01, **fields)
    return runner.archive_and_decide(runner.Plan(branch, "", "gpu", BUDGET, False), head, m), m


def test_a_measured_run_is_archived_with_its_measurement_and_decided(repo):
    (row, decision, best, after), m = archive_measured("main", 1.0)
    assert (decision.kind, decision.best_id, best, row["status"], row["decision"]) == ("keep", None, None, "keep", "keep")
    assert after == f"train.py: kept; commit {row['commit']} is the branch's best now"
    tsv = results()[-1]
    assert {k: tsv[k] for k in ("val_bpb", "measured", "heldout_bpb", "machine_speed", "wall_s", "outside_s", "caught")} \
        == {"val_bpb": "1.000000", "measured": "harness", "heldout_bpb": "1.010000", "machine_speed": "600.0",
            "wall_s": "345.0", "outside_s": "45.0", "caught": ""}, tsv
    record = json.loads((ARCHIVE / row["run_id"] / "record.json").read_text())
    stored = ARCHIVE / row["run_id"] / "measurement.json"
    assert json.loads(stored.read_text()) == m and record["files"]["measurement.json"] == hashlib.sha256(
        stored.read_bytes()).hexdigest()
    assert run_analyze("audit") == 0


def test_a_caught_run_is_invalid_discarded_and_its_train_py_restored(repo, capsys):
    (base, *_), _ = archive_measured("main", 1.0)
    commit("scale the printed number", "DEPTH = 8\nMATRIX_LR = 0.04\nSCALE = 0.97\n")
    (row, decision, best, after), m = archive_measured("main", 1.0, reported_val_bpb=0.97)
    assert [c["case"] for c in m["caught"]] == [runner.NOT_THE_MODELS] and m["status"] == "invalid", m
    assert (row["status"], row["decision"], decision.best_id, best["run_id"]) == ("invalid", "discard", base["run_id"],
                                                                               base["run_id"])
    assert after.startswith(f"train.py: restored from the best {base['run_id']}"), after
    assert Path("train.py").read_text() == "DEPTH = 8\nMATRIX_LR = 0.04\n"
    capsys.readouterr()
    assert run_analyze("audit") == 1
    assert f"{row['run_id']}: caught: {runner.NOT_THE_MODELS}: train.py printed val_bpb 0.970000" in capsys.readouterr().out


def test_a_run_on_a_new_branch_never_takes_another_branchs_run_for_its_best(repo):
    archive_run(val_bpb=0.9)  # the README's quick start: a manual run on main, archived with bare analyze.py ...
    run_analyze("status", results()[-1]["run_id"], "keep")  # ... and even kept there
    sh("git", "checkout", "-q", "-b", "autoresearch/x")
    commit("deeper", "DEPTH = 9\nMATRIX_LR = 0.04\n")
    (row, decision, best, after), _ = archive_measured("autoresearch/x", 1.0)
    assert (decision.kind, decision.best_id, best, row["status"]) == ("keep", None, None, "keep"), decision.line()
    record = json.loads((ARCHIVE / row["run_id"] / "record.json").read_text())
    assert record["best"] is None and (ARCHIVE / row["run_id"] / "diff.patch").read_text() == ""

# ---------------------------------------------------------------------------
# After the decision

def test_a_discard_restores_the_best_train_py_in_a_commit_of_its_own(repo):
    best = {"run_id": "x", "commit": sh("git", "rev-parse", "HEAD")[:7]}
    commit("deeper", "DEPTH = 9\nMATRIX_LR = 0.04\n")
    line = runner.restore_train_py(best)
    assert line.startswith("train.py: restored from the best x in commit"), line
    assert Path("train.py").read_text() == "DEPTH = 8\nMATRIX_LR = 0.04\n"
    assert sh("git", "log", "-1", "--format=%s") == f"Restore train.py from {best['commit']}"
    assert sh("git", "status", "--porcelain") == ""
    assert runner.restore_train_py(best) == "train.py: unchanged, it is the best's (x)"


def test_what_run_prints_is_at_most_15_lines_with_the_decision_first():
    decision = Decision("discard", "caught: slowed clock", None, None, 1, 1, "b3a1c00")
    row = {"run_id": "c0ffee1", "commit": "c0ffee1", "description": "idea", "status": "invalid", "outcome": "ok",
           "num_steps": "900"}
    cases = [{"case": f"case {i}", "detail": "d"} for i in range(20)]
    lines = runner.report_lines(row, measurement(caught=cases, status="invalid", error="e"), decision, best_row(),
                                ["a note"], "train.py: restored")
    assert len(lines) == runner.MAX_LINES and lines[0] == decision.line() and lines[-1] == "train.py: restored"
    assert all("\n" not in line for line in lines)
    short = runner.report_lines(row, measurement(), decision, None, [], "train.py: kept")
    assert short[2] == "val_bpb 0.990000 measured by the harness (train.py printed 0.990000), held-out 1.000000"
    assert "machine 600 GFLOP/s" in short and len(short) == 7, short

# ---------------------------------------------------------------------------
# analyze.py's own imports: nothing in the repository stands in for the standard library or its bytecode

@pytest.fixture
def analyze_copy(tmp_path):
    """analyze.py and harness/ in a directory of their own, and a bytecode cache outside it."""
    root = tmp_path / "repo"
    root.mkdir()
    for name in ("analyze.py", "prepare.py"):
        shutil.copy(ROOT / name, root / name)
    shutil.copytree(ROOT / "harness", root / "harness", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "AUTORESEARCH_ARCHIVE": str(tmp_path / "archive")}
    for name in ("PYTHONPYCACHEPREFIX", "PYTHONDONTWRITEBYTECODE"):
        env.pop(name, None)
    return root, env


def test_an_argparse_py_in_the_repository_does_not_shadow_the_standard_library(analyze_copy):
    root, env = analyze_copy
    marker = root / "shadowed"
    (root / "argparse.py").write_text(f"open({str(marker)!r}, 'w').close()\nfrom importlib import import_module\n")
    control = subprocess.run([sys.executable, "-c", "import argparse"], cwd=root, env=env)
    assert control.returncode == 0 and marker.exists(), "the planted argparse.py is not even importable"
    marker.unlink()
    out = subprocess.run([sys.executable, "analyze.py", "list"], cwd=root, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "no runs archived yet" in out.stdout, out.stderr[-2000:]
    assert not marker.exists(), "analyze.py imported the repository's argparse.py"


def forge_pyc(source, evil):
    """A bytecode file for `source` that Python would take as up to date (the source's mtime and size in its
    header) but that runs `evil` first."""
    st = source.stat()
    code = compile(evil + source.read_text(), str(source), "exec")
    header = importlib.util.MAGIC_NUMBER + (0).to_bytes(4, "little") + \
        (int(st.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little") + (st.st_size & 0xFFFFFFFF).to_bytes(4, "little")
    path = Path(importlib.util.cache_from_source(str(source)))
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(header + marshal.dumps(code))
    return path


def test_a_forged_pyc_in_the_repository_is_never_read(analyze_copy):
    root, env = analyze_copy
    marker = root / "forged"
    forged = forge_pyc(root / "harness" / "shared.py", f"open({str(marker)!r}, 'w').close()\n")
    control = subprocess.run([sys.executable, "-B", "-c", "import harness.shared"], cwd=root, env=env, capture_output=True)
    assert control.returncode == 0 and marker.exists(), f"the forged pyc is not even used: {control.stderr[-500:]}"
    marker.unlink()
    out = subprocess.run([sys.executable, "analyze.py", "list"], cwd=root, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert not marker.exists(), "analyze.py ran the forged harness/__pycache__/shared.*.pyc"
    assert list((root.parent / "cache" / "auto-log-research" / "pycache").rglob("shared*.pyc")), "none cached outside"
    assert [p.name for p in root.rglob("*.pyc")] == [forged.name], "bytecode written into the repository"

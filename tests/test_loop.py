"""harness/loop.py piece by piece, in seconds: the child's clock, its hard cap and the phase a stop names;
preflight's refusals on a temporary repository; what is measured and appended to run.log; the Run that is
archived and the decision applied (train.py restored); and the bare `analyze.py`'s rules for the run files
in the working directory. report.py's texts are stubbed here (tests/test_report.py has them); whole runs,
honest and cheating, are tests/test_cheats.py."""
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import prepare  # noqa: E402
from harness import loop  # noqa: E402
from harness.decide import NOT_THE_MODELS  # noqa: E402
from harness.record import Archive, Measured  # noqa: E402

pytestmark = pytest.mark.quick

BASE = "DEPTH = 4\nMATRIX_LR = 0.04\n"


def sh(*args):
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A git repository on branch autoresearch/t with a train.py and a one-file harness; report stubbed."""
    monkeypatch.chdir(tmp_path)
    for name in ("AUTORESEARCH_ARCHIVE", "AUTORESEARCH_HANDOFF"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AUTORESEARCH_WORKER", "test:cpu")
    Path("train.py").write_text(BASE)
    Path("harness").mkdir()
    Path("harness/rules.py").write_text("LIMIT = 1\n")
    Path(".gitignore").write_text(".auto-log-research/\nrun.log\nmetrics.jsonl\nrun_summary.json\n")
    sh("git", "init", "-q", "-b", "autoresearch/t")
    for args in (("config", "user.email", "t@t"), ("config", "user.name", "t"), ("add", "-A"), ("commit", "-qm", "base")):
        sh("git", *args)
    fake = SimpleNamespace(PROFILE="cpu", TIME_BUDGET=3.0, TOKENIZER_DIR=tmp_path, PrepareError=prepare.PrepareError,
                           hard_cap_s=prepare.hard_cap_s, shard_paths=lambda split: [])
    (tmp_path / "tokenizer.pkl").write_text("")
    monkeypatch.setattr(loop, "prepare_module", lambda: fake)
    monkeypatch.setattr(loop, "write_analysis", lambda run, runs, archive: "")
    monkeypatch.setattr(loop, "draw_progress", lambda runs, path: None)
    monkeypatch.setattr(loop, "run_lines", lambda run, best, note=None, runs=(), archive=None:
                        [run.decision.line() if run.decision else "", f"run {run.id} {run.status}", note or ""])
    return fake


def commit(message, source):
    Path("train.py").write_text(source)
    sh("git", "commit", "-qam", message)
    return sh("git", "rev-parse", "HEAD")


def refusal(description=None):
    with pytest.raises(loop.Refused) as e:
        loop.preflight(Archive.here(), description)
    return str(e.value)

# ---------------------------------------------------------------------------
# The child, on the parent's clock

def child_of(script, tmp_path, cap_s=60.0):
    Path("train.py").write_text(textwrap.dedent(script))
    return loop.train(SimpleNamespace(cap_s=cap_s, uncontained=None), tmp_path)


@pytest.mark.parametrize("handoff, phase", [(False, "training"), (True, "hand-off")])
def test_the_hard_cap_stops_the_child_and_names_the_phase(tmp_path, monkeypatch, handoff, phase):
    """A run whose model was handed off has HANDOFF_GRACE_S past the cap to exit, and no more."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loop, "HANDOFF_GRACE_S", 2.0)
    child = child_of(f"""\
        import os, time
        time.sleep(0.6)
        open("metrics.jsonl", "w").write('{{"step": 0}}\\n')
        if {handoff}:
            time.sleep(0.6)
            open(os.environ["AUTORESEARCH_HANDOFF"], "w").write("model")
        time.sleep(600)
        """, tmp_path, cap_s=2.5)
    assert child.stopped == "timeout" and child.exit_code == -15 and child.phase == phase, child
    assert 0.6 <= child.first_row_s <= child.wall_s and 2.5 <= child.wall_s < 12, child
    assert not handoff or child.wall_s >= child.handoff_s + 2.0, f"stopped before its grace: {child}"
    assert child.phases().startswith(f"start-up {child.first_row_s:.1f} s, training ")
    assert (child.handoff_s is not None) == handoff and child.phases().count(" s") == (3 if handoff else 2)


def running(*argv):
    """Processes on this machine whose command line is argv (zombies aside)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if proc.joinpath("cmdline").read_bytes().split(b"\0")[:-1] == [a.encode() for a in argv] \
                    and proc.joinpath("stat").read_text().split()[2] != "Z":
                found.append(int(proc.name))
        except OSError:
            pass
    return found


@pytest.mark.parametrize("uncontained", [None, "test"])
def test_the_child_gets_the_hand_off_path_a_bytecode_folder_of_its_own_and_leaves_nothing_behind(tmp_path, monkeypatch,
                                                                                                  uncontained):
    """Uncontained, a process of train.py's own process group is killed; contained, even one in a session of its own."""
    monkeypatch.chdir(tmp_path)
    Path("train.py").write_text(textwrap.dedent(f"""\
        import os, subprocess, sys
        print(os.environ["AUTORESEARCH_HANDOFF"], sys.pycache_prefix, os.getcwd())
        subprocess.Popen(["sleep", "611.5"], start_new_session={uncontained is None})
        """))
    if uncontained is None and loop.sandbox_problem():
        pytest.skip(f"no sandbox here: {loop.sandbox_problem()}")
    child = loop.train(SimpleNamespace(cap_s=60.0, uncontained=uncontained), tmp_path)
    handoff, pycache, cwd = Path("run.log").read_text().split()
    assert (child.exit_code, child.stopped, child.first_row_s) == (0, None, None), child
    assert (handoff, pycache, cwd) == (str(tmp_path / "child" / "model.pt"), str(loop.CHILD_CACHE / "pycache"),
                                       str(tmp_path / "child")) and pycache != sys.pycache_prefix
    time.sleep(0.2)
    assert not running("sleep", "611.5"), "a process train.py started outlived it"

# ---------------------------------------------------------------------------
# Preflight

@pytest.mark.parametrize("name", ["argparse.py", "json", "fast.cpython-311-x86_64-linux-gnu.so"])
def test_an_untracked_module_at_the_root_is_refused(repo, name):
    if name == "json":
        Path("json").mkdir()
        Path("json/__init__.py").write_text("")
    else:
        Path(name).write_text("")
    assert f"{name} at the repository root is not tracked by git" in refusal()


def test_files_and_directories_that_are_no_modules_are_fine(repo):
    Path("notes").mkdir()
    Path("notes.txt").write_text("")
    assert loop.preflight(Archive.here(), None).changed is False


def test_the_pin_is_made_on_first_use_and_the_hard_cap_is_prepares(repo):
    plan = loop.preflight(Archive.here(), None)
    assert plan.pin == sh("git", "rev-parse", "refs/auto-log-research/pins/autoresearch/t") == sh("git", "rev-parse", "HEAD")
    assert plan.cap_s == prepare.hard_cap_s(3.0, None), "no best yet: the floor"
    Path("harness/rules.py").write_text("LIMIT = 0\n")
    assert "harness files differ from the branch's pin: harness/rules.py (changed)" in refusal()


@pytest.mark.parametrize("setup, needle", [
    (lambda: sh("git", "checkout", "-q", "--detach"), "HEAD is detached"),
    (lambda: Path(".gitignore").write_text(""), "tracked files other than train.py are modified (.gitignore)"),
    (lambda: Path("train.py").write_text("DEPTH = 9\n"), "train.py differs from HEAD: say what changed"),
])
def test_what_preflight_refuses(repo, setup, needle):
    setup()
    assert needle in refusal()


def test_missing_data_is_refused_with_what_to_run(repo):
    repo.shard_paths = lambda split: (_ for _ in ()).throw(prepare.PrepareError("no val shard: run `uv run prepare.py`"))
    assert refusal() == "no val shard: run `uv run prepare.py`"


def test_a_second_run_in_the_same_worktree_is_refused(repo):
    archive = Archive.here()
    with loop.run_lock(archive):
        with pytest.raises(loop.Refused, match=f"in progress in this worktree \\(pid {os.getpid()}\\)"):
            with loop.run_lock(archive):
                pass
    with loop.run_lock(archive):  # released with the first
        pass


def test_cmd_run_refuses_in_one_line_with_exit_2_and_runs_nothing(repo, capsys):
    Path("argparse.py").write_text("")
    assert loop.cmd_run(None) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("analyze.py run: refused: argparse.py"), err
    assert not Path("run.log").exists() and not Archive.here().runs()

# ---------------------------------------------------------------------------
# Measured, archived, decided (synthetic run files, no training)

def write_run(val_bpb=None, status="ok", block=True, started=None):
    """train.py's run files as the recorder leaves them (under the harness: no val_bpb in the block)."""
    started = started or time.time() - 10
    summary = {"status": status, "val_bpb": val_bpb, "training_seconds": 3.0, "total_seconds": 8.0, "num_steps": 12,
               "peak_vram_mb": 0.0, "harness": {"profile": "cpu", "TIME_BUDGET": 3.0}, "config": {"DEPTH": 4},
               "git": {"commit": sh("git", "rev-parse", "HEAD"), "dirty": False}, "env": {"gpu_name": None},
               "timings": {"startup_s": 4.0, "warmup_s": 0.0, "eval_s": 0.5, "final_eval_s": 0.5,
                           "started_at": started, "finished_at": started + 8}, "error": None}
    Path("run_summary.json").write_text(json.dumps(summary))
    Path("metrics.jsonl").write_text('{"step": 0, "train/loss": 5.0}\n')
    final = ("\n---\n" + (f"val_bpb:          {val_bpb:.6f}\n" if val_bpb else "") + "num_steps:        12\n") if block else ""
    Path("run.log").write_text("step 00011 | loss 4.1" + final)
    return summary


def archived(repo, val_bpb, reported=None, **measured):
    """What `run` does once train.py and the evaluator are done."""
    summary = write_run()
    if val_bpb is not None:  # as measure() appends it
        Path("run.log").write_text(Path("run.log").read_text() + f"val_bpb:          {val_bpb:.6f}\n")
    m = Measured(val_bpb=val_bpb, heldout_bpb=val_bpb and val_bpb + 0.01, future_leak=0.0, speed_before=20.0,
                 speed_after=20.0, wall_s=8.5, first_row_s=4.0, eval_s=2.0, **measured)
    plan = loop.Plan("autoresearch/t", loop.preflight(Archive.here(), None).pin, "cpu", 3.0, 100.0, False)
    return loop.archive_and_decide(Archive.here(), plan, sh("git", "rev-parse", "HEAD"), summary, reported, m)


def test_a_measured_run_is_archived_with_its_evidence_and_kept_first(repo):
    run, best, after, runs = archived(repo, 2.4)
    assert (run.decision.kind, run.status, best, run.val_bpb, run.caught) == ("keep", "keep", None, 2.4, []), run
    assert after == f"train.py: kept; commit {run.commit[:7]} is the branch's best now"
    assert set(run.evidence) == {"run.log", "metrics.jsonl", "diff.patch"} and run.outside_s == pytest.approx(5.5)
    assert Archive.here().runs()[-1].statuses[-1].status == "keep"


def test_a_caught_run_is_invalid_discarded_and_its_train_py_restored(repo):
    base, *_ = archived(repo, 2.4)
    commit("a better-looking number", BASE + "SCALE = 0.97\n")
    run, best, after, _ = archived(repo, 2.4, reported=2.4 * 0.97)
    assert [c.case for c in run.caught] == [NOT_THE_MODELS] and run.status == "invalid", run.caught
    assert (run.decision.kind, best.id, run.best_id) == ("discard", base.id, base.id)
    assert after.startswith(f"train.py: restored from the best {base.id}") and Path("train.py").read_text() == BASE
    assert sh("git", "log", "-1", "--format=%s") == f"Restore train.py from {base.commit[:7]}"
    assert "+SCALE = 0.97" in (Archive.here().run_dir(run.id) / "diff.patch").read_text()


def test_a_run_stopped_at_the_hard_cap_is_a_timeout_crash_and_restored(repo):
    base, *_ = archived(repo, 2.4)
    commit("deeper", "DEPTH = 9\nMATRIX_LR = 0.04\n")
    run, best, after, _ = archived(repo, None, stopped="timeout", phase="training", error="stopped in training")
    assert (run.trained.outcome, run.status, run.decision.kind, run.val_bpb) == ("timeout", "crash", "crash", None)
    assert after.startswith(f"train.py: restored from the best {base.id}") and Path("train.py").read_text() == BASE


@pytest.mark.parametrize("child", [loop.Child(0, 9.0, 4.0, 8.0), loop.Child(-2, 9.0, 4.0, 8.0, "interrupted")])
def test_the_evaluators_number_is_appended_to_run_logs_final_block(repo, tmp_path, monkeypatch, child):
    """Also for a run interrupted once its model was handed off: stopping it then cannot choose what counts."""
    summary = write_run()
    (tmp_path / "child").mkdir()
    (tmp_path / "child" / "model.pt").write_text("model")
    monkeypatch.setattr(loop, "evaluate", lambda commit, tmp, cap, *contained: ({"val_bpb": 2.345678, "heldout_bpb": 2.4}, None, 1.5))
    plan = loop.Plan("autoresearch/t", loop.preflight(Archive.here(), None).pin, "cpu", 3.0, 100.0, False)
    m = loop.measure(plan, "HEAD", child, summary, tmp_path)
    assert (m.val_bpb, m.eval_s, m.error, m.stopped) == (2.345678, 1.5, None, child.stopped), m
    assert Path("run.log").read_text().endswith("num_steps:        12\nval_bpb:          2.345678\nmeasured_by:      harness\n")


@pytest.mark.parametrize("child, summary, needle", [
    (loop.Child(1, 5.0), {"status": "crash"}, "train.py exited with code 1"),
    (loop.Child(-9, 5.0), None, "train.py was killed by signal SIGKILL"),
    (loop.Child(0, 5.0), None, "run_summary.json is missing"),
    (loop.Child(0, 5.0, 1.0, 4.0, "timeout"), {}, "stopped by the hard cap of 100 s in hand-off after 5 s (start-up 1.0 s"),
])
def test_a_run_that_did_not_end_as_train_py_ends_is_not_measured(repo, tmp_path, child, summary, needle):
    plan = loop.Plan("autoresearch/t", "", "cpu", 3.0, 100.0, False)
    m = loop.measure(plan, "HEAD", child, summary, tmp_path)
    assert m.val_bpb is None and needle in m.error, m.error

# ---------------------------------------------------------------------------
# The bare `analyze.py`: train.py's word, backed by run.log, never decided

def test_a_bare_archive_backed_by_its_final_block_is_pending_and_undecided_and_never_twice(repo, capsys):
    write_run(val_bpb=2.5)
    assert loop.archive_here() == 0
    run = Archive.here().runs()[-1]
    assert (run.status, run.val_bpb, run.decision, run.measured) == ("pending", 2.5, None, None), run
    assert not capsys.readouterr().out.startswith("decision"), "a run it did not decide"
    assert loop.archive_here() == 0 and len(Archive.here().runs()) == 1
    assert f"archived already, as {run.id}" in capsys.readouterr().out


@pytest.mark.parametrize("case, needle", [
    ("no block", "but run.log does not back it (it has no final `---` block)"),
    ("other number", "its final block says val_bpb 2.600000"),
    ("missing", "no run_summary.json"),
    ("stale", "left by an earlier run"),
])
def test_a_bare_archive_that_run_log_does_not_back_is_a_crash(repo, case, needle):
    write_run(val_bpb=2.5, block=case != "no block")
    if case == "other number":
        Path("run.log").write_text("---\nval_bpb:          2.600000\n")
    if case == "missing":
        Path("run_summary.json").unlink()
    if case == "stale":
        os.utime("run.log", (time.time() + 120, time.time() + 120))
    assert loop.archive_here() == 0
    run = Archive.here().runs()[-1]
    assert (run.status, run.val_bpb, run.trained.outcome) == ("crash", None, "crash") and needle in run.trained.error
    assert ("metrics.jsonl" in run.evidence) == (case != "stale"), "a stale summary's curves are the earlier run's"

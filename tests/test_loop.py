"""harness/loop.py piece by piece, in seconds: the child's clock, preflight's refusals, what is measured, archived
and decided, the bare `analyze.py`'s rules. report.py is stubbed; whole runs are tests/test_cheats.py's."""
import json
import os
import re
import sys
import textwrap
import time
from contextlib import nullcontext, suppress
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_archive import sh

import prepare
from harness import loop
from harness.record import Archive, Measured

pytestmark = pytest.mark.quick

BASE = "DEPTH = 4\nMATRIX_LR = 0.04\n"


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A git repository on branch autoresearch/t with a train.py and a one-file harness; report stubbed."""
    monkeypatch.chdir(tmp_path)  # conftest has cleared AUTORESEARCH_ARCHIVE and AUTORESEARCH_HANDOFF
    monkeypatch.setenv("AUTORESEARCH_WORKER", "test:cpu")
    Path("train.py").write_text(BASE)
    Path("harness").mkdir()
    Path("harness/rules.py").write_text("LIMIT = 1\n")
    Path(".gitignore").write_text(".auto-log-research/\nrun.log\nmetrics.jsonl\nrun_summary.json\n")
    for args in (("init", "-q", "-b", "autoresearch/t"), ("config", "user.email", "t@t"), ("config", "user.name", "t"),
                 ("add", "-A"), ("commit", "-qm", "base")):
        sh("git", *args)
    Path("notes").mkdir()  # untracked, but no module (nor is tokenizer.pkl): preflight lets them be
    fake = SimpleNamespace(PROFILE="cpu", TIME_BUDGET=3.0, TOKENIZER_DIR=tmp_path, PrepareError=prepare.PrepareError,
                           hard_cap_s=prepare.hard_cap_s, SPLITS=prepare.SPLITS, shard_paths=lambda split: [],
                           Tokenizer=SimpleNamespace(from_directory=lambda: None))
    (tmp_path / "tokenizer.pkl").touch()
    monkeypatch.setattr(loop, "prepare_module", lambda: fake)
    for name in ("write_analysis", "draw_progress", "run_lines"):
        monkeypatch.setattr(loop, name, lambda *args: [])
    return fake


def preflight_plan():
    return loop.Plan("autoresearch/t", loop.preflight(Archive.here(), None).pin, 100.0, False)


def running(*argv):
    """Processes on this machine whose command line is argv (a zombie's reads as empty)."""
    wanted, found = "".join(f"{a}\0" for a in argv).encode(), []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with suppress(OSError):  # gone meanwhile
            if cmdline.read_bytes() == wanted:
                found.append(int(cmdline.parent.name))
    return found


@pytest.mark.parametrize("handoff, uncontained", [(False, None), (True, "test")])
def test_the_hard_cap_stops_the_child_and_all_it_started(tmp_path, monkeypatch, handoff, uncontained):
    """Handed off: HANDOFF_GRACE_S past the cap, no more. The child gets the hand-off path, no bytecode folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loop, "HANDOFF_GRACE_S", 2.0)
    Path("train.py").write_text(textwrap.dedent(f"""\
        import os, subprocess, sys, time
        print(os.environ["AUTORESEARCH_HANDOFF"], sys.pycache_prefix, sys.dont_write_bytecode, os.getcwd(), flush=True)
        subprocess.Popen(["sleep", "611.5"], start_new_session={uncontained is None})  # escaped: bwrap's PID namespace
        time.sleep(0.6)
        open("metrics.jsonl", "w").write('{{"step": 0}}\\n')
        if {handoff}:
            time.sleep(0.6)
            open(os.environ["AUTORESEARCH_HANDOFF"], "w").write("model")
        time.sleep(600)
        """))
    child = loop.train(SimpleNamespace(cap_s=2.5, uncontained=uncontained), tmp_path)
    assert (child.stopped, child.exit_code, child.phase) == ("timeout", -15, "hand-off" if handoff else "training")
    assert 0.6 <= child.first_row_s <= child.wall_s and 2.5 <= child.wall_s < 12, child
    assert not handoff or child.wall_s >= child.handoff_s + 2.0, f"stopped before its grace: {child}"
    assert Path("run.log").read_text().split() == [f"{tmp_path}/child/model.pt", "None", "True", f"{tmp_path}/child"]
    deadline = time.time() + 5  # on a loaded machine a killed process may wait a while for a core to die on
    while running("sleep", "611.5") and time.time() < deadline:
        time.sleep(0.1)
    assert not running("sleep", "611.5"), "a process train.py started outlived it"


def test_the_cpu_seconds_of_a_process_tree_count_its_children_running_and_reaped(tmp_path):
    """tree_cpu_s while it runs counts both; supervise's count at the exit, the one its child waited for."""
    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 1: pass\n"
    script = (f"import subprocess, sys, time\nsubprocess.run([sys.executable, '-c', {spin!r}])\n"
              f"subprocess.Popen([sys.executable, '-c', {spin + 'time.sleep(60)'!r}])\ntime.sleep(60)\n")
    seen, pids = [], []
    def look(now, pid):
        pids.append(pid)
        seen.append(loop.tree_cpu_s(pid) if pid else None)
        return now if pid and seen[-1] >= 2.0 else None  # both have spun: stop it
    _, stopped, _, cpu_s = loop.supervise([sys.executable, "-c", script], tmp_path / "log", None, 120.0, look)
    assert stopped == "timeout" and 2.0 <= max(seen[:-1]) < 6.0 and 1.0 <= cpu_s < 4.0, (stopped, seen, cpu_s)
    assert pids[-1] is None and None not in pids[:-1], "the look after the exit must not sample a process that is gone"
    assert loop.tree_cpu_s(pids[0]) == 0.0, "a process that is gone has no CPU seconds"


@pytest.mark.parametrize("samples, outside", [
    ({"first row": 3.0, "hand-off": 40.0, "exit": 42.5}, 5.5),
    ({"first row": 3.0, "hand-off": None, "exit": 42.5}, 3.0),  # the hand-off seen only after the exit: none after it
])
def test_cpu_outside_the_budget_never_counts_training_when_the_hand_off_came_in_the_last_poll(samples, outside):
    assert loop.Child(0, 50.0, 2.0, 45.0, cpu_s=samples).outside_cpu_s() == outside


FAST = "fast" + EXTENSION_SUFFIXES[0]  # an extension module this Python imports (cpython-311-..., -312-...)


@pytest.mark.parametrize("setup, needle", [
    (lambda repo: Path(FAST).touch(), f"{FAST} at the"),
    (lambda repo: Path("json").mkdir() or Path("json/__init__.py").touch(), "json at the repository root is not"),
    (lambda repo: Path("helpers").mkdir() or Path("helpers/lr.py").touch(), "helpers at the repository root is not"),
    (lambda repo: (loop.preflight(Archive.here(), None), Path("harness/rules.py").write_text("LIMIT = 0\n")),
     "harness files differ from the branch's pin: harness/rules.py (changed)"),  # once the pin is made
    (lambda repo: sh("git", "checkout", "-q", "--detach"), "HEAD is detached"),
    (lambda repo: Path(".gitignore").write_text(""), "tracked files other than train.py are modified (.gitignore)"),
    (lambda repo: Path("train.py").write_text("DEPTH = 9\n"), "train.py differs from HEAD: say what changed"),
    (lambda repo: setattr(repo, "shard_paths", lambda split: prepare.shard_paths(split, "nowhere")),
     "no training shard in nowhere: run `uv run prepare.py`"),
])
def test_what_preflight_refuses(repo, setup, needle):
    setup(repo)
    with pytest.raises(loop.Refused, match=re.escape(needle)):
        loop.preflight(Archive.here(), None)


@pytest.mark.parametrize("name", ["ok.pth", "evil.pth", "sitecustomize.py"])
def test_a_startup_file_that_no_installed_package_lists_is_refused(tmp_path, monkeypatch, name):
    (tmp_path / "ok-1.0.dist-info").mkdir()
    (tmp_path / "ok-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: ok\nVersion: 1.0\n")
    (tmp_path / "ok-1.0.dist-info" / "RECORD").write_text("ok.pth,,\nok-1.0.dist-info/RECORD,,\n")
    (tmp_path / name).write_text("import os\n")
    monkeypatch.setattr(loop.sysconfig, "get_path", lambda _: str(tmp_path))
    refused = pytest.raises(loop.Refused, match=f"{name} is in no installed package's RECORD")
    with refused if name != "ok.pth" else nullcontext():  # ok.pth: its package's RECORD lists it
        loop.refuse_startup_files()


def test_a_second_run_in_the_same_worktree_is_refused(repo):
    with loop.run_lock(Archive.here()), pytest.raises(loop.Refused, match=f"in this worktree \\(pid {os.getpid()}\\)"):
        with loop.run_lock(Archive.here()):
            pass
    with loop.run_lock(Archive.here()):  # released with the first
        pass


def write_run(val_bpb=None, age=0):
    """train.py's run files as the recorder leaves them (no val_bpb in the block unless given); summary `age` s old."""
    started = time.time() - 10 - age
    summary = {"status": "ok", "val_bpb": val_bpb, "training_seconds": 3.0, "total_seconds": 8.0, "num_steps": 12,
               "harness": {"profile": "cpu", "TIME_BUDGET": 3.0}, "git": {"commit": sh("git", "rev-parse", "HEAD")},
               "timings": {"startup_s": 4.0, "eval_s": 0.5, "final_eval_s": 0.5, "started_at": started,
                           "finished_at": started + 8}}
    Path("run_summary.json").write_text(json.dumps(summary))
    Path("metrics.jsonl").write_text('{"step": 0, "train/loss": 5.0}\n')
    val = f"val_bpb:          {val_bpb:.6f}\n" if val_bpb else ""
    Path("run.log").write_text(f"step 00011 | loss 4.1\n---\n{val}num_steps:        12\n")
    return summary


def archived(val_bpb, **measured):
    """What `run` does once train.py and the evaluator are done."""
    summary = write_run()
    if val_bpb is not None:  # as measure() appends it: keep's evidence
        Path("run.log").write_text(Path("run.log").read_text() + f"val_bpb:          {val_bpb:.6f}\n")
    m = Measured(val_bpb=val_bpb, heldout_bpb=val_bpb and val_bpb + 0.01, future_leak=0.0, speed_before=20.0,
                 speed_after=20.0, wall_s=8.5, first_row_s=4.0, eval_s=2.0, **measured)
    return loop.archive_and_decide(Archive.here(), preflight_plan(), summary["git"]["commit"], summary, None, m)


def test_the_first_run_is_kept_then_one_stopped_at_the_hard_cap_is_a_crash_and_train_py_restored(repo):
    plan = loop.preflight(Archive.here(), None)  # the pin is made on first use; no best yet: the hard cap's floor
    pins = sh("git", "rev-parse", "refs/auto-log-research/pins/autoresearch/t", "HEAD").split()
    assert pins == [plan.pin] * 2 and plan.cap_s == prepare.hard_cap_s(3.0, None), plan
    base, best, after, _ = archived(2.4)
    assert (base.decision.kind, base.status, best, base.val_bpb, base.caught) == ("keep", "keep", None, 2.4, []), base
    assert after == f"train.py: kept; commit {base.commit[:7]} is the branch's best now", after
    assert set(base.evidence) == {"run.log", "metrics.jsonl", "diff.patch"} and base.outside_s == pytest.approx(5.5)
    Path("train.py").write_text("DEPTH = 9\nMATRIX_LR = 0.04\n")
    sh("git", "commit", "-qam", "deeper")
    run, best, after, _ = archived(None, stopped="timeout", phase="training", error="stopped in training")
    assert (run.trained.outcome, run.status, run.decision.kind, run.val_bpb) == ("timeout", "crash", "crash", None)
    assert (best.id, run.best_id) == (base.id, base.id), run
    assert "+DEPTH = 9" in (Archive.here().run_dir(run.id) / "diff.patch").read_text()
    assert after.startswith(f"train.py: restored from the best {base.id}"), after
    assert sh("git", "log", "-1", "--format=%s") == f"Restore train.py from {base.commit[:7]}"
    assert Path("train.py").read_text() == BASE


@pytest.mark.parametrize("child, summary, needle", [
    (loop.Child(0, 9.0, 4.0, 8.0), "ok", None),
    (loop.Child(-2, 9.0, 4.0, 8.0, "interrupted"), "ok", None),  # once handed off: stopping cannot choose what counts
    (loop.Child(1, 5.0), {"status": "crash"}, "train.py exited with code 1"),
    (loop.Child(-9, 5.0), None, "train.py was killed by signal SIGKILL"),
    (loop.Child(0, 5.0), None, "run_summary.json is missing"),
    (loop.Child(0, 5.0, 1.0, 4.0, "timeout"), {}, "by the hard cap of 100 s (start-up 1.0 s, training 3.0 s, hand-off"),
])
def test_the_model_is_measured_only_if_train_py_ended_well(repo, tmp_path, monkeypatch, child, summary, needle):
    summary = write_run() if summary == "ok" else summary
    (tmp_path / "child").mkdir()
    (tmp_path / "child" / "model.pt").write_text("model")
    monkeypatch.setattr(loop, "evaluate", lambda *args: ({"val_bpb": 2.345678, "heldout_bpb": 2.4}, None, 1.5))
    m = loop.measure(preflight_plan(), child, summary, tmp_path)
    if needle:
        assert m.val_bpb is None and needle in m.error, m.error
    else:  # the number appended to run.log's block: tests/test_cheats.py's baseline
        assert (m.val_bpb, m.eval_s, m.error, m.stopped) == (2.345678, 1.5, None, child.stopped), m


@pytest.mark.parametrize("spoil, status, needle", [
    (lambda: Path("run.log").write_text("---\nval_bpb:          2.600000\n"), "crash", "final block says val_bpb 2.6"),
    (lambda: Path("run_summary.json").unlink(), "crash", "no run_summary.json"),
    (lambda: write_run(val_bpb=2.5, age=100), "crash", "left by an earlier run"),
    (lambda: Path("run_summary.json").write_text(  # sections of the wrong type: a broken train.py's
        json.dumps({**json.loads(Path("run_summary.json").read_text()), "git": 1, "env": []})), "pending", ""),
])
def test_a_bare_archive_is_pending_if_backed_else_a_crash_and_never_twice(repo, capsys, spoil, status, needle):
    write_run(val_bpb=2.5)
    spoil()
    assert loop.archive_here() == loop.archive_here() == 0 and len(Archive.here().runs()) == 1
    run = Archive.here().runs()[-1]
    assert f"archived already, as {run.id}" in capsys.readouterr().out
    assert (run.status, run.val_bpb, run.decision) == (status, 2.5 if status == "pending" else None, None), run
    assert needle in (run.trained.error or ""), run.trained.error
    assert ("metrics.jsonl" in run.evidence) == (needle != "left by an earlier run"), "a stale summary's curves"

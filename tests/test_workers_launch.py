"""contrib/workers.py for real on the CPU, with a stand-in for the agent, and contrib/skypilot/autoresearch.yaml
read by SkyPilot's own parser."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from contrib import workers

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the launcher finds strayed processes through Linux's /proc")

# What an agent session does here: record what it was given, write its notes, start a child that sleeps and a
# grandchild that leaves the worker's session and ignores SIGTERM, then wait, as a long agent session would.
# Worker <tag>-0's first session exits at once, so that the launcher has to restart it.
STAND_IN = r'''
import json, os, subprocess, sys, time
from pathlib import Path
worker = os.environ["AUTORESEARCH_WORKER"]
record = Path(os.environ["STAND_IN_RECORD"], worker)
record.mkdir(exist_ok=True)
session = len(list(record.glob("*.json"))) + 1
Path(".auto-log-research").mkdir(exist_ok=True)
Path(".auto-log-research/insights.md").write_text(f"# Insights\n\n{worker} session {session}\n")
sleeper = subprocess.Popen(["sleep", "300"])
stray = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                          "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"], start_new_session=True)
info = {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "AUTORESEARCH_WORKER", "AUTORESEARCH_ARCHIVE",
                                       "UV_PROJECT_ENVIRONMENT")}
info.update(session=session, pids=[os.getpid(), sleeper.pid, stray.pid], cwd=os.getcwd(), prompt=input().strip(),
            branch=subprocess.run(["git", "branch", "--show-current"], capture_output=True, text=True).stdout.strip())
(record / f"{session}.tmp").write_text(json.dumps(info))
(record / f"{session}.tmp").replace(record / f"{session}.json")  # the test reads whole records only
print(json.dumps({"type": "stand-in", "session": session}), flush=True)
if session == 1 and worker.endswith("-0"):
    sys.exit(3)
time.sleep(300)
'''
TAG = "t"
GPUS = ["0", "2"]  # no GPU is used: the workers are told which one is theirs, the stand-ins only record it


def git(cwd, *args, **env):
    return subprocess.run(["git", *args], cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True,
                          check=True).stdout


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A git repository holding this working tree's files, committed or not, as a user's clone would."""
    repo = tmp_path_factory.mktemp("clone") / "alr"
    for name in filter(None, git(ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")):
        if (ROOT / name).is_file():  # a tracked file deleted in the working tree is listed too
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    for cmd in (["init", "-q", "-b", "main"], ["config", "user.email", "t@example.com"], ["config", "user.name", "t"],
                ["add", "-A"], ["commit", "-q", "-m", "base"]):
        git(repo, *cmd)
    return repo


@pytest.fixture(scope="module")
def launch(repo, cpu_prepared, tmp_path_factory):
    """Start contrib/workers.py in `repo` with stand-in agents; returns a function of the extra arguments that
    gives back (the launcher process, the stand-ins' record directory, the logs directory)."""
    stand_in = tmp_path_factory.mktemp("stand_in") / "agent.py"
    stand_in.write_text(STAND_IN)
    record, logs = tmp_path_factory.mktemp("record"), tmp_path_factory.mktemp("logs")
    env = {**os.environ, "AUTORESEARCH_PROFILE": "cpu", "AUTORESEARCH_CACHE": str(cpu_prepared[1]),
           "AUTORESEARCH_DATA_URL": "http://127.0.0.1:9/nowhere", "STAND_IN_RECORD": str(record)}
    env.pop("CUDA_VISIBLE_DEVICES", None)

    def start(*extra):
        cmd = [sys.executable, "contrib/workers.py", "--tag", TAG, "--agent", f"cat program.md | {sys.executable} "
               f"{stand_in}", "--logs", str(logs), "--pause", "0.2", "--grace", "0.5", *extra]
        return subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return start, record, logs


def sessions(record):
    return {w.name: sorted(json.loads(p.read_text())["session"] for p in w.glob("*.json"))
            for w in record.iterdir()} if record.exists() else {}


def wait_for(record, expected, proc, timeout=600):  # a hang guard, not a speed test: a loaded machine is slow
    t0 = time.time()
    while sessions(record) != expected:
        assert proc.poll() is None, f"contrib/workers.py exited ({proc.returncode}):\n{proc.stdout.read()}"
        assert time.time() - t0 < timeout, f"after {timeout} s the stand-ins ran {sessions(record)}, not {expected}"
        time.sleep(0.1)


def alive(record):
    """The pids the stand-ins recorded (themselves, their children, their strays) that still exist."""
    pids = [pid for p in record.glob("*/*.json") for pid in json.loads(p.read_text())["pids"]]
    assert len(pids) >= 9, pids
    return [pid for pid in pids if Path(f"/proc/{pid}").exists()]


@pytest.fixture(scope="module")
def first(launch):
    """One launch on two GPUs: worker t-0's first agent exits, is restarted, then Ctrl-C."""
    start, record, logs = launch
    proc = start("--gpus", ",".join(GPUS))
    wait_for(record, {f"{TAG}-0": [1, 2], f"{TAG}-2": [1]}, proc)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=300)[0]
    return proc.returncode, out, record, logs


def test_each_worker_runs_on_its_own_branch_worktree_and_gpu_and_an_agent_that_exits_is_restarted(first, repo):
    _, out, record, logs = first
    assert f"{TAG}-0: agent exited (3), restarting in 0.2 s" in out, out
    worktrees = git(repo, "worktree", "list", "--porcelain")
    for gpu, sessions_run in zip(GPUS, (2, 1)):
        name = f"{TAG}-{gpu}"
        worktree = repo.parent / "alr-workers" / name
        assert f"worktree {worktree}\nHEAD" in worktrees and f"branch refs/heads/autoresearch/{name}" in worktrees
        for p in (record / name).glob("*.json"):
            seen = json.loads(p.read_text())
            assert seen["cwd"] == str(worktree) and seen["branch"] == f"autoresearch/{name}", seen
            assert seen["CUDA_VISIBLE_DEVICES"] == gpu and seen["AUTORESEARCH_WORKER"] == name, seen
            assert seen["AUTORESEARCH_ARCHIVE"] == str(repo / ".auto-log-research"), seen
            assert seen["UV_PROJECT_ENVIRONMENT"] == sys.prefix, "the worktrees share the launcher's environment"
            assert seen["prompt"] == (repo / "program.md").read_text().splitlines()[0], "program.md is not its stdin"
        assert git(repo, "for-each-ref", f"refs/auto-log-research/pins/autoresearch/{name}"), f"{name} unpinned:\n{out}"
        outputs = sorted((logs / name).glob("agent-*.jsonl"))  # a new log for each session
        assert [json.loads(p.read_text())["session"] for p in outputs] == list(range(1, sessions_run + 1)), outputs
        copy = repo / ".auto-log-research" / "workers" / name / "insights.md"
        assert copy.read_text().endswith(f"{name} session {sessions_run}\n"), "the notes were not copied at shutdown"


def test_ctrl_c_stops_every_process_the_workers_started(first):
    status, out, record, _ = first
    assert status == 0, out
    assert "SIGKILL" in out, "the stray ignores SIGTERM, so the launcher must have escalated"
    assert alive(record) == [], f"left running after Ctrl-C:\n{out}"


def test_a_second_launch_refuses_the_same_branches_and_resume_restarts_them_once(first, launch, repo):
    start, record, logs = launch
    refused = start("--gpus", ",".join(GPUS))
    out = refused.communicate(timeout=300)[0]
    assert refused.returncode == 2 and out.count("\n") == 1, out
    assert f"branch autoresearch/{TAG}-0 already exists" in out and "--resume" in out, out
    # GPU 3's branch was never made, as when a launch is stopped during set-up: --resume makes it
    resumed = start("--gpus", ",".join(GPUS + ["3"]), "--resume")
    wait_for(record, {f"{TAG}-0": [1, 2, 3], f"{TAG}-2": [1, 2], f"{TAG}-3": [1]}, resumed)
    twice = start("--gpus", ",".join(GPUS), "--resume")
    said = twice.communicate(timeout=300)[0]
    assert twice.returncode == 2 and f"worker {TAG}-0 is already running" in said, said
    resumed.stdout.close()  # the terminal is gone: the launcher must stop everything all the same
    resumed.send_signal(signal.SIGTERM)
    assert resumed.wait(timeout=300) == 0
    log = (logs / f"workers-{TAG}.log").read_text()
    assert log.rstrip().endswith("all workers stopped, nothing left running"), log
    assert alive(record) == [], f"left running after SIGTERM:\n{log}"
    for p in (record / f"{TAG}-0").glob("*.json"):
        assert json.loads(p.read_text())["cwd"] == str(repo.parent / "alr-workers" / f"{TAG}-0"), "not resumed in place"


@pytest.mark.quick
def test_an_agent_left_by_a_killed_launcher_still_holds_its_worktree_lock(tmp_path):
    """A launcher killed outright (SIGKILL, the OOM killer) leaves its agents running in their own sessions;
    they hold the worktree's lock, so a relaunch refuses instead of starting a second agent on the GPU."""
    git(tmp_path, "init", "-q")
    w = workers.Worker(name="t-9", gpu="", worktree=tmp_path, logs=tmp_path / "logs")
    w.lock = workers.hold_lock(w)
    workers.start_session(w, "sleep 30", dict(os.environ))
    w.lock.close()  # the launcher is gone; its agent is not
    try:
        with pytest.raises(workers.Refusal, match="worker t-9 is already running"):
            workers.hold_lock(w)
    finally:
        os.killpg(w.proc.pid, signal.SIGKILL)
        w.proc.wait(timeout=10)
    workers.hold_lock(w).close()  # the agent gone, the lock is free


@pytest.mark.parametrize("args,says", [
    (["--tag", "u", "--workers", "1", "--resume"], "there is no branch autoresearch/u-0 or any other of this tag"),
    (["--gpus", "1,1"], "GPUs 1,1: one appears twice"),
    (["--workers", "1", "--archive", "/tmp/elsewhere"], "name the directory .auto-log-research"),
    (["--workers", "1", "--tag", "a b"], "--tag 'a b'"),
])
def test_bad_input_is_refused_in_one_line_before_anything_is_made(repo, launch, args, says):
    start, _, _ = launch
    before = git(repo, "branch", "--list")
    proc = start(*args)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 2 and out.count("\n") == 1 and says in out, out
    assert git(repo, "branch", "--list") == before


# contrib/skypilot/autoresearch.yaml, read by SkyPilot's own parser from the lock's `skypilot` group

SKY_PARSE = r'''
import json, sys, yaml, sky
path = sys.argv[1]
try:
    sky.Task.from_yaml(path)
    without_tag = "parsed"
except ValueError as e:
    without_tag = str(e)
task = sky.Task.from_yaml_config(yaml.safe_load(open(path)), env_overrides=[("TAG", "dec2")])
print(json.dumps({"setup": task.setup, "run": task.run, "envs": task.envs, "secrets": task.secrets,
                  "without_tag": without_tag}))
'''
TASK = ROOT / "contrib" / "skypilot" / "autoresearch.yaml"
OFFLINE = ("Failed to fetch", "failed to lookup address", "Request failed after", "Could not connect",
           "Connection refused", "operation timed out")


@pytest.fixture(scope="module")
def sky_task():
    """SkyPilot's parser on the task (TAG=dec2), in a throwaway environment that uv builds from the locked
    `skypilot` group and caches: the first time downloads ~100 packages (~15 s), later ones take seconds."""
    if not shutil.which("uv"):
        pytest.skip("uv is not on PATH, so the skypilot group cannot be installed")
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    out = subprocess.run(["uv", "run", "--isolated", "--locked", "--only-group", "skypilot", "python", "-c",
                          SKY_PARSE, str(TASK)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    reason = next((line for line in out.stderr.splitlines() if any(s in line for s in OFFLINE)), None)
    if out.returncode != 0 and reason:
        pytest.skip(f"SkyPilot could not be installed from PyPI: {reason.strip()}")
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


def run_script(script, envs, home, **extra):
    """Run a task's setup or run script as a node would, in `home` (which holds the synced ~/sky_workdir),
    with uv, claude and curl replaced by recorders of their arguments and working directory."""
    fake, calls = home / "bin", home / "calls"
    fake.mkdir(exist_ok=True)
    for tool in ("uv", "claude", "curl"):
        (fake / tool).write_text(f'#!/bin/sh\necho "$(pwd): {tool} $*" >> {calls}\n')
        (fake / tool).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_CONFIG")}
    env.update(envs, HOME=str(home), PATH=f"{fake}:{os.environ['PATH']}", **extra)
    out = subprocess.run(["bash", "-c", script], cwd=home / "sky_workdir", env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    made = calls.read_text().splitlines() if calls.exists() else []
    calls.unlink(missing_ok=True)
    return made


def test_setup_prepares_each_node_and_run_starts_its_workers_with_the_node_rank(sky_task, repo, tmp_path):
    assert "TAG" in sky_task["without_tag"], f"a launch without --env TAG must fail: {sky_task['without_tag']}"
    assert not sky_task["secrets"].get("ANTHROPIC_API_KEY") and "sk-ant" not in TASK.read_text(), \
        "the agent's key is a secret from the user's shell, never in the file"
    workdir = tmp_path / "sky_workdir"  # what SkyPilot syncs: the checkout, .git included
    shutil.copytree(repo / ".git", workdir / ".git")
    alr, envs = tmp_path / "alr", sky_task["envs"]
    setup = run_script(sky_task["setup"], envs, tmp_path, SKYPILOT_NODE_RANK="1")
    assert setup == [f"{alr}: uv sync --locked", f"{alr}: uv run prepare.py --num-shards 10"], setup
    assert git(alr, "rev-parse", "HEAD") == git(workdir, "rev-parse", "HEAD"), "the clone is not of the synced commit"
    assert git(tmp_path, "config", "--global", "user.email", HOME=str(tmp_path)).strip(), "the agents commit"
    run = run_script(sky_task["run"], envs, tmp_path, SKYPILOT_NODE_RANK="1")
    assert run == [f"{alr}: uv run contrib/workers.py --tag dec2-n1 --num-shards 10"], run  # no more than setup made
    # a later `sky exec` syncs new code and copies .git over the workdir's: the clone follows its HEAD
    git(workdir, "commit", "-q", "--allow-empty", "-m", "new code")
    run = run_script(sky_task["run"], {**envs, "ARGS": "--resume"}, tmp_path, SKYPILOT_NODE_RANK="0")
    assert run == [f"{alr}: uv run contrib/workers.py --tag dec2-n0 --num-shards 10 --resume"], run
    assert git(alr, "rev-parse", "HEAD") == git(workdir, "rev-parse", "HEAD")


def runs_prepare_in(proc_dir, repo):
    try:
        return Path(proc_dir, "cwd").resolve() == repo and b"prepare.py" in Path(proc_dir, "cmdline").read_bytes()
    except OSError:
        return False


def test_a_signal_during_set_up_ends_it_without_making_a_branch_or_leaving_prepare_running(repo, launch):
    start, _, _ = launch
    proc = start("--tag", "s", "--workers", "1")
    while "preparing the data" not in (line := proc.stdout.readline()):
        assert line, "contrib/workers.py ended before preparing the data"
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130 and "interrupted during set-up; no agent was started" in out, out
    assert not git(repo, "branch", "--list", "autoresearch/s-*")
    preparing = [p for p in Path("/proc").glob("[0-9]*") if runs_prepare_in(p, repo)]
    assert not preparing, f"prepare.py still running: {preparing}"


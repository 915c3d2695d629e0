"""
One research agent per GPU on this node, each on its own branch in its own git worktree, all archiving
into one shared archive so that each can read what the others tried (program.md says how).

Usage:
    uv run contrib/workers.py --tag dec2                  # a worker on every GPU this node shows
    uv run contrib/workers.py --tag dec2 --gpus 0,1,3     # on these GPUs only
    uv run contrib/workers.py --tag dec2 --resume         # restart an earlier launch's workers where they stopped
    AUTORESEARCH_PROFILE=cpu uv run contrib/workers.py --tag try --workers 2   # no GPU: two cpu-profile workers

For GPU n: the branch autoresearch/<tag>-n, made from this checkout's HEAD and checked out in
<worktrees>/<tag>-n, its harness pinned (`analyze.py pin`). The data is prepared once (`prepare.py`)
before any worker starts. Then README's overnight loop runs per worker, in the worktree, with
CUDA_VISIBLE_DEVICES=n, AUTORESEARCH_WORKER=<tag>-n and AUTORESEARCH_ARCHIVE=<the shared archive>:
the agent is restarted whenever it exits. Its output goes to <logs>/<tag>-n/agent-<time>-<session>.jsonl and
agent.err; the launcher's own lines to stdout and <logs>/workers-<tag>.log. Each worker's insights.md is
copied into the archive (contrib/shared.py) when its agent exits, every minute, and at shutdown.

Ctrl-C (SIGINT), SIGTERM or SIGHUP stops every worker and everything it started: SIGTERM first (train.py then
records its run as a timeout), SIGKILL for whatever is left after the grace period. Each agent runs in
a session of its own, so a terminal's Ctrl-C reaches only the launcher; on Linux the launcher is also
the subreaper of everything below it, so a process that left its session or lost its parent is found
and stopped all the same.
"""
import argparse
import ctypes
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent  # the repository root
sys.path.insert(0, str(HERE))
from contrib.shared import snapshot  # noqa: E402
from harness.record import ARCHIVE_NAME  # noqa: E402  (.claude/settings.json lets agents write only under it)

# ---------------------------------------------------------------------------
# Defaults

AGENT = ("cat program.md | claude -p --permission-mode dontAsk --max-turns 500 "
         "--output-format stream-json --verbose --add-dir \"$AUTORESEARCH_ARCHIVE\"")  # README's loop body
LOGS = Path("~/alr-logs")  # as README's overnight loop
PAUSE_S = 30               # between an agent's exit and its restart, as README's loop
SNAPSHOT_S = 60            # how often each worker's insights.md is copied into the archive (when it changed)
GRACE_S = 15               # between SIGTERM and SIGKILL at shutdown
POLL_S = 0.2               # how often the launcher looks at its workers
PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


class Refusal(Exception):
    """Something the user has to fix, printed as one line."""


class Interrupted(Exception):
    """A signal arrived during set-up."""


STOP = {}  # set by the signal handler: "signal" once one came, "force" at the second


@dataclass
class Worker:
    name: str                 # <tag>-<n>: its AUTORESEARCH_WORKER and the tail of its branch
    gpu: str                  # its CUDA_VISIBLE_DEVICES ("" for a worker without a GPU)
    worktree: Path
    logs: Path
    proc: subprocess.Popen = None  # the agent session running now, None between sessions
    lock: object = None            # the worktree's lock file, open and held (hold_lock)
    restart_at: float = 0.0
    sessions: int = 0

    @property
    def branch(self):
        return f"autoresearch/{self.name}"

    def has_branch(self):
        return git("rev-parse", "--verify", "--quiet", f"refs/heads/{self.branch}", check=False) is not None


def git(*args, cwd=HERE, check=True):
    out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if check and out.returncode != 0:
        said = (out.stderr or out.stdout).strip().splitlines() or [f"exit {out.returncode}"]
        raise Refusal(f"git {' '.join(args)}: {said[-1]}")
    return out.stdout.strip() if out.returncode == 0 else None


# ---------------------------------------------------------------------------
# What to launch

def gpu_ids(gpus, workers):
    """The CUDA_VISIBLE_DEVICES of each worker: --workers N (no GPU), --gpus, or every GPU visible here."""
    if workers:
        return [""] * workers
    if gpus:
        ids = gpus.split(",")
    elif os.environ.get("CUDA_VISIBLE_DEVICES", "").strip():
        ids = os.environ["CUDA_VISIBLE_DEVICES"].split(",")  # a scheduler (SkyPilot, Slurm) gave us these
    else:
        query = shutil.which("nvidia-smi") and subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True)
        ids = query.stdout.split() if query and query.returncode == 0 else []
    ids = [i.strip() for i in ids if i.strip()]
    if not ids:
        raise Refusal("no GPU found (nvidia-smi lists none): name them with --gpus 0,1, "
                      "or run cpu-profile workers with --workers N")
    if len(set(ids)) != len(ids):
        raise Refusal(f"GPUs {','.join(ids)}: one appears twice, and a worker needs a GPU to itself")
    return ids


def plan(args):
    """The workers to run, named <tag>-<GPU index> (<tag>-<position> without a GPU index)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", args.tag) or git(
            "check-ref-format", "--branch", f"autoresearch/{args.tag}-0", check=False) is None:
        raise Refusal(f"--tag {args.tag!r}: use letters, digits, '.', '_' and '-' (it names branches)")
    ids = gpu_ids(args.gpus, args.workers)
    names = [f"{args.tag}-{gpu if gpu.isdigit() else i}" for i, gpu in enumerate(ids)]
    return [Worker(name, gpu, args.worktrees / name, args.logs / name) for name, gpu in zip(names, ids)]


def main_checkout():
    """The repository's main working tree (the same answer from any of its worktrees)."""
    common = Path(git("rev-parse", "--path-format=absolute", "--git-common-dir"))
    if common.name != ".git":
        raise Refusal(f"{common} is not inside a working tree's .git: run contrib/workers.py from a clone")
    return common.parent


def check_machine(agent, archive):
    """What every launch needs: this checkout's environment, git's identity, the agent CLI, the archive's name."""
    if sys.prefix == sys.base_prefix:
        raise Refusal("run it as `uv run contrib/workers.py`: the workers share this checkout's environment")
    if not git("config", "user.email", check=False):
        raise Refusal("git has no user.email and the agents commit: git config --global user.email you@example.com "
                      "(and user.name)")
    if agent == AGENT and not shutil.which("claude"):
        raise Refusal("claude (Claude Code) is not on PATH: install it (README, Running the agent), "
                      "or give the agent's command with --agent")
    if archive.name != ARCHIVE_NAME:
        raise Refusal(f"--archive {archive}: name the directory {ARCHIVE_NAME} (e.g. {archive / ARCHIVE_NAME}), "
                      "the only name under which .claude/settings.json lets agents write their notes")


# ---------------------------------------------------------------------------
# Worktrees, one per worker

def registered_worktrees():
    """{path: branch or None} for every worktree git knows."""
    out, path = {}, None
    for line in git("worktree", "list", "--porcelain").splitlines():
        if line.startswith("worktree "):
            path = Path(line[len("worktree "):]).resolve()
            out[path] = None
        elif line.startswith("branch refs/heads/"):
            out[path] = line[len("branch refs/heads/"):]
    return out


def check_worktrees(workers, resume):
    """Refuse before changing anything: a fresh launch needs new branches and paths, --resume at least one
    existing branch (the others are made: a launch stopped during set-up made only some)."""
    listed = registered_worktrees()
    if resume and not any(w.has_branch() for w in workers):
        raise Refusal(f"--resume: there is no branch {workers[0].branch} or any other of this tag to resume; "
                      "leave out --resume to start them")
    for w in workers:
        there = listed.get(w.worktree.resolve(), False)
        elsewhere = [p for p, b in listed.items() if b == w.branch and p != w.worktree.resolve()]
        if not resume and w.has_branch():
            raise Refusal(f"branch {w.branch} already exists: choose another --tag, "
                          "or add --resume to restart its worker where it stopped")
        if there is not False and there != w.branch:
            raise Refusal(f"{w.worktree} is a worktree of {there or 'a detached HEAD'}, not of {w.branch}: "
                          "pass another --worktrees DIR")
        if there is False and w.worktree.exists():
            raise Refusal(f"{w.worktree} exists and is not a worktree of this repository: "
                          "move it away or pass another --worktrees DIR")
        if elsewhere:
            raise Refusal(f"{w.branch} is checked out in {elsewhere[0]}: a worker needs its branch to itself")


def make_worktree(w, head):
    """Check out the worker's branch in its worktree: a new branch from head, or the existing one."""
    if (w.worktree / ".git").exists():
        return "resumed"
    w.worktree.parent.mkdir(parents=True, exist_ok=True)
    if w.has_branch():
        git("worktree", "add", "--quiet", str(w.worktree), w.branch)
        return "resumed in a new worktree"
    git("worktree", "add", "--quiet", "-b", w.branch, str(w.worktree), head)
    return "new"


def hold_lock(w):
    """An exclusive lock in the worktree's git directory, held while this launcher lives: two launchers
    never run agents in the same worktree."""
    path = Path(git("rev-parse", "--absolute-git-dir", cwd=w.worktree)) / "autoresearch-worker.lock"
    handle = open(path, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise Refusal(f"worker {w.name} is already running: another contrib/workers.py holds {path}") from None
    return handle


def worker_env(w, archive):
    return dict(os.environ, CUDA_VISIBLE_DEVICES=w.gpu, AUTORESEARCH_WORKER=w.name,
                AUTORESEARCH_ARCHIVE=str(archive),
                CUDA_DEVICE_ORDER="PCI_BUS_ID",  # so that GPU n is nvidia-smi's GPU n
                # one environment for every worktree: uv.lock is the same in all of them, and a copy per
                # worktree costs ~7 GB of disk wherever uv cannot hard-link from its cache
                UV_PROJECT_ENVIRONMENT=sys.prefix, VIRTUAL_ENV=sys.prefix)


def run_step(cmd, cwd, env, what, then="launch again"):
    """A set-up step whose output the user sees; a failure stops the launch, and so does a signal, after
    which the step and whatever it started are gone before the launcher is."""
    if "signal" in STOP:
        raise Interrupted
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    while True:
        try:
            output = proc.communicate(timeout=POLL_S)[0]
            break
        except subprocess.TimeoutExpired:  # no output is lost: communicate() picks up where it stopped
            if "signal" in STOP:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(GRACE_S)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                raise Interrupted from None
    for line in output.strip().splitlines():
        print(f"  {line}", flush=True)
    if proc.returncode != 0:
        raise Refusal(f"{what} failed (exit {proc.returncode}, its output above): fix that, then {then}")


# ---------------------------------------------------------------------------
# Processes

def descendants():
    """Pids of every live process below the launcher (Linux /proc; elsewhere [], and only groups are signalled)."""
    children = {}
    try:
        entries = [e for e in os.scandir("/proc") if e.name.isdigit()]
    except FileNotFoundError:
        return []
    for entry in entries:
        try:
            state, ppid = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):
            continue  # it exited while we looked
        children.setdefault(int(ppid), []).append((int(entry.name), state))
    out, todo = [], [os.getpid()]
    while todo:
        for pid, state in children.get(todo.pop(), []):
            todo.append(pid)
            if state != "Z":  # a zombie has exited already; reap() collects it
                out.append(pid)
    return out


def become_subreaper():
    """Orphans of our workers re-parent to us, not to init, so that shutdown still finds them."""
    if not sys.platform.startswith("linux"):
        return False
    return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def reap(workers):
    """Collect every exited child: [(worker, exit code)] for agent sessions; orphans are just reaped."""
    sessions, ended = {w.proc.pid: w for w in workers if w.proc}, []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            pid = 0
        if pid == 0:
            return ended
        if pid in sessions:
            ended.append((sessions[pid], os.waitstatus_to_exitcode(status)))


def start_session(w, command, env):
    """One agent session in the worker's own session and process group, output to a new log file."""
    w.logs.mkdir(parents=True, exist_ok=True)
    w.sessions += 1
    log = w.logs / f"agent-{time.strftime('%Y%m%d-%H%M%S')}-{w.sessions}.jsonl"  # sorts in time order
    with open(log, "wb") as out, open(w.logs / "agent.err", "ab") as err:
        # the session inherits the lock: should this launcher be killed outright, the agent it leaves running
        # still holds it, and a relaunch refuses rather than start a second agent on the same GPU
        w.proc = subprocess.Popen(["bash", "-c", command], cwd=w.worktree, env=env, stdin=subprocess.DEVNULL,
                                  stdout=out, stderr=err, start_new_session=True,
                                  pass_fds=(w.lock.fileno(),) if w.lock else ())
    return log


def signal_all(workers, sig):
    """Signal each agent's process group and every other process below us. Returns how many were signalled."""
    pids = set(descendants())
    for kill, pid in [(os.killpg, w.proc.pid) for w in workers if w.proc] + [(os.kill, pid) for pid in pids]:
        try:
            kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    return len(pids)


def wait_gone(workers, seconds, impatient=False):
    """Reap until nothing is left below us or `seconds` pass (or, if impatient, a second signal comes)."""
    deadline = time.monotonic() + seconds
    while descendants() and time.monotonic() < deadline and not (impatient and STOP.get("force")):
        reap(workers)
        time.sleep(0.05)
    reap(workers)
    return descendants()


# ---------------------------------------------------------------------------
# The launcher

class Log:
    """The launcher's lines, timestamped, to stdout and to <logs>/workers-<tag>.log."""
    def __init__(self, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a")

    def __call__(self, message):
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        self.file.write(line + "\n")
        self.file.flush()
        try:
            print(line, flush=True)
        except OSError:  # the terminal or the pipe is gone: keep stopping the workers, the file has the line
            sys.stdout = open(os.devnull, "w")


def snapshot_insights(workers, archive, log):
    for w in workers:
        try:
            snapshot(archive, w.name, w.worktree / ARCHIVE_NAME / "insights.md")
        except OSError as e:  # the agent rewriting it, a full disk: the next copy comes later, the workers run on
            log(f"{w.name}: insights.md not copied into the archive: {e}")


def supervise(workers, command, envs, pause, log, archive):
    """README's restart loop for every worker at once, until a signal asks to stop."""
    copied = time.monotonic()
    while "signal" not in STOP:
        now = time.monotonic()
        ended = reap(workers)
        for w, code in ended:
            w.proc.returncode, w.proc = code, None  # reaped here, so Popen must not wait for it again
            w.restart_at = now + pause
            log(f"{w.name}: agent exited ({code}), restarting in {pause:g} s")
        if ended or now - copied > SNAPSHOT_S:
            snapshot_insights(workers, archive, log)
            copied = now
        for w in workers:
            if w.proc is None and now >= w.restart_at and "signal" not in STOP:
                path = start_session(w, command, envs[w.name])
                log(f"{w.name}: agent session {w.sessions} started (pid {w.proc.pid}), output {path}")
        time.sleep(POLL_S)


def shut_down(workers, grace, log):
    """TERM everything below us, give it `grace` seconds, KILL the rest; 0 when nothing is left running."""
    n = signal_all(workers, signal.SIGTERM)
    log(f"stopping: SIGTERM to {n} processes, SIGKILL to any left after {grace:g} s")
    left = wait_gone(workers, grace, impatient=True)
    if left:
        log(f"{len(left)} processes still running: SIGKILL")
        signal_all(workers, signal.SIGKILL)
        left = wait_gone(workers, 10)
    for w in workers:
        if w.proc and w.proc.returncode is None:
            w.proc.returncode = -signal.SIGKILL  # reaped by wait_gone
    if left:
        log(f"still running after SIGKILL: {' '.join(map(str, left))}")
        return 1
    log("all workers stopped, nothing left running")
    return 0


def prepare_workers(args, workers, archive):
    """Everything before the first agent starts; refuses before changing anything when it can."""
    git("worktree", "prune")  # forget worktrees whose directories were deleted by hand
    check_worktrees(workers, args.resume)
    head = git("rev-parse", "HEAD")
    if git("status", "--porcelain", "--untracked-files=no"):
        print(f"note: uncommitted changes here are not in the workers' worktrees, which start from HEAD "
              f"{head[:7]}", flush=True)
    # a launcher already running these workers refuses us before any work
    locks = {w.name: hold_lock(w) for w in workers if (w.worktree / ".git").exists()}
    # the data first: if it cannot be prepared, no branch is made and the same command can be run again
    print("preparing the data once for every worker (prepare.py; a second time does no work)", flush=True)
    shards = [] if args.num_shards is None else ["--num-shards", str(args.num_shards)]
    run_step([sys.executable, "prepare.py", *shards], HERE, dict(os.environ), "prepare.py")
    envs = {}
    for w in workers:
        how = make_worktree(w, head)
        locks[w.name] = w.lock = locks.get(w.name) or hold_lock(w)
        envs[w.name] = worker_env(w, archive)
        print(f"{w.name}: {w.branch} in {w.worktree} ({how}), GPU {w.gpu or 'none'}, logs {w.logs}/", flush=True)
        run_step([sys.executable, "analyze.py", "pin"], w.worktree, envs[w.name], f"{w.name}: analyze.py pin",
                 then="launch again with --resume")
    return locks, envs


def parse_args(argv):
    p = argparse.ArgumentParser(description="One research agent per GPU, each on its own branch and worktree, "
                                            "sharing one archive. Ctrl-C stops them all.")
    p.add_argument("--tag", required=True, help="names the branches autoresearch/<tag>-<GPU>")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--gpus", help="comma-separated GPU indices (default: every GPU visible)")
    which.add_argument("--workers", type=int, help="N workers without a GPU (the cpu profile, or trying it out)")
    p.add_argument("--num-shards", type=int, help="training shards prepare.py makes sure of (default: its own)")
    p.add_argument("--resume", action="store_true", help="restart the workers of existing branches <tag>-<n>")
    p.add_argument("--agent", default=AGENT, help="the agent's shell command, run in its worktree "
                                                  f"(default: {AGENT})")
    p.add_argument("--archive", type=Path, help="the shared archive (default: .auto-log-research in the main checkout)")
    p.add_argument("--worktrees", type=Path, help="where the worktrees go (default: <checkout>-workers beside it)")
    p.add_argument("--logs", type=Path, default=LOGS, help=f"agent logs, one directory per worker (default: {LOGS})")
    p.add_argument("--pause", type=float, default=PAUSE_S, help="seconds between an agent's exit and its restart")
    p.add_argument("--grace", type=float, default=GRACE_S, help="seconds between SIGTERM and SIGKILL at shutdown")
    args = p.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        p.error(f"--workers {args.workers}: at least 1")
    checkout = main_checkout()
    args.archive = (args.archive or checkout / ARCHIVE_NAME).expanduser().resolve()
    args.worktrees = (args.worktrees or checkout.parent / f"{checkout.name}-workers").expanduser().resolve()
    args.logs = args.logs.expanduser().resolve()
    return args


def on_signal(signum, frame):
    STOP["force"] = "signal" in STOP  # a second Ctrl-C skips the grace period
    STOP["signal"] = signum


def main(argv=None):
    # set here, not inherited: a launcher started in the background of a script inherits SIGINT ignored
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGHUP: the terminal closed
        signal.signal(sig, on_signal)
    try:
        args = parse_args(argv)
        check_machine(args.agent, args.archive)
        workers = plan(args)
        args.archive.mkdir(parents=True, exist_ok=True)
        locks, envs = prepare_workers(args, workers, args.archive)  # held until we return
        if "signal" in STOP:
            raise Interrupted
    except Refusal as e:
        print(f"contrib/workers.py: {e}", file=sys.stderr)
        return 2
    except Interrupted:
        print("contrib/workers.py: interrupted during set-up; no agent was started", file=sys.stderr)
        return 130
    log = Log(args.logs / f"workers-{args.tag}.log")
    log(f"{len(workers)} workers, archive {args.archive}; Ctrl-C stops them all")
    if not become_subreaper():
        log("note: not Linux, so a process that leaves its worker's session may outlive a stop")
    supervise(workers, args.agent, envs, args.pause, log, args.archive)
    stopped = shut_down(workers, args.grace, log)
    snapshot_insights(workers, args.archive, log)
    return stopped


if __name__ == "__main__":
    sys.exit(main())

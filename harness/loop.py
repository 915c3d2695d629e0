"""
One experiment, `analyze.py run ["DESCRIPTION"]`, and the bare `analyze.py` that archives the run in the
working directory. The harness, not train.py, owns the clock, the number and the decision:

1. preflight refuses, in one line, a run that could not be trusted or recorded (nothing runs);
2. a changed train.py is committed with DESCRIPTION as its message; an unchanged one is a rerun of HEAD;
3. train.py trains as a child, contained (sandbox(); without bwrap the run says `uncontained` first), on
   this process's clock (spawn, first row of metrics.jsonl, hand-off, exit), stopped at prepare.hard_cap_s
   (the one rule) or by Ctrl-C / SIGTERM; a stop names its phase and how long each phase took;
4. the model train.py handed off is measured ONCE, by harness/evaluate.py in an isolated interpreter, and
   its number is appended to run.log's final block as `val_bpb:` and `measured_by: harness` (also when
   the run was interrupted after the hand-off);
5. the run is archived as one run.json (harness.record), with the caught cases and the decision of
   harness.decide, which is then applied: keep, rerun (stays pending), discard or crash (train.py restored
   from the best's commit in a commit of its own).

Exit status of `run`: 0 archived and decided, 2 refused, 130 stopped by Ctrl-C or SIGTERM (archived).
"""
import dataclasses
import fcntl
import importlib.metadata
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from harness.decide import best_code_runs, best_of, caught, decide
from harness.record import (UNCOMMITTED, Archive, Measured, RecordError, Run, StatusChange, code_sha, current_branch,
                            ensure_pin, evidence, final_block, git, gpu_class, harness_changes, now_utc, number,
                            sha256_file, train_py_at, trained_of, worker_name)
from harness.report import draw_progress, run_lines, write_analysis

POLL_S = 0.5                 # how often the parent looks at the child, metrics.jsonl and the hand-off
GRACE_S = 15.0               # after SIGTERM or SIGINT to a process group, before SIGKILL
EVALUATOR_CAP_S = {"gpu": 300.0, "cpu": 600.0}  # generous: a finished run is not lost for want of time
HANDOFF_GRACE_S = 120.0      # once the model is handed off, train.py has this long past the cap to exit
STALE_SLACK_S = 30.0         # run.log written this long after the summary finished: the summary is older
# train.py's bytecode and torch's compile caches: folders of its own, which no harness process reads (fresh ones
# per run would recompile torch's Python files each time, ~4 s on a laptop CPU, and its kernels on a GPU)
CHILD_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "auto-log-research" / "train"
OUTPUTS = ("metrics.jsonl", "run_summary.json")  # train.py's files: in its run directory, then the worktree's
# the sandbox: the whole filesystem read-only, fresh /dev, /proc and /tmp, every namespace bwrap can unshare
# (network and PIDs included), a session of its own (no terminal to type into), gone when its parent is
BWRAP = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "--unshare-all",
         "--die-with-parent", "--new-session"]


class Refused(Exception):
    """Preflight's one line: what is wrong and what to do. Nothing ran and nothing was recorded."""


@dataclass
class Plan:
    branch: str
    pin: str
    profile: str
    budget: float            # TIME_BUDGET, seconds of training
    cap_s: float             # prepare.hard_cap_s(budget, the best's runs' largest outside_s)
    changed: bool            # train.py differs from HEAD: it is committed first
    uncontained: str | None = None  # why train.py cannot run in a sandbox here; None: it does


@dataclass
class Child:
    """train.py's process as the parent saw it: seconds since the spawn, on the parent's clock."""
    exit_code: int
    wall_s: float
    first_row_s: float | None = None   # metrics.jsonl held a row: start-up is over
    handoff_s: float | None = None     # the model was handed off: training is over
    stopped: str | None = None         # "timeout" (the hard cap) or "interrupted" (Ctrl-C / SIGTERM here)

    @property
    def phase(self):
        return "start-up" if self.first_row_s is None else "training" if self.handoff_s is None else "hand-off"

    def phases(self):
        """How long each phase took, in one phrase."""
        bounds = [0.0, *(t for t in (self.first_row_s, self.handoff_s) if t is not None), self.wall_s]
        names = ("start-up", "training", "hand-off")
        return ", ".join(f"{name} {b - a:.1f} s" for name, a, b in zip(names, bounds, bounds[1:]))


def prepare_module():
    """prepare.py, imported once preflight has checked it against the pin (it is a harness file, and
    importing it runs it); and only by the commands that need it, since it imports torch."""
    import prepare
    return prepare


# ---------------------------------------------------------------------------
# `analyze.py run`

def cmd_run(description):
    """`analyze.py run`: the exit status (0 decided, 2 refused, 130 interrupted)."""
    try:
        top = git("rev-parse", "--show-toplevel")
        if not top:
            raise Refused(f"{Path.cwd()} is in no git repository: run analyze.py in the one that holds train.py")
        os.chdir(top.strip())
        archive = Archive.here()
        with run_lock(archive):
            plan = preflight(archive, description)
            commit, note = commit_train_py(description, plan.changed)
            return experiment(archive, plan, commit, note)
    except Refused as e:
        print(f"analyze.py run: refused: {e}", file=sys.stderr)
        return 2


def experiment(archive, plan, commit, note):
    """Train, measure, archive, decide. Ctrl-C and SIGTERM stop the child or the evaluator while they run; at
    any other moment they wait until the run is archived (a half-applied decision is worse than a late exit)."""
    came = []
    with on_interrupt(lambda signum, frame: came.append(signum)), \
            tempfile.TemporaryDirectory(prefix="auto-log-research-run-") as tmp:
        child = train(plan, Path(tmp))
        summary, printed = read_json(Path("run_summary.json")), number(final_block(Path("run.log")).get("val_bpb"))
        measured = measure(plan, commit, child, summary, Path(tmp), came)
        run, best, after, runs = archive_and_decide(archive, plan, commit, summary, printed, measured)
    print("\n".join(run_lines(run, best, "; ".join(filter(None, [note, after])), runs, archive)))
    return 130 if measured.stopped == "interrupted" or came else 0


@contextmanager
def run_lock(archive):
    """One `run` at a time in this worktree: they would share run.log, metrics.jsonl and train.py."""
    archive.local.mkdir(parents=True, exist_ok=True)
    with open(archive.local / "run.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise Refused(f"another `analyze.py run` is in progress in this worktree (pid {f.read().strip() or '?'}); "
                          "wait for it to end") from None
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield

# ---------------------------------------------------------------------------
# Preflight

def preflight(archive, description):
    refuse_untracked_modules()
    refuse_startup_files()
    branch = current_branch()
    if branch is None:
        raise Refused("HEAD is detached: check out the experiment's branch (`git checkout autoresearch/<tag>`)")
    worker = worker_name()
    with archive.lock():  # the pin is made on first use, as archiving does
        runs = archive.runs()
        own = [r for r in runs if r.branch == branch and r.worker == worker]
        pin, problem = ensure_pin(branch, [r.id for r in own])
    if problem:
        raise Refused(problem)
    changes = harness_changes(pin)
    if changes:
        raise Refused(f"harness files differ from the branch's pin: {'; '.join(changes)}; restore them "
                      f"(`git checkout {pin[:7]} -- FILE`): only train.py is the experiment's")
    status = git("status", "--porcelain", "-z", "--untracked-files=no") or ""
    others = sorted({e[3:] for e in status.split("\0") if len(e) > 3 and e[3:] != "train.py"})
    if others:
        raise Refused(f"tracked files other than train.py are modified ({', '.join(others[:5])}): an experiment "
                      "changes train.py alone; restore them (`git checkout -- FILE`) or commit them first")
    changed = bool((git("diff", "--name-only", "HEAD", "--", "train.py") or "").strip())
    if changed and not description:
        raise Refused('train.py differs from HEAD: say what changed, `uv run analyze.py run "DESCRIPTION"` '
                      "(it becomes the commit message)")
    head = git("rev-parse", "HEAD").strip()
    latest = next((r for r in reversed(own) if r.commit == head), None)
    if changed and latest and latest.status == "pending" and latest.decision and latest.decision.kind == "rerun":
        raise Refused(f"run {latest.id} of HEAD is a pending rerun: rerun HEAD's train.py first (set your edit aside, "
                      "`git checkout -- train.py`, `uv run analyze.py run`), or give up on HEAD's code with "
                      f"`uv run analyze.py status {latest.id} discard`")
    prepare = prepare_module()
    try:
        for split in ("train", "val", "heldout", "dev"):
            prepare.shard_paths(split)
    except prepare.PrepareError as e:  # its message says what to run
        raise Refused(str(e)) from None
    if not (prepare.TOKENIZER_DIR / "tokenizer.pkl").exists():
        raise Refused(f"no tokenizer in {prepare.TOKENIZER_DIR}: run `uv run prepare.py`")
    budget = float(prepare.TIME_BUDGET)
    cap = prepare.hard_cap_s(budget, outside_ref(runs, own))
    return Plan(branch, pin, prepare.PROFILE, budget, cap, changed, sandbox_problem())


def refuse_untracked_modules():
    """A module at the repository root that git does not track: train.py runs with the root first on
    sys.path, so an argparse.py there would stand in for the standard library's in the child."""
    tracked = {p.split("/")[0] for p in (git("ls-files", "-z") or "").split("\0") if p}
    for entry in sorted(Path(".").iterdir()):
        found = re.fullmatch(r"([A-Za-z_]\w*)(\.[\w-]+)?\.(py|pyc|pyw|so|pyd)", entry.name) if entry.is_file() else None
        module = found.group(1) if found else entry.name if (entry / "__init__.py").exists() else None
        if module and entry.name not in tracked:
            raise Refused(f"{entry.name} at the repository root is not tracked by git and would be imported as the "
                          f"module `{module}` ahead of any other: move it out of the repository root")


def refuse_startup_files():
    """A .pth, sitecustomize or usercustomize file in the venv's site-packages runs in every Python process of
    the venv, the evaluator's included: one that no installed distribution's RECORD lists is code git does not
    pin (the lock explains the others)."""
    for site in sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}):
        listed = {str(f).split("/")[0] for d in importlib.metadata.distributions(path=[site]) for f in d.files or ()}
        for entry in sorted(Path(site).iterdir()):
            if (entry.suffix == ".pth" or entry.name.split(".")[0] in ("sitecustomize", "usercustomize")) \
                    and entry.name not in listed:
                raise Refused(f"{entry} is in no installed package's RECORD, and Python runs it at every start, the "
                              "evaluator's included: remove it (or `uv sync --reinstall`)")


def outside_ref(runs, own):
    """The largest outside_s of the runs of the best's code (the reference of the hard cap), or None."""
    if not own:
        return None
    upcoming = dataclasses.replace(own[-1], id="", archived_at=time.time())  # the next run, as the latest was made
    ref = best_code_runs(runs, upcoming, best_of(runs, upcoming))
    return max((r.outside_s for r in ref if r.outside_s is not None), default=None)


def commit_train_py(description, changed):
    """(the commit that runs, a note or None): a changed train.py committed with DESCRIPTION as the message."""
    if not changed:
        note = (f"train.py is HEAD's: this run measures HEAD as it is (the DESCRIPTION {description!r} is not used)"
                if description else None)
        return git("rev-parse", "HEAD").strip(), note
    out = subprocess.run(["git", "commit", "-q", "-m", description, "--", "train.py"], capture_output=True, text=True)
    if out.returncode != 0:
        raise Refused(f"`git commit -- train.py` failed: {last_line(out.stderr or out.stdout)}")
    return git("rev-parse", "HEAD").strip(), None

# ---------------------------------------------------------------------------
# Train.py and the evaluator, as children on the parent's clock

def train(plan, tmp):
    """train.py in tmp/child, its run directory: the only place it can write when contained, where it writes its
    outputs and hands off its model. They show in the worktree, where train.py run by hand writes them: as links
    while it runs, copied once it has ended. stdout and stderr go to run.log."""
    work = tmp / "child"
    work.mkdir()
    for name in OUTPUTS:  # an earlier run's files must not pass as this one's
        Path(name).unlink(missing_ok=True)
        Path(name).symlink_to(work / name)
    handoff, metrics, child = work / "model.pt", work / "metrics.jsonl", Child(0, 0.0)

    def look(now):
        """Notes the phases; returns the cap: a run whose training finished is not stopped for want of time."""
        if child.first_row_s is None and b"\n" in (read_regular(metrics, 1 << 16) or b""):
            child.first_row_s = now
        if child.handoff_s is None and handoff.exists():
            child.handoff_s = now
        return plan.cap_s if child.handoff_s is None else max(plan.cap_s, child.handoff_s + HANDOFF_GRACE_S)

    caches = {"PYTHONPYCACHEPREFIX": "pycache", "TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton"}
    env = {**os.environ, "AUTORESEARCH_HANDOFF": str(handoff), **{k: str(CHILD_CACHE / v) for k, v in caches.items()}}
    for folder in caches.values():
        (CHILD_CACHE / folder).mkdir(parents=True, exist_ok=True)
    box = [] if plan.uncontained else sandbox(prepare_module(), [work, CHILD_CACHE])
    child.exit_code, child.stopped, child.wall_s = supervise([*box, sys.executable, str(Path("train.py").resolve())],
                                                             Path("run.log"), env, plan.cap_s, look, work)
    for name, data in ((name, read_regular(work / name)) for name in OUTPUTS):
        Path(name).unlink(missing_ok=True)
        if data is not None:
            Path(name).write_bytes(data)
    return child


def sandbox_problem():
    """Why train.py cannot run contained here, or None: no bwrap, or one that cannot make namespaces (a
    container that allows none)."""
    if shutil.which("bwrap") is None:
        return "no bwrap on PATH (install the package bubblewrap)"
    out = subprocess.run([*BWRAP, "--", "true"], capture_output=True, text=True)
    return None if out.returncode == 0 else f"bwrap cannot make a sandbox here: {last_line(out.stderr)}"


def sandbox(prepare, writable, scores=False):
    """bwrap's arguments for train.py: BWRAP, the GPUs, the paths it reads put back over the private /tmp, the
    validation and held-out shards and their token caches replaced by empty files (unless scores: the
    evaluator, which imports train.py, reads them), `writable` writable, the first of them the working directory."""
    hidden = () if scores else tuple(Path(name).stem for name in (prepare.VAL_FILENAME, prepare.HELDOUT_FILENAME))
    common = git("rev-parse", "--path-format=absolute", "--git-common-dir")
    seen = [Path.cwd(), Path(sys.prefix), Path(sys.base_prefix), prepare.DATA_DIR, prepare.TOKENIZER_DIR,
            *([Path(common.strip())] if common else [])]
    args = BWRAP + [a for p in sorted(Path("/dev").glob("nvidia*")) for a in ("--dev-bind", str(p), str(p))]
    args += [a for p in seen if p.exists() for a in ("--ro-bind", str(p), str(p))]
    args += [a for p in sorted(prepare.DATA_DIR.rglob("*")) if p.name.lstrip(".").startswith(hidden) and p.is_file()
             for a in ("--ro-bind", "/dev/null", str(p))]
    args += [a for p in writable for a in ("--bind", str(p), str(p))]
    return args + ["--chdir", str(writable[0])]


def supervise(cmd, log_path, env, cap_s, look=None, cwd=None):
    """(exit code, None | "timeout" | "interrupted", seconds) of `cmd` run in a session of its own, output to
    log_path, stopped at cap_s (SIGTERM) or by Ctrl-C / SIGTERM here (SIGINT to it), then SIGKILL after
    GRACE_S. look(seconds) is called as it runs and may return a new cap. Whatever is left of its process group
    at the end is killed. A command in bwrap is signalled in the sandbox (bwrap --info-fd names its first
    process, whose group train.py is in), and a code 128 + N from it is signal N's."""
    info = os.pipe() if cmd[0] == "bwrap" else None
    cmd = [cmd[0], "--info-fd", str(info[1]), *cmd[1:]] if info else cmd
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True, pass_fds=info[1:] if info else ())
    group = sandbox_pid(info, proc.pid) if info else proc.pid
    spawn, stopped = time.monotonic(), None
    try:
        with on_interrupt(raise_interrupt):
            while not exited(proc, POLL_S):
                cap_s = (look or (lambda now: None))(time.monotonic() - spawn) or cap_s
                if time.monotonic() - spawn > cap_s and stopped is None:
                    stopped = "timeout"
                    stop(proc, group, signal.SIGTERM)
    except KeyboardInterrupt:
        stopped = "interrupted"
        stop(proc, group, signal.SIGINT)
    seconds = time.monotonic() - spawn
    (look or (lambda now: None))(seconds)
    for pgid in {group, proc.pid}:
        kill_group(pgid, signal.SIGKILL)
    code = proc.returncode
    return (128 - code if info and code > 128 else code), stopped, seconds


def sandbox_pid(info, fallback):
    """The host pid of the sandbox's first process, from bwrap's --info-fd JSON (fallback when there is none)."""
    os.close(info[1])
    with os.fdopen(info[0], "rb") as f:  # bwrap closes it once written
        try:
            return int(json.loads(f.read())["child-pid"])
        except (ValueError, KeyError, TypeError):
            return fallback


def exited(proc, timeout):
    try:
        proc.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


def stop(proc, group, sig):
    for s in (sig, signal.SIGKILL):
        kill_group(group, s)
        if exited(proc, GRACE_S):
            return


def kill_group(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):  # the group is gone already
        pass


def read_regular(path, size=-1):
    """The bytes of a file train.py wrote, or None when it is missing or no regular file (a link, or a FIFO
    that would block the harness)."""
    try:
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW), "rb") as f:
            return f.read(size) if stat.S_ISREG(os.fstat(f.fileno()).st_mode) else None
    except OSError:
        return None


def raise_interrupt(signum, frame):
    raise KeyboardInterrupt


@contextmanager
def on_interrupt(handler):
    """Ctrl-C and SIGTERM handled by handler(signum, frame) inside. A child started inside gets them at their
    default (a handler, unlike SIG_IGN, is not inherited), even when this process was started with SIGINT
    ignored, in the background of a script."""
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)

# ---------------------------------------------------------------------------
# The number: what the parent saw, and the model measured by the evaluator

def measure(plan, commit, child, summary, tmp, came=()):
    """The harness's Measured of this run; the model is evaluated only when train.py ended as it should, or was
    interrupted once it had handed the model off (so that stopping a run cannot choose which runs count)."""
    m = Measured(val_bpb=None, wall_s=round(child.wall_s, 3),
                 first_row_s=None if child.first_row_s is None else round(child.first_row_s, 3))
    handoff = tmp / "child" / "model.pt"
    if child.stopped and not (child.stopped == "interrupted" and handoff.exists()):
        why = "the hard cap of {:.0f} s".format(plan.cap_s) if child.stopped == "timeout" else "Ctrl-C or SIGTERM"
        m.stopped, m.phase = child.stopped, child.phase
        m.error = f"train.py was stopped by {why} in {child.phase} after {child.wall_s:.0f} s ({child.phases()})"
        return m
    if child.stopped:
        m.stopped, m.phase = child.stopped, child.phase
        print("analyze.py run: interrupted after the hand-off: measuring the model (Ctrl-C again stops that)",
              file=sys.stderr, flush=True)
    error = None if child.stopped else unmeasurable(plan, child, summary, handoff)
    if error is None and came:
        m.stopped, m.phase, error = "interrupted", "evaluation", "stopped by Ctrl-C or SIGTERM before the model was measured"
    if error is not None:
        m.error = error
        return m
    out, stopped, eval_s = evaluate(commit, tmp, EVALUATOR_CAP_S[plan.profile], not plan.uncontained)
    m.eval_s = round(eval_s, 3)
    if stopped:
        m.stopped, m.phase = stopped, "evaluation"
        why = f"its cap of {EVALUATOR_CAP_S[plan.profile]:.0f} s" if stopped == "timeout" else "Ctrl-C or SIGTERM"
        m.error = f"the evaluator was stopped by {why} ({child.phases()}, evaluation {eval_s:.1f} s)"
        return m
    for key in ("val_bpb", "heldout_bpb", "future_leak", "speed_before", "speed_after"):
        setattr(m, key, number(out.get(key)))
    m.error = None if m.val_bpb is not None else f"the evaluator failed: {out.get('error') or 'no number'}"
    if m.val_bpb is not None:
        with open("run.log", "a") as log:  # the final block is the last thing train.py printed
            log.write(f"val_bpb:          {m.val_bpb:.6f}\nmeasured_by:      harness\n")
    return m


def unmeasurable(plan, child, summary, handoff):
    """Why the run cannot be measured, or None: train.py must exit 0 with its summary and its final block,
    hand off its model, and leave the harness as it found it."""
    if child.exit_code != 0:
        how = (f"was killed by signal {signal.Signals(-child.exit_code).name}" if child.exit_code < 0
               else f"exited with code {child.exit_code}")
        return f"train.py {how} (its traceback, if any, is in run.log)"
    if (summary or {}).get("status") != "ok":
        return f"train.py exited 0, but run_summary.json {'says ' + repr(summary.get('status')) if summary else 'is missing'}"
    if not final_block(Path("run.log")):
        return "train.py exited 0 without its final `---` block in run.log"
    if not handoff.exists():
        return "train.py handed off no model: prepare.evaluate_bpb, which saves it, was never called"
    changes = harness_changes(plan.pin, (summary.get("git") or {}).get("harness_sha256"))
    return f"harness files changed during the run: {'; '.join(changes)}" if changes else None


def evaluate(commit, tmp, cap_s, contained):
    """(the evaluator's JSON, None | "timeout" | "interrupted", seconds). It reads the committed train.py and a
    bytecode folder made after train.py ended; the inductor cache is the profile's own (harness/evaluate.py).
    Contained as train.py is (it imports train.py), with the shards it scores, writing only tmp and that cache."""
    (tmp / "train.py").write_text(train_py_at(commit) or "")
    prepare = prepare_module()
    inductor = prepare.TOKENIZER_DIR.parent / "inductor"
    inductor.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor), "TORCHINDUCTOR_FX_GRAPH_CACHE": "1"}
    box = sandbox(prepare, [tmp, inductor], scores=True) if contained else []
    cmd = box + [sys.executable, "-I", "-B", "-X", f"pycache_prefix={tmp / 'eval-pycache'}",
           str(Path(__file__).resolve().parent / "evaluate.py"), "--handoff", str(tmp / "child" / "model.pt"),
           "--train-py", str(tmp / "train.py"), "--out", str(tmp / "eval.json")]
    code, stopped, seconds = supervise(cmd, tmp / "evaluator.log", env, cap_s)
    out = read_json(tmp / "eval.json") or {"error": last_line((tmp / "evaluator.log").read_text(errors="replace"))}
    return out, stopped, seconds

# ---------------------------------------------------------------------------
# The run record, archived; the decision, applied

def archive_and_decide(archive, plan, commit, summary, printed, measured):
    """(the archived Run, the best it was judged against, what happened to train.py). `printed`: a val_bpb
    train.py's final block held before the harness appended its own (under the harness it prints none)."""
    with archive.lock():
        runs = archive.runs()
        run = new_run(archive, commit, summary, measured, plan.branch, plan.pin, plan.profile, runs)
        run.contained = plan.uncontained is None
        run.notes += [f"uncontained: train.py ran outside a sandbox: {plan.uncontained}"] if plan.uncontained else []
        if measured.stopped:  # stopped by the harness: that is how train.py ended
            run.trained.outcome = measured.stopped
        if run.trained.reported_val_bpb is None:
            run.trained.reported_val_bpb = printed
        best = store(archive, run, runs, train_py_at(commit) or "", ran_tree=False, metrics=True)
        if run.val_bpb is not None:
            run.caught = caught(run, best, runs)
        run.statuses = [StatusChange(first_status(run), now_utc(), "archive")]
        run.decision = decide(run, runs)
        archive.save(run)
        after = apply(archive, run, best, runs)
        everything = publish(archive, run, runs)
    return run, best, after, everything


def publish(archive, run, runs):
    """analysis.md and plots of the run, progress.png and results.tsv of all: derived, rebuilt whole."""
    everything = runs + [run]
    write_analysis(run, everything, archive)
    draw_progress(everything, archive.progress)
    archive.rebuild(everything)
    return everything


def apply(archive, run, best, runs):
    """The decision's status (keep, discard, crash; a rerun stays pending, an invalid run stays invalid) and
    what happened to train.py, in one line."""
    kind = run.decision.kind
    if kind in ("keep", "discard", "crash") and run.status == "pending":
        try:
            archive.set_status(run, kind, "harness")
        except RecordError as e:  # the record's own rules (evidence, uncommitted code): the run stays pending
            return f"status stays {run.status}: {e}"
    if kind == "keep":
        return f"train.py: kept; commit {run.commit[:7]} is the branch's best now"
    if kind == "rerun":
        return "train.py: unchanged; rerun it as it is with `uv run analyze.py run`"
    target = next((r for r in runs if r.id == run.decision.best_id), best)
    return restore_train_py(target) if target else "train.py: unchanged, there is no best to restore it from"


def restore_train_py(best):
    """After a discard or a crash: train.py back to the best's, in a commit of its own."""
    if git("rev-parse", "HEAD:train.py") == git("rev-parse", f"{best.commit}:train.py"):
        return f"train.py: unchanged, it is the best's ({best.id})"
    for args in (["checkout", best.commit, "--", "train.py"],
                 ["commit", "-q", "-m", f"Restore train.py from {best.commit[:7]}", "--", "train.py"]):
        out = subprocess.run(["git", *args], capture_output=True, text=True)
        if out.returncode != 0:
            return f"train.py: restoring the best's failed (`git {args[0]}`: {last_line(out.stderr)}); restore it by hand"
    return f"train.py: restored from the best {best.id} in commit {git('rev-parse', '--short=7', 'HEAD').strip()}"


def new_run(archive, commit, summary, measured, branch, pin, profile, runs):
    """The Run of this commit from run_summary.json (train.py's word) and the harness's Measured (or None)."""
    s = summary or {}
    worker = worker_name()
    latest = next((r for r in reversed(runs) if r.worker == worker), None)
    harness = s.get("harness") if isinstance(s.get("harness"), dict) else (latest.harness if latest else {"profile": profile})
    description = (git("log", "-1", "--format=%s", commit) or "").strip()
    if (s.get("git") or {}).get("dirty"):
        description += UNCOMMITTED
    return Run(id=archive.new_id(commit), commit=commit, description=description, branch=branch, worker=worker,
               started_at=number((s.get("timings") or {}).get("started_at")), archived_at=time.time(),
               harness=harness, gpu=gpu_class({**s, "harness": harness}), code_sha="", pin=pin,
               harness_changes=harness_changes(pin, (s.get("git") or {}).get("harness_sha256")) if pin else [],
               trained=trained_of(s), measured=measured, caught=[], decision=None, statuses=[], evidence={})


def store(archive, run, runs, source, ran_tree, metrics):
    """The evidence beside run.json (run.log, metrics.jsonl when it is this run's, diff.patch of train.py as
    it ran against the best) with their sha256, and the run's code_sha and best_id; returns the best or None."""
    best = best_of(runs + [run], run)
    run.best_id, run.code_sha = (best.id if best else None), code_sha(source)
    run_dir = archive.run_dir(run.id)
    for name in ("run.log", "metrics.jsonl") if metrics else ("run.log",):
        if Path(name).exists():
            shutil.copyfile(name, run_dir / name)
    against = [] if best is None else [best.commit] if ran_tree else [best.commit, run.commit]
    (run_dir / "diff.patch").write_text((git("diff", "--no-color", *against, "--", "train.py") or "") if best else "")
    run.evidence = evidence(run_dir)
    return best


def first_status(run):
    if run.trained.outcome == "interrupted" or (run.measured and run.measured.stopped == "interrupted"):
        return "pending"
    if run.val_bpb is None:
        return "crash"
    return "invalid" if run.caught or run.harness_changes else "pending"

# ---------------------------------------------------------------------------
# The bare `analyze.py`: the run in the working directory, train.py's word only, never decided

def archive_here():
    """Archive the run that run_summary.json, metrics.jsonl and run.log in this directory describe; 0 once
    archived (or already), 1 when there is nothing to archive."""
    log, summary_path = Path("run.log"), Path("run_summary.json")
    if not log.exists() and not summary_path.exists():
        print("analyze.py: nothing to archive here: no run_summary.json and no run.log; run "
              "`uv run train.py > run.log 2>&1` first", file=sys.stderr)
        return 1
    archive = Archive.here()
    head = (git("rev-parse", "HEAD") or "").strip()
    with archive.lock():
        runs = archive.runs()
        summary, error, stale = read_summary(summary_path, log, runs)
        commit = ((summary or {}).get("git") or {}).get("commit") or head
        started = number(((summary or {}).get("timings") or {}).get("started_at"))
        done = next((r for r in runs if r.commit == commit and same_run(r, started, log)), None)
        if done:
            print(f"analyze.py: this run is archived already, as {done.id}")
            return 0
        branch, worker = current_branch(), worker_name()
        own = [r.id for r in runs if r.branch == branch and r.worker == worker]
        pin, problem = ensure_pin(branch, own) if branch else (None, None)  # made on first use, as by `run`
        profile = ((summary or {}).get("harness") or {}).get("profile") or prepare_module().PROFILE
        run = new_run(archive, commit, summary, None, branch, pin, profile, runs)
        run.notes += [problem] if problem else []
        run.notes += [f"HEAD has moved to {head[:7]} since this run: archived under the commit it ran"] \
            if head and commit != head else []
        if error:
            run.trained.outcome, run.trained.error = "crash", error
        ran = Path("train.py").read_text() if Path("train.py").exists() else ""
        expected = ((summary or {}).get("git") or {}).get("train_py_sha256")
        ran_tree = expected in (None, sha256_file("train.py"))
        best = store(archive, run, runs, ran if ran_tree else train_py_at(commit) or "", ran_tree, metrics=not stale)
        run.statuses = [StatusChange(first_status(run), now_utc(), "archive")]
        archive.save(run)
        everything = publish(archive, run, runs)
    note = f"archived by hand: val_bpb is train.py's own number, not measured by the harness; {error or 'not decided'}"
    print("\n".join(run_lines(run, best, note, everything, archive)))
    return 0


def read_summary(path, log, runs):
    """(this run's summary or None, why the run is a crash or None, whether the summary is stale): missing,
    corrupt, stale (left by an earlier run: this one died before RunRecorder wrote its own), or claiming ok
    without run.log's final block of the same val_bpb (train.py prints it last)."""
    if not path.exists():
        return None, "no run_summary.json: the process ended before writing it (killed, e.g. out of memory)", False
    summary = read_json(path)
    if summary is None:
        return None, "run_summary.json is unreadable: recorded as a crash of HEAD from run.log", False
    timings = summary.get("timings") or {}
    started, finished = number(timings.get("started_at")), number(timings.get("finished_at")) or path.stat().st_mtime
    archived = next((r for r in runs if started is not None and r.started_at == started
                     and r.commit == (summary.get("git") or {}).get("commit")), None)
    if log.exists() and (archived.evidence.get("run.log") != sha256_file(log) if archived
                         else log.stat().st_mtime - finished > STALE_SLACK_S):
        return None, "run_summary.json was left by an earlier run (run.log is newer): this run crashed before writing one", True
    said = number(summary.get("val_bpb"))
    block = final_block(log).get("val_bpb")
    if summary.get("status") == "ok" and said is not None and block != f"{said:.6f}":
        where = f"its final block says val_bpb {block}" if block else "it has no final `---` block"
        return summary, f"run_summary.json claims ok with val_bpb {said:.6f}, but run.log does not back it ({where})", False
    return summary, None, False


def same_run(r, started, log):
    """r is the run in this directory: the same start, or for a run with no summary the same run.log, archived
    after it was last written."""
    if started is not None:
        return r.started_at == started
    return r.started_at is None and log.exists() and r.evidence.get("run.log") == sha256_file(log) \
        and r.archived_at >= log.stat().st_mtime

# ---------------------------------------------------------------------------
# Small readers

def read_json(path):
    """A JSON object from a file, or None when it is missing or unreadable."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def last_line(text):
    lines = (text or "").strip().splitlines()
    return lines[-1] if lines else "no output"

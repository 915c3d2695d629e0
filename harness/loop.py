"""
One experiment, `analyze.py run ["DESCRIPTION"]`, and the bare `analyze.py` that archives a run made by hand.
The harness, not train.py, owns the clock, the number and the decision. Under `run`:

1. preflight refuses, in one line, a run that could not be trusted or recorded (nothing runs);
2. a changed train.py is committed with DESCRIPTION as its message; an unchanged one is a rerun of HEAD;
3. train.py trains as a child in a bwrap sandbox (the run says `uncontained` without one), on this process's
   clock, stopped at prepare.hard_cap_s or by Ctrl-C / SIGTERM; a stop names its phase;
4. harness/evaluate.py measures the handed-off model once, isolated, and run.log gets its `val_bpb:`;
5. the run is archived as one run.json, and harness.decide's decision applied: keep, rerun (stays pending),
   discard or crash (train.py restored from the best's commit, in a commit of its own).
Exit status: 0 archived and decided, 2 refused, 130 stopped by Ctrl-C or SIGTERM (archived).
"""
import fcntl
import importlib.metadata
import inspect
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path

from harness.decide import best_code_runs, best_of, caught, decide
from harness.record import (UNCOMMITTED, Archive, Measured, RecordError, Run, StatusChange, code_sha, current_branch,
                            ensure_pin, evidence, final_block, git, gpu_class, harness_changes, last_line, now_utc,
                            number, rev_parse, sha256_file, train_py_at, trained_of, worker_name)
from harness.report import draw_progress, run_lines, write_analysis

POLL_S = 0.5                 # how often the parent looks at the child, metrics.jsonl and the hand-off
GRACE_S = 15.0               # after SIGTERM or SIGINT to a process group, before SIGKILL
EVALUATOR_CAP_S = 600.0      # generous (a GPU measures in ~30 s): a finished run is not lost for want of time
HANDOFF_GRACE_S = 120.0      # once the model is handed off, train.py has this long past the cap to exit
STALE_SLACK_S = 30.0         # run.log written this long after the summary finished: the summary is older
# train.py's compile caches (inductor, triton): its own, kept across runs (a fresh one costs a full compile)
CHILD_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "auto-log-research" / "train"
SUMMARY_SECTIONS = ("git", "timings", "env", "harness", "config")  # run_summary.json's objects
OUTPUTS = ("metrics.jsonl", "run_summary.json")  # train.py's files: in its run directory, then the worktree's
# the sandbox: all read-only, fresh /dev, /proc, /tmp, no network, own PIDs and session, gone with its parent
BWRAP = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "--unshare-all",
         "--die-with-parent", "--new-session"]


class Refused(Exception):
    """Preflight's one line: what is wrong and what to do. Nothing ran and nothing was recorded."""


@dataclass
class Plan:
    branch: str
    pin: str
    cap_s: float             # prepare.hard_cap_s(TIME_BUDGET, the best's runs' largest outside_s)
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
    cpu_s: dict = field(default_factory=dict)  # CPU seconds of its process tree at "first row", "hand-off", "exit"

    @property
    def phase(self):
        return "start-up" if self.first_row_s is None else "training" if self.handoff_s is None else "hand-off"

    def stopped_by(self, who, stopped, cap, *more):
        """`who` was stopped by `cap` (a timeout) or Ctrl-C / SIGTERM, with the seconds of each phase."""
        ends = [0.0, *(t for t in (self.first_row_s, self.handoff_s) if t is not None), self.wall_s]
        spent = [f"{name} {b - a:.1f} s" for name, a, b in zip(("start-up", "training", "hand-off"), ends, ends[1:])]
        why = cap if stopped == "timeout" else "Ctrl-C or SIGTERM"
        return f"{who} was stopped by {why} ({', '.join([*spent, *more])})"

    def outside_cpu_s(self):
        """CPU seconds before the first metrics row and after the hand-off: work outside the budget, counted so
        that a busy machine adds none (None unless the run got that far)."""
        if {"first row", "hand-off", "exit"} <= set(self.cpu_s):  # seen only after the exit (None): the exit's count
            cpu = {k: self.cpu_s["exit"] if v is None else v for k, v in self.cpu_s.items()}
            return round(cpu["first row"] + max(0.0, cpu["exit"] - cpu["hand-off"]), 3)


def prepare_module():
    """prepare.py, imported only once preflight has checked it against the pin (and only when needed: torch)."""
    import prepare
    return prepare


def cmd_run(description):
    """`analyze.py run`. Ctrl-C and SIGTERM stop the child or the evaluator while they run; at any other moment
    they wait until the run is archived (a half-applied decision is worse than a late exit)."""
    came = []
    try:
        if not (top := git("rev-parse", "--show-toplevel")):
            raise Refused(f"{Path.cwd()} is in no git repository: run analyze.py in the one that holds train.py")
        os.chdir(top.strip())
        archive = Archive.here()
        with run_lock(archive):
            plan = preflight(archive, description)
            commit = commit_train_py(description, plan.changed)
            with on_interrupt(lambda signum, frame: came.append(signum)), \
                    tempfile.TemporaryDirectory(prefix="auto-log-research-run-") as tmp:
                child = train(plan, Path(tmp))
                summary = read_json(Path("run_summary.json"), SUMMARY_SECTIONS)
                printed = number(final_block(Path("run.log")).get("val_bpb"))
                measured = measure(plan, child, summary, Path(tmp), came)
                run, best, after, runs = archive_and_decide(archive, plan, commit, summary, printed, measured)
    except Refused as e:
        print(f"analyze.py run: refused: {e}", file=sys.stderr)
        return 2
    print("\n".join(run_lines(run, best, after, runs, archive)))
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
        print(os.getpid(), file=f, flush=True)
        yield


def preflight(archive, description):
    refuse_untracked_modules()
    refuse_startup_files()
    branch = current_branch()
    if branch is None:
        raise Refused("HEAD is detached: check out the experiment's branch (`git checkout autoresearch/<tag>`)")
    with archive.lock():  # the pin is made on first use, as archiving does
        runs = archive.runs()
        own = [r for r in runs if r.branch == branch and r.worker == worker_name()]
        pin, problem = ensure_pin(branch, runs)
    if problem:
        raise Refused(problem)
    if changes := harness_changes(pin):
        raise Refused(f"harness files differ from the branch's pin: {'; '.join(changes)}; restore them "
                      f"(`git checkout {pin[:7]} -- FILE`): only train.py is the experiment's")
    modified = set((git("diff", "--name-only", "-z", "HEAD") or "").split("\0")) - {""}
    if others := sorted(modified - {"train.py"}):
        raise Refused(f"tracked files other than train.py are modified ({', '.join(others[:5])}): an experiment "
                      "changes train.py alone; restore them (`git checkout -- FILE`) or commit them first")
    changed = "train.py" in modified
    if changed and not description:
        raise Refused('train.py differs from HEAD: say what changed, `uv run analyze.py run "DESCRIPTION"` '
                      "(it becomes the commit message)")
    head = rev_parse("HEAD")  # once: the loop below would start a git per archived run
    latest = next((r for r in reversed(own) if r.commit == head), None)
    if changed and latest and latest.status == "pending" and latest.decision and latest.decision.kind == "rerun":
        raise Refused(f"run {latest.id} of HEAD is a pending rerun: rerun HEAD's train.py first (set your edit aside, "
                      "`git checkout -- train.py`, `uv run analyze.py run`), or give up on HEAD's code with "
                      f"`uv run analyze.py status {latest.id} discard`")
    prepare = prepare_module()
    try:
        for split in prepare.SPLITS:
            prepare.shard_paths(split)
        prepare.Tokenizer.from_directory()
    except prepare.PrepareError as e:  # its message says what to run
        raise Refused(str(e)) from None
    upcoming = replace(own[-1], id="", archived_at=time.time()) if own else None  # the next run
    ref = best_code_runs(runs, upcoming, best_of(runs, upcoming)) if own else []
    outside = max((r.outside_s for r in ref if r.outside_s is not None), default=None)  # the hard cap's reference
    cap = prepare.hard_cap_s(float(prepare.TIME_BUDGET), outside)
    return Plan(branch, pin, cap, changed, sandbox_problem())


def refuse_untracked_modules():
    """An untracked module at the repository root: first on train.py's sys.path, an argparse.py there would win."""
    tracked = {p.split("/")[0] for p in (git("ls-files", "-z") or "").split("\0") if p}
    for entry in sorted(Path(".").iterdir()):
        package = entry.is_dir() and any(entry.glob("*.py"))  # with an __init__.py, or a namespace package
        module = entry.name if package else inspect.getmodulename(entry) if entry.is_file() else None
        if module and module.isidentifier() and entry.name not in tracked:
            raise Refused(f"{entry.name} at the repository root is not tracked by git and would be imported as the "
                          f"module `{module}` ahead of any other: move it out of the repository root")


def refuse_startup_files():
    """A .pth, sitecustomize or usercustomize file in site-packages runs in every Python process, the evaluator's
    included: one that no installed distribution's RECORD lists is code that neither git nor the lock pins."""
    for site in sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}):
        listed = {str(f).split("/")[0] for d in importlib.metadata.distributions(path=[site]) for f in d.files or ()}
        for entry in sorted(Path(site).iterdir()):
            if (entry.suffix == ".pth" or entry.name.split(".")[0] in ("sitecustomize", "usercustomize")) \
                    and entry.name not in listed:
                raise Refused(f"{entry} is in no installed package's RECORD, and Python runs it at every start, the "
                              "evaluator's included: remove it (or `uv sync --reinstall`)")


def commit_train_py(description, changed):
    """The commit that runs: a changed train.py committed with DESCRIPTION as the message (a rerun's is not used)."""
    try:
        if changed:
            git("commit", "-qm", description, "--", "train.py", check=True)
    except RecordError as e:
        raise Refused(str(e)) from None
    return rev_parse("HEAD")


# train.py and the evaluator, as children on the parent's clock; the number
def train(plan, tmp):
    """train.py in tmp/child, its run directory (the one place it can write, contained), its output to run.log.
    Its files show in the worktree as train.py run by hand leaves them: links, then copies."""
    work = tmp / "child"
    work.mkdir()
    for name in OUTPUTS:  # an earlier run's files must not pass as this one's
        Path(name).unlink(missing_ok=True)
        Path(name).symlink_to(work / name)
    handoff, metrics, child = work / "model.pt", work / "metrics.jsonl", Child(0, 0.0)

    def look(now, pid):
        """Notes the phases (pid None: it has exited); past the hand-off, the cap grows by HANDOFF_GRACE_S."""
        if child.first_row_s is None and b"\n" in (read_regular(metrics, 1 << 16) or b""):
            child.first_row_s, child.cpu_s["first row"] = now, pid and tree_cpu_s(pid)
        if child.handoff_s is None and handoff.exists():
            child.handoff_s, child.cpu_s["hand-off"] = now, pid and tree_cpu_s(pid)
        return plan.cap_s if child.handoff_s is None else max(plan.cap_s, child.handoff_s + HANDOFF_GRACE_S)

    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPYCACHEPREFIX"}, "PYTHONDONTWRITEBYTECODE": "1",
           "AUTORESEARCH_HANDOFF": str(handoff), "TORCHINDUCTOR_CACHE_DIR": str(CHILD_CACHE / "inductor"),
           "TRITON_CACHE_DIR": str(CHILD_CACHE / "triton")}  # each makes its own folder
    CHILD_CACHE.mkdir(parents=True, exist_ok=True)  # bwrap binds only what exists
    box = [] if plan.uncontained else sandbox(prepare_module(), [work, CHILD_CACHE])
    child.exit_code, child.stopped, child.wall_s, child.cpu_s["exit"] = supervise(
        [*box, sys.executable, str(Path("train.py").resolve())], Path("run.log"), env, plan.cap_s, look, work)
    for name in OUTPUTS:
        data = read_regular(work / name)
        Path(name).unlink(missing_ok=True)
        if data is not None:
            Path(name).write_bytes(data)
    return child


def sandbox_problem():
    """Why train.py cannot run contained here, or None: no bwrap, or one that cannot make namespaces."""
    if shutil.which("bwrap") is None:
        return "no bwrap on PATH (install the package bubblewrap)"
    out = subprocess.run([*BWRAP, "--", "true"], capture_output=True, text=True)
    return None if out.returncode == 0 else f"bwrap cannot make a sandbox here: {last_line(out.stderr)}"


def sandbox(prepare, writable, scores=False):
    """bwrap's arguments: the GPUs, what it reads, the pinned shards' files emptied (unless scores), `writable`."""
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


def supervise(cmd, log_path, env, cap_s, look=lambda now, pid: None, cwd=None):
    """(exit code, None | "timeout" | "interrupted", seconds, its whole tree's CPU seconds) of `cmd` in a session of
    its own, stopped at cap_s (SIGTERM) or by Ctrl-C / SIGTERM here (SIGINT), SIGKILL GRACE_S later; look(seconds,
    pid) may return a new cap, and is called once more with pid None after the exit. bwrap's child is signalled."""
    before = os.times()
    info = os.pipe() if cmd[0] == "bwrap" else None
    cmd = [cmd[0], "--info-fd", str(info[1]), *cmd[1:]] if info else cmd
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True, pass_fds=info[1:] if info else ())
    group = proc.pid
    if info:
        os.close(info[1])
        with os.fdopen(info[0], "rb") as f, suppress(ValueError, KeyError, TypeError):  # bwrap closes it once written
            group = int(json.loads(f.read())["child-pid"])
    spawn, stopped = time.monotonic(), None
    try:
        with on_interrupt(signal.default_int_handler):  # raises KeyboardInterrupt
            while proc.poll() is None:
                cap_s = look(time.monotonic() - spawn, proc.pid) or cap_s
                if time.monotonic() - spawn > cap_s and stopped is None:
                    stopped = "timeout"
                    stop(proc, group, signal.SIGTERM)
                with suppress(subprocess.TimeoutExpired):
                    proc.wait(POLL_S)
    except KeyboardInterrupt:
        stopped = "interrupted"
        stop(proc, group, signal.SIGINT)
    seconds = time.monotonic() - spawn
    look(seconds, None)  # gone: what it left appeared within the last poll
    for pgid in {group, proc.pid}:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    code, after = proc.returncode, os.times()
    cpu_s = after.children_user + after.children_system - before.children_user - before.children_system
    return (128 - code if info and code > 128 else code), stopped, seconds, cpu_s


def tree_cpu_s(root):
    """CPU seconds so far of process `root` and its descendants, the reaped ones included; 0.0 once it is gone."""
    parent, cpu = {}, {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        with suppress(OSError, ValueError, IndexError):
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
            pid = int(stat_file.parent.name)
            parent[pid], cpu[pid] = int(fields[1]), sum(map(int, fields[11:15]))
    tree, grown = {root}, True
    while grown:
        grown = {pid for pid, ppid in parent.items() if ppid in tree} - tree
        tree |= grown
    return sum(cpu.get(pid, 0) for pid in tree) / os.sysconf("SC_CLK_TCK")


def stop(proc, group, sig):
    for s in (sig, signal.SIGKILL):
        with suppress(ProcessLookupError, PermissionError):  # the group is gone already
            os.killpg(group, s)
        with suppress(subprocess.TimeoutExpired):
            return proc.wait(GRACE_S)


def read_regular(path, size=-1):
    """The bytes of a file train.py wrote, or None when missing or no regular file (a link, or a blocking FIFO)."""
    try:
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW), "rb") as f:
            return f.read(size) if stat.S_ISREG(os.fstat(f.fileno()).st_mode) else None
    except OSError:
        return None


@contextmanager
def on_interrupt(handler):
    """Ctrl-C and SIGTERM handled by handler(signum, frame) inside. A child started inside gets them at their
    default (a handler, unlike SIG_IGN, is not inherited), even when this process was started ignoring SIGINT."""
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def measure(plan, child, summary, tmp, came=()):
    """The harness's Measured of this run; the model is evaluated only when train.py ended as it should, or once
    it had handed the model off (so that stopping a run cannot choose which runs count)."""
    m = Measured(val_bpb=None, wall_s=round(child.wall_s, 3), stopped=child.stopped,
                 phase=child.phase if child.stopped else None,
                 first_row_s=None if child.first_row_s is None else round(child.first_row_s, 3),
                 outside_cpu_s=child.outside_cpu_s())
    m.error = unmeasurable(plan, child, summary, tmp / "child" / "model.pt")
    if m.error is None and came:
        m.stopped, m.phase = "interrupted", "evaluation"
        m.error = "stopped by Ctrl-C or SIGTERM before the model was measured"
    if m.error is not None:
        return m
    if child.stopped:
        print("analyze.py run: interrupted after the hand-off: measuring the model (Ctrl-C again stops that)",
              file=sys.stderr, flush=True)
    out, stopped, eval_s = evaluate(tmp, not plan.uncontained)
    m.eval_s = round(eval_s, 3)
    if stopped:
        m.stopped, m.phase = stopped, "evaluation"
        m.error = child.stopped_by("the evaluator", stopped, f"its cap of {EVALUATOR_CAP_S:.0f} s",
                                   f"evaluation {eval_s:.1f} s")
        return m
    for key in ("val_bpb", "heldout_bpb", "future_leak", "speed_before", "speed_after"):
        setattr(m, key, number(out.get(key)))
    if m.val_bpb is None:
        m.error = f"the evaluator failed: {out.get('error') or 'no number'}"
    else:
        with open("run.log", "a") as log:  # the final block is the last thing train.py printed
            log.write(f"val_bpb:          {m.val_bpb:.6f}\nmeasured_by:      harness\n")
    return m


def unmeasurable(plan, child, summary, handoff):
    """Why the model cannot be measured, or None (train.py ended as it should, or was interrupted after hand-off)."""
    if child.stopped == "interrupted" and handoff.exists():
        return None
    if child.stopped:
        return child.stopped_by("train.py", child.stopped, f"the hard cap of {plan.cap_s:.0f} s")
    if child.exit_code != 0:
        how = (f"was killed by signal {signal.Signals(-child.exit_code).name}" if child.exit_code < 0
               else f"exited with code {child.exit_code}")
        return f"train.py {how} (its traceback, if any, is in run.log)"
    if (summary or {}).get("status") != "ok":
        said = f"says {summary.get('status')!r}" if summary else "is missing"
        return f"train.py exited 0, but run_summary.json {said}"
    if not final_block(Path("run.log")):
        return "train.py exited 0 without its final `---` block in run.log"
    if not handoff.exists():
        return "train.py handed off no model: prepare.evaluate_bpb, which saves it, was never called"
    changes = harness_changes(plan.pin, (summary.get("git") or {}).get("harness_sha256"))
    return f"harness files changed during the run: {'; '.join(changes)}" if changes else None


def evaluate(tmp, contained):
    """(its JSON, how it was stopped, seconds): harness/evaluate.py, contained but for the shards it scores."""
    box = sandbox(prepare_module(), [tmp], scores=True) if contained else []
    cmd = box + [sys.executable, "-I", "-B", str(Path(__file__).resolve().parent / "evaluate.py"),
                 "--handoff", str(tmp / "child" / "model.pt"), "--out", str(tmp / "eval.json")]
    _, stopped, seconds, _ = supervise(cmd, tmp / "evaluator.log", None, EVALUATOR_CAP_S)
    out = read_json(tmp / "eval.json") or {"error": last_line((tmp / "evaluator.log").read_text(errors="replace"))}
    return out, stopped, seconds


# The run record, archived; the decision, applied
def archive_and_decide(archive, plan, commit, summary, printed, measured):
    """(the archived Run, its best, what became of train.py, all runs); `printed`: a val_bpb train.py printed."""
    with archive.lock():
        runs = archive.runs()
        run = new_run(archive, commit, summary, measured, plan.branch, plan.pin, runs)
        run.contained = plan.uncontained is None
        run.notes += [f"uncontained: train.py ran outside a sandbox: {plan.uncontained}"] if plan.uncontained else []
        run.trained.outcome = measured.stopped or run.trained.outcome  # stopped by the harness: how train.py ended
        if run.trained.reported_val_bpb is None:
            run.trained.reported_val_bpb = printed
        return (run, *file_run(archive, run, runs, ran_tree=False, metrics=True))


def apply(archive, run, best):
    """The decision's status applied (a rerun stays pending, an invalid run invalid); what became of train.py."""
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
    if best is None:
        return "train.py: unchanged, there is no best to restore it from"
    if git("rev-parse", "HEAD:train.py") == git("rev-parse", f"{best.commit}:train.py"):
        return f"train.py: unchanged, it is the best's ({best.id})"
    try:
        git("checkout", best.commit, "--", "train.py", check=True)
        git("commit", "-q", "-m", f"Restore train.py from {best.commit[:7]}", "--", "train.py", check=True)
    except RecordError as e:
        return f"train.py: restoring the best's failed ({e}); do it by hand"
    return f"train.py: restored from the best {best.id} in commit {git('rev-parse', '--short=7', 'HEAD').strip()}"


def new_run(archive, commit, summary, measured, branch, pin, runs):
    """The Run of this commit from run_summary.json (train.py's word) and the harness's Measured (or None)."""
    s = summary or {}
    worker = worker_name()
    latest = next((r for r in reversed(runs) if r.worker == worker), None)
    harness = s.get("harness") or (latest.harness if latest else {"profile": prepare_module().PROFILE})
    dirty = UNCOMMITTED if (s.get("git") or {}).get("dirty") else ""
    description = (git("log", "-1", "--format=%s", commit) or "").strip() + dirty
    return Run(id=archive.new_id(commit), commit=commit, description=description, branch=branch, worker=worker,
               started_at=number((s.get("timings") or {}).get("started_at")), archived_at=time.time(),
               harness=harness, gpu=gpu_class({**s, "harness": harness}), code_sha="", pin=pin,
               harness_changes=harness_changes(pin, (s.get("git") or {}).get("harness_sha256")) if pin else [],
               trained=trained_of(s), measured=measured, caught=[], decision=None, statuses=[], evidence={})


def file_run(archive, run, runs, ran_tree, metrics):
    """Saves run with its evidence, caught cases and (when measured) decision, applied; rebuilds the derived files.
    diff.patch: the train.py that ran (the worktree's when ran_tree) against the best's. (best, after, all runs)"""
    source = Path("train.py").read_text() if ran_tree and Path("train.py").exists() else train_py_at(run.commit)
    best = best_of(runs + [run], run)
    run.best_id, run.code_sha = (best.id if best else None), code_sha(source or "")
    run_dir = archive.run_dir(run.id)
    for name in ("run.log", "metrics.jsonl") if metrics else ("run.log",):
        if Path(name).exists():
            shutil.copyfile(name, run_dir / name)
    diff = git("diff", "--no-color", best.commit, *([] if ran_tree else [run.commit]), "--", "train.py") if best else ""
    (run_dir / "diff.patch").write_text(diff or "")
    run.evidence = evidence(run_dir)
    run.caught = caught(run, best, runs)
    status = ("pending" if run.trained.outcome == "interrupted"  # by the harness too: archive_and_decide sets it
              else "crash" if run.val_bpb is None else "invalid" if run.caught or run.harness_changes else "pending")
    run.statuses = [StatusChange(status, now_utc(), "archive")]
    run.decision = decide(run, runs) if run.measured else None
    archive.save(run)
    after = apply(archive, run, best) if run.decision else None
    everything = runs + [run]
    write_analysis(run, everything, archive)
    draw_progress(everything, archive.progress)
    archive.rebuild(everything)
    return best, after, everything


# The bare `analyze.py`: the run in the working directory, train.py's word only, never decided
def archive_here():
    """Archive the run that run_summary.json, metrics.jsonl and run.log here describe; 0 archived (or already)."""
    log, summary_path = Path("run.log"), Path("run_summary.json")
    if not log.exists() and not summary_path.exists():
        raise RecordError("nothing to archive here: no run_summary.json and no run.log; run "
                          "`uv run train.py > run.log 2>&1` first")
    archive, head = Archive.here(), rev_parse("HEAD") or ""
    with archive.lock():
        runs = archive.runs()
        summary, error, stale = read_summary(summary_path, log, runs)
        s = summary or {}
        commit = (s.get("git") or {}).get("commit") or head
        done = archived_as(runs, commit, number((s.get("timings") or {}).get("started_at")), log)
        if done:
            print(f"analyze.py: this run is archived already, as {done.id}")
            return 0
        branch = current_branch()
        pin, problem = ensure_pin(branch, runs) if branch else (None, None)  # made on first use, as by `run`
        run = new_run(archive, commit, summary, None, branch, pin, runs)
        run.notes += [problem] if problem else []
        if head and commit != head:
            run.notes.append(f"HEAD has moved to {head[:7]} since this run: archived under the commit it ran")
        if error:
            run.trained.outcome, run.trained.error = "crash", error
        ran_tree = (s.get("git") or {}).get("train_py_sha256") in (None, sha256_file("train.py"))
        best, _, everything = file_run(archive, run, runs, ran_tree, metrics=not stale)
    note = f"archived by hand: val_bpb is train.py's own number, not measured by the harness; {error or 'not decided'}"
    print("\n".join(run_lines(run, best, note, everything, archive)))
    return 0


def read_summary(path, log, runs):
    """(this run's summary or None, why the run is a crash or None, whether the summary is an earlier run's): the
    summary missing, unreadable, stale, or claiming ok without run.log's final block to back it."""
    summary = read_json(path, SUMMARY_SECTIONS)
    if summary is None:
        why = ("run_summary.json is unreadable: recorded as a crash of HEAD from run.log" if path.exists() else
               "no run_summary.json: the process ended before writing it (killed, e.g. out of memory)")
        return None, why, False
    timings = summary.get("timings") or {}
    started, finished = number(timings.get("started_at")), number(timings.get("finished_at")) or path.stat().st_mtime
    archived = started is not None and archived_as(runs, (summary.get("git") or {}).get("commit"), started, log)
    if log.exists() and (archived.evidence.get("run.log") != sha256_file(log) if archived
                         else log.stat().st_mtime - finished > STALE_SLACK_S):
        why = "run_summary.json was left by an earlier run (run.log is newer): this run crashed before writing one"
        return None, why, True
    said, block = number(summary.get("val_bpb")), final_block(log).get("val_bpb")
    if summary.get("status") == "ok" and said is not None and block != f"{said:.6f}":
        where = f"its final block says val_bpb {block}" if block else "it has no final `---` block"
        why = f"run_summary.json claims ok with val_bpb {said:.6f}, but run.log does not back it ({where})"
        return summary, why, False
    return summary, None, False


def archived_as(runs, commit, started, log):
    """The run archived already from these files, or None: the same start, or with none the same run.log."""
    if started is not None:
        return next((r for r in runs if (r.commit, r.started_at) == (commit, started)), None)
    logged = sha256_file(log)
    return next((r for r in runs if r.commit == commit and r.started_at is None and logged is not None
                 and r.evidence.get("run.log") == logged and r.archived_at >= log.stat().st_mtime), None)


def read_json(path, sections=()):
    """A JSON object from a file, or None; a `sections` key holding no object (a broken train.py's) is dropped."""
    with suppress(OSError, ValueError):
        value = json.loads(Path(path).read_text())
        if isinstance(value, dict):
            return {k: v for k, v in value.items() if k not in sections or isinstance(v, dict)}

"""
`analyze.py run ["DESCRIPTION"]`: one experiment from start to end, in the foreground. The harness,
not train.py, owns the clock, the number and the decision:

1. preflight refuses, in one line, a run that could not be trusted or recorded: a module file at the
   repository root that could shadow one the harness imports, a detached HEAD, harness files off the
   branch's pin, tracked files other than train.py modified, missing data, another run in this worktree;
2. a changed train.py is committed with DESCRIPTION as the message; an unchanged one is a rerun of HEAD;
3. train.py trains in a child process of its own session, timed by this one (spawn, the first row of
   metrics.jsonl, exit) and stopped at the hard cap (timeout) or by Ctrl-C / SIGTERM (interrupted);
4. the model train.py handed off (prepare.evaluate_bpb saves it) is measured by harness/evaluate.py in
   an isolated interpreter: val_bpb on the pinned validation rows, bpb on the held-out shard, and the
   machine's speed;
5. the caught cases: the ways a number can be bought outside the rules, each a check of the
   measurement against the branch's best run;
6. the run is archived as `analyze.py` archives one, with the measurement's val_bpb and status, and
   measurement.json stored beside its files;
7. harness/decide.py's decision is applied: keep, rerun (stays pending), discard or crash (train.py
   restored to the best's in a commit of its own).

Exit status: 0 once the run is archived and decided, whatever the decision; 2 when preflight refused
(nothing ran, nothing was recorded); 130 when Ctrl-C or SIGTERM stopped it (archived, `interrupted`).
"""
import fcntl
import importlib.machinery
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from harness.archive import (archive_lock, best_for, gpu_class, load_run, own, paths, read_json, read_results,
                             remove_leftovers, row_bpb, worker_name, write_results)
from harness.capture import capture_run, final_block, harness_key, head_commit, record_run
from harness.commands import set_status, status_refusal
from harness.decide import Machine, decide
from harness.pin import check_against, current_branch, ensure_pin, git_text, resolve_commit
from harness.plots import draw_progress
from harness.report import number, report_run
from harness.shared import close_claim, snapshot_insights

# ---------------------------------------------------------------------------
# The clock and the caps

POLL_S = 0.5                 # how often the parent looks at the child, and at metrics.jsonl for its first row
GRACE_S = 15.0               # after SIGTERM or SIGINT to the child's process group, before SIGKILL
GPU_CAP_S = 600.0            # gpu profile: train + evaluate + archive end inside a 12-minute agent shell timeout
EVALUATOR_CAP_S = {"gpu": 90.0, "cpu": 300.0}  # the evaluator: rebuild, compile, measure, probe the machine twice
OWN_MODULES = ("prepare", "train", "analyze", "workers")  # tracked root scripts that may share a module's name
MAX_LINES = 15               # what `run` prints, the decision line first

# ---------------------------------------------------------------------------
# The caught cases: fixed names (analysis.md, audit and the tests use them), and their limits

TRAINED_ON_VAL = "trained on validation data"
NOT_THE_MODELS = "val_bpb reported by train.py is not the model's"
SLOWED_CLOCK = "slowed clock"
UNTIMED_WORK = "untimed work outside the loop"
SEES_AHEAD = "the model sees later tokens"

LEAK_ABS, LEAK_REL = 0.01, 0.02              # held-out gap grown beyond the best's by max(0.01, 2% of val_bpb)
LEAK_ALONE_ABS, LEAK_ALONE_REL = 0.05, 0.05  # no best: the gap itself beyond 0.05 + 5% of val_bpb
REPORTED_TOLERANCE = 1e-3                    # |train.py's val_bpb - the measured one| beyond this
FUTURE_TOLERANCE = 1e-2                      # logits that move by more when only later tokens change: not causal
CLOCK_SLACK_S, CLOCK_SLACK_REL = 5.0, 0.05   # the parent's loop time beyond train.py's timings by 5 s + 5%
OUTSIDE_SLACK_S, OUTSIDE_SLACK_BUDGET = 5.0, 0.10   # outside time beyond the best's by 5 s + 10% of the budget


class Refused(Exception):
    """Preflight's one line: what is wrong and what to do. Nothing ran and nothing was recorded."""


@dataclass
class Plan:
    """What preflight established, for the run it let start."""
    branch: str
    pin: str
    profile: str
    budget: float            # TIME_BUDGET, seconds of training
    changed: bool            # train.py differs from HEAD: it is committed first

    @property
    def hard_cap_s(self):
        cap = max(2 * self.budget, self.budget + 300)
        return min(cap, GPU_CAP_S) if self.profile == "gpu" else cap


@dataclass
class Child:
    """train.py's process as the parent saw it, in seconds since the spawn on the parent's own clock."""
    exit_code: int
    first_row_s: float | None    # when metrics.jsonl first held a row
    wall_s: float                # spawn to exit
    stopped: str | None          # "timeout" (the hard cap) or "interrupted" (Ctrl-C or SIGTERM here), else None


def cmd_run(description):
    """`analyze.py run`: the exit status (0 decided, 2 refused, 130 interrupted)."""
    os.chdir(repo_root())
    try:
        with run_lock():
            plan = preflight(description)
            commit, note = commit_train_py(description, plan.changed)
            return run_experiment(plan, commit, note)
    except Refused as e:
        print(f"analyze.py run: refused: {e}", file=sys.stderr)
        return 2


def run_experiment(plan, commit, note):
    """Train, measure, archive and decide. Ctrl-C and SIGTERM stop the child or the evaluator while they
    run; at any other moment they wait until the run is archived (a half-applied decision is worse than
    a late exit), and the run counts as interrupted unless it was measured already."""
    with deferred_interrupts() as came, tempfile.TemporaryDirectory(prefix="auto-log-research-run-") as tmp:
        handoff = Path(tmp) / "model.pt"
        child = train(plan, handoff, Path(tmp) / "pycache")
        m = measure(plan, commit, child, handoff, came)
        row, decision, best, after = archive_and_decide(plan, commit, m)
    print("\n".join(report_lines(row, m, decision, best, [note] if note else [], after)))
    return 130 if m["status"] == "interrupted" or came else 0


def repo_root():
    top = git_text("rev-parse", "--show-toplevel")
    if not top:
        head_commit()  # says, in one line, that this is no repository with a commit
    return top.strip()

# ---------------------------------------------------------------------------
# Preflight

@contextmanager
def run_lock():
    """One `run` at a time in this worktree: they would share run.log, metrics.jsonl and train.py."""
    paths().local.mkdir(parents=True, exist_ok=True)
    with open(paths().local / "run.lock", "a+") as f:
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


def preflight(description):
    refuse_shadowing()
    branch = current_branch()
    if branch is None:
        raise Refused("HEAD is detached: check out the experiment's branch (`git checkout autoresearch/<tag>`)")
    rows, worker = read_results(), worker_name()
    with archive_lock():  # the pin is created on first use, as archiving does
        pin, problem = ensure_pin(branch, [r["run_id"] for r in rows if r.get("branch") == branch and own(r, worker)])
    if problem:
        raise Refused(problem)
    changes = check_against(branch, pin, None).changes
    if changes:
        raise Refused(f"harness files differ from the branch's pin: {'; '.join(changes)}; restore them "
                      f"(`git checkout {pin[:7]} -- FILE`): only train.py is the experiment's")
    refuse_other_changes()
    changed = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "train.py"]).returncode != 0
    if changed and not description:
        raise Refused('train.py differs from HEAD: say what changed, `uv run analyze.py run "DESCRIPTION"` '
                      "(it becomes the commit message)")
    if changed:
        refuse_after_pending_rerun(rows, branch, worker)
    profile, budget = harness_settings()
    return Plan(branch, pin, profile, budget, changed)


def refuse_shadowing():
    """A module at the repository root that git does not track, or a tracked one named like a module of
    the standard library or site-packages (prepare.py and the other scripts aside): train.py runs with the
    root first on sys.path, so either would stand in for that module in the harness's own imports."""
    tracked = {p.split("/")[0] for p in (git_text("ls-files", "-z") or "").split("\0") if p}
    for entry in sorted(Path(".").iterdir()):
        module = module_name(entry)
        if module is None:
            continue
        if entry.name not in tracked:
            raise Refused(f"{entry.name} at the repository root is not tracked by git and would be imported as the "
                          f"module `{module}` ahead of any other: move it out of the repository root")
        if module not in OWN_MODULES and elsewhere(module):
            raise Refused(f"{entry.name} at the repository root shadows the module `{module}` of the standard library "
                          "or site-packages: rename it (git mv) and commit")


def module_name(entry):
    """The module `entry` would be imported as from a directory on sys.path, or None."""
    if entry.is_dir():
        return entry.name if (entry / "__init__.py").exists() else None
    suffix = next((s for s in sorted(importlib.machinery.all_suffixes(), key=len, reverse=True)
                   if entry.name.endswith(s)), None)
    return entry.name[:-len(suffix)] if suffix else None


def elsewhere(module):
    """A module of that name exists outside the repository: built in, in the standard library or installed."""
    if module in sys.builtin_module_names or module in getattr(sys, "stdlib_module_names", ()):
        return True
    here = os.path.realpath(".")
    others = [p for p in sys.path if p and os.path.realpath(p) != here]
    return importlib.machinery.PathFinder.find_spec(module, others) is not None


def refuse_other_changes():
    out = git_text("status", "--porcelain", "-z", "--untracked-files=no") or ""
    others = sorted({entry[3:] for entry in out.split("\0") if len(entry) > 3 and entry[3:] != "train.py"})
    if others:
        raise Refused(f"tracked files other than train.py are modified ({', '.join(others[:5])}): an experiment "
                      "changes train.py alone; restore them (`git checkout -- FILE`) or commit them first")


def refuse_after_pending_rerun(rows, branch, worker):
    """HEAD's latest run was decided `rerun`: changing train.py now would leave that code unjudged."""
    head = resolve_commit("HEAD") or ""
    latest = next((r for r in reversed(rows) if r.get("branch") == branch and own(r, worker)
                   and r.get("commit") and head.startswith(r["commit"])), None)
    if latest and latest.get("status") == "pending" and latest.get("decision") == "rerun":
        raise Refused(f"run {latest['run_id']} of HEAD is a pending rerun: rerun HEAD's train.py first (set your "
                      "edit aside, `git checkout -- train.py`, `uv run analyze.py run`), or give up on HEAD's code "
                      f"with `uv run analyze.py status {latest['run_id']} discard`")


def harness_settings():
    """(profile, TIME_BUDGET) of this environment, once the data and tokenizer the run needs are there."""
    import prepare  # here, not at the top: it imports torch, and the harness was checked against its pin first
    try:
        for split in ("train", "val", "heldout"):
            prepare.shard_paths(split)
    except prepare.PrepareError as e:  # its message says what to run
        raise Refused(str(e)) from None
    if not (prepare.TOKENIZER_DIR / "tokenizer.pkl").exists():
        raise Refused(f"no tokenizer in {prepare.TOKENIZER_DIR}: run `uv run prepare.py`")
    return prepare.PROFILE, float(prepare.TIME_BUDGET)


def commit_train_py(description, changed):
    """(the commit that runs, a note or None): a changed train.py committed with DESCRIPTION as the message."""
    if not changed:
        return head_commit(), (f"train.py is HEAD's: this run measures HEAD as it is (the DESCRIPTION {description!r} "
                               "is not used)" if description else None)
    out = subprocess.run(["git", "commit", "-q", "-m", description, "--", "train.py"], capture_output=True, text=True)
    if out.returncode != 0:
        reason = (out.stderr.strip() or out.stdout.strip() or "no output").splitlines()[-1]
        raise Refused(f"`git commit -- train.py` failed: {reason}")
    return head_commit(), None

# ---------------------------------------------------------------------------
# Training, on the parent's clock

def train(plan, handoff, pycache):
    """train.py in a child process of its own session, stdout and stderr to run.log. Its bytecode is
    analyze.py's (outside the repository; `pycache` when there is none), never the repository's."""
    for name in ("run_summary.json", "metrics.jsonl"):  # an earlier run's files must not pass as this one's
        Path(name).unlink(missing_ok=True)
    env = {**os.environ, "AUTORESEARCH_HANDOFF": str(handoff), "PYTHONPYCACHEPREFIX": sys.pycache_prefix or str(pycache)}
    first_row, stopped = None, None
    with open("run.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "train.py"], stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    spawn = time.monotonic()
    try:
        with interrupts_raised():
            while not exited(proc, POLL_S):
                now = time.monotonic()
                if first_row is None and has_row(Path("metrics.jsonl")):
                    first_row = now - spawn
                if now - spawn > plan.hard_cap_s:
                    stopped = "timeout"
                    stop(proc, signal.SIGTERM)
    except KeyboardInterrupt:
        stopped = "interrupted"
        stop(proc, signal.SIGINT)
    wall = time.monotonic() - spawn
    if first_row is None and has_row(Path("metrics.jsonl")):
        first_row = wall
    return Child(proc.returncode, first_row, wall, stopped)


def exited(proc, timeout):
    try:
        proc.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


def has_row(path):
    try:
        with open(path, "rb") as f:
            return b"\n" in f.read(1 << 16)
    except FileNotFoundError:
        return False


def stop(proc, sig):
    """`sig` to the child's process group, then SIGKILL after GRACE_S."""
    for s in (sig, signal.SIGKILL):
        try:
            os.killpg(proc.pid, s)
        except ProcessLookupError:  # the group is gone already
            pass
        if exited(proc, GRACE_S):
            return
    proc.wait()


@contextmanager
def interrupts_raised():
    """Ctrl-C and SIGTERM raise KeyboardInterrupt here, while a child is waited for."""
    def raise_interrupt(signum, frame):
        raise KeyboardInterrupt

    old = {s: signal.signal(s, h) for s, h in ((signal.SIGINT, signal.default_int_handler),
                                               (signal.SIGTERM, raise_interrupt))}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextmanager
def deferred_interrupts():
    """Ctrl-C and SIGTERM only noted: the list yielded holds those that came. A child started inside gets
    them at their default (a handler, unlike SIG_IGN, is not inherited), even when this process was started
    with SIGINT ignored, in the background of a script."""
    came = []
    old = {s: signal.signal(s, lambda signum, frame: came.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield came
    finally:
        for s, h in old.items():
            signal.signal(s, h)

# ---------------------------------------------------------------------------
# The number: what the parent saw, and the model measured by the evaluator

def measure(plan, commit, child, handoff, came=()):
    """measurement.json's fields, but for the caught cases (which need the best: archive_and_decide).
    `came`: interrupts noted since the child ended, which leave the model unmeasured."""
    status, error = child_status(child)
    if status == "ok" and came:
        status, error = "interrupted", "stopped by Ctrl-C or SIGTERM before the model was measured"
    summary = read_json("run_summary.json")[0]
    block = final_block(Path("run.log"))
    m = {"by": "analyze.py run", "status": status, "exit_code": child.exit_code, "wall_s": round(child.wall_s, 3),
         "first_row_s": rounded(child.first_row_s),
         "loop_s": None if child.first_row_s is None else round(child.wall_s - child.first_row_s, 3),
         "time_budget": plan.budget, "outside_s": round(child.wall_s - plan.budget, 3), "final_block": bool(block),
         "reported_val_bpb": number(block.get("val_bpb")), "claimed_loop_s": rounded(claimed_loop(summary)),
         "claimed_wall_s": rounded(claimed_wall(summary)),
         "val_bpb": None, "heldout_bpb": None, "eval_s": None, "future_leak": None, "machine_speed": None, "caught": [],
         "error": error}
    if status == "ok":
        error = not_measurable(plan, m, summary, handoff)
        m.update(evaluate(commit, handoff, EVALUATOR_CAP_S[plan.profile]) if error is None
                 else {"status": "crash", "error": error})
    return m


def child_status(child):
    """(status, error or None) from how the child ended: the exit codes of harness/record.py."""
    from harness.record import EXIT_CODES  # here: it imports torch
    if child.stopped == "timeout":
        return "timeout", f"train.py ran past the hard cap and was stopped after {child.wall_s:.0f} s"
    if child.stopped == "interrupted":
        return "interrupted", "stopped by Ctrl-C or SIGTERM before it was measured"
    status = {code: s for s, code in EXIT_CODES.items()}.get(child.exit_code)
    if child.exit_code < 0:
        return "crash", f"train.py was killed by signal {-child.exit_code} ({signal.Signals(-child.exit_code).name})"
    if status is None:
        return "crash", f"train.py exited with code {child.exit_code}"
    return status, None if status == "ok" else f"train.py exited with code {child.exit_code} ({status})"


def not_measurable(plan, m, summary, handoff):
    """Why a run that exited 0 cannot be measured, or None: it must end as train.py ends, with its summary
    and its final block, hand off its model, and leave the harness as it found it."""
    if (summary or {}).get("status") != "ok":
        return f"train.py exited 0, but run_summary.json {'says ' + repr(summary.get('status')) if summary else 'is missing'}"
    if m["reported_val_bpb"] is None:
        return "train.py exited 0 without a val_bpb in run.log's final `---` block"
    if not handoff.exists():
        return "train.py handed off no model: prepare.evaluate_bpb, which saves it, was never called"
    changes = check_against(plan.branch, plan.pin, None).changes
    if changes:
        return f"harness files changed during the run: {'; '.join(changes)}"
    return None


def evaluate(commit, handoff, cap_s):
    """The evaluator's measurement of the handed-off model: {val_bpb, heldout_bpb, eval_s, machine_speed}, or
    {status, error} when it failed or was stopped. Its bytecode cache is a directory made after train.py
    ended, so nothing train.py wrote can stand in for the harness's modules."""
    with tempfile.TemporaryDirectory(prefix="auto-log-research-eval-") as tmp:
        tmp = Path(tmp)
        (tmp / "train.py").write_bytes(subprocess.run(["git", "show", f"{commit}:train.py"], capture_output=True,
                                                      check=True).stdout)
        cmd = [sys.executable, "-I", "-B", "-X", f"pycache_prefix={tmp / 'pycache'}", str(Path("harness/evaluate.py").resolve()),
               "--handoff", str(handoff), "--train-py", str(tmp / "train.py"), "--out", str(tmp / "out.json")]
        code, stopped = run_evaluator(cmd, tmp / "evaluator.log", cap_s)
        out = read_json(tmp / "out.json")[0] or {}
        if stopped == "interrupted":
            return {"status": "interrupted", "error": "stopped by Ctrl-C or SIGTERM while the model was measured"}
        if stopped:
            return {"status": "crash", "error": f"the evaluator ran past its cap of {cap_s:.0f} s and was stopped"}
        if code != 0 or out.get("error") or not isinstance(out.get("val_bpb"), (int, float)):
            return {"status": "crash", "error": f"the evaluator failed: {out.get('error') or last_line(tmp / 'evaluator.log')}"}
    return {k: out.get(k) for k in ("val_bpb", "heldout_bpb", "eval_s", "future_leak", "machine_speed")}


def run_evaluator(cmd, log_path, cap_s):
    """(exit code, None | "timeout" | "interrupted") of the evaluator, stopped after cap_s seconds."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with interrupts_raised():
            if exited(proc, cap_s):
                return proc.returncode, None
        stop(proc, signal.SIGTERM)
        return proc.returncode, "timeout"
    except KeyboardInterrupt:
        stop(proc, signal.SIGINT)
        return proc.returncode, "interrupted"


def claimed_loop(summary):
    """What train.py says its loop took: training, warm-up steps and evaluations (run_summary.json)."""
    s = summary or {}
    parts = [s.get("training_seconds")] + [(s.get("timings") or {}).get(k) for k in ("warmup_s", "eval_s", "final_eval_s")]
    return sum(p for p in parts if isinstance(p, (int, float))) if isinstance(parts[0], (int, float)) else None


def claimed_wall(summary):
    """What train.py says the whole process took: its start-up (imports and set-up), then the loop."""
    loop, startup = claimed_loop(summary), ((summary or {}).get("timings") or {}).get("startup_s")
    return loop + startup if loop is not None and isinstance(startup, (int, float)) else None


def rounded(x):
    return None if x is None else round(x, 3)


def last_line(path):
    lines = Path(path).read_text(errors="replace").strip().splitlines() if Path(path).exists() else []
    return lines[-1] if lines else "no output"

# ---------------------------------------------------------------------------
# The caught cases: pure functions of the measurement and the best's results.tsv row

def caught_cases(m, best):
    """[{"case", "detail"}] of measurement `m` (measurement.json's fields) against `best`, the row of the
    branch's best run (None before there is one)."""
    return [found for check in CHECKS if (found := check(m, best))]


def trained_on_val(m, best):
    """The model does better on the validation rows than on unseen text of the same kind, by more than the
    best's model did: it has seen them."""
    val, heldout = m.get("val_bpb"), m.get("heldout_bpb")
    if val is None or heldout is None:
        return None
    gap = heldout - val
    ref = number(best.get("heldout_bpb")) if best else None
    ref_gap = None if ref is None or row_bpb(best) is None else ref - row_bpb(best)
    if ref_gap is not None:
        limit = max(LEAK_ABS, LEAK_REL * val)
        grown = gap - ref_gap
        return case(TRAINED_ON_VAL, f"held-out bpb {heldout:.4f} minus val_bpb {val:.4f} is {gap:+.4f}, {grown:+.4f} "
                                    f"beyond the best's {ref_gap:+.4f} (limit {limit:.4f})") if grown > limit else None
    limit = LEAK_ALONE_ABS + LEAK_ALONE_REL * val
    return case(TRAINED_ON_VAL, f"held-out bpb {heldout:.4f} minus val_bpb {val:.4f} is {gap:+.4f}, beyond {limit:.4f} "
                                "(no best to compare with)") if gap > limit else None


def not_the_models(m, best):
    """train.py's printed val_bpb is not what its model scores on the pinned rows (a scaled number, another
    EVAL_TOKENS, a number evaluate_bpb never returned)."""
    reported, val = m.get("reported_val_bpb"), m.get("val_bpb")
    if reported is None or val is None or abs(reported - val) <= REPORTED_TOLERANCE:
        return None
    return case(NOT_THE_MODELS, f"train.py printed val_bpb {reported:.6f}, the harness measured {val:.6f} "
                                f"({reported - val:+.6f}, tolerance {REPORTED_TOLERANCE:g})")


def slowed_clock(m, best):
    """The loop took longer on the parent's clock than train.py's own timings of it say; or the whole process
    did, start-up included (a slowed clock slows metrics.jsonl's flushes too, and so the first row's arrival)."""
    spans = (("from the first metrics row to the exit", m.get("loop_s"), m.get("claimed_loop_s")),
             ("from the spawn to the exit", m.get("wall_s"), m.get("claimed_wall_s")))
    for span, took, claimed in spans:
        limit = None if took is None or claimed is None else claimed * (1 + CLOCK_SLACK_REL) + CLOCK_SLACK_S
        if limit is not None and took > limit:
            return case(SLOWED_CLOCK, f"{took:.1f} s {span} on the harness's clock, but train.py's timings of it add "
                                      f"up to {claimed:.1f} s (limit {limit:.1f} s)")
    return None


def untimed_work(m, best):
    """More wall-clock time outside the time budget than the best's code took, on a machine of the same speed.
    The reference is the slowest of the best code's runs (`outside_ref_s`, which archive_and_decide puts on the
    best's row), so a code change's cold torch.compile compares with the best's own cold start. Nothing is
    judged before there is a best (the baseline is the pinned code) or while the machine's speed moved (the
    decision is then a rerun, and the rerun is judged)."""
    outside, budget = m.get("outside_s"), m.get("time_budget")
    ref = number((best or {}).get("outside_ref_s") or (best or {}).get("outside_s"))
    if outside is None or budget is None or ref is None or machine_moved(m, best):
        return None
    limit = ref + OUTSIDE_SLACK_S + OUTSIDE_SLACK_BUDGET * budget
    return case(UNTIMED_WORK, f"{outside:.1f} s of the run's {m['wall_s']:.1f} s wall-clock were outside the {budget:g} s "
                              f"budget, against the best code's {ref:.1f} s on a machine of the same speed "
                              f"(limit {limit:.1f} s)") if outside > limit else None


def machine_moved(m, best):
    """The machine ran at another speed than for the best, or changed speed during the evaluation (decide's
    rule, so the two never disagree): time outside the budget then measures the machine as much as the code."""
    probes = tuple(number(v) for v in (m.get("machine_speed") or {}).values())
    ref = number((best or {}).get("machine_speed"))
    if len(probes) != 2 or None in probes or ref is None:
        return True
    return Machine(sum(probes) / 2, ref, 1, probes, None).moved() is not None


def sees_ahead(m, best):
    """The logits at a position moved when only later tokens changed: the model is not causal, and its
    val_bpb is not a prediction (harness/evaluate.py's future_leak)."""
    leak = m.get("future_leak")
    if leak is None or leak <= FUTURE_TOLERANCE:
        return None
    return case(SEES_AHEAD, f"changing the second half of a validation row moved the first half's logits by up to "
                            f"{leak:.3g} (tolerance {FUTURE_TOLERANCE:g})")


CHECKS = (trained_on_val, not_the_models, slowed_clock, untimed_work, sees_ahead)


def case(name, detail):
    return {"case": name, "detail": detail}


def speed_of(m):
    """The machine's speed during the run: the mean of the evaluator's two probes (GFLOP/s), or None."""
    probes = [v for v in (m.get("machine_speed") or {}).values() if number(v)]
    return sum(probes) / len(probes) if probes else None

# ---------------------------------------------------------------------------
# Archive, decide, and apply the decision

def archive_and_decide(plan, commit, m):
    """Archive the run with measurement `m` (its caught cases added here, against the branch's best) and
    apply the decision; (row, decision, best row or None, what happened to train.py)."""
    worker = worker_name()
    with archive_lock():
        remove_leftovers(paths().dir)
        rows = read_results()
        capture = capture_run(commit, rows)
        branch_rows = [r for r in rows if r.get("branch") == plan.branch]
        best = best_for(branch_rows, {"harness": harness_key(capture.summary), "gpu": gpu_class(capture.summary),
                                      "worker": worker})
        if m["status"] == "ok":
            if best is not None:  # the untimed-work reference: the slowest of the best code's runs
                same = [number(r.get("outside_s")) for r in branch_rows if r.get("code_sha") == best.get("code_sha")]
                best = {**best, "outside_ref_s": max([x for x in same if x is not None], default=None)}
            m["caught"] = caught_cases(m, best) + capture.caught
            m["status"] = "invalid" if m["caught"] else "ok"
        row = record_run(capture, rows, m)
        rows.append(row)
        history = branch_rows + [row]  # another branch's runs are never this branch's best
        decision = decide(row, history, m)
        row["decision"] = decision.kind
        write_results(rows)  # the record is safe from here on
        close_claim(worker, row)
        refusal = apply_status(rows, row, decision)
        report_run(load_run(row), history)
        draw_progress(rows)
        snapshot_insights(worker)
    best = next((r for r in history if decision.best_id and decision.best_id in (r.get("run_id"), r.get("commit"))),
                None)
    return row, decision, best, refusal or after_decision(decision, best, row)


def apply_status(rows, row, decision):
    """keep, discard and crash through `analyze.py status`'s own path; a rerun stays pending, and an invalid
    run stays invalid. The line why a status could not be given, or None."""
    target = decision.kind if decision.kind in ("keep", "discard", "crash") else None
    if target is None or row["status"] in (target, "invalid"):
        return None
    refusal = status_refusal(row, target)
    if refusal:
        return f"status stays {row['status']}: {refusal}"
    set_status(rows, row, target)
    return None


def after_decision(decision, best, row):
    """What happened to train.py, in one line: kept, left for a rerun, or restored to the best's."""
    if decision.kind == "keep":
        return f"train.py: kept; commit {row['commit']} is the branch's best now"
    if decision.kind == "rerun":
        return "train.py: unchanged; rerun it as it is with `uv run analyze.py run`"
    if best is None:
        return "train.py: unchanged, there is no best to restore it from"
    return restore_train_py(best)


def restore_train_py(best):
    """After a discard or a crash: train.py back to the best's, in a commit of its own, so that the next
    change starts from the best."""
    target = resolve_commit(best["commit"])
    if target is None:
        return f"train.py: unchanged, the best's commit {best['commit']} is gone"
    if git_text("rev-parse", "HEAD:train.py") == git_text("rev-parse", f"{target}:train.py"):
        return f"train.py: unchanged, it is the best's ({best['run_id']})"
    for args in (["checkout", target, "--", "train.py"],
                 ["commit", "-q", "-m", f"Restore train.py from {target[:7]}", "--", "train.py"]):
        out = subprocess.run(["git", *args], capture_output=True, text=True)
        if out.returncode != 0:
            return f"train.py: restoring the best's failed (`git {' '.join(args[:1])}`: {last_text(out)}); restore it by hand"
    return f"train.py: restored from the best {best['run_id']} in commit {head_commit()[:7]}"


def last_text(out):
    return ((out.stderr or out.stdout).strip().splitlines() or ["no output"])[-1]

# ---------------------------------------------------------------------------
# What `run` prints: at most MAX_LINES lines, the decision first

def report_lines(row, m, decision, best, notes, after):
    lines = [decision.line(), f"run {row['run_id']}: commit {row['commit']} {row['description']}", *notes]
    reported = m.get("reported_val_bpb")
    if m.get("val_bpb") is not None:
        lines.append(f"val_bpb {m['val_bpb']:.6f} measured by the harness"
                     + (f" (train.py printed {reported:.6f})" if reported is not None else "")
                     + (f", held-out {m['heldout_bpb']:.6f}" if m.get("heldout_bpb") is not None else ""))
    lines.append(f"status {row['status']}, outcome {row['outcome']}, {row.get('num_steps') or 'n/a'} steps; wall {m['wall_s']:.1f} s, "
                 f"{m['outside_s']:.1f} s outside the {m['time_budget']:g} s budget")
    lines += speed_line(m, best)
    lines += [f"caught: {c['case']}: {c['detail']}" for c in m["caught"]]
    lines += [f"error: {m['error']}"] if m.get("error") else []
    lines += [f"analysis: {paths().run_dir(row['run_id']) / 'analysis.md'}", after]
    return lines if len(lines) <= MAX_LINES else lines[:MAX_LINES - 1] + lines[-1:]


def speed_line(m, best):
    speed = speed_of(m)
    if speed is None:
        return []
    ref = number(best.get("machine_speed")) if best else None
    return [f"machine {speed:,.0f} GFLOP/s" + (f", {speed / ref - 1:+.0%} vs the best's {ref:,.0f}" if ref else "")]

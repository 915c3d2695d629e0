"""
The run in the working directory, captured and recorded: which commit ran, whether run_summary.json,
metrics.jsonl and run.log are this run's, its results.tsv row and its run directory, whose record.json
keeps what audit later checks (the sha256 of every file stored, the branch and its pin, the status and
val_bpb it was archived with). A run whose harness differs from its branch's pin (harness/pin.py) is
recorded invalid.

A run of `analyze.py run` comes with the harness's own measurement (harness/runner.py): its row's
val_bpb and status are the measurement's, and measurement.json is stored beside the run's files. A bare
`analyze.py` has only train.py's word, which it takes for ok only when run.log ends with the final
block that says the same val_bpb.
"""
import hashlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness.archive import (MEASUREMENT_JSON, RECORD_JSON, best_for, die, git, gpu_class, latest_row, own, paths,
                             read_json, sha256_file, worker_name)
from harness.identity import ran_code_sha
from harness.pin import check_run

STALE_SLACK_S = 30.0       # run.log written this long after the summary finished -> the summary is older
LOG_TAIL_BYTES = 8192      # the final block of run.log is in its last few lines
EVIDENCE = ("run_summary.json", "run_summary.json.corrupt", "stale_run_summary.json", "metrics.jsonl", "run.log",
            "diff.patch", MEASUREMENT_JSON)  # the stored files whose sha256 record.json keeps (analysis.md and plots are rebuilt)
FORGED_OK = "run_summary.json claims ok without run.log's final block"  # a caught case (fixed name, as runner.py's)

# ---------------------------------------------------------------------------
# git: the commit that ran

def head_commit():
    out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    if out.returncode != 0:
        reason = (out.stderr.strip().splitlines() or ["no output"])[-1]
        die(f"{Path.cwd()} is not a git repository with a commit ({reason}); "
            "run analyze.py from the repository that holds train.py")
    return out.stdout.strip()


def commit_subject(commit):
    return (git("log", "-1", "--format=%s", commit) or "").strip()


# ---------------------------------------------------------------------------
# Reading the run in the working directory and deciding what it is

@dataclass
class Capture:
    """What the working directory says about the latest run, before anything is archived."""
    commit: str                 # full sha of the commit that was run
    summary: dict | None        # None: no summary, a corrupt one, or one left by an earlier run
    outcome: str                # ok | crash | diverged | timeout | interrupted | no_summary | stale_summary | corrupt_summary
    key: str                    # identity of the run: the same run always gets the same key
    use_metrics: bool           # metrics.jsonl belongs to this run
    notes: list = field(default_factory=list)
    caught: list = field(default_factory=list)  # [{"case", "detail"}]: what the run files claim that they do not show


def stale_reasons(summary, summary_path, log_path, archived):
    """Why run_summary.json cannot be the latest run's; empty when it is. RunRecorder deletes the old
    summary at start-up, so a summary survives a run only when train.py died before reaching it; then
    run.log, rewritten by the shell redirect, differs from the log archived with the summary's run
    (`archived`: its results.tsv row) or, when that run is not archived, is newer than the summary.
    A train.py or HEAD that moved on since is no reason: the summary names its own commit."""
    if archived is not None and not log_rewritten(archived, log_path):
        return []  # the run on record, run.log the same in content (perhaps touched)
    reasons = [] if archived is None else [f"it is archived as {archived['run_id']}, whose run.log differs"]
    if log_path.exists():
        finished = (summary.get("timings") or {}).get("finished_at")
        if not isinstance(finished, (int, float)):
            finished = summary_path.stat().st_mtime
        lag = log_path.stat().st_mtime - finished
        if lag > STALE_SLACK_S:
            reasons.append(f"run.log was written {lag:.0f} s after it finished")
    return reasons


def log_rewritten(row, log_path):
    """run.log differs from the one archived with `row`. No run.log here means nothing new ran."""
    run_dir = paths().run_dir(row["run_id"])
    if not log_path.exists() or not run_dir.is_dir():
        return False
    archived = run_dir / "run.log"
    return not archived.exists() or sha256_file(archived) != sha256_file(log_path)


def read_summary(summary_path):
    """(summary or None, outcome, notes) for a missing, corrupt or readable run_summary.json."""
    if not summary_path.exists():
        return None, "no_summary", ["no run_summary.json: the process ended before writing it (killed, e.g. out "
                                    "of memory, or train.py failed before RunRecorder started)"]
    summary, problem = read_json(summary_path)
    if problem:
        return None, "corrupt_summary", [f"{problem}: the run is recorded as a crash of HEAD from run.log; "
                                         "the unreadable file is kept as run_summary.json.corrupt"]
    return summary, summary.get("status") or "crash", []


def run_key(basis):
    """Identity of a run in results.tsv: the same run always gets the same key."""
    return hashlib.sha256(basis.encode()).hexdigest()[:16]


def summary_identity(summary, head):
    """(commit, run key) of a summary."""
    git_info = summary.get("git") or {}
    commit = git_info.get("commit") or head
    return commit, run_key(f"summary|{commit}|{(summary.get('timings') or {}).get('started_at')}|"
                           f"{git_info.get('train_py_sha256')}")


def capture_run(head, rows):
    """Read the run files in the working directory (cmd_archive checked that there are some)."""
    summary_path, log_path = Path("run_summary.json"), Path("run.log")
    summary, outcome, notes = read_summary(summary_path)
    if summary is not None:
        commit, key = summary_identity(summary, head)
        archived = next((r for r in rows if r.get("run_key") == key), None)
        reasons = stale_reasons(summary, summary_path, log_path, archived)
        if reasons:
            summary, outcome = None, "stale_summary"
            notes.append(f"run_summary.json was left by an earlier run ({'; '.join(reasons)}): this run is "
                         "recorded as a crash of HEAD from run.log; that summary is kept as stale_run_summary.json")
        elif commit != head:
            notes.append(f"HEAD has moved to {head[:7]} since this run; it is archived under the commit it ran")
    if summary is None:  # the same crash log rewritten by a rerun is a new run: its mtime tells them apart
        if not log_path.exists():
            die("run_summary.json is unusable and there is no run.log to recover the run from; "
                "rerun with `uv run train.py > run.log 2>&1`")
        commit = head
        key = run_key(f"crash|{head}|{sha256_file(log_path)}|{log_path.stat().st_mtime_ns}")
    caught = unbacked_ok(summary, log_path) if outcome == "ok" else []
    if caught:
        outcome = "crash"
        notes.append(f"{FORGED_OK}: {caught[0]['detail']}; recorded as a crash")
    # RunRecorder deletes metrics.jsonl together with the old summary: a stale summary means stale curves too
    use_metrics = Path("metrics.jsonl").exists() and outcome != "stale_summary"
    return Capture(commit, summary, outcome, key, use_metrics, notes + input_notes(outcome, log_path), caught)


def unbacked_ok(summary, log_path):
    """[the caught case] when a summary says ok but run.log does not end with the final block of the same
    val_bpb (a summary written by hand after a crash); [] when it does. train.py prints the block last."""
    said = summary.get("val_bpb")
    if not isinstance(said, (int, float)):  # no number claimed: recorded as a crash all the same
        return []
    block, said = final_block(log_path), f"{said:.6f}"
    if not block:
        where = "run.log has no final `---` block" if log_path.exists() else "there is no run.log to back it"
        return [{"case": FORGED_OK, "detail": where}]
    if block.get("val_bpb") != said:
        return [{"case": FORGED_OK, "detail": f"run.log's final block says val_bpb {block.get('val_bpb')}, "
                                              f"run_summary.json {said}"}]
    return []


def final_block(path):
    """{key: value} of the last `---` block of a run.log (karpathy/autoresearch's greppable block), or {}."""
    if not Path(path).exists():
        return {}
    with open(path, "rb") as f:
        f.seek(max(0, Path(path).stat().st_size - LOG_TAIL_BYTES))
        lines = f.read().decode(errors="replace").splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == "---"]
    if not starts:
        return {}
    pairs = (line.split(":", 1) for line in lines[starts[-1] + 1:] if ":" in line)
    return {k.strip(): v.strip() for k, v in pairs}


def input_notes(outcome, log_path):
    """Run files that are missing, or not this run's."""
    notes = []
    if not Path("metrics.jsonl").exists():
        notes.append("metrics.jsonl is missing: no training curves for this run")
    elif outcome == "stale_summary":
        notes.append("metrics.jsonl is the earlier run's too; not archived")
    if not log_path.exists():
        notes.append("run.log is missing: train.py's output was not redirected to it")
    return notes


# ---------------------------------------------------------------------------
# The harness: its settings (which runs compare) and its code (against the pin)

def harness_key(summary):
    """profile:hash of the harness dict; runs compare only within one key."""
    harness = (summary or {}).get("harness")
    if not isinstance(harness, dict):
        return ""
    digest = hashlib.sha256(json.dumps(harness, sort_keys=True).encode()).hexdigest()[:8]
    return f"{harness.get('profile', '?')}:{digest}"


def check_harness(summary):
    """Which harness files differed from the pin when the run with this summary was archived, as its
    record.json keeps it; None when none did (or the run is not archived)."""
    commit, key = summary_identity(summary, "")
    stored = stored_record(commit, key) if commit else None
    changes = stored[1].get("harness_changed") if stored else None
    return "; ".join(changes) if changes else None


# ---------------------------------------------------------------------------
# Recording the run: its results.tsv row and its directory

def record_run(capture, rows, measurement=None):
    """The results.tsv row of a run not yet in it, storing its directory unless an earlier invocation,
    killed before writing results.tsv (or whose row was torn), already did. `measurement`: the harness's
    own (measurement.json, from `analyze.py run`), whose status and val_bpb the row then takes."""
    worker = worker_name()
    stored = stored_run_id(capture)
    run_id = stored or reserve_run_id(capture.commit, rows)
    harness = check_run(capture.summary, [r for r in rows if own(r, worker)])  # another clone's branch may share a name
    latest = latest_row(rows, worker)
    row = make_row(capture, run_id, measurement, latest["harness"] if latest else "")
    row["status"] = "invalid" if harness.changes and row["status"] != "crash" else row["status"]
    row.update(branch=harness.branch or "", worker=worker)
    if not stored:
        store_run(capture, row, branch_best(rows, row), harness, measurement)
    return row


def branch_best(rows, row):
    """The best a new run of `row`'s branch is measured against: the branch's own, never a run that another
    branch stands on (a run archived on main before an experiment branched off it is not the branch's)."""
    return best_for([r for r in rows if r.get("branch") == row.get("branch")], row)


def row_outcome(capture, measurement):
    """(outcome, status, val_bpb or None) of a run: the harness's measurement when there is one (a caught
    run finished: outcome ok, status invalid), else what the run files say."""
    if measurement is not None:
        status, val = measurement["status"], measurement.get("val_bpb")
        if status in ("ok", "invalid"):
            return "ok", "pending" if status == "ok" else "invalid", val
        return status, "pending" if status == "interrupted" else "crash", None
    val = (capture.summary or {}).get("val_bpb")
    if capture.outcome == "interrupted":  # not the code's failure: no number, and a rerun's turn
        return "interrupted", "pending", None
    if capture.outcome != "ok" or val is None:
        return capture.outcome, "crash", None
    return "ok", "pending", val


def stored_run_id(capture):
    """The id of a run directory <commit7>* that already holds this run, or None."""
    stored = stored_record(capture.commit, capture.key)
    return stored[0].name if stored else None


def stored_record(commit, key):
    """(run directory, record.json) of the run of `commit` with run key `key`, or None."""
    for run_dir in sorted(paths().dir.glob(f"{commit[:7]}*")):
        record = read_json(run_dir / RECORD_JSON)[0] or {}
        if record.get("run_key") == key:
            return run_dir, record
    return None


def reserve_run_id(commit, rows):
    """<commit7>, else <commit7>-2, -3, ...: the first id no row has whose directory this process creates
    (mkdir is atomic, so two writers never get one id). store_run fills the directory; a killed invocation's
    empty one is removed by the next (remove_leftovers), which is why every writer must share the lock: an
    archive on a filesystem without working flock (an object-store mount) is not safe to share."""
    taken = {r.get("run_id") for r in rows}
    base, n = commit[:7], 1
    while True:
        run_id = base if n == 1 else f"{base}-{n}"
        if run_id not in taken:
            try:
                (paths().dir / run_id).mkdir()
                return run_id
            except FileExistsError:
                pass
        n += 1


def make_row(capture, run_id, measurement, default_harness):
    """The results.tsv row. A run without a summary is assumed to share the latest run's harness."""
    s = capture.summary or {}

    def num(key, spec):
        return "" if s.get(key) is None else format(float(s[key]), spec)

    outcome, status, val = row_outcome(capture, measurement)
    started = (s.get("timings") or {}).get("started_at")
    crashed = status == "crash"
    description = commit_subject(capture.commit)
    if (s.get("git") or {}).get("dirty"):
        description += " [uncommitted changes]"
    return {
        "commit": capture.commit[:7],
        "val_bpb": "0.000000" if val is None else f"{val:.6f}",
        "memory_gb": "0.0" if crashed else "n/a" if s.get("peak_vram_mb") is None else f"{s['peak_vram_mb'] / 1024:.1f}",
        "status": status, "description": description, "run_id": run_id, "outcome": outcome,
        "harness": harness_key(s) or default_harness, "train_py_sha": ((s.get("git") or {}).get("train_py_sha256") or "")[:12],
        "num_steps": num("num_steps", ".0f"), "mfu_percent": num("mfu_percent", ".2f"),
        "training_seconds": num("training_seconds", ".1f"),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)) if started else "",
        "run_key": capture.key, "code_sha": ran_code_sha(capture.summary, capture.commit),
        "gpu": gpu_class(capture.summary), **measured_columns(capture, measurement),
    }


def measured_columns(capture, measurement):
    """The columns of the harness's own measurement; "" in a bare archive's row (train.py's word only)."""
    caught = "; ".join(c["case"] for c in (measurement or {}).get("caught") or capture.caught)
    if measurement is None:
        return {"measured": "", "heldout_bpb": "", "machine_speed": "", "wall_s": "", "outside_s": "",
                "caught": caught, "decision": ""}
    m = measurement

    def num(value, spec):
        return "" if value is None else format(float(value), spec)

    speeds = [v for v in (m.get("machine_speed") or {}).values() if isinstance(v, (int, float))]
    return {"measured": "harness", "heldout_bpb": num(m.get("heldout_bpb"), ".6f"),
            "machine_speed": num(sum(speeds) / len(speeds) if speeds else None, ".1f"),
            "wall_s": num(m.get("wall_s"), ".1f"), "outside_s": num(m.get("outside_s"), ".1f"),
            "caught": caught, "decision": ""}


def store_run(capture, row, best, harness, measurement=None):
    """Copy the run's files into its directory (built aside, then renamed onto the empty directory
    reserve_run_id made), and the harness's measurement.json when there is one. record.json names the
    best that diff.patch is against, so a rebuilt analysis.md compares with the same run, and keeps the
    evidence audit checks."""
    run_id = row["run_id"]
    final, tmp = paths().dir / run_id, paths().dir / f".tmp-{run_id}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if capture.summary is not None:
        shutil.copyfile("run_summary.json", tmp / "run_summary.json")
    elif capture.outcome == "corrupt_summary":
        shutil.copyfile("run_summary.json", tmp / "run_summary.json.corrupt")
    elif capture.outcome == "stale_summary":  # an earlier run's, perhaps never archived: keep it
        shutil.copyfile("run_summary.json", tmp / "stale_run_summary.json")
    if capture.use_metrics:
        shutil.copyfile("metrics.jsonl", tmp / "metrics.jsonl")
    if Path("run.log").exists():
        shutil.copyfile("run.log", tmp / "run.log")
    (tmp / "diff.patch").write_text(train_py_diff(capture, best["commit"] if best else None))
    if measurement is not None:
        (tmp / MEASUREMENT_JSON).write_text(json.dumps(measurement, indent=2) + "\n")
    record = {"run_key": capture.key, "commit": capture.commit, "outcome": row["outcome"], "notes": capture.notes,
              "best": best["run_id"] if best else None, "status": row["status"], "val_bpb": row["val_bpb"],
              "branch": harness.branch, "worker": row["worker"], "pin": harness.pin, "harness_digest": harness.digest,
              "harness_changed": harness.changes, "caught": [c for c in row["caught"].split("; ") if c],
              "files": {name: sha256_file(tmp / name) for name in EVIDENCE if (tmp / name).exists()}}
    (tmp / RECORD_JSON).write_text(json.dumps(record, indent=2) + "\n")
    os.rename(tmp, final)


def train_py_diff(capture, best_commit):
    """train.py as run, against the best commit. The working tree is what ran when the summary's
    sha256 matches it (or there is no summary: a crash of the checkout)."""
    if best_commit is None:
        return ""
    ran_sha = ((capture.summary or {}).get("git") or {}).get("train_py_sha256")
    tree_ran = Path("train.py").exists() and (ran_sha is None or ran_sha == sha256_file("train.py"))
    args = [best_commit] if tree_ran else [best_commit, capture.commit]
    patch = git("diff", "--no-color", *args, "--", "train.py")
    return patch if patch is not None else f"# git diff against {best_commit[:7]} failed: that commit is gone\n"


def uncommitted_train_py(summary):
    """(sha256 of train.py as run, sha256 of its commit's train.py) when they differ, else None. Such a
    run measured code that no commit holds; None too when either is unknown (e.g. the commit is gone)."""
    git_info = (summary or {}).get("git") or {}
    ran, commit = git_info.get("train_py_sha256"), git_info.get("commit")
    if not ran or not commit:
        return None
    out = subprocess.run(["git", "show", f"{commit}:train.py"], capture_output=True)  # bytes, as hashed
    if out.returncode != 0:
        return None
    committed = hashlib.sha256(out.stdout).hexdigest()
    return None if committed == ran else (ran, committed)

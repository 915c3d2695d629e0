"""
Everything that happens after a run: archive it, explain it against the best run so far, and keep
the experiment log that the research loop steers by.

Usage:
    uv run analyze.py                            # archive the run in this directory, write analysis.md and plots
    uv run analyze.py list                       # every archived run, one line each
    uv run analyze.py show ID                    # print a run's analysis.md
    uv run analyze.py compare A B                # two runs side by side, plus an overlay plot
    uv run analyze.py best                       # the current best run: the one most recently kept
    uv run analyze.py status ID keep|discard|crash

It reads run_summary.json and metrics.jsonl (written by train.py) and run.log (the shell's redirect)
in the working directory, git, and its own archive under .auto-log-research/: results.tsv, harness.json,
the few run directories it compares (this run, the best, the previous one; the record.json of this
commit's earlier runs), and insights.md on `status`. Nothing else, so its cost does not grow with history.
"""
import argparse
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

# ---------------------------------------------------------------------------
# Archive layout (fixed: other tools and program.md rely on these names)

ARCHIVE_DIR = Path(".auto-log-research")
RESULTS_TSV = ARCHIVE_DIR / "results.tsv"
TORN_TSV = ARCHIVE_DIR / "results.tsv.torn"     # rows of results.tsv with missing fields, set aside verbatim
HARNESS_PIN = ARCHIVE_DIR / "harness.json"      # sha256 of prepare.py and analyze.py, pinned by the first run
INSIGHTS_MD = ARCHIVE_DIR / "insights.md"       # the agent's notes; only "## Current Best" is rewritten here
PROGRESS_PNG = ARCHIVE_DIR / "progress.png"     # val_bpb of every run, redrawn after each one
LOCK_FILE = ARCHIVE_DIR / ".lock"               # every write to the archive happens under this flock
RECORD_JSON = "record.json"                     # per run: how it was identified, and input problems seen
COLUMNS = ("commit", "val_bpb", "memory_gb", "status", "description",  # karpathy/autoresearch's five
           "run_id", "outcome", "harness", "train_py_sha", "num_steps", "mfu_percent",
           "training_seconds", "started_at", "run_key")
HARNESS_FILES = ("prepare.py", "analyze.py")

# ---------------------------------------------------------------------------
# Analysis settings

STALE_SLACK_S = 30.0       # run.log written this long after the summary finished -> the summary is older
SMOOTH_BETA = 0.9          # EMA of train/loss (as train.py's train/loss_smooth) when that key is absent
GRID_POINTS = 200          # common training-progress grid on which two runs are compared
DEPARTURE_SIGMAS = 3.0     # smoothed losses "differ" beyond this many sigmas of their combined noise
DEPARTURE_HOLD = 5         # ... for this many consecutive grid points (one blip is not a departure)
VAL_DEPARTURE_HOLD = 2     # in-training val/bpb (~10 points a run) differs for this many consecutive points
VAL_BPB_TOLERANCE = 0.005  # in-training val/bpb threshold while the noise band is still unknown
GAP_GROWS = 1.25           # |gap at the end| / |gap at the departure| above this: the gap grows
GAP_CLOSES = 0.8           # ... below this: it closes; in between: steady
NOISE_SIGMAS = 2.0         # noise band = +-2 std of the difference of two runs (sqrt(2) x one run's std)
PLATEAU_DROP = 0.002       # a fitted loss drop under 0.2% over the last tenth of training = plateaued
TREND_MIN_STEPS = 20       # fewer training steps than this in the last tenth: too noisy to call a trend
SPIKE_WINDOW = 50          # trailing steps that a loss value is compared against
SPIKE_Z = 6.0              # robust z-score above which a loss value is a spike
STALL_FACTOR = 3.0         # a step slower than this many times the median step is a stall
STEPS_OUTLIER = 0.05       # a repeat whose num_steps is off its group's median by more than 5% is an outlier on steps
LAYER_BEST_RATIO = 2.0     # a layer whose stat is this many times above/below the best's same layer is listed
LAYER_OUTLIER_RATIO = 3.0  # without a best: a layer this many times above/below its peers' median stands out
LAYER_SHOWN = 5            # at most this many layers listed per stat, the most extreme first
PLOT_DPI = 80              # with PLOT_POINTS, keeps each PNG well under 200 KB
PLOT_POINTS = 500          # longer curves are drawn as bin medians (stalls and spikes are in the text)
DIFF_HUNKS = 6             # What changed: at most this many hunks of diff.patch ...
DIFF_HUNK_LINES = 4        # ... with at most this many changed lines each, cut at DIFF_LINE_CHARS
DIFF_LINE_CHARS = 100


def die(message):
    """Bad input or a broken archive: one line naming the file and what to do, exit status 1."""
    raise SystemExit(f"analyze.py: {message}")


# ---------------------------------------------------------------------------
# Files, git, and the lock

def sha256_file(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def git(*args):
    """stdout of a git command, or None when git fails (the callers say what that means)."""
    out = subprocess.run(["git", *args], capture_output=True, text=True)
    return out.stdout if out.returncode == 0 else None


def head_commit():
    out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    if out.returncode != 0:
        reason = (out.stderr.strip().splitlines() or ["no output"])[-1]
        die(f"{Path.cwd()} is not a git repository with a commit ({reason}); "
            "run analyze.py from the repository that holds train.py")
    return out.stdout.strip()


def commit_subject(commit):
    return (git("log", "-1", "--format=%s", commit) or "").strip()


def write_atomic(path, data):
    """Temporary file + rename: a reader, or a killed writer, never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextmanager
def archive_lock():
    """Serialises every invocation that writes; the kernel drops the lock if the holder is killed."""
    ARCHIVE_DIR.mkdir(exist_ok=True)
    with open(LOCK_FILE, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def read_json(path):
    """(dict, None) or (None, one-line problem) for a missing or corrupt JSON file."""
    path = Path(path)
    if not path.exists():
        return None, f"{path} is missing"
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return None, f"{path} is not valid JSON ({e})"
    if not isinstance(data, dict):
        return None, f"{path} holds no JSON object"
    return data, None


# ---------------------------------------------------------------------------
# results.tsv: the experiment log, one row per archived run

def parse_results():
    """(rows, torn): torn are (line number, line) of rows with fewer fields than the header, e.g. a write
    cut short or a hand edit. They are left out rather than padded with blanks."""
    try:
        lines = RESULTS_TSV.read_text().splitlines() if RESULTS_TSV.exists() else []
    except UnicodeDecodeError as e:
        die(f"{RESULTS_TSV} is not UTF-8 text (byte {e.start}: {e.reason}); re-encode it "
            "(e.g. `iconv -f latin1 -t utf-8`) or move it aside")
    if not lines:
        return [], []
    if lines[0].split("\t")[:1] != ["commit"]:
        die(f"{RESULTS_TSV} has no `commit\\tval_bpb\\t...` header; restore it from a backup or move it aside")
    header = lines[0].split("\t")
    rows, torn = [], []
    for number, line in enumerate(lines[1:], 2):
        fields = line.split("\t")
        if len(fields) >= len(header):
            rows.append(dict(zip(header, fields)))
        elif line.strip():
            torn.append((number, line))
    return rows, torn


def read_results():
    rows, torn = parse_results()
    for number, line in torn:
        fields = line.count("\t") + 1
        print(f"analyze.py: {RESULTS_TSV} line {number} is torn ({fields} fields): left out, "
              f"and moved to {TORN_TSV} at the next write", file=sys.stderr)
    return rows


def write_results(rows):
    torn = parse_results()[1]
    if torn:  # set aside verbatim, never silently dropped
        old = TORN_TSV.read_text() if TORN_TSV.exists() else ""
        write_atomic(TORN_TSV, old + "".join(line + "\n" for _, line in torn))
    extra = [k for row in rows for k in row if k not in COLUMNS]
    header = list(COLUMNS) + list(dict.fromkeys(extra))
    lines = ["\t".join(header)] + ["\t".join(tsv_field(row.get(c, "")) for c in header) for row in rows]
    write_atomic(RESULTS_TSV, "\n".join(lines) + "\n")


def tsv_field(value):
    return " ".join(str(value).split())  # a tab or newline inside a field would tear the row


def row_bpb(row):
    """val_bpb of a row as a float, or None for a run that did not finish (karpathy writes 0.000000
    there), whatever status it was given since."""
    if row.get("status") == "crash" or row.get("outcome", "ok") not in ("ok", ""):
        return None
    try:
        value = float(row.get("val_bpb", ""))
    except ValueError:
        return None
    return value if np.isfinite(value) and value > 0 else None


def comparable(rows, harness):
    """Valid runs with a val_bpb made under the same harness: the only ones a run is measured against.
    `invalid` (harness changed) and `crash` rows are never among them."""
    return [r for r in rows if r.get("harness", "") == harness and r.get("status") in ("pending", "keep", "discard")
            and row_bpb(r) is not None]


def pick_best(rows, harness):
    """The best among the runs comparable under `harness` (see best_after_each), or None."""
    bests = best_after_each(comparable(rows, harness))
    return bests[-1] if bests else None


def best_after_each(pool):
    """The best after each row of `pool` (comparable rows, in order), None before there is one. The best
    is the run the branch stands on: the most recently kept one, as keep advances the branch in
    karpathy/autoresearch. It need not have the lowest val_bpb: a simplification kept inside the noise
    band is the new base. Before anything is kept, the lowest not-yet-judged run."""
    kept = lowest = None
    out = []
    for r in pool:
        if r["status"] == "keep":
            kept = r
        elif r["status"] == "pending" and (lowest is None or row_bpb(r) < row_bpb(lowest)):
            lowest = r
        out.append(kept or lowest)
    return out


def pick_previous(rows, harness):
    pool = comparable(rows, harness)
    return pool[-1] if pool else None


def latest_harness(rows):
    return next((r["harness"] for r in reversed(rows) if r.get("harness")), "")


def remove_leftovers(directory):
    """Temporary files and directories of invocations killed mid-write. Every writer holds the lock,
    and so does the caller, so none of them is in use."""
    for path in Path(directory).glob(".*"):
        if path.is_dir() and path.name.startswith(".tmp-"):
            shutil.rmtree(path)
        elif path.is_file() and (path.name.endswith(".tmp") or path.name.startswith(".progress.")):  # older names too
            path.unlink()


def find_row(rows, run_id):
    """Exact run id, else the one run whose id starts with it or whose commit a full sha starts with."""
    hits = [r for r in rows if r.get("run_id") == run_id] or [
        r for r in rows if r.get("run_id", "").startswith(run_id)
        or (len(run_id) > 7 and r.get("commit") and run_id.startswith(r["commit"]))]
    if len(hits) == 1:
        return hits[0]
    known = " ".join(r.get("run_id", "?") for r in rows[-8:]) or "none yet"
    if not hits:
        die(f"no run {run_id!r} in {RESULTS_TSV} (latest ids: {known})")
    die(f"{run_id!r} matches several runs ({' '.join(r['run_id'] for r in hits)}); give the full run id")


# ---------------------------------------------------------------------------
# metrics.jsonl as columns

def read_metrics(path):
    """(Metrics or None, notes). Unreadable lines are skipped and reported, never fatal."""
    path = Path(path)
    if not path.exists():
        return None, [f"{path} is missing: no training curves for this run"]
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    rows, bad = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            bad.append(number)
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
            rows.append(row)
        else:
            bad.append(number)
    notes = []
    last = max((i for i, line in enumerate(lines, 1) if line.strip()), default=0)
    if bad and bad[-1] == last and not raw.endswith(b"\n"):
        notes.append(f"{path}: the last line (line {last}) is half-written, the process stopped mid-write; skipped")
        bad = bad[:-1]
    if bad:
        notes.append(f"{path}: {len(bad)} unreadable line(s) skipped (lines {', '.join(map(str, bad[:5]))})")
    if not rows:
        notes.append(f"{path} holds no readable rows: no training curves for this run")
        return None, notes
    rows.sort(key=lambda r: r["step"])
    return Metrics(rows), notes


class Metrics:
    """Every key of metrics.jsonl as (row index, value) arrays, aligned to step and training progress."""

    def __init__(self, rows):
        columns = {}
        for i, row in enumerate(rows):
            for key, value in row.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    columns.setdefault(key, ([], []))
                    columns[key][0].append(i)
                    columns[key][1].append(float(value))
        self.columns = {k: (np.array(idx), np.array(vals)) for k, (idx, vals) in columns.items()}
        self.keys = list(dict.fromkeys(k for row in rows for k in row))
        self.step = np.array([float(r["step"]) for r in rows])
        if "train/progress" in self.columns:
            idx, prog = self.columns["train/progress"]
            self.progress = np.interp(self.step, self.step[idx], prog)  # rows without it: by step
            self.progress[idx] = prog  # a val row shares its step with the next training row, not its progress
        else:
            self.progress = self.step / max(self.step.max(), 1.0)

    def __contains__(self, key):
        return key in self.columns or (key == "train/loss_smooth" and "train/loss" in self.columns)

    def series(self, key):
        """(progress, step, values) over the rows that hold `key`."""
        if key == "train/loss_smooth" and key not in self.columns:
            return self.smooth_loss
        idx, values = self.columns.get(key, (np.zeros(0, int), np.zeros(0)))
        return self.progress[idx], self.step[idx], values

    @cached_property
    def smooth_loss(self):
        """train.py's debiased EMA when logged, else the same EMA computed here."""
        if "train/loss_smooth" in self.columns:
            return self.series("train/loss_smooth")
        p, s, loss = self.series("train/loss")
        ema, out = 0.0, np.empty_like(loss)
        for i, x in enumerate(loss):
            ema = SMOOTH_BETA * ema + (1 - SMOOTH_BETA) * x
            out[i] = ema / (1 - SMOOTH_BETA ** (i + 1))
        return p, s, out

    @cached_property
    def loss_noise(self):
        """Robust std of train/loss around its smoothed curve over the second half of training."""
        p, _, loss = self.series("train/loss")
        ps, _, smooth = self.smooth_loss
        if len(loss) < 10 or len(smooth) < 10:
            return None
        resid = loss - np.interp(p, ps, smooth)
        resid = resid[(p >= 0.5 * p.max()) & np.isfinite(resid)]
        if len(resid) < 5:
            return None
        return float(1.4826 * np.median(np.abs(resid - np.median(resid))))

    @cached_property
    def training_progress(self):
        """Progress of the training rows (those holding train/loss) that count against the budget: the
        warm-up (compile) steps before the clock starts all sit at progress 0."""
        p = self.series("train/loss")[0] if "train/loss" in self.columns else self.progress
        return p[p > 0]

    @property
    def start(self):
        """First positive training progress; before it, runs can only be aligned by step."""
        p = self.training_progress
        return float(p.min()) if len(p) else 0.0

    @property
    def progress_per_step(self):
        """Typical progress one training step adds (its time over the budget), or None."""
        p = self.training_progress
        return float(np.median(np.diff(p))) if len(p) >= 2 else None

    @cached_property
    def stalls(self):
        """[(step, progress, ms)] of the counted steps slower than STALL_FACTOR x their median."""
        p, step, ms = counted(self, "perf/step_time_ms")
        if not len(ms):
            return []
        slow = np.flatnonzero(ms > STALL_FACTOR * np.median(ms))
        return [(int(step[i]), float(p[i]), float(ms[i])) for i in slow]

    def layer_keys(self):
        """{stat: {name: key}} for keys layer/<name>/<stat>."""
        out = {}
        for key in self.columns:
            parts = key.split("/")
            if parts[0] == "layer" and len(parts) >= 3:
                out.setdefault(parts[-1], {})["/".join(parts[1:-1])] = key
        return out


# ---------------------------------------------------------------------------
# Reading the run in the working directory and deciding what it is

@dataclass
class Capture:
    """What the working directory says about the latest run, before anything is archived."""
    commit: str                 # full sha of the commit that was run
    summary: dict | None        # None: no summary, a corrupt one, or one left by an earlier run
    outcome: str                # ok | crash | diverged | timeout | no_summary | stale_summary | corrupt_summary
    key: str                    # identity of the run: the same run always gets the same key
    use_metrics: bool           # metrics.jsonl belongs to this run
    notes: list = field(default_factory=list)


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
    run_dir = ARCHIVE_DIR / row["run_id"]
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
    # RunRecorder deletes metrics.jsonl together with the old summary: a stale summary means stale curves too
    use_metrics = Path("metrics.jsonl").exists() and outcome != "stale_summary"
    return Capture(commit, summary, outcome, key, use_metrics, notes + input_notes(outcome, log_path))


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


def harness_key(summary):
    """profile:hash of the harness dict; runs compare only within one key."""
    harness = (summary or {}).get("harness")
    if not isinstance(harness, dict):
        return ""
    digest = hashlib.sha256(json.dumps(harness, sort_keys=True).encode()).hexdigest()[:8]
    return f"{harness.get('profile', '?')}:{digest}"


def harness_shas(summary):
    git_info = (summary or {}).get("git") or {}
    return {name: git_info.get(f"{Path(name).stem}_py_sha256") for name in HARNESS_FILES}


def pin_harness(summary, run_id):
    """The first stored run whose summary records both hashes pins them (only cmd_archive calls this)."""
    shas = harness_shas(summary)
    if not HARNESS_PIN.exists() and all(shas.values()):
        write_atomic(HARNESS_PIN, json.dumps({**shas, "pinned_by": run_id}, indent=2) + "\n")


def check_harness(summary):
    """None when prepare.py and analyze.py match the pinned sha256 (or nothing is pinned yet), else
    which file changed. Only reads: rebuilding an analysis for show must not pin anything."""
    if not HARNESS_PIN.exists():
        return None
    shas = harness_shas(summary)
    pin, problem = read_json(HARNESS_PIN)
    if problem:
        die(f"{problem}; restore it, or delete it to pin the harness of the next run")
    changed = [f"{name} (sha256 {str(shas[name])[:8]} vs pinned {pin[name][:8]} from run {pin.get('pinned_by')})"
               if shas[name] else f"{name} (sha256 not recorded)" for name in HARNESS_FILES
               if pin.get(name) and shas[name] != pin[name]]
    return "; ".join(changed) or None


def new_run_id(commit, rows):
    taken = {r.get("run_id") for r in rows}
    base, n = commit[:7], 1
    while (run_id := base if n == 1 else f"{base}-{n}") in taken or (ARCHIVE_DIR / run_id).exists():
        n += 1
    return run_id


def make_row(capture, run_id, status, default_harness):
    """The results.tsv row. A run without a summary is assumed to share the latest run's harness."""
    s = capture.summary or {}

    def num(key, spec):
        return "" if s.get(key) is None else format(float(s[key]), spec)

    started = (s.get("timings") or {}).get("started_at")
    crashed = status == "crash"
    description = commit_subject(capture.commit)
    if (s.get("git") or {}).get("dirty"):
        description += " [uncommitted changes]"
    return {
        "commit": capture.commit[:7],
        "val_bpb": "0.000000" if crashed or s.get("val_bpb") is None else f"{s['val_bpb']:.6f}",
        "memory_gb": "0.0" if crashed or s.get("peak_vram_mb") is None else f"{s['peak_vram_mb'] / 1024:.1f}",
        "status": status, "description": description, "run_id": run_id, "outcome": capture.outcome,
        "harness": harness_key(s) or default_harness, "train_py_sha": ((s.get("git") or {}).get("train_py_sha256") or "")[:12],
        "num_steps": num("num_steps", ".0f"), "mfu_percent": num("mfu_percent", ".2f"),
        "training_seconds": num("training_seconds", ".1f"),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)) if started else "",
        "run_key": capture.key,
    }


def store_run(capture, run_id, best):
    """Copy the run's files into its directory (built aside, then renamed into place). record.json names
    the best that diff.patch is against, so a rebuilt analysis.md compares with the same run."""
    final, tmp = ARCHIVE_DIR / run_id, ARCHIVE_DIR / f".tmp-{run_id}"
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
    (tmp / RECORD_JSON).write_text(json.dumps({"run_key": capture.key, "commit": capture.commit,
                                               "outcome": capture.outcome, "notes": capture.notes,
                                               "best": best["run_id"] if best else None}, indent=2) + "\n")
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


# ---------------------------------------------------------------------------
# An archived run, loaded for analysis

@dataclass
class Run:
    id: str
    row: dict
    summary: dict | None
    metrics: Metrics | None
    notes: list
    best_id: str | None = None  # the best when it was archived, from record.json

    @property
    def dir(self):
        return ARCHIVE_DIR / self.id

    @property
    def bpb(self):
        return row_bpb(self.row)


def load_run(row):
    run_dir = ARCHIVE_DIR / row["run_id"]
    if not run_dir.is_dir():
        die(f"{run_dir} is missing although {RESULTS_TSV} lists it; restore the directory or delete its row")
    summary = read_json(run_dir / "run_summary.json")[0] if (run_dir / "run_summary.json").exists() else None
    record = read_json(run_dir / RECORD_JSON)[0] or {}
    metrics, metric_notes = (read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists()
                             else (None, []))
    return Run(row["run_id"], row, summary, metrics, record.get("notes", []) + metric_notes, record.get("best"))


@dataclass
class Context:
    """Everything one analysis.md is written from."""
    run: Run
    best: Run | None
    prev: Run | None
    history: list           # results.tsv rows up to and including this run
    diff: str
    noise: dict
    harness_change: str | None  # which of prepare.py / analyze.py differ from the pinned sha256
    uncommitted: tuple | None   # (sha256 as run, sha256 at the commit) of a train.py run with uncommitted changes


def noise_band(history, run_row):
    """val_bpb spread among runs of identical train.py under one harness, per sha and pooled."""
    groups = {}
    for r in comparable(history, run_row.get("harness")):
        if r.get("train_py_sha"):
            groups.setdefault(r["train_py_sha"], []).append(r)
    own = groups.get(run_row.get("train_py_sha"), [])
    repeated = {sha: g for sha, g in groups.items() if len(g) >= 2}
    pooled, runs, dof = pooled_std(repeated.values())
    outliers = {}  # run_id -> its group's median num_steps
    for g in repeated.values():
        outliers.update(step_outliers(g))
    return {"own": own, "by_sha": groups, "repeated": repeated, "pooled_std": pooled,
            "runs": runs, "dof": dof, "band": difference_band(pooled), "outliers": outliers}


def pooled_std(groups):
    """(pooled std of val_bpb, runs, degrees of freedom) over the groups of two or more runs."""
    groups = [np.array([row_bpb(r) for r in g]) for g in groups if len(g) >= 2]
    dof = sum(len(g) - 1 for g in groups)
    std = float(np.sqrt(sum(((g - g.mean()) ** 2).sum() for g in groups) / dof)) if dof else None
    return std, sum(len(g) for g in groups), dof


def row_steps(row):
    try:
        return float(row.get("num_steps", ""))
    except ValueError:
        return None


def step_outliers(group):
    """{run_id: the group's median num_steps} for the repeats off it by more than STEPS_OUTLIER: one
    train.py trained for fewer (a stall, a busy machine) or more steps, and its val_bpb moves with them."""
    steps = {r["run_id"]: row_steps(r) for r in group}
    known = [n for n in steps.values() if n is not None]
    if len(known) < 2:
        return {}
    median = float(np.median(known))
    return {run_id: median for run_id, n in steps.items() if n is not None and abs(n - median) > STEPS_OUTLIER * median}


def difference_band(std, n=1, m=1):
    """Band for the difference of a mean of n runs and a mean of m runs: its std is
    std x sqrt(1/n + 1/m), so one run against one other gets sqrt(2) x one run's std."""
    return None if std is None else NOISE_SIGMAS * std * np.sqrt(1 / n + 1 / m)


def build_context(run, rows):
    """Measured against what came before it, and against the best its diff.patch was written against
    (decisions taken since may have changed which run is best), so a rebuilt analysis.md reads as the
    original did."""
    history = rows[:rows.index(run.row) + 1]
    recorded = next((r for r in history[:-1] if run.best_id and r.get("run_id") == run.best_id), None)
    best_row = recorded or pick_best(history[:-1], run.row["harness"])
    prev_row = pick_previous(history[:-1], run.row["harness"])
    best = load_run(best_row) if best_row else None
    prev = best if prev_row is best_row else (load_run(prev_row) if prev_row else None)
    diff = (run.dir / "diff.patch").read_text() if (run.dir / "diff.patch").exists() else ""
    changed = check_harness(run.summary) if run.summary else None
    return Context(run, best, prev, history, diff, noise_band(history, run.row), changed,
                   uncommitted_train_py(run.summary))


# ---------------------------------------------------------------------------
# Curve analysis (pure functions of arrays)

def fmt(x, spec=".4f", unit=""):
    return "n/a" if x is None or not np.isfinite(x) else format(x, spec) + unit


def departure(a, b, points, threshold, hold):
    """Gap a-b at progress `points` (both curves interpolated) and the first index from which |gap|
    exceeds `threshold` (one per point) at `hold` consecutive points (None: never)."""
    (pa, va), (pb, vb) = a, b
    gap = np.interp(points, pa, va) - np.interp(points, pb, vb)
    over = np.abs(gap) > threshold
    start = next((i for i in range(len(points) - hold + 1) if over[i:i + hold].all()), None)
    return gap, start


def misalignment(curve, points, per_step):
    """The gap that a shift of one training step alone makes: |slope of the curve| x progress per step.
    Where the curve is steep (early training) two repeats of one train.py differ by this much."""
    p, v = curve
    return np.abs(np.interp(points + per_step / 2, p, v) - np.interp(points - per_step / 2, p, v))


def gap_trend(first, last):
    """How the gap went from the departure to the end of the comparison."""
    if np.sign(first) != np.sign(last):
        return "reverses (the sign flips after the departure)"
    ratio = abs(last) / abs(first)
    return "grows" if ratio > GAP_GROWS else "closes" if ratio < GAP_CLOSES else "steady"


def describe_departure(name, points, gap, start, base, slack, this, other):
    """One line: where a's curve leaves b's by more than base + slack (slack: the misalignment allowance)."""
    allowance = f"{base:.4f}, plus up to {np.max(slack):.4f} where the curve is steep, for one step of misalignment"
    peak = int(np.argmax(np.abs(gap)))  # a gap that rises and falls again: the ends alone hide its size
    largest = f"largest |gap| {gap[peak]:+.4f} at progress {points[peak]:.2f}"
    if start is None:
        return (f"- {name}: within the threshold of {other} at all {len(points)} points of progress "
                f"{points[0]:.2f}-{points[-1]:.2f} (threshold {allowance}); final gap {gap[-1]:+.4f}; {largest}")
    return (f"- {name}: departs from {other} at progress {points[start]:.2f} (gap {gap[start]:+.4f}, threshold "
            f"{base:.4f} + {slack[start]:.4f} for one step of misalignment); the gap goes {gap[start]:+.4f} -> "
            f"{gap[-1]:+.4f} from there to progress {points[-1]:.2f}, the last common point: "
            f"{gap_trend(gap[start], gap[-1])}; {largest}; {this} is {'ahead' if gap[-1] < 0 else 'behind'} at the end")


def loss_spikes(step, progress, loss):
    """Loss values far above the trailing window's median, in robust z-scores; consecutive spike
    steps are one event, reported at its peak."""
    if len(loss) <= SPIKE_WINDOW:
        return []
    x = np.where(np.isfinite(loss), loss, np.nan)
    windows = np.lib.stride_tricks.sliding_window_view(x[:-1], SPIKE_WINDOW)
    med = np.nanmedian(windows, axis=1)
    mad = np.nanmedian(np.abs(windows - med[:, None]), axis=1)
    scale = np.maximum(1.4826 * mad, 1e-3 * np.abs(med) + 1e-8)
    z = (x[SPIKE_WINDOW:] - med) / scale
    hits = np.flatnonzero(z > SPIKE_Z) + SPIKE_WINDOW
    events = []
    for i in hits:
        if events and i - events[-1][-1] <= 3:
            events[-1].append(i)
        else:
            events.append([i])
    out = []
    for ev in events:
        i = max(ev, key=lambda j: z[j - SPIKE_WINDOW])
        out.append({"step": int(step[i]), "progress": float(progress[i]), "loss": float(loss[i]),
                    "baseline": float(med[i - SPIKE_WINDOW]), "z": float(z[i - SPIKE_WINDOW])})
    return out


def last_tenth_trend(metrics):
    """Fitted change of train/loss over the last tenth of progress, as a fraction of the final loss.
    {"steps": n} alone when the tenth holds under TREND_MIN_STEPS steps: a line through a few noisy
    losses says nothing (7 steps read as "rising" while the smoothed loss was at its minimum)."""
    p, _, loss = metrics.series("train/loss") if "train/loss" in metrics.columns else metrics.smooth_loss
    keep = (p >= p.max() - 0.1) & np.isfinite(loss)
    steps = int(keep.sum())
    if steps < TREND_MIN_STEPS:
        return {"steps": steps}
    slope = np.polyfit(p[keep], loss[keep], 1)[0]
    change = slope * 0.1
    final = float(np.median(loss[keep][-max(steps // 10, 1):]))
    return {"steps": steps, "slope": float(slope), "change": float(change),
            "fraction": float(change / final) if final else 0.0, "window": (float(p.max() - 0.1), float(p.max()))}


# ---------------------------------------------------------------------------
# analysis.md: one function per section, each returns its text (or "" to leave it out)

def section_headline(ctx):
    run, s = ctx.run, ctx.run.summary or {}
    lines = [f"# Run {run.id}", "", "## Headline",
             f"- val_bpb **{fmt(run.bpb, '.6f')}**, status `{run.row['status']}`, outcome `{run.row['outcome']}`",
             f"- commit {run.row['commit']}: {run.row['description'] or '(no subject)'}; harness "
             f"{run.row['harness'] or 'unknown'}; {run.row.get('num_steps') or 'n/a'} steps, "
             f"{fmt(s.get('training_seconds'), '.1f')} s training, peak VRAM "
             f"{fmt(None if s.get('peak_vram_mb') is None else s['peak_vram_mb'] / 1024, '.1f', ' GiB')}"]
    for label, other in (("best", ctx.best), ("previous", ctx.prev)):
        if other is None:
            lines.append(f"- vs {label}: no earlier comparable run")
        elif run.bpb is not None:
            delta = run.bpb - other.bpb
            lines.append(f"- vs {label} ({other.id}, {other.bpb:.6f}): {delta:+.6f} "
                         f"({'better' if delta < 0 else 'worse' if delta > 0 else 'equal'})")
    lines.append(f"- verdict, this run alone: {verdict(ctx)}")
    lines += mean_verdict(ctx)
    if ctx.uncommitted:
        ran, committed = ctx.uncommitted
        lines.append(f"- [uncommitted changes]: train.py as run (sha256 {ran[:8]}) is not commit {run.row['commit']}'s "
                     f"(sha256 {committed[:8]}); no commit holds the code measured, and `status keep` refuses this run")
    if ctx.harness_change:
        lines.append(f"- harness changed since it was pinned: {ctx.harness_change}. The run is `invalid` "
                     "(or a crash) and is never the best")
    lines += [f"- note: {n}" for n in run.notes]
    return "\n".join(lines)


def verdict(ctx):
    run, band = ctx.run, ctx.noise["band"]
    if run.bpb is None:
        return "no val_bpb (the run did not finish)"
    if run.row["status"] == "invalid":
        return "not comparable: the harness changed (see below)"
    if ctx.best is None:
        return "first comparable run: nothing to beat yet"
    delta = run.bpb - ctx.best.bpb
    if band is None:
        return f"{delta:+.6f} against the best; the noise band is unknown, so its significance is unknown"
    basis = f"+-{band:.6f} from {ctx.noise['runs']} runs, {ctx.noise['dof']} degrees of freedom"
    if ctx.noise["outliers"]:
        basis += f"; {len(ctx.noise['outliers'])} of them outliers on steps, see Noise"
    if abs(delta) <= band:
        return f"{delta:+.6f} against the best lies within the noise band ({basis})"
    return (f"{delta:+.6f} against the best is {'an improvement' if delta < 0 else 'a regression'} "
            f"beyond the noise band ({basis})")


def mean_verdict(ctx):
    """Mean val_bpb of this train.py's runs against the mean of the best's, once either is repeated:
    the difference of an N-run and an M-run mean has std pooled_std x sqrt(1/N + 1/M)."""
    run, best, noise = ctx.run, ctx.best, ctx.noise
    if run.bpb is None or best is None or run.row["status"] == "invalid":
        return []
    own, ref = noise["own"], noise["by_sha"].get(best.row.get("train_py_sha"), [])
    if not own or not ref or max(len(own), len(ref)) < 2:
        return []
    mean, ref_mean = np.mean([row_bpb(r) for r in own]), np.mean([row_bpb(r) for r in ref])
    if own is ref:
        return [f"- mean val_bpb of this train.py's {len(own)} run(s): {mean:.6f} (the best's train.py is the same)"]
    delta, pooled = mean - ref_mean, noise["pooled_std"]
    line = (f"- verdict, means of repeated runs ({len(own)} vs {len(ref)}): mean val_bpb of this train.py's "
            f"{len(own)} run(s) {mean:.6f}, of the best's train.py's {len(ref)} run(s) {ref_mean:.6f}; "
            f"difference {delta:+.6f}")
    if pooled is None:
        return [line + "; the noise band for a difference of means is unknown"]
    band = difference_band(pooled, len(own), len(ref))
    basis = f"+-{band:.6f} = {NOISE_SIGMAS:g} x pooled std {pooled:.6f} x sqrt(1/{len(own)} + 1/{len(ref)})"
    if abs(delta) <= band:
        return [f"{line}: within the band for a difference of means ({basis})"]
    return [f"{line}: {'an improvement' if delta < 0 else 'a regression'} beyond the band for a difference "
            f"of means ({basis})"]


def section_crash(ctx):
    run = ctx.run
    if run.row["status"] != "crash":
        return ""
    error = (run.summary or {}).get("error")
    if not error and (run.dir / "run.log").exists():
        error = traceback_tail((run.dir / "run.log").read_text(errors="replace"))
    return "\n".join(["## Crash", f"- outcome `{run.row['outcome']}`; the error's tail "
                      f"({'from run_summary.json' if (run.summary or {}).get('error') else 'from run.log'}):",
                      "```", (error or "(no error text: run.log is empty or missing)").rstrip(), "```"])


def traceback_tail(log, max_lines=30):
    lines = log.rstrip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    tail = lines[starts[-1]:] if starts else lines
    return "\n".join(tail[-max_lines:])


def section_changes(ctx):
    best = ctx.best
    if best is None:
        return "## What changed\n- no earlier comparable run: diff.patch is empty"
    lines = [f"## What changed (against best {best.id})"]
    if ctx.run.summary and best.summary:
        lines += config_diff((best.summary.get("config") or {}), (ctx.run.summary.get("config") or {}))
    else:
        lines.append("- config: unknown (a run has no summary)")
    lines += diff_summary(ctx.diff)
    return "\n".join(lines)


def config_diff(old, new):
    changed = [f"  - {k}: {old[k]!r} -> {new[k]!r}" for k in old if k in new and old[k] != new[k]]
    added = [f"  - {k} = {new[k]!r} (new)" for k in new if k not in old]
    removed = [f"  - {k} (removed; was {old[k]!r})" for k in old if k not in new]
    body = changed + added + removed
    return ["- config: identical"] if not body else ["- config:"] + body


def diff_summary(patch, label="diff.patch", same="train.py is identical to the best commit's"):
    """Counts, then the changed lines of the first hunks (a hunk header's own text is whatever line
    precedes the hunk, e.g. WINDOW_PATTERN for a MATRIX_LR change, so it is not shown)."""
    if not patch.strip():
        return [f"- {label}: {same}"]
    hunks = diff_hunks(patch)
    changed = [line for _, body in hunks for line in body]
    added, removed = sum(line[0] == "+" for line in changed), sum(line[0] == "-" for line in changed)
    lines = [f"- {label}: +{added} -{removed} lines in train.py, {len(hunks)} hunk(s)"
             + (f"; the first {DIFF_HUNKS} shown" if len(hunks) > DIFF_HUNKS else "")]
    shown = []
    for first_line, body in hunks[:DIFF_HUNKS]:
        body = [line for line in body if line[1:].strip()]
        preview = hunk_preview(body)
        shown.append(f"@@ line {first_line} @@")
        shown += [line if len(line) <= DIFF_LINE_CHARS else line[:DIFF_LINE_CHARS - 3] + "..." for line in preview]
        if len(body) > len(preview):
            shown.append(f"  ({len(body) - len(preview)} more changed lines)")
    return lines + ["```diff", *shown, "```"]


def hunk_preview(body, budget=DIFF_HUNK_LINES):
    """The first removed and the first added lines of a hunk, half the budget each when both sides
    are long: a rewritten block lists all its removals before its additions."""
    removed, added = [line for line in body if line[0] == "-"], [line for line in body if line[0] == "+"]
    n_removed = min(len(removed), max(budget // 2, budget - len(added)))
    return removed[:n_removed] + added[:budget - n_removed]


def diff_hunks(patch):
    """[(first line in the new train.py, [changed lines])] for each hunk of a one-file unified diff; its
    ---/+++ header lines come before the first hunk."""
    hunks = []
    for line in patch.splitlines():
        if line.startswith("@@"):
            match = re.match(r"@@ -\d+(?:,\d+)? \+(\d+)", line)
            hunks.append((int(match.group(1)) if match else 0, []))
        elif hunks and line.startswith(("+", "-")):
            hunks[-1][1].append(line)
    return hunks


def section_trajectory(ctx):
    m = ctx.run.metrics
    if m is None or "train/loss_smooth" not in m:
        return "## Trajectory\n- no training loss recorded"
    p, step, smooth = m.smooth_loss
    finite = np.isfinite(smooth)
    if not finite.any():
        return "## Trajectory\n- every smoothed loss value is NaN or inf"
    i_min = int(np.nanargmin(np.where(finite, smooth, np.nan)))
    last = np.flatnonzero(finite)[-1]
    lines = ["## Trajectory",
             f"- smoothed loss: first {smooth[finite][0]:.4f} (step {int(step[finite][0])}), final {smooth[last]:.4f} "
             f"(step {int(step[last])}, progress {p[last]:.2f}), minimum {smooth[i_min]:.4f} "
             f"(step {int(step[i_min])}, progress {p[i_min]:.2f})"]
    trend = last_tenth_trend(m)
    if "slope" not in trend:
        lines.append(f"- last tenth of training: {trend['steps']} steps, too few to call a trend "
                     f"(a fit needs {TREND_MIN_STEPS})")
    else:
        falling = trend["fraction"] < -PLATEAU_DROP
        stop = "when time ran out" if ctx.run.row.get("outcome") == "ok" else "when it stopped"
        state = (f"still improving {stop}" if falling else
                 "rising at the end" if trend["fraction"] > PLATEAU_DROP else "plateaued")
        lines.append(f"- last tenth of training: fitted change {trend['change']:+.4f} over {trend['steps']} steps "
                     f"({100 * trend['fraction']:+.2f}% of the loss; slope {trend['slope']:+.3f} per unit progress): "
                     f"{state}")
        lines += warmdown_note(m, trend["window"], falling)
    return "\n".join(lines)


def warmdown_note(m, window, falling):
    """The LR multiplier across the last tenth: a warmdown lowers the loss there by itself."""
    p, _, lr = m.series("train/lr_multiplier")
    ok = np.isfinite(lr)
    if ok.sum() < 2:
        return []
    start, end = np.interp(window, p[ok], lr[ok])
    if end >= start:
        return []
    return [f"- LR multiplier over that window: {start:.3f} -> {end:.3f}"
            + ("; part of the fall is this annealing" if falling else "")]


def section_departure(ctx):
    run, best = ctx.run, ctx.best
    if best is None or best.metrics is None or run.metrics is None:
        return "## Where it departs from the best\n- no comparison: " + (
            "no earlier comparable run" if best is None else "a run has no metrics")
    lines = [f"## Where it departs from the best ({best.id}), aligned on training progress"]
    lines += compare_curves(run.metrics, best.metrics, ctx.noise["band"], "this run", "the best")
    return "\n".join(lines)


def compare_curves(a, b, val_band, this, other):
    """Loss and in-training val/bpb of a against b, on training progress from the later of the two
    runs' first counted step. Each point's threshold is the noise plus the gap that one step of
    misalignment makes there (the larger of the two runs' progress per step)."""
    lo = max(a.start, b.start)
    per_step = max(a.progress_per_step or 0.0, b.progress_per_step or 0.0)
    lines = []
    if "train/loss_smooth" in a and "train/loss_smooth" in b:
        ca, cb = finite(a.smooth_loss), finite(b.smooth_loss)
        hi = min(ca[0].max(initial=0.0), cb[0].max(initial=0.0))
        if hi > lo:
            points = np.linspace(lo, hi, GRID_POINTS)
            lines.append(compare_line("train loss (smoothed)", ca, cb, points, loss_threshold(a, b), per_step,
                                      DEPARTURE_HOLD, this, other))
        else:
            lines.append("- train loss (smoothed): no overlap in training progress to compare")
    if "val/bpb" in a.columns and "val/bpb" in b.columns:
        ca, cb = finite(a.series("val/bpb")), finite(b.series("val/bpb"))
        hi = min(ca[0].max(initial=0.0), cb[0].max(initial=0.0))
        points = ca[0][(ca[0] >= lo) & (ca[0] <= hi)]  # this run's own val points, not interpolated ones
        if len(points) >= VAL_DEPARTURE_HOLD:
            lines.append(compare_line("in-training val/bpb", ca, cb, points, val_band or VAL_BPB_TOLERANCE, per_step,
                                      VAL_DEPARTURE_HOLD, this, other)
                         + ("" if val_band else f" (base threshold {VAL_BPB_TOLERANCE} while the noise band is unknown)"))
        else:
            lines.append(f"- in-training val/bpb: {len(points)} val point(s) after the warm-up in common: too few to compare")
    return (lines or ["- no curves in common"]) + stall_note([(this, a), (other, b)])


def stall_note(runs):
    """Stalls of either run by progress: a stall spends budget without training, so the stalled run's
    curve lags on the progress axis from there, and the gap's shape may come from it."""
    found = []
    for label, m in runs:
        slow = m.stalls
        if slow:
            found.append(f"{label}: {len(slow)} at progress {slow[0][1]:.2f}-{slow[-1][1]:.2f} "
                         f"({sum(ms for _, _, ms in slow) / 1000:.1f} s in them)")
    return [f"- stalls (counted step > {STALL_FACTOR:g}x median): {'; '.join(found)}"] if found else []


def finite(series):
    """(progress, values) of a Metrics series without its NaN/inf values."""
    p, _, v = series
    ok = np.isfinite(v)
    return p[ok], v[ok]


def loss_threshold(a, b):
    """DEPARTURE_SIGMAS x the noise of the difference of two smoothed losses."""
    noise = [n for n in (a.loss_noise, b.loss_noise) if n is not None]
    ema_factor = np.sqrt((1 - SMOOTH_BETA) / (1 + SMOOTH_BETA))  # an EMA shrinks white noise by this
    sigma = float(np.sqrt(np.mean(np.square(noise)) * 2)) * ema_factor if noise else 0.0
    return max(DEPARTURE_SIGMAS * sigma, 1e-4)


def compare_line(name, ca, cb, points, base, per_step, hold, this, other):
    slack = misalignment(cb, points, per_step)
    gap, start = departure(ca, cb, points, base + slack, hold)
    return describe_departure(name, points, gap, start, base, slack, this, other)


def section_stability(ctx):
    m = ctx.run.metrics
    if m is None:
        return "## Stability\n- no metrics"
    lines = ["## Stability"]
    if "train/loss" in m.columns:
        p, step, loss = m.series("train/loss")
        spikes = loss_spikes(step, p, loss)
        lines.append(f"- loss spikes (robust z > {SPIKE_Z:g} against the trailing {SPIKE_WINDOW} steps): "
                     + ("none" if not spikes else f"{len(spikes)}"))
        lines += [f"  - step {e['step']} (progress {e['progress']:.2f}): loss {e['loss']:.4f} vs {e['baseline']:.4f} "
                  f"typical ({e['loss'] - e['baseline']:+.4f}, z {e['z']:.1f})" for e in spikes[:10]]
    bad = []
    for key, (idx, values) in m.columns.items():
        nonfinite = ~np.isfinite(values)
        if nonfinite.any():
            bad.append(f"{key} from step {int(m.step[idx[nonfinite][0]])} ({int(nonfinite.sum())} rows)")
    lines.append("- NaN/inf: " + ("none" if not bad else "; ".join(bad[:8]) + (" ..." if len(bad) > 8 else "")))
    return "\n".join(lines)


def section_throughput(ctx):
    m, s = ctx.run.metrics, ctx.run.summary or {}
    lines = ["## Throughput"]
    stats = throughput_stats(m) if m is not None else {}
    if stats:
        lines.append(f"- counted steps (progress > 0): step time median {stats['step_ms']:.1f} ms (p90 "
                     f"{stats['p90_ms']:.1f}); tokens/s median {fmt(stats['tokens_per_sec'], ',.0f')}; MFU median "
                     f"{fmt(stats['mfu'], '.2f', '%')} (summary {fmt(s.get('mfu_percent'), '.2f', '%')})")
        slow = stats["stalls"]
        lines.append(f"- stalls (counted step > {STALL_FACTOR:g}x median): " + ("none" if not slow else
                     f"{len(slow)}: " + ", ".join(f"step {st} ({ms:.0f} ms)" for st, _, ms in slow[:8])))
    timings = {k: v for k, v in (s.get("timings") or {}).items() if k not in ("started_at", "finished_at")}
    spent = [f"{k} {v:.1f} s" for k, v in timings.items() if isinstance(v, (int, float))]
    spent += [f"{k} {s[k]:.1f} s" for k in ("training_seconds", "total_seconds") if s.get(k) is not None]
    lines.append("- time: " + (", ".join(spent) if spent else "no timings in the summary"))
    if ctx.best is not None and ctx.best.metrics is not None and stats:
        lines += throughput_vs_best(ctx, stats, throughput_stats(ctx.best.metrics))
    return "\n".join(lines)


def throughput_vs_best(ctx, stats, ref):
    """Step time and tokens/s against the best: a halved batch halves the step time while tokens/s falls."""
    if not ref:
        return []
    steps = (ctx.run.summary or {}).get("num_steps", "n/a"), (ctx.best.summary or {}).get("num_steps", "n/a")
    line = (f"- vs best ({ctx.best.id}): step time {stats['step_ms']:.1f} vs {ref['step_ms']:.1f} ms "
            f"({100 * (stats['step_ms'] / ref['step_ms'] - 1):+.1f}%)")
    tok, ref_tok = stats["tokens_per_sec"], ref["tokens_per_sec"]
    if tok is not None and ref_tok:
        line += f"; tokens/s {tok:,.0f} vs {ref_tok:,.0f} ({100 * (tok / ref_tok - 1):+.1f}%)"
    return [line + f"; steps {steps[0]} vs {steps[1]}"]


def counted(m, key):
    """(progress, step, values) of `key` over the counted training steps, finite values only. The
    warm-up/compile steps sit at progress 0, outside the budget (the summary's warmup_s)."""
    p, step, v = m.series(key)
    ok = (p > 0) & np.isfinite(v)
    return p[ok], step[ok], v[ok]


def throughput_stats(m):
    """Medians over the counted training steps: step time, tokens/s, MFU; and the stalls among them."""
    ms = counted(m, "perf/step_time_ms")[2]
    if not len(ms):
        return {}

    def median_of(key):
        values = counted(m, key)[2]
        return float(np.median(values)) if len(values) else None

    return {"step_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)),
            "tokens_per_sec": median_of("perf/tokens_per_sec"), "mfu": median_of("perf/mfu_percent"),
            "stalls": m.stalls}


def section_layers(ctx):
    """Each layer against the best's same layer when the best logged layers: layers differ by design
    (value-embedding blocks carry ~6x the gradient norm), so only a change from the best is news.
    Without a best, each layer against the same module in the other blocks."""
    m = ctx.run.metrics
    stats = m.layer_keys() if m is not None else {}
    if not stats:
        return "## Per-layer health\n- no layer/ keys in metrics.jsonl"
    best = ctx.best.metrics if ctx.best is not None else None
    ref = best.layer_keys() if best is not None else {}
    if ref:
        lines = [f"## Per-layer health (median over the second half of training, this run / best {ctx.best.id}'s "
                 f"same layer; listed beyond {LAYER_BEST_RATIO:g}x or below {1 / LAYER_BEST_RATIO:g}x, "
                 f"at most {LAYER_SHOWN} per stat, the largest first)"]
    else:
        lines = [f"## Per-layer health (median over the second half of training; a layer stands out at "
                 f"{LAYER_OUTLIER_RATIO:g}x above or below the median of the same module in other blocks; "
                 f"at most {LAYER_SHOWN} per stat, the largest first)"]
    for stat, names in sorted(stats.items()):
        values = layer_medians(m, names)
        if ref:
            found = layers_vs_best(values, layer_medians(best, ref.get(stat, {})))
            missing = len(set(values) - set(ref.get(stat, {})))
            head = f"- {stat} ({len(values)} layers" + (f", {missing} not in the best" if missing else "") + "): "
            empty = f"none beyond {LAYER_BEST_RATIO:g}x or below {1 / LAYER_BEST_RATIO:g}x of the best"
        else:
            found, head, empty = layer_outliers(values), f"- {stat} ({len(values)} layers): ", "nothing stands out"
        more = f"; {len(found) - LAYER_SHOWN} more" if len(found) > LAYER_SHOWN else ""
        lines.append(head + ("; ".join(found[:LAYER_SHOWN]) + more if found else empty))
    return "\n".join(lines)


def layer_medians(m, names):
    """{name: median over the second half of training}, NaN when a value there is NaN/inf."""
    values = {}
    for name, key in names.items():
        p, _, v = m.series(key)
        v = v[p >= 0.5 * p.max()] if len(p) else v
        values[name] = float(np.median(v)) if len(v) and np.isfinite(v).all() else float("nan")
    return values


def layers_vs_best(values, ref):
    """NaN/inf layers, then the layers whose ratio to the best's same layer is beyond LAYER_BEST_RATIO,
    the largest first."""
    out = [f"{name} is NaN/inf" for name, v in values.items() if not np.isfinite(v)]
    ratios = {name: v / ref[name] for name, v in values.items()
              if np.isfinite(v) and v > 0 and np.isfinite(ref.get(name, np.nan)) and ref[name] > 0}
    far = [n for n, r in ratios.items() if r > LAYER_BEST_RATIO or r < 1 / LAYER_BEST_RATIO]
    far.sort(key=lambda n: -abs(np.log(ratios[n])))
    return out + [f"{n} at {ratios[n]:.2f}x ({values[n]:.3g} vs {ref[n]:.3g})" for n in far]


def layer_outliers(values):
    """Compare each layer with the same module in the other blocks: '3.attn.c_q' is grouped with
    'attn.c_q' of every other block, a bare block index with the other blocks. The largest first."""
    groups = {}
    for name, value in values.items():
        head, _, rest = name.partition(".")
        groups.setdefault(rest if head.isdigit() else name, []).append((name, value))
    out, found = [], []
    for members in groups.values():
        out += [f"{name} is NaN/inf" for name, v in members if not np.isfinite(v)]
        finite = [(name, v) for name, v in members if np.isfinite(v) and v > 0]
        if len(finite) < 3:
            continue
        for name, v in finite:
            median = float(np.median([w for other, w in finite if other != name]))
            if v > LAYER_OUTLIER_RATIO * median or v < median / LAYER_OUTLIER_RATIO:
                found.append((abs(np.log(v / median)),
                              f"{name} {v:.3g} ({v / median:.1f}x the median {median:.3g} of the other blocks)"))
    return out + [text for _, text in sorted(found, key=lambda f: -f[0])]


def section_noise(ctx):
    noise, sha = ctx.noise, ctx.run.row.get("train_py_sha") or "unknown"
    own = noise["own"]
    lines = ["## Noise"]
    if len(own) >= 2:
        vals = np.array([row_bpb(r) for r in own])
        lines.append(f"- this train.py (sha256 {sha[:8]}): {len(own)} runs ({', '.join(r['run_id'] for r in own)}); "
                     f"val_bpb mean {vals.mean():.6f}, std {vals.std(ddof=1):.6f}, range {np.ptp(vals):.6f}")
    else:
        lines.append(f"- this train.py (sha256 {sha[:8]}): {len(own)} run(s) under this harness")
    if noise["band"] is None:
        lines.append("- noise band: unknown, fewer than two runs of an identical train.py under this harness. "
                     "Rerunning an unchanged commit measures it; each rerun is archived as <commit7>-2, -3, ...")
    else:
        lines.append(f"- noise band: +-{noise['band']:.6f} ({NOISE_SIGMAS:g} x sqrt(2) x pooled std "
                     f"{noise['pooled_std']:.6f}: one run against one best run; estimated from {noise['runs']} runs "
                     f"of {len(noise['repeated'])} repeated train.py version(s), {noise['dof']} degrees of freedom):")
        lines += noise_runs(ctx)
        lines += band_without_outliers(noise)
    return "\n".join(lines)


def noise_runs(ctx):
    """The runs the band is estimated from, per train.py. Stalls are counted only for the runs this
    analysis loads anyway (this run, the best, the previous one): reading every repeat would make the
    cost grow with history."""
    loaded = {r.id: r.metrics for r in (ctx.run, ctx.best, ctx.prev) if r is not None and r.metrics is not None}
    outliers = ctx.noise["outliers"]
    lines = []
    for sha, group in ctx.noise["repeated"].items():
        runs = []
        for r in group:
            steps = row_steps(r)
            text = f"{r['run_id']} {row_bpb(r):.6f}, {fmt(steps, '.0f')} steps"
            if r["run_id"] in outliers:
                text += f" (outlier on steps: {steps:.0f} steps vs the group's median {outliers[r['run_id']]:g})"
            if r["run_id"] in loaded:
                slow = loaded[r["run_id"]].stalls
                text += f", {len(slow)} stall(s) ({sum(ms for _, _, ms in slow) / 1000:.1f} s)" if slow else ", no stalls"
            runs.append(text)
        lines.append(f"  - train.py {sha[:8]}: " + "; ".join(runs))
    return lines


def band_without_outliers(noise):
    """The same estimate without the outliers on steps, beside the band rather than in its place."""
    if not noise["outliers"]:
        return []
    clean = [[r for r in g if r["run_id"] not in noise["outliers"]] for g in noise["repeated"].values()]
    std, runs, dof = pooled_std(clean)
    head = f"- without the {len(noise['outliers'])} outlier(s) on steps: "
    if std is None:
        return [head + "no train.py version keeps two runs, so no band"]
    return [head + f"+-{difference_band(std):.6f} (pooled std {std:.6f}, {runs} runs, {dof} degrees of freedom)"]


def section_lineage(ctx, max_rows=25):
    kept = [r for r in comparable(ctx.history, ctx.run.row["harness"]) if r["status"] == "keep"]
    if not kept:
        return "## Lineage of kept runs\n- nothing kept yet under this harness"
    lines = ["## Lineage of kept runs", "| run | commit | val_bpb | change | description |", "|---|---|---|---|---|"]
    prev = None
    rows = []
    for r in kept:
        change = "" if prev is None else "rerun" if same_code(r, prev) else f"{row_bpb(r) - row_bpb(prev):+.6f}"
        rows.append(f"| {r['run_id']} | {r['commit']} | {row_bpb(r):.6f} | {change} | {r['description'][:70]} |")
        prev = r
    if len(rows) > max_rows:
        lines.append(f"| ... | {len(rows) - max_rows} earlier kept runs | | | |")
    return "\n".join(lines + rows[-max_rows:])


def same_code(a, b):
    """Two rows ran the same train.py: the same sha256 where both recorded one, else the same commit."""
    if a.get("train_py_sha") and b.get("train_py_sha"):
        return a["train_py_sha"] == b["train_py_sha"]
    return a["commit"] == b["commit"]


def section_files(ctx):
    run = ctx.run
    files = sorted({p.name for p in run.dir.iterdir()} | {"analysis.md"})
    lines = ["## Files", f"- this run: {run.dir}/ ({', '.join(files)})"]
    lines += [f"- {label}: {other.dir}/" for label, other in (("best", ctx.best), ("previous", ctx.prev)) if other]
    if run.metrics is not None:
        plain = [k for k in run.metrics.keys if not k.startswith("layer/")]
        lines.append(f"- metrics.jsonl keys: {', '.join(plain)}")
        layers = run.metrics.layer_keys()
        if layers:
            names = {n for v in layers.values() for n in v}
            example = next(iter(next(iter(layers.values())).values()))
            lines.append(f"- per-layer keys: layer/<name>/<stat>, {len(names)} names x stats "
                         f"{', '.join(sorted(layers))} (e.g. {example})")
        lines.append(f"- load: `pandas.read_json('{run.dir / 'metrics.jsonl'}', lines=True)`; "
                     f"the run list is {RESULTS_TSV} (tab-separated)")
    return "\n".join(lines)


def section_agent_notes(ctx):
    return "## Agent notes\n"


SECTIONS = (section_headline, section_crash, section_changes, section_trajectory, section_departure,
            section_stability, section_throughput, section_layers, section_noise, section_lineage,
            section_files, section_agent_notes)


def write_analysis(ctx):
    text = "\n\n".join(t for t in (section(ctx) for section in SECTIONS) if t)
    write_atomic(ctx.run.dir / "analysis.md", text)
    return text


# ---------------------------------------------------------------------------
# Plots: one table, one overlay helper

PLOTS = (  # (metric key, panel title, file): one figure per file, one panel per row
    ("train/loss_smooth", "training loss (smoothed)", "loss.png"),
    ("val/bpb", "validation bpb (in-training slice)", "val_bpb.png"),
    ("train/lr_multiplier", "LR multiplier", "schedules.png"),
    ("train/muon_momentum", "Muon momentum", "schedules.png"),
    ("train/weight_decay", "weight decay", "schedules.png"),
    ("perf/mfu_percent", "MFU (%)", "throughput.png"),
    ("perf/step_time_ms", "step time (ms)", "throughput.png"),
)
STYLES = ({"color": "C0", "lw": 1.6}, {"color": "C2", "lw": 1.2, "ls": "--"}, {"color": "C7", "lw": 1.0, "ls": ":"})


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def overlay(ax, key, title, curves):
    """curves: [(label, Metrics)], drawn against training progress. The y range ignores the first
    tenth of training so that the initial loss does not flatten the part that matters."""
    top, bottom = [], []
    for (label, m), style in zip(curves, STYLES):
        p, _, v = m.series(key)
        ok = np.isfinite(v)
        if not ok.any():
            continue
        p, v = thin(p[ok], v[ok])
        ax.plot(p, v, label=label, marker="o" if len(v) < 30 else None, ms=3, **style)
        late = v[p >= 0.1]
        top.append((late if len(late) else v).max())
        bottom.append(v.min())
    if top:
        lo, hi = min(bottom), max(top)
        pad = 0.05 * (hi - lo) or 0.05 * abs(hi) or 0.05
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("training progress (fraction of the time budget)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def thin(x, y, points=PLOT_POINTS):
    """At most `points` bin medians: a noisy 5000-step line would make a PNG of megabytes."""
    if len(x) <= points:
        return x, y
    k = -(-len(x) // points)
    n = len(x) // k * k
    return (np.append(np.median(x[:n].reshape(-1, k), axis=1), x[-1]),
            np.append(np.median(y[:n].reshape(-1, k), axis=1), y[-1]))


def draw_overlays(out_dir, curves):
    """One PNG per file of PLOTS, panels only for keys some run holds. Returns the files written."""
    plt = pyplot()
    curves = [(label, m) for label, m in curves if m is not None]
    written = []
    for file in dict.fromkeys(row[2] for row in PLOTS):
        panels = [(key, title) for key, title, f in PLOTS if f == file and any(key in m for _, m in curves)]
        if not panels:
            continue
        fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * len(panels)), squeeze=False)
        for ax, (key, title) in zip(axes[:, 0], panels):
            overlay(ax, key, title, [(label, m) for label, m in curves if key in m])
        fig.tight_layout()
        fig.savefig(Path(out_dir) / file, dpi=PLOT_DPI)
        plt.close(fig)
        written.append(file)
    return written


def draw_layer_heatmap(out_dir, m, stat="grad_norm"):
    """log10 of one per-layer stat: layers (by block, then module) against training progress."""
    names = (m.layer_keys() if m is not None else {}).get(stat)
    if not names:
        return []
    plt = pyplot()
    order = sorted(names, key=lambda n: (int(n.split(".")[0]) if n.split(".")[0].isdigit() else -1, n))
    series = [m.series(names[n]) for n in order]
    lo, hi = min(p.min() for p, _, _ in series), max(p.max() for p, _, _ in series)
    if hi <= lo:  # one logging point: no progress axis to draw
        return []
    columns = np.linspace(lo, hi, min(GRID_POINTS, max(len(p) for p, _, _ in series)))
    with np.errstate(divide="ignore", invalid="ignore"):
        grid = np.array([np.interp(columns, p, np.log10(np.where(v > 0, v, np.nan))) for p, _, v in series])
    fig, ax = plt.subplots(figsize=(7, min(8.0, 1.5 + 0.12 * len(order))))
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis",
                      extent=(lo, hi, len(order) - 0.5, -0.5))
    every = -(-len(order) // 32)  # at most ~32 labels: text is the slow part of drawing
    ax.set_yticks(range(0, len(order), every), order[::every], fontsize=7)
    ax.set_xlabel("training progress", fontsize=8)
    ax.set_title(f"log10 {stat} per layer", fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(Path(out_dir) / f"layers_{stat}.png", dpi=PLOT_DPI)
    plt.close(fig)
    return [f"layers_{stat}.png"]


def draw_progress(rows):
    """val_bpb of every run of the latest harness, in order; kept runs labelled; the current best's val_bpb
    as steps (it may step up when a simplification is kept)."""
    harness = latest_harness(rows)
    pool = {id(r) for r in comparable(rows, harness)}
    points = [(i, r) for i, r in enumerate(rows) if id(r) in pool]
    if not points:
        return
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    xs, ys = [i for i, _ in points], [row_bpb(r) for _, r in points]
    ax.scatter(xs, ys, s=12, color="0.6", label="pending / discarded")
    kept = [(i, r) for i, r in points if r["status"] == "keep"]
    if kept:
        ax.scatter([i for i, _ in kept], [row_bpb(r) for _, r in kept], s=30, color="C2", zorder=3, label="kept")
        for i, r in kept:
            ax.annotate(r["description"][:28] or r["commit"], (i, row_bpb(r)), fontsize=6, rotation=20,
                        xytext=(3, 3), textcoords="offset points")
    best = [np.nan if b is None else row_bpb(b) for b in best_after_each([r for _, r in points])]
    ax.step(xs + [len(rows) - 1], best + best[-1:], where="post", color="C2", lw=1, label="current best (last kept)")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_xlabel("run (order archived)")
    ax.set_ylabel("val_bpb")
    ax.set_title(f"val_bpb per run, harness {harness}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = PROGRESS_PNG.with_name(f".progress.png.{os.getpid()}.tmp")
    fig.savefig(tmp, dpi=PLOT_DPI, format="png")
    plt.close(fig)
    os.replace(tmp, PROGRESS_PNG)


def report(run, rows):
    """analysis.md and the plots of one archived run; returns the analysis text. Callers hold the lock."""
    remove_leftovers(run.dir)
    ctx = build_context(run, rows)
    if run.metrics is not None:  # a run without curves gets no plots of other runs' curves
        others = [("best", ctx.best)] + ([("previous", ctx.prev)] if ctx.prev is not ctx.best else [])
        curves = [(f"this ({run.id})", run.metrics)]
        curves += [(f"{label} ({other.id})", other.metrics) for label, other in others if other is not None]
        draw_overlays(run.dir, curves)
        draw_layer_heatmap(run.dir, run.metrics)
    return write_analysis(ctx)


# ---------------------------------------------------------------------------
# Commands

def cmd_archive():
    head = head_commit()
    if not Path("run_summary.json").exists() and not Path("run.log").exists():
        die(f"nothing to archive in {Path.cwd()}: no run_summary.json and no run.log "
            "(train.py writes the first, `uv run train.py > run.log 2>&1` the second)")
    with archive_lock():
        remove_leftovers(ARCHIVE_DIR)
        rows = read_results()
        capture = capture_run(head, rows)
        row = next((r for r in rows if r.get("run_key") == capture.key), None)
        if row is not None and (ARCHIVE_DIR / row["run_id"] / "analysis.md").exists():
            print(f"already archived as {row['run_id']}: {ARCHIVE_DIR / row['run_id'] / 'analysis.md'} (nothing added)")
            return 0
        if row is None:
            row = record_run(capture, rows)
            rows.append(row)
            write_results(rows)  # the record is safe from here on; analysis and plots follow
            if capture.summary is not None:
                pin_harness(capture.summary, row["run_id"])
        text = report(load_run(row), rows)
        draw_progress(rows)
    print(text.split("\n\n## ")[1])
    print(f"archived as {row['run_id']}: {ARCHIVE_DIR / row['run_id'] / 'analysis.md'}")
    return 0


def record_run(capture, rows):
    """The results.tsv row of a run not yet in it, storing its directory unless an earlier invocation,
    killed before writing results.tsv (or whose row was torn), already did."""
    run_id = stored_run_id(capture) or new_run_id(capture.commit, rows)
    harness_changed = check_harness(capture.summary) if capture.summary else None
    status = ("crash" if capture.outcome != "ok" or capture.summary.get("val_bpb") is None
              else "invalid" if harness_changed else "pending")
    row = make_row(capture, run_id, status, latest_harness(rows))
    if not (ARCHIVE_DIR / run_id).exists():
        store_run(capture, run_id, pick_best(rows, row["harness"]))
    return row


def stored_run_id(capture):
    """The id of a run directory <commit7>* that already holds this run, or None."""
    for run_dir in sorted(ARCHIVE_DIR.glob(f"{capture.commit[:7]}*")):
        record = read_json(run_dir / RECORD_JSON)[0] or {}
        if record.get("run_key") == capture.key:
            return run_dir.name
    return None


def cmd_list():
    rows = read_results()
    if not rows:
        print(f"no runs archived yet ({RESULTS_TSV} is missing or empty)")
        return 0
    bests = [pick_best(rows, h) for h in {r.get("harness", "") for r in rows}]
    print(f"{'run':<12} {'val_bpb':>9} {'mem_gb':>6}  {'status':<8} {'outcome':<15} {'harness':<13} description")
    for r in rows:  # .get: a results.tsv of karpathy/autoresearch's five columns lists too
        mark = "*" if any(r is b for b in bests) else " "
        run_id = r.get("run_id") or r.get("commit", "")
        print(f"{run_id:<11}{mark} {r.get('val_bpb', ''):>9} {r.get('memory_gb', ''):>6}  "
              f"{r.get('status', ''):<8} {r.get('outcome', ''):<15} {r.get('harness', ''):<13} {r.get('description', '')}")
    return 0


def cmd_show(run_id):
    rows = read_results()
    row = find_row(rows, run_id)
    path = ARCHIVE_DIR / row["run_id"] / "analysis.md"
    if not path.exists():  # an invocation was killed between recording the run and analysing it
        with archive_lock():
            report(load_run(row), rows)
    print(path.read_text())
    return 0


def cmd_best():
    rows = read_results()
    best = pick_best(rows, latest_harness(rows))
    if best is None:
        print("no best run yet: no valid run under the latest harness")
        return 0
    run_id = best.get("run_id") or best["commit"]
    rule = "most recently kept" if best["status"] == "keep" else "lowest val_bpb of the pending runs (none kept yet)"
    print(f"{run_id}\tcommit {best['commit']}\tval_bpb {best['val_bpb']}\tstatus {best['status']}\t"
          f"{best.get('description', '')}\t{ARCHIVE_DIR / run_id / 'analysis.md'}\t{rule}")
    return 0


def cmd_compare(id_a, id_b):
    rows = read_results()
    a, b = load_run(find_row(rows, id_a)), load_run(find_row(rows, id_b))
    lines = [f"compare {a.id} (A) with {b.id} (B)"]
    for tag, r in (("A", a), ("B", b)):
        lines.append(f"- {tag} {r.id}: val_bpb {fmt(r.bpb, '.6f')}, status {r.row['status']}, "
                     f"steps {r.row.get('num_steps') or 'n/a'}, harness {r.row['harness'] or 'unknown'}: {r.row['description']}")
    if a.bpb is not None and b.bpb is not None:
        lines.append(f"- val_bpb B - A: {b.bpb - a.bpb:+.6f}")
    if a.row["harness"] != b.row["harness"]:
        lines.append("- different harness settings: their numbers are not comparable")
    if a.summary and b.summary:
        lines += config_diff(a.summary.get("config") or {}, b.summary.get("config") or {})
    lines += code_diff(a, b)
    if a.metrics is not None and b.metrics is not None:
        lines += compare_curves(b.metrics, a.metrics, noise_band(rows, b.row)["band"], "B", "A")
    out = ARCHIVE_DIR / f"compare_{a.id}_{b.id}"
    out.mkdir(exist_ok=True)
    files = draw_overlays(out, [(f"A {a.id}", a.metrics), (f"B {b.id}", b.metrics)])
    lines.append(f"- plots: {', '.join(str(out / f) for f in files) or 'none (no metrics)'}")
    print("\n".join(lines))
    return 0


def code_diff(a, b):
    """train.py from A's commit to B's: a code change that is no config constant (a removed softcap)
    shows only here. A run of uncommitted changes measured code that neither commit holds."""
    ca, cb = a.row["commit"], b.row["commit"]
    patch = git("diff", "--no-color", ca, cb, "--", "train.py")
    if patch is None:
        return [f"- code: `git diff {ca} {cb}` failed: a commit is gone"]
    lines = diff_summary(patch, f"code (git diff {ca} {cb} -- train.py)", "train.py is identical in both commits")
    lines += [f"- {tag} ran train.py with uncommitted changes: the code it measured is not its commit's"
              for tag, r in (("A", a), ("B", b)) if uncommitted_train_py(r.summary)]
    return lines


def cmd_status(run_id, status):
    with archive_lock():
        remove_leftovers(ARCHIVE_DIR)
        rows = read_results()
        row = find_row(rows, run_id)
        if row["status"] == "invalid":  # one step through `discard` would otherwise let it be kept
            die(f"run {row['run_id']} is `invalid`: its prepare.py/analyze.py differ from the sha256 pinned in "
                f"{HARNESS_PIN}, so its status cannot change")
        if status == "keep" and row_bpb(row) is None:
            die(f"run {row['run_id']} is `{row['status']}` with val_bpb {row['val_bpb']}: it cannot be kept")
        if status == "keep":
            refuse_uncommitted(row)
        best_before = pick_best(rows, row["harness"])
        row["status"] = status
        write_results(rows)
        set_headline_status(row)
        best = pick_best(rows, row["harness"])
        if best is not best_before or status == "keep":
            write_current_best(best)
        draw_progress(rows)
    print(f"{row['run_id']}: {status}")
    return 0


def refuse_uncommitted(row):
    """keep advances the branch to the run's commit: it must hold the train.py that was measured."""
    summary = read_json(ARCHIVE_DIR / row["run_id"] / "run_summary.json")[0]
    mismatch = uncommitted_train_py(summary)
    if mismatch:
        die(f"run {row['run_id']} ran train.py with uncommitted changes (sha256 {mismatch[0][:8]}; commit "
            f"{row['commit']} holds {mismatch[1][:8]}), so keeping it would make the best a commit whose train.py "
            "was never measured; commit the change and rerun, or mark the run discard")


def set_headline_status(row):
    """Rewrite the status in the run's analysis.md headline; the Agent notes below it are the agent's."""
    path = ARCHIVE_DIR / row["run_id"] / "analysis.md"
    if not path.exists():
        return
    head, sep, notes = path.read_text().partition("\n## Agent notes")
    head = re.sub(r"^(- val_bpb \*\*[^*]*\*\*, status )`\w+`", rf"\g<1>`{row['status']}`", head, count=1, flags=re.M)
    write_atomic(path, head + sep + notes)


def write_current_best(best):
    """Rewrite only the `## Current Best` section of insights.md; the rest is the agent's."""
    section = "## Current Best\n" + ("- no run kept\n" if best is None else
        f"- run {best['run_id']}, commit {best['commit']}, val_bpb {best['val_bpb']}, status {best['status']}, "
        f"memory {best['memory_gb']} GB, harness {best['harness']}\n- {best['description']}\n"
        f"- analysis: {ARCHIVE_DIR / best['run_id'] / 'analysis.md'}\n")
    text = INSIGHTS_MD.read_text() if INSIGHTS_MD.exists() else "# Insights\n\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.strip() == "## Current Best"), None)
    if start is None:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        text = "".join(lines[:start]) + section + ("\n" + "".join(lines[end:]) if end < len(lines) else "")
    write_atomic(INSIGHTS_MD, text)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Archive and explain training runs (no subcommand: archive the "
                                                 "run in the working directory).")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("list", help="every archived run, one line each")
    sub.add_parser("show", help="print a run's analysis.md").add_argument("id")
    compare = sub.add_parser("compare", help="two runs side by side, plus an overlay plot")
    compare.add_argument("a")
    compare.add_argument("b")
    sub.add_parser("best", help="the current best run")
    status = sub.add_parser("status", help="mark a run keep, discard or crash")
    status.add_argument("id")
    status.add_argument("status", choices=("keep", "discard", "crash"))
    args = parser.parse_args(argv)
    if args.command is None:
        return cmd_archive()
    if args.command == "list":
        return cmd_list()
    if args.command == "show":
        return cmd_show(args.id)
    if args.command == "compare":
        return cmd_compare(args.a, args.b)
    if args.command == "best":
        return cmd_best()
    return cmd_status(args.id, args.status)


if __name__ == "__main__":
    sys.exit(main())

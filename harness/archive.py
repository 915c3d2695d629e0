"""
The archive on disk: its layout, the lock every writer holds, results.tsv (the experiment log, one
row per archived run, and the rule for the best among its rows), decisions.jsonl (every status
decision, appended) and the run directories under it.
"""
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness.metrics import Metrics, read_metrics

# ---------------------------------------------------------------------------
# Archive layout (fixed: other tools and program.md rely on these names)

ARCHIVE_DIR = Path(".auto-log-research")
RESULTS_TSV = ARCHIVE_DIR / "results.tsv"
TORN_TSV = ARCHIVE_DIR / "results.tsv.torn"     # rows of results.tsv with missing fields, set aside verbatim
INSIGHTS_MD = ARCHIVE_DIR / "insights.md"       # the agent's notes; only "## Current Best" is rewritten here
LOCK_FILE = ARCHIVE_DIR / ".lock"               # every write to the archive happens under this flock
DECISIONS = ARCHIVE_DIR / "decisions.jsonl"     # append-only: every decision made through `analyze.py status`
RECORD_JSON = "record.json"                     # per run: its identity, input problems, pin, and file digests
COLUMNS = ("commit", "val_bpb", "memory_gb", "status", "description",  # karpathy/autoresearch's five
           "run_id", "outcome", "harness", "train_py_sha", "num_steps", "mfu_percent",
           "training_seconds", "started_at", "run_key", "branch", "code_sha")


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
    return vetted_best(comparable(rows, harness))[0]


def vetted_best(pool):
    """(best, passed over): the rule of best_after_each, passing over every run whose evidence audit
    finds inconsistent (a status or val_bpb edited by hand, an archived file changed, ...), so such a
    run is never the best. `passed over` is [(row, problems)]. Only the candidates are checked, so the
    cost does not grow with history. Rows without a run_id (karpathy/autoresearch's own five-column
    results.tsv) have no evidence to check and are taken as they are."""
    from harness.audit import run_problems  # audit reads the archive through this module
    passed = []
    while pool:
        best = best_after_each(pool)[-1]
        problems = run_problems(best) if best is not None and "run_id" in best else []
        if not problems:
            return best, passed
        passed.append((best, problems))
        pool = [r for r in pool if r is not best]
    return None, passed


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


def append_decision(run_id, status, previous):
    """One line per `analyze.py status`, appended and flushed before results.tsv is rewritten, so the
    decisions can be replayed against results.tsv (a killed `status` leaves a decision that a rerun of
    the same command completes)."""
    line = json.dumps({"run_id": run_id, "status": status, "was": previous,
                       "at": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n"
    with open(DECISIONS, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_decisions():
    """({run_id: the last status decided}, [(line number, problem)])."""
    decided, problems = {}, []
    lines = DECISIONS.read_text(errors="replace").splitlines() if DECISIONS.exists() else []
    for number, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
            decided[entry["run_id"]] = entry["status"]
        except (json.JSONDecodeError, KeyError, TypeError):
            problems.append((number, f"{DECISIONS} line {number} is not a decision: {line[:60]!r}"))
    return decided, problems


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
# insights.md: the agent's notes, all but one section

def write_current_best(best):
    """Rewrite only the `## Current Best` section of insights.md; the rest is the agent's."""
    section = "## Current Best\n" + ("- no run kept\n" if best is None else
        f"- run {best['run_id']}, commit {best['commit']}, val_bpb {best['val_bpb']}, status {best['status']}, "
        f"memory {best['memory_gb']}{'' if best['memory_gb'] == 'n/a' else ' GB'}, harness {best['harness']}\n"
        f"- {best['description']}\n"
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

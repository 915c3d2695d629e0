"""
The archive on disk: where it is (AUTORESEARCH_ARCHIVE, shared by every worker that names it, and
each worktree's own notes), the lock every writer holds, results.tsv (the experiment log, one row per
archived run, and the rule for the best among its rows: each worker's own, on one harness and GPU
model), decisions.jsonl (every status decision, appended) and the run directories under it.
"""
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from harness.metrics import Metrics, read_metrics

# ---------------------------------------------------------------------------
# Archive layout (fixed: other tools and program.md rely on these names)

ARCHIVE_NAME = ".auto-log-research"  # the default archive, and each worktree's own notes, at the repository root
RECORD_JSON = "record.json"          # per run: its identity, input problems, pin, and file digests
MEASUREMENT_JSON = "measurement.json"  # per run of `analyze.py run`: the harness's own measurement and checks
COLUMNS = ("commit", "val_bpb", "memory_gb", "status", "description",  # karpathy/autoresearch's five
           "run_id", "outcome", "harness", "train_py_sha", "num_steps", "mfu_percent",
           "training_seconds", "started_at", "run_key", "branch", "code_sha", "worker", "gpu",
           # what `analyze.py run` measures itself; "" in a bare archive's rows and in older ones
           "measured", "heldout_bpb", "machine_speed", "wall_s", "outside_s", "caught", "decision")


@dataclass
class Paths:
    """Where things are. `dir` is the archive: the runs, results.tsv, decisions.jsonl, claims.tsv and
    progress.png, shared by every worker that names it (AUTORESEARCH_ARCHIVE). `local` is this
    worktree's own .auto-log-research/: the agent's insights.md, ideas_queue.md and scratch/, where
    .claude/settings.json lets it write. With the default archive the two are one directory. A view
    (`--archive DIR ...`) reads several archives, qualifies run ids that clash, and writes into none."""
    dir: Path
    local: Path
    view: tuple = ()                                  # (label, archive directory) of each archive a view reads
    run_dirs: dict = field(default_factory=dict)      # a view: run id -> its directory
    out: Path | None = None                           # a view: where its plots go (none without it)
    rows: list = field(default_factory=list)          # a view: the results.tsv rows of all its archives, in order
    decided: dict = field(default_factory=dict)       # a view: run id -> the last status decided
    claimed: list = field(default_factory=list)       # a view: the claims of all its archives, run ids as in rows

    results = property(lambda self: self.dir / "results.tsv")
    torn = property(lambda self: self.dir / "results.tsv.torn")    # rows with missing fields, set aside verbatim
    lock = property(lambda self: self.dir / ".lock")                # every write to the archive holds this flock
    decisions = property(lambda self: self.dir / "decisions.jsonl")  # append-only: every `analyze.py status`
    claims = property(lambda self: self.dir / "claims.tsv")         # what each worker is trying now, and how it went
    progress = property(lambda self: self.dir / "progress.png")
    workers = property(lambda self: self.dir / "workers")           # <worker>/insights.md: each worker's notes, copied
    insights = property(lambda self: self.local / "insights.md")    # the agent's; only "## Current Best" is rewritten

    def run_dir(self, run_id):
        return self.run_dirs.get(run_id) or self.dir / run_id


_located = {}   # (cwd, AUTORESEARCH_ARCHIVE) -> Paths, so git is asked once per directory
_view = None    # the Paths of a view, while analyze.py serves one


def paths():
    """The archive of the working directory's repository, or the view being served."""
    if _view is not None:
        return _view
    key = (os.getcwd(), os.environ.get("AUTORESEARCH_ARCHIVE", ""))
    if key not in _located:
        top = (git("rev-parse", "--show-toplevel") or "").strip()
        root = Path(top) if top else Path.cwd()
        chosen = Path(os.path.expanduser(key[1])) if key[1] else Path(ARCHIVE_NAME)
        _located[key] = Paths(shown(root / chosen), shown(root / ARCHIVE_NAME))
    return _located[key]


def shown(path):
    """`path` relative to the working directory when it lies inside it (the default archive prints as
    .auto-log-research/...), else absolute."""
    path = Path(os.path.normpath(path.absolute()))
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


def serve_view(view):
    """Serve `view` (a Paths with .view set) until serve_view(None)."""
    global _view
    _view = view


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
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")  # unique across machines on one volume
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextmanager
def archive_lock():
    """Serialises every invocation that writes, from any worktree or machine sharing the archive; the
    kernel drops the lock if the holder is killed."""
    where = paths()
    if where.view:  # the commands a view serves never get here; this keeps it so
        die("a view over --archive directories writes nothing; this command needs AUTORESEARCH_ARCHIVE instead")
    where.dir.mkdir(parents=True, exist_ok=True)
    with open(where.lock, "a") as f:
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

def parse_results(path=None):
    """(rows, torn) of results.tsv (this archive's unless `path`): torn are (line number, line) of rows
    with fewer fields than the header, e.g. a hand edit. They are left out rather than padded with blanks."""
    path = path or paths().results
    try:
        lines = path.read_text().splitlines() if path.exists() else []
    except UnicodeDecodeError as e:
        die(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); re-encode it "
            "(e.g. `iconv -f latin1 -t utf-8`) or move it aside")
    if not lines:
        return [], []
    if lines[0].split("\t")[:1] != ["commit"]:
        die(f"{path} has no `commit\\tval_bpb\\t...` header; restore it from a backup or move it aside")
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
    """The rows of results.tsv, or of every archive of a view (run ids qualified where they clash)."""
    if paths().view:
        return list(paths().rows)
    rows, torn = parse_results()
    for number, line in torn:
        fields = line.count("\t") + 1
        print(f"analyze.py: {paths().results} line {number} is torn ({fields} fields): left out, "
              f"and moved to {paths().torn} at the next write", file=sys.stderr)
    return rows


def write_results(rows):
    """Rewrite results.tsv whole (callers hold the lock). A row from before the worker and gpu columns
    keeps its fields, with the worker unknown and the GPU read from its summary."""
    torn = parse_results()[1]
    if torn:  # set aside verbatim, never silently dropped
        old = paths().torn.read_text() if paths().torn.exists() else ""
        write_atomic(paths().torn, old + "".join(line + "\n" for _, line in torn))
    for row in rows:
        row_gpu(row)
    extra = [k for row in rows for k in row if k not in COLUMNS]
    header = list(COLUMNS) + list(dict.fromkeys(extra))
    lines = ["\t".join(header)] + ["\t".join(tsv_field(row.get(c, "")) for c in header) for row in rows]
    write_atomic(paths().results, "\n".join(lines) + "\n")


def tsv_field(value):
    return " ".join(str(value).split())  # a tab or newline inside a field would tear the row


# ---------------------------------------------------------------------------
# Workers and GPU models: whose run it is, and which runs may be compared

WORKER_MAX_CHARS = 80      # a worker's name is a results.tsv field and a directory name


def worker_name():
    """AUTORESEARCH_WORKER, or <hostname>:<CUDA_VISIBLE_DEVICES or cpu>; one line and exit on a bad name."""
    name = os.environ.get("AUTORESEARCH_WORKER")
    if name is None:
        return f"{socket.gethostname()}:{os.environ.get('CUDA_VISIBLE_DEVICES') or 'cpu'}"
    if not name.strip() or len(name) > WORKER_MAX_CHARS or any(ord(c) < 32 or ord(c) == 127 for c in name) \
            or set(name) <= {"."}:
        die(f"AUTORESEARCH_WORKER={name!r} is not a worker name: give 1-{WORKER_MAX_CHARS} printable characters "
            "without tabs or newlines (e.g. node1:gpu0), or unset it for <hostname>:<CUDA_VISIBLE_DEVICES or cpu>")
    return name


def own(row, worker):
    """The row is `worker`'s run. A row from before the worker column (worker unknown) is every worker's:
    its archive had one writer."""
    return not row.get("worker") or not worker or row["worker"] == worker


def gpu_class(summary):
    """The device a run's speed, and so its val_bpb on a fixed time budget, belongs to: the GPU model as
    CUDA names it, without the vendor prefix; `cpu` for the cpu profile (which never trains on a GPU)
    and for a run without CUDA; "" when unknown (no summary)."""
    if not summary:
        return ""
    name = (summary.get("env") or {}).get("gpu_name")
    if (summary.get("harness") or {}).get("profile") == "cpu" or not name:
        return "cpu"
    return re.sub(r"^NVIDIA\s+", "", " ".join(str(name).split()), flags=re.I)


def row_gpu(row):
    """The GPU model of a row; a row archived before the gpu column gets it from its summary, once
    (results.tsv keeps it from the next write)."""
    if "gpu" not in row:
        run_id = row.get("run_id")
        row["gpu"] = gpu_class(read_json(paths().run_dir(run_id) / "run_summary.json")[0] if run_id else None)
    return row["gpu"]


def same_gpu(a, b):
    return a == b or not a or not b  # unknown matches any: karpathy's five columns, a crash without summary


def row_bpb(row):
    """val_bpb of a row as a float, or None for a run that did not finish (karpathy writes 0.000000
    there), whatever status it was given since."""
    if row.get("status") in ("crash", "interrupted") or row.get("outcome", "ok") not in ("ok", ""):
        return None
    try:
        value = float(row.get("val_bpb", ""))
    except ValueError:
        return None
    return value if np.isfinite(value) and value > 0 else None


def comparable(rows, harness, gpu=None):
    """Valid runs with a val_bpb made under the same harness on the same GPU model (any when gpu is None):
    the only ones a run is measured against. `invalid` (harness changed) and `crash` rows are never
    among them."""
    return [r for r in rows if r.get("harness", "") == harness and r.get("status") in ("pending", "keep", "discard")
            and row_bpb(r) is not None and (gpu is None or same_gpu(row_gpu(r), gpu))]


def own_comparable(rows, harness, gpu=None, worker=None):
    """The comparable runs (see comparable) that are `worker`'s own (anyone's when None)."""
    return [r for r in comparable(rows, harness, gpu) if own(r, worker)]


def pick_best(rows, harness, gpu=None, worker=None):
    """The best among `worker`'s comparable runs (see best_after_each), or None."""
    return vetted_best(own_comparable(rows, harness, gpu, worker))[0]


def best_for(rows, row):
    """The best a run is measured against: its worker's on its branch (the branch stands on it; a kept run of
    another branch, or of the README's quick start on main, is another experiment's), among the runs
    comparable with it. Rows without a branch (older archives) belong to every branch."""
    return pick_best(on_branch(rows, row), row.get("harness", ""), row_gpu(row), row.get("worker"))


def on_branch(rows, row):
    """The rows of `row`'s branch (all of them when it has none); rows without a branch are every branch's."""
    branch = row.get("branch")
    return [r for r in rows if r.get("branch") in (branch, "", None)] if branch else rows


def vetted_best(pool):
    """(best, passed over): the most recently kept run of `pool` (comparable rows, in order), passing
    over every run whose evidence audit finds inconsistent (a status or val_bpb edited by hand, an
    archived file changed, ...), so such a run is never the best. `passed over` is [(row, problems)].
    Only the candidates are checked, so the cost does not grow with history. Rows without a run_id
    (karpathy/autoresearch's own five-column results.tsv) have no evidence to check and are taken as
    they are."""
    from harness.audit import run_problems  # audit reads the archive through this module
    passed = []
    for best in reversed([r for r in pool if r["status"] == "keep"]):
        problems = run_problems(best) if "run_id" in best else []
        if not problems:
            return best, passed
        passed.append((best, problems))
    return None, passed


def best_after_each(pool):
    """The best after each row of `pool` (comparable rows, in order), None before there is one. The best
    is the run the branch stands on: the most recently kept one, as keep advances the branch in
    karpathy/autoresearch. It need not have the lowest val_bpb: a simplification kept inside the noise
    band is the new base. A pending run is never the best: until a run is kept there is none, so a run
    nobody decided (the README's quick-start run) sets no bar."""
    kept, out = None, []
    for r in pool:
        kept = r if r["status"] == "keep" else kept
        out.append(kept)
    return out


def previous_for(rows, row):
    """The worker's latest run comparable with `row`."""
    pool = own_comparable(rows, row.get("harness", ""), row_gpu(row), row.get("worker"))
    return pool[-1] if pool else None


def latest_harness(rows):
    return next((r["harness"] for r in reversed(rows) if r.get("harness")), "")


def latest_row(rows, worker=None):
    """The latest row with a harness key and a GPU class (of `worker`'s when given): whose class `best` and
    progress.png show. A crash without a summary has no class, and would pool every GPU model."""
    return next((r for r in reversed(rows) if r.get("harness") and r.get("gpu")
                 and (worker is None or own(r, worker))), None)


RUN_ID = re.compile(r"[0-9a-f]{7}(-\d+)?")


def remove_leftovers(directory):
    """Temporary files and directories of invocations killed mid-write, and run directories reserved by
    one killed before it filled them (empty). Every writer holds the lock, and so does the caller, so
    none of them is in use."""
    for path in Path(directory).glob(".*"):
        if path.is_dir() and path.name.startswith(".tmp-"):
            shutil.rmtree(path)
        elif path.is_file() and (path.name.endswith(".tmp") or path.name.startswith(".progress.")):  # older names too
            path.unlink()
    if Path(directory) == paths().dir:
        for path in Path(directory).iterdir():
            if RUN_ID.fullmatch(path.name) and path.is_dir() and not any(path.iterdir()):
                path.rmdir()


def append_decision(run_id, status, previous):
    """One line per `analyze.py status`, appended and flushed before results.tsv is rewritten, so the
    decisions can be replayed against results.tsv (a killed `status` leaves a decision that a rerun of
    the same command completes)."""
    line = json.dumps({"run_id": run_id, "status": status, "was": previous,
                       "at": time.strftime("%Y-%m-%dT%H:%M:%S"), "worker": worker_name()}) + "\n"
    with open(paths().decisions, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_decisions(path=None):
    """({run_id: the last status decided}, [(line number, problem)]) of decisions.jsonl (this archive's
    unless `path`); a view's, merged with its run ids qualified."""
    if path is None and paths().view:
        return dict(paths().decided), []
    path = path or paths().decisions
    decided, problems = {}, []
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    for number, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
            decided[entry["run_id"]] = entry["status"]
        except (json.JSONDecodeError, KeyError, TypeError):
            problems.append((number, f"{path} line {number} is not a decision: {line[:60]!r}"))
    return decided, problems


def matching_rows(rows, run_id):
    """Exact run id (in a view, also the id without its archive's label), else the runs whose id starts
    with it or whose commit a full sha starts with."""
    return [r for r in rows if r.get("run_id") == run_id] or [
        r for r in rows if r.get("run_id", "").rsplit(":", 1)[-1] == run_id] or [
        r for r in rows if r.get("run_id", "").startswith(run_id)
        or (len(run_id) > 7 and r.get("commit") and run_id.startswith(r["commit"]))]


def find_own_row(rows, run_id, worker):
    """The run `status` may decide: looked up among this worker's runs first (two workers' runs of one commit
    are `abc1234` and `abc1234-2`), and another worker's run is refused by name, never decided."""
    mine = [r for r in rows if own(r, worker)]
    if matching_rows(mine, run_id):
        return find_row(mine, run_id)
    row = find_row(rows, run_id)
    die(f"run {row['run_id']} is worker {row['worker']}'s, not {worker}'s: decide only your own runs "
        f"(`uv run analyze.py list --worker {worker}`)")


def find_row(rows, run_id):
    """The one run matching_rows finds, or one line saying why there is none."""
    hits = matching_rows(rows, run_id)
    if len(hits) == 1:
        return hits[0]
    known = " ".join(r.get("run_id", "?") for r in rows[-8:]) or "none yet"
    if not hits:
        die(f"no run {run_id!r} in {paths().results} (latest ids: {known})")
    die(f"{run_id!r} matches several runs ({' '.join(r['run_id'] for r in hits)}); give the full run id")


# ---------------------------------------------------------------------------
# insights.md: the agent's notes, all but one section

def write_current_best(best):
    """Rewrite only the `## Current Best` section of this worktree's insights.md; the rest is the agent's."""
    section = "## Current Best\n" + ("- no run kept\n" if best is None else
        f"- run {best['run_id']}, commit {best['commit']}, val_bpb {best['val_bpb']}, status {best['status']}, "
        f"memory {best['memory_gb']}{'' if best['memory_gb'] == 'n/a' else ' GB'}, harness {best['harness']}\n"
        f"- {best['description']}\n"
        f"- analysis: {paths().run_dir(best['run_id']) / 'analysis.md'}\n")
    insights = paths().insights
    text = insights.read_text() if insights.exists() else "# Insights\n\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.strip() == "## Current Best"), None)
    if start is None:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        text = "".join(lines[:start]) + section + ("\n" + "".join(lines[end:]) if end < len(lines) else "")
    insights.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(insights, text)


# ---------------------------------------------------------------------------
# An archived run, loaded for analysis

@dataclass
class Run:
    id: str
    row: dict
    summary: dict | None
    metrics: Metrics | None
    notes: list
    best_id: str | None = None        # the best when it was archived, from record.json
    measurement: dict | None = None   # measurement.json: what `analyze.py run` measured itself; None for a bare archive

    @property
    def dir(self):
        return paths().run_dir(self.id)

    @property
    def bpb(self):
        return row_bpb(self.row)


def load_run(row):
    run_dir = paths().run_dir(row["run_id"])
    if not run_dir.is_dir():
        die(f"{run_dir} is missing although {paths().results} lists it; restore the directory or delete its row")
    summary = read_json(run_dir / "run_summary.json")[0] if (run_dir / "run_summary.json").exists() else None
    record = read_json(run_dir / RECORD_JSON)[0] or {}
    metrics, metric_notes = (read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists()
                             else (None, []))
    measurement = read_json(run_dir / MEASUREMENT_JSON)[0] if (run_dir / MEASUREMENT_JSON).exists() else None
    return Run(row["run_id"], row, summary, metrics, record.get("notes", []) + metric_notes, record.get("best"),
               measurement)

"""
The record of a run: one typed `run.json` per run directory (Run, below), and the archive of run directories.
results.tsv is derived from the run directories, rebuilt whole under the archive lock: no number is stored twice.

    archive = Archive.here()            # AUTORESEARCH_ARCHIVE, or .auto-log-research at the repository root
    runs = archive.runs()               # every Run, oldest first
    run.val_bpb, run.status, run.code_sha, run.outside_s

The harness pin, `refs/auto-log-research/pins/<branch>`, names the commit where the branch began; the pinned
harness is every tracked .py file but train.py, tests/ and contrib/. The agent's git commands never move a ref
outside refs/heads; only `analyze.py repin` (a human at a terminal) moves a pin, and the reflog keeps every
earlier one. Every git call passes --no-replace-objects: a `git replace` cannot swap a pin.
"""
import fcntl
import functools
import hashlib
import io
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
import tokenize
from contextlib import contextmanager, suppress
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Literal, get_args, get_origin

SCHEMA = "auto-log-research run 2"
STATUSES = ("pending", "keep", "discard", "crash", "invalid")
OUTCOMES = ("ok", "crash", "diverged", "timeout", "interrupted")
KINDS = ("keep", "rerun", "discard", "crash")           # a Decision's kind
ARCHIVE_NAME = ".auto-log-research"                     # the default archive, at the repository root
RUN_JSON = "run.json"
EVIDENCE = ("run.log", "metrics.jsonl", "diff.patch")   # the files whose sha256 run.json keeps
UNCOMMITTED = " [uncommitted changes]"                  # a description's mark: train.py was not its commit's
COLUMNS = ("commit", "val_bpb", "memory_gb", "status", "description",   # karpathy/autoresearch's five
           "run_id", "branch", "worker", "gpu", "harness", "code_sha", "outcome", "num_steps", "heldout_bpb",
           "speed", "outside_s", "caught", "decision")
PIN_REFS = "refs/auto-log-research/pins/"
WORKER_MAX_CHARS = 80      # a worker's name is a results.tsv field and a directory name
LOG_TAIL_BYTES = 8192      # run.log's final block is in its last few lines
LAYOUT = (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)  # tokens of layout, not code
FIX = "restore it from a backup, or move the run directory aside (`uv run analyze.py audit` lists every problem)"


class RecordError(Exception):
    """A record or archive that cannot be read or changed: a one-line message naming the file and what to do."""


def number(value):
    """A finite float from a JSON number or a numeric string; None for anything else (None, a bool, NaN, 'n/a')."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) and not isinstance(value, bool) else None


def now_utc():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# The record
@dataclass
class Trained:
    """What train.py said about itself (its run_summary.json): train.py's word, not checked here."""
    outcome: Literal[OUTCOMES]         # how train.py ended
    reported_val_bpb: float | None     # the val_bpb train.py printed; None under `analyze.py run` (it hands off)
    training_seconds: float | None = None
    total_seconds: float | None = None
    peak_vram_mb: float | None = None
    mfu_percent: float | None = None
    total_tokens_M: float | None = None
    num_steps: int | None = None
    num_params_M: float | None = None
    depth: int | None = None
    timings: dict = field(default_factory=dict)   # startup_s, warmup_s, eval_s, final_eval_s, fit_s, ...
    device_batch: dict | None = None               # {"requested", "used", "grad_accum_steps"} when fitted
    config: dict = field(default_factory=dict)     # every UPPER_CASE hyperparameter of train.py
    env: dict = field(default_factory=dict)        # python, torch, cuda, gpu_name, driver
    error: str | None = None                       # the traceback's tail


@dataclass
class Measured:
    """What the harness measured: train.py's process on its clock, the handed-off model by harness/evaluate.py."""
    val_bpb: float | None              # THE number of the run
    heldout_bpb: float | None = None
    future_leak: float | None = None   # how far logits moved when only later tokens changed (0 when causal)
    speed_before: float | None = None  # GFLOP/s of the evaluator's fixed matmul, before and after it measured
    speed_after: float | None = None
    eval_s: float | None = None        # the evaluator's seconds
    wall_s: float | None = None        # train.py's process, spawn to exit
    first_row_s: float | None = None   # spawn to the first row of metrics.jsonl
    outside_cpu_s: float | None = None  # CPU seconds of train.py's processes before that row and after the hand-off
    stopped: str | None = None         # "timeout" or "interrupted" when the harness stopped a process
    phase: str | None = None           # where: "start-up", "training", "hand-off" or "evaluation"
    error: str | None = None           # why there is no number, one line

    @property
    def speed(self):
        """The machine's speed during the run: the mean of the two probes, or None."""
        probes = [p for p in (self.speed_before, self.speed_after) if p]
        return sum(probes) / len(probes) if probes else None


@dataclass
class Caught:
    case: str       # a fixed name (decide.py's constants), e.g. "trained on validation data"
    detail: str     # what was found, with its numbers and the limit


@dataclass
class Decision:
    kind: Literal[KINDS]
    reason: str              # one phrase
    delta: float | None      # mean val_bpb of this code's runs minus the mean of the best code's
    band: float | None       # noise band for that difference of means
    n: int                   # runs of this code in it
    m: int                   # runs of the best's code in it
    best_id: str | None

    def line(self):
        """One line, the first of analysis.md and of what `analyze.py run` prints."""
        delta = "n/a" if self.delta is None else f"{self.delta:+.6f}"
        band = "unknown" if self.band is None else f"±{self.band:.6f}"
        facts = (f"no best yet (n {self.n})" if self.best_id is None else f"vs best {self.best_id}" if self.n == 0
                 else f"delta {delta} vs best {self.best_id} (band {band}, n {self.n} vs {self.m})")
        return f"decision: {self.kind} — {facts}: {self.reason}"


@dataclass
class StatusChange:
    status: Literal[STATUSES]
    at: str         # UTC, ISO 8601 (now_utc())
    by: str         # "archive" (first status), "harness" (its decision), "analyze.py status" (by hand)


@dataclass
class Run:
    """One run.json."""
    id: str                      # <commit7>, <commit7>-2, ...: the run's directory name
    commit: str                  # full sha of the commit that ran
    description: str             # the commit's subject (+ UNCOMMITTED when train.py differed)
    branch: str | None
    worker: str                  # AUTORESEARCH_WORKER or <hostname>:<CUDA_VISIBLE_DEVICES or cpu>
    started_at: float | None     # unix seconds, train.py's start
    archived_at: float           # unix seconds
    harness: dict                # prepare.HARNESS plus the tokenizer's id: runs compare only when equal
    gpu: str                     # the device class its speed belongs to: the GPU's name, or "cpu"
    code_sha: str                # train.py's code, comments and blank lines aside (code_sha())
    pin: str | None              # the branch's pinned harness commit, when the run was archived
    harness_changes: list[str]   # harness files that differed from the pin when it ran, one phrase each
    trained: Trained
    measured: Measured | None    # None: archived by hand, val_bpb is train.py's own word
    caught: list[Caught]
    decision: Decision | None    # None: not decided (a run archived by hand)
    statuses: list[StatusChange]  # oldest first; the last is the status
    evidence: dict[str, str]     # file name in the run directory -> sha256
    best_id: str | None = None   # the best diff.patch and analysis.md were written against
    contained: bool | None = None  # train.py ran in a sandbox (None: not recorded)
    notes: list[str] = field(default_factory=list)  # what the archive noticed: missing files, a moved HEAD, ...
    schema: Literal[SCHEMA] = SCHEMA

    @property
    def status(self):
        return self.statuses[-1].status if self.statuses else "pending"

    @property
    def val_bpb(self):
        """The harness's measurement, or train.py's own for a run archived by hand; None when it did not finish."""
        if self.measured is not None:
            return self.measured.val_bpb
        return self.trained.reported_val_bpb if self.trained.outcome == "ok" else None

    @property
    def steps(self):
        return self.trained.num_steps

    @property
    def outside_s(self):
        """Seconds of train.py's process outside its training budget (>= 0); None when it trained no counted second."""
        wall = self.measured.wall_s if self.measured else self.trained.total_seconds
        train = self.trained.training_seconds
        return None if wall is None or not train else max(0.0, wall - train)

    @property
    def harness_key(self):
        """profile:hash of the harness dict; runs compare only within one key."""
        blob = json.dumps(self.harness, sort_keys=True).encode()
        return f"{self.harness.get('profile', '?')}:{hashlib.sha256(blob).hexdigest()[:8]}"

    @property
    def cases(self):
        return "; ".join(c.case for c in self.caught)

    def to_json(self):
        return json.dumps(asdict(self), indent=1, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, d):
        """Typed and validated, or RecordError naming the field (callers name the file); another schema first."""
        if isinstance(d, dict) and d.get("schema", SCHEMA) != SCHEMA:  # before its fields, which that schema changed
            raise RecordError(f"schema {d.get('schema')!r}, not {SCHEMA!r}")
        return _typed(d, cls, "run")


def _typed(value, hint, where):
    """`value` as the annotation `hint` wants it (an int where a float is wanted becomes one), or RecordError."""
    args, origin = get_args(hint), get_origin(hint) or hint
    if type(None) in args:      # `X | None`, the only union used
        return None if value is None else _typed(value, args[0], where)
    if is_dataclass(hint) and isinstance(value, dict):
        known = {f.name: f for f in fields(hint)}
        wrong = [f"{where}.{name} is missing" for name, f in known.items() if name not in value
                 and f.default is MISSING and f.default_factory is MISSING]
        wrong += [f"{where} has an unknown field {name}" for name in value if name not in known]
        if wrong:
            raise RecordError(wrong[0])
        return hint(**{k: _typed(v, known[k].type, f"{where}.{k}") for k, v in value.items()})
    if origin is list and isinstance(value, list):
        return [_typed(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict and isinstance(value, dict):
        return {k: _typed(v, args[1], f"{where}[{k!r}]") for k, v in value.items()} if args else value
    if (origin is Literal and value in args) or (hint in (int, str, bool) and type(value) is hint):
        return value
    if hint is float and type(value) in (int, float) and math.isfinite(value):  # JSON's types: a bool is no number
        return float(value)
    wanted = ("one of " + ", ".join(args) if origin is Literal else "a finite number" if hint is float
              else "an object" if is_dataclass(hint) else origin.__name__)
    raise RecordError(f"{where} is {value!r:.40}, not {wanted}")


def load_run(path):
    """The Run of a run.json, or RecordError("<path>: <what is wrong>; <what to do>")."""
    try:
        return Run.from_dict(json.loads(Path(path).read_text()))
    except FileNotFoundError:
        why = "missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        why = f"not readable JSON ({str(e).splitlines()[0]})"
    except RecordError as e:
        why = str(e)
    raise RecordError(f"{path}: {why}; {FIX}")


def trained_of(s):
    """Trained from a run_summary.json's dict ({}: a crash that wrote none): the one reading of train.py's word."""
    counts = {k: None if number(s.get(k)) is None else int(number(s.get(k))) for k in ("num_steps", "depth")}
    return Trained(s.get("status") if s.get("status") in OUTCOMES else "crash", number(s.get("val_bpb")),
                   **{k: number(s.get(k)) for k in ("training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent",
                                                    "total_tokens_M", "num_params_M")}, **counts,
                   **{k: s[k] if isinstance(s.get(k), dict) else {} for k in ("timings", "config", "env")},
                   device_batch=s.get("device_batch") if isinstance(s.get("device_batch"), dict) else None,
                   error=None if s.get("error") is None else str(s["error"]))


def gpu_class(s):
    """The device a run's speed belongs to: the GPU's name without the vendor, or "cpu"."""
    name = (s.get("env") or {}).get("gpu_name")
    if (s.get("harness") or {}).get("profile") == "cpu" or not name:
        return "cpu"
    return re.sub(r"^NVIDIA\s+", "", " ".join(str(name).split()))


# Files, git and code
def sha256_file(path):
    """sha256 hex of a file's bytes, or None when there is no such file."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except (FileNotFoundError, IsADirectoryError):
        return None


def write_atomic(path, data):
    """Temporary file + rename: a reader, or a killed writer, never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")  # unique across machines on one volume
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def git(*args, cwd=None, check=False):
    """stdout of a git command (--no-replace-objects), or None when it fails; with check, RecordError saying why."""
    try:
        out = subprocess.run(["git", "--no-replace-objects", *args], cwd=cwd, capture_output=True)
    except OSError as e:  # no git at all
        out = subprocess.CompletedProcess(args, 127, b"", str(e).encode())
    if out.returncode and check:
        raise RecordError(f"`git {args[0]}` failed: {last_line((out.stderr or out.stdout).decode(errors='replace'))}")
    return None if out.returncode else out.stdout.decode("utf-8", errors="replace")


def last_line(text):
    lines = (text or "").strip().splitlines()
    return lines[-1] if lines else "no output"


def train_py_at(commit):
    return git("show", f"{commit}:train.py")


def final_block(path):
    """{key: value} of the last `---` block of a run.log (karpathy/autoresearch's greppable block), or {}."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - LOG_TAIL_BYTES))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return {}
    starts = [i for i, line in enumerate(lines) if line.strip() == "---"]
    pairs = (line.split(":", 1) for line in lines[starts[-1] + 1:] if ":" in line) if starts else ()
    return {k.strip(): v.strip() for k, v in pairs}


def _tokens(source):
    """(type, text) of the code's tokens; for a file that does not tokenize, each word of its non-comment lines."""
    try:
        return [(t.type, "" if t.type in LAYOUT else t.string) for t in tokenize.generate_tokens(
            io.StringIO(source).readline) if t.type not in (tokenize.COMMENT, tokenize.NL, tokenize.ENCODING)]
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return [(tokenize.NAME, word) for line in source.splitlines() if not line.strip().startswith("#")
                for word in line.split()]


def code_sha(source):
    """12 hex digits of train.py's code: a change to comments, blank lines or spacing only repeats the code."""
    return hashlib.sha256("\n".join(f"{t} {s}" for t, s in _tokens(source)).encode()).hexdigest()[:12]


def code_size(source):
    """Tokens of code, layout aside: what "simpler" counts, so joining two lines with `;` adds a token."""
    return sum(t not in LAYOUT for t, _ in _tokens(source))


def worker_name():
    """AUTORESEARCH_WORKER, or <hostname>:<CUDA_VISIBLE_DEVICES or cpu>; RecordError on a bad name."""
    name = os.environ.get("AUTORESEARCH_WORKER")
    if name is None:
        return f"{os.uname().nodename}:{os.environ.get('CUDA_VISIBLE_DEVICES') or 'cpu'}"
    if not name.strip() or set(name) <= {"."} or not re.fullmatch(rf"[^\x00-\x1f\x7f/]{{1,{WORKER_MAX_CHARS}}}", name):
        raise RecordError(f"AUTORESEARCH_WORKER={name!r} is not a worker name: give 1-{WORKER_MAX_CHARS} printable "
                          "characters without tabs, newlines or '/' (e.g. node1:gpu0), or unset it")
    return name


def current_branch():
    """The branch HEAD is on, or None when HEAD is detached (or there is no repository)."""
    return (git("symbolic-ref", "--quiet", "--short", "HEAD") or "").strip() or None


# The harness pin
def _root():
    return Path((git("rev-parse", "--show-toplevel") or "").strip() or Path.cwd())


def harness_file(path):  # what the pin covers (the module docstring)
    return path.endswith(".py") and path != "train.py" and not path.startswith(("tests/", "contrib/"))


def rev_parse(rev):
    """The full sha of the commit `rev` names, or None."""
    return (git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}") or "").strip() or None


def read_pin(branch):
    return rev_parse(PIN_REFS + branch)


def pin_history(branch):
    """Every commit `branch` has been pinned to, newest first (the current one, then the reflog's)."""
    logged = (git("reflog", "show", "--format=%H", PIN_REFS + branch, "--") or "").split()
    return list(dict.fromkeys(filter(None, [read_pin(branch), *logged])))


def pinned_blobs(commit):
    """{path: blob id} of the harness files `commit` holds."""
    entries = [e.split("\t", 1) for e in (git("ls-tree", "-r", "-z", "--full-tree", commit) or "").split("\0")]
    return {path: meta.split()[2] for meta, path in (e for e in entries if len(e) == 2)  # meta: mode type blob
            if harness_file(path) and meta.split()[1] == "blob"}


def harness_changes(pin, recorded=None):
    """The working tree's harness files against `pin`, one phrase per file that differs; with `recorded` ({path:
    sha256} as train.py saw them at its start), also a file edited while it trained and restored since."""
    root, pinned = _root(), pinned_blobs(pin)
    tracked = [p for p in (git("ls-files", "-z", "--full-name", cwd=root) or "").split("\0") if harness_file(p)]
    present = [p for p in sorted(set(pinned) | set(tracked)) if (root / p).is_file()]
    hashed = git("hash-object", "--", *present, cwd=root) if present else ""
    found = dict(zip(present, (hashed or "").split()))  # blob ids, as git would store the working tree's files
    changes = {p: "deleted" if p not in found else "changed" for p in pinned if found.get(p) != pinned[p]}
    changes.update({p: "added" for p in found if p not in pinned})
    changes.update({p: "differed while train.py ran" for p, sha in (recorded or {}).items()
                    if p in pinned and p not in changes and sha256_file(root / p) != sha})
    return [f"{p} ({what}) against the pin {pin[:7]}" for p, what in sorted(changes.items())]


def ensure_pin(branch, runs):
    """(pin, None), pinning HEAD first when `branch` has none and none of `runs` is this worker's on it (set-up;
    another clone's runs may be on a branch of the same name); (None, why) when only a human can pin it."""
    if pin := read_pin(branch):
        return pin, None
    if earlier := [r.id for r in runs if r.branch == branch and r.worker == worker_name()]:
        return None, (f"branch {branch} has no pin although {len(earlier)} run(s) ({earlier[0]} to {earlier[-1]}) "
                      "ran on it: it was removed; a human restores it (`analyze.py repin`)")
    head = rev_parse("HEAD")
    if head is None:
        return None, "the repository has no commit to pin; commit the harness first"
    if changes := harness_changes(head):
        return None, (f"the working tree's harness differs from HEAD ({'; '.join(changes)}), so {branch} cannot be "
                      "pinned at HEAD; restore those files, or commit a human's change to the harness first")
    git("update-ref", "--create-reflog", "-m", f"pin: {branch} begins at {head[:7]}", PIN_REFS + branch, head, "")
    return read_pin(branch), None  # create-only: a concurrent creator may have won, and its pin stands


def move_pin(branch, commit):
    """Re-pin `branch` at `commit` (humans only); False when `commit` is none or the pin moved meanwhile."""
    old, new = read_pin(branch), rev_parse(commit)
    message = f"repin: from {old[:7] if old else 'none'} to {(new or '')[:7]}"
    return new is not None and git("update-ref", "--create-reflog", "-m", message, PIN_REFS + branch, new,
                                   old or "") is not None


# The archive
def evidence(run_dir):
    """{file name: sha256} of the evidence files present in a run directory: what run.json keeps."""
    return {name: sha for name in EVIDENCE if (sha := sha256_file(Path(run_dir) / name))}


def results_row(run):
    """The run's results.tsv fields; a crash has val_bpb 0.000000 and memory_gb 0.0, as karpathy/autoresearch's."""
    def tsv(value, spec=""):
        return " ".join(("" if value is None else format(value, spec)).split())  # a tab or newline would tear the row

    vram, val, m = run.trained.peak_vram_mb, run.val_bpb, run.measured
    return [run.commit[:7], f"{val or 0.0:.6f}", f"{(vram or 0.0) / 1024 if run.status != 'crash' else 0.0:.1f}",
            run.status, tsv(run.description), run.id, tsv(run.branch), tsv(run.worker), tsv(run.gpu),
            run.harness_key, run.code_sha, run.trained.outcome, tsv(run.trained.num_steps),
            tsv(m and m.heldout_bpb, ".6f"), tsv(m and m.speed, ".1f"), tsv(run.outside_s, ".1f"),
            tsv(run.cases), run.decision.kind if run.decision else ""]


def results_text(runs):
    return "".join("\t".join(row) + "\n" for row in [list(COLUMNS)] + [results_row(r) for r in runs])


class Archive:
    """The run directories, results.tsv derived from them, and the lock every writer holds. `dir` may be shared by
    worktrees and machines (AUTORESEARCH_ARCHIVE); `local` is this worktree's own (insights.md, run.lock)."""
    def __init__(self, dir, local=None):
        self.dir = Path(dir)
        self.local = Path(local) if local is not None else self.dir
        self.results, self.progress = self.dir / "results.tsv", self.dir / "progress.png"
        self.problems = {}   # run directory name -> the line why runs() skipped it

    @classmethod
    def here(cls):
        """This repository's archive and its local one, shown relative to the working directory when inside it."""
        root, chosen = _root(), os.path.expanduser(os.environ.get("AUTORESEARCH_ARCHIVE") or ARCHIVE_NAME)
        dirs = [Path(os.path.normpath(root / d)) for d in (chosen, ARCHIVE_NAME)]  # a relative one is the root's
        return cls(*(d.relative_to(Path.cwd()) if d.is_relative_to(Path.cwd()) else d for d in dirs))

    def run_dir(self, run_id):
        return self.dir / run_id

    @contextmanager
    def lock(self):
        """Serialises every writer, from any worktree or machine sharing the archive; the kernel drops the lock if
        the holder is killed. Not re-entrant: flock is per open file, so a nested lock() would wait forever."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def run_dirs(self):
        """Directories holding a run.json, or named like a run id (<commit7>[-n]), by name."""
        found = self.dir.iterdir() if self.dir.is_dir() else ()
        return sorted(p for p in found if p.is_dir() and not p.name.startswith(".")
                      and ((p / RUN_JSON).exists() or re.fullmatch(r"[0-9a-f]{7}(-\d+)?", p.name)))

    def runs(self):
        """Every readable run.json, oldest first; each unreadable one is named once on stderr and skipped (the previous
        version's, with a record.json, in one line). An empty directory is an id a writer reserved: skipped quietly."""
        runs, old = [], 0
        for path in self.run_dirs():
            try:
                run = load_run(path / RUN_JSON)
                if run.id != path.name:
                    raise RecordError(f"{path / RUN_JSON}: names the run {run.id!r}, but lies in {path.name}; give it "
                                      "its directory's id, or move it")
                runs.append(run)
            except RecordError as e:
                if any(path.iterdir()) and path.name not in self.problems:
                    self.problems[path.name] = str(e)
                    if (path / "record.json").exists():  # the previous version's run: one line for all, below
                        old += 1
                    else:
                        print(e, file=sys.stderr)
        if old:
            print(f"{self.dir}: {old} run directories of the previous version have no run.json: "
                  "`uv run contrib/convert.py` converts them", file=sys.stderr)
        return sorted(runs, key=lambda r: (r.archived_at, r.id))

    def find(self, prefix):
        """The run of id `prefix`, or the one whose id (or full commit) starts with it; RecordError otherwise."""
        runs = self.runs()
        hits = [r for r in runs if r.id == prefix] or [r for r in runs if r.id.startswith(prefix)
                                                      or r.commit.startswith(prefix)]
        if len(hits) > 1:
            raise RecordError(f"{prefix!r} matches several runs ({' '.join(r.id for r in hits)}); give the full run id")
        if not hits:
            raise RecordError(f"no run {prefix!r} in {self.dir}; `uv run analyze.py list` lists them")
        return hits[0]

    def new_id(self, commit):
        """<commit7>, else <commit7>-2, -3, ...: the first whose directory this process creates (mkdir is atomic)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for n in itertools.count(1):
            run_id = commit[:7] if n == 1 else f"{commit[:7]}-{n}"
            with suppress(FileExistsError):
                self.run_dir(run_id).mkdir()
                return run_id

    def save(self, run):
        """Write run.json atomically (callers hold the lock)."""
        try:
            text = run.to_json()
            Run.from_dict(json.loads(text))  # what is written is what every later read accepts
        except (TypeError, ValueError, RecordError) as e:
            raise RecordError(f"run {run.id} is not a valid record ({e}); nothing was written") from None
        self.run_dir(run.id).mkdir(parents=True, exist_ok=True)
        write_atomic(self.run_dir(run.id) / RUN_JSON, text)
        self.problems.pop(run.id, None)

    def rebuild(self, runs=None):
        write_atomic(self.results, results_text(self.runs() if runs is None else runs))

    def set_status(self, run, status, by):
        """Append `status` to the run's history and rebuild (callers hold the lock); the same status again changes
        nothing. RecordError, with nothing changed, when the rules refuse it."""
        if run.status == "invalid" and status != "invalid":
            why = run.cases or "; ".join(run.harness_changes) or "see its analysis.md"
            raise RecordError(f"run {run.id} is invalid ({why}), so its status cannot change")
        if status == "keep":
            if run.val_bpb is None:
                raise RecordError(f"run {run.id} has no val_bpb (outcome {run.trained.outcome}): it cannot be kept")
            if run.caught:
                raise RecordError(f"run {run.id} was caught ({run.cases}): it cannot be kept")
            if run.description.endswith(UNCOMMITTED):
                raise RecordError(f"run {run.id} ran train.py with uncommitted changes, so no commit holds the code it "
                                  "measured: commit the change and rerun, or discard it")
            if problems := evidence_problems(self.run_dir(run.id), run):
                raise RecordError(f"run {run.id} cannot be kept: {problems[0]} (`uv run analyze.py audit` lists all)")
        if status != run.status:
            run.statuses.append(StatusChange(status, now_utc(), by))
            self.save(run)
            self.rebuild()


# Audit: each run against its evidence, itself and its pin; results.tsv against its derivation
def evidence_problems(run_dir, run):
    """The run's evidence files against their sha256, and run.log's final block against its number."""
    problems = [f"{name} was archived but is gone" if now is None else
                f"{name} changed after archiving (sha256 {digest[:8]} archived, {now[:8]} now)"
                for name, digest in sorted(run.evidence.items()) if (now := sha256_file(run_dir / name)) != digest]
    if run.val_bpb is not None and "run.log" in run.evidence:
        logged = final_block(run_dir / "run.log").get("val_bpb")
        if number(logged) is None or abs(number(logged) - run.val_bpb) > 5e-7:
            problems.append(f"run.log's final block says val_bpb {logged or 'nothing'}, run.json {run.val_bpb:.6f}")
    return problems


def record_problems(run):
    """The record against itself: its status against its number, caught cases, harness and history."""
    statuses, status, changes = [s.status for s in run.statuses], run.status, "; ".join(run.harness_changes)
    checks = [(status == "keep" and run.val_bpb is None, "kept without a val_bpb"),
              (run.caught and status != "invalid", f"caught ({run.cases}) but its status is {status}, not invalid"),
              (changes and status not in ("invalid", "crash"),
               f"its harness differed from the pin ({changes}) but its status is {status}, not invalid"),
              (not statuses, "its status history is empty"),
              ("invalid" in statuses and set(statuses[statuses.index("invalid"):]) != {"invalid"},
               f"its status history leaves invalid ({' -> '.join(statuses)}), which no command does")]
    return [problem for failed, problem in checks if failed]


def pin_problems(run, pins, commits, me):
    """The run's pin: still one of its branch's pins, on the branch; a kept run's commit on its branch. Another
    worker's run whose branch and pin this clone does not hold was made in another clone: not checked here (a
    sibling worktree shares the refs, so its deleted branch still has its pins and is checked)."""
    branch, pin = run.branch, run.pin
    if not branch or (not pin and run.harness_changes):  # detached HEAD, or no pin: already its harness_changes
        return []
    history, on_branch = pins(branch), commits(branch)   # on_branch: None when the branch does not exist here
    if on_branch is None and run.worker != me and pin not in history:
        return []
    if not pin:
        return ["run.json names no pin"]
    known, kept = ", ".join(p[:7] for p in history) or "none", run.status == "keep"
    checks = [(pin not in history,
               f"archived under pin {pin[:7]}, which is not one of branch {branch}'s pins (now: {known})"),
              (pin in history and on_branch is not None and pin not in on_branch,
               f"its pin {pin[:7]} is no longer on branch {branch}"),
              (kept and on_branch is None, f"kept, but its branch {branch} no longer exists"),
              (kept and on_branch is not None and run.commit not in on_branch,
               f"kept, but its commit {run.commit[:7]} is not on branch {branch}")]
    return [problem for failed, problem in checks if failed]


def audit(archive):
    """Every problem of the archive, one line each `<run id>: <problem>` (callers hold the lock): each run against
    its evidence, itself and its pin, unreadable run directories, results.tsv, and the working tree's harness."""
    @functools.cache
    def commits(branch):
        out = git("rev-list", f"refs/heads/{branch}", "--")
        return None if out is None else set(out.split())

    runs, me, pins = archive.runs(), worker_name(), functools.cache(pin_history)
    lines = [f"{name}: {line}" for name, line in archive.problems.items()]
    lines += [f"{path.name}: an empty run directory (an archive killed before it wrote); remove it"
              for path in archive.run_dirs() if not any(path.iterdir())]
    for run in runs:
        lines += [f"{run.id}: {problem}" for problem in evidence_problems(archive.run_dir(run.id), run)
                  + record_problems(run) + pin_problems(run, pins, commits, me)]
    results = archive.results.read_text(errors="replace") if archive.results.exists() else results_text([])
    if results != results_text(runs):  # `rebuild` mends it: every run is in its directory
        lines.append(f"{archive.results}: differs from the run directories (edited by hand, or missing); "
                     "`uv run analyze.py rebuild` rewrites it from them")
    pin = read_pin(branch) if (branch := current_branch()) else None
    return lines + [f"working tree: {c}; the next run will be recorded invalid" for c in
                    (harness_changes(pin) if pin else [])]

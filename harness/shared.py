"""
One archive, many writers: what the workers sharing an archive tell each other, and a view that reads
several archives as one.

Each worker's insights.md stays in its own worktree (the agent's file); after every archive and status
step a copy goes to <archive>/workers/<worker>/insights.md for the others to read. claims.tsv says what
each worker is trying now: a claim stays open until that worker's next archived run closes it with the
run's outcome, or its next claim replaces it. A view (`analyze.py --archive DIR --archive DIR2 ...`,
e.g. one archive per machine, copied home) reads them all and writes into none.
"""
import time
from collections import Counter
from pathlib import Path
from urllib.parse import quote, unquote

from harness.archive import (ARCHIVE_NAME, Paths, archive_lock, die, parse_results, paths, pick_best,
                             read_decisions, read_results, row_gpu, tsv_field, worker_name, write_atomic)
from harness.pin import current_branch

CLAIM_COLUMNS = ("opened_at", "worker", "branch", "idea", "state", "run_id", "val_bpb", "run_status", "closed_at")
IDEA_MAX_CHARS = 300       # a claim is a line, not a plan
CLOSED_SHOWN = 20          # `claims` lists the latest this many closed claims


def now():
    """UTC, so that claims made on nodes in different time zones sort and read alike."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---------------------------------------------------------------------------
# Each worker's insights.md, copied into the archive

def worker_dir(worker):
    """<archive>/workers/<worker, percent-encoded>: any name is one directory, and reads back exactly."""
    return paths().workers / quote(worker, safe="")


def snapshot_insights(worker):
    """Copy this worktree's insights.md into the archive when it changed (callers hold the lock)."""
    source = paths().insights
    if not source.exists():
        return
    text, target = source.read_bytes(), worker_dir(worker) / "insights.md"
    if target.exists() and target.read_bytes() == text:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, text)


def insight_snapshots():
    """[(worker, path)] of every snapshot in the archive, or in every archive of a view."""
    archives = [d for _, d in paths().view] or [paths().dir]
    return [(unquote(p.parent.name), p) for a in archives for p in sorted((a / "workers").glob("*/insights.md"))]


# ---------------------------------------------------------------------------
# claims.tsv

def read_claims(path=None):
    """The claims of claims.tsv (this archive's unless `path`), oldest first. A row with fields missing (a
    hand edit) is padded, one with more keeps them in its last column: no claim is ever dropped."""
    path = path or paths().claims
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    if not lines:
        return []
    header, claims = lines[0].split("\t"), []
    for line in lines[1:]:
        if line.strip():
            fields = line.split("\t")
            fields = fields[:len(header) - 1] + [" ".join(fields[len(header) - 1:])]
            claims.append(dict(zip(header, fields + [""] * (len(header) - len(fields)))))
    return claims


def write_claims(claims):
    header = list(CLAIM_COLUMNS) + list(dict.fromkeys(k for c in claims for k in c if k not in CLAIM_COLUMNS))
    lines = ["\t".join(header)] + ["\t".join(tsv_field(c.get(k, "")) for k in header) for c in claims]
    write_atomic(paths().claims, "\n".join(lines) + "\n")


def add_claim(worker, branch, idea):
    """Record `worker`'s open claim, marking its earlier open one abandoned (callers hold the lock).
    Returns (the abandoned claim or None, the other workers' open claims)."""
    claims = read_claims()
    replaced = None
    for c in claims:
        if c["worker"] == worker and c["state"] == "open":
            c.update(state="abandoned", closed_at=now())
            replaced = c
    claims.append({"opened_at": now(), "worker": worker, "branch": branch, "idea": idea, "state": "open"})
    write_claims(claims)
    return replaced, [c for c in claims if c["state"] == "open" and c["worker"] != worker]


def close_claim(worker, row):
    """The worker's open claim, closed by the run it archived (callers hold the lock)."""
    claims = read_claims()
    found = [c for c in claims if c["worker"] == worker and c["state"] == "open"]
    for c in found:
        c.update(state="closed", run_id=row["run_id"], val_bpb=row["val_bpb"], run_status=row["status"],
                 closed_at=now())
    if found:
        write_claims(claims)
    return found


def all_claims():
    return list(paths().claimed) if paths().view else read_claims()


def check_idea(idea):
    idea = " ".join(idea.split())
    if not idea or len(idea) > IDEA_MAX_CHARS:
        die(f"a claim is the idea in 1-{IDEA_MAX_CHARS} characters, e.g. "
            "`uv run analyze.py claim \"MATRIX_LR 0.04 -> 0.05\"`" + (f" (this one has {len(idea)})" if idea else ""))
    return idea


# ---------------------------------------------------------------------------
# A view over several archives

def view_labels(dirs):
    """The shortest trailing path that tells each archive apart (its parent's name for a directory called
    .auto-log-research): the label that qualifies a run id found in two archives."""
    parts = [[p for p in d.resolve().parts[1:] if p != ARCHIVE_NAME] or [d.name] for d in dirs]
    for k in range(1, max(map(len, parts)) + 1):
        labels = ["/".join(p[-k:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    die(f"--archive names one directory twice: {' '.join(map(str, dirs))}")


def open_view(dirs, out):
    """Paths serving a read-only view over the archives `dirs`, with plots to `out` (None: no plots).
    A run id held by two archives becomes <label>:<id> in both."""
    dirs = [Path(d) for d in dirs]
    for d in dirs:
        if not (d / "results.tsv").is_file():
            die(f"--archive {d}: no results.tsv there; name an archive directory (the AUTORESEARCH_ARCHIVE of "
                "a worker, by default .auto-log-research at its repository root)")
    labels = view_labels(dirs)
    loaded = [(parse_results(d / "results.tsv")[0], read_decisions(d / "decisions.jsonl")[0]) for d in dirs]
    counts = Counter(run_id for rows, _ in loaded for run_id in {r.get("run_id") for r in rows} if run_id)
    view = Paths(dirs[0], dirs[0], tuple(zip(labels, dirs)), out=Path(out) if out else None)
    for label, d, (rows, decided) in zip(labels, dirs, loaded):
        ids = {run_id: f"{label}:{run_id}" if counts[run_id] > 1 else run_id for run_id in counts}
        for r in rows:
            if r.get("run_id"):
                view.run_dirs[ids[r["run_id"]]] = d / r["run_id"]
                r["run_id"] = ids[r["run_id"]]
            view.rows.append(r)
        view.decided.update({ids.get(k, k): v for k, v in decided.items()})
        for c in read_claims(d / "claims.tsv"):
            view.claimed.append({**c, "run_id": ids.get(c.get("run_id"), c.get("run_id"))})
    return view


# ---------------------------------------------------------------------------
# The subcommands: workers, insights, claim, claims

def cmd_workers():
    """One line per worker: its branch, GPU, runs, best (on its latest harness and GPU) and open claim."""
    rows, claims = read_results(), all_claims()
    names = list(dict.fromkeys([r.get("worker") or "" for r in rows] + [c["worker"] for c in claims]))
    if not names:
        print(f"no workers yet: {paths().results} holds no runs and no claims")
        return 0
    for name in names:
        mine = [r for r in rows if (r.get("worker") or "") == name]
        latest = next((r for r in reversed(mine) if r.get("harness")), None)
        best = pick_best(rows, latest["harness"], row_gpu(latest), name or None) if latest else None
        claim = next((c for c in reversed(claims) if c["worker"] == name and c["state"] == "open"), None)
        print("\t".join([name or "(unknown: runs from before the worker column)",
                         f"branch {(mine[-1].get('branch') if mine else '') or (claim or {}).get('branch') or 'n/a'}",
                         f"GPU {(row_gpu(latest) if latest else '') or 'n/a'}", f"{len(mine)} runs",
                         f"best {best['run_id']} val_bpb {best['val_bpb']}" if best else "best none",
                         f"claim {claim['idea']!r} since {claim['opened_at']}" if claim else "no open claim"]))
    return 0


def cmd_insights(worker=None):
    """Print the latest insights.md snapshot of `worker`, or of every worker."""
    found = insight_snapshots()
    chosen = [(name, path) for name, path in found if worker is None or name == worker]
    if not chosen:
        known = ", ".join(dict.fromkeys(name for name, _ in found)) or "none yet"
        die(f"no insights.md snapshot of {'any worker' if worker is None else f'worker {worker!r}'} in "
            f"{paths().dir}/workers (workers with one: {known}); a worker's is copied at each of its archive steps")
    for name, path in chosen:
        stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))
        print(f"==> worker {name}: {path} (copied {stamp}) <==")
        print(path.read_text(errors="replace").rstrip() + "\n")
    return 0


def cmd_claim(idea):
    """Claim an idea for this worker, then show what the other workers have claimed."""
    idea, worker = check_idea(idea), worker_name()
    with archive_lock():
        replaced, others = add_claim(worker, current_branch() or "", idea)
    print(f"claimed by {worker}: {idea}")
    if replaced:
        print(f"- your earlier open claim is marked abandoned: {replaced['idea']}")
    print("open claims of the other workers:" if others else "no other worker has an open claim")
    for c in others:
        print(claim_line(c))
    return 0


def cmd_claims():
    """Open claims, then the latest closed ones with how they ended."""
    claims = all_claims()
    status = {r.get("run_id"): r.get("status") for r in read_results()}
    opened = [c for c in claims if c["state"] == "open"]
    closed = [c for c in claims if c["state"] != "open"][-CLOSED_SHOWN:]
    print(f"open claims ({len(opened)}):" if opened else "no open claims")
    for c in opened:
        print(claim_line(c))
    if closed:
        print(f"closed claims (the latest {len(closed)}):")
    for c in closed:
        print(claim_line(c, status.get(c.get("run_id"))))
    return 0


def claim_line(c, status_now=None):
    """One claim: when, who, on which branch, what; for a closed one, how it ended."""
    line = f"- {c['opened_at']}  {c['worker']}  {c['branch'] or '(no branch)'}  {c['idea']}"
    if c["state"] == "abandoned":
        return line + f"  -> abandoned {c['closed_at']} (replaced by a newer claim)"
    if c["state"] == "closed":
        return line + (f"  -> run {c['run_id']} val_bpb {c['val_bpb']} status {status_now or c['run_status']}"
                       f" ({c['closed_at']})")
    return line

"""
What the workers sharing one archive tell each other: what each one tries now (claims), each one's notes
(insights.md), and one line per worker. Optional: it reads the archive the core writes, and the core
never imports it.

Usage (in a worker's worktree, where contrib/workers.py set AUTORESEARCH_WORKER and AUTORESEARCH_ARCHIVE):
    uv run contrib/shared.py workers              # one line per worker: branch, GPU, runs, best, open claim
    uv run contrib/shared.py claim "IDEA"         # say what this worker tries next; prints the others' open claims
    uv run contrib/shared.py claims               # open claims, and how the latest ended
    uv run contrib/shared.py insights [WORKER]    # a worker's latest insights.md (every worker's without a name)
    uv run contrib/shared.py --archive DIR --archive DIR2 workers|claims|insights   # several archives, read only

claims.tsv holds what a claim says (when, who, on which branch, the idea), one line appended under the
archive's lock. How a claim ended is read off the runs each time, never stored: the first run its worker
archived after it closes it; the worker's next claim replaces it when no run came between; else it is open.
Each worker's insights.md stays in its worktree (the agent's file). A copy goes to
<archive>/workers/<worker>/insights.md whenever it changed and this script (claim, insights) or
contrib/workers.py (at each agent exit, every minute, at shutdown) looks at it.
"""
import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for harness/
from harness.record import (ARCHIVE_NAME, Archive, RecordError, Run, current_branch, worker_name,  # noqa: E402
                            write_atomic)

CLAIM_COLUMNS = ("opened_at", "worker", "branch", "idea")  # opened_at: unix seconds, as a run's archived_at
IDEA_MAX_CHARS = 300  # a claim is a line, not a plan
ENDED_SHOWN = 20      # `claims` lists the latest this many ended claims


@dataclass
class Claim:
    opened_at: float
    worker: str
    branch: str
    idea: str
    ended: str = "open"          # open | closed (by a run of its worker) | replaced (by its worker's next claim)
    run: Run | None = None       # the run that closed it
    label: str = ""              # the archive's label in a view of several


@dataclass
class Source:
    """One archive as this script reads it: its runs and claims (a view reads several)."""
    dir: Path
    label: str
    runs: list
    claims: list


def stamp(t):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


# ---------------------------------------------------------------------------
# Claims and insights on disk

def read_claims(directory):
    """The claims of <directory>/claims.tsv, oldest first; a line that is not one is named on stderr."""
    path = Path(directory) / "claims.tsv"
    lines = path.read_text(errors="replace").splitlines()[1:] if path.exists() else []
    claims = []
    for n, line in enumerate(lines, 2):
        fields = line.split("\t", 3)
        try:
            claims.append(Claim(float(fields[0]), fields[1], fields[2], fields[3]))
        except (ValueError, IndexError):
            print(f"{path}:{n}: not a claim ({' '.join(CLAIM_COLUMNS)}, tab-separated): skipped", file=sys.stderr)
    return sorted(claims, key=lambda c: c.opened_at)


def add_claim(archive, worker, branch, idea):
    """Append one claim to the archive's claims.tsv, under the archive's lock."""
    archive.dir.mkdir(parents=True, exist_ok=True)
    path = archive.dir / "claims.tsv"
    with archive.lock(), open(path, "a") as f:
        if f.tell() == 0:
            f.write("\t".join(CLAIM_COLUMNS) + "\n")
        f.write(f"{time.time():.6f}\t{worker}\t{branch}\t{idea}\n")


def settle(claims, runs):
    """How each claim ended, from the runs (oldest first): closed by the first run of its worker archived
    after it and before its worker's next claim; replaced when that next claim came first; open otherwise."""
    for i, c in enumerate(claims):
        until = next((d.opened_at for d in claims[i + 1:] if d.worker == c.worker), None)
        c.run = next((r for r in runs if r.worker == c.worker and c.opened_at <= r.archived_at
                      and (until is None or r.archived_at < until)), None)
        c.ended = "closed" if c.run else "open" if until is None else "replaced"
    return claims


def snapshot(directory, worker, source):
    """Copy a worker's insights.md (`source`) to <directory>/workers/<worker>/insights.md when it changed.
    Each worker writes only its own copy, whole: no lock needed. True when copied."""
    if not Path(source).is_file():
        return False
    text, target = Path(source).read_bytes(), Path(directory) / "workers" / quote(worker, safe="") / "insights.md"
    if target.is_file() and target.read_bytes() == text:
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, text)
    return True


def snapshots(sources):
    """[(worker, path)] of every insights.md copy in the archives."""
    return [(unquote(p.parent.name), p) for s in sources for p in sorted((s.dir / "workers").glob("*/insights.md"))]


# ---------------------------------------------------------------------------
# Archives: this worker's, or a read-only view of several

def open_archive(archive):
    runs = archive.runs()
    return Source(archive.dir, "", runs, settle(read_claims(archive.dir), runs))


def labels(dirs):
    """The shortest trailing paths that tell the archives apart (ARCHIVE_NAME left out): a view shows
    run ids as <label>:<id>, since two machines' runs of one commit have one id."""
    parts = [[p for p in d.resolve().parts[1:] if p != ARCHIVE_NAME] or [d.name] for d in dirs]
    for k in range(1, max(map(len, parts)) + 1):
        found = ["/".join(p[-k:]) for p in parts]
        if len(set(found)) == len(found):
            return found
    raise SystemExit(f"shared.py: --archive names one directory twice: {' '.join(map(str, dirs))}")


def open_view(dirs):
    sources = []
    for d, label in zip(dirs, labels(dirs)):
        if not d.is_dir():
            raise SystemExit(f"shared.py: --archive {d}: no such directory; name an archive (a worker's "
                             "AUTORESEARCH_ARCHIVE, by default .auto-log-research at its repository root)")
        runs = Archive(d).runs()
        claims = settle(read_claims(d), runs)
        for c in claims:
            c.label = label
        sources.append(Source(d, label, runs, claims))
    return sources


def run_name(run, label):
    return f"{label}:{run.id}" if label else run.id


# ---------------------------------------------------------------------------
# The commands

def claim_line(c):
    """One claim: when, who, on which branch, what; for an ended one, how it ended."""
    line = f"- {stamp(c.opened_at)}  {c.worker}  {c.branch or '(no branch)'}  {c.idea}"
    if c.ended == "closed":
        bpb = "n/a" if c.run.val_bpb is None else f"{c.run.val_bpb:.6f}"
        return line + f"  -> run {run_name(c.run, c.label)} val_bpb {bpb} status {c.run.status}"
    return line + ("  -> replaced by a newer claim" if c.ended == "replaced" else "")


def cmd_claim(archive, idea):
    """Claim an idea for this worker (its insights.md copied first), then show the other workers' open claims."""
    idea, worker = " ".join(idea.split()), worker_name()
    if not idea or len(idea) > IDEA_MAX_CHARS:
        raise SystemExit(f"shared.py: a claim is the idea in 1-{IDEA_MAX_CHARS} characters, e.g. "
                         "`uv run contrib/shared.py claim \"MATRIX_LR 0.04 -> 0.05\"`")
    snapshot(archive.dir, worker, archive.local / "insights.md")
    claims = open_archive(archive).claims
    add_claim(archive, worker, current_branch() or "", idea)
    print(f"claimed by {worker}: {idea}")
    for c in claims:
        if c.worker == worker and c.ended == "open":
            print(f"- your earlier open claim is now replaced: {c.idea}")
    others = [c for c in claims if c.ended == "open" and c.worker != worker]
    print("open claims of the other workers:" if others else "no other worker has an open claim")
    for c in others:
        print(claim_line(c))
    return 0


def cmd_claims(sources):
    """Open claims, then the latest ended ones with how they ended."""
    claims = sorted((c for s in sources for c in s.claims), key=lambda c: c.opened_at)
    opened = [c for c in claims if c.ended == "open"]
    ended = [c for c in claims if c.ended != "open"][-ENDED_SHOWN:]
    print(f"open claims ({len(opened)}):" if opened else "no open claims")
    for c in opened:
        print(claim_line(c))
    if ended:
        print(f"ended claims (the latest {len(ended)}):")
    for c in ended:
        print(claim_line(c))
    return 0


def worker_line(name, runs, claim, label):
    """A worker's branch, GPU, runs, best (its last kept run on its latest branch, harness and GPU), claim."""
    latest = runs[-1] if runs else None
    kept = [r for r in runs if r.status == "keep" and r.val_bpb is not None and latest.branch == r.branch
            and (r.harness_key, r.gpu) == (latest.harness_key, latest.gpu)]
    best = f"best {run_name(kept[-1], label)} val_bpb {kept[-1].val_bpb:.6f}" if kept else "best none"
    return "\t".join([name, f"branch {(latest.branch if latest else claim and claim.branch) or 'n/a'}",
                      f"GPU {latest.gpu if latest else 'n/a'}", f"{len(runs)} runs", best,
                      f"claim {claim.idea!r} since {stamp(claim.opened_at)}" if claim else "no open claim"])


def cmd_workers(sources):
    """One line per worker of each archive."""
    lines = []
    for s in sources:
        names = dict.fromkeys([r.worker for r in s.runs] + [c.worker for c in s.claims])
        for name in names:
            claim = next((c for c in reversed(s.claims) if c.worker == name and c.ended == "open"), None)
            shown = f"{s.label}:{name}" if s.label else name
            lines.append(worker_line(shown, [r for r in s.runs if r.worker == name], claim, s.label))
    print("\n".join(lines) if lines else "no workers yet: the archive holds no runs and no claims")
    return 0


def cmd_insights(sources, worker=None):
    """Print the latest insights.md copy of `worker`, or of every worker."""
    found = snapshots(sources)
    chosen = [(name, path) for name, path in found if worker is None or name == worker]
    if not chosen:
        known = ", ".join(dict.fromkeys(name for name, _ in found)) or "none yet"
        raise SystemExit(f"shared.py: no insights.md copy of {'any worker' if worker is None else repr(worker)} "
                         f"in the archive (workers with one: {known}); contrib/workers.py copies each worker's")
    for name, path in chosen:
        print(f"==> worker {name}: {path} (copied {stamp(path.stat().st_mtime)}) <==")
        print(path.read_text(errors="replace").rstrip() + "\n")
    return 0


def main(argv=None):
    try:
        return command(argv)
    except RecordError as e:  # a bad AUTORESEARCH_WORKER
        raise SystemExit(f"shared.py: {e}") from None


def command(argv):
    p = argparse.ArgumentParser(description="Claims, insights and workers of an archive shared by many workers.")
    p.add_argument("--archive", type=Path, action="append", help="read these archives (a view: no writes)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("workers", help="one line per worker: branch, GPU, runs, best, open claim")
    sub.add_parser("claim", help="say what this worker tries next").add_argument("idea")
    sub.add_parser("claims", help="open claims, and how the latest ended")
    sub.add_parser("insights", help="a worker's latest insights.md").add_argument("worker", nargs="?")
    args = p.parse_args(argv)
    if args.archive and args.command == "claim":
        raise SystemExit("shared.py: --archive makes a read-only view: claim from a worker's worktree")
    archive = None if args.archive else Archive.here()
    if archive and args.command == "insights":
        snapshot(archive.dir, worker_name(), archive.local / "insights.md")
    if args.command == "claim":
        return cmd_claim(archive, args.idea)
    sources = open_view([d.expanduser() for d in args.archive]) if args.archive else [open_archive(archive)]
    if args.command == "insights":
        return cmd_insights(sources, args.worker)
    return cmd_workers(sources) if args.command == "workers" else cmd_claims(sources)


if __name__ == "__main__":
    sys.exit(main())

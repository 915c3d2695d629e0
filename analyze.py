"""
Everything that happens after a run, from the command line; harness/ does the work (README: "How it works").

Usage:
    uv run analyze.py run ["DESCRIPTION"]        # one experiment: commit train.py, train, measure, archive, decide
    uv run analyze.py                            # archive the run in this directory (train.py run by hand)
    uv run analyze.py list                       # every archived run, one line each
    uv run analyze.py show ID                    # a run's analysis.md
    uv run analyze.py compare A B                # two runs side by side, plus overlay plots
    uv run analyze.py best                       # this worker's best run: the one most recently kept
    uv run analyze.py status ID keep|discard|crash
    uv run analyze.py curve KEY [IDS...] [--at 0.25,0.5,0.75,1]   # a metrics.jsonl key at points of progress
    uv run analyze.py audit                      # every run against its evidence and pin; exit 1 on a problem
    uv run analyze.py rebuild                    # results.tsv and progress.png, from the run directories
    uv run analyze.py pin                        # set-up: pin the branch's harness at HEAD (once; never moves it)
    uv run analyze.py repin [COMMIT]             # humans only, at a terminal: move the branch's pin
"""
import sys

sys.path.append(sys.path.pop(0))  # the repository root last: a root-level argparse.py cannot stand in for the stdlib's
import argparse  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402

# The harness runs only code that git pins: none of this repository's bytecode is read (a train.py run without a
# sandbox could have written some) and none is written (compiling harness/ from source takes milliseconds)
sys.dont_write_bytecode = True
for _cache in ("__pycache__", "harness/__pycache__"):
    shutil.rmtree(os.path.join(os.path.dirname(os.path.abspath(__file__)), _cache), ignore_errors=True)

from harness import loop, report  # noqa: E402
from harness.decide import best_of
from harness.record import (Archive, RecordError, audit, current_branch, ensure_pin, move_pin, pinned_blobs, read_pin,
                            worker_name)
from harness.stats import read_metrics


def parser():
    """The command line; `--help` prints this module's docstring, the one description of every command."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("run").add_argument("description", nargs="?", help="the commit message for train.py")
    sub.add_parser("show").add_argument("id")
    sub.add_parser("compare").add_argument("ids", nargs=2, metavar="ID")
    status = sub.add_parser("status")
    status.add_argument("id")
    status.add_argument("status", choices=("keep", "discard", "crash"))
    curve = sub.add_parser("curve")
    curve.add_argument("key", help="e.g. train/loss_smooth, val/bpb, perf/tokens_per_sec")
    curve.add_argument("ids", nargs="*")
    curve.add_argument("--at", default="0.25,0.5,0.75,1", help="progress points, comma-separated (default %(default)s)")
    for name in ("list", "best", "audit", "rebuild", "pin"):
        sub.add_parser(name)
    sub.add_parser("repin").add_argument("commit", nargs="?", default="HEAD")
    return p


def cmd_show(archive, run_id):
    with archive.lock():  # analysis.md is written again when a killed archive never wrote it
        print(report.show_text(archive.find(run_id), archive))


def cmd_status(archive, run_id, status):
    me = worker_name()
    with archive.lock():
        run = archive.find(run_id)
        if run.worker != me:
            raise RecordError(f"run {run.id} is worker {run.worker}'s, not {me}'s: decide only your own runs")
        archive.set_status(run, status, "analyze.py status")
        runs = archive.runs()
        report.write_analysis(run, runs, archive)
        report.draw_progress(runs, archive.progress)
    print(f"{run.id}: {status}")


def cmd_curve(archive, key, ids, at):
    """KEY of each run at each progress point: the last value logged at or before it."""
    try:
        points = [float(x) + 1e-9 for x in at.split(",")]  # a value logged at a point itself counts
    except ValueError:
        raise RecordError(f"--at {at!r} is not comma-separated numbers (e.g. 0.25,0.5,0.75,1)") from None
    every = archive.runs()
    runs = [archive.find(i) for i in ids] or ([r for r in (best_of(every, every[-1]), every[-1]) if r] if every else [])
    if not runs:
        raise RecordError(f"no runs archived yet in {archive.dir}")
    print(f"{key} at progress " + " ".join(f"{p:>9g}" for p in points))
    for run in runs:
        metrics = read_metrics(archive.run_dir(run.id) / "metrics.jsonl")[0]
        values = list(zip(*metrics.series(key))) if metrics else []  # [] when the key was never logged
        cells = (next((f"{v:9.4f}" for p, _, v in reversed(values) if p <= point), "      n/a") for point in points)
        missing = "" if values else f"  ({key} not logged)"
        print(f"{run.id} ({run.status})".ljust(len(key) + 13) + " ".join(cells) + missing)


def cmd_audit(archive):
    with archive.lock():  # a snapshot: no archive or status is half-way through while it reads
        lines = audit(archive)
    print(*lines, f"audit: {len(archive.runs())} runs, " + (f"{len(lines)} problems" if lines else "clean"), sep="\n")
    return 1 if lines else 0


def cmd_rebuild(archive):
    with archive.lock():
        runs = archive.runs()
        archive.rebuild(runs)
        report.draw_progress(runs, archive.progress)
    skipped = f"; {len(archive.problems)} run directories unreadable (named above)" if archive.problems else ""
    print(f"{archive.results}: rebuilt from {len(runs)} runs{skipped}")


def cmd_pin(archive):
    branch = current_branch()
    with archive.lock():
        pin, problem = ensure_pin(branch, archive.runs())
    if problem:
        raise RecordError(problem)
    files = pinned_blobs(pin)
    print(f"{branch} is pinned at {pin[:7]}: {len(files)} harness files ({', '.join(sorted(files))})")


def cmd_repin(commit):
    branch = current_branch()
    if not sys.stdin.isatty():
        raise RecordError("repin moves the harness pin every run is checked against, so a human confirms it at a "
                          "terminal; stdin is not one here")
    old = read_pin(branch)
    changed = sorted({p for p, _ in set(pinned_blobs(old).items() if old else ()) ^ set(pinned_blobs(commit).items())})
    print(f"pin of {branch}: {old[:7] if old else 'none'} -> {commit}; harness files that differ: "
          f"{', '.join(changed) or 'none'}")
    if input(f"type the branch name ({branch}) to re-pin it: ").strip() != branch:
        raise RecordError("not re-pinned")
    if not move_pin(branch, commit):
        raise RecordError(f"the pin of {branch} did not move: {commit!r} is no commit, or the pin moved meanwhile")
    print(f"{branch} is pinned at {read_pin(branch)[:7]}")


def main(argv=None):
    args = parser().parse_args(argv)
    archive = Archive.here()
    try:
        worker_name()  # a bad AUTORESEARCH_WORKER stops every command with one line, before anything is read
        if args.command in ("pin", "repin") and current_branch() is None:
            raise RecordError("HEAD is detached: check out the experiment's branch, then (re)pin it")
        commands = {  # each returns its exit status, or None for 0
            None: loop.archive_here, "run": lambda: loop.cmd_run(args.description),
            "list": lambda: print(report.list_text(archive.runs())), "show": lambda: cmd_show(archive, args.id),
            "best": lambda: print(report.best_text(archive.runs(), worker_name())),
            "compare": lambda: print(report.compare_text(*map(archive.find, args.ids), archive)),
            "status": lambda: cmd_status(archive, args.id, args.status), "audit": lambda: cmd_audit(archive),
            "curve": lambda: cmd_curve(archive, args.key, args.ids, args.at), "rebuild": lambda: cmd_rebuild(archive),
            "pin": lambda: cmd_pin(archive), "repin": lambda: cmd_repin(args.commit)}
        status = commands[args.command]() or 0
        sys.stdout.flush()
    except RecordError as e:
        print(f"analyze.py: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `show ID | head` closed stdout: what it wanted was printed
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush has somewhere to go
        return 0
    return status


if __name__ == "__main__":
    sys.exit(main())

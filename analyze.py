"""
Everything that happens after a run: archive it, explain it against the best run so far, and keep
the experiment log that the research loop steers by; and the one command an experiment is.

Usage:
    uv run analyze.py run ["DESCRIPTION"]        # one experiment: commit train.py, train, measure, archive, decide
    uv run analyze.py                            # archive the run in this directory, write analysis.md and plots
    uv run analyze.py list [--worker NAME]       # every archived run, one line each
    uv run analyze.py show ID                    # print a run's analysis.md
    uv run analyze.py compare A B                # two runs side by side, plus an overlay plot
    uv run analyze.py best                       # this worker's best run: the one most recently kept
    uv run analyze.py status ID keep|discard|crash
    uv run analyze.py audit                      # check the archive against its evidence; names every inconsistency
    uv run analyze.py pin                        # set-up: pin the branch's harness at HEAD (once; never moves it)
    uv run analyze.py repin [COMMIT]             # humans only, at a terminal: move the branch's pin
    uv run analyze.py workers                    # the workers sharing this archive: branch, GPU, runs, best, claim
    uv run analyze.py insights [WORKER]          # a worker's latest insights.md (every worker's without a name)
    uv run analyze.py claim "IDEA"               # say what this worker tries next; prints the others' open claims
    uv run analyze.py claims                     # open claims, and how the latest closed ones ended
    uv run analyze.py --archive DIR [--archive DIR2 ...] [--out DIR] list|best|workers|show|compare|claims|insights
                                                 # read several archives as one, writing into none of them

It reads run_summary.json and metrics.jsonl (written by train.py) and run.log (the shell's redirect)
in the working directory, git (the commit, and the branch's harness pin), and the archive
(AUTORESEARCH_ARCHIVE, by default .auto-log-research/ at the repository root, which several worktrees
and machines may share): results.tsv, decisions.jsonl, claims.tsv, the few run directories it compares
(this run, the best, the previous one; the record.json of this commit's earlier runs), and this
worktree's own .auto-log-research/insights.md. Nothing else, so its cost does not grow with history;
only `audit` reads every run.

This file is the command line; the work is done by the harness package beside it: harness/archive.py
(where the archive is, results.tsv, the best), capture.py (the run in the working directory), pin.py
(the harness pin, in git), audit.py (the archive against its evidence), metrics.py (one run's curves),
noise.py (differences beyond noise), changes.py (code diffs), report.py (analysis.md), plots.py (the
PNGs), shared.py (workers sharing an archive: claims, insights, views), runner.py (`run`: train.py in a
child process on the harness's clock, its model measured by harness/evaluate.py, the decision of
decide.py applied) and commands.py (one function per subcommand; `audit` is audit.py's, the workers'
are shared.py's, `run` is runner.py's).
"""
import sys  # built into the interpreter: no file in the repository can stand in for it

if __name__ == "__main__":
    # Before any other import. `python analyze.py` puts this directory first on sys.path, where an untracked
    # argparse.py (or json.py, ...) would shadow the standard library: move it to the end, so the stdlib
    # and site-packages come first and only this project's own names (harness, prepare) are found here.
    if not getattr(sys.flags, "safe_path", False) and not sys.flags.isolated:  # -P / -I add no directory
        sys.path.append(sys.path.pop(0))
    import os  # the standard library's, now

    # Bytecode is read and written outside the repository, so a forged __pycache__/*.pyc in it is never run.
    sys.pycache_prefix = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                      "auto-log-research", "pycache")

import argparse
import os

from harness import audit, commands, runner, shared
from harness.archive import die, read_results, serve_view, worker_name
from harness.plots import draw_progress

VIEW_COMMANDS = ("list", "best", "workers", "show", "compare", "claims", "insights")  # read-only


def parser():
    p = argparse.ArgumentParser(description="Archive and explain training runs (no subcommand: archive the "
                                            "run in the working directory).")
    p.add_argument("--archive", action="append", metavar="DIR",
                   help="read these archives as one, writing into none (repeat it; only with "
                        f"{', '.join(VIEW_COMMANDS)})")
    p.add_argument("--out", metavar="DIR", help="with --archive: draw progress.png and compare plots here")
    sub = p.add_subparsers(dest="command")
    sub.add_parser("run", help="one experiment: commit train.py, train, measure, archive and decide (exit 2: refused, "
                   "130: interrupted)").add_argument(
        "description", nargs="?", help="the commit message for a changed train.py (ignored when it is unchanged)")
    sub.add_parser("list", help="every archived run, one line each").add_argument(
        "--worker", metavar="NAME", help="only this worker's runs")
    sub.add_parser("show", help="print a run's analysis.md").add_argument("id")
    compare = sub.add_parser("compare", help="two runs side by side, plus an overlay plot")
    compare.add_argument("a")
    compare.add_argument("b")
    sub.add_parser("best", help="this worker's best run, and the best of all workers")
    status = sub.add_parser("status", help="mark a run keep, discard or crash")
    status.add_argument("id")
    status.add_argument("status", choices=("keep", "discard", "crash"))
    sub.add_parser("audit", help="check the archive against its evidence; exit 1 on any inconsistency")
    sub.add_parser("pin", help="set-up: pin the current branch's harness at HEAD unless it has a pin")
    sub.add_parser("repin", help="humans only: move the current branch's pin (asks at a terminal)").add_argument(
        "commit", nargs="?", default="HEAD")
    sub.add_parser("workers", help="one line per worker: branch, GPU, runs, best, open claim")
    sub.add_parser("insights", help="a worker's latest insights.md snapshot (all workers' without a name)"
                   ).add_argument("worker", nargs="?")
    sub.add_parser("claim", help="record what this worker tries next, and print the other workers' open claims"
                   ).add_argument("idea")
    sub.add_parser("claims", help="open claims, and how the latest closed ones ended")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    worker_name()  # a bad AUTORESEARCH_WORKER stops every command with one line, before anything is read
    if args.out and not args.archive:
        die("--out goes with --archive: it is where a view over archives draws its plots")
    if args.archive and args.command not in VIEW_COMMANDS:
        die(f"`{args.command or 'archive'}` writes to an archive, and --archive makes a read-only view; "
            f"set AUTORESEARCH_ARCHIVE=DIR instead (a view serves {', '.join(VIEW_COMMANDS)})")
    serve_view(shared.open_view(args.archive, args.out) if args.archive else None)
    try:
        status = run_command(args)
        if args.out:  # a view's own progress.png, of all its archives' runs
            draw_progress(read_results())
        sys.stdout.flush()
    except BrokenPipeError:  # `show ID | head` closed stdout: what it wanted was printed
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit flush has somewhere to go
        return 0
    finally:
        serve_view(None)
    return status


COMMANDS = {  # subcommand -> its function of the parsed arguments
    None: lambda a: commands.cmd_archive(), "list": lambda a: commands.cmd_list(a.worker),
    "show": lambda a: commands.cmd_show(a.id), "compare": lambda a: commands.cmd_compare(a.a, a.b),
    "best": lambda a: commands.cmd_best(), "audit": lambda a: audit.cmd_audit(),
    "pin": lambda a: commands.cmd_pin(), "repin": lambda a: commands.cmd_repin(a.commit),
    "status": lambda a: commands.cmd_status(a.id, a.status), "workers": lambda a: shared.cmd_workers(),
    "insights": lambda a: shared.cmd_insights(a.worker), "claim": lambda a: shared.cmd_claim(a.idea),
    "claims": lambda a: shared.cmd_claims(), "run": lambda a: runner.cmd_run(a.description),
}


def run_command(args):
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

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
    uv run analyze.py audit                      # check the archive against its evidence; names every inconsistency
    uv run analyze.py pin                        # set-up: pin the branch's harness at HEAD (once; never moves it)
    uv run analyze.py repin [COMMIT]             # humans only, at a terminal: move the branch's pin

It reads run_summary.json and metrics.jsonl (written by train.py) and run.log (the shell's redirect)
in the working directory, git (the commit, and the branch's harness pin), and its own archive under
.auto-log-research/: results.tsv, decisions.jsonl, the few run directories it compares (this run, the
best, the previous one; the record.json of this commit's earlier runs), and insights.md on `status`.
Nothing else, so its cost does not grow with history; only `audit` reads every run.

This file is the command line; the work is done by the harness package beside it: harness/archive.py
(the archive, results.tsv, the best), capture.py (the run in the working directory), pin.py (the
harness pin, in git), audit.py (the archive against its evidence), metrics.py (one run's curves),
noise.py (differences beyond noise), changes.py (code diffs), report.py (analysis.md), plots.py (the
PNGs) and commands.py (one function per subcommand; `audit` is audit.py's).
"""
import argparse
import os
import sys

from harness import audit, commands


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
    sub.add_parser("audit", help="check the archive against its evidence; exit 1 on any inconsistency")
    sub.add_parser("pin", help="set-up: pin the current branch's harness at HEAD unless it has a pin")
    sub.add_parser("repin", help="humans only: move the current branch's pin (asks at a terminal)").add_argument(
        "commit", nargs="?", default="HEAD")
    args = parser.parse_args(argv)
    try:
        status = run_command(args)
        sys.stdout.flush()
    except BrokenPipeError:  # `show ID | head` closed stdout: what it wanted was printed
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit flush has somewhere to go
        return 0
    return status


def run_command(args):
    if args.command is None:
        return commands.cmd_archive()
    if args.command == "list":
        return commands.cmd_list()
    if args.command == "show":
        return commands.cmd_show(args.id)
    if args.command == "compare":
        return commands.cmd_compare(args.a, args.b)
    if args.command == "best":
        return commands.cmd_best()
    if args.command == "audit":
        return audit.cmd_audit()
    if args.command == "pin":
        return commands.cmd_pin()
    if args.command == "repin":
        return commands.cmd_repin(args.commit)
    return commands.cmd_status(args.id, args.status)


if __name__ == "__main__":
    sys.exit(main())

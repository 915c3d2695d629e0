"""
The subcommands of analyze.py: each prints its answer and returns the exit status. Every one that
writes to the archive holds its lock.
"""
import sys
from pathlib import Path

from harness.archive import (append_decision, archive_lock, best_for, comparable, die, find_own_row, find_row,
                             latest_row, load_run, own, own_comparable, paths, pick_best, read_json, read_results,
                             remove_leftovers, row_bpb, row_gpu, vetted_best, worker_name, write_current_best,
                             write_results)
from harness.audit import run_problems
from harness.capture import capture_run, head_commit, record_run, uncommitted_train_py
from harness.changes import code_diff, config_diff
from harness.noise import compare_curves, compare_steps, noise_band
from harness.pin import (blob_changes, current_branch, ensure_pin, move_pin, pin_ref, pinned_blobs, read_pin,
                         resolve_commit)
from harness.plots import draw_overlays, draw_progress
from harness.report import fmt, report_run, set_headline_status
from harness.shared import close_claim, snapshot_insights


def cmd_archive():
    head = head_commit()
    if not Path("run_summary.json").exists() and not Path("run.log").exists():
        die(f"nothing to archive in {Path.cwd()}: no run_summary.json and no run.log "
            "(train.py writes the first, `uv run train.py > run.log 2>&1` the second)")
    worker = worker_name()
    with archive_lock():
        remove_leftovers(paths().dir)
        rows = read_results()
        capture = capture_run(head, rows)
        row = next((r for r in rows if r.get("run_key") == capture.key), None)
        analysis = paths().run_dir(row["run_id"]) / "analysis.md" if row is not None else None
        if analysis is not None and analysis.exists():
            print(f"already archived as {row['run_id']}: {analysis} (nothing added)")
            return 0
        if row is None:
            renamed_hint(rows, worker)
            row = record_run(capture, rows)
            rows.append(row)
            write_results(rows)  # the record is safe from here on; analysis and plots follow
            close_claim(worker, row)
        text = report_run(load_run(row), rows)
        draw_progress(rows)
        snapshot_insights(worker)
    print(text.splitlines()[0])  # the decision, then the headline
    print(text.split("\n\n## ")[1])
    print(f"archived as {row['run_id']}: {paths().run_dir(row['run_id']) / 'analysis.md'}")
    return 0


def cmd_list(worker=None):
    """Every run, or `worker`'s; a * marks each worker's best under each harness and GPU model."""
    rows = read_results()
    shown = [r for r in rows if worker is None or r.get("worker") == worker]
    if not shown:
        print(f"no runs archived yet ({paths().results} is missing or empty)" if not rows else
              f"no runs of worker {worker!r} (workers: {', '.join(sorted({r.get('worker') or '?' for r in rows}))})")
        return 0
    workers = {r["worker"] for r in rows if r.get("worker")} or {None}  # rows of unknown worker are everyone's
    classes = {(r.get("harness", ""), row_gpu(r)) for r in rows}
    bests = [pick_best(rows, h, g or None, w) for h, g in classes for w in workers]
    gpus = len({row_gpu(r) for r in rows if row_gpu(r)}) > 1  # one GPU model: no column to tell apart
    width = max([len(r.get("worker") or "") for r in shown] + [6])
    print(f"{'run':<12} {'val_bpb':>9} {'mem_gb':>6}  {'status':<8} {'outcome':<15} {'harness':<13} "
          f"{'worker':<{width}} " + (f"{'gpu':<14} " if gpus else "") + "description")
    for r in shown:  # .get: a results.tsv of karpathy/autoresearch's five columns lists too
        mark = "*" if any(r is b for b in bests) else " "
        run_id = r.get("run_id") or r.get("commit", "")
        print(f"{run_id:<11}{mark} {r.get('val_bpb', ''):>9} {r.get('memory_gb', ''):>6}  "
              f"{r.get('status', ''):<8} {r.get('outcome', ''):<15} {r.get('harness', ''):<13} "
              f"{r.get('worker') or '?':<{width}} " + (f"{row_gpu(r) or '?':<14} " if gpus else "")
              + r.get("description", ""))
    return 0


def cmd_show(run_id):
    rows = read_results()
    row = find_row(rows, run_id)
    path = paths().run_dir(row["run_id"]) / "analysis.md"
    if not path.exists():  # an invocation was killed between recording the run and analysing it
        if paths().view:
            die(f"{path} is missing, and a view over --archive directories rebuilds nothing; "
                f"run `uv run analyze.py show {run_id}` where that archive is written")
        with archive_lock():
            report_run(load_run(row), rows)
    print(path.read_text())
    return 0


def cmd_best():
    """This worker's best: the run most recently kept on the latest harness and GPU model it ran; then,
    when other workers ran there too, the best of all workers' bests."""
    rows, worker = read_results(), worker_name()
    latest = latest_row(rows, worker) or latest_row(rows)  # a worker with no runs yet (or a view): the latest of any
    harness, gpu = (latest["harness"], row_gpu(latest) or None) if latest else ("", None)
    pool = comparable(rows, harness, gpu)
    if paths().view:  # a view belongs to no worker: its best is the best of all workers' bests
        worker = None
    best, passed = vetted_best(own_comparable(rows, harness, gpu, worker)) if worker else (None, [])
    for row, problems in passed:  # stderr: the first line of stdout stays the best's id
        print(f"analyze.py: {row['run_id']} is passed over as best, its evidence is inconsistent: "
              f"{problems[0]} (`uv run analyze.py audit` lists all)", file=sys.stderr)
    if worker is not None and best is None:
        renamed_hint(rows, worker)
        print(("no best run yet" if any(own(r, worker) for r in rows) or not rows else f"no run of worker {worker}")
              + ": no valid run under the latest harness" + (" whose evidence is consistent" if passed else ""))
    elif worker is not None:
        print(best_line(best, "most recently kept"))
    others = list(dict.fromkeys(r["worker"] for r in pool if r.get("worker") and r["worker"] != worker))
    if others or worker is None:  # a view of archives from before the worker column has one unnamed worker
        names = [worker, *others] if worker is not None else others or [None]
        bests = [b for w in names if (b := pick_best(rows, harness, gpu, w)) is not None]
        if bests:
            top = min(bests, key=row_bpb)
            print(best_line(top, f"the lowest of {len(bests)} workers' bests (harness {harness}, GPU "
                                 f"{gpu or 'unknown'}), worker {top.get('worker') or '?'}", "all workers: "))
        elif worker is None:
            print("no best run yet: no valid run under the latest harness in these archives")
    return 0


def renamed_hint(rows, worker):
    """On stderr: this worker has no runs, but this branch has another worker's. The default name carries
    the hostname, which a new container changes; the earlier runs are then no longer this worker's own."""
    branch = None if paths().view or any(own(r, worker) for r in rows) else current_branch()
    names = list(dict.fromkeys(r["worker"] for r in rows if branch and r.get("branch") == branch and r.get("worker")))
    if names:
        print(f"analyze.py: worker {worker} has no runs, but branch {branch} has runs of worker {names[-1]}; if that "
              f"was this worker under another hostname, set AUTORESEARCH_WORKER={names[-1]}", file=sys.stderr)


def best_line(best, rule, prefix=""):
    run_id = best.get("run_id") or best["commit"]
    where = paths().run_dir(run_id) / "analysis.md"
    return (f"{prefix}{run_id}\tcommit {best['commit']}\tval_bpb {best['val_bpb']}\tstatus {best['status']}\t"
            f"{best.get('description', '')}\t{where}\t{rule}")


def cmd_compare(id_a, id_b):
    rows = read_results()
    a, b = load_run(find_row(rows, id_a)), load_run(find_row(rows, id_b))
    lines = [f"compare {a.id} (A) with {b.id} (B)"]
    for tag, r in (("A", a), ("B", b)):
        lines.append(f"- {tag} {r.id}: val_bpb {fmt(r.bpb, '.6f')}, status {r.row['status']}, "
                     f"steps {r.row.get('num_steps') or 'n/a'}, harness {r.row['harness'] or 'unknown'}, "
                     f"worker {r.row.get('worker') or 'unknown'}, GPU {row_gpu(r.row) or 'unknown'}: "
                     f"{r.row['description']}")
    if a.bpb is not None and b.bpb is not None:
        lines.append(f"- val_bpb B - A: {b.bpb - a.bpb:+.6f}")
    if a.row["harness"] != b.row["harness"]:
        lines.append("- different harness settings: their numbers are not comparable")
    if row_gpu(a.row) and row_gpu(b.row) and row_gpu(a.row) != row_gpu(b.row):
        lines.append(f"- different devices, A on {row_gpu(a.row)} and B on {row_gpu(b.row)}: on a fixed time budget "
                     "val_bpb and speed depend on the device, so the difference is not the code's alone")
    if a.summary and b.summary:
        lines += config_diff(a.summary.get("config") or {}, b.summary.get("config") or {})
    lines += code_diff(a, b)
    if a.metrics is not None and b.metrics is not None:
        lines += compare_curves(b.metrics, a.metrics, noise_band(rows, b.row).band, "B", "A")
        lines += compare_steps(b.metrics, a.metrics, "B", "A")
    lines.append(compare_plots(a, b))
    print("\n".join(lines))
    return 0


def compare_plots(a, b):
    """The overlay plots, in the archive (or a view's --out directory): one line naming them."""
    name = f"compare_{a.id}_{b.id}".replace(":", "_").replace("/", "_")
    if paths().view and paths().out is None:
        return "- plots: none (a view writes into no archive; --out DIR draws them there)"
    out = (paths().out or paths().dir) / name
    out.mkdir(parents=True, exist_ok=True)
    files = draw_overlays(out, [(f"A {a.id}", a.metrics), (f"B {b.id}", b.metrics)])
    return f"- plots: {', '.join(str(out / f) for f in files) or 'none (no metrics)'}"


def cmd_status(run_id, status):
    with archive_lock():
        remove_leftovers(paths().dir)
        rows = read_results()
        row = find_own_row(rows, run_id, worker_name())
        refusal = status_refusal(row, status)
        if refusal:
            die(refusal)
        set_status(rows, row, status)
        draw_progress(rows)
        snapshot_insights(worker_name())
    print(f"{row['run_id']}: {status}")
    return 0


def set_status(rows, row, status):
    """Give `row` a status that status_refusal allows; `analyze.py status` and `analyze.py run`'s decision
    both go through here. Callers hold the lock."""
    best_before = best_for(rows, row)
    append_decision(row["run_id"], status, row["status"])  # first: a killed `status` is completed by a rerun
    row["status"] = status
    write_results(rows)
    set_headline_status(row)
    best = best_for(rows, row)
    if best is not best_before or status == "keep":
        write_current_best(best)


def status_refusal(row, status):
    """Why `row` cannot be given `status`, in one line; None when it can."""
    if row["status"] == "invalid":  # one step through `discard` would otherwise let it be kept
        return (f"run {row['run_id']} is `invalid`: its harness differs from its branch's pin, or the harness caught "
                f"it ({row.get('caught') or 'see its analysis.md'}), so its status cannot change")
    if status == "keep" and row_bpb(row) is None:
        return f"run {row['run_id']} is `{row['status']}` with val_bpb {row['val_bpb']}: it cannot be kept"
    if status == "keep":
        return uncommitted_refusal(row) or inconsistent_refusal(row)
    return None


def inconsistent_refusal(row):
    """keep makes a run the best, which a run whose evidence disagrees with results.tsv must never be."""
    problems = run_problems(row)
    if problems:
        return (f"run {row['run_id']} cannot be kept: {problems[0]}"
                f"{f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''}; `uv run analyze.py audit` lists them")
    return None


def uncommitted_refusal(row):
    """keep advances the branch to the run's commit: it must hold the train.py that was measured."""
    summary = read_json(paths().run_dir(row["run_id"]) / "run_summary.json")[0]
    mismatch = uncommitted_train_py(summary)
    if mismatch:
        return (f"run {row['run_id']} ran train.py with uncommitted changes (sha256 {mismatch[0][:8]}; commit "
                f"{row['commit']} holds {mismatch[1][:8]}), so keeping it would make the best a commit whose train.py "
                "was never measured; commit the change and rerun, or mark the run discard")
    return None


def cmd_pin():
    """Set-up: pin the current branch's harness at HEAD unless it has a pin; print the pin either way."""
    branch = current_branch() or die("HEAD is detached: check out the experiment's branch, then pin it")
    worker = worker_name()
    with archive_lock():  # another clone's runs may be on a branch of the same name: only this worker's count
        earlier = [r["run_id"] for r in read_results() if r.get("branch") == branch and own(r, worker)]
        pin, problem = ensure_pin(branch, earlier)
    if problem:
        die(problem)
    files = pinned_blobs(pin)
    print(f"{branch} is pinned at {pin[:7]}: {len(files)} harness files ({', '.join(sorted(files))})")
    return 0


def cmd_repin(commit):
    """Move the current branch's pin to `commit` (HEAD by default). For humans: it asks at a terminal."""
    branch = current_branch() or die("HEAD is detached: check out the branch whose pin you mean to move")
    target = resolve_commit(commit) or die(f"{commit!r} is not a commit")
    old = read_pin(branch)
    if not sys.stdin.isatty():
        die("repin moves the harness pin that every run is checked against, so a human confirms it at a "
            "terminal; stdin is not one here")
    changes = blob_changes(pinned_blobs(old), pinned_blobs(target)) if old else []
    print(f"pin of {branch}: {old[:7] if old else 'none'} -> {target[:7]}; harness files that differ: "
          f"{', '.join(changes) or 'none'}")
    if input(f"type the branch name ({branch}) to re-pin it: ").strip() != branch:
        die("not re-pinned")
    if not move_pin(branch, target, f"repin: from {old[:7] if old else 'none'} to {target[:7]}"):  # the reflog says who
        die(f"git update-ref could not move {pin_ref(branch)}; it changed while you answered, so look again")
    print(f"{branch} is pinned at {target[:7]}")
    return 0

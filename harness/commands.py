"""
The subcommands of analyze.py: each prints its answer and returns the exit status. Every one that
writes to the archive holds its lock.
"""
import sys
from pathlib import Path

from harness.archive import (ARCHIVE_DIR, RESULTS_TSV, append_decision, archive_lock, comparable, die, find_row,
                             latest_harness, load_run, pick_best, read_json, read_results, remove_leftovers, row_bpb,
                             vetted_best, write_current_best, write_results)
from harness.audit import run_problems
from harness.capture import capture_run, head_commit, record_run, uncommitted_train_py
from harness.changes import code_diff, config_diff
from harness.noise import compare_curves, compare_steps, noise_band
from harness.pin import (blob_changes, current_branch, ensure_pin, move_pin, pin_ref, pinned_blobs, read_pin,
                         resolve_commit)
from harness.plots import draw_overlays, draw_progress
from harness.report import fmt, report_run, set_headline_status


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
        text = report_run(load_run(row), rows)
        draw_progress(rows)
    print(text.split("\n\n## ")[1])
    print(f"archived as {row['run_id']}: {ARCHIVE_DIR / row['run_id'] / 'analysis.md'}")
    return 0


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
            report_run(load_run(row), rows)
    print(path.read_text())
    return 0


def cmd_best():
    rows = read_results()
    best, passed = vetted_best(comparable(rows, latest_harness(rows)))
    for row, problems in passed:  # stderr: the first line of stdout stays the best's id
        print(f"analyze.py: {row['run_id']} is passed over as best, its evidence is inconsistent: "
              f"{problems[0]} (`uv run analyze.py audit` lists all)", file=sys.stderr)
    if best is None:
        print("no best run yet: no valid run under the latest harness"
              + (" whose evidence is consistent" if passed else ""))
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
        lines += compare_curves(b.metrics, a.metrics, noise_band(rows, b.row).band, "B", "A")
        lines += compare_steps(b.metrics, a.metrics, "B", "A")
    out = ARCHIVE_DIR / f"compare_{a.id}_{b.id}"
    out.mkdir(exist_ok=True)
    files = draw_overlays(out, [(f"A {a.id}", a.metrics), (f"B {b.id}", b.metrics)])
    lines.append(f"- plots: {', '.join(str(out / f) for f in files) or 'none (no metrics)'}")
    print("\n".join(lines))
    return 0


def cmd_status(run_id, status):
    with archive_lock():
        remove_leftovers(ARCHIVE_DIR)
        rows = read_results()
        row = find_row(rows, run_id)
        if row["status"] == "invalid":  # one step through `discard` would otherwise let it be kept
            die(f"run {row['run_id']} is `invalid`: its harness differs from its branch's pin, so its status "
                "cannot change")
        if status == "keep" and row_bpb(row) is None:
            die(f"run {row['run_id']} is `{row['status']}` with val_bpb {row['val_bpb']}: it cannot be kept")
        if status == "keep":
            refuse_uncommitted(row)
            refuse_inconsistent(row)
        best_before = pick_best(rows, row["harness"])
        append_decision(row["run_id"], status, row["status"])  # first: a killed `status` is completed by a rerun
        row["status"] = status
        write_results(rows)
        set_headline_status(row)
        best = pick_best(rows, row["harness"])
        if best is not best_before or status == "keep":
            write_current_best(best)
        draw_progress(rows)
    print(f"{row['run_id']}: {status}")
    return 0


def refuse_inconsistent(row):
    """keep makes a run the best, which a run whose evidence disagrees with results.tsv must never be."""
    problems = run_problems(row)
    if problems:
        die(f"run {row['run_id']} cannot be kept: {problems[0]}"
            f"{f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''}; `uv run analyze.py audit` lists them")


def refuse_uncommitted(row):
    """keep advances the branch to the run's commit: it must hold the train.py that was measured."""
    summary = read_json(ARCHIVE_DIR / row["run_id"] / "run_summary.json")[0]
    mismatch = uncommitted_train_py(summary)
    if mismatch:
        die(f"run {row['run_id']} ran train.py with uncommitted changes (sha256 {mismatch[0][:8]}; commit "
            f"{row['commit']} holds {mismatch[1][:8]}), so keeping it would make the best a commit whose train.py "
            "was never measured; commit the change and rerun, or mark the run discard")


def cmd_pin():
    """Set-up: pin the current branch's harness at HEAD unless it has a pin; print the pin either way."""
    branch = current_branch() or die("HEAD is detached: check out the experiment's branch, then pin it")
    with archive_lock():
        earlier = [r["run_id"] for r in read_results() if r.get("branch") == branch]
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

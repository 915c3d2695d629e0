"""
Convert an archive of the previous version (record.json, run_summary.json and measurement.json per run,
results.tsv rows, decisions.jsonl) into one run.json per run, once. Nothing is deleted: the old files stay
where they are, the previous results.tsv is kept as results.tsv.previous, and results.tsv and progress.png
are rebuilt from the run directories. A run that cannot be converted is named and left as it was.

Usage:
    uv run contrib/convert.py            # the archive analyze.py uses (AUTORESEARCH_ARCHIVE, or .auto-log-research)
    uv run contrib/convert.py ARCHIVE    # another archive directory
"""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for harness/
from harness.record import (COLUMNS, KINDS, OUTCOMES, RUN_JSON, STATUSES, Archive, Caught, Decision,  # noqa: E402
                            Measured, RecordError, Run, StatusChange, code_sha, evidence, gpu_class, number, rev_parse,
                            train_py_at, trained_of, write_atomic)
from harness.report import draw_progress  # noqa: E402

OLD_OUTCOMES = {"no_summary": "the run ended before writing run_summary.json",
                "stale_summary": "run_summary.json was an earlier run's",
                "corrupt_summary": "run_summary.json was corrupt"}


def old_json(path):
    """The dict of an old JSON file, {} when there is none; RecordError when it is corrupt."""
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecordError(f"{path.name} is not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise RecordError(f"{path.name} holds no JSON object")
    return data


def measured_of(m):
    """Measured from a measurement.json's dict, and the cases it caught."""
    speed, status = m.get("machine_speed") or {}, m.get("status")
    measured = Measured(number(m.get("val_bpb")) if status in ("ok", "invalid") else None,
                        **{k: number(m.get(k)) for k in ("heldout_bpb", "future_leak", "eval_s", "wall_s",
                                                         "first_row_s")},
                        speed_before=number(speed.get("before")), speed_after=number(speed.get("after")),
                        stopped=status if status in ("timeout", "interrupted") else None, error=m.get("error"))
    return measured, [Caught(str(c.get("case")), str(c.get("detail") or "")) for c in m.get("caught") or []]


def old_run(run_dir, row, decided, archived_at, latest):
    """The Run of one run directory of the previous version: record.json, run_summary.json, measurement.json,
    its results.tsv row and its decisions; RecordError when they do not make one. A run without a summary
    shares the harness and device of the run converted before it (`latest`), as it did when archived."""
    rec, s, m = (old_json(run_dir / name) for name in ("record.json", "run_summary.json", "measurement.json"))
    if not rec and not row:
        raise RecordError("it has neither a record.json nor a results.tsv row")
    trained, notes = trained_of(s), list(rec.get("notes") or [])
    outcome = rec.get("outcome") or row.get("outcome") or s.get("status") or "crash"
    trained.outcome = outcome if outcome in OUTCOMES else "crash"
    if outcome not in OUTCOMES:
        notes.append(f"{OLD_OUTCOMES.get(outcome, outcome)}: converted as a crash")
    trained.reported_val_bpb = number(m.get("reported_val_bpb") if m else s.get("val_bpb"))
    measured, caught = measured_of(m) if m else (None, [Caught(str(c), "") for c in rec.get("caught") or []])
    commit = (rec.get("commit") or (s.get("git") or {}).get("commit") or rev_parse(row.get("commit", ""))
              or row["commit"])
    source = train_py_at(commit)
    first = rec.get("status") or ("crash" if outcome != "ok" else "pending")
    statuses = [StatusChange(first, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(archived_at)), "archive")]
    statuses += [StatusChange(status, at, "analyze.py status") for status, at in decided if status in STATUSES]
    files, kind = rec.get("files") or {}, row.get("decision")
    return Run(
        id=run_dir.name, commit=commit, description=row.get("description") or "",
        branch=rec.get("branch") or row.get("branch") or None,
        worker=rec.get("worker") or row.get("worker") or "unknown",
        started_at=number((s.get("timings") or {}).get("started_at")), archived_at=archived_at,
        harness=s.get("harness") or (latest.harness if latest else {}),
        gpu=row.get("gpu") or (gpu_class(s) if s or not latest else latest.gpu),
        code_sha=code_sha(source) if source is not None and not (s.get("git") or {}).get("dirty")
        else row.get("code_sha") or "", pin=rec.get("pin"), harness_changes=rec.get("harness_changed") or [],
        trained=trained, measured=measured, caught=caught, statuses=statuses,
        decision=Decision(kind, "decided by the previous version", None, None, 0, 0, rec.get("best"))
        if kind in KINDS else None,  # the archived digest, not today's: a file changed since is still named
        evidence={name: files.get(name) or sha for name, sha in evidence(run_dir).items()},
        best_id=rec.get("best"), notes=notes)


def read_decisions(archive, lines):
    """{run id: [(status, at), ...]} from decisions.jsonl; a line that is none is named in `lines`."""
    decided, log = {}, archive.dir / "decisions.jsonl"
    for entry in (log.read_text(errors="replace").splitlines() if log.exists() else []):
        try:
            d = json.loads(entry)
            decided.setdefault(d["run_id"], []).append((d["status"], str(d.get("at", ""))))
        except (json.JSONDecodeError, KeyError, TypeError):
            lines.append(f"{log}: a line that is no decision, left out: {entry[:60]!r}")
    return decided


def convert(archive):
    """Write run.json for each run directory of the previous version that lacks one, deleting nothing; keep
    its results.tsv as results.tsv.previous, and rebuild results.tsv. One line per run. Callers hold the lock."""
    lines = []
    decided = read_decisions(archive, lines)
    text = archive.results.read_text(errors="replace").splitlines() if archive.results.exists() else []
    rows = {r.get("run_id"): r for r in (dict(zip(text[0].split("\t"), line.split("\t"))) for line in text[1:])
            if r.get("run_id")}
    order, previous, run = list(rows), 0.0, None
    for run_dir in sorted(archive.run_dirs(), key=lambda p: (order.index(p.name) if p.name in rows else len(rows),
                                                             p.name)):
        if (run_dir / RUN_JSON).exists() or not any(run_dir.iterdir()):
            continue
        stamp = run_dir / "record.json" if (run_dir / "record.json").exists() else run_dir
        previous = archived_at = max(stamp.stat().st_mtime, previous + 0.001)  # results.tsv's order
        try:
            run = old_run(run_dir, rows.get(run_dir.name, {}), decided.get(run_dir.name, []), archived_at, run)
            archive.save(run)
        except (RecordError, TypeError, ValueError, AttributeError, KeyError) as e:
            lines.append(f"{run_dir.name}: not converted, {e}; its files are as they were")
            continue
        said = rows.get(run.id, {}).get("status")
        lines.append(f"{run.id}: converted ({run.status}, val_bpb {'none' if run.val_bpb is None else run.val_bpb})"
                     + (f"; results.tsv said {said}, its decisions say {run.status}" if said not in (None, run.status)
                        else ""))
    previous_tsv = archive.dir / "results.tsv.previous"
    if text and text[0].split("\t") != list(COLUMNS) and not previous_tsv.exists():
        write_atomic(previous_tsv, archive.results.read_bytes())
        lines.append(f"{archive.results}: the previous version's kept as {previous_tsv.name}")
        lines += [f"{run_id}: a results.tsv row without a run directory, kept only in {previous_tsv.name}"
                  for run_id in rows if not archive.run_dir(run_id).is_dir()]
    archive.rebuild()
    return lines


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    archive = Archive(argv[0]) if argv else Archive.here()
    with archive.lock():
        lines = convert(archive)
        draw_progress(archive.runs(), archive.progress)
    print("\n".join(lines) if lines else f"{archive.dir}: nothing to convert, every run has its run.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""contrib/convert.py: an archive of the previous version (record.json, run_summary.json, measurement.json,
results.tsv rows, decisions.jsonl) becomes one run.json per run, losing nothing and deleting nothing."""
import hashlib
import json
import re

import pytest

from contrib.convert import main
from harness.record import Archive, audit, code_sha
from tests import test_archive

pytestmark = pytest.mark.quick
repo = test_archive.repo   # the fixture: (Archive, head, pin) of a pinned git repository
OLD_COLUMNS = ["commit", "val_bpb", "memory_gb", "status", "description", "run_id", "outcome", "harness",
               "code_sha", "worker", "gpu", "branch", "measured", "caught", "decision"]


def old_archive(archive, head, pin):
    """Three runs as the previous version wrote them: a measured run kept by `status`, a crash without a
    summary, and one whose record.json is corrupt."""
    summary = {"status": "ok", "val_bpb": 2.5, "training_seconds": 60.0, "total_seconds": 70.0, "peak_vram_mb": 0.0,
               "num_steps": 30, "depth": 4, "config": {"DEPTH": 4}, "harness": {"profile": "cpu"},
               "git": {"commit": head, "dirty": False}, "env": {"gpu_name": None}, "timings": {"started_at": 5.0},
               "error": None}
    measurement = {"by": "analyze.py run", "status": "ok", "val_bpb": 2.41, "heldout_bpb": 2.45, "wall_s": 75.0,
                   "machine_speed": {"before": 20.0, "after": 22.0}, "reported_val_bpb": 2.5, "caught": []}
    rows = [[head[:7], "2.410000", "0.0", "keep", "baseline", "aaaaaaa", "ok", "cpu:x", "c1", "w", "cpu", "exp",
             "harness", "", "keep"],
            [head[:7], "0.000000", "0.0", "crash", "oom", "bbbbbbb", "no_summary", "cpu:x", "c1", "w", "", "exp",
             "", "", ""],
            [head[:7], "2.500000", "0.0", "pending", "lost", "ccccccc", "ok", "cpu:x", "c1", "w", "cpu", "exp",
             "", "", ""]]
    archive.dir.mkdir(parents=True, exist_ok=True)
    archive.results.write_text("\n".join("\t".join(r) for r in [OLD_COLUMNS] + rows) + "\n")
    files = {"aaaaaaa": {"run_summary.json": json.dumps(summary), "measurement.json": json.dumps(measurement),
                         "run.log": "---\nval_bpb:          2.410000\n", "metrics.jsonl": '{"step": 0}\n'},
             "bbbbbbb": {"run.log": "Traceback\nRuntimeError: CUDA out of memory\n"},
             "ccccccc": {"record.json": "{not json", "run.log": "x\n"}}
    for run_id, outcome in (("aaaaaaa", "ok"), ("bbbbbbb", "no_summary")):
        files[run_id]["record.json"] = json.dumps(
            {"commit": head, "outcome": outcome, "status": "pending" if outcome == "ok" else "crash", "branch": "exp",
             "worker": "w", "pin": pin, "harness_changed": [], "caught": [], "best": None, "notes": [],
             "files": {"run.log": hashlib.sha256(files[run_id]["run.log"].encode()).hexdigest()}})
    for run_id, content in files.items():
        (archive.dir / run_id).mkdir()
        for name, text in content.items():
            (archive.dir / run_id / name).write_text(text)
    (archive.dir / "decisions.jsonl").write_text(json.dumps({"run_id": "aaaaaaa", "status": "keep", "was": "pending",
                                                             "at": "2025-01-01T00:00:00", "worker": "w"}) + "\n")


def test_convert_writes_run_json_for_each_old_run_loses_nothing_and_then_has_nothing_to_do(repo, capsys, monkeypatch):
    archive, head, pin = repo
    old_archive(archive, head, pin)
    assert Archive.here().runs() == []
    assert capsys.readouterr().err == (f"{archive.dir}: 3 run directories of the previous version have no run.json: "
                                       "`uv run contrib/convert.py` converts them\n")
    (archive.dir / "bbbbbbb" / "run.log").write_text("edited before converting\n")  # record.json's digest is kept
    before = {p: p.read_bytes() for p in archive.dir.rglob("*") if p.is_file()}
    monkeypatch.setattr("contrib.convert.draw_progress", lambda runs, path: None)  # no matplotlib here
    assert main([str(archive.dir)]) == 0
    said = capsys.readouterr().out
    for line in ("aaaaaaa: converted (keep, val_bpb 2.41)", "bbbbbbb: converted (crash",
                 "ccccccc: not converted, record.json is not valid JSON"):
        assert line in said, said
    assert re.search(r"^ccccccc: not converted, .*; its files are as they were$", said, re.M), said
    assert all(path.read_bytes() == data for path, data in before.items() if path.name != "results.tsv")
    assert (archive.dir / "results.tsv.previous").read_bytes() == before[archive.results]
    kept, crash = archive.runs()
    assert [s.status for s in kept.statuses] == ["pending", "keep"] and kept.statuses[1].by == "analyze.py status"
    assert (kept.val_bpb, kept.measured.heldout_bpb, kept.measured.speed) == (2.41, 2.45, 21.0)
    assert kept.trained.reported_val_bpb == 2.5 and kept.steps == 30 and kept.gpu == "cpu"
    assert kept.decision.kind == "keep" and kept.code_sha == code_sha("x = 1\n")
    assert crash.trained.outcome == "crash" and crash.val_bpb is None and "before writing" in crash.notes[-1]
    assert [r["run_id"] for r in test_archive.read_results(archive)] == ["aaaaaaa", "bbbbbbb"]
    problems = audit(archive)  # the run left as it was, and the file edited before converting
    assert [line[:9] for line in problems] == ["ccccccc: ", "bbbbbbb: "], problems
    assert "run.log changed after archiving" in problems[1], problems
    (archive.dir / "ccccccc").rename(archive.dir / ".ccccccc-aside")
    assert main([]) == 0
    assert capsys.readouterr().out == f"{archive.dir}: nothing to convert, every run has its run.json\n"

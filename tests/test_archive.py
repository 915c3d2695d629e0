"""The record and the archive (harness/record.py) and analyze.py's command line: run.json round-trips and refuses
what is not a run, results.tsv is derived (karpathy/autoresearch's columns first) and mended by rebuild, audit names
every kind of tampering, and bad input is one line."""
import csv
import fcntl
import hashlib
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.record import (Archive, Caught, RecordError, Run, StatusChange, audit, code_sha, code_size, ensure_pin,
                            evidence, harness_changes, move_pin, pin_history, pin_problems, record_problems,
                            worker_name)
from tests.factory import make_run

pytestmark = pytest.mark.quick


def sh(*args):
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """(Archive, head, pin) of a git repository on branch `exp`: train.py and a one-file harness, pinned."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTORESEARCH_WORKER", "w")  # conftest.py cleared every other AUTORESEARCH_ variable
    Path("train.py").write_text("x = 1\n")
    Path("prepare.py").write_text("HARNESS = 1\n")
    for args in (("init", "-q", "-b", "exp"), ("config", "user.email", "t@t"), ("config", "user.name", "t"),
                 ("add", "."), ("commit", "-qm", "baseline")):
        sh("git", *args)
    return Archive.here(), sh("git", "rev-parse", "HEAD"), ensure_pin("exp", [])[0]


def archived(repo, val_bpb=2.4, status="pending", **overrides):
    """A measured run of HEAD on `exp`, saved with its evidence (run.log's final block says its val_bpb)."""
    archive, head, pin = repo
    run = make_run(val_bpb, status=status, **{"id": archive.new_id(head), "commit": head, "branch": "exp", "pin": pin,
                                              **overrides})
    d = archive.run_dir(run.id)
    (d / "run.log").write_text("---\n" + (f"val_bpb:          {run.val_bpb:.6f}\n" if run.val_bpb else ""))
    (d / "metrics.jsonl").write_text('{"step": 0, "train/loss": 3.0, "train/progress": 0.5}\n'
                                     '{"step": 1, "train/loss": 2.5, "train/progress": 1.0}\n')
    (d / "diff.patch").write_text("")
    run.evidence = evidence(d)
    archive.save(run)
    return run


def read_results(archive):
    return list(csv.DictReader(archive.results.read_text().splitlines(), delimiter="\t"))


@pytest.mark.parametrize("edit, named", [
    (lambda d: d.pop("commit"), "run.commit is missing"),
    (lambda d: d["trained"].update(num_steps=True), "run.trained.num_steps"),  # a bool is no int
    (lambda d: d["measured"].update(val_bpb=float("nan")), "run.measured.val_bpb is nan, not a finite number"),
    (lambda d: d.update(statuses=[{"status": "kept", "at": "t", "by": "x"}]), "statuses[0].status is 'kept'"),
    (lambda d: d.update(evidence={"run.log": 1}), "run.evidence['run.log']"),
    (lambda d: d.update(trained=[]), "run.trained is [], not an object"),
    (lambda d: d.update(val=2.4), "run has an unknown field val"),
    # another schema is named first, before the fields it changed
    (lambda d: d.update(schema="auto-log-research run 9", field_of_run_9=1), "schema 'auto-log-research run 9'"),
])
def test_a_record_that_is_not_a_run_is_refused_in_one_line_naming_the_field(edit, named):
    d = json.loads(make_run(2.4).to_json())
    edit(d)
    with pytest.raises(RecordError) as e:
        Run.from_dict(d)
    assert named in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_code_sha_ignores_comments_blank_lines_and_layout_and_code_size_counts_code_tokens():
    base = "import os\n\ndef f(x):\n    return x + 1  # one\n"
    assert code_sha(base) == code_sha("# header\nimport os\ndef f(x):\n\n    return x+1\n")
    assert code_sha(base) == code_sha(base.replace("\n", "\r\n").rstrip())
    assert code_sha(base) != code_sha(base.replace("+ 1", "+ 2"))
    assert code_size("a = 1\nb = 2\n") == code_size("# a comment\n\na = 1\nb = 2\n") == 6
    assert code_size("a = 1; b = 2\n") > code_size("a = 1\nb = 2\n"), "joining lines with `;` is not simpler"
    assert code_size("if x:\n    y\n") == code_size("if x: y\n")
    assert code_sha("def f(:\n") and code_size("def f(:\n") == 2, "a file that does not parse still has a size"


def test_the_lock_excludes_every_other_holder_until_it_is_released(tmp_path):
    archive = Archive(tmp_path / "a")
    with archive.lock(), open(archive.dir / ".lock") as other, pytest.raises(BlockingIOError):
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)   # flock is per open file: as another process sees it
    with open(archive.dir / ".lock") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_ids_runs_as_saved_oldest_first_find_by_prefix_a_bad_run_json_named_once_and_never_written(tmp_path, capsys):
    archive = Archive(tmp_path / "a")
    ids = [archive.new_id(commit) for commit in ("abc1234ff", "abc1234ff", "abd0000ff")]
    assert ids == ["abc1234", "abc1234-2", "abd0000"]
    saved = [make_run(2.4, id=run_id, archived_at=at, notes=["metrics.jsonl is missing"], peak_vram_mb=45_000)
             for run_id, at in zip(ids, (2.0, 3.0, 1.0))]  # peak_vram_mb: JSON's integer, read as a float
    for run in saved:
        archive.save(run)
    (archive.dir / "ddddddd").mkdir()
    (archive.dir / "ddddddd" / "run.json").write_text('{"id": ')
    (archive.dir / "eeeeeee").mkdir()  # reserved by a writer: not a problem yet
    (archive.dir / "compare_a_b").mkdir()  # plots of `compare`: no run
    assert archive.runs() == [saved[2], saved[0], saved[1]], "not oldest first, or not as saved"
    assert repr(archive.runs()[0].trained.peak_vram_mb) == "45000.0", "an int where the record says float"
    assert archive.find("abc1234").id == "abc1234" and archive.find("abd").id == "abd0000"
    for prefix, said in (("abc", r"matches several runs \(abc1234 abc1234-2\)"), ("fff", "no run 'fff'")):
        with pytest.raises(RecordError, match=said):
            archive.find(prefix)
    err = capsys.readouterr().err.splitlines()  # read five times, named once
    assert len(err) == 1 and f"{archive.dir}/ddddddd/run.json: not readable JSON" in err[0], err
    assert "backup" in err[0] and list(archive.problems.values()) == err
    run = make_run(2.4, id="fffffff")
    run.trained.num_steps = "30"
    with pytest.raises(RecordError, match="run fffffff is not a valid record .*num_steps"):
        archive.save(run)
    assert not (archive.run_dir("fffffff") / "run.json").exists()


@pytest.mark.parametrize("change, named", [
    (dict(status="pending", caught=[Caught("trained on validation data", "d")]), "but its status is pending"),
    (dict(status="discard", harness_changes=["prepare.py (changed)"]), "harness differed from the pin"),
    (dict(statuses=[StatusChange("invalid", "t", "harness"), StatusChange("keep", "t", "x")]), "leaves invalid"),
    (dict(status="keep", commit="f" * 40), "kept, but its commit fffffff is not on branch exp"),
    (dict(status="keep", worker="w2", branch="exp-w2"),  # a sibling worktree's: its branch gone, its pins shared
     "kept, but its branch exp-w2 no longer exists"),
    (dict(status="keep", worker="node2:0", branch="exp-node2", pin="0" * 40), None),  # another clone's: not failed
])
def test_an_inconsistent_record_is_named(change, named):
    pin, head = "a" * 40, "b" * 40   # branch exp holds both, every branch has pin; this clone's worker is "w"
    run = make_run(**{"branch": "exp", "pin": pin, "commit": head, **change})
    lines = record_problems(run) + pin_problems(run, lambda branch: [pin], {"exp": {pin, head}}.get, "w")
    assert any(named in line for line in lines) if named else lines == [], lines


@pytest.fixture
def cli(repo, monkeypatch, capsys):
    """analyze.main in the repo: (exit status, stdout, stderr) of one command."""
    analyze = importlib.import_module("analyze")
    monkeypatch.setattr(analyze.report, "draw_progress", lambda runs, path: None)  # no matplotlib here
    return lambda *argv: (analyze.main(list(argv)), *capsys.readouterr())


def test_a_pin_is_made_once_guards_the_harness_and_is_moved_only_by_a_human_at_a_terminal(repo, cli, monkeypatch):
    archive, _, pin = repo
    status, out, _ = cli("pin")
    assert status == 0 and out.startswith(f"exp is pinned at {pin[:7]}: 1 harness files (prepare.py)")
    assert ensure_pin("exp", [make_run(branch="exp", worker=worker_name())]) == (pin, None)  # a pin stands
    Path("prepare.py").write_text("HARNESS = 2\n")
    assert harness_changes(pin) == [f"prepare.py (changed) against the pin {pin[:7]}"]
    assert any(line.startswith("working tree: prepare.py (changed)") for line in audit(archive))
    sh("git", "commit", "-qam", "a human changes the harness")
    monkeypatch.setattr(sys, "stdin", open("/dev/null"))
    status, _, err = cli("repin")
    assert status == 1 and "a human confirms it at a terminal" in err
    monkeypatch.setattr(sys, "stdin", type("Terminal", (), {"isatty": lambda self: True})())
    for typed, code in (("main", 1), ("exp", 0)):
        monkeypatch.setattr("builtins.input", lambda prompt: typed)
        status, out, err = cli("repin")
        assert status == code and "harness files that differ: prepare.py" in out, (out, err)
    head = sh("git", "rev-parse", "HEAD")
    assert out.endswith(f"exp is pinned at {head[:7]}\n") and pin_history("exp") == [head, pin]
    assert not move_pin("exp", "no-such-commit")
    edited = {"prepare.py": hashlib.sha256(b"HARNESS = 1\n").hexdigest()}  # train.py saw it; the pin's again since
    assert harness_changes(head, edited) == [f"prepare.py (differed while train.py ran) against the pin {head[:7]}"]
    for path in ("contrib/workers.py", "tests/test_x.py"):
        Path(path).parent.mkdir()
        Path(path).write_text("x = 1\n")
    sh("git", "add", ".")
    assert harness_changes(head) == [], "contrib/ and tests/ are not the harness"
    sh("git", "update-ref", "-d", "refs/auto-log-research/pins/exp")
    earlier = [make_run(id="abc1234", branch="exp", worker=worker_name()), make_run(branch="exp", worker="other")]
    assert ensure_pin("exp", earlier)[1].startswith("branch exp has no pin although 1 run(s) (abc1234 to abc1234)")


def test_audit_names_an_edited_number_evidence_changed_or_gone_a_forged_record_and_an_unreadable_run(repo):
    archive, keep = repo[0], archived(repo, 2.40, "keep")
    keep.measured.val_bpb = 2.2
    archive.save(keep)
    (archive.run_dir(keep.id) / "diff.patch").write_text("+ forged\n")
    (archive.run_dir(keep.id) / "metrics.jsonl").unlink()
    forged = archived(repo, None, "keep", pin="0" * 40)  # audit reads each record and its pin, not only evidence
    (archive.dir / "2222222").mkdir()
    (archive.dir / "2222222" / "run.log").write_text("x\n")   # its run.json deleted
    lines = audit(archive)
    for problem in (f"{keep.id}: run.log's final block says val_bpb 2.400000, run.json 2.200000",
                    f"{keep.id}: diff.patch changed after archiving",
                    f"{keep.id}: metrics.jsonl was archived but is gone",
                    f"{forged.id}: kept without a val_bpb", f"{forged.id}: archived under pin 0000000",
                    f"2222222: {archive.run_dir('2222222') / 'run.json'}: missing",
                    f"{archive.results}: differs from the run directories"):  # it was never built
        assert any(line.startswith(problem) for line in lines), (problem, lines)


def test_results_tsv_is_karpathys_five_columns_first_status_audit_rebuild_curve_and_bad_input_is_one_line(repo, cli):
    archive = repo[0]
    keep = archived(repo, 2.40, "keep", peak_vram_mb=45_000.0, description="more\theads\nand lr")
    discard = archived(repo, 2.45, "discard")
    crash = archived(repo, None, "crash", outcome="crash", measured=None, peak_vram_mb=45_000.0)
    invalid = archived(repo, 2.0, "invalid", caught=[Caught("trained on validation data", "d")])
    assert cli("status", discard.id, "keep")[:2] == (0, f"{discard.id}: keep\n")  # and rebuilds results.tsv
    kept, rekept, crashed, _ = read_results(archive)
    assert list(kept)[:5] == ["commit", "val_bpb", "memory_gb", "status", "description"]
    assert float(kept["val_bpb"]) == 2.4 and kept["memory_gb"] == "43.9" and kept["description"] == "more heads and lr"
    assert (crashed["val_bpb"], crashed["memory_gb"], crashed["status"]) == ("0.000000", "0.0", "crash")
    assert rekept["status"] == "keep" and [s.status for s in archive.find(discard.id).statuses] == ["discard", "keep"]
    archive.results.write_text("commit\tval_bpb\n")  # a hand-edited results.tsv is named in one line; rebuild mends it
    status, out, _ = cli("audit")
    assert status == 1 and out.startswith(f"{archive.results}: differs from the run directories"), out
    assert "analyze.py rebuild`" in out and cli("rebuild")[:2] == (0, f"{archive.results}: rebuilt from 4 runs\n")
    assert cli("audit")[:2] == (0, "audit: 4 runs, clean\n")
    status, out, _ = cli("curve", "train/loss", keep.id, "--at", "0.5,1")
    assert status == 0 and out.splitlines()[1].split()[-2:] == ["3.0000", "2.5000"], out
    for argv, said in ((["status", "1111111", "keep"], "no run '1111111'"),
                       (["status", crash.id, "keep"], f"run {crash.id} has no val_bpb"),
                       (["status", invalid.id, "keep"], f"run {invalid.id} is invalid (trained on validation data), "
                                                        "so its status cannot change"),
                       (["curve", "train/loss", "--at", "half"], "--at 'half' is not comma-separated")):
        status, _, err = cli(*argv)
        assert status == 1 and err.startswith(f"analyze.py: {said}") and err.count("\n") == 1, err
    assert archive.find(invalid.id).status == "invalid"

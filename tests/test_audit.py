"""`analyze.py audit` re-derives the archive from its evidence and names every tampering the agent's
own tools could do, and a run it names never becomes the best: a harness changed (harness.json, gone,
decides nothing: the pin is in git), a status edited by hand in results.tsv, an archived val_bpb
edited, a kept commit dropped from the branch, a lost pin. A clean night audits clean, 400 runs in
under 5 s. Each test builds its runs in a temporary git repository, as tests/test_analyze.py does."""
import builtins
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from test_analyze import (ARCHIVE, analysis, archive_run, commit, repo, results, run_analyze, section, sh,  # noqa: F401
                          write_run)

NIGHT = 400                  # runs in the synthetic archive
METRICS_BYTES = 650_000      # a 5-minute H100 run: ~950 step rows, per-layer rows every 25 steps


def audit(capsys):
    """(exit status, problem lines, all lines) of `analyze.py audit`."""
    capsys.readouterr()
    code = run_analyze("audit")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("audit: branch ") and lines[-1].startswith("audit: "), lines
    return code, lines[1:-1], lines


def best(capsys):
    """(id `analyze.py best` names, what it says on stderr)."""
    capsys.readouterr()
    run_analyze("best")
    out, err = capsys.readouterr()
    return out.split("\t")[0], err


def named(problems, run_id, text):
    return [p for p in problems if p.startswith(f"{run_id}: ") and text in p]


def keep(row):
    assert run_analyze("status", row["run_id"], "keep") == 0


def edit_results(run_id, column, value):
    """What an agent editing results.tsv by hand does to one field of one row."""
    lines = (ARCHIVE / "results.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    for i, line in enumerate(lines[1:], 1):
        fields = line.split("\t")
        if fields[header.index("run_id")] == run_id:
            fields[header.index(column)] = value
            lines[i] = "\t".join(fields)
    (ARCHIVE / "results.tsv").write_text("\n".join(lines) + "\n")


@pytest.fixture
def harness_repo(repo):
    """The test repository with a harness package and a test module tracked beside prepare.py, and the
    archive ignored, as in this repository."""
    Path("harness").mkdir()
    Path("harness/report.py").write_text("NOISE_SIGMAS = 2\n")
    Path("tests").mkdir()
    Path("tests/test_x.py").write_text("def test_x():\n    pass\n")
    Path(".gitignore").write_text(".auto-log-research/\nrun.log\nmetrics.jsonl\nrun_summary.json\n")  # as ours
    sh("git", "add", "-A")
    sh("git", "commit", "-q", "-m", "harness package")
    return repo


# ---------------------------------------------------------------------------
# A clean night

def test_a_clean_night_of_runs_audits_clean(harness_repo, capsys):
    assert run_analyze("pin") == 0
    base, _ = archive_run(val_bpb=1.000)
    keep(base)
    repeat, _ = archive_run(val_bpb=1.004, age_s=-5)
    run_analyze("status", repeat["run_id"], "discard")
    commit("MATRIX_LR 0.04 -> 0.05", "DEPTH = 8\nMATRIX_LR = 0.05\n")
    better, _ = archive_run(val_bpb=0.990, age_s=-10)
    keep(better)
    commit("DEPTH 8 -> 16", "DEPTH = 16\nMATRIX_LR = 0.05\n")
    crashed, _ = archive_run(status="crash", age_s=-15)
    run_analyze("status", crashed["run_id"], "crash")
    commit("Restore train.py", "DEPTH = 8\nMATRIX_LR = 0.05\n")
    pending, _ = archive_run(val_bpb=0.995, age_s=-20)
    assert run_analyze() == 0  # archiving the same run again adds nothing
    # the agent's own writes: notes, knowledge files, scratch scripts, a rebuilt analysis
    notes = ARCHIVE / better["run_id"] / "analysis.md"
    notes.write_text(notes.read_text() + "\n- expected a gain of 0.01; got it\n")
    (ARCHIVE / "ideas_queue.md").write_text("1. warmdown 0.5\n")
    (ARCHIVE / "scratch").mkdir()
    (ARCHIVE / "scratch" / "gap.py").write_text("print(1)\n")
    (ARCHIVE / repeat["run_id"] / "analysis.md").unlink()
    run_analyze("show", repeat["run_id"])
    code, problems, lines = audit(capsys)
    assert (code, problems) == (0, []), "\n".join(lines)
    assert lines[-1].startswith("audit: 5 runs, clean"), lines[-1]
    assert best(capsys) == (better["run_id"], "")


# ---------------------------------------------------------------------------
# The harness

@pytest.mark.parametrize("harness_json", ["deleted", "rewritten"])
def test_a_changed_harness_is_caught_whatever_harness_json_says(harness_repo, capsys, harness_json):
    base, _ = archive_run(val_bpb=1.0)
    keep(base)
    Path("harness/report.py").write_text("NOISE_SIGMAS = 0\n")  # an agent's script rewrites the harness...
    pin_file = ARCHIVE / "harness.json"  # ...and the file that used to hold the pin
    if harness_json == "deleted":
        pin_file.unlink(missing_ok=True)
    else:
        pin_file.write_text(json.dumps({"harness/report.py": "0" * 64, "pinned_by": "agent"}))
    head = commit("idea, with the harness change committed too", "DEPTH = 9\n")
    row, _ = archive_run(val_bpb=0.5, age_s=-5)
    assert row["status"] == "invalid", row
    code, problems, lines = audit(capsys)
    assert code == 1 and named(problems, row["run_id"], "harness/report.py (changed) against the pin"), lines
    assert any(p.startswith(f"commit {head[:7]} on main changes harness files after its pin") for p in problems), lines
    assert any(p.startswith("working tree: harness/report.py (changed)") for p in problems), lines
    assert not named(problems, base["run_id"], ""), f"the run before the change is named: {lines}"
    assert best(capsys)[0] == base["run_id"]
    with pytest.raises(SystemExit, match="is `invalid`"):
        run_analyze("status", row["run_id"], "keep")


def test_prepare_py_edited_while_training_and_restored_before_archiving_is_caught(harness_repo, capsys):
    base, _ = archive_run(val_bpb=1.0)
    keep(base)
    commit("idea", "DEPTH = 9\n")
    row, _ = archive_run(val_bpb=0.5, prepare_sha="d" * 64, age_s=-5)  # the summary records what ran
    assert row["status"] == "invalid", row
    code, problems, lines = audit(capsys)
    assert named(problems, row["run_id"], "prepare.py (sha256 dddddddd when it ran vs pinned"), lines
    assert not [p for p in problems if p.startswith("working tree")], f"the working tree is the pin's: {lines}"
    assert best(capsys)[0] == base["run_id"], "the lower val_bpb of a changed metric became the best"


def test_a_harness_module_edited_while_training_and_restored_before_archiving_is_caught(harness_repo, capsys):
    base, _ = archive_run(val_bpb=1.0)
    keep(base)
    commit("idea", "DEPTH = 9\n")
    as_ran = {"harness/report.py": "e" * 64}  # what the summary recorded: not the pinned content
    row, _ = archive_run(val_bpb=0.5, harness_sha=as_ran, age_s=-5)
    assert row["status"] == "invalid", row
    code, problems, lines = audit(capsys)
    assert code != 0 and named(problems, row["run_id"], "harness/report.py (sha256 eeeeeeee when it ran"), lines
    assert best(capsys)[0] == base["run_id"], "a run made with an edited analysis module became the best"


def test_the_pinned_files_are_every_tracked_python_file_but_train_py_and_tests(harness_repo, capsys):
    assert run_analyze("pin") == 0
    assert "2 harness files (harness/report.py, prepare.py)" in capsys.readouterr().out
    archive_run(val_bpb=1.0)
    Path("tests/test_x.py").write_text("def test_x():\n    assert True\n")  # not the harness
    Path("harness/new.py").write_text("X = 1\n")
    sh("git", "add", "harness/new.py")  # a new tracked module is part of the harness at once
    row, _ = archive_run(val_bpb=0.99, age_s=-5)
    changes = next(line for line in section(analysis(row["run_id"]), "Headline").splitlines()
                   if line.startswith("- harness changed since it was pinned"))
    assert row["status"] == "invalid" and "harness/new.py (added) against the pin" in changes, changes
    assert "tests/" not in changes and "train.py" not in changes, changes


def test_a_removed_pin_is_not_remade_and_a_human_restores_it_at_a_terminal(harness_repo, capsys, monkeypatch):
    base, _ = archive_run(val_bpb=1.0)
    pin = sh("git", "rev-parse", "refs/auto-log-research/pins/main")
    sh("git", "update-ref", "-d", "refs/auto-log-research/pins/main")  # arbitrary code can; the agent's git cannot
    commit("idea", "DEPTH = 9\n")
    row, _ = archive_run(val_bpb=0.9, age_s=-5)
    assert row["status"] == "invalid" and not sh("git", "for-each-ref", "refs/auto-log-research/"), row
    code, problems, lines = audit(capsys)
    assert any("branch main has no pin although 2 runs" in p for p in problems), lines
    assert named(problems, base["run_id"], "not one of branch main's pins (now: none)"), lines
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False)
    with pytest.raises(SystemExit, match="a human confirms it at a terminal"):
        run_analyze("repin", pin)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr(builtins, "input", lambda prompt: "main")
    assert run_analyze("repin", pin) == 0
    code, problems, lines = audit(capsys)
    assert not named(problems, base["run_id"], ""), lines
    assert named(problems, row["run_id"], "harness was not its branch's pin when archived"), \
        "an invalid run stays named"


def test_repin_needs_the_branch_name_typed_at_the_terminal(harness_repo, capsys, monkeypatch):
    archive_run(val_bpb=1.0)
    before = sh("git", "rev-parse", "refs/auto-log-research/pins/main")
    Path("prepare.py").write_text("MAX_SEQ_LEN = 1024\n")
    target = commit("a human's harness change", "DEPTH = 8\nMATRIX_LR = 0.04\n")
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr(builtins, "input", lambda prompt: "yes")
    with pytest.raises(SystemExit, match="not re-pinned"):
        run_analyze("repin")
    assert sh("git", "rev-parse", "refs/auto-log-research/pins/main") == before
    monkeypatch.setattr(builtins, "input", lambda prompt: "main")
    run_analyze("repin")
    assert sh("git", "rev-parse", "refs/auto-log-research/pins/main") == target
    row, _ = archive_run(val_bpb=0.99, age_s=-5)
    assert row["status"] == "pending", "a run of the re-pinned harness is not invalid"


# ---------------------------------------------------------------------------
# results.tsv and the archived files

def test_a_status_edited_by_hand_in_results_tsv_is_named_and_never_the_best(harness_repo, capsys):
    base, _ = archive_run(val_bpb=1.000)
    keep(base)
    commit("idea", "DEPTH = 9\n")
    idea, _ = archive_run(val_bpb=1.010, age_s=-5)
    run_analyze("status", idea["run_id"], "discard")
    edit_results(idea["run_id"], "status", "keep")  # discard turned into keep by hand
    code, problems, lines = audit(capsys)
    assert code == 1 and named(problems, idea["run_id"], "results.tsv says status `keep`, but the last decision "
                                                         "made through `analyze.py status` was `discard`"), lines
    best_id, err = best(capsys)
    assert best_id == base["run_id"] and f"{idea['run_id']} is passed over as best" in err, (best_id, err)
    capsys.readouterr()
    run_analyze("list")
    marked = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line[11:12] == "*"]
    assert marked == [base["run_id"]], marked
    run_analyze("status", idea["run_id"], "discard")  # recording the decision again mends it
    code, problems, lines = audit(capsys)
    assert (code, problems) == (0, []), lines


def test_an_edited_archived_val_bpb_is_named_and_never_the_best(harness_repo, capsys):
    base, _ = archive_run(val_bpb=1.000)
    keep(base)
    commit("idea", "DEPTH = 9\n")
    idea, _ = archive_run(val_bpb=1.010, age_s=-5)
    path = ARCHIVE / idea["run_id"] / "run_summary.json"
    summary = json.loads(path.read_text())
    path.write_text(json.dumps({**summary, "val_bpb": 0.9}))
    edit_results(idea["run_id"], "val_bpb", "0.900000")
    code, problems, lines = audit(capsys)
    for text in ("run_summary.json changed after archiving",
                 "results.tsv says val_bpb 0.900000, but it was archived with val_bpb 1.010000",
                 "run_summary.json says val_bpb 0.900000, but it was archived with 1.010000"):
        assert named(problems, idea["run_id"], text), f"{text!r} not in:\n" + "\n".join(lines)
    assert code == 1
    assert best(capsys)[0] == base["run_id"], "the edited 0.900000 became the best"
    with pytest.raises(SystemExit, match=f"run {idea['run_id']} cannot be kept: "):
        run_analyze("status", idea["run_id"], "keep")


@pytest.mark.parametrize("name", ["metrics.jsonl", "run.log", "diff.patch"])
def test_any_archived_file_changed_after_archiving_is_named(harness_repo, capsys, name):
    row, _ = archive_run(val_bpb=1.0)
    with open(ARCHIVE / row["run_id"] / name, "a") as f:
        f.write("\n")
    code, problems, lines = audit(capsys)
    assert code == 1 and named(problems, row["run_id"], f"{name} changed after archiving"), lines


def test_a_kept_run_whose_commit_left_the_branch_is_named(harness_repo, capsys):
    base, _ = archive_run(val_bpb=1.000)
    keep(base)
    commit("idea", "DEPTH = 9\n")
    idea, _ = archive_run(val_bpb=0.990, age_s=-5)
    keep(idea)
    sh("git", "reset", "-q", "--hard", "HEAD~1")  # history rewritten: denied to the agent, but possible
    code, problems, lines = audit(capsys)
    assert named(problems, idea["run_id"], f"kept, but its commit {idea['commit']} is not an ancestor of branch main"), \
        lines
    assert best(capsys)[0] == base["run_id"]


def test_decisions_and_runs_that_match_nothing_are_named(harness_repo, capsys):
    row, _ = archive_run(val_bpb=1.0)
    with open(ARCHIVE / "decisions.jsonl", "a") as f:
        f.write(json.dumps({"run_id": "deadbee", "status": "keep"}) + "\n" + '{"run_id": "torn", "sta')
    shutil.copytree(ARCHIVE / row["run_id"], ARCHIVE / "abcdef0")
    code, problems, lines = audit(capsys)
    assert any("deadbee: .auto-log-research/decisions.jsonl holds a decision about it" in p for p in problems), lines
    assert any("decisions.jsonl line 2 is not a decision" in p for p in problems), lines
    assert any(p.startswith("abcdef0: stored in") for p in problems), lines


def test_a_run_of_another_clone_sharing_the_archive_is_checked_in_part_not_failed(harness_repo, capsys, monkeypatch,
                                                                                 tmp_path_factory):
    shared = tmp_path_factory.mktemp("volume") / "archive"  # one archive, two clones (two machines)
    clone = tmp_path_factory.mktemp("machine2") / "repo"
    sh("git", "clone", "-q", str(harness_repo), str(clone))
    monkeypatch.setenv("AUTORESEARCH_ARCHIVE", str(shared))
    monkeypatch.setenv("AUTORESEARCH_WORKER", "m1")
    write_run(val_bpb=1.0)
    assert run_analyze() == 0
    monkeypatch.chdir(clone)
    monkeypatch.setenv("AUTORESEARCH_WORKER", "m2")
    for key, value in (("user.email", "t@example.com"), ("user.name", "test")):
        sh("git", "config", key, value)
    sh("git", "checkout", "-q", "-b", "autoresearch/m2")
    commit("m2's idea", "DEPTH = 10\n")
    write_run(val_bpb=0.98, age_s=-5)
    assert run_analyze() == 0  # pins autoresearch/m2 in the clone only: refs/auto-log-research/ is not cloned
    mine, theirs = [line.split("\t")[5] for line in (shared / "results.tsv").read_text().splitlines()[1:]]
    keep({"run_id": theirs})
    monkeypatch.chdir(harness_repo)
    monkeypatch.setenv("AUTORESEARCH_WORKER", "m1")
    keep({"run_id": mine})
    code, problems, lines = audit(capsys)
    assert (code, problems[:1]) == (0, [f"not verifiable here: {theirs}: worker m2's branch autoresearch/m2 and its "
                                        f"pin {sh('git', '-C', str(clone), 'rev-parse', 'HEAD')[:7]} live in another "
                                        "clone: its harness and lineage cannot be verified here (its files, val_bpb "
                                        "and status were)"]), lines
    assert lines[-1].startswith("audit: 2 runs, clean; 1 run(s) of other clones checked in part"), lines[-1]
    assert best(capsys)[0] == mine, "m1's best is its own run"
    with open(shared / theirs / "run.log", "a") as f:
        f.write("\n")
    code, problems, lines = audit(capsys)
    assert code == 1 and named(problems, theirs, "run.log changed after archiving"), lines
    # the branch is here after all (the workers of one node share one repository): its missing pin is lost
    sh("git", "fetch", "-q", str(clone), "autoresearch/m2:autoresearch/m2")
    code, problems, lines = audit(capsys)
    assert named(problems, theirs, "which is not one of branch autoresearch/m2's pins"), problems


# ---------------------------------------------------------------------------
# Speed

def grow_night(row, n_runs):
    """n_runs archived runs: copies of `row`'s directory (hard links) with a metrics.jsonl of a real run's
    size, half of them discarded through decisions.jsonl."""
    src = ARCHIVE / row["run_id"]
    line = json.dumps({f"layer/{i}.attn.c_q/grad_norm": 0.123456789 for i in range(12)}) + "\n"
    (src / "metrics.jsonl").write_text(line * (METRICS_BYTES // len(line)))
    record = json.loads((src / "record.json").read_text())
    record["files"]["metrics.jsonl"] = hashlib.sha256((src / "metrics.jsonl").read_bytes()).hexdigest()
    (src / "record.json").write_text(json.dumps(record))
    lines = (ARCHIVE / "results.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    rows, decisions = [], []
    for i in range(1, n_runs):
        run_id = f"{row['commit']}-{i + 1}"
        shutil.copytree(src, ARCHIVE / run_id, copy_function=os.link)
        status = "discard" if i % 2 else "pending"
        rows.append("\t".join({**row, "run_id": run_id, "status": status, "run_key": f"night{i}"}[k] for k in header))
        if status == "discard":
            decisions.append(json.dumps({"run_id": run_id, "status": "discard", "was": "pending"}) + "\n")
    (ARCHIVE / "results.tsv").write_text("\n".join([*lines, *rows]) + "\n")
    with open(ARCHIVE / "decisions.jsonl", "a") as f:
        f.write("".join(decisions))


def test_a_night_of_400_runs_audits_clean(harness_repo, capsys):
    """The time it takes is printed, not asserted: a loaded machine is slow, and speed is a benchmark's job."""
    row, _ = archive_run(val_bpb=1.0)
    grow_night(row, NIGHT)
    t0 = time.perf_counter()
    code, problems, lines = audit(capsys)
    seconds = time.perf_counter() - t0
    assert (code, problems) == (0, []), "\n".join(lines[:20])
    assert lines[-1].startswith(f"audit: {NIGHT} runs, clean"), lines[-1]
    print(f"audit of {NIGHT} runs ({METRICS_BYTES / 1e3:.0f} kB of metrics each): {seconds:.2f} s", file=sys.stderr)

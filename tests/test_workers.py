"""contrib/shared.py: what workers sharing one archive tell each other (claims, each worker's insights.md), and
a read-only view over several archives."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from contrib import shared
from harness.record import Archive
from tests.factory import make_run

pytestmark = pytest.mark.quick
ROOT = Path(__file__).resolve().parent.parent


def test_a_claim_is_closed_by_its_workers_next_run_or_replaced_by_its_next_claim():
    runs = [make_run(1.00, id="early", worker="w1", archived_at=5),       # before any claim: closes none
            make_run(0.99, id="w2-old", worker="w2", archived_at=15),     # before w2's claim
            make_run(0.98, id="first", worker="w1", archived_at=40),
            make_run(0.97, id="second", worker="w1", archived_at=45)]     # c is closed already
    claims = [shared.Claim(at, worker, f"autoresearch/{worker}", idea)
              for at, worker, idea in ((10, "w1", "a"), (20, "w2", "b"), (30, "w1", "c"), (50, "w1", "d"))]
    assert [(c.idea, c.ended, c.run and c.run.id) for c in shared.settle(claims, runs)] == [
        ("a", "replaced", None), ("b", "open", None), ("c", "closed", "first"), ("d", "open", None)]


@pytest.fixture
def worktree(tmp_path, monkeypatch):
    """A worker's worktree (a git repository) whose archive is elsewhere, as contrib/workers.py sets it up."""
    tree = tmp_path / "wt"
    subprocess.run(["git", "init", "-q", "-b", "autoresearch/t-0", str(tree)], check=True)
    monkeypatch.chdir(tree)
    monkeypatch.setenv("AUTORESEARCH_ARCHIVE", str(tmp_path / "shared" / ".auto-log-research"))
    monkeypatch.setenv("AUTORESEARCH_WORKER", "t-0")
    return tree


def out_of(capsys, *argv):
    capsys.readouterr()
    assert shared.main(list(argv)) == 0
    return capsys.readouterr().out


def save(archive, run):
    with archive.lock():
        archive.save(run)


def test_claims_show_the_others_and_end_with_the_workers_next_run(worktree, monkeypatch, capsys):
    archive = Archive.here()
    assert "no other worker has an open claim" in out_of(capsys, "claim", "MATRIX_LR 0.04 -> 0.05")
    monkeypatch.setenv("AUTORESEARCH_WORKER", "t-1")
    out = out_of(capsys, "claim", "  warmdown\t0.5  ")
    assert "claimed by t-1: warmdown 0.5" in out and "t-0  autoresearch/t-0  MATRIX_LR 0.04 -> 0.05" in out, out
    monkeypatch.setenv("AUTORESEARCH_WORKER", "t-0")
    out = out_of(capsys, "claim", "DEPTH 8 -> 10")
    assert "your earlier open claim is now replaced: MATRIX_LR 0.04 -> 0.05" in out, out
    save(archive, make_run(0.995, id="abc1234", worker="t-0", branch="autoresearch/t-0", archived_at=time.time(),
                           status="discard"))
    out = out_of(capsys, "claims")
    opened, closed = out.split("ended claims")
    assert "t-1  autoresearch/t-0  warmdown 0.5" in opened and "DEPTH" not in opened, out
    assert "DEPTH 8 -> 10  -> run abc1234 val_bpb 0.995000 status discard" in closed, out
    assert "MATRIX_LR 0.04 -> 0.05  -> replaced by a newer claim" in closed, out
    workers = out_of(capsys, "workers").splitlines()
    assert [w.split("\t")[0] for w in workers] == ["t-0", "t-1"], workers
    assert "1 runs" in workers[0] and "no open claim" in workers[0] and "claim 'warmdown 0.5'" in workers[1], workers
    with pytest.raises(SystemExit, match="a claim is the idea in 1-300 characters"):
        shared.main(["claim", " \n "])


def test_a_workers_best_is_its_last_kept_run_on_its_latest_branch():
    runs = [make_run(bpb, id=f"r{i}", status=status, branch=f"autoresearch/{branch}") for i, (bpb, status, branch)
            in enumerate([(0.90, "keep", "other"), (0.99, "keep", "mine"), (0.98, "keep", "mine"),
                           (0.97, "discard", "mine")])]
    line = shared.worker_line("t-0", runs, None, "")
    assert "branch autoresearch/mine" in line and "4 runs" in line and "best r2 val_bpb 0.980000" in line, line


def test_insights_are_copied_when_they_change_and_read_back_by_worker(worktree, capsys):
    notes = worktree / ".auto-log-research" / "insights.md"
    notes.parent.mkdir()
    notes.write_text("# Insights\n\nwarmdown 0.5 helps\n")
    out = out_of(capsys, "insights", "t-0")
    copy = Archive.here().dir / "workers" / "t-0" / "insights.md"
    assert out.startswith(f"==> worker t-0: {copy} (copied ") and "warmdown 0.5 helps" in out, out
    os.utime(copy, (0, 0))
    assert not shared.snapshot(Archive.here().dir, "t-0", notes) and copy.stat().st_mtime == 0, "copied unchanged"
    notes.write_text("# Insights\n\nDEPTH 10 does not\n")
    assert shared.snapshot(Archive.here().dir, "node7:0", notes)  # any name is one directory, and reads back
    assert "DEPTH 10 does not" in out_of(capsys, "insights", "node7:0")
    with pytest.raises(SystemExit, match="no insights.md copy of 'node9'.*workers with one: node7:0, t-0"):
        shared.main(["insights", "node9"])


CLAIMER = """
import sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from contrib import shared
from harness.record import Archive
archive = Archive.here()
while not Path({go!r}).exists():
    time.sleep(0.01)
for i in range({n}):
    shared.add_claim(archive, {worker!r}, "b", f"idea {{i}} of {worker}")
"""


def test_many_processes_claiming_at_once_lose_and_tear_nothing(worktree, tmp_path):
    go, n = tmp_path / "go", 25
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER.format(root=str(ROOT), go=str(go), n=n, worker=f"w{k}")],
                              stderr=subprocess.PIPE, text=True) for k in range(4)]
    time.sleep(0.5)
    go.touch()
    assert all(p.wait(timeout=60) == 0 for p in procs), [p.stderr.read()[-800:] for p in procs]
    claims = shared.read_claims(Archive.here().dir)
    assert sorted(c.idea for c in claims) == sorted(f"idea {i} of w{k}" for k in range(4) for i in range(n))
    assert (Archive.here().dir / "claims.tsv").read_text().count("opened_at") == 1


def contents(*dirs):
    return {p: p.read_bytes() for d in dirs for p in d.rglob("*") if p.is_file()}


def test_a_view_reads_several_archives_as_one_and_writes_into_none(worktree, tmp_path, monkeypatch, capsys):
    nodes = [tmp_path / f"node{n}" / ".auto-log-research" for n in (1, 2)]
    for n, node in enumerate(nodes, 1):  # one archive per machine, one commit on both: the run ids clash
        monkeypatch.setenv("AUTORESEARCH_ARCHIVE", str(node))
        monkeypatch.setenv("AUTORESEARCH_WORKER", f"node{n}:0")
        out_of(capsys, "claim", f"idea of node{n}")
        save(Archive.here(), make_run(1.0 - 0.01 * n, id="abc1234", worker=f"node{n}:0", archived_at=time.time(),
                                      status="keep"))
    before = contents(*nodes)
    view = ["--archive", str(nodes[0]), "--archive", str(nodes[1])]
    claims = out_of(capsys, *view, "claims")
    assert "idea of node1  -> run node1:abc1234 val_bpb 0.990000 status keep" in claims, claims
    assert "idea of node2  -> run node2:abc1234 val_bpb 0.980000 status keep" in claims, claims
    workers = out_of(capsys, *view, "workers").splitlines()
    assert [w.split("\t")[0] for w in workers] == ["node1:node1:0", "node2:node2:0"], workers
    assert "best node2:abc1234 val_bpb 0.980000" in workers[1], workers
    with pytest.raises(SystemExit, match="--archive makes a read-only view"):
        shared.main([*view, "claim", "x"])
    assert contents(*nodes) == before, "a view wrote into an archive"

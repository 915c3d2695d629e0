"""Several workers share one archive (AUTORESEARCH_ARCHIVE): concurrent analyze.py processes from
several git worktrees lose, tear and duplicate nothing; each worker keeps its own best, notes and
claims, and sees the others'; runs on different GPU models are never pooled or compared as alike; and a
view over several archives reads them as one and writes into none of them."""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from test_analyze import (ARCHIVE, ROOT, analysis, archive_run, commit, repo, run_analyze, section, sh,  # noqa: F401
                          write_run)
from harness.archive import COLUMNS

TESTS = Path(__file__).resolve().parent
H100, A100 = "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"


def rows_of(archive):
    lines = (Path(archive) / "results.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    assert header == list(COLUMNS), header
    torn = [line for line in lines[1:] if len(line.split("\t")) != len(header)]
    assert not torn, f"torn rows: {torn}"
    return [dict(zip(header, line.split("\t"))) for line in lines[1:]]


def as_worker(monkeypatch, name, archive=None):
    monkeypatch.setenv("AUTORESEARCH_WORKER", name)
    if archive is not None:
        monkeypatch.setenv("AUTORESEARCH_ARCHIVE", str(archive))


def on_gpu(name, **kwargs):
    """write_run's files for a run on the GPU `name` (the summary's env.gpu_name), then archive them."""
    write_run(**kwargs)
    summary = json.loads(Path("run_summary.json").read_text())
    summary["env"]["gpu_name"] = name
    stamp = Path("run_summary.json").stat().st_mtime
    Path("run_summary.json").write_text(json.dumps(summary))
    os.utime("run_summary.json", (stamp, stamp))
    assert run_analyze() == 0


def out_of(capsys, *argv):
    capsys.readouterr()
    assert run_analyze(*argv) == 0
    return capsys.readouterr().out


def digests(*dirs):
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for d in dirs for p in sorted(Path(d).rglob("*"))
            if p.is_file()}


# ---------------------------------------------------------------------------
# Many writers, one archive

WRITER = """
import sys, time
from pathlib import Path
sys.path[:0] = [{tests!r}, {root!r}]
import test_analyze as t
Path({ready!r}).touch()
while not Path({go!r}).exists():
    time.sleep(0.01)
for i in range({runs}):
    assert t.analyze.main(["claim", f"idea {{i}}"]) == 0
    t.write_run(val_bpb=1.0 + 0.001 * i, seed=i, age_s=-3 * i, steps=100)  # short curves: the archive is the test
    assert t.analyze.main([]) == 0
"""


def test_four_processes_in_four_worktrees_archive_every_run_exactly_once(repo, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("workers")
    shared, go, runs = tmp_path / "shared-archive", tmp_path / "go", 2
    head = sh("git", "rev-parse", "HEAD")
    trees = []
    for n in range(4):  # every worktree at one commit: all runs compete for <commit7>, -2, -3, ...
        trees.append(tmp_path / f"wt{n}")
        sh("git", "worktree", "add", "-q", "-b", f"autoresearch/w{n}", str(trees[-1]))
        (trees[-1] / ARCHIVE).mkdir()
        (trees[-1] / ARCHIVE / "insights.md").write_text(f"# Insights\n\nworker w{n} found nothing yet\n")
    script = [WRITER.format(tests=str(TESTS), root=str(ROOT), ready=str(tmp_path / f"ready{n}"), go=str(go), runs=runs)
              for n in range(4)]
    procs = [subprocess.Popen([sys.executable, "-c", script[n]], cwd=tree, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE,
                              env={**os.environ, "AUTORESEARCH_WORKER": f"w{n}", "AUTORESEARCH_ARCHIVE": str(shared)})
             for n, tree in enumerate(trees)]
    deadline = time.time() + 60
    while not all((tmp_path / f"ready{n}").exists() for n in range(4)) and time.time() < deadline:
        time.sleep(0.05)  # every process has imported what it needs: they start together
    go.touch()
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1].decode()[-800:] for o in outs]
    rows = rows_of(shared)
    ids = [r["run_id"] for r in rows]
    assert sorted(ids) == sorted([head[:7]] + [f"{head[:7]}-{k}" for k in range(2, 4 * runs + 1)]), ids
    assert len({r["run_key"] for r in rows}) == 4 * runs, "a run was archived twice"
    assert sorted(r["worker"] for r in rows) == sorted(f"w{n}" for n in range(4) for _ in range(runs))
    stored = sorted(p.name for p in shared.iterdir() if re.fullmatch(r"[0-9a-f]{7}(-\d+)?", p.name))
    assert stored == sorted(ids), f"run directories {stored} vs rows {ids}"
    assert all((shared / i / "analysis.md").exists() and (shared / i / "record.json").exists() for i in ids)
    assert not list(shared.rglob(".*.tmp")) and not (shared / "results.tsv.torn").exists()
    assert (shared / "progress.png").read_bytes()[:4] == b"\x89PNG"
    claims = [line.split("\t") for line in (shared / "claims.tsv").read_text().splitlines()[1:]]
    assert len(claims) == 4 * runs and all(c[4] == "closed" for c in claims), claims
    closed_by = {c[5]: c[1] for c in claims}
    assert closed_by == {r["run_id"]: r["worker"] for r in rows}, "a claim was closed by another worker's run"
    for n, tree in enumerate(trees):
        snapshot = shared / "workers" / f"w{n}" / "insights.md"
        assert snapshot.read_text() == (tree / ARCHIVE / "insights.md").read_text()
        assert not (tree / ARCHIVE / "results.tsv").exists(), "a worker wrote outside the shared archive"


@pytest.fixture
def two_worktrees(tmp_path, cpu_prepared):
    """A repository holding this project's train.py, prepare.py, analyze.py and harness/, and a second
    worktree of it; the cpu profile's cache is prepared once for the test session (conftest.py)."""
    out, cache = cpu_prepared
    assert out.returncode == 0, out.stderr[-2000:]
    main = tmp_path / "main"
    main.mkdir()
    for name in ("train.py", "prepare.py", "analyze.py", ".gitignore"):
        shutil.copy(ROOT / name, main / name)
    shutil.copytree(ROOT / "harness", main / "harness", ignore=shutil.ignore_patterns("__pycache__"))
    git = ["git", "-C", str(main)]
    for args in (["init", "-q", "-b", "autoresearch/a"], ["config", "user.email", "t@example.com"],
                 ["config", "user.name", "test"], ["add", "-A"], ["commit", "-qm", "baseline"],
                 ["worktree", "add", "-q", "-b", "autoresearch/b", str(tmp_path / "second")]):
        subprocess.run(git + args, check=True, capture_output=True)
    return main, tmp_path / "second", cache


def test_two_cpu_workers_train_and_archive_at_once_into_one_archive(two_worktrees, tmp_path):
    main, second, cache = two_worktrees
    shared = tmp_path / "shared"
    env = {**os.environ, "AUTORESEARCH_PROFILE": "cpu", "AUTORESEARCH_CACHE": str(cache),
           "AUTORESEARCH_TIME_BUDGET": "2", "AUTORESEARCH_ARCHIVE": str(shared), "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1"}  # one core each: two runs of torch's default threads on 2 cores take 5x longer
    loop = f"{sys.executable} train.py > run.log 2>&1; {sys.executable} analyze.py"
    procs = [subprocess.Popen(["sh", "-c", loop], cwd=tree, env={**env, "AUTORESEARCH_WORKER": worker},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for tree, worker in ((main, "node:0"), (second, "node:1"))]
    outs = [p.communicate(timeout=300) for p in procs]
    logs = [(tree / "run.log").read_text()[-1500:] for tree in (main, second)]
    assert all(p.returncode == 0 for p in procs), [(o[1].decode()[-800:], log) for o, log in zip(outs, logs)]
    rows = rows_of(shared)
    assert sorted((r["worker"], r["branch"], r["status"], r["gpu"]) for r in rows) == [
        ("node:0", "autoresearch/a", "pending", "cpu"), ("node:1", "autoresearch/b", "pending", "cpu")], rows
    assert len({r["run_id"] for r in rows}) == 2 and all(0 < float(r["val_bpb"]) < 8 for r in rows), rows
    for r in rows:
        run_dir = shared / r["run_id"]
        summary = json.loads((run_dir / "run_summary.json").read_text())
        assert summary["status"] == "ok" and f"{summary['val_bpb']:.6f}" == r["val_bpb"]
        assert "## Agent notes" in (run_dir / "analysis.md").read_text()
    audit = subprocess.run([sys.executable, "analyze.py", "audit"], cwd=main,
                           env={**env, "AUTORESEARCH_WORKER": "node:0"}, capture_output=True, text=True)
    assert audit.returncode == 0 and "clean" in audit.stdout.splitlines()[-1], audit.stdout + audit.stderr


# ---------------------------------------------------------------------------
# Rows, workers and their bests

def test_a_results_tsv_from_before_the_worker_column_reads_and_keeps_every_row(repo, monkeypatch, capsys):
    first, _ = archive_run(val_bpb=1.0)
    assert run_analyze("status", first["run_id"], "keep") == 0  # the best: only a kept run is one
    old = [line.split("\t")[:COLUMNS.index("worker")] for line in (ARCHIVE / "results.tsv").read_text().splitlines()]
    assert old[0][-1] == "code_sha", old[0]
    (ARCHIVE / "results.tsv").write_text("".join("\t".join(fields) + "\n" for fields in old))
    listed = out_of(capsys, "list")
    assert re.search(rf"^{first['run_id']} *\*.* \? +baseline$", listed, re.M), listed
    as_worker(monkeypatch, "gpu-box:0")
    commit("deeper", "DEPTH = 9\n")
    second, _ = archive_run(val_bpb=0.99, age_s=-5)
    rows = rows_of(ARCHIVE)
    assert [r["run_id"] for r in rows] == [first["run_id"], second["run_id"]]
    assert [list(rows[0].values())[:16]] == [old[1]], "the old row's fields changed"
    assert (rows[0]["worker"], rows[0]["gpu"], rows[1]["worker"]) == ("", "cpu", "gpu-box:0")
    assert f"vs best ({first['run_id']}" in section(analysis(second["run_id"]), "Headline"), \
        "a run of unknown worker is every worker's own: it stays the best"


@pytest.mark.parametrize("name", ["a\tb", "two\nlines", "x" * 81, " ", ".."])
def test_a_bad_worker_name_is_one_line_naming_the_variable(repo, monkeypatch, name):
    monkeypatch.setenv("AUTORESEARCH_WORKER", name)
    with pytest.raises(SystemExit) as stop:
        run_analyze("list")
    message = str(stop.value)
    assert message.startswith("analyze.py: AUTORESEARCH_WORKER=") and "\n" not in message, message


def test_the_default_worker_is_hostname_and_visible_devices_and_a_rename_is_pointed_out(repo, monkeypatch, capsys):
    import socket
    monkeypatch.delenv("AUTORESEARCH_WORKER", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    row, _ = archive_run()
    assert row["worker"] == f"{socket.gethostname()}:2,3", row
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    commit("next", "DEPTH = 9\n")
    assert archive_run(age_s=-5)[0]["worker"] == f"{socket.gethostname()}:cpu"
    monkeypatch.setenv("AUTORESEARCH_WORKER", "new-container:0")  # a new container: a new hostname
    capsys.readouterr()
    run_analyze("best")
    out, err = capsys.readouterr()
    assert out.startswith("no run of worker new-container:0"), out
    assert f"branch main has runs of worker {socket.gethostname()}:cpu" in err and "set AUTORESEARCH_WORKER=" in err, err


def test_best_is_the_workers_own_then_the_best_of_all_workers(repo, monkeypatch, capsys):
    as_worker(monkeypatch, "w1")
    mine, _ = archive_run(val_bpb=1.000)
    assert run_analyze("status", mine["run_id"], "keep") == 0
    assert out_of(capsys, "best").count("\n") == 1, "one worker: one line, as before"
    as_worker(monkeypatch, "w2")
    commit("w2's idea", "DEPTH = 10\n")
    theirs, _ = archive_run(val_bpb=0.980, age_s=-5)
    assert "vs best: no earlier comparable run" in section(analysis(theirs["run_id"]), "Headline"), \
        "w2 measured against w1's best, which its branch does not stand on"
    assert run_analyze("status", theirs["run_id"], "keep") == 0
    as_worker(monkeypatch, "w1")
    lines = out_of(capsys, "best").splitlines()
    assert lines[0].split("\t")[0] == mine["run_id"], lines
    assert lines[1].startswith(f"all workers: {theirs['run_id']}\t") and "worker w2" in lines[1], lines
    only = out_of(capsys, "list", "--worker", "w2").splitlines()
    assert len(only) == 2 and re.match(rf"{theirs['run_id']} *\* .* w2 ", only[1]), only
    workers = out_of(capsys, "workers").splitlines()
    assert [w.split("\t")[0] for w in workers] == ["w1", "w2"], workers
    assert f"best {theirs['run_id']} val_bpb 0.980000" in workers[1] and "1 runs" in workers[1], workers
    legend = [t.get_text() for t in figure_of(monkeypatch, lambda: run_analyze("status", mine["run_id"], "keep"))]
    assert {"current best of w1 (last kept)", "current best of w2 (last kept)"} <= set(legend), legend


def test_status_decides_only_this_workers_runs(repo, monkeypatch):
    """Two workers' runs of one commit are `abc1234` and `abc1234-2`: the short sha a worker's git log gives
    names its own run, and another worker's run is refused by name, its row untouched."""
    as_worker(monkeypatch, "w1")
    first, _ = archive_run(val_bpb=1.000)
    as_worker(monkeypatch, "w2")
    second, _ = archive_run(val_bpb=0.990, seed=1)
    assert second["run_id"] == first["run_id"] + "-2", (first["run_id"], second["run_id"])
    assert run_analyze("status", first["commit"][:7], "keep") == 0
    assert [r["status"] for r in rows_of(ARCHIVE)] == ["pending", "keep"], "w2's short sha decided w1's run"
    as_worker(monkeypatch, "w1")
    commit("w1's idea", "DEPTH = 10\n")
    third, _ = archive_run(val_bpb=0.980, seed=2)
    as_worker(monkeypatch, "w2")
    with pytest.raises(SystemExit, match=f"run {third['run_id']} is worker w1's, not w2's"):
        run_analyze("status", third["run_id"], "discard")
    assert [r["status"] for r in rows_of(ARCHIVE)] == ["pending", "keep", "pending"]


def figure_of(monkeypatch, action):
    """The texts of the last figure `action` saves."""
    import matplotlib.figure
    import matplotlib.text
    saved, savefig = [], matplotlib.figure.Figure.savefig

    def keep(fig, *args, **kwargs):
        saved.append(fig.findobj(matplotlib.text.Text))
        return savefig(fig, *args, **kwargs)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    action()
    return saved[-1]


def test_a_relative_archive_is_relative_to_the_repository_root(repo, monkeypatch, capsys):
    monkeypatch.setenv("AUTORESEARCH_ARCHIVE", "runs/shared")
    write_run()
    assert run_analyze() == 0
    run_id = rows_of(repo / "runs" / "shared")[0]["run_id"]
    (repo / "sub").mkdir()
    monkeypatch.chdir(repo / "sub")
    assert f"\n{run_id} " in out_of(capsys, "list"), "a subdirectory resolved the archive to another place"


# ---------------------------------------------------------------------------
# GPU models

def test_runs_on_another_gpu_model_are_never_pooled_or_compared_as_alike(repo, monkeypatch, capsys):
    as_worker(monkeypatch, "h100-box")
    on_gpu(H100, val_bpb=1.000)
    on_gpu(H100, val_bpb=1.004, age_s=-5)  # a repeat: a noise band on the H100
    h100 = rows_of(ARCHIVE)[0]
    assert run_analyze("status", h100["run_id"], "keep") == 0
    as_worker(monkeypatch, "a100-box")
    on_gpu(A100, val_bpb=1.100, age_s=-10)
    first = rows_of(ARCHIVE)[-1]
    assert first["gpu"] == "A100-SXM4-80GB" and h100["gpu"] == "H100 80GB HBM3"
    head = section(analysis(first["run_id"]), "Headline")
    assert "vs best: no earlier comparable run" in head, head
    assert (f"GPU: this run ran on A100-SXM4-80GB; the best under this harness by worker h100-box is "
            f"{h100['run_id']} (val_bpb 1.000000) on H100 80GB HBM3: another device, so it is not compared") in head
    assert "noise band: unknown" in section(analysis(first["run_id"]), "Noise"), "the H100's repeats were pooled"
    on_gpu(A100, val_bpb=1.110, age_s=-15)
    band = 2 * np.sqrt(2) * np.std([1.100, 1.110], ddof=1)  # the A100's repeats alone
    noise = section(analysis(rows_of(ARCHIVE)[-1]["run_id"]), "Noise")
    assert f"noise band: +-{band:.6f}" in noise and "from 2 runs" in noise, noise
    out = out_of(capsys, "compare", h100["run_id"], first["run_id"])
    assert "worker h100-box, GPU H100 80GB HBM3" in out and "worker a100-box, GPU A100-SXM4-80GB" in out, out
    assert "different devices, A on H100 80GB HBM3 and B on A100-SXM4-80GB" in out, out
    assert "  gpu " in out_of(capsys, "list").splitlines()[0], "two GPU models: list shows which"


# ---------------------------------------------------------------------------
# Notes, claims

def test_notes_stay_in_the_worktree_and_a_copy_goes_to_the_archive(repo, monkeypatch, tmp_path_factory, capsys):
    shared = tmp_path_factory.mktemp("elsewhere") / "archive"  # outside the repository, as on a shared volume
    as_worker(monkeypatch, "node7:0", shared)
    write_run()
    assert run_analyze() == 0
    row = rows_of(shared)[0]
    assert run_analyze("status", row["run_id"], "keep") == 0
    local = (ARCHIVE / "insights.md").read_text()
    assert f"- run {row['run_id']}, commit {row['commit']}" in local, local
    assert not (shared / "insights.md").exists() and not (ARCHIVE / "results.tsv").exists()
    snapshot = shared / "workers" / "node7%3A0" / "insights.md"
    assert snapshot.read_text() == local
    printed = out_of(capsys, "insights", "node7:0")
    assert printed.startswith(f"==> worker node7:0: {snapshot} (copied ") and "## Current Best" in printed, printed
    with pytest.raises(SystemExit, match="no insights.md snapshot of worker 'node9'.*workers with one: node7:0"):
        run_analyze("insights", "node9")


def test_claims_show_overlaps_are_replaced_and_closed_by_the_next_run(repo, monkeypatch, capsys):
    as_worker(monkeypatch, "w1")
    assert "no other worker has an open claim" in out_of(capsys, "claim", "MATRIX_LR 0.04 -> 0.05")
    as_worker(monkeypatch, "w2")
    out = out_of(capsys, "claim", "  warmdown\t0.5  ")
    assert "claimed by w2: warmdown 0.5" in out and "w1  main  MATRIX_LR 0.04 -> 0.05" in out, out
    as_worker(monkeypatch, "w1")
    out = out_of(capsys, "claim", "DEPTH 8 -> 10")
    assert "your earlier open claim is marked abandoned: MATRIX_LR 0.04 -> 0.05" in out, out
    row, _ = archive_run(val_bpb=0.995)
    assert run_analyze("status", row["run_id"], "discard") == 0
    out = out_of(capsys, "claims")
    opened, closed = out.split("closed claims")
    assert "w2  main  warmdown 0.5" in opened and "DEPTH" not in opened, out
    assert re.search(rf"w1  main  DEPTH 8 -> 10  -> run {row['run_id']} val_bpb 0.995000 status discard", closed), out
    assert "MATRIX_LR 0.04 -> 0.05  -> abandoned" in closed, out
    assert "claim 'warmdown 0.5' since" in out_of(capsys, "workers").splitlines()[1]
    with pytest.raises(SystemExit, match="a claim is the idea in 1-300 characters"):
        run_analyze("claim", " \n ")


# ---------------------------------------------------------------------------
# A view over several archives

def test_a_view_reads_several_archives_as_one_and_writes_into_none(repo, monkeypatch, tmp_path, capsys):
    nodes = [tmp_path / f"node{n}" / ".auto-log-research" for n in (1, 2)]
    ids = []
    for n, node in enumerate(nodes, 1):  # one archive per machine, the same commit on both: the ids clash
        as_worker(monkeypatch, f"node{n}:0", node)
        assert run_analyze("claim", f"idea of node{n}") == 0
        write_run(val_bpb=1.0 - 0.01 * n, age_s=-5 * n)
        assert run_analyze() == 0
        ids.append(rows_of(node)[-1]["run_id"])
    assert ids[0] == ids[1]
    ARCHIVE.mkdir()
    (ARCHIVE / "insights.md").write_text("# Insights\n")
    assert run_analyze("status", ids[1], "keep") == 0  # node2's copy of its notes
    before = digests(*nodes)
    out = tmp_path / "home"
    view = ["--archive", str(nodes[0]), "--archive", str(nodes[1]), "--out", str(out)]
    listed = out_of(capsys, *view, "list")
    assert f"node1:{ids[0]}  " in listed and f"node2:{ids[1]}* " in listed, listed  # node1's run is pending: no best
    best = out_of(capsys, *view, "best").splitlines()  # no worker of its own: the best of all workers only
    assert len(best) == 1 and best[0].startswith(f"all workers: node2:{ids[1]}\t"), best
    assert len(out_of(capsys, *view, "workers").splitlines()) == 2
    assert f"# Run {ids[0]}" in out_of(capsys, *view, "show", f"node1:{ids[0]}")
    compared = out_of(capsys, *view, "compare", f"node1:{ids[0]}", f"node2:{ids[1]}")
    assert "val_bpb B - A: -0.010000" in compared and str(out) in compared, compared
    claims = out_of(capsys, *view, "claims")
    assert "idea of node1" in claims and f"-> run node2:{ids[1]} val_bpb 0.980000 status keep" in claims, claims
    assert "## Current Best" in out_of(capsys, *view, "insights", "node2:0")
    with pytest.raises(SystemExit, match=f"'{ids[0]}' matches several runs"):
        run_analyze(*view, "show", ids[0])
    with pytest.raises(SystemExit, match="--archive makes a read-only view"):
        run_analyze("--archive", str(nodes[0]), "status", ids[0], "keep")
    assert digests(*nodes) == before, "a view wrote into an archive"
    assert (out / "progress.png").read_bytes()[:4] == b"\x89PNG"

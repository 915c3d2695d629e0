"""Every way of buying a number outside the rules that the harness catches, each planted in train.py or
around it. First the bare `analyze.py` path on synthetic runs (tests/test_analyze.py's way): a summary
that claims ok without run.log's final block is a crash, and a manual run stopped by Ctrl-C is
`interrupted`, never a number. Then real cpu-profile runs of `analyze.py run` in a temporary copy of
this repository, one archive for the module: an honest baseline (kept); a run that trains on the
validation split, trains untimed before the loop and prints a val_bpb that is not its model's (one run,
three cases, each named by its own check); a slowed clock; an untracked argparse.py (refused before
anything runs); a crash followed by a forged run_summary.json and a bare `analyze.py`; and Ctrl-C
(archived as interrupted, exit 130). The limits of the caught cases are tested as functions in
tests/test_runner.py; here the whole path is, with margins that a loaded machine keeps."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_analyze import (ARCHIVE, analysis, archive_run, repo, results, run_analyze, section,  # noqa: F401
                          write_run)

ROOT = Path(__file__).resolve().parent.parent
from harness.capture import FORGED_OK  # noqa: E402
from harness.runner import NOT_THE_MODELS, SLOWED_CLOCK, TRAINED_ON_VAL, UNTIMED_WORK, machine_moved  # noqa: E402

BUDGET_S = "3"               # AUTORESEARCH_TIME_BUDGET of every real run here
UNTIMED_S = 15               # seconds the cheat trains before the loop, well beyond the 5 s + 10% allowed
CLOCK_FACTOR = 0.25          # the slowed clock runs at a quarter of the real one
RUN_TIMEOUT_S = 600          # one `analyze.py run`, on a loaded 2-core machine
LAB_SETTINGS = (             # the lab's baseline: train.py with a smaller model and fewer pauses, for shorter runs
    ("\nDEPTH = 8 if gpu_profile else 4 ", "\nDEPTH = 8 if gpu_profile else 2 "),
    ("\nVAL_POINTS = 10 ", "\nVAL_POINTS = 2  "),
    ("\nTIMING_SKIP_STEPS = 10 ", "\nTIMING_SKIP_STEPS = 3  "),
)

# ---------------------------------------------------------------------------
# The bare `analyze.py`: train.py's word only, so it must be backed by run.log

def test_a_summary_that_claims_ok_without_the_final_block_is_a_crash(repo, capsys):
    row, _ = archive_run(val_bpb=0.9, log="step 12 loss 4.1\nTraceback (most recent call last):\nRuntimeError: x\n")
    assert (row["status"], row["outcome"], row["val_bpb"], row["caught"], row["measured"]) == \
        ("crash", "crash", "0.000000", FORGED_OK, ""), row
    text = analysis(row["run_id"])
    assert f"{FORGED_OK}: run.log has no final `---` block; recorded as a crash" in section(text, "Headline"), text
    capsys.readouterr()
    assert run_analyze("audit") == 1
    assert f"{row['run_id']}: caught: {FORGED_OK}" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="cannot be kept"):
        run_analyze("status", row["run_id"], "keep")


def test_a_summary_whose_val_bpb_is_not_the_final_blocks_is_a_crash(repo):
    row, _ = archive_run(val_bpb=0.9, log="---\nval_bpb: 1.100000\n")
    assert (row["status"], row["caught"]) == ("crash", FORGED_OK), row
    assert "final block says val_bpb 1.100000, run_summary.json 0.900000" in section(analysis(row["run_id"]), "Headline")


def test_a_bare_archive_backed_by_its_final_block_is_pending_and_not_harness_measured(repo, capsys):
    row, _ = archive_run(val_bpb=0.9)
    assert (row["status"], row["outcome"], row["caught"], row["measured"], row["decision"]) == \
        ("pending", "ok", "", "", ""), row
    capsys.readouterr()
    assert run_analyze("audit") == 0, capsys.readouterr().out


def test_a_manual_run_stopped_by_ctrl_c_is_interrupted_with_no_number(repo, capsys):
    write_run(val_bpb=0.9, log="step 12 loss 4.1\n")
    summary = json.loads(Path("run_summary.json").read_text())
    Path("run_summary.json").write_text(json.dumps({**summary, "status": "interrupted", "val_bpb": None,
                                                    "error": "KeyboardInterrupt"}))
    assert run_analyze() == 0
    row = results()[-1]
    assert (row["status"], row["outcome"], row["val_bpb"], row["caught"]) == ("pending", "interrupted", "0.000000", ""), row
    with pytest.raises(SystemExit, match="cannot be kept"):
        run_analyze("status", row["run_id"], "keep")
    capsys.readouterr()
    run_analyze("best")
    assert capsys.readouterr().out.startswith("no best run yet"), "an interrupted run became the best"

# ---------------------------------------------------------------------------
# Real runs of `analyze.py run`

CHEATS = {  # name -> (anchor in train.py, what replaces it)
    "trains on val": ('train_loader = make_dataloader(tokenizer, device_batch_size, MAX_SEQ_LEN, "train", device=device.type)',
                      'train_loader = make_dataloader(tokenizer, device_batch_size, MAX_SEQ_LEN, "val", device=device.type)'),
    "untimed training": ("    x, y, epoch = next(train_loader)  # prefetch first batch\n",
                         "    x, y, epoch = next(train_loader)  # prefetch first batch\n"
                         "    t_cheat = time.time()\n"
                         f"    while time.time() - t_cheat < {UNTIMED_S}:  # training the clock never sees\n"
                         "        with autocast_ctx:\n"
                         "            loss = model(x, y)\n"
                         "        loss.backward()\n"
                         "        optimizer.step()\n"
                         "        model.zero_grad(set_to_none=True)\n"
                         "        x, y, epoch = next(train_loader)\n"),
    "fewer eval tokens": ("    # Final eval: the fixed metric\n",
                          "    # Final eval: the fixed metric\n    import prepare\n    prepare.EVAL_TOKENS = 2**13\n"),
    "scaled val_bpb": ("    run.finish(val_bpb=val_bpb,",
                       "    import prepare\n"
                       "    val_bpb = val_bpb * 0.97\n"
                       "    prepare._METRIC_RESULTS[val_bpb] = val_bpb  # so that RunRecorder takes it\n"
                       "    run.finish(val_bpb=val_bpb,"),
    "slowed clock": ("import time\n", "import time\n_real_time = time.time\n_t0 = _real_time()\n"
                                      f"time.time = lambda: _t0 + (_real_time() - _t0) * {CLOCK_FACTOR}\n"),
    "crash": ("    tokenizer = Tokenizer.from_directory()\n",
              '    raise RuntimeError("planted crash")\n    tokenizer = Tokenizer.from_directory()\n'),
}


def plant(lab, *names):
    """Edit the lab's train.py as an agent would, with the cheats `names`."""
    source = (lab.path / "train.py").read_text()
    for name in names:
        anchor, replacement = CHEATS[name]
        assert source.count(anchor) == 1, f"anchor of {name!r} not found once in train.py: {anchor!r}"
        source = source.replace(anchor, replacement)
    (lab.path / "train.py").write_text(source)


class Lab:
    """A temporary copy of the repository on an experiment branch, with its own archive and the cpu cache."""

    def __init__(self, path, env):
        self.path, self.env = path, env

    def analyze(self, *args, timeout=RUN_TIMEOUT_S):
        return subprocess.run([sys.executable, "analyze.py", *args], cwd=self.path, env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def run(self, description=None):
        """`analyze.py run`: (the completed process, the run's results.tsv row, its measurement.json)."""
        before = len(self.rows())
        out = self.analyze("run", *([description] if description else []))
        rows = self.rows()
        assert len(rows) == before + 1, f"no run archived (exit {out.returncode}):\n{out.stdout}\n{out.stderr[-3000:]}"
        measured = json.loads((self.path / ARCHIVE / rows[-1]["run_id"] / "measurement.json").read_text())
        return out, rows[-1], measured

    def rows(self):
        path = self.path / ARCHIVE / "results.tsv"
        lines = path.read_text().splitlines() if path.exists() else []
        return [dict(zip(lines[0].split("\t"), line.split("\t"))) for line in lines[1:]]

    def git(self, *args):
        return subprocess.run(["git", *args], cwd=self.path, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(scope="module")
def lab(cpu_prepared, tmp_path_factory):
    out, cache = cpu_prepared
    assert out.returncode == 0, f"prepare.py failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    path = tmp_path_factory.mktemp("lab")
    for name in ("train.py", "prepare.py", "analyze.py", ".gitignore"):
        shutil.copy(ROOT / name, path / name)
    source = (path / "train.py").read_text()
    for old, new in LAB_SETTINGS:
        assert source.count(old) == 1, f"train.py's line {old!r} moved"
        source = source.replace(old, new)
    (path / "train.py").write_text(source)
    shutil.copytree(ROOT / "harness", path / "harness", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "AUTORESEARCH_PROFILE": "cpu", "AUTORESEARCH_CACHE": str(cache),
           "AUTORESEARCH_TIME_BUDGET": BUDGET_S, "AUTORESEARCH_WORKER": "lab:cpu",
           "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("xdg")),
           "OMP_NUM_THREADS": "1"}  # torch's threads spin-wait on a busy 2-core machine: a step took 7 s, not 0.4 s
    for name in ("AUTORESEARCH_ARCHIVE", "PYTHONDONTWRITEBYTECODE"):  # bytecode cached (outside the lab) saves seconds
        env.pop(name, None)
    for args in (["init", "-q", "-b", "autoresearch/lab"], ["config", "user.email", "t@example.com"],
                 ["config", "user.name", "test"], ["add", "-A"], ["commit", "-qm", "baseline"]):
        subprocess.run(["git", *args], cwd=path, check=True, capture_output=True)
    return Lab(path, env)


@pytest.fixture(scope="module")
def baseline(lab):
    """The branch's first run, honest: kept, the best every later run is checked against."""
    out, row, m = lab.run()
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr[-3000:]}"
    return out, row, m


@pytest.fixture(scope="module")
def cheater(lab, baseline):
    """One run, three cheats: it trains on the validation split, untimed for UNTIMED_S seconds before the loop,
    and prints a scaled val_bpb from fewer eval tokens."""
    plant(lab, "trains on val", "untimed training", "fewer eval tokens", "scaled val_bpb")
    return lab.run("train on val, untimed, and a better-looking number")


@pytest.fixture(scope="module")
def slowed(lab, baseline):
    plant(lab, "slowed clock")
    return lab.run("a slower clock")


def caught(m):
    return {c["case"]: c["detail"] for c in m["caught"]}


def test_an_honest_baseline_is_measured_kept_and_audits_clean(lab, baseline):
    out, row, m = baseline
    lines = out.stdout.splitlines()
    assert lines[0].startswith("decision: keep") and len(lines) <= 15, out.stdout
    assert (m["status"], m["caught"], m["error"], row["status"], row["measured"]) == ("ok", [], None, "keep", "harness"), m
    assert abs(m["reported_val_bpb"] - m["val_bpb"]) < 1e-5 and f"{m['val_bpb']:.6f}" == row["val_bpb"], m
    assert m["first_row_s"] < m["wall_s"] and m["time_budget"] == float(BUDGET_S), m
    assert lab.git("log", "-1", "--format=%s") == "baseline", "a kept baseline leaves the branch where it is"
    audit = lab.analyze("audit")
    assert audit.returncode == 0, audit.stdout


def test_training_on_validation_data_is_caught(baseline, cheater):
    out, row, m = cheater
    assert TRAINED_ON_VAL in caught(m), m["caught"]
    honest = baseline[2]
    gap, honest_gap = m["heldout_bpb"] - m["val_bpb"], honest["heldout_bpb"] - honest["val_bpb"]
    assert gap - honest_gap > 0.1, f"held-out gap {gap:+.4f} vs the honest {honest_gap:+.4f}: a weak plant"
    assert (row["status"], row["decision"]) == ("invalid", "discard"), row
    assert out.stdout.splitlines()[0].startswith("decision: discard") and TRAINED_ON_VAL in out.stdout


def test_untimed_training_before_the_loop_is_caught(baseline, cheater):
    _, row, m = cheater
    assert SLOWED_CLOCK not in caught(m), "training before the loop is outside it, not a slow clock"
    if machine_moved(m, baseline[1]):  # a busy machine: time outside the budget is the machine's, not judged
        assert UNTIMED_WORK not in caught(m) and row["decision"] == "discard", m  # the other cheats still count
        return
    assert UNTIMED_WORK in caught(m), m["caught"]
    assert f"the best code's {baseline[2]['outside_s']:.1f} s" in caught(m)[UNTIMED_WORK], caught(m)[UNTIMED_WORK]


def test_a_val_bpb_that_is_not_the_models_is_caught(cheater):
    _, row, m = cheater
    assert NOT_THE_MODELS in caught(m), m["caught"]
    assert f"{m['reported_val_bpb']:.6f}" in caught(m)[NOT_THE_MODELS] and row["val_bpb"] == f"{m['val_bpb']:.6f}"


def test_a_caught_run_is_discarded_its_train_py_restored_and_named_by_audit(lab, baseline, cheater):
    out, row, m = cheater
    assert lab.git("log", "-1", "--format=%s") == f"Restore train.py from {baseline[1]['commit']}", lab.git("log", "-3")
    assert lab.git("status", "--porcelain") == "" and "_real_time" not in (lab.path / "train.py").read_text()
    assert "train.py: restored from the best" in out.stdout.splitlines()[-1], out.stdout
    audit = lab.analyze("audit")
    named = [line for line in audit.stdout.splitlines() if line.startswith(f"{row['run_id']}: caught: ")]
    assert audit.returncode == 1 and len(named) == len(m["caught"]) >= 3, audit.stdout
    best = lab.analyze("best")
    assert best.stdout.startswith(baseline[1]["run_id"]), best.stdout


def test_a_slowed_clock_is_caught(slowed):
    _, row, m = slowed
    assert SLOWED_CLOCK in caught(m), m
    assert TRAINED_ON_VAL not in caught(m) and NOT_THE_MODELS not in caught(m), m["caught"]
    assert row["status"] == "invalid"


def test_an_untracked_argparse_py_is_refused_before_anything_runs(lab, baseline):
    marker = lab.path / "imported"
    (lab.path / "argparse.py").write_text(f"open({str(marker)!r}, 'w').close()\nfrom importlib import import_module\n")
    rows, log = lab.rows(), (lab.path / "run.log").read_bytes()
    try:
        out = lab.analyze("run", timeout=120)
    finally:
        (lab.path / "argparse.py").unlink()
    assert out.returncode == 2, f"{out.stdout}\n{out.stderr}"
    assert out.stdout == "" and out.stderr.startswith("analyze.py run: refused: argparse.py at the repository root")
    assert out.stderr.count("\n") == 1 and not marker.exists(), out.stderr
    assert lab.rows() == rows and (lab.path / "run.log").read_bytes() == log, "something ran or was recorded"


def test_a_crash_then_a_forged_summary_and_a_bare_analyze_is_still_a_crash(lab, baseline):
    plant(lab, "crash")
    out, row, m = lab.run("a crash")
    assert (m["status"], row["status"], row["decision"]) == ("crash", "crash", "crash"), m
    assert "RuntimeError: planted crash" in (lab.path / ARCHIVE / row["run_id"] / "run.log").read_text()
    assert lab.git("log", "-1", "--format=%s").startswith("Restore train.py from"), "the crash's train.py stayed"
    summary = json.loads((lab.path / "run_summary.json").read_text())
    now = time.time()
    forged = {**summary, "status": "ok", "val_bpb": 0.5, "error": None,
              "timings": {**summary["timings"], "started_at": now - 60, "finished_at": now}}
    (lab.path / "run_summary.json").write_text(json.dumps(forged))
    bare = lab.analyze()
    assert bare.returncode == 0, bare.stderr[-2000:]
    forged_row = lab.rows()[-1]
    assert (forged_row["status"], forged_row["val_bpb"], forged_row["caught"], forged_row["measured"]) == \
        ("crash", "0.000000", FORGED_OK, ""), forged_row


def test_ctrl_c_stops_the_run_archives_it_interrupted_and_exits_130(lab, baseline):
    rows = lab.rows()
    (lab.path / "metrics.jsonl").unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "analyze.py", "run"], cwd=lab.path, env=lab.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + RUN_TIMEOUT_S
    while not (lab.path / "metrics.jsonl").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)  # train.py's recorder has started: it has a run to record
    proc.send_signal(signal.SIGINT)  # what Ctrl-C at a terminal sends to the foreground process
    out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 130, f"exit {proc.returncode}\n{out}\n{err[-3000:]}"
    row = lab.rows()[-1]
    assert len(lab.rows()) == len(rows) + 1, out
    m = json.loads((lab.path / ARCHIVE / row["run_id"] / "measurement.json").read_text())
    assert (m["status"], row["status"], row["outcome"], row["decision"], row["val_bpb"]) == \
        ("interrupted", "pending", "interrupted", "rerun", "0.000000"), (m, row)
    assert out.splitlines()[0].startswith("decision: rerun"), out
    summary = json.loads((lab.path / ARCHIVE / row["run_id"] / "run_summary.json").read_text())
    assert summary["status"] == "interrupted", summary["status"]

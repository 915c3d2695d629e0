"""Every way of buying a number outside the rules that the harness catches, planted in train.py or beside it
and run for real: cpu-profile runs of `analyze.py run` in a temporary copy of this repository with a smaller
model and a 3-second budget, one archive for the module. An honest baseline (kept); one run that tries to
train on the validation split (the sandbox hides it: tests/test_contained.py catches it where there is none),
trains untimed before the loop, prints a val_bpb that is not its model's, slows its clock and reads the next
token from T/2 on (four cases, each named by its own check, with its own numbers); one that patches the loss
and reassigns the metric's rows at import (refused by the evaluator, which names both); an untracked
argparse.py (refused before anything runs); a crash (its exception printed), then a forged run_summary.json
and a bare `analyze.py` (still a crash); and Ctrl-C (archived as interrupted, exit 130). The limits of the
caught cases are tested as pure functions in tests/test_decide.py; here the whole path is, with margins that a
loaded machine keeps."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from harness.decide import (FUTURE_TOLERANCE, NOT_THE_MODELS, SEES_AHEAD, SLOWED_CLOCK, TRAINED_ON_VAL,  # noqa: E402
                            UNTIMED_WORK)
from harness.loop import sandbox_problem  # noqa: E402
from harness.record import load_run  # noqa: E402

BUDGET_S = "3"               # AUTORESEARCH_TIME_BUDGET of every run here
UNTIMED_S = 12               # seconds the cheat trains before the loop, far beyond the best's outside time + 5 s
CLOCK_FACTOR = 0.5           # the slowed clock runs at half the real one
VAL_HIDDEN = "CHEAT: the validation rows cannot be read"  # what the val-reading cheat prints when they are hidden
RUN_TIMEOUT_S = 600          # one `analyze.py run`, on a loaded 2-core machine
LAB_SETTINGS = (             # the lab's baseline: a smaller model and fewer curve points, for shorter runs
    ("\nDEPTH = 8 if gpu_profile else 4 ", "\nDEPTH = 8 if gpu_profile else 2 "),
    ("\nVAL_POINTS = 10 if gpu_profile else 5 ", "\nVAL_POINTS = 10 if gpu_profile else 2 "),
)
CHEATS = {  # name -> (anchor in train.py, what replaces it)
    "trains on val": ('    train_loader = make_dataloader(tokenizer, device_batch_size, MAX_SEQ_LEN, "train", '
                      'device=device.type)\n',
                      '    train_loader = make_dataloader(tokenizer, device_batch_size, MAX_SEQ_LEN, "train", '
                      'device=device.type)\n'
                      '    try:  # the validation rows instead, where train.py can read them\n'
                      '        val_loader = make_dataloader(tokenizer, device_batch_size, MAX_SEQ_LEN, "val", '
                      'device=device.type)\n'
                      '        next(val_loader)\n'
                      '        train_loader = val_loader\n'
                      '    except Exception as e:\n'
                      f'        print(f"{VAL_HIDDEN}: {{type(e).__name__}}", flush=True)\n'),
    "untimed training": ("    x, y, epoch = next(train_loader)  # prefetch first batch\n",
                         "    x, y, epoch = next(train_loader)  # prefetch first batch\n"
                         "    t_cheat = time.perf_counter()\n"
                         f"    while time.perf_counter() - t_cheat < {UNTIMED_S}:  # training no clock sees\n"
                         "        with autocast_ctx:\n"
                         "            loss = model(x, y)\n"
                         "        loss.backward()\n"
                         "        optimizer.step()\n"
                         "        model.zero_grad(set_to_none=True)\n"
                         "        x, y, epoch = next(train_loader)\n"),
    "printed val_bpb": ("    run.finish(val_bpb=val_bpb,",
                        "    val_bpb = 0.97 * evaluate_bpb_sample(model, tokenizer, device_batch_size, 2**13)\n"
                        "    run.finish(val_bpb=val_bpb,"),
    "slowed clock": ("import time\n", "import time\n_real_time = time.time\n_t0 = _real_time()\n"
                                      f"time.time = lambda: _t0 + (_real_time() - _t0) * {CLOCK_FACTOR}\n"),
    "patched loss": ("import torch.nn.functional as F\n",
                     "import torch.nn.functional as F\n"
                     "_cross_entropy = F.cross_entropy  # every loss 3% lower, in whatever process imports train.py\n"
                     "F.cross_entropy = lambda *a, **k: 0.97 * _cross_entropy(*a, **k)\n"),
    "fewer eval rows": ("from harness.recorder import", "import prepare\nprepare.EVAL_TOKENS = 4 * MAX_SEQ_LEN\n"
                                                     "prepare.HELDOUT_TOKENS = 4 * MAX_SEQ_LEN\nfrom harness.recorder import"),
    "sees ahead": ("        logits = softcap * torch.tanh(logits / softcap)\n",
                   "        logits = softcap * torch.tanh(logits / softcap)\n"
                   "        ahead = torch.arange(T, device=idx.device)[None, :, None] >= T // 2  # the next token, from T/2 on\n"
                   "        logits = logits + ahead * torch.zeros_like(logits).scatter(-1, idx.roll(-1, 1)[..., None], 10.0)\n"),
    "crash": ("    tokenizer = Tokenizer.from_directory()\n",
              "    tokenizer = Tokenizer.from_directory()\n    1 / 0\n"),
}


class Lab:
    """A temporary copy of the repository on an experiment branch, with its own archive and the cpu cache."""

    def __init__(self, path, env):
        self.path, self.env, self.archive = path, env, path / ".auto-log-research"

    def analyze(self, *args, timeout=RUN_TIMEOUT_S):
        return subprocess.run([sys.executable, "analyze.py", *args], cwd=self.path, env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def run(self, description=None):
        """`analyze.py run`: (the completed process, the new Run)."""
        before = len(self.runs())
        out = self.analyze("run", *([description] if description else []))
        runs = self.runs()
        assert len(runs) == before + 1, f"no run archived (exit {out.returncode}):\n{out.stdout}\n{out.stderr[-3000:]}"
        return out, runs[-1]

    def runs(self):
        found = [load_run(p) for p in self.archive.glob("*/run.json")]
        return sorted(found, key=lambda r: r.archived_at)

    def plant(self, *names):
        """Edit train.py as an agent would, with the cheats `names`."""
        source = (self.path / "train.py").read_text()
        for name in names:
            anchor, replacement = CHEATS[name]
            assert source.count(anchor) == 1, f"anchor of {name!r} not found once in train.py: {anchor!r}"
            source = source.replace(anchor, replacement)
        (self.path / "train.py").write_text(source)

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
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")},
           "AUTORESEARCH_PROFILE": "cpu", "AUTORESEARCH_CACHE": str(cache), "AUTORESEARCH_TIME_BUDGET": BUDGET_S,
           "AUTORESEARCH_WORKER": "lab:cpu", "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("xdg")),
           "OMP_NUM_THREADS": "1"}  # torch's threads spin-wait on a busy 2-core machine
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # bytecode cached (outside the lab) saves seconds
    for args in (["init", "-q", "-b", "autoresearch/lab"], ["config", "user.email", "t@example.com"],
                 ["config", "user.name", "test"], ["add", "-A"], ["commit", "-qm", "baseline"]):
        subprocess.run(["git", *args], cwd=path, check=True, capture_output=True)
    return Lab(path, env)


@pytest.fixture(scope="module")
def baseline(lab):
    """The branch's first run, honest: kept, the best every later run is checked against."""
    out, run = lab.run()
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr[-3000:]}"
    return out, run


@pytest.fixture(scope="module")
def cheater(lab, baseline):
    """One run, five cheats: it tries to train on the validation split, trains untimed for UNTIMED_S seconds
    before the loop, prints a val_bpb that no evaluation of its model gave, runs time.time() at CLOCK_FACTOR, and
    reads the next token from position T/2 on."""
    lab.plant("trains on val", "untimed training", "printed val_bpb", "slowed clock", "sees ahead")
    return lab.run("train on val, untimed, a slower clock, a better-looking number and a model that peeks")


@pytest.fixture(scope="module")
def patcher(lab, cheater):
    """One run that changes the metric's ground at import: F.cross_entropy scaled by 0.97, prepare.EVAL_TOKENS and
    HELDOUT_TOKENS reassigned to 4 rows. (After the cheater, whose train.py was restored.)"""
    lab.plant("patched loss", "fewer eval rows")
    return lab.run("a cheaper loss and fewer rows")


def cases(run):
    return {c.case: c.detail for c in run.caught}


def test_an_honest_baseline_is_measured_once_kept_and_audits_clean(lab, baseline):
    out, run = baseline
    lines = out.stdout.splitlines()
    assert lines[0].startswith("decision: keep") and len(lines) <= 15, out.stdout
    assert (run.status, run.caught, run.measured.error, run.trained.reported_val_bpb) == ("keep", [], None, None), run
    block = (lab.archive / run.id / "run.log").read_text().rsplit("---\n", 1)[1]
    assert block.count("val_bpb:") == 1 and block.endswith(f"val_bpb:          {run.val_bpb:.6f}\n"
                                                           "measured_by:      harness\n"), block
    assert 0 < run.measured.first_row_s < run.measured.wall_s and run.outside_s > 0, run.measured
    assert lab.git("log", "-1", "--format=%s") == "baseline", "a kept baseline leaves the branch where it is"
    audit = lab.analyze("audit")
    assert audit.returncode == 0, audit.stdout


def test_the_sandbox_hides_the_validation_rows_from_a_train_py_that_would_train_on_them(lab, cheater):
    out, run = cheater
    if sandbox_problem():
        pytest.skip(f"no sandbox on this machine ({sandbox_problem()}): tests/test_contained.py catches the run")
    log = (lab.archive / run.id / "run.log").read_text()
    assert VAL_HIDDEN in log and run.contained is True, log[-3000:]
    assert TRAINED_ON_VAL not in cases(run), run.caught
    assert (run.status, run.decision.kind) == ("invalid", "discard"), run
    assert out.stdout.splitlines()[0].startswith("decision: discard"), out.stdout


def test_untimed_training_before_the_loop_is_caught(baseline, cheater):
    _, run = cheater
    assert UNTIMED_WORK in cases(run), run.caught
    assert run.outside_s > baseline[1].outside_s + UNTIMED_S / 2, (run.outside_s, baseline[1].outside_s)


def test_a_printed_val_bpb_that_is_not_the_models_is_caught(cheater):
    _, run = cheater
    assert NOT_THE_MODELS in cases(run), run.caught
    assert f"{run.trained.reported_val_bpb:.6f}" in cases(run)[NOT_THE_MODELS]


def test_a_caught_run_is_discarded_and_its_train_py_restored(lab, baseline, cheater):
    out, run = cheater
    assert lab.git("log", "-1", "--format=%s") == f"Restore train.py from {baseline[1].commit[:7]}", lab.git("log", "-3")
    assert lab.git("status", "--porcelain") == "" and "t_cheat" not in (lab.path / "train.py").read_text()
    best = lab.analyze("best")
    assert baseline[1].id in best.stdout.splitlines()[0], best.stdout


def test_a_slowed_clock_is_caught(cheater):
    _, run = cheater
    assert SLOWED_CLOCK in cases(run) and "on the harness's clock" in cases(run)[SLOWED_CLOCK], run.caught


def test_a_loss_patched_and_eval_rows_reassigned_at_import_refuse_the_measurement(patcher):
    out, run = patcher
    assert run.val_bpb is None and run.status == "crash", run
    assert run.measured.error == ("the evaluator failed: train.py changes torch.nn.functional.cross_entropy, "
                                  "prepare.EVAL_TOKENS, prepare.HELDOUT_TOKENS at import: the harness measures with "
                                  "the library as installed"), run.measured.error


def test_a_model_that_sees_the_next_token_in_the_second_half_is_caught(cheater):
    _, run = cheater
    assert SEES_AHEAD in cases(run), (run.measured.future_leak, run.caught)
    assert run.measured.future_leak > 5 * FUTURE_TOLERANCE, run.measured.future_leak


def test_an_untracked_argparse_py_is_refused_before_anything_runs(lab, baseline):
    marker = lab.path / "imported"
    (lab.path / "argparse.py").write_text(f"open({str(marker)!r}, 'w').close()\nfrom importlib import import_module\n")
    runs, log = lab.runs(), (lab.path / "run.log").read_bytes()
    try:
        out = lab.analyze("run", timeout=120)
    finally:
        (lab.path / "argparse.py").unlink()
    assert out.returncode == 2, f"{out.stdout}\n{out.stderr}"
    assert out.stdout == "" and out.stderr.startswith("analyze.py run: refused: argparse.py at the repository root")
    assert out.stderr.count("\n") == 1 and not marker.exists(), out.stderr
    assert len(lab.runs()) == len(runs) and (lab.path / "run.log").read_bytes() == log, "something ran or was recorded"


def test_a_crash_prints_its_exception_and_a_forged_summary_then_a_bare_analyze_is_still_a_crash(lab, baseline):
    lab.plant("crash")
    out, run = lab.run("a crash")
    assert (run.status, run.decision.kind, run.val_bpb) == ("crash", "crash", None), run
    lines = out.stdout.splitlines()
    assert len(lines) <= 15 and any("ZeroDivisionError: division by zero" in line for line in lines), out.stdout
    assert lab.git("log", "-1", "--format=%s").startswith("Restore train.py from"), "the crash's train.py stayed"
    summary = json.loads((lab.path / "run_summary.json").read_text())
    now = time.time()
    forged = {**summary, "status": "ok", "val_bpb": 0.5, "error": None,
              "timings": {**summary["timings"], "started_at": now - 60, "finished_at": now}}
    (lab.path / "run_summary.json").write_text(json.dumps(forged))
    bare = lab.analyze()
    assert bare.returncode == 0 and not bare.stdout.startswith("decision"), bare.stdout + bare.stderr[-2000:]
    run = lab.runs()[-1]
    assert (run.status, run.val_bpb, run.measured, run.decision) == ("crash", None, None, None), run
    assert "does not back it" in run.trained.error, run.trained.error


def test_ctrl_c_stops_the_run_archives_it_interrupted_and_exits_130(lab, baseline):
    runs = lab.runs()
    (lab.path / "metrics.jsonl").unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "analyze.py", "run"], cwd=lab.path, env=lab.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + RUN_TIMEOUT_S
    while not (lab.path / "metrics.jsonl").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)  # train.py's recorder has started: it has a run to record
    proc.send_signal(signal.SIGINT)  # what Ctrl-C at a terminal sends to the foreground process
    out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 130, f"exit {proc.returncode}\n{out}\n{err[-3000:]}"
    assert len(lab.runs()) == len(runs) + 1, out
    run = lab.runs()[-1]
    assert (run.measured.stopped, run.trained.outcome, run.status, run.decision.kind, run.val_bpb) == \
        ("interrupted", "interrupted", "pending", "rerun", None), run
    assert out.splitlines()[0].startswith("decision: rerun"), out

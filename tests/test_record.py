"""harness/record.py and its helpers: the run recorder writes its outputs on every exit path (ok, crash,
diverged, timeout, interrupted), as a `with` block or for a whole script through start(); config is collected from
train.py's globals; the progress line suits both a terminal and a log file."""
import contextlib
import hashlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import prepare  # noqa: E402
from harness import record  # noqa: E402
from harness.progress import ProgressLine  # noqa: E402


def summary(out_dir):
    return json.loads((out_dir / "run_summary.json").read_text())


def metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_ok_run_prints_the_block_and_writes_every_summary_key(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(prepare, "_METRIC_RESULTS", {1.2345678: 1.2})  # as if evaluate_bpb had returned it
    with record.RunRecorder({"DEPTH": 4}, out_dir=tmp_path, hard_cap_s=60) as run:
        run.set(num_params_M=1.234, depth=4)
        for step in range(3):
            run.log(step, **{"train/loss": 5.0 - step})
        run.timing("startup_s", 1.5)
        run.finish(val_bpb=1.2345678, training_seconds=60.04, total_seconds=70.0, peak_vram_mb=None,
                   mfu_percent=None, total_tokens_M=1.25, num_steps=3)
    assert run.exit_code == 0
    s = summary(tmp_path)
    assert s["status"] == "ok" and s["error"] is None and s["config"] == {"DEPTH": 4}
    assert {k: s[k] for k in ("val_bpb", "num_steps", "depth", "peak_vram_mb")} == \
        {"val_bpb": 1.2345678, "num_steps": 3, "depth": 4, "peak_vram_mb": None}
    assert {k: v for k, v in s["harness"].items() if k != "tokenizer"} == prepare.HARNESS
    assert set(s["git"]) == {"commit", "dirty", "train_py_sha256", "prepare_py_sha256", "analyze_py_sha256",
                             "harness_sha256"}
    pinned = s["git"]["harness_sha256"]  # every pinned file as it ran: the audit compares them with the pin
    assert pinned["harness/record.py"] == hashlib.sha256((ROOT / "harness" / "record.py").read_bytes()).hexdigest()
    assert "prepare.py" in pinned and "train.py" not in pinned and not [p for p in pinned if p.startswith("tests/")]
    assert set(s["env"]) == {"python", "torch", "cuda", "gpu_name", "driver"}
    assert s["timings"]["startup_s"] == 1.5 and s["timings"]["finished_at"] >= s["timings"]["started_at"]
    assert [r["step"] for r in metrics(tmp_path)] == [0, 1, 2]
    block = capsys.readouterr().out.split("---\n")[-1].splitlines()
    assert block == ["val_bpb:          1.234568", "training_seconds: 60.0", "total_seconds:    70.0",
                     "peak_vram_mb:     n/a", "mfu_percent:      n/a", "total_tokens_M:   1.2",
                     "num_steps:        3", "num_params_M:     1.2", "depth:            4"], block
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "temp files left behind"


def test_summary_harness_names_the_tokenizer_so_other_data_is_another_harness(tmp_path, monkeypatch):
    # the cpu profile's text is this Python's standard library: a new Python, new data, new tokenizer
    harnesses = []
    for blob in (b"tokenizer trained on python 3.11.7", b"tokenizer trained on python 3.11.9"):
        tok_dir = tmp_path / f"tok{len(harnesses)}"
        tok_dir.mkdir()
        (tok_dir / "tokenizer.pkl").write_bytes(blob)
        monkeypatch.setattr(prepare, "TOKENIZER_DIR", tok_dir)
        with record.RunRecorder({}, out_dir=tmp_path) as run, contextlib.redirect_stdout(io.StringIO()):
            run.finish()
        harnesses.append(summary(tmp_path)["harness"])
    assert harnesses[0]["tokenizer"] == hashlib.sha256(b"tokenizer trained on python 3.11.7").hexdigest()[:16]
    assert harnesses[0] != harnesses[1], harnesses


def test_crash_keeps_the_traceback_and_known_values(tmp_path, capsys):
    with record.RunRecorder({}, out_dir=tmp_path, hard_cap_s=60) as run:
        run.set(num_params_M=2.5)
        for step in range(3):
            run.log(step, **{"train/loss": 9.0 - step, "elapsed_s": 1.5 * step})
        raise RuntimeError("boom in the model")
    assert run.exit_code == 1
    s = summary(tmp_path)
    assert s["status"] == "crash" and s["num_params_M"] == 2.5 and s["val_bpb"] is None
    # how far it got, from the last logged row
    assert (s["num_steps"], s["training_seconds"]) == (3, 3.0), (s["num_steps"], s["training_seconds"])
    assert "Traceback" in s["error"] and "RuntimeError: boom in the model" in s["error"], s["error"]
    assert "boom in the model" in capsys.readouterr().err
    assert metrics(tmp_path)[0]["train/loss"] == 9.0


def test_a_stopped_run_is_a_crash_with_its_one_line_and_no_traceback(tmp_path, capsys):
    with record.RunRecorder({}, out_dir=tmp_path, hard_cap_s=60) as run:
        raise record.RunStopped("Tesla V100 has no bf16: use a newer GPU or AUTORESEARCH_PROFILE=cpu")
    s = summary(tmp_path)
    assert (run.exit_code, s["status"]) == (1, "crash")
    assert s["error"] == "Tesla V100 has no bf16: use a newer GPU or AUTORESEARCH_PROFILE=cpu"
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip() == "train.py stopped: " + s["error"], err


def test_diverged_loss_ends_the_run_with_status_diverged(tmp_path):
    with record.RunRecorder({}, out_dir=tmp_path, hard_cap_s=60) as run:
        run.check_divergence(1, 99.0)
        run.check_divergence(2, float("nan"))
    assert (run.exit_code, summary(tmp_path)["status"]) == (2, "diverged")
    for bad in (float("inf"), 100.5):
        with pytest.raises(record.Diverged):
            run.check_divergence(3, bad)


def test_a_run_that_never_calls_finish_is_a_crash(tmp_path):
    with record.RunRecorder({}, out_dir=tmp_path, hard_cap_s=60) as run:
        pass
    s = summary(tmp_path)
    assert (run.exit_code, s["status"]) == (1, "crash") and "finish" in s["error"]


def test_previous_outputs_are_removed_at_start(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 99}\n')
    (tmp_path / "run_summary.json").write_text('{"status": "ok", "val_bpb": 0.5}')
    with record.RunRecorder({}, out_dir=tmp_path, hard_cap_s=60) as run:
        assert not (tmp_path / "run_summary.json").exists(), "a stale summary survived the start"
        assert (tmp_path / "metrics.jsonl").read_text() == "", "stale metrics survived the start"
        raise ValueError("a bug")
    assert summary(tmp_path)["status"] == "crash" and run.exit_code == 1


def test_ctrl_c_ends_the_run_interrupted_not_crashed(tmp_path, capsys):
    with record.RunRecorder({}, out_dir=tmp_path, hard_cap_s=60) as run:
        run.log(0, **{"train/loss": 5.0})
        raise KeyboardInterrupt
    s = summary(tmp_path)
    assert (run.exit_code, s["status"], s["val_bpb"]) == (130, "interrupted", None), s
    assert "KeyboardInterrupt" in s["error"] and s["num_steps"] == 1
    assert "interrupted (Ctrl-C or SIGINT)" in capsys.readouterr().err


def test_metrics_are_flushed_on_schedule_and_at_exit(tmp_path):
    with record.RunRecorder({}, out_dir=tmp_path, hard_cap_s=60, flush_every_s=0) as run:
        run.log(0, a=1.0)
        assert [r["a"] for r in metrics(tmp_path)] == [1.0], "row not flushed with flush_every_s=0"
        run.flush_every_s = 1e9
        run.log(1, a=torch.tensor(2.0), b=None, c=float("nan"))
        assert len(metrics(tmp_path)) == 1, "row written before its flush was due"
        run.log(0, a=3.0)  # a step going backwards is dropped, never written out of order
        run.finish()
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1] and rows[1]["a"] == 2.0 and rows[1]["b"] is None
    assert math.isnan(rows[1]["c"])


def test_metrics_io_error_warns_once_and_never_raises(tmp_path, capsys):
    class FullDisk:
        closed = False

        def write(self, text):
            raise OSError(28, "No space left on device")

        def flush(self):
            pass

        def close(self):
            pass

    with record.RunRecorder({}, out_dir=tmp_path, hard_cap_s=60, flush_every_s=0) as run:
        run._file.close()
        run._file = FullDisk()
        for step in range(5):
            run.log(step, loss=1.0)
        run.finish()
    assert run.exit_code == 0
    assert capsys.readouterr().err.count("No space left") == 1


def test_summary_is_written_atomically_through_a_temp_file(tmp_path, monkeypatch):
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(record.os, "replace", lambda a, b: (replaced.append((Path(a), Path(b))), real_replace(a, b)))
    with record.RunRecorder({}, out_dir=tmp_path, hard_cap_s=60) as run:
        run.finish()
    (src, dst), = replaced
    assert dst == tmp_path / "run_summary.json" and src.parent == tmp_path and src != dst
    assert not src.exists() and summary(tmp_path)["status"] == "ok"


TIMEOUT_SCRIPT = """
    import sys, time
    from harness.fit import DeviceBatch
    from harness.record import RunRecorder
    with RunRecorder({{}}, hard_cap_s={cap}, flush_every_s=1e9) as run:
        run.log(0, loss=3.0)
        if {fit_seconds}:
            run.record_fit(DeviceBatch(128, 32, 4, "probe", {fit_seconds}, [128, 64]))
        print("ready", flush=True)
        time.sleep(60)
    sys.exit(run.exit_code)
"""


def start_sleeper(tmp_path, cap, fit_seconds=0):
    script = tmp_path / "sleeper.py"  # a file, so the timeout's stack shows source lines
    script.write_text(textwrap.dedent(TIMEOUT_SCRIPT.format(cap=cap, fit_seconds=fit_seconds)))
    return subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_hard_cap_writes_a_timeout_summary_and_exits_3(tmp_path):
    proc = start_sleeper(tmp_path, cap=1.0)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, f"exit {proc.returncode}: {err}"
    s = summary(tmp_path)
    assert s["status"] == "timeout" and "hard cap" in s["error"] and "time.sleep(60)" in s["error"], s["error"]
    assert metrics(tmp_path) and metrics(tmp_path)[0]["loss"] == 3.0, "buffered metrics lost on timeout"


def test_seconds_spent_fitting_the_device_batch_extend_the_hard_cap(tmp_path):
    # trying batch sizes happens before the budget: on a small GPU it must not push a healthy run past the cap
    t0 = time.time()
    proc = start_sleeper(tmp_path, cap=1.0, fit_seconds=2.0)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, f"exit {proc.returncode}: {err}"
    assert time.time() - t0 >= 3.0, f"stopped after {time.time() - t0:.1f}s, before the 1 s cap plus 2 s of fitting"
    assert "hard cap of 3s" in summary(tmp_path)["error"]


def test_sigterm_writes_a_timeout_summary_and_exits_3(tmp_path):
    proc = start_sleeper(tmp_path, cap=300)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 3, f"exit {proc.returncode}: {err}"
    s = summary(tmp_path)
    assert s["status"] == "timeout" and "SIGTERM" in s["error"]
    assert metrics(tmp_path)[0]["loss"] == 3.0


def test_sigint_writes_an_interrupted_summary_and_exits_130(tmp_path):
    proc = start_sleeper(tmp_path, cap=300)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)  # Ctrl-C, or `analyze.py run` stopping its child
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, f"exit {proc.returncode}: {err}"
    s = summary(tmp_path)
    assert s["status"] == "interrupted" and "KeyboardInterrupt" in s["error"] and s["val_bpb"] is None, s
    assert metrics(tmp_path)[0]["loss"] == 3.0, "buffered metrics lost on Ctrl-C"

# ---------------------------------------------------------------------------
# Small helpers train.py uses
# ---------------------------------------------------------------------------

def test_collect_config_takes_json_uppercase_globals_but_not_harness_constants():
    namespace = {"DEPTH": 8, "WINDOW_PATTERN": ("S", "L"), "LR": 0.04, "MAX_SEQ_LEN": prepare.MAX_SEQ_LEN,
                 "TIME_BUDGET": prepare.TIME_BUDGET, "DEVICE": torch.device("cpu"), "Model": object,
                 "lowercase": 1, "_PRIVATE": 2, "NESTED": {"a": (1, 2)}}
    assert record.collect_config(namespace) == {"DEPTH": 8, "WINDOW_PATTERN": ["S", "L"], "LR": 0.04,
                                                 "NESTED": {"a": [1, 2]}}


def test_progress_line_writes_no_carriage_returns_when_not_a_tty():
    stream = io.StringIO()
    line = ProgressLine(every_s=3600, stream=stream)
    for i in range(100):
        line.update(f"step {i}")
    line.done("finished")
    assert "\r" not in stream.getvalue()
    assert stream.getvalue().splitlines() == ["step 0", "finished"], stream.getvalue()


def test_progress_line_rewrites_one_line_on_a_tty():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    line = ProgressLine(every_s=3600, stream=stream)
    line.update("step 10")
    line.update("step 9")
    line.done("done")
    assert stream.getvalue() == "\rstep 10\rstep 9 \rdone  \n", repr(stream.getvalue())



SCRIPT_ENDINGS = {
    "raises": ("raise RuntimeError('boom')", 1, "crash", "RuntimeError: boom"),
    "diverges": ("run.check_divergence(3, float('nan'))", 2, "diverged", "training loss nan at step 3"),
    "never_finishes": ("pass", 1, "crash", "without calling run.finish()"),
    "finishes": ("run.finish()", 0, "ok", None),
    "interrupted": ("raise KeyboardInterrupt", 130, "interrupted", "KeyboardInterrupt"),
}


@pytest.mark.parametrize("ending", sorted(SCRIPT_ENDINGS))
def test_a_started_script_records_how_it_ended_and_exits_with_its_code(tmp_path, ending):
    line, code, status, error = SCRIPT_ENDINGS[ending]
    script = tmp_path / "script.py"  # train.py's shape: start() at the top, no with block
    script.write_text(f"from harness.record import RunRecorder\nrun = RunRecorder({{}}).start()\n"
                      f"run.log(0, loss=3.0)\n{line}\n")
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=120)
    s = summary(tmp_path)
    assert out.returncode == code, f"exit {out.returncode}, expected {code}: {out.stderr[-500:]}"
    assert s["status"] == status and (error is None) == (s["error"] is None), s
    assert error is None or error in s["error"], s["error"]
    assert metrics(tmp_path) == [dict(metrics(tmp_path)[0], loss=3.0)], "the buffered row was lost"

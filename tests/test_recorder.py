"""harness/recorder.py: a run's outputs on every exit path, AR's block (no val_bpb under the harness), and the device
batch that fits, found on the CPU by train.py's real trial step with a memory limit injected."""
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import prepare
import train  # imports prepare; trains nothing
from harness import recorder
from harness.recorder import LayerHealth, RunRecorder, RunStopped

ROOT = Path(__file__).resolve().parent.parent
OOM = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def summary(out_dir):
    return json.loads((out_dir / "run_summary.json").read_text())


def metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.quick
@pytest.mark.parametrize("handoff", ["", "/tmp/handoff.pt"], ids=["manual", "under_the_harness"])
def test_a_finished_run_prints_the_block_and_writes_every_summary_key(tmp_path, capsys, monkeypatch, handoff):
    monkeypatch.setenv("AUTORESEARCH_HANDOFF", handoff)
    cap = 0 if handoff else prepare.hard_cap_s(prepare.TIME_BUDGET)
    assert RunRecorder({}).hard_cap_s == cap, "the watchdog keeps prepare's hard cap; under the harness, the parent"
    (tmp_path / "run_summary.json").write_text('{"status": "ok", "val_bpb": 0.5}')  # a previous run's leftovers
    cyclic = [1]
    cyclic.append(cyclic)  # globals JSON cannot write (this, {(0, 1): 2}) are left out: they would cost the summary
    config = recorder.collect_config({"DEPTH": 4, "CYCLIC": cyclic, "W": {(0, 1): 2}, "lower": 1,
                                      "MAX_SEQ_LEN": prepare.MAX_SEQ_LEN})  # nor prepare's constant, nor lower case
    with RunRecorder(config, out_dir=tmp_path, hard_cap_s=60) as run:
        assert not (tmp_path / "run_summary.json").exists(), "a stale summary survived the start"
        run.timing("startup_s", 1.5)
        with pytest.raises(KeyError, match="val_bpp"):  # a typo in a final key is refused, not kept
            run.set(val_bpp=1.0)
        run.finish(val_bpb=None if handoff else 1.2345678, training_seconds=60.04, total_seconds=70.0,
                   peak_vram_mb=None, mfu_percent=None, total_tokens_M=1.25, num_steps=3, num_params_M=1.234, depth=4)
    s = summary(tmp_path)
    assert (run.exit_code, s["status"], s["error"], s["config"]) == (0, "ok", None, {"DEPTH": 4})
    assert {k: v for k, v in s["harness"].items() if k != "tokenizer"} == prepare.HARNESS
    assert {"commit", "dirty", "train_py_sha256", "prepare_py_sha256", "analyze_py_sha256"} <= set(s["git"])
    assert "harness/recorder.py" in s["git"]["harness_sha256"], "loop.py cannot tell a harness edited mid-run"
    assert "gpu_name" in s["env"] and s["timings"]["startup_s"] == 1.5, "the machine a run's speed belongs to"
    block = capsys.readouterr().out.split("---\n")[-1].splitlines()
    # the harness appends its own measured val_bpb: train.py's block must not carry one
    assert block == ([] if handoff else ["val_bpb:          1.234568"]) + [
        "training_seconds: 60.0", "total_seconds:    70.0", "peak_vram_mb:     n/a", "mfu_percent:      n/a",
        "total_tokens_M:   1.2", "num_steps:        3", "num_params_M:     1.2", "depth:            4"], block
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "temp files left behind"


@pytest.mark.quick
@pytest.mark.parametrize("raised", [OOM, RunStopped("Tesla V100 has no bf16: use AUTORESEARCH_PROFILE=cpu")])
def test_a_crash_keeps_how_far_the_run_got_and_says_what_to_do(tmp_path, capsys, raised):
    with RunRecorder({"DEVICE_BATCH_SIZE": 128}, out_dir=tmp_path, hard_cap_s=60) as run:
        run.set(num_params_M=2.5)
        run.record_fit(recorder.DeviceBatch(128, 32, 8, [128, 64], 2.0))
        for step in range(3):
            run.log(step, **{"train/loss": 9.0 - step, "elapsed_s": 1.5 * step})
        raise raised
    s, err = summary(tmp_path), capsys.readouterr().err.strip()
    assert (run.exit_code, s["status"], s["num_params_M"], s["val_bpb"]) == (1, "crash", 2.5, None)
    assert (s["num_steps"], s["training_seconds"]) == (3, 3.0), "how far it got: from the last logged row"
    assert s["device_batch"]["used"] == 32 and s["timings"]["fit_s"] == 2.0 and metrics(tmp_path)[0]["train/loss"] == 9
    first = s["error"].split("\n")[0]
    if isinstance(raised, RunStopped):  # what to do, and nothing else
        assert s["error"] == str(raised) and err == "train.py stopped: " + s["error"]
    else:  # what to do first, naming the device batch, then the traceback's tail
        assert "device batch of 32 rows: set DEVICE_BATCH_SIZE below 32" in first, first
        assert "Tried to allocate 2.00 GiB" in s["error"] and err.splitlines()[-1] == "train.py: " + first


def test_metrics_are_flushed_on_schedule_in_step_order_and_never_raise(tmp_path, capsys):
    with RunRecorder({}, out_dir=tmp_path, hard_cap_s=60, flush_every_s=0) as run:
        run.log(0, a=1.0)
        assert [r["a"] for r in metrics(tmp_path)] == [1.0], "row not flushed with flush_every_s=0"
        run.flush_every_s = 1e9
        run.log(1, a=torch.tensor(2.0), b=None, c=float("nan"))
        assert len(metrics(tmp_path)) == 1, "row written before its flush was due"
        run.log(0, a=3.0)  # a step going backwards is dropped, never written out of order
        run.finish()
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1] and rows[1]["a"] == 2.0, rows
    assert rows[1]["b"] is None and math.isnan(rows[1]["c"]), rows
    with RunRecorder({}, out_dir=tmp_path, hard_cap_s=60, flush_every_s=0) as run:
        run._file.close()
        run._file = open(os.devnull, "r")  # every write fails, as on a full disk
        for step in range(5):
            run.log(step, loss=1.0)
        run.finish()
    assert run.exit_code == 0 and capsys.readouterr().err.count("metrics.jsonl") == 1, "one warning, no exception"


# A whole script started as train.py starts it: the endings that need a process of their own
@pytest.mark.parametrize("last_line, signum, code, status, error", [
    ("raise RuntimeError('boom')", None, 1, "crash", "RuntimeError: boom"),  # through sys.excepthook
    ("pass", None, 1, "crash", "without calling run.finish()"),              # through atexit
    ("time.sleep(60)", None, 3, "timeout", "hard cap of 1s"),                # the watchdog, and where it hung
    # a background job or nohup starts its children with SIGINT ignored: Ctrl-C must still stop the run
    ("time.sleep(60)", signal.SIGTERM, 3, "timeout", "SIGTERM received"),
    ("time.sleep(60)", signal.SIGINT, 130, "interrupted", "KeyboardInterrupt"),
], ids=["raises", "never_finishes", "hard_cap", "sigterm", "sigint"])
def test_a_started_script_records_how_it_ended_in_its_exit_code(tmp_path, last_line, signum, code, status, error):
    (tmp_path / "script.py").write_text(f"import time\nfrom harness.recorder import RunRecorder\n"
                                        f"run = RunRecorder({{}}, hard_cap_s={300 if signum else 1}, flush_every_s=1e9)"
                                        f".start()\nrun.log(0, loss=3.0)\nprint('ready', flush=True)\n{last_line}\n")
    ignore_sigint = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if signum else None
    proc = subprocess.Popen([sys.executable, "script.py"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=ignore_sigint, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if signum:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signum)
    err = proc.communicate(timeout=120)[1]
    s, rows = summary(tmp_path), metrics(tmp_path)
    assert (proc.returncode, s["status"]) == (code, status) and error in s["error"], f"{s}\n{err[-500:]}"
    assert rows == [dict(rows[0], loss=3.0)], "the buffered row was lost"
    assert status != "timeout" or 'script.py", line' in s["error"], "no stack of where the run hung"


# The device batch that fits
T = 64                 # tokens per row of the tiny model
TOTAL = 16 * T * 2     # TOTAL_BATCH_SIZE: two micro-batches of the requested 16 rows


def tiny_model():
    torch.manual_seed(0)
    model = train.GPT(train.GPTConfig(sequence_len=T, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    model.init_weights()
    return model, model.setup_optimizer()


@pytest.mark.quick
def test_the_largest_halving_that_fits_is_used_and_the_trials_leave_no_trace(monkeypatch):
    """Four sizes out of memory, each as a GPU raises it, then one that fits: the total is kept by accumulation
    (test_train's run shows the notice), and the run then trains one step bit for bit as one that never tried."""
    monkeypatch.setattr(train, "MAX_SEQ_LEN", T)  # the row length trial_step uses
    monkeypatch.setenv(recorder.TEST_MAX_ROWS_ENV, "1")  # a "device" where more than 1 row runs out of memory
    (model, optimizer), fresh, tried = tiny_model(), tiny_model(), []
    health = LayerHealth(model.transformer.h.named_parameters())
    plain = {8: "Triton Error [CUDA]: out of memory",  # the compiled backward's kernels: plain RuntimeErrors
             4: "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"}

    def trial(B):
        tried.append(B)
        if B == 16:  # as torch.compile raises it: another error, raised from the out-of-memory one
            raise RuntimeError("backend compiler failed") from OOM
        if B in plain:
            raise RuntimeError(plain[B])
        train.trial_step(B, model, optimizer, health, contextlib.nullcontext())
    result = recorder.fit_batch(16, TOTAL, T, trial, model, optimizer)
    assert tried == [16, 8, 4, 2, 1] and (result.used, result.grad_accum_steps, result.too_big) == (1, 32, tried[:4])
    assert all(p.grad is None for p in model.parameters()) and not optimizer.state
    rows = torch.randint(0, 64, (4, T + 1), generator=torch.Generator().manual_seed(99))
    for trained_model, trained_optimizer in ((model, optimizer), fresh):
        trained_model(rows[:, :-1].contiguous(), rows[:, 1:].contiguous()).backward()
        trained_optimizer.step()
    for (name, a), b in zip(model.named_parameters(), fresh[0].parameters()):
        assert torch.equal(a, b), f"{name} differs after one step: the trials left a trace"
    monkeypatch.setenv(recorder.TEST_MAX_ROWS_ENV, "0")
    with pytest.raises(RunStopped, match=r"DEVICE_BATCH_SIZE 1\) fits .*DEPTH"):
        recorder.fit_batch(2, 2 * T, T, lambda B: None, *tiny_model())


@pytest.mark.quick
def test_on_the_cpu_nothing_is_tried_and_a_bad_request_or_any_other_error_is_no_size_that_does_not_fit(monkeypatch):
    result = recorder.fit_batch(16, TOTAL, T, lambda B: pytest.fail("tried on the CPU"), *tiny_model())
    assert (result.used, result.grad_accum_steps, result.too_big) == (16, 2, [])
    with pytest.raises(ValueError, match=r"TOTAL_BATCH_SIZE 524288 .* DEVICE_BATCH_SIZE 96 .* power of two"):
        recorder.fit_batch(96, 2**19, 2048, None, *tiny_model())
    monkeypatch.setenv(recorder.TEST_MAX_ROWS_ENV, "1000")
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        recorder.fit_batch(2, 2 * T, T, lambda B: torch.ones(4, 8) @ torch.ones(16, 8), *tiny_model())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: real out-of-memory errors")
def test_on_a_gpu_real_out_of_memory_errors_halve_to_a_size_that_fits(monkeypatch):
    """The allocator capped at 1.5 GiB above what is in use, rows of 2048 tokens and an 8192-token vocabulary:
    the sizes that do not fit raise real OutOfMemoryErrors, and the size chosen trains under the same cap."""
    monkeypatch.setattr(train, "MAX_SEQ_LEN", 2048)
    torch.manual_seed(0)
    with torch.device("meta"):  # full-context layers only: SDPA, no flex_attention to compile
        model = train.GPT(train.GPTConfig(2048, 8192, n_layer=2, n_head=2, n_kv_head=2, n_embd=128, window_pattern="L"))
    model.to_empty(device="cuda")
    model.init_weights()
    optimizer, health = model.setup_optimizer(), LayerHealth(model.transformer.h.named_parameters())
    before, autocast = [p.detach().clone() for p in model.parameters()], torch.autocast("cuda", torch.bfloat16)
    trial_args = (model, optimizer, health, autocast)  # trial_step's, after the rows
    torch.cuda.empty_cache()
    cap = torch.cuda.memory_allocated() + 1.5 * 2**30
    torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(0).total_memory)
    try:
        result = recorder.fit_batch(64, 64 * 2048, 2048, lambda B: train.trial_step(B, *trial_args), model, optimizer)
        assert 1 <= result.used < 64 and result.too_big[-1] == 2 * result.used, result
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before)), "the trials left a trace"
        train.trial_step(result.used, *trial_args)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)

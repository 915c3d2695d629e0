"""harness/fit.py and the run's side of it: the device batch that fits. On the CPU, with the memory
limit injected: a try_batch that takes a real step on a tiny model and then runs out of memory above a
number of rows. The largest size that fits is used and TOTAL_BATCH_SIZE is kept; a fitting request is
never changed; the trial steps leave no trace; the cache is keyed, checked and rewritten; nothing
fitting stops the run with what to do; an out-of-memory crash names DEVICE_BATCH_SIZE; and a real
cpu-profile train.py run, stopped after three steps, trains with the fitted batch and records it.
Two tests need CUDA: real out-of-memory errors under a capped allocator, and compiled trials."""
import contextlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train  # noqa: E402  (imports prepare; trains nothing)
from harness import fit as fitting  # noqa: E402
from harness import record  # noqa: E402
from harness.record import LayerHealth, RunRecorder, RunStopped  # noqa: E402

T = 64                 # tokens per row of the tiny model
TOTAL = 16 * T * 2     # TOTAL_BATCH_SIZE: two micro-batches of the requested 16 rows
SOURCE = "DEPTH = 4\ndef forward(x):\n    return x\n"  # stands for train.py in the cache key


def tiny_model(seed=0, n_embd=64):
    torch.manual_seed(seed)
    config = train.GPTConfig(sequence_len=T, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=n_embd)
    model = train.GPT(config)
    model.init_weights()
    return model, model.setup_optimizer()


def tokens(B, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, 64, (B, T + 1), generator=g)
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()  # contiguous, as the loader gives them


class SmallDevice:
    """try_batch for a device with room for max_rows rows. Plain: a forward and backward, then sizes above
    the limit run out of memory. full_step: train.py's own trial_step, whose optimizer step runs out of
    memory after updating the parameters and its state, halfway through the step as a real failure may."""

    def __init__(self, model, optimizer, max_rows, full_step):
        self.model, self.optimizer, self.max_rows, self.full_step, self.tried = model, optimizer, max_rows, full_step, []
        self.health = LayerHealth(model.transformer.h.named_parameters())
        self.snapshot_held = []  # at each forward: was a failed try's parameter snapshot still held?
        model.register_forward_pre_hook(lambda m, args: self.snapshot_held.append(self.health.before is not None))
        optimizer.step = self.optimizer_step

    def optimizer_step(self):
        type(self.optimizer).step(self.optimizer)
        if self.tried[-1] > self.max_rows:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory in the optimizer step")

    def __call__(self, B):
        self.tried.append(B)
        if self.full_step:
            train.trial_step(B, self.model, self.optimizer, self.health, contextlib.nullcontext())
            return
        x, y = tokens(B, seed=B)
        self.model(x, y).backward()
        if B > self.max_rows:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {B} rows")


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """A function (max_rows, requested=16, **fit options) -> (DeviceBatch, SmallDevice), on a fresh tiny model,
    the cache in tmp_path."""
    monkeypatch.setattr(train, "MAX_SEQ_LEN", T)  # the row length trial_step uses
    monkeypatch.delenv(fitting.TEST_MAX_ROWS_ENV, raising=False)

    def run_fit(max_rows, requested=16, source_text=SOURCE, n_embd=64, full_step=False, **options):
        model, optimizer = tiny_model(n_embd=n_embd)
        device = SmallDevice(model, optimizer, max_rows, full_step)
        (tmp_path / "train.py").write_text(source_text)
        options = {"probe_on_cpu": True, "config": asdict(model.config), "source": tmp_path / "train.py",
                   "cache_path": tmp_path / "device_batch.json", **options}
        return fitting.fit_device_batch(requested, TOTAL, T, device, model, optimizer, **options), device
    return run_fit


def test_candidates_halve_the_request_down_to_one():
    assert fitting.candidates(128) == [128, 64, 32, 16, 8, 4, 2, 1]
    assert fitting.candidates(96) == [96, 48, 24, 12, 6, 3, 1]
    assert fitting.candidates(1) == [1]


def test_a_request_that_does_not_divide_the_total_is_one_clear_error():
    assert fitting.grad_accum_steps(32, 2**19, 2048) == 8
    with pytest.raises(ValueError, match=r"TOTAL_BATCH_SIZE 524288 .* DEVICE_BATCH_SIZE 96 .* power of two"):
        fitting.grad_accum_steps(96, 2**19, 2048)


def test_the_largest_size_that_fits_is_used_with_accumulation_for_the_same_total(setup, capsys):
    fit, device = setup(max_rows=5)
    assert device.tried == [16, 8, 4], device.tried
    assert (fit.requested, fit.used, fit.grad_accum_steps, fit.decided_by) == (16, 4, 8, "probe")
    assert fit.used * T * fit.grad_accum_steps == TOTAL and fit.too_big == [16, 8]
    said = [line for line in capsys.readouterr().out.splitlines() if "DEVICE_BATCH_SIZE" in line]
    assert len(said) == 1 and "DEVICE_BATCH_SIZE 16 does not fit" in said[0] and "using 4 with 8" in said[0], said


def test_a_request_that_fits_is_never_changed(setup, capsys):
    fit, device = setup(max_rows=16)
    assert device.tried == [16] and (fit.used, fit.grad_accum_steps, fit.too_big) == (16, 2, [])
    assert "DEVICE_BATCH_SIZE" not in capsys.readouterr().out, "a size that fits is not announced as a change"


def test_fit_off_uses_the_request_as_set_without_trying(setup):
    fit, device = setup(max_rows=1, enabled=False)
    assert device.tried == [] and (fit.used, fit.grad_accum_steps, fit.decided_by) == (16, 2, "as set")


def test_on_a_cpu_there_is_nothing_to_fit(setup):
    fit, device = setup(max_rows=1, probe_on_cpu=False)
    assert device.tried == [] and (fit.used, fit.decided_by) == (16, "cpu")


def test_trial_steps_leave_parameters_and_optimizer_as_they_were(setup):
    """A run that fitted (two failed trials and one that fit, each train.py's trial_step with its optimizer
    step) then trains one step exactly as a run that never tried anything: bit for bit."""
    fit, device = setup(max_rows=1, requested=4, full_step=True)
    assert device.tried == [4, 2, 1]
    fitted, fresh = (device.model, device.optimizer), tiny_model()
    assert all(p.grad is None for p in fitted[0].parameters()) and not fitted[1].state
    assert len(device.snapshot_held) >= 3 and not any(device.snapshot_held), \
        "a failed try's parameter snapshot held memory in the next try"
    del fitted[1].step  # the real step again
    for m, opt in (fitted, fresh):
        x, y = tokens(4, seed=99)
        m(x, y).backward()
        opt.step()
    for (name, a), b in zip(fitted[0].named_parameters(), fresh[0].parameters()):
        assert torch.equal(a, b), f"{name} differs after one step: the trials left a trace"


def test_a_cached_answer_skips_the_search_and_is_still_tried(setup):
    assert setup(max_rows=8)[1].tried == [16, 8]
    fit, device = setup(max_rows=8)
    assert device.tried == [8] and (fit.used, fit.grad_accum_steps, fit.decided_by) == (8, 4, "cache")


def test_a_reduced_answer_made_while_memory_was_held_is_not_kept_once_it_is_free(tmp_path):
    """A size cut down while another process held GPU memory would stick for that code all night: with a GiB
    or more free than when it was decided, the search starts from the requested size again."""
    cache, key, GiB = fitting.FitCache(tmp_path / "c.json"), {"requested": 16, "gpu": "test"}, 2**30

    def search(max_rows, free_gib):
        tried = []

        def try_batch(size):
            tried.append(size)
            if size > max_rows:
                raise torch.cuda.OutOfMemoryError(f"{size} rows")
        return fitting.search(16, try_batch, lambda: None, cache, key, int(free_gib * GiB))[::2], tried
    assert search(8, free_gib=10) == ((8, "probe"), [16, 8]), "another process held 6 GiB"
    assert search(8, free_gib=10.5) == ((8, "cache"), [8]), "about as much free: the answer stands"
    assert search(16, free_gib=16) == ((16, "probe"), [16]), "the memory came back: so did the full size"


def test_a_cached_answer_that_no_longer_fits_searches_on_below_it(setup):
    setup(max_rows=16)
    fit, device = setup(max_rows=8)  # the same key, less room: the model's code changed its memory, not its key
    assert device.tried == [16, 8] and (fit.used, fit.decided_by) == (8, "probe")
    assert setup(max_rows=8)[0].decided_by == "cache", "the new answer was written"


@pytest.mark.parametrize("change", ["model shape", "model code", "torch version"])
def test_a_changed_key_searches_again(setup, monkeypatch, change):
    assert setup(max_rows=16)[0].decided_by == "probe"  # one try each: the request fits
    if change == "model shape":
        fit, _ = setup(max_rows=16, n_embd=32)
    elif change == "model code":
        fit, _ = setup(max_rows=16, source_text=SOURCE.replace("return x", "return 2 * x"))
    else:
        monkeypatch.setattr(torch, "__version__", "9.9.9")
        fit, _ = setup(max_rows=16)
    assert fit.decided_by == "probe", f"a changed {change} used the cached answer"


def test_a_hyperparameter_change_keeps_the_cached_answer(setup):
    setup(max_rows=16)
    fit, _ = setup(max_rows=16, source_text=SOURCE.replace("DEPTH = 4", "DEPTH = 4  # comment\nMATRIX_LR = 0.05"))
    assert fit.decided_by == "cache"


def test_the_key_names_the_gpu_and_its_memory(tmp_path, monkeypatch):
    """An answer found on one card is never used on another, nor on the same model with more memory."""
    model, _ = tiny_model()
    cache = fitting.FitCache(tmp_path / "c.json")

    def key_on(name, gib):
        monkeypatch.setattr(fitting, "device_identity", lambda device: (name, gib * 2**30))
        return fitting.fit_key(16, T, model, asdict(model.config), None, None)
    cache.put(key_on("NVIDIA A10", 24), 4, [16, 8])
    assert cache.get(key_on("NVIDIA A10", 24)) == 4
    assert cache.get(key_on("NVIDIA L4", 24)) is None
    assert cache.get(key_on("NVIDIA A10", 48)) is None


@pytest.mark.parametrize("content", ["{not json", '{"format": "someone else", "entries": {}}',
                                     '{"format": "%s", "entries": {"0123": {"key": {}, "used": 4, "at": 1}}}'
                                     % fitting.CACHE_FORMAT], ids=["corrupt", "foreign", "tampered"])
def test_a_bad_cache_file_is_one_warning_then_searched_and_rewritten(setup, tmp_path, capsys, content):
    (tmp_path / "device_batch.json").write_text(content)
    fit, device = setup(max_rows=16)
    assert device.tried == [16] and fit.decided_by == "probe"
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "device_batch.json" in warnings[0] and "rewritten" in warnings[0], warnings
    assert setup(max_rows=16)[0].decided_by == "cache", "the file was rewritten"


def test_when_not_one_row_fits_the_run_stops_with_what_to_do(setup):
    with pytest.raises(RunStopped) as stopped:
        setup(max_rows=0, requested=2)
    message = str(stopped.value)
    assert "\n" not in message and "DEVICE_BATCH_SIZE 1" in message and "DEPTH" in message
    assert "AUTORESEARCH_PROFILE=cpu" in message


def test_errors_other_than_out_of_memory_are_not_taken_for_a_size_that_does_not_fit(tmp_path):
    model, optimizer = tiny_model()

    def broken(B):
        raise RuntimeError("shape mismatch in the agent's new layer")
    with pytest.raises(RuntimeError, match="shape mismatch"):
        fitting.fit_device_batch(16, TOTAL, T, broken, model, optimizer, probe_on_cpu=True,
                                 cache_path=tmp_path / "c.json")
    assert not (tmp_path / "c.json").exists(), "a broken step is no answer to cache"


def test_half_batches_accumulated_give_the_full_batch_gradient():
    """B/2 x 2 with the loss divided by the accumulation steps, as the loop does, is B x 1 up to rounding."""
    x, y = tokens(4, seed=3)
    grads = []
    for B in (4, 2):
        model, _ = tiny_model()
        with torch.no_grad():  # off the initialisation, whose zero projections leave some gradients zero
            g = torch.Generator().manual_seed(1)
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.dtype))
        steps = 4 // B
        for i in range(steps):
            (model(x[i * B:(i + 1) * B], y[i * B:(i + 1) * B]) / steps).backward()
        grads.append([p.grad for p in model.parameters()])
    for i, (a, b) in enumerate(zip(*grads)):
        err = ((a - b).norm() / a.norm()).item()
        assert err < 1e-5, f"param {i}: 2 x 2 differs from 4 x 1 by {err:.2e} of its norm"

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: compiled trial steps on a real device")
def test_on_a_gpu_compiled_trials_leave_room_for_the_training_and_eval_graphs(tmp_path, monkeypatch):
    """Each size tried compiles the model once more (dynamic=False). With the recompile limit at 3 and hitting
    it an error instead of a silent fall-back to eager, trials at 4, 2 and 1 rows (the first two out of
    memory) still leave the training step and the eval at the fitted size their own compiled graphs, and the
    loop's stats step reuses the fitted size's trial graph (a trial that passed one tensor as both inputs and
    targets compiled a graph guarded on that, which the loop's two tensors would compile again)."""
    import torch._dynamo
    monkeypatch.setattr(train, "MAX_SEQ_LEN", T)
    monkeypatch.delenv(fitting.TEST_MAX_ROWS_ENV, raising=False)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = train.GPT(train.GPTConfig(sequence_len=T, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    model.to_empty(device="cuda")
    model.init_weights()
    model.attention_masks(T, model.cos.device)  # before torch.compile, as train.py does
    optimizer = model.setup_optimizer()
    health = LayerHealth(model.transformer.h.named_parameters())
    compiled = torch.compile(model, dynamic=False)
    autocast = torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16)

    def one_row_fits(B):
        train.trial_step(B, compiled, optimizer, health, autocast)
        if B > 1:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (test: {B} rows)")
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=3, fail_on_recompile_limit_hit=True):
        fit = fitting.fit_device_batch(4, 4 * T, T, one_row_fits, compiled, optimizer, cache_path=tmp_path / "c.json")
        assert (fit.used, fit.too_big, fit.decided_by) == (1, [4, 2], "probe")
        x, y = (t.cuda() for t in tokens(1))
        with autocast:
            compiled(x, y, return_act_rms=True)[0].backward()  # the loop's stats step: the trials' own graph
            compiled(x, y).backward()  # the loop's plain micro-step
            with torch.no_grad():
                compiled(x, y, reduction="none")  # evaluate_bpb's call
    assert fit.gpu.startswith(torch.cuda.get_device_name())

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: real out-of-memory errors")
def test_on_a_gpu_real_out_of_memory_errors_halve_to_the_largest_size_that_fits(tmp_path, monkeypatch):
    """The caching allocator capped at 1.5 GiB above what is in use, rows of 2048 tokens and an 8192-token
    vocabulary (tens of MiB of logits a row): the sizes that do not fit raise real OutOfMemoryErrors, the
    size chosen is half the last that failed and trains under the same cap, and the parameters are as before."""
    seq_len = 2048
    monkeypatch.setattr(train, "MAX_SEQ_LEN", seq_len)
    monkeypatch.delenv(fitting.TEST_MAX_ROWS_ENV, raising=False)
    torch.manual_seed(0)
    with torch.device("meta"):  # full-context layers only: SDPA, no flex_attention to compile
        model = train.GPT(train.GPTConfig(sequence_len=seq_len, vocab_size=8192, n_layer=2, n_head=2, n_kv_head=2,
                                          n_embd=128, window_pattern="L"))
    model.to_empty(device="cuda")
    model.init_weights()
    optimizer = model.setup_optimizer()
    health = LayerHealth(model.transformer.h.named_parameters())
    autocast = torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16)
    before = [p.detach().clone() for p in model.parameters()]
    torch.cuda.empty_cache()
    cap = torch.cuda.memory_allocated() + 1.5 * 2**30
    torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(0).total_memory)
    try:
        fit = fitting.fit_device_batch(64, 64 * seq_len, seq_len,
                                       lambda B: train.trial_step(B, model, optimizer, health, autocast),
                                       model, optimizer, cache_path=tmp_path / "c.json")
        assert 1 <= fit.used < 64 and fit.too_big == fitting.candidates(64)[:len(fit.too_big)], fit
        assert fit.too_big[-1] == 2 * fit.used and fit.grad_accum_steps == 64 // fit.used
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before)), "the trials left a trace"
        train.trial_step(fit.used, model, optimizer, health, autocast)  # the size chosen trains under the same cap
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)

# ---------------------------------------------------------------------------
# The recorder's side: an out-of-memory crash says what to do first
# ---------------------------------------------------------------------------

def crash_summary(tmp_path, fit, error, steps=0):
    with RunRecorder({"DEVICE_BATCH_SIZE": 128}, out_dir=tmp_path, hard_cap_s=60) as run:
        if fit:
            run.record_fit(fit)
        for step in range(steps):
            run.log(step, **{"train/loss": 5.0})
        raise error
    return json.loads((tmp_path / "run_summary.json").read_text())


def test_an_out_of_memory_crash_names_the_fitted_and_requested_device_batch(tmp_path, capsys):
    fit = fitting.DeviceBatch(128, 32, 8, "cache", 0.1, [], "NVIDIA GeForce RTX 4090 (24 GiB)")
    s = crash_summary(tmp_path, fit, torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    first, rest = s["error"].split("\n", 1)
    assert "DEVICE_BATCH_SIZE 32" in first and "requested 128" in first and "to 16" in first, first
    assert "TOTAL_BATCH_SIZE is kept" in first and "Traceback" in rest and "Tried to allocate 2.00 GiB" in rest
    assert s["status"] == "crash" and s["device_batch"]["used"] == 32
    assert capsys.readouterr().err.strip().splitlines()[-1] == "train.py: " + first, "run.log ends with the line"


def test_an_out_of_memory_crash_with_fit_off_names_the_requested_size_and_the_fit(tmp_path):
    wrapped = RuntimeError("compiled graph failed")  # the compiler may wrap the error
    wrapped.__cause__ = torch.cuda.OutOfMemoryError("CUDA out of memory")
    fit = fitting.DeviceBatch(128, 128, 2, "as set", 0.0, [])
    first = crash_summary(tmp_path, fit, wrapped)["error"].splitlines()[0]
    assert "DEVICE_BATCH_SIZE 128 (as requested)" in first and "to 64" in first and "FIT_DEVICE_BATCH = True" in first


def test_an_out_of_memory_crash_before_any_batch_says_the_model_does_not_fit(tmp_path):
    first = crash_summary(tmp_path, None, torch.cuda.OutOfMemoryError("CUDA out of memory"))["error"].splitlines()[0]
    assert "before any batch ran" in first and "DEVICE_BATCH_SIZE 128 not yet tried" in first and "DEPTH" in first
    first = crash_summary(tmp_path, None, torch.cuda.OutOfMemoryError("CUDA out of memory"), steps=3)["error"]
    assert first.startswith("out of GPU memory at DEVICE_BATCH_SIZE 128 (as requested)"), "a train.py without the fit"

# ---------------------------------------------------------------------------
# A real cpu-profile run with a memory limit of 4 rows, stopped after three steps
# ---------------------------------------------------------------------------

def test_a_run_on_a_small_device_trains_with_the_fitted_batch_and_records_it(cpu_prepared, tmp_path):
    """train.py as it is, but for a planted stop after three steps that reports the batch the loop got:
    the fit ran on the real model with train.py's trial_step, and the loop trains with its answer."""
    out, cache = cpu_prepared
    assert out.returncode == 0, f"prepare.py failed:\n{out.stderr[-2000:]}"
    anchor = "        model.zero_grad(set_to_none=True)\n"
    source = (ROOT / "train.py").read_text()
    assert source.count(anchor) == 1, f"anchor not found once in train.py: {anchor!r}"
    stop = ("        if step == 2:\n            raise RuntimeError(f'planted stop: micro-batch {tuple(x.shape)}, '\n"
            "                               f'{micro_step + 1} of {grad_accum_steps} micro-steps')\n")
    (tmp_path / "train.py").write_text(source.replace(anchor, anchor + stop))
    (tmp_path / "prepare.py").write_text((ROOT / "prepare.py").read_text())
    shutil.copytree(ROOT / "harness", tmp_path / "harness")
    env = {**os.environ, "AUTORESEARCH_PROFILE": "cpu", "AUTORESEARCH_CACHE": str(cache),
           "AUTORESEARCH_TIME_BUDGET": "3", "PYTHONUNBUFFERED": "1", fitting.TEST_MAX_ROWS_ENV: "4"}
    run = subprocess.run([sys.executable, "train.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=240)
    s = json.loads((tmp_path / "run_summary.json").read_text())
    assert s["status"] == "crash" and "planted stop" in s["error"], f"exit {run.returncode}\n{run.stderr[-3000:]}"
    requested, total = s["config"]["DEVICE_BATCH_SIZE"], s["config"]["TOTAL_BATCH_SIZE"]  # the cpu profile's
    seq_len = s["harness"]["MAX_SEQ_LEN"]
    accum = total // (4 * seq_len)
    assert requested > 4 and s["config"]["FIT_DEVICE_BATCH"] is True
    assert {k: s["device_batch"][k] for k in ("requested", "used", "grad_accum_steps", "decided_by", "test_max_rows")} \
        == {"requested": requested, "used": 4, "grad_accum_steps": accum, "decided_by": "probe", "test_max_rows": 4}
    assert s["device_batch"]["too_big"] == [b for b in fitting.candidates(requested) if b > 4], s["device_batch"]
    assert f"planted stop: micro-batch (4, {seq_len}), {accum} of {accum} micro-steps" in s["error"], s["error"]
    assert f"DEVICE_BATCH_SIZE {requested} does not fit" in run.stdout and f"accumulation steps: {accum}\n" in run.stdout
    losses = [json.loads(line)["train/loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in line]
    assert len(losses) == 2 and all(0 < v < 10 for v in losses), losses


@pytest.mark.parametrize("exc, oom", [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("Triton Error [CUDA]: out of memory"), True),  # the compiled backward loading its kernels
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 16x8)"), False),
    (ValueError("out of memory"), False),  # only the runtime's own errors say so
])
def test_out_of_memory_is_recognised_wherever_the_gpu_raises_it(exc, oom):
    wrapped = RuntimeError("compiled step failed")  # as the compiler re-raises it
    wrapped.__cause__ = exc
    assert (record.is_out_of_memory(exc), record.is_out_of_memory(wrapped)) == (oom, oom), repr(exc)

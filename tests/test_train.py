"""train.py on the CPU: attention paths agree, the optimizer is what it claims, and real cpu-profile runs (one
that ends ok, one on a small device that then diverges) leave the outputs analyze.py reads. Under the harness a
run hands its model off: test_cheats.py's baseline runs it end to end."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train  # imports prepare; trains nothing
from harness.decide import LOOP_TIMINGS
from harness.recorder import FINAL_FORMATS, LayerHealth
from harness.report import PLOTS
from tests.reference.common import explicit_attention

ROOT = Path(__file__).resolve().parent.parent
# eager flex_attention on the CPU warns that it is unfused; here that is the point
pytestmark = pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")
B, H, T, D = 2, 4, 384, 16  # three of flex's 128-token blocks: full, partial and skipped blocks all occur
STEP_KEYS = {"elapsed_s", "train/loss", "train/progress", "perf/tokens_per_sec",  # what harness/ reads of a step
             *(key for key, _, _ in PLOTS if key != "val/bpb")}


def reference_attention(q, k, v, window):  # softmax attention written out, in train.attention's (B, H, T, D)
    return explicit_attention(*(t.transpose(1, 2) for t in (q, k, v)), (window, 0)).transpose(1, 2)


def attention_with_grads(fn, q, k, v, *args):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    y = fn(q, k, v, *args)
    y.backward(torch.arange(y.numel(), device=y.device).float().cos().to(y.dtype).view_as(y))  # fixed, uneven
    return y.detach(), q.grad, k.grad, v.grad


@pytest.mark.quick
@pytest.mark.parametrize("n_kv_head", [H, H // 2])
@pytest.mark.parametrize("window", [0, 5, 128, 200, T - 2, T])
def test_attention_paths_agree_with_reference(window, n_kv_head):
    g = torch.Generator().manual_seed(window)
    q = torch.randn(B, H, T, D, generator=g)
    k, v = torch.randn(2, B, n_kv_head, T, D, generator=g)
    masks = {"flex": train.sliding_window_mask(T, window, "cpu", flex=True),
             "sdpa": None if window >= T - 1 else train.sliding_window_mask(T, window, "cpu", flex=False)}
    expected = attention_with_grads(reference_attention, q, k, v, window)
    for path, mask in masks.items():
        outputs = attention_with_grads(train.attention, q, k, v, mask)
        for name, got, want in zip(("out", "dq", "dk", "dv"), outputs, expected):
            err = (got - want).abs().max().item()
            assert err < 1e-5, f"{path} {name} off the reference (window {window}, {n_kv_head} kv heads): {err:.2e}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the compiled, block-sparse flex kernel")
@pytest.mark.parametrize("window", [100, 1024])
def test_compiled_flex_matches_sdpa_in_bf16_on_cuda(window):
    T_gpu = 2048
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, T_gpu, 128, generator=g, device="cuda", dtype=torch.bfloat16)
    got, want = (attention_with_grads(train.attention, q, k, v, train.sliding_window_mask(T_gpu, window, "cuda", flex))
                 for flex in (True, False))  # flex_attention, SDPA
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        err = ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
        assert err < 2e-2, f"compiled flex vs SDPA, window {window}: {name} differs by {err:.2e} of its largest value"


# Model and optimizer (the rest is compared with AR's own figures: test_reference_model.py)
@pytest.mark.quick
def test_adamw_path_matches_torch_adamw():
    torch.manual_seed(0)
    p_ours = torch.nn.Parameter(torch.randn(8, 5))
    p_ref = torch.nn.Parameter(p_ours.detach().clone())
    settings = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    ours = train.MuonAdamW([dict(kind="adamw", params=[p_ours], **settings)])
    ref = torch.optim.AdamW([p_ref], **settings)
    for step in range(20):
        ours.param_groups[0]["lr"] = ref.param_groups[0]["lr"] = 0.01 * (1 - step / 20)  # a schedule, as in training
        grad = torch.randn(8, 5)
        p_ours.grad, p_ref.grad = grad.clone(), grad.clone()
        ours.step()
        ref.step()
        err = (p_ours - p_ref).abs().max().item()
        assert err < 1e-6, f"step {step}: AdamW path differs from torch.optim.AdamW by {err:.2e}"


@pytest.mark.parametrize("shape, scale", [((16, 4), 2.0), ((4, 16), 1.0), ((8, 8), 1.0)])
def test_muon_scales_a_tall_matrix_lr_by_the_root_of_its_aspect_ratio(monkeypatch, shape, scale):
    """AR's max(1, rows / cols) ** 0.5: the reference figures' tolerances on optimizer steps are too wide to see it."""
    seen = []
    monkeypatch.setattr(train, "muon_step", lambda *args: seen.append(float(args[5])))  # args[5]: the step's lr
    p = torch.nn.Parameter(torch.randn(*shape))
    p.grad = torch.randn(*shape)
    train.MuonAdamW([dict(kind="muon", params=[p], lr=0.02, momentum=0.95, ns_steps=5, beta2=0.95,
                          weight_decay=0.0)]).step()
    assert seen == [pytest.approx(0.02 * scale)], f"{shape}: lr {seen}, want {0.02 * scale}"


@pytest.mark.quick
def test_layer_health_reports_grad_norm_update_ratio_and_the_rms_of_each_block_output():
    torch.manual_seed(0)
    model = train.GPT(train.GPTConfig(sequence_len=T, vocab_size=64, n_layer=4, n_head=2, n_kv_head=2, n_embd=64))
    model.init_weights()
    x, y = torch.randint(0, 64, (2, 2, T))
    opt, health, seen = model.setup_optimizer(), LayerHealth(model.transformer.h.named_parameters()), []
    for block in model.transformer.h:
        block.register_forward_hook(lambda mod, inp, out: seen.append(out.detach().pow(2).mean().sqrt()))
    loss, act_rms = model(x, y, return_act_rms=True)
    assert torch.allclose(act_rms, torch.stack(seen), rtol=1e-5), f"{act_rms.tolist()} vs {seen}"
    loss.backward()
    q = model.transformer.h[0].attn.c_q.weight
    q_before, q_grad = q.detach().clone(), q.grad.norm().item()
    health.before_step()
    opt.step()
    loss_f, metrics = health.fetch(loss, act_rms)
    assert loss_f == loss.item() and metrics["layer/0.attn.c_q/grad_norm"] == pytest.approx(q_grad, rel=1e-5)
    ratio = ((q.detach() - q_before).norm() / q_before.norm()).item()
    assert metrics["layer/0.attn.c_q/update_ratio"] == pytest.approx(ratio, rel=1e-4)
    assert metrics["layer/3.mlp.c_proj/update_ratio"] is None, "zero-init weights have no ratio at step 0"
    assert metrics["layer/2/act_rms"] == pytest.approx(act_rms[2].item())
    names = {key.split("/")[1] for key in metrics}  # every block matrix; a gate only where there is a value embedding
    assert {"1.attn.ve_gate", "0.mlp.c_fc", "3"} <= names and "0.attn.ve_gate" not in names, sorted(names)


# Whole runs (cpu profile, a few seconds of training each, started together)
PLANTS = {  # run name -> (anchor in train.py, what replaces it, extra environment); a planted fault ends its run
    "ok": (None, None, {"AUTORESEARCH_TIME_BUDGET": "8"}),
    # the fit on a device with room for 4 rows, the batch the loop got printed, then a loss that diverges
    "fit_then_diverge": ("            train_loss = loss.detach()\n",
                         "            train_loss = loss.detach() * (1e3 if step == 2 else 1.0)\n"
                         "            print(f'planted: micro-batch {tuple(x.shape)}, {grad_accum_steps} steps')\n",
                         {"AUTORESEARCH_FIT_TEST_MAX_ROWS": "4"}),
}


@pytest.fixture(scope="module")
def runs(cpu_prepared, tmp_path_factory):
    """name -> (completed process, its directory, run_summary.json): train.py as it is, or with a fault planted."""
    env = {**os.environ, "AUTORESEARCH_PROFILE": "cpu", "AUTORESEARCH_CACHE": str(cpu_prepared[1]),  # conftest.py
           "PYTHONPATH": str(ROOT), "AUTORESEARCH_TIME_BUDGET": "30", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    procs, source = {}, (ROOT / "train.py").read_text()
    for name, (anchor, replacement, extra) in PLANTS.items():
        cwd = tmp_path_factory.mktemp(name)
        assert anchor is None or source.count(anchor) == 1, f"anchor not found once in train.py: {anchor!r}"
        (cwd / "train.py").write_text(source.replace(anchor, replacement) if anchor else source)
        procs[name] = cwd, subprocess.Popen([sys.executable, "train.py"], cwd=cwd, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True, env={**env, **extra})
    for name, (cwd, proc) in procs.items():
        proc.stdout, proc.stderr = proc.communicate(timeout=300)
        procs[name] = proc, cwd, json.loads((cwd / "run_summary.json").read_text())
    return procs


def test_a_cpu_run_ends_ok_with_ars_block_its_config_and_the_contract_metrics(runs):
    proc, cwd, summary = runs["ok"]
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    block = proc.stdout.split("\n---\n")[-1].strip().splitlines()
    assert [line.split(":")[0] for line in block] == list(FINAL_FORMATS), block
    assert summary["status"] == "ok" and 0 < summary["val_bpb"] < 8 and summary["training_seconds"] >= 8, summary
    assert {"startup_s", "fit_s", *LOOP_TIMINGS} <= set(summary["timings"]), summary["timings"]
    upper = {name for name, value in vars(train).items() if name.isupper()
             and isinstance(value, (int, float, str, tuple))} - {"MAX_SEQ_LEN", "TIME_BUDGET", "PROFILE"}
    assert set(summary["config"]) == upper, f"config keys not train.py's globals: {set(summary['config']) ^ upper}"
    # metrics.jsonl: the contract's keys on every step row, in step order
    rows = [json.loads(line) for line in (cwd / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == list(range(len(train_rows)))
    for r in train_rows:
        assert not STEP_KEYS - set(r), f"step {r['step']} lacks {STEP_KEYS - set(r)}"
    progress = [r["train/progress"] for r in rows]
    assert progress == sorted(progress) and progress[-1] == 1.0, progress[-3:]
    untimed = [r["step"] for r in train_rows if r["train/progress"] == 0]
    assert untimed == [0], f"untimed steps {untimed}: nothing compiles on a CPU, so only the first step is untimed"
    val = [r for r in rows if "val/bpb" in r]
    assert (val[0]["step"], val[-1]["step"]) == (0, len(train_rows)), "the curve starts at step 0, ends after the last"
    assert 2 <= len(val) <= 1 + summary["config"]["VAL_POINTS"]
    assert all("train/loss" not in r for r in val), "val/bpb shares a row with a step measured after it"
    assert val[-1]["val/bpb"] < val[0]["val/bpb"], "the model learned nothing on the val slice"
    assert {"layer/0.attn.c_q/grad_norm", "layer/3/act_rms"} <= set(train_rows[0]), "no layer stats at step 0"


def test_a_small_device_trains_with_the_fitted_batch_and_a_loss_over_100_is_diverged(runs):
    proc, cwd, summary = runs["fit_then_diverge"]
    assert (proc.returncode, summary["status"]) == (2, "diverged") and "step 2" in summary["error"], proc.stderr[-3000:]
    accum = summary["config"]["TOTAL_BATCH_SIZE"] // (4 * summary["harness"]["MAX_SEQ_LEN"])
    assert f"planted: micro-batch (4, {summary['harness']['MAX_SEQ_LEN']}), {accum} steps" in proc.stdout
    requested = summary["config"]["DEVICE_BATCH_SIZE"]
    assert f"DEVICE_BATCH_SIZE {requested} does not fit: using 4 with {accum} accumulation steps" in proc.stdout
    last = json.loads((cwd / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["num_steps"] == 3 and last["step"] == 2 and last["train/loss"] > 100, f"diverging step: {last}"

"""train.py on the CPU: attention paths agree, the optimizer is what it claims, and a real cpu-profile
run (also a crashing and a diverging one) leaves the outputs analyze.py reads."""
import json
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train  # noqa: E402  (imports prepare; trains nothing)
from harness.record import FINAL_KEYS, LayerHealth  # noqa: E402

# small shapes: three of flex's 128-token blocks (so full, partial and skipped blocks all occur),
# small enough for 2 CPU cores
B, H, T, D = 2, 4, 384, 16
CONTRACT_STEP_KEYS = {"step", "time", "elapsed_s", "train/loss", "train/loss_smooth", "train/lr_multiplier",
                      "train/muon_momentum", "train/weight_decay", "train/progress", "perf/step_time_ms",
                      "perf/tokens_per_sec", "perf/mfu_percent"}


def reference_attention(q, k, v, window):
    """Causal attention written out: query i sees keys i-window..i."""
    q_pos = torch.arange(q.size(2))[:, None]
    k_pos = torch.arange(k.size(2))[None, :]
    visible = (k_pos <= q_pos) & (q_pos - k_pos <= window)
    reps = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(reps, dim=1), v.repeat_interleave(reps, dim=1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    return scores.masked_fill(~visible, float("-inf")).softmax(dim=-1) @ v


def attention_with_grads(fn, q, k, v):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    y = fn(q, k, v)
    y.backward(torch.cos(torch.arange(y.numel(), device=y.device).float()).to(y.dtype).view_as(y))  # a fixed, uneven upstream gradient
    return y.detach(), q.grad, k.grad, v.grad


def tiny_config(**overrides):
    config = dict(sequence_len=T, vocab_size=64, n_layer=4, n_head=2, n_kv_head=2, n_embd=64, window_pattern="SSSL")
    config.update(overrides)
    return train.GPTConfig(**config)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = train.GPT(tiny_config(**overrides))
    model.init_weights()
    return model


def tiny_batch(seed=0, batch=2, vocab=64):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, vocab, (batch, T + 1), generator=g)
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()  # contiguous, as the loader gives them


@pytest.fixture(autouse=True)
def quiet_flex_warning():
    # eager flex_attention on the CPU warns that it is unfused; here that is the point
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        yield

# ---------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("n_kv_head", [H, H // 2])
@pytest.mark.parametrize("window", [0, 5, 100, 128, 200, T - 2, T - 1, T])
def test_attention_paths_agree_with_reference(window, n_kv_head):
    g = torch.Generator().manual_seed(window)
    q = torch.randn(B, H, T, D, generator=g)
    k, v = torch.randn(2, B, n_kv_head, T, D, generator=g)
    full_context = window >= T - 1
    paths = {
        "sdpa_causal" if full_context else "sdpa_bool": lambda q, k, v: train.attention(
            q, k, v, None if full_context else train.sliding_window_bool_mask(T, window, "cpu")),
        "flex": lambda q, k, v: train.attention(q, k, v, train.sliding_window_block_mask(T, window, "cpu")),
    }
    expected = attention_with_grads(lambda q, k, v: reference_attention(q, k, v, window), q, k, v)
    for path, fn in paths.items():
        for name, got, want in zip(("out", "dq", "dk", "dv"), attention_with_grads(fn, q, k, v), expected):
            err = (got - want).abs().max().item()
            assert err < 1e-5, f"{path} {name} differs from reference (window={window}, kv_heads={n_kv_head}): {err:.2e}"


@pytest.mark.parametrize("window", [5, 100, 128, 200])
def test_block_mask_is_the_bool_mask_and_skips_blocks_out_of_the_window(window):
    block_mask = train.sliding_window_block_mask(T, window, "cpu")
    dense = block_mask.to_dense()[0, 0].bool()  # (q blocks, kv blocks) that are computed at all
    n = T // 128
    q_blk, kv_blk = torch.arange(n)[:, None], torch.arange(n)[None, :]
    want = (kv_blk <= q_blk) & ((q_blk - kv_blk) * 128 - 127 <= window)  # some query sees some key
    assert torch.equal(dense, want), f"window {window}: blocks computed\n{dense.int()}\nexpected\n{want.int()}"
    bool_mask = train.sliding_window_bool_mask(T, window, "cpu")
    flex = block_mask.mask_mod(0, 0, torch.arange(T)[:, None], torch.arange(T)[None, :])
    assert torch.equal(flex, bool_mask.view(T, T)), f"window {window}: mask_mod and the SDPA mask disagree"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the compiled, block-sparse flex kernel")
@pytest.mark.parametrize("window", [100, 1024])
def test_compiled_flex_matches_sdpa_in_bf16_on_cuda(window):
    T_gpu = 2048
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, T_gpu, 128, generator=g, device="cuda", dtype=torch.bfloat16)
    flex = train.sliding_window_block_mask(T_gpu, window, "cuda")
    sdpa = train.sliding_window_bool_mask(T_gpu, window, "cuda")
    got = attention_with_grads(lambda q, k, v: train.attention(q, k, v, flex), q, k, v)
    want = attention_with_grads(lambda q, k, v: train.attention(q, k, v, sdpa), q, k, v)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        err = ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
        assert err < 2e-2, f"compiled flex vs SDPA, window {window}: {name} differs by {err:.2e} of its largest value"


def test_window_pattern_gives_half_context_short_layers_and_a_full_last_layer():
    model = tiny_model(n_layer=6)
    assert model.window_sizes == [T // 2, T // 2, T // 2, T, T // 2, T]
    masks = model.attention_masks(T, torch.device("cpu"))
    assert masks[3] is None and masks[5] is None, "full-context layers must use SDPA's causal kernel"
    assert masks[0] is masks[1] is masks[2] is masks[4], "one mask per (T, window), shared by its layers"
    assert model.attention_masks(T, torch.device("cpu")) is masks, "masks are built once and cached"


def test_model_on_flex_masks_matches_model_on_sdpa_masks(monkeypatch):
    x, y = tiny_batch()
    results = {}
    for path, builder in (("sdpa", train.sliding_window_bool_mask), ("flex", train.sliding_window_block_mask)):
        monkeypatch.setattr(train, "sliding_window_mask", builder)  # what CUDA uses, run on the CPU
        model = tiny_model(n_kv_head=1)
        loss = model(x, y)
        loss.backward()
        results[path] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (loss_a, grads_a), (loss_b, grads_b) = results["sdpa"], results["flex"]
    assert abs(loss_a - loss_b) < 1e-5, f"loss: sdpa {loss_a:.6f} vs flex {loss_b:.6f}"
    for name in grads_a:
        err = (grads_a[name] - grads_b[name]).abs().max().item()
        assert err < 1e-5, f"grad of {name}: sdpa vs flex differ by {err:.2e}"


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------

def test_init_matches_karpathy():
    model = tiny_model()
    d = model.config.n_embd
    for block in model.transformer.h:
        assert block.attn.c_proj.weight.abs().max() == 0 and block.mlp.c_proj.weight.abs().max() == 0
        bound = block.attn.c_q.weight.abs().max().item()
        assert bound <= math.sqrt(3 / d) and bound > 0.9 * math.sqrt(3 / d), f"uniform(+-sqrt(3/d)): max {bound:.4f}"
        if block.attn.ve_gate is not None:
            assert block.attn.ve_gate.weight.abs().max() == 0, "value-embedding gates start neutral"
    assert [i for i in range(4) if str(i) in model.value_embeds] == [1, 3], "alternating, last layer included"
    assert model.lm_head.weight.std().item() < 0.002 and abs(model.transformer.wte.weight.std().item() - 1) < 0.05
    assert model.resid_lambdas.tolist() == [1.0] * 4 and torch.allclose(model.x0_lambdas, torch.full((4,), 0.1))
    assert model.lm_head.weight is not model.transformer.wte.weight, "lm_head is untied"


def test_logits_are_softcapped_and_loss_starts_near_uniform():
    model = tiny_model()
    x, y = tiny_batch()
    with torch.no_grad():
        model.lm_head.weight.mul_(1e4)  # blow the logits up: the cap must hold
        assert model(x).abs().max().item() <= 15.0
        model.lm_head.weight.div_(1e4)
        loss = model(x, y).item()
    assert abs(loss - math.log(64)) < 0.1, f"initial loss {loss:.3f} vs ln(vocab) {math.log(64):.3f}"


def test_act_rms_is_the_rms_of_each_block_output():
    model = tiny_model()
    x, y = tiny_batch()
    seen = []
    for block in model.transformer.h:
        block.register_forward_hook(lambda mod, inp, out: seen.append(out.detach().pow(2).mean().sqrt()))
    _, act_rms = model(x, y, return_act_rms=True)
    assert torch.allclose(act_rms, torch.stack(seen), rtol=1e-5), f"{act_rms.tolist()} vs {seen}"


def test_estimated_flops_count_matrices_and_windowed_attention():
    model = tiny_model()
    counts = model.num_scaling_params()
    matmul_params = counts["transformer_matrices"] + counts["lm_head"]
    attention = sum(12 * 2 * 32 * w for w in model.window_sizes)
    assert model.estimate_flops() == 6 * matmul_params + attention
    assert counts["total"] == sum(p.numel() for p in model.parameters())

# ---------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------

def test_adamw_path_matches_torch_adamw():
    torch.manual_seed(0)
    p_ours = torch.nn.Parameter(torch.randn(8, 5))
    p_ref = torch.nn.Parameter(p_ours.detach().clone())
    ours = train.MuonAdamW([dict(kind="adamw", params=[p_ours], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)])
    ref = torch.optim.AdamW([p_ref], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    for step in range(20):
        lr = 0.01 * (1 - step / 20)  # a schedule, as in training
        ours.param_groups[0]["lr"] = ref.param_groups[0]["lr"] = lr
        grad = torch.randn(8, 5)
        p_ours.grad, p_ref.grad = grad.clone(), grad.clone()
        ours.step()
        ref.step()
        err = (p_ours - p_ref).abs().max().item()
        assert err < 1e-6, f"step {step}: AdamW path differs from torch.optim.AdamW by {err:.2e}"


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48), (3, 128, 32)])
def test_polar_express_singular_values_near_one(shape):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    G[..., 0, :] *= 30  # badly conditioned on purpose
    s_in = torch.linalg.svdvals(G)
    s = torch.linalg.svdvals(train.polar_express(G, 5).float())
    assert (s_in.max() / s_in.min()).item() > 20
    assert s.min().item() > 0.8 and s.max().item() < 1.2, f"singular values {s.min():.3f}..{s.max():.3f}, want ~1"


def test_muon_on_a_stack_equals_muon_on_each_matrix():
    g = torch.Generator().manual_seed(0)
    grads, params = torch.randn(3, 16, 24, generator=g), torch.randn(3, 16, 24, generator=g)
    hyper = [torch.tensor(v) for v in (0.9, 0.02, 0.2, 0.95)]  # momentum, lr, weight decay, beta2

    def run(grads, params):
        params = params.clone()
        momentum_buffer, second = torch.zeros_like(params), torch.zeros(params.size(0), 1, 24)
        train.muon_step(grads.clone(), params, momentum_buffer, second, *hyper, 5, -2)
        return params
    stacked = run(grads, params)
    one_by_one = torch.cat([run(grads[i:i + 1], params[i:i + 1]) for i in range(3)])
    err = (stacked - one_by_one).abs().max().item()
    assert err < 1e-6, f"stacked vs per-matrix Muon differ by {err:.2e}"


def test_normuon_second_moment_uses_beta2_rounded_to_bf16_as_karpathy():
    # karpathy's kernel casts beta2 to the orthogonalized update's dtype (bf16): 0.95 becomes 0.9492
    g = torch.Generator().manual_seed(0)
    grads, params = torch.randn(2, 16, 8, generator=g), torch.randn(2, 16, 8, generator=g)
    second = torch.zeros(2, 16, 1)
    v_mean = train.polar_express(grads, 5).float().square().mean(dim=-1, keepdim=True)
    train.muon_step(grads.clone(), params, torch.zeros_like(params), second,
                    torch.tensor(0.0), torch.tensor(0.02), torch.tensor(0.0), torch.tensor(0.95), 5, -1)
    rate = 1 - torch.tensor(0.95).bfloat16().float()
    err = ((second - rate * v_mean).abs().max() / v_mean.abs().max()).item()
    assert err < 1e-6, f"second moment is not (1 - bf16(0.95)) * v_mean: relative error {err:.2e}"


def test_cautious_weight_decay_spares_weights_the_update_pushes_outward():
    # zero gradient history except one entry: decay applies only where update and weight agree in sign
    params = torch.ones(1, 4, 4)
    grads = torch.zeros(1, 4, 4)
    grads[0, 0, 0] = -1.0  # descent pushes w[0,0] up (away from zero): no decay there
    grads[0, 1, 1] = 1.0   # descent pushes w[1,1] down (with the decay): decayed
    before = params.clone()
    train.muon_step(grads, params, torch.zeros_like(params), torch.zeros(1, 4, 1),
                    torch.tensor(0.0), torch.tensor(0.0), torch.tensor(0.5), torch.tensor(0.95), 5, -1)
    assert torch.equal(params, before), "lr 0: nothing moves"
    train.muon_step(grads, params, torch.zeros_like(params), torch.zeros(1, 4, 1),
                    torch.tensor(0.0), torch.tensor(1e-3), torch.tensor(100.0), torch.tensor(0.95), 5, -1)
    assert params[0, 0, 0] > 1.0, "an outward update gets no decay"
    assert params[0, 1, 1] < 0.95, "an inward update gets the decay"


def test_optimizer_groups_follow_karpathy():
    model = tiny_model()
    opt = model.setup_optimizer(unembedding_lr=0.004, embedding_lr=0.6, matrix_lr=0.04,
                                weight_decay=0.2, adam_betas=(0.8, 0.95), scalar_lr=0.5)
    scale = (64 / 768) ** -0.5
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert by_param[id(model.transformer.wte.weight)]["lr"] == pytest.approx(0.6 * scale)
    assert by_param[id(model.value_embeds["1"].weight)]["lr"] == pytest.approx(0.6 * scale)
    assert by_param[id(model.lm_head.weight)]["lr"] == pytest.approx(0.004 * scale)
    assert by_param[id(model.resid_lambdas)]["lr"] == pytest.approx(0.005)
    assert by_param[id(model.x0_lambdas)]["betas"] == (0.96, 0.95)
    muon = [g for g in opt.param_groups if g["kind"] == "muon"]
    assert sum(len(g["params"]) for g in muon) == len(list(model.transformer.h.parameters()))
    assert all(len({p.shape for p in g["params"]}) == 1 for g in muon), "one shape per Muon group"
    assert all(g["weight_decay"] == 0.2 and g["ns_steps"] == 5 for g in muon)


def test_muon_lr_scales_with_sqrt_of_aspect_for_tall_matrices():
    for shape, scale in (((8, 2), 2.0), ((2, 8), 1.0)):
        p = torch.nn.Parameter(torch.randn(*shape))
        p.grad = torch.randn(*shape)
        opt = train.MuonAdamW([dict(kind="muon", params=[p], lr=0.04, momentum=0.95, ns_steps=5, beta2=0.95, weight_decay=0.0)])
        opt.step()
        assert opt._muon_lr_t.item() == pytest.approx(0.04 * scale), f"{shape}: lr {opt._muon_lr_t.item()}"


def test_layer_health_reports_grad_norm_update_ratio_and_act_rms():
    model = tiny_model()
    opt = model.setup_optimizer()
    health = LayerHealth(model.transformer.h.named_parameters())
    x, y = tiny_batch()
    loss, act_rms = model(x, y, return_act_rms=True)
    loss.backward()
    q = model.transformer.h[0].attn.c_q.weight
    q_before, q_grad = q.detach().clone(), q.grad.norm().item()
    health.before_step()
    opt.step()
    metrics = health.unpack(health.after_step(act_rms).tolist())
    assert metrics["layer/0.attn.c_q/grad_norm"] == pytest.approx(q_grad, rel=1e-5)
    ratio = ((q.detach() - q_before).norm() / q_before.norm()).item()
    assert metrics["layer/0.attn.c_q/update_ratio"] == pytest.approx(ratio, rel=1e-4)
    assert metrics["layer/3.mlp.c_proj/update_ratio"] is None, "zero-init weights have no ratio at step 0"
    assert metrics["layer/2/act_rms"] == pytest.approx(act_rms[2].item())
    names = {key.split("/")[1] for key in metrics}
    assert {"1.attn.ve_gate", "0.mlp.c_fc", "3"} <= names and "0.attn.ve_gate" not in names

# ---------------------------------------------------------------------------
# Whole runs (cpu profile, a few seconds of training each)
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cpu_env(cpu_prepared):
    out, cache = cpu_prepared  # conftest.py: prepare.py run once for the whole session
    assert out.returncode == 0, f"prepare.py failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    return {**os.environ, "AUTORESEARCH_PROFILE": "cpu", "AUTORESEARCH_CACHE": str(cache),
            "AUTORESEARCH_TIME_BUDGET": "3", "PYTHONUNBUFFERED": "1"}


def run_train(env, cwd, script=ROOT / "train.py", timeout=240):
    return subprocess.run([sys.executable, str(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def planted_copy(tmp_path, anchor, replacement):
    """A copy of train.py (with prepare.py beside it) where `anchor` is replaced: a fault planted in the run."""
    source = (ROOT / "train.py").read_text()
    assert source.count(anchor) == 1, f"anchor not found once in train.py: {anchor!r}"
    (tmp_path / "train.py").write_text(source.replace(anchor, replacement))
    (tmp_path / "prepare.py").write_text((ROOT / "prepare.py").read_text())
    shutil.copytree(ROOT / "harness", tmp_path / "harness")
    return tmp_path / "train.py"


def read_metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def ok_run(cpu_env, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("ok_run")
    (cwd / "run_summary.json").write_text('{"status": "stale"}')  # a previous run's leftovers
    out = run_train(cpu_env, cwd)
    return out, cwd


def test_cpu_run_ends_ok_with_the_final_block(ok_run):
    out, cwd = ok_run
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    block = out.stdout.split("\n---\n")[-1].strip().splitlines()
    assert [line.split(":")[0] for line in block] == list(FINAL_KEYS), block
    summary = json.loads((cwd / "run_summary.json").read_text())
    printed = dict(re.match(r"(\w+):\s+(\S+)", line).groups() for line in block)
    assert summary["status"] == "ok" and summary["error"] is None
    assert float(printed["val_bpb"]) == pytest.approx(summary["val_bpb"], abs=1e-6)
    assert 0 < summary["val_bpb"] < 8, summary["val_bpb"]
    assert summary["training_seconds"] >= 3 and summary["num_steps"] > train.TIMING_SKIP_STEPS
    assert summary["depth"] == 4 and summary["peak_vram_mb"] is None and summary["mfu_percent"] is None
    assert {"startup_s", "warmup_s", "eval_s", "final_eval_s"} <= set(summary["timings"])


def test_cpu_run_config_is_collected_from_globals(ok_run):
    _, cwd = ok_run
    config = json.loads((cwd / "run_summary.json").read_text())["config"]
    assert config["DEPTH"] == 4 and config["DEVICE_BATCH_SIZE"] == 8, "the cpu block's values were in force"
    assert config["ADAM_BETAS"] == [0.8, 0.95] and config["WINDOW_PATTERN"] == "SSSL"
    upper = {name for name, value in vars(train).items()
             if name.isupper() and isinstance(value, (int, float, str, tuple))} - {"MAX_SEQ_LEN", "TIME_BUDGET", "PROFILE"}
    assert set(config) == upper, f"config keys differ from train.py's UPPER_CASE globals: {set(config) ^ upper}"


def test_cpu_run_streams_contract_metrics(ok_run):
    _, cwd = ok_run
    rows = read_metrics(cwd / "metrics.jsonl")
    steps = [r["step"] for r in rows]
    assert steps == sorted(steps) and all(isinstance(s, int) for s in steps)
    train_rows = [r for r in rows if "train/loss" in r]
    for r in train_rows:
        missing = CONTRACT_STEP_KEYS - set(r)
        assert not missing, f"step {r['step']} lacks {missing}"
    assert [r["step"] for r in train_rows] == list(range(len(train_rows)))
    progress = [r["train/progress"] for r in rows]
    assert progress == sorted(progress) and 0 <= progress[0] and progress[-1] == 1.0, progress[-3:]
    losses = [r["train/loss"] for r in train_rows]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    val = [r for r in rows if "val/bpb" in r]
    assert len(val) >= 2 and val[0]["step"] == 0 and val[-1]["step"] == len(train_rows), [r["step"] for r in val]
    assert all("train/loss" not in r for r in val), "val/bpb shares a row with a step measured after it"
    assert val[0]["train/progress"] == 0 and val[-1]["train/progress"] == 1.0
    assert val[-1]["val/bpb"] < val[0]["val/bpb"], "the model learned nothing on the val slice"
    layer_rows = [r for r in train_rows if any(k.startswith("layer/") for k in r)]
    assert layer_rows[0]["step"] == 0 and len(layer_rows) >= 2
    keys = {k for k in layer_rows[-1] if k.startswith("layer/")}
    assert {"layer/0.attn.c_q/grad_norm", "layer/3.mlp.c_proj/update_ratio", "layer/3/act_rms"} <= keys
    assert all(re.fullmatch(r"layer/\d+(\.[\w.]+)?/(grad_norm|update_ratio|act_rms)", k) for k in keys)
    assert all(math.isfinite(layer_rows[-1][k]) for k in keys)


def test_cpu_run_progress_is_whole_lines_in_a_log(ok_run):
    out, _ = ok_run
    assert "\r" not in out.stdout, "a log file must not collect carriage-return progress"
    assert re.search(r"^step \d{5} \(\d+\.\d%\) \| loss: ", out.stdout, re.M)


def test_planted_exception_is_a_crash_with_its_traceback(cpu_env, tmp_path):
    script = planted_copy(tmp_path, "        optimizer.step()\n",
                          "        optimizer.step()\n        if step == 2:\n            raise RuntimeError('planted failure')\n")
    out = run_train(cpu_env, tmp_path, script)
    assert out.returncode == 1, f"exit {out.returncode}\n{out.stderr[-2000:]}"
    summary = json.loads((tmp_path / "run_summary.json").read_text())
    assert summary["status"] == "crash" and "planted failure" in summary["error"]
    assert "Traceback" in summary["error"] and summary["num_params_M"] > 0 and summary["depth"] == 4
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "train/loss" in r]
    assert steps == [0, 1], f"training rows before the planted failure: {steps}"


@pytest.mark.parametrize("factor", ["float('nan')", "1e3"], ids=["nan", "loss_over_100"])
def test_planted_blow_up_is_diverged(cpu_env, tmp_path, factor):
    script = planted_copy(tmp_path, "            train_loss = loss.detach()\n",
                          f"            train_loss = loss.detach() * ({factor} if step == 3 else 1.0)\n")
    out = run_train(cpu_env, tmp_path, script)
    assert out.returncode == 2, f"exit {out.returncode}\n{out.stderr[-2000:]}"
    summary = json.loads((tmp_path / "run_summary.json").read_text())
    assert summary["status"] == "diverged" and "step 3" in summary["error"]
    last = read_metrics(tmp_path / "metrics.jsonl")[-1]
    assert last["step"] == 3 and not last["train/loss"] <= 100, f"the diverging step is not on record: {last}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when there is no GPU")
def test_gpu_profile_without_a_gpu_says_so_in_one_line(tmp_path):
    env = {**os.environ, "AUTORESEARCH_PROFILE": "gpu"}
    out = run_train(env, tmp_path)
    assert out.returncode != 0 and out.stdout == ""
    assert out.stderr.strip().count("\n") == 0 and "AUTORESEARCH_PROFILE=cpu" in out.stderr, out.stderr

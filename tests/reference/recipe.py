"""The reference recipe: one procedure, run on karpathy/autoresearch's train.py by make_model_figures.py,
which stores what it returns, and on ours by tests/test_reference_model.py, which compares. `g` is the
globals of the train.py under test: AR's exec'd namespace, or vars(train). Everything runs in fp32 on the
CPU from fixed seeds; what takes gradients starts from common.perturb_zero_init's noise."""
from dataclasses import asdict

import torch

from tests.reference.common import fingerprint, perturb_zero_init

# Small models that still take every branch: SSSL/SL window patterns with windows shorter than the
# sequence, value embeddings on alternating layers of both parities, MHA and GQA, tall and wide matrices.
CONFIGS = {
    "sssl_mha": dict(sequence_len=64, vocab_size=512, n_layer=4, n_head=4, n_kv_head=4, n_embd=64,
                     window_pattern="SSSL"),
    "sl_gqa": dict(sequence_len=48, vocab_size=384, n_layer=3, n_head=4, n_kv_head=2, n_embd=64,
                   window_pattern="SL"),
}
SEED = 42                  # train.py's torch.manual_seed
BATCH = 2                  # rows per micro-batch
OPT_STEPS = 3              # MuonAdamW steps, progress = step / OPT_STEPS (rounding grows too fast for more)
GRAD_ACCUM = 2             # micro-batches per step
SCHEDULE_VARIANTS = [      # the schedule constants the schedules are evaluated under
    {},
    {"WARMUP_RATIO": 0.2, "WARMDOWN_RATIO": 0.3, "FINAL_LR_FRAC": 0.1, "WEIGHT_DECAY": 0.05},
]
PROGRESS_GRID = [i / 1000 for i in range(1001)]  # dense: a boundary moved by 0.005 shows
MOMENTUM_STEPS = [0, 1, 2, 50, 150, 299, 300, 301, 1000]
HYPERPARAMETERS = ["ASPECT_RATIO", "HEAD_DIM", "WINDOW_PATTERN", "TOTAL_BATCH_SIZE", "EMBEDDING_LR",
                   "UNEMBEDDING_LR", "MATRIX_LR", "SCALAR_LR", "WEIGHT_DECAY", "ADAM_BETAS", "WARMUP_RATIO",
                   "WARMDOWN_RATIO", "FINAL_LR_FRAC", "DEPTH", "DEVICE_BATCH_SIZE"]


def make_model(g, name, perturb=False):
    torch.manual_seed(SEED)
    with torch.device("meta"):
        model = g["GPT"](g["GPTConfig"](**CONFIGS[name]))
    model.to_empty(device="cpu")
    model.init_weights()
    if perturb:
        perturb_zero_init(model)
    return model


def token_batch(name, seed, T=None, ignore_some=False):
    """(inputs, targets) of random tokens; ignore_some sets a few targets to -1 (ignored by the loss)."""
    cfg = CONFIGS[name]
    T = T or cfg["sequence_len"]
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, cfg["vocab_size"], (BATCH, T + 1), generator=gen)
    x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
    if ignore_some:
        y[0, ::7] = -1
    return x, y


def tensors(named):
    return {name: fingerprint(t) for name, t in named}


def hyperparameter_figures(g):
    return {k: g[k] for k in HYPERPARAMETERS}


def constant_figures(g):  # too small to move a few steps' figures
    return {"polar_express_coeffs": g["polar_express_coeffs"]}


def model_config_figures(g):
    g["vocab_size"] = 8192  # build_model_config reads the tokenizer's vocab size from the globals
    return {depth: asdict(g["build_model_config"](depth)) for depth in range(1, 13)}


def schedule_figures(g):
    out = []
    saved = {k: g[k] for variant in SCHEDULE_VARIANTS for k in variant}
    try:
        for variant in SCHEDULE_VARIANTS:
            g.update({**saved, **variant})
            out.append({
                "lr_multiplier": [g["get_lr_multiplier"](p) for p in PROGRESS_GRID],
                "weight_decay": [g["get_weight_decay"](p) for p in PROGRESS_GRID],
                "muon_momentum": [g["get_muon_momentum"](s) for s in MOMENTUM_STEPS],
            })
    finally:
        g.update(saved)
    return out


def init_figures(g, name):
    model = make_model(g, name)
    return {
        "params": tensors(model.named_parameters()),
        "rotary": {"cos": fingerprint(model.cos), "sin": fingerprint(model.sin)},
        "window_sizes": [w[0] if isinstance(w, tuple) else w for w in model.window_sizes],  # AR: (left, 0)
        "estimate_flops": model.estimate_flops(),
        "num_scaling_params": model.num_scaling_params(),
    }


def forward_figures(g, name):
    model = make_model(g, name, perturb=True)
    x, y = token_batch(name, seed=1, ignore_some=True)
    loss = model(x, y)
    loss.backward()
    with torch.no_grad():
        per_token = model(x, y, reduction="none")
        T_short = CONFIGS[name]["sequence_len"] * 5 // 8  # shorter than training rows: other masks
        xs, ys = token_batch(name, seed=2, T=T_short)
        logits = model(xs)
        model.lm_head.weight.mul_(3000)  # logits of std ~24, well into tanh's bend: the softcap shapes them
        capped = model(xs)
    return {
        "loss": loss.item(),
        "per_token_loss": fingerprint(per_token),
        "short_logits": fingerprint(logits),
        "capped_logits": fingerprint(capped),
        "short_loss": torch.nn.functional.cross_entropy(logits.flatten(0, 1), ys.flatten()).item(),
        "grads": tensors((n, p.grad) for n, p in model.named_parameters()),
    }


def step_figures(g, name):
    """OPT_STEPS steps as the training loop takes them: GRAD_ACCUM micro-batches, then the schedules set."""
    model = make_model(g, name, perturb=True)
    optimizer = model.setup_optimizer(
        unembedding_lr=g["UNEMBEDDING_LR"], embedding_lr=g["EMBEDDING_LR"], scalar_lr=g["SCALAR_LR"],
        adam_betas=g["ADAM_BETAS"], matrix_lr=g["MATRIX_LR"], weight_decay=g["WEIGHT_DECAY"])
    keys = ["kind", "lr", "initial_lr", "betas", "eps", "weight_decay", "momentum", "ns_steps", "beta2"]
    groups = [{**{k: v for k, v in group.items() if k in keys}, "shapes": [list(p.shape) for p in group["params"]]}
              for group in optimizer.param_groups]
    steps = []
    for step in range(OPT_STEPS):
        for micro_step in range(GRAD_ACCUM):
            x, y = token_batch(name, seed=100 + GRAD_ACCUM * step + micro_step)
            loss = model(x, y)
            train_loss = loss.detach()
            (loss / GRAD_ACCUM).backward()
        progress = step / OPT_STEPS
        lrm = g["get_lr_multiplier"](progress)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = g["get_muon_momentum"](step)
                group["weight_decay"] = g["get_weight_decay"](progress)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        steps.append({"loss": train_loss.item(), "params": tensors(model.named_parameters())})
    state = {f"{i}.{k}": fingerprint(v) for i, p in enumerate(model.parameters())
             for k, v in optimizer.state.get(p, {}).items() if torch.is_tensor(v)}
    return {"param_groups": groups, "steps": steps, "state": state}


def kernel_figures(g):
    """The two optimizer kernels called directly, in settings the training groups never reach:
    AdamW with weight decay, Muon on tall, wide and square stacks with a changing momentum."""
    gen = torch.Generator().manual_seed(7)

    def scalars(*values):  # the kernels take their hyperparameters as 0-D tensors
        return [torch.tensor(float(v)) for v in values]

    p, exp_avg, exp_avg_sq = torch.randn(8, 6, generator=gen), torch.zeros(8, 6), torch.zeros(8, 6)
    for step in range(1, 4):
        g["adamw_step_fused"](p, torch.randn(8, 6, generator=gen), exp_avg, exp_avg_sq,
                              *scalars(step, 0.01, 0.8, 0.95, 1e-10, 0.1))
    out = {"adamw": [fingerprint(p), fingerprint(exp_avg), fingerprint(exp_avg_sq)]}
    for shape in [(3, 48, 16), (2, 16, 48), (2, 32, 32)]:
        red_dim = -1 if shape[-2] >= shape[-1] else -2
        params, momentum_buffer = torch.randn(shape, generator=gen), torch.zeros(shape)
        second = torch.zeros(shape[0], shape[1], 1) if red_dim == -1 else torch.zeros(shape[0], 1, shape[2])
        for step in range(3):
            g["muon_step_fused"](torch.randn(shape, generator=gen), params, momentum_buffer, second,
                                 *scalars(0.85 + 0.03 * step, 0.02, 0.2, 0.95), 5, red_dim)
        out["muon_" + "x".join(map(str, shape))] = [fingerprint(x) for x in (params, momentum_buffer, second)]
    return out


SETTINGS = {"hyperparameters": hyperparameter_figures, "constants": constant_figures, "kernels": kernel_figures,
            "model_configs": model_config_figures, "schedules": schedule_figures}  # figures(g)
MODEL_PARTS = {"init": init_figures, "forward": forward_figures, "optimizer": step_figures}  # figures(g, name)


def all_figures(g):
    return {**{where: figures(g) for where, figures in SETTINGS.items()},
            "models": {name: {part: figures(g, name) for part, figures in MODEL_PARTS.items()} for name in CONFIGS}}

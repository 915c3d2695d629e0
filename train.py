"""
Autoresearch pretraining script. Single-GPU, single-file: the one file the agent edits.
karpathy/autoresearch's GPT and MuonAdamW; what a run records is harness/recorder.py's job.
Usage: uv run train.py    (AUTORESEARCH_PROFILE=cpu: a tiny model that runs the whole loop on a CPU)
"""

import os
import time
t_process_start = time.time()  # startup_s counts the imports too (torch alone takes seconds)
os.environ["PYTORCH_ALLOC_CONF"] = "expandable_segments:True"

import gc
from contextlib import nullcontext
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from prepare import (MAX_SEQ_LEN, TIME_BUDGET, PROFILE, Tokenizer, make_dataloader, evaluate_bpb, evaluate_bpb_sample,
                     ProgressLine, gpu_problem, peak_bf16_flops)
from harness.recorder import RunRecorder, RunStopped, LayerHealth, ValCurve, collect_config, fit_batch

# ---------------------------------------------------------------------------
# GPT Model
# ---------------------------------------------------------------------------

@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "SSSL"


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def has_ve(layer_idx, n_layer):
    """Returns True if layer should have Value Embedding (alternating, last always included)."""
    return layer_idx % 2 == (n_layer - 1) % 2


def apply_rotary_emb(x, cos, sin):
    assert x.ndim == 4  # (B, T, H, D)
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos], 3)

def cuda_compile(fn):
    """fn under torch.compile where CUDA is present; elsewhere fn itself (no compiler start-up on a CPU)."""
    return torch.compile(fn, dynamic=False, fullgraph=True) if torch.cuda.is_available() else fn

flex_attention_compiled = cuda_compile(flex_attention)

def sliding_window_mask(T, window, device, flex):
    """flex_attention's BlockMask (it skips the key blocks a query never sees), or SDPA's (T, T) bool mask."""
    if flex:
        in_window = lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & (q_idx - kv_idx <= window)  # noqa: E731
        return create_block_mask(in_window, B=None, H=None, Q_LEN=T, KV_LEN=T, device=device)
    pos = torch.arange(T, device=device)
    dist = pos[:, None] - pos[None, :]  # query position minus key position
    return (dist >= 0) & (dist <= window)

def attention(q, k, v, mask):
    """Causal attention, (B, H, T, D) in and out; with window w query i sees keys i-w..i (FA3's window_size=(w, 0)).
    mask: None (full context: SDPA's causal kernel), a BlockMask (flex_attention, CUDA) or a bool mask (SDPA, CPU)."""
    gqa = k.size(1) != q.size(1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if isinstance(mask, BlockMask):
        flex = flex_attention_compiled if q.is_cuda else flex_attention  # not autocast-aware: one dtype
        return flex(q.to(v.dtype), k.to(v.dtype), v, block_mask=mask, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.n_embd = config.n_embd
        self.head_dim = self.n_embd // self.n_head
        assert self.n_embd % self.n_head == 0
        assert self.n_kv_head <= self.n_head and self.n_head % self.n_kv_head == 0
        self.c_q = nn.Linear(self.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(self.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(self.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_embd, self.n_embd, bias=False)
        self.ve_gate_channels = 32
        self.ve_gate = nn.Linear(self.ve_gate_channels, self.n_kv_head, bias=False) if has_ve(layer_idx, config.n_layer) else None

    def forward(self, x, ve, cos_sin, mask):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)

        # Value residual (ResFormer): mix in value embedding with input-dependent gate per head
        if ve is not None:
            ve = ve.view(B, T, self.n_kv_head, self.head_dim)
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))  # (B, T, n_kv_head)
            v = v + gate.unsqueeze(-1) * ve

        q, k = apply_rotary_emb(q, *cos_sin), apply_rotary_emb(k, *cos_sin)
        q, k = norm(q), norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        y = attention(q, k, v, mask)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos_sin, mask):
        x = x + self.attn(norm(x), ve, cos_sin, mask)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.window_sizes = self._compute_window_sizes(config)
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        head_dim = config.n_embd // config.n_head
        kv_dim = config.n_kv_head * head_dim
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(config.vocab_size, kv_dim)
                                           for i in range(config.n_layer) if has_ve(i, config.n_layer)})
        self.rotary_seq_len = config.sequence_len * 10
        cos, sin = self._precompute_rotary_embeddings(self.rotary_seq_len, head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self._masks = {}  # (T, device) -> per-layer attention mask, see attention_masks()

    @torch.no_grad()
    def init_weights(self):
        torch.nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        torch.nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        # Transformer blocks: uniform with the std of N(0, 1/d); output projections start at zero
        s = 3**0.5 * self.config.n_embd**-0.5
        for block in self.transformer.h:
            torch.nn.init.uniform_(block.attn.c_q.weight, -s, s)
            torch.nn.init.uniform_(block.attn.c_k.weight, -s, s)
            torch.nn.init.uniform_(block.attn.c_v.weight, -s, s)
            torch.nn.init.zeros_(block.attn.c_proj.weight)
            torch.nn.init.uniform_(block.mlp.c_fc.weight, -s, s)
            torch.nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:  # sigmoid(0) = 0.5, scaled by 2: a neutral gate of 1.0
                torch.nn.init.zeros_(block.attn.ve_gate.weight)
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)
        for ve in self.value_embeds.values():
            torch.nn.init.uniform_(ve.weight, -s, s)
        head_dim = self.config.n_embd // self.config.n_head
        self.cos, self.sin = self._precompute_rotary_embeddings(self.rotary_seq_len, head_dim)
        # Embeddings in bf16 on the GPU (autocast computes in bf16 there anyway); the CPU path stays fp32
        if self.transformer.wte.weight.is_cuda:
            self.transformer.wte.to(dtype=torch.bfloat16)
            for ve in self.value_embeds.values():
                ve.to(dtype=torch.bfloat16)

    def _precompute_rotary_embeddings(self, seq_len, head_dim, base=10000):
        device = self.transformer.wte.weight.device
        channel_range = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (base ** (channel_range / head_dim))
        freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
        cos, sin = freqs.cos().bfloat16(), freqs.sin().bfloat16()
        return cos[None, :, None, :], sin[None, :, None, :]  # (1, T, 1, D/2)

    def _compute_window_sizes(self, config):
        """Keys each layer looks back over: S = half the context, L = all of it; the last layer is L."""
        pattern = config.window_pattern.upper()
        assert all(c in "SL" for c in pattern)
        long_window = config.sequence_len
        char_to_window = {"L": long_window, "S": long_window // 2}
        window_sizes = [char_to_window[pattern[i % len(pattern)]] for i in range(config.n_layer)]
        window_sizes[-1] = long_window
        return window_sizes

    def attention_masks(self, T, device):
        """Per-layer masks for length T (None: full context), built once: call it before torch.compile."""
        key = (T, str(device))
        if key not in self._masks:
            assert not torch.compiler.is_compiling(), "build the masks before torch.compile: model.attention_masks()"
            flex = torch.device(device).type == "cuda"
            masks = {w: sliding_window_mask(T, w, device, flex) for w in set(self.window_sizes) if w < T - 1}
            self._masks[key] = [masks.get(w) for w in self.window_sizes]
        return self._masks[key]

    def estimate_flops(self):
        """Estimated FLOPs per token (forward + backward)."""
        nparams = sum(p.numel() for p in self.parameters())
        counts = self.num_scaling_params()
        nparams_exclude = counts["wte"] + counts["value_embeds"] + counts["scalars"]
        h, q, t = self.config.n_head, self.config.n_embd // self.config.n_head, self.config.sequence_len
        attn_flops = sum(12 * h * q * min(window, t) for window in self.window_sizes)
        return 6 * (nparams - nparams_exclude) + attn_flops

    def num_scaling_params(self):
        modules = {"wte": self.transformer.wte, "value_embeds": self.value_embeds, "lm_head": self.lm_head,
                   "transformer_matrices": self.transformer.h}
        counts = {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}
        counts["scalars"] = self.resid_lambdas.numel() + self.x0_lambdas.numel()
        return {**counts, "total": sum(counts.values())}

    def setup_optimizer(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02,
                        weight_decay=0.0, adam_betas=(0.8, 0.95), scalar_lr=0.5):
        model_dim = self.config.n_embd
        matrix_params = list(self.transformer.h.parameters())
        # Scale the AdamW LRs by 1/sqrt(dmodel) (tuned at 768 dim)
        dmodel_lr_scale = (model_dim / 768) ** -0.5
        print(f"Scaling AdamW LRs by 1/sqrt({model_dim}/768) = {dmodel_lr_scale:.6f}")
        adamw = dict(kind="adamw", betas=adam_betas, eps=1e-10, weight_decay=0.0)
        param_groups = [
            dict(adamw, params=list(self.lm_head.parameters()), lr=unembedding_lr * dmodel_lr_scale),
            dict(adamw, params=list(self.transformer.wte.parameters()), lr=embedding_lr * dmodel_lr_scale),
            dict(adamw, params=list(self.value_embeds.parameters()), lr=embedding_lr * dmodel_lr_scale),
            dict(adamw, params=[self.resid_lambdas], lr=scalar_lr * 0.01),
            dict(adamw, params=[self.x0_lambdas], lr=scalar_lr, betas=(0.96, 0.95)),
        ]
        for shape in sorted({p.shape for p in matrix_params}):
            param_groups.append(dict(kind="muon", params=[p for p in matrix_params if p.shape == shape], lr=matrix_lr,
                                     momentum=0.95, ns_steps=5, beta2=0.95, weight_decay=weight_decay))
        assert sum(len(g["params"]) for g in param_groups) == len(list(self.parameters())), "a parameter in no group"
        optimizer = MuonAdamW(param_groups)
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
        return optimizer

    def forward(self, idx, targets=None, reduction="mean", return_act_rms=False):
        B, T = idx.size()
        assert T <= self.cos.size(1)
        cos_sin = self.cos[:, :T], self.sin[:, :T]
        masks = self.attention_masks(T, idx.device)

        x = x0 = norm(self.transformer.wte(idx))
        act_rms = []  # RMS of each block's output, for the per-layer health log
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos_sin, masks[i])
            if return_act_rms:
                act_rms.append(x.detach().float().square().mean().sqrt())
        x = norm(x)

        softcap = 15
        logits = self.lm_head(x).float()
        logits = softcap * torch.tanh(logits / softcap)

        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1, reduction=reduction)
        return (loss, torch.stack(act_rms)) if return_act_rms else loss

# ---------------------------------------------------------------------------
# Optimizer (MuonAdamW, single GPU only)
# ---------------------------------------------------------------------------

# Polar Express (Amsel et al. 2025): per-iteration odd-polynomial coefficients that drive
# every singular value to ~1 in a few steps, faster than the fixed Newton-Schulz quintic
polar_express_coeffs = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def adamw_step(p, grad, exp_avg, exp_avg_sq, step_t, lr_t, beta1_t, beta2_t, eps_t, wd_t):
    p.mul_(1 - lr_t * wd_t)
    exp_avg.lerp_(grad, 1 - beta1_t)
    exp_avg_sq.lerp_(grad.square(), 1 - beta2_t)
    bias1 = 1 - beta1_t ** step_t
    bias2 = 1 - beta2_t ** step_t
    denom = (exp_avg_sq / bias2).sqrt() + eps_t
    step_size = lr_t / bias1
    p.add_(exp_avg / denom, alpha=-step_size)


def muon_step(stacked_grads, stacked_params, momentum_buffer, second_momentum_buffer,
              momentum_t, lr_t, wd_t, beta2_t, ns_steps, red_dim):
    # Nesterov momentum
    momentum = momentum_t.to(stacked_grads.dtype)
    momentum_buffer.lerp_(stacked_grads, 1 - momentum)
    g = stacked_grads.lerp_(momentum_buffer, momentum)
    # Polar express: the orthogonal polar factor U V^T of g = U S V^T, approximately, in bf16
    X = g.bfloat16()
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)  # spectral norm <= 1
    if g.size(-2) > g.size(-1):
        for a, b, c in polar_express_coeffs[:ns_steps]:
            A = X.mT @ X  # the smaller Gram matrix
            B = b * A + c * (A @ A)
            X = a * X + X @ B
    else:
        for a, b, c in polar_express_coeffs[:ns_steps]:
            A = X @ X.mT
            B = b * A + c * (A @ A)
            X = a * X + B @ X
    g = X
    # NorMuon: per-row (or per-column) second moment evens out the update's neuron scales,
    # then the whole update is rescaled back to the norm it had after orthogonalization
    v_mean = g.float().square().mean(dim=red_dim, keepdim=True)
    red_dim_size = g.size(red_dim)
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * red_dim_size).sqrt()
    beta2 = beta2_t.to(g.dtype)  # in the update's dtype (bf16: 0.95 -> 0.9492 in eager), as karpathy's kernel has it
    second_momentum_buffer.lerp_(v_mean.to(second_momentum_buffer.dtype), 1 - beta2)
    step_size = second_momentum_buffer.clamp_min(1e-10).rsqrt()
    v_norm_new = ((v_mean * red_dim_size) * step_size.float().square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    g = g * (step_size * (v_norm / v_norm_new.clamp_min(1e-10))).to(g.dtype)
    # Cautious weight decay: only where the update and the weight agree in sign
    lr, wd = lr_t.to(g.dtype), wd_t.to(g.dtype)
    mask = (g * stacked_params) >= 0
    stacked_params.sub_(lr * g + lr * wd * stacked_params * mask)


# compiled once on CUDA: hyperparameters come as 0-D tensors, so a schedule never recompiles them
adamw_step_fused = cuda_compile(adamw_step)
muon_step_fused = cuda_compile(muon_step)


class MuonAdamW(torch.optim.Optimizer):
    """Combined optimizer: Muon for 2D matrix params, AdamW for others."""

    def __init__(self, param_groups):
        super().__init__(param_groups, defaults={})
        # 0-D CPU tensors, filled each step: a changing float would recompile the fused kernels
        self._adamw_t = [torch.tensor(0.0, dtype=torch.float32, device="cpu") for _ in range(6)]  # step lr b1 b2 eps wd
        self._muon_t = [torch.tensor(0.0, dtype=torch.float32, device="cpu") for _ in range(4)]  # momentum lr wd beta2

    def _step_adamw(self, group):
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            state["step"] += 1
            values = (state["step"], group["lr"], *group["betas"], group["eps"], group["weight_decay"])
            for t, value in zip(self._adamw_t, values):
                t.fill_(value)
            kernel = adamw_step_fused if p.is_cuda else adamw_step
            kernel(p, p.grad, state["exp_avg"], state["exp_avg_sq"], *self._adamw_t)

    def _step_muon(self, group):
        params = group["params"]
        if not params or params[0].grad is None:
            return
        p = params[0]
        state = self.state[p]  # the whole group's state lives on its first parameter
        shape, device, dtype = p.shape, p.device, p.dtype
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros(len(params), *shape, dtype=dtype, device=device)
            state_shape = (len(params), shape[-2], 1) if shape[-2] >= shape[-1] else (len(params), 1, shape[-1])
            state["second_momentum_buffer"] = torch.zeros(state_shape, dtype=dtype, device=device)
        red_dim = -1 if shape[-2] >= shape[-1] else -2
        stacked_grads = torch.stack([p.grad for p in params])  # one kernel call for all same-shape matrices
        stacked_params = torch.stack(params)
        lr = group["lr"] * max(1.0, shape[-2] / shape[-1]) ** 0.5
        for t, value in zip(self._muon_t, (group["momentum"], lr, group["weight_decay"], group["beta2"])):
            t.fill_(value)
        kernel = muon_step_fused if p.is_cuda else muon_step
        kernel(stacked_grads, stacked_params, state["momentum_buffer"], state["second_momentum_buffer"],
               *self._muon_t, group["ns_steps"], red_dim)
        torch._foreach_copy_(params, list(stacked_params.unbind(0)))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            if group["kind"] == "adamw":
                self._step_adamw(group)
            elif group["kind"] == "muon":
                self._step_muon(group)

# ---------------------------------------------------------------------------
# Hyperparameters (edit these directly, no CLI flags needed)
# ---------------------------------------------------------------------------
# `A if gpu_profile else B`: B is the cpu profile's laptop-sized value (AUTORESEARCH_PROFILE=cpu)
gpu_profile = PROFILE == "gpu"

# Model architecture
ASPECT_RATIO = 64 if gpu_profile else 32  # model_dim = depth * ASPECT_RATIO
HEAD_DIM = 128 if gpu_profile else 32     # target head dimension for attention
WINDOW_PATTERN = "SSSL" # sliding window pattern: L=full, S=half context

# Optimization
TOTAL_BATCH_SIZE = 2**19 if gpu_profile else 2**12  # ~524K tokens per optimizer step
EMBEDDING_LR = 0.6      # learning rate for token embeddings (Adam)
UNEMBEDDING_LR = 0.004  # learning rate for lm_head (Adam)
MATRIX_LR = 0.04        # learning rate for matrix parameters (Muon)
SCALAR_LR = 0.5         # learning rate for per-layer scalars (Adam)
WEIGHT_DECAY = 0.2      # cautious weight decay for Muon
ADAM_BETAS = (0.8, 0.95) # Adam beta1, beta2
WARMUP_RATIO = 0.0      # fraction of time budget for LR warmup
WARMDOWN_RATIO = 0.5    # fraction of time budget for LR warmdown
FINAL_LR_FRAC = 0.0     # final LR as fraction of initial

# Model size
DEPTH = 8 if gpu_profile else 4                # number of transformer layers
DEVICE_BATCH_SIZE = 128 if gpu_profile else 8  # per-device batch size (halved until it fits, same TOTAL_BATCH_SIZE)

# Run logging (what a run records about itself; changes no number of the training)
LAYER_STATS_EVERY = 25 if gpu_profile else 10  # steps between per-layer health rows
VAL_POINTS = 10 if gpu_profile else 5          # in-training val/bpb points, evenly spaced in progress
VAL_TOKENS = 2**20 if gpu_profile else 2**13   # tokens per in-training val/bpb: the dev slice's first ones
TIMING_SKIP_STEPS = 10 if gpu_profile else 0   # steps 0..TIMING_SKIP_STEPS are not timed (compilation warm-up)


def build_model_config(depth):
    model_dim = ((depth * ASPECT_RATIO + HEAD_DIM - 1) // HEAD_DIM) * HEAD_DIM
    num_heads = model_dim // HEAD_DIM
    return GPTConfig(sequence_len=MAX_SEQ_LEN, vocab_size=vocab_size, n_layer=depth, n_head=num_heads,
                     n_kv_head=num_heads, n_embd=model_dim, window_pattern=WINDOW_PATTERN)

# Schedules (all based on progress = training_time / TIME_BUDGET)

def get_lr_multiplier(progress):
    if progress < WARMUP_RATIO:
        return progress / WARMUP_RATIO if WARMUP_RATIO > 0 else 1.0
    if progress < 1.0 - WARMDOWN_RATIO:
        return 1.0
    cooldown = (1.0 - progress) / WARMDOWN_RATIO
    return cooldown * 1.0 + (1 - cooldown) * FINAL_LR_FRAC

def get_muon_momentum(step):
    frac = min(step / 300, 1)
    return (1 - frac) * 0.85 + frac * 0.95

def get_weight_decay(progress):
    return WEIGHT_DECAY * (1 - progress)


def trial_step(B, model, optimizer, health, autocast_ctx):
    """The loop's heaviest step on B rows, twice (the second meets the first's optimizer state and gradients)."""
    health.forget()  # a try that ran out of memory halfway left its parameter snapshot behind
    # two views of one tensor, as the loader gives: the same tensor twice would be another compiled graph
    x, y = torch.zeros((2, B, MAX_SEQ_LEN), dtype=torch.long, device=health.params[0].device)
    for _ in range(2):
        with autocast_ctx:
            loss, act_rms = model(x, y, return_act_rms=True)
        loss.backward()
        health.before_step()
        optimizer.step()
        health.fetch(loss, act_rms)


if __name__ == "__main__":
    run = RunRecorder(collect_config(globals())).start()  # run_summary.json is written however the run ends

    # Setup: tokenizer, model, optimizer, dataloader
    t_start = time.time()
    torch.manual_seed(42)
    torch.cuda.manual_seed(42)
    torch.set_float32_matmul_precision("high")
    device = torch.device("cuda" if gpu_profile else "cpu")
    if gpu_profile and (problem := gpu_problem()):
        raise RunStopped(problem[1])  # no GPU, bf16 or compiler: say what to do, rather than time another program
    autocast_ctx = torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16) if gpu_profile else nullcontext()
    synchronize = torch.cuda.synchronize if gpu_profile else lambda: None
    peak_flops = peak_bf16_flops(torch.cuda.get_device_name()) if gpu_profile else None  # None: MFU unknown

    tokenizer = Tokenizer.from_directory()
    vocab_size = tokenizer.get_vocab_size()
    print(f"Vocab size: {vocab_size:,}")
    config = build_model_config(DEPTH)
    print(f"Model config: {asdict(config)}")
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    model.attention_masks(MAX_SEQ_LEN, model.cos.device)  # before torch.compile, keyed as forward asks ("cuda:0")
    param_counts = model.num_scaling_params()
    print("Parameter counts:\n" + "\n".join(f"  {key:24s}: {value:,}" for key, value in param_counts.items()))
    num_params, num_flops_per_token = param_counts["total"], model.estimate_flops()
    print(f"Estimated FLOPs per token: {num_flops_per_token:e}")
    run.set(num_params_M=num_params / 1e6, depth=DEPTH)

    optimizer = model.setup_optimizer(unembedding_lr=UNEMBEDDING_LR, embedding_lr=EMBEDDING_LR, scalar_lr=SCALAR_LR,
                                      adam_betas=ADAM_BETAS, matrix_lr=MATRIX_LR, weight_decay=WEIGHT_DECAY)
    health = LayerHealth(model.transformer.h.named_parameters())
    if gpu_profile:
        model = torch.compile(model, dynamic=False)
    fit = fit_batch(DEVICE_BATCH_SIZE, TOTAL_BATCH_SIZE, MAX_SEQ_LEN,
                    lambda B: trial_step(B, model, optimizer, health, autocast_ctx), model, optimizer)
    device_batch_size, grad_accum_steps = run.record_fit(fit)

    train_loader = make_dataloader(tokenizer, device_batch_size, MAX_SEQ_LEN, "train", device=device.type)
    x, y, epoch = next(train_loader)  # prefetch first batch
    print(f"Time budget: {TIME_BUDGET}s\nGradient accumulation steps: {grad_accum_steps}")
    # in-training val/bpb, each in its own row; no model.eval(): no dropout, and the mode flip would recompile
    val_curve = ValCurve(run, lambda: evaluate_bpb_sample(model, tokenizer, device_batch_size, VAL_TOKENS),
                         VAL_POINTS, autocast_ctx)
    progress_line = ProgressLine(every_s=10)

    # Training loop
    run.timing("startup_s", time.time() - t_process_start)
    smooth_train_loss, total_training_time, step = 0, 0, 0
    while True:
        progress = min(total_training_time / TIME_BUDGET, 1.0)
        val_curve.update(step, progress, total_training_time)
        synchronize()
        t0 = time.time()
        want_stats = step % LAYER_STATS_EVERY == 0  # per-layer health on this step
        for micro_step in range(grad_accum_steps):
            with autocast_ctx:  # the RMS every step: a few reductions, and one compiled training graph, not two
                loss, act_rms = model(x, y, return_act_rms=True)
            train_loss = loss.detach()
            loss = loss / grad_accum_steps
            loss.backward()
            x, y, epoch = next(train_loader)

        # Progress and schedules
        lrm = get_lr_multiplier(progress)
        muon_momentum = get_muon_momentum(step)
        muon_weight_decay = get_weight_decay(progress)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = muon_momentum
                group["weight_decay"] = muon_weight_decay
        if want_stats:
            health.before_step()
        optimizer.step()
        train_loss_f, layer_metrics = health.fetch(train_loss, act_rms if want_stats else None)  # one transfer
        model.zero_grad(set_to_none=True)
        synchronize()
        dt = time.time() - t0
        if step > TIMING_SKIP_STEPS:
            total_training_time += dt
        else:
            run.timing("warmup_s", dt)

        # Logging
        ema_beta = 0.9
        smooth_train_loss = ema_beta * smooth_train_loss + (1 - ema_beta) * train_loss_f
        debiased_smooth_loss = smooth_train_loss / (1 - ema_beta**(step + 1))
        tok_per_sec = int(TOTAL_BATCH_SIZE / dt)
        mfu = 100 * num_flops_per_token * TOTAL_BATCH_SIZE / dt / peak_flops if peak_flops else None
        run.log(step, elapsed_s=total_training_time, **{
            "train/loss": train_loss_f, "train/loss_smooth": debiased_smooth_loss, "train/lr_multiplier": lrm,
            "train/muon_momentum": muon_momentum, "train/weight_decay": muon_weight_decay,
            "train/progress": min(total_training_time / TIME_BUDGET, 1.0), "perf/step_time_ms": dt * 1000,
            "perf/tokens_per_sec": tok_per_sec, "perf/mfu_percent": mfu, **layer_metrics})
        run.check_divergence(step, train_loss_f)  # fast fail, once the step is on record: NaN or > 100 is 'diverged'
        mfu_text = f"{mfu:.1f}%" if mfu else "n/a"
        progress_line.update(f"step {step:05d} ({100 * progress:.1f}%) | loss: {debiased_smooth_loss:.6f} | "
                             f"lrm: {lrm:.2f} | dt: {dt*1000:.0f}ms | tok/sec: {tok_per_sec:,} | mfu: {mfu_text} | "
                             f"epoch: {epoch} | remaining: {max(0, TIME_BUDGET - total_training_time):.0f}s")

        # GC management (Python's GC causes ~500ms stalls)
        if step == 0:
            gc.collect()
            gc.freeze()
            gc.disable()
        elif (step + 1) % 5000 == 0:
            gc.collect()
        step += 1
        # Time's up, but only stop after the warm-up steps so we don't count compilation
        if step > TIMING_SKIP_STEPS and total_training_time >= TIME_BUDGET:
            break

    progress_line.update(f"step {step:05d} (100.0%) | loss: {debiased_smooth_loss:.6f} | "
                         f"training done in {total_training_time:.1f}s", end="\n")
    val_curve.finish(step, total_training_time)  # the curve's end point

    # Final eval: the fixed metric (under `analyze.py run`: the model handed to the harness, val_bpb None)
    t0 = time.time()
    with autocast_ctx:
        val_bpb = evaluate_bpb(model, tokenizer, device_batch_size)
    run.timing("final_eval_s", time.time() - t0)
    timed_steps = step - TIMING_SKIP_STEPS - 1  # the steps in total_training_time (AR's step - 10 counts one more)
    steady_state_mfu = (100 * num_flops_per_token * TOTAL_BATCH_SIZE * timed_steps / total_training_time / peak_flops
                        if peak_flops and total_training_time > 0 else None)
    peak_vram_mb = torch.cuda.max_memory_allocated() / 1024 / 1024 if gpu_profile else None
    run.finish(val_bpb=val_bpb, training_seconds=total_training_time, total_seconds=time.time() - t_start,
               peak_vram_mb=peak_vram_mb, mfu_percent=steady_state_mfu, total_tokens_M=step * TOTAL_BATCH_SIZE / 1e6,
               num_steps=step, num_params_M=num_params / 1e6, depth=DEPTH)

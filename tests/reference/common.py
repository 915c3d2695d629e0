"""What the recipes, their generators and the tests share: the attention that stands in for FlashAttention-3
(causal softmax attention written out in fp32, in FA3's layout), the perturbation that keeps every gradient away
from zero, the tensor fingerprint the figures are stored as, the CPU kinds the generator emulates, the patching
of AR's source, and the walk that compares two sets of figures."""
import math
import subprocess
import sys

import torch

# Emulated machine kinds: environments in which the generator recomputes AR's figures. Each swaps the
# kernels that round the numbers: ATen's vectorized kernels (ATEN_CPU_CAPABILITY: avx2, or default for
# none), oneDNN's bf16 matmul, which Muon runs on (ONEDNN_MAX_CPU_ISA: AVX512_CORE is an AVX-512 CPU
# without bf16 instructions, AVX2 one without AVX-512), MKL's fp32 matmul (MKL_CBWR=COMPATIBLE: on a
# non-Intel CPU MKL honours no other choice), and how a many-core machine splits reductions over threads.
KINDS = {
    "native": {},
    "avx512-no-bf16": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "MKL_CBWR": "COMPATIBLE"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "no-simd": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_CBWR": "COMPATIBLE"},
    "8-threads": {"OMP_NUM_THREADS": "8", "MKL_NUM_THREADS": "8"},
}

# The weights init_weights sets to zero, and the seeded noise perturb_zero_init puts in them
ZERO_INIT = ("attn.c_proj.weight", "mlp.c_proj.weight", "attn.ve_gate.weight")
PERTURB_SEED = 1234
PERTURB_SCALE = 2**-7      # noise: multiples of PERTURB_SCALE / 1024 in [-PERTURB_SCALE, PERTURB_SCALE]


def explicit_attention(q, k, v, window_size):
    """q (B, T, H, D), k and v (B, T, Hkv, D); window_size (left, 0) as FA3 takes it: query i sees
    keys i-left..i. Returns (B, T, H, D)."""
    left = window_size[0]
    T = q.size(1)
    pos = torch.arange(T, device=q.device)
    dist = pos[:, None] - pos[None, :]  # query position minus key position
    visible = (dist >= 0) & (dist <= left)
    q, k, v = (t.transpose(1, 2).float() for t in (q, k, v))  # (B, H, T, D)
    reps = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(reps, dim=1), v.repeat_interleave(reps, dim=1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    y = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1) @ v
    return y.transpose(1, 2)


def explicit_attention_our_layout(q, k, v, mask):
    """explicit_attention behind train.attention's interface: (B, H, T, D) in and out, mask None (full
    context) or a bool mask whose last row shows the window (query i sees keys i-w..i)."""
    window = q.size(2) if mask is None else int(mask[-1].sum()) - 1
    y = explicit_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), (window, 0))
    return y.transpose(1, 2)


@torch.no_grad()
def perturb_zero_init(model):
    """Seeded noise in the weights init_weights zeroes. With them at zero every block is the identity, so
    the final rms norm makes the loss invariant to a uniform scale of the residual stream: the true
    gradient of resid_lambdas and x0_lambdas is 0, what a CPU computes for it is rounding noise, and
    AdamW's eps of 1e-10 turns that noise into a full step of either sign. Perturbed, every gradient is a
    real one and two machines differ by rounding only. The noise is integers times a power of two: the
    same bits on every CPU."""
    gen = torch.Generator().manual_seed(PERTURB_SEED)
    for name, p in model.named_parameters():
        if name.endswith(ZERO_INIT):
            noise = torch.randint(-1024, 1025, p.shape, generator=gen).to(p.dtype) * (PERTURB_SCALE / 1024)
            p.add_(noise.to(p.device))


def fingerprint(t):
    """Three sums that pin a tensor down: its sum, its absolute sum, and a sum weighted by a fixed uneven
    integer pattern (so a permutation or a transpose changes it too). Each is the exact sum rounded once
    (math.fsum of float64 terms that are themselves exact), so equal tensors give equal fingerprints on
    every CPU: a difference between two fingerprints is one between the tensors, never in the summing."""
    x = t.detach().cpu().double().flatten()
    w = (torch.arange(x.numel()) * 37 % 11 - 5).double()  # -5..5
    return [math.fsum(x.tolist()), math.fsum(x.abs().tolist()), math.fsum((x * w).tolist())]


def is_fingerprint(value):
    return isinstance(value, list) and len(value) == 3 and all(isinstance(x, float) for x in value)


def differences(ours, ref, path=""):
    """(path, relative difference, ours, ref) for every number of two figure trees; the difference is None
    where their shapes or exact values (ints, strings, keys, lengths) differ. A fingerprint differs by
    its worst sum over its absolute sum, a float by the difference over its own size."""
    if isinstance(ref, dict):
        if not isinstance(ours, dict) or sorted(ours) != sorted(ref):
            yield path, None, sorted(ours) if isinstance(ours, dict) else ours, sorted(ref)
            return
        for k in ref:
            yield from differences(ours[k], ref[k], f"{path}/{k}")
    elif is_fingerprint(ref) and is_fingerprint(ours):
        yield path, max(abs(a - b) for a, b in zip(ours, ref)) / (abs(ref[1]) or 1.0), ours, ref
    elif isinstance(ref, list):
        if not isinstance(ours, list) or len(ours) != len(ref):
            yield path, None, ours, ref
            return
        for i, (a, b) in enumerate(zip(ours, ref)):
            yield from differences(a, b, f"{path}[{i}]")
    elif isinstance(ref, float) and isinstance(ours, (int, float)) and not isinstance(ours, bool):
        yield path, abs(ours - ref) / (abs(ref) or 1.0), ours, ref
    elif ours != ref:
        yield path, None, ours, ref


def group_of(path):
    """A figure's tolerance group: its test, and along the steps of training its step too (rounding
    differences grow from step to step): '/models/sl_gqa/forward/grads/x' -> 'forward',
    '/models/sl_gqa/optimizer/steps[2]/params/x' -> 'optimizer_steps[2]', '/loop/training[3]/losses[0]'
    -> 'loop_training[3]', '/loop/num_steps' -> 'loop_num_steps'."""
    parts = path.strip("/").split("/")
    if parts[0] == "models":
        parts = parts[2:]  # the same groups for every model
    if parts[0] in ("optimizer", "loop"):
        step = parts[1].startswith(("steps[", "training["))
        return f"{parts[0]}_{parts[1] if step else parts[1].split('[')[0]}"
    return parts[0].split("[")[0]


def patched(text, patches, where):
    """AR's source with each (old, new) substituted; every old must occur exactly once."""
    for old, new in patches:
        if text.count(old) != 1:
            sys.exit(f"patch target found {text.count(old)} times in {where}, expected once: {old!r}")
        text = text.replace(old, new)
    return text


def ar_commit(ar_dir):
    run = subprocess.run(["git", "-C", str(ar_dir), "rev-parse", "HEAD"], capture_output=True, text=True)
    return run.stdout.strip() or None

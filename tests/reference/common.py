"""What the recipes, their generators and the tests share: the attention that stands in for FlashAttention-3,
the noise that keeps every gradient away from zero, the tensor fingerprint the figures are stored as, the walk
that compares two sets of figures, and the loading of AR's patched source."""
import math
import subprocess
import sys
import types

import torch


def explicit_attention(q, k, v, window_size):
    """Causal softmax attention in fp32, in FA3's layout: q (B, T, H, D), k and v (B, T, Hkv, D);
    window_size (left, 0): query i sees keys i-left..i. Returns (B, T, H, D)."""
    pos = torch.arange(q.size(1), device=q.device)
    dist = pos[:, None] - pos[None, :]  # query position minus key position
    visible = (dist >= 0) & (dist <= window_size[0])
    q, k, v = (t.transpose(1, 2).float() for t in (q, k, v))  # (B, H, T, D)
    reps = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(reps, dim=1), v.repeat_interleave(reps, dim=1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    y = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1) @ v
    return y.transpose(1, 2)


def explicit_attention_our_layout(q, k, v, mask):
    """explicit_attention behind train.attention's interface: (B, H, T, D) in and out, mask None (full
    context) or a bool mask whose last row shows the window."""
    window = q.size(2) if mask is None else int(mask[-1].sum()) - 1
    y = explicit_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), (window, 0))
    return y.transpose(1, 2)


@torch.no_grad()
def perturb_zero_init(model):
    """Seeded noise in the weights init_weights zeroes. With them at zero every block is the identity, so
    the final rms norm makes the loss invariant to a uniform scale of the residual stream: the true
    gradient of resid_lambdas and x0_lambdas is 0, what a CPU computes for it is rounding noise, and
    AdamW's eps of 1e-10 turns that noise into a full step of either sign. Perturbed, two machines differ
    by rounding only. The noise is integers times 2**-17: the same bits on every CPU."""
    gen = torch.Generator().manual_seed(1234)
    for name, p in model.named_parameters():
        if name.endswith(("attn.c_proj.weight", "mlp.c_proj.weight", "attn.ve_gate.weight")):
            noise = torch.randint(-1024, 1025, p.shape, generator=gen).to(p.dtype) * 2**-17
            p.add_(noise.to(p.device))


def fingerprint(t):
    """Its sum, its absolute sum, and a sum weighted by an uneven pattern (so a permutation or a transpose
    changes it too), each the exact sum rounded once (math.fsum), so equal tensors match on every CPU."""
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
    """A figure's tolerance group: its test, and along training its step too (rounding differences grow
    with the steps): '/models/sl_gqa/forward/grads/x' -> 'forward', '/loop/training[3]/x' -> 'loop_training[3]',
    '/models/sl_gqa/optimizer/steps[2]/params/x' -> 'optimizer_steps[2]'."""
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


def load_ar_module(path, patches=()):
    """AR's file, patched, executed in memory as a module of its own."""
    module = types.ModuleType("ar_" + path.stem)
    module.__file__ = str(path)
    exec(compile(patched(path.read_text(), patches, path), str(path), "exec"), vars(module))
    return module


def ar_commit(ar_dir):
    run = subprocess.run(["git", "-C", str(ar_dir), "rev-parse", "HEAD"], capture_output=True, text=True)
    return run.stdout.strip() or None

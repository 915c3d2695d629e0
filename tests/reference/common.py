"""What the reference recipes and the tests share: the attention that stands in for FlashAttention-3
(causal softmax attention written out in fp32, in FA3's layout) and the tensor fingerprint the figures
are stored as."""
import math

import torch


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


def fingerprint(t):
    """Three float64 sums that pin a tensor down: its sum, its absolute sum, and a sum weighted by a
    fixed uneven pattern (so a permutation or a transpose changes it too)."""
    x = t.detach().double().flatten().cpu()
    w = torch.cos(torch.arange(x.numel(), dtype=torch.float64) * 0.37)
    return [x.sum().item(), x.abs().sum().item(), (x * w).sum().item()]

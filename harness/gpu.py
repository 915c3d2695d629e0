"""What the harness knows about GPUs: the dense bf16 peak that MFU is measured against."""

# dense bf16 tensor-core peak by GPU name; checked in order, so specific names come first.
# H100 SXM at karpathy/autoresearch's 989.5e12, so MFU figures compare with his directly
_PEAK_BF16_FLOPS = (
    ("GH200", 989.5e12), ("H200 NVL", 835e12), ("H200", 989.5e12), ("H100 NVL", 835e12), ("H100 PCIE", 756e12),
    ("H100", 989.5e12), ("H800 PCIE", 756e12), ("H800", 989.5e12), ("B200", 2250e12), ("B100", 1750e12),
    ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
)


def peak_bf16_flops(device_name):
    """Dense bf16 peak FLOP/s of a GPU by name, or None when unknown (MFU is then null, never wrong)."""
    name = (device_name or "").upper()
    return next((flops for key, flops in _PEAK_BF16_FLOPS if key in name), None)

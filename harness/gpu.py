"""What the harness knows about GPUs: the dense bf16 peak that MFU is measured against, and whether this
machine can run the gpu profile at all (bf16 tensor cores, a driver new enough for torch's CUDA, Triton).

Why the gpu profile stops instead of falling back. Without bf16 (compute capability below 8.0: V100, T4)
the model would have to run in fp16 with a loss scaler or in fp32: different numerics from
karpathy/autoresearch's baseline and several times slower. Without Triton, torch.compile cannot run and
eager flex attention materialises the full score matrix. Either way the five minutes would measure a
different, slower program that no other run compares with, so the agent would be searching the wrong
landscape. One line saying what to do serves the user better than a run that looks valid and is not.
"""
import importlib.util
import os
import re
import shutil
import subprocess

import torch

# Dense (not 2:4 sparse) bf16 tensor-core peak FLOP/s, from NVIDIA's datasheets and architecture
# whitepapers. Where a datasheet gives only the sparse figure (marked *), it is halved here. bf16 on tensor
# cores always accumulates in fp32, as PyTorch's matmuls do; GeForce cards run fp32 accumulation at half
# the fp16-accumulate rate, so theirs is the whitepapers' "BF16 Tensor TFLOPS with FP32 Accumulate" row.
# Keys are whole normalised names (see _model_key), never substrings: "A10" cannot match "A100",
# "L4" cannot match "L40", "RTX 3080" cannot match "RTX 3080 Ti". A variant not listed gets None.
_PEAK_BF16_FLOPS = {
    "A100": 312e12, "A100 PCIE": 312e12,      # A100 datasheet: 312 TF (SXM and PCIe alike)
    "A800": 312e12, "A800 PCIE": 312e12,      # A800 datasheet: 312 TF
    "A10": 125e12,                            # A10 datasheet: 125 TF
    # AWS's A10G has no NVIDIA datasheet. It is a GA102 with GeForce-style half-rate fp32 accumulation:
    # 80 SMs x 1,710 MHz boost x 512 bf16 flop/SM/clock = 70.0 TF, the 70 TF that AWS partners quote
    "A10G": 70e12,
    "A30": 165e12,                            # A30 datasheet: 165 TF
    "A40": 149.7e12,                          # A40 datasheet: 149.7 TF
    "L4": 121e12,                             # L4 datasheet: 242 TF*
    "L40": 181.05e12,                         # L40 datasheet: 181.05 TF
    "L40S": 362.05e12,                        # L40S datasheet: 362.05 TF
    "H100": 989.5e12,                         # H100 datasheet, SXM: 1,979 TF* (karpathy/autoresearch's 989.5)
    "H100 PCIE": 756.5e12,                    # H100 datasheet, PCIe: 1,513 TF*
    "H100 NVL": 835.5e12,                     # H100 datasheet, NVL: 1,671 TF*
    "H800": 989.5e12, "H800 PCIE": 756.5e12,  # H800 datasheet: as H100 SXM and PCIe
    "H200": 989.5e12,                         # H200 datasheet, SXM: 1,979 TF*
    "H200 NVL": 835.5e12,                     # H200 datasheet, NVL: 1,671 TF*
    "GH200": 989.5e12,                        # GH200 datasheet: 1,979 TF*
    "B100": 1750e12,                          # HGX B100 datasheet: 28 PF* for 8 GPUs
    "B200": 2250e12,                          # HGX B200 datasheet: 36 PF* for 8 GPUs
    "GB200": 2500e12,                         # GB200 NVL72 datasheet: 360 PF* for 72 GPUs
    "RTX 3080": 59.5e12,                      # GA102 whitepaper: 59.5 TF (the 12 GB card has 3% more SMs)
    "RTX 3090": 71e12,                        # GA102 whitepaper: 71 TF
    "RTX 3090 TI": 80e12,                     # RTX 3090 Ti spec page: 320 AI TOPS = fp16-accumulate sparse, /4
    "RTX 4080": 97.5e12,                      # Ada whitepaper: 97.5 TF
    "RTX 4090": 165.2e12,                     # Ada whitepaper: 165.2 TF
    "RTX 5080": 112.6e12,                     # RTX Blackwell whitepaper: 112.6 TF
    "RTX 5090": 209.5e12,                     # RTX Blackwell whitepaper: 209.5 TF
    "RTX A4000": 76.7e12,                     # RTX A4000 datasheet: 153.4 TF tensor*
    "RTX A5000": 111.1e12,                    # RTX A5000 datasheet: 222.2 TF tensor*
    "RTX A6000": 154.8e12,                    # RTX A6000 datasheet: 309.7 TF tensor*
    "RTX 5000 ADA GENERATION": 261.1e12,      # RTX 5000 Ada datasheet: 1,044.4 TF fp8*, /4
    "RTX 6000 ADA GENERATION": 364.25e12,     # RTX 6000 Ada datasheet: 1,457 TF fp8*, /4
    "RTX PRO 6000 BLACKWELL WORKSTATION EDITION": 503.8e12,  # RTX Blackwell PRO whitepaper: 503.8 TF
}
# Deliberately absent: GB10 / DGX Spark (only an fp4 figure is published), Max-Q and laptop parts, MIG slices.

# Tokens of a device name that do not change the peak: vendor and brand, memory size and type, socket
_NOISE_TOKEN = re.compile(r"NVIDIA|GEFORCE|\d+GB?|HBM\d*E?|SXM\d*")

# Minimum Linux driver for torch's CUDA, from the CUDA Toolkit release notes ("CUDA Toolkit and
# Corresponding Driver Versions"): (full support, floor through minor-version compatibility)
_MIN_DRIVER = {
    (11, 8): ((520, 61, 5), (450, 80, 2)),
    (12, 1): ((530, 30, 2), (525, 60, 13)), (12, 4): ((550, 54, 14), (525, 60, 13)),
    (12, 6): ((560, 28, 3), (525, 60, 13)), (12, 8): ((570, 26), (525, 60, 13)),
    (12, 9): ((575, 51, 3), (525, 60, 13)), (13, 0): ((580, 65, 6), (580, 65, 6)),
}
MIN_CAPABILITY = (8, 0)  # bf16 tensor cores: Ampere (sm_80) and newer


def _model_key(device_name):
    tokens = re.split(r"[\s\-_]+", (device_name or "").upper().strip())
    return " ".join(t for t in tokens if t and not _NOISE_TOKEN.fullmatch(t))


def peak_bf16_flops(device_name):
    """Dense bf16 peak FLOP/s of a GPU by its torch.cuda.get_device_name(), or None when unknown (MFU is
    then null, never wrong). "NVIDIA A100-SXM4-80GB" and "NVIDIA A100 80GB PCIe" both read as A100."""
    return _PEAK_BF16_FLOPS.get(_model_key(device_name))


def _version(text):
    return tuple(int(part) for part in re.findall(r"\d+", text or ""))


def _dotted(version):
    return ".".join(map(str, version))

# ---------------------------------------------------------------------------
# Reasons a machine cannot run the gpu profile: pure functions of facts, one line each, saying what to do
# ---------------------------------------------------------------------------

def min_driver(torch_cuda):
    """The Linux driver torch's CUDA version needs for full support, as text, or None when not in the table."""
    need = _MIN_DRIVER.get(_version(torch_cuda)[:2])
    return _dotted(need[0]) if need else None


def driver_problem(driver, torch_cuda):
    """(blocking, line) for an NVIDIA driver version against the CUDA torch was built with, or None when
    fine or unknowable. Blocking: below even minor-version compatibility, so torch cannot use the GPU."""
    need = _MIN_DRIVER.get(_version(torch_cuda)[:2]) if driver and torch_cuda else None
    if need is None or not _version(driver):  # not a version: unknowable, never "too old"
        return None
    full, floor = need
    if _version(driver) < floor:
        return True, (f"NVIDIA driver {driver} is too old for torch's CUDA {torch_cuda} (needs >= "
                      f"{_dotted(full)}): update the NVIDIA driver")
    if _version(driver) < full:
        return False, (f"NVIDIA driver {driver} is older than CUDA {torch_cuda}'s {_dotted(full)}; it runs "
                       f"through CUDA's minor-version compatibility, updating the driver removes the doubt")
    return None


def no_gpu_problem(torch_version, torch_cuda):
    """The line for a machine where torch sees no CUDA GPU."""
    if torch_cuda is None:  # e.g. Linux aarch64 (GH200, GB200, DGX Spark), where PyPI's torch has no CUDA
        why = f"this torch ({torch_version}) has no CUDA: uv.lock installs torch's CUDA build on Linux x86_64 only"
    else:
        why = "torch sees no CUDA GPU (see nvidia-smi, and CUDA_VISIBLE_DEVICES if set)"
    return (f"{why}: the gpu profile needs an NVIDIA GPU; for a small CPU run use AUTORESEARCH_PROFILE=cpu "
            "(after `AUTORESEARCH_PROFILE=cpu uv run prepare.py`)")


def bf16_problem(gpu_name, capability):
    """The line for a GPU without bf16 tensor cores, or None."""
    if tuple(capability) >= MIN_CAPABILITY:
        return None
    return (f"{gpu_name} (compute capability {capability[0]}.{capability[1]}) has no bf16: the gpu profile "
            "needs an Ampere or newer NVIDIA GPU (sm_80+); use a newer GPU or AUTORESEARCH_PROFILE=cpu")


def compiler_problem(triton_found, c_compiler):
    """The line for a machine where torch.compile cannot build GPU kernels, or None. Triton itself needs a
    C compiler ($CC, gcc or clang) to build each kernel's launcher."""
    if not triton_found:
        return ("Triton is not installed, so torch.compile cannot build GPU kernels: the gpu profile needs "
                "Linux x86_64 with torch's CUDA wheel, which brings Triton (`uv sync --locked`)")
    if not c_compiler:
        return ("no C compiler ($CC, gcc or clang), which Triton needs to build its kernel launchers: "
                "install gcc (e.g. `apt-get install gcc`) or set CC")
    return None

# ---------------------------------------------------------------------------
# Facts about this machine
# ---------------------------------------------------------------------------

def nvidia_driver():
    """The NVIDIA driver version nvidia-smi reports, or None without nvidia-smi or a GPU it can see."""
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = smi.stdout.splitlines() if smi.returncode == 0 else []
    # the version line, not a warning nvidia-smi may print first (e.g. about the infoROM)
    return next((line.strip() for line in lines if re.fullmatch(r"\d+(\.\d+)+", line.strip())), None)


def c_compiler():
    """The C compiler Triton would use, as it looks for one, or None."""
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")


def triton_found():
    return importlib.util.find_spec("triton") is not None


def why_not_runnable():
    """None when this machine can run the gpu profile's train.py, else one line: what is missing and what
    to do. Cheap (nothing is compiled); train.py calls it before building the model."""
    if not torch.cuda.is_available():
        driver = driver_problem(nvidia_driver(), torch.version.cuda)
        return driver[1] if driver and driver[0] else no_gpu_problem(torch.__version__, torch.version.cuda)
    return (bf16_problem(torch.cuda.get_device_name(), torch.cuda.get_device_capability())
            or compiler_problem(triton_found(), c_compiler()))

"""`prepare.py --check` and gpu_problem(), which train.py asks before it builds a model: MFU's peak by real device
names, one line for machines we do not own (torch.cuda patched), and the real command here, which changes nothing."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import prepare

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.quick
def test_mfus_peak_is_found_by_real_device_names_and_never_lent_to_another_gpu():
    assert prepare.peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989.5e12, "karpathy/autoresearch's H100 figure"
    assert prepare.peak_bf16_flops("NVIDIA A100-SXM4-80GB") == prepare.peak_bf16_flops("NVIDIA A100 80GB PCIe") > 0
    # a shorter name never lends its peak to a longer one: "A10" in "A100", "L4" in "L40", a laptop or MIG part
    names = ("NVIDIA A10", "NVIDIA A100-SXM4-40GB", "NVIDIA L4", "NVIDIA L40")
    assert len({prepare.peak_bf16_flops(n) for n in names}) == 4
    for name in ("Tesla T4", "NVIDIA GeForce RTX 4090 Laptop GPU", "NVIDIA A100-SXM4-40GB MIG 3g.20gb", None):
        assert prepare.peak_bf16_flops(name) is None, f"{name!r}: a peak for an unknown GPU makes MFU wrong"


@pytest.mark.quick
@pytest.mark.parametrize("cuda, capability, triton, driver, code, says", [
    (True, (7, 0), True, None, 2, "Tesla V100 (compute capability 7.0) has no bf16: the gpu profile needs an Ampere"),
    (True, (9, 0), False, None, 4, "Triton is not installed"),
    (True, (9, 0), True, None, 4, "no C compiler"),
    (False, None, True, "470.82.01", 3, "driver 470.82.01 is too old for torch's CUDA 12.8 (needs >= 525.60.13)"),
    (False, None, True, "570.133.20", 2, "torch sees no CUDA GPU"),  # a driver new enough: the GPU is what is missing
], ids=["no bf16", "no Triton", "no C compiler", "old driver", "no GPU"])
def test_a_machine_the_gpu_profile_cannot_use_is_told_in_one_line_what_to_do(monkeypatch, tmp_path, cuda, capability,
                                                                               triton, driver, code, says):
    smi = tmp_path / "nvidia-smi"  # the only program on PATH: no gcc, no clang
    smi.write_text(f"#!/bin/sh\necho 'WARNING: infoROM is corrupted at gpu 0000:4E:00.0'\necho {driver}\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    for attr, value in {"is_available": lambda: cuda, "get_device_name": lambda device=None: "Tesla V100",
                        "get_device_capability": lambda device=None: capability,
                        "mem_get_info": lambda device=None: (80 * 2**30, 80 * 2**30)}.items():
        monkeypatch.setattr(torch.cuda, attr, value)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if triton else None) if name == "triton" else find_spec(name, *a))
    problem = prepare.gpu_problem()
    assert problem[0] == code and says in problem[1] and "\n" not in problem[1], problem


def run_check(profile, cache):
    """(exit code, the verdict line, all output) of `prepare.py --check` on the real machine."""
    env = {**os.environ, "AUTORESEARCH_PROFILE": profile, "AUTORESEARCH_CACHE": str(cache)}
    out = subprocess.run([sys.executable, "prepare.py", "--check"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    return out.returncode, out.stdout.strip().splitlines()[-1], out.stdout + out.stderr


def test_check_is_ready_on_the_prepared_cpu_profile_names_what_is_missing_and_writes_nothing(cpu_prepared, tmp_path):
    cache = cpu_prepared[1]
    before = sorted((p, p.stat().st_size, p.stat().st_mtime_ns) for p in cache.rglob("*"))
    code, verdict, out = run_check("cpu", cache)
    assert code == 0 and verdict == "verdict: ready: `AUTORESEARCH_PROFILE=cpu uv run train.py` can start", out
    assert sorted((p, p.stat().st_size, p.stat().st_mtime_ns) for p in cache.rglob("*")) == before, "it wrote"
    code, verdict, out = run_check("cpu", tmp_path)
    assert code == 1 and "`AUTORESEARCH_PROFILE=cpu uv run prepare.py`" in verdict, out
    code, verdict, out = run_check("gpu", tmp_path)  # on a GPU that compiles only the data is missing
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8:
        assert code == 1 and "uv run prepare.py" in verdict and "compute capability" in out, out
    else:
        assert code == 2 and verdict.startswith("verdict: not ready") and "AUTORESEARCH_PROFILE=cpu" in verdict, out
    assert list(tmp_path.iterdir()) == [], "--check wrote into the cache"

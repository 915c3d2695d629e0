"""`prepare.py --check` and what train.py asks before it builds a model: MFU's peak by a real device name,
the one line for machines we do not own (torch.cuda patched), and the real command on this machine, which
must change nothing in the cache."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import prepare  # noqa: E402


@pytest.mark.quick
def test_mfus_peak_is_found_by_real_device_names_and_never_lent_to_another_gpu():
    assert prepare.peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989.5e12, "karpathy/autoresearch's H100 figure"
    assert prepare.peak_bf16_flops("NVIDIA A100-SXM4-80GB") == prepare.peak_bf16_flops("NVIDIA A100 80GB PCIe") > 0
    # a shorter name never lends its peak to a longer one: "A10" in "A100", "L4" in "L40", a laptop or MIG part
    assert len({prepare.peak_bf16_flops(n) for n in ("NVIDIA A10", "NVIDIA A100-SXM4-40GB", "NVIDIA L4",
                                                      "NVIDIA L40")}) == 4
    for name in ("Tesla T4", "NVIDIA GeForce RTX 4090 Laptop GPU", "NVIDIA A100-SXM4-40GB MIG 3g.20gb", None):
        assert prepare.peak_bf16_flops(name) is None, f"{name!r}: a peak for an unknown GPU makes MFU wrong"


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch.cuda reports a GPU of the test's choosing: set(name, capability)."""
    def set_gpu(name, capability):
        for attr, value in {"is_available": lambda: True, "get_device_name": lambda device=None: name,
                            "get_device_capability": lambda device=None: capability,
                            "mem_get_info": lambda device=None: (80 * 2**30, 80 * 2**30)}.items():
            monkeypatch.setattr(torch.cuda, attr, value)
    return set_gpu


@pytest.mark.quick
def test_a_gpu_without_bf16_or_a_compiler_stops_with_one_line_saying_what_to_do(fake_gpu, monkeypatch, tmp_path):
    fake_gpu("Tesla V100-SXM2-16GB", (7, 0))
    code, line = prepare.gpu_problem()
    assert code == 2 and "Tesla V100-SXM2-16GB (compute capability 7.0) has no bf16" in line and "sm_80" in line
    fake_gpu("NVIDIA H100 80GB HBM3", (9, 0))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else find_spec(name, *a))
    assert prepare.gpu_problem()[0] == 4 and prepare.gpu_problem()[1].startswith("Triton is not installed")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no gcc, no clang
    assert prepare.gpu_problem() == (4, prepare.gpu_problem()[1]) and "no C compiler" in prepare.gpu_problem()[1]


@pytest.mark.quick
def test_without_cuda_an_old_driver_is_named_before_the_missing_gpu(monkeypatch, tmp_path):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'WARNING: infoROM is corrupted at gpu 0000:4E:00.0'\necho 470.82.01\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert prepare.gpu_problem() == (3, "NVIDIA driver 470.82.01 is too old for torch's CUDA 12.8 (needs >= "
                                         "525.60.13): update the NVIDIA driver")
    smi.write_text("#!/bin/sh\necho 570.133.20\n")
    code, line = prepare.gpu_problem()
    assert code == 2 and "torch sees no CUDA GPU" in line and "AUTORESEARCH_PROFILE=cpu" in line


# train.py run as a script on a V100 that torch.cuda pretends to be: nothing reaches the device before the
# check. torch.compile, which train.py only wraps functions with at import, is left out to save its imports.
V100_TRAIN = """
import runpy, sys, torch
sys.path.insert(0, {root!r})
torch.cuda.is_available = lambda: True
torch.cuda.get_device_name = lambda device=None: "Tesla V100-SXM2-16GB"
torch.cuda.get_device_capability = lambda device=None: (7, 0)
torch.cuda.mem_get_info = lambda device=None: (16 * 2**30, 16 * 2**30)
torch.compile = lambda fn, **kwargs: fn
sys.argv = [{train!r}]
runpy.run_path({train!r}, run_name="__main__")
"""


def test_train_py_on_a_v100_stops_with_one_line_and_a_crash_summary(tmp_path):
    code = V100_TRAIN.format(root=str(ROOT), train=str(ROOT / "train.py"))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=240,
                         env={**os.environ, "AUTORESEARCH_PROFILE": "gpu"})
    summary = json.loads((tmp_path / "run_summary.json").read_text())
    assert (out.returncode, summary["status"]) == (1, "crash"), out.stderr[-2000:]
    assert "has no bf16" in summary["error"] and "\n" not in summary["error"]
    assert out.stderr.strip() == f"train.py stopped: {summary['error']}" and out.stdout == "", out.stderr[-2000:]


def run_check(profile, cache):
    env = {**os.environ, "AUTORESEARCH_PROFILE": profile, "AUTORESEARCH_CACHE": str(cache)}
    out = subprocess.run([sys.executable, "prepare.py", "--check"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    return out.returncode, out.stdout.strip().splitlines()[-1], out.stdout + out.stderr


def snapshot(root):
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


def test_check_is_ready_on_the_prepared_cpu_profile_and_writes_nothing(cpu_prepared, tmp_path):
    _, cache = cpu_prepared
    before = snapshot(cache)
    code, verdict, out = run_check("cpu", cache)
    assert code == 0 and verdict == "verdict: ready: `AUTORESEARCH_PROFILE=cpu uv run train.py` can start", out
    assert snapshot(cache) == before
    code, verdict, out = run_check("cpu", tmp_path)
    assert code == 1 and "`AUTORESEARCH_PROFILE=cpu uv run prepare.py`" in verdict, out
    assert list(tmp_path.iterdir()) == [], "--check wrote into the cache"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the verdict on a machine without a GPU")
def test_check_of_the_gpu_profile_without_a_gpu_names_the_cpu_profile(tmp_path):
    code, verdict, out = run_check("gpu", tmp_path)
    assert code == 2 and verdict.startswith("verdict: not ready") and "AUTORESEARCH_PROFILE=cpu" in verdict, out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: compiles and runs on the GPU")
def test_on_this_gpu_the_compile_probe_runs_and_only_missing_data_can_stop_it(tmp_path):
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("a GPU without bf16")
    assert prepare.gpu_problem(probe=True) is None
    code, verdict, out = run_check("gpu", tmp_path)
    assert code == 1 and "uv run prepare.py" in verdict and "compute capability" in out, out

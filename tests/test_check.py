"""`prepare.py --check` and harness/gpu.py: the MFU peak of every GPU by its real device name, the verdict on
machines we do not own (built from injected facts), why_not_runnable() against patched torch.cuda, and the
real command on this machine, which must change nothing in the cache."""
import dataclasses
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
from harness import check, gpu  # noqa: E402
from harness.check import Facts  # noqa: E402

# ---------------------------------------------------------------------------
# peak_bf16_flops
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name,tflops", [
    ("NVIDIA H100 80GB HBM3", 989.5), ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H800", 989.5), ("NVIDIA H800 PCIe", 756.5), ("NVIDIA H200", 989.5), ("NVIDIA H200 NVL", 835.5),
    ("NVIDIA GH200 480GB", 989.5), ("NVIDIA GH200 144G HBM3e", 989.5),
    ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100-SXM4-40GB", 312), ("NVIDIA A100 80GB PCIe", 312),
    ("NVIDIA A100-PCIE-40GB", 312), ("NVIDIA A800-SXM4-80GB", 312), ("NVIDIA A800 80GB PCIe", 312),
    ("NVIDIA A10", 125), ("NVIDIA A30", 165), ("NVIDIA A40", 149.7),
    ("NVIDIA L4", 121), ("NVIDIA L40", 181.05), ("NVIDIA L40S", 362.05),
    ("NVIDIA B100", 1750), ("NVIDIA B200", 2250), ("NVIDIA GB200", 2500),
    ("NVIDIA GeForce RTX 3080", 59.5), ("NVIDIA GeForce RTX 3090", 71), ("NVIDIA GeForce RTX 3090 Ti", 80),
    ("NVIDIA GeForce RTX 4080", 97.5), ("NVIDIA GeForce RTX 4090", 165.2),
    ("NVIDIA GeForce RTX 5080", 112.6), ("NVIDIA GeForce RTX 5090", 209.5),
    ("NVIDIA A10G", 70.0),  # its own derived figure, never A10's or A100's
    ("NVIDIA RTX A4000", 76.7), ("NVIDIA RTX A5000", 111.1), ("NVIDIA RTX A6000", 154.8),
    ("NVIDIA RTX 5000 Ada Generation", 261.1), ("NVIDIA RTX 6000 Ada Generation", 364.25),
    ("NVIDIA RTX PRO 6000 Blackwell Workstation Edition", 503.8),
])
def test_peak_bf16_flops_of_real_device_names(name, tflops):
    assert gpu.peak_bf16_flops(name) == pytest.approx(tflops * 1e12), name


@pytest.mark.parametrize("name", [
    "NVIDIA GB10", "NVIDIA H20", "Tesla V100-SXM2-16GB", "Tesla T4", "NVIDIA GeForce GTX 1080",
    "Quadro RTX 6000",                              # Turing: not "RTX 6000 Ada", not "RTX A6000"
    "NVIDIA GeForce RTX 3080 Ti", "NVIDIA GeForce RTX 4090 D", "NVIDIA GeForce RTX 4080 SUPER",
    "NVIDIA GeForce RTX 4090 Laptop GPU", "NVIDIA RTX PRO 6000 Blackwell Max-Q Workstation Edition",
    "NVIDIA A100-SXM4-40GB MIG 3g.20gb",            # a slice of the GPU has a slice of its peak
    "", None,
])
def test_unknown_gpus_and_variants_have_no_peak(name):
    assert gpu.peak_bf16_flops(name) is None, name


@pytest.mark.parametrize("suffix", ["Ti", "SUPER", "D", "S", "G", "Laptop GPU", "Max-Q", "MIG 1g.10gb", "NVL"])
def test_no_listed_gpu_lends_its_peak_to_a_longer_name(suffix):
    """Every key plus a variant suffix resolves to that variant's own entry or to None, never to the shorter
    key: the substring traps ("A10" in "A100", "L4" in "L40", "RTX 3080" in "RTX 3080 Ti") cannot happen."""
    for key, flops in gpu._PEAK_BF16_FLOPS.items():
        longer = f"{key} {suffix}"
        own = gpu._PEAK_BF16_FLOPS.get(" ".join(longer.upper().split()))
        assert gpu.peak_bf16_flops(f"NVIDIA {longer}") == own, f"{longer!r} resolved to {key!r}'s {flops:g}"

# ---------------------------------------------------------------------------
# The verdict, from injected facts
# ---------------------------------------------------------------------------

H100 = Facts(profile="gpu", torch_version="2.9.1+cu128", torch_cuda="12.8", driver="570.133.20",
             gpu="NVIDIA H100 80GB HBM3", capability=(9, 0), total_mib=81559.0, free_mib=80900.0, triton=True,
             c_compiler="/usr/bin/gcc", compiled=True, train_shards=10, tokenizer=True, cache="/cache")
NO_GPU = dataclasses.replace(H100, driver=None, gpu=None, capability=(0, 0), total_mib=0.0, free_mib=0.0,
                             compiled=None)


def judged(facts, **changes):
    facts = dataclasses.replace(facts, **changes)
    code, verdict = check.verdict(facts)
    return code, verdict, "\n".join(check.findings(facts))


def test_an_h100_with_data_is_ready_at_the_baselines_batch():
    code, verdict, lines = judged(H100)
    assert code == 0 and verdict == "verdict: ready: `uv run train.py` can start", verdict
    assert "FAIL" not in lines and "warn" not in lines, lines
    assert "dense bf16 peak 989.5 TFLOP/s" in lines and "compute capability 9.0" in lines


def test_an_rtx_4090_runs_with_a_batch_fitted_by_gradient_accumulation():
    code, verdict, lines = judged(H100, gpu="NVIDIA GeForce RTX 4090", capability=(8, 9), total_mib=24080.0,
                                  free_mib=23500.0)
    assert code == 0 and "fitting about 32 rows a micro-step by gradient accumulation" in verdict, verdict
    memory = next(line for line in lines.splitlines() if "memory" in line)
    assert memory.startswith("warn") and "about 32 rows (4x the micro-steps, same TOTAL_BATCH_SIZE)" in memory, memory


def test_the_memory_estimate_scales_with_rows():
    assert check.fitting_rows(80 * 1024) == 128
    assert check.fitting_rows(40 * 1024) == 64  # an A100 40GB
    assert check.fitting_rows(check.rows_needed_mib(1)) == 1
    assert check.fitting_rows(check.rows_needed_mib(1) - 1) is None


def test_too_little_free_memory_for_one_row_stops_with_code_5():
    code, verdict, _ = judged(H100, free_mib=900.0)
    assert code == 5 and "0.9 GiB free" in verdict and "nvidia-smi" in verdict, verdict


def test_no_gpu_points_to_the_cpu_profile():
    code, verdict, lines = judged(NO_GPU)
    assert code == 2 and "AUTORESEARCH_PROFILE=cpu" in verdict, verdict
    assert "FAIL  gpu" in lines
    code, verdict, _ = judged(NO_GPU, torch_version="2.9.1+cpu", torch_cuda=None)
    assert code == 2 and "this torch (2.9.1+cpu) has no CUDA" in verdict and "AUTORESEARCH_PROFILE=cpu" in verdict, verdict


def test_a_v100_has_no_bf16_and_stops_with_code_2():
    code, verdict, lines = judged(H100, gpu="Tesla V100-SXM2-16GB", capability=(7, 0), compiled=None)
    assert code == 2, verdict
    assert "Tesla V100-SXM2-16GB (compute capability 7.0) has no bf16" in verdict and "sm_80" in verdict
    assert "AUTORESEARCH_PROFILE=cpu" in verdict and "FAIL  bf16" in lines


def test_an_old_driver_is_named_rather_than_the_missing_gpu():
    code, verdict, lines = judged(NO_GPU, driver="470.82.01")
    assert code == 3 and "driver 470.82.01 is too old" in verdict and ">= 570.26" in verdict, verdict
    # between 525.60.13 and 570.26: CUDA 12's minor-version compatibility; a warning, not a stop
    code, verdict, lines = judged(H100, driver="535.104.05")
    assert code == 0, verdict
    assert "warn  driver     NVIDIA driver 535.104.05 is older" in lines, lines
    # torch uses the GPU all the same (a forward-compatibility package): a warning, never FAIL beside "ready"
    code, verdict, lines = judged(H100, driver="470.82.01")
    assert code == 0 and "warn  driver     NVIDIA driver 470.82.01 is too old" in lines, lines


def test_no_triton_no_c_compiler_or_a_failed_compile_stop_with_code_4():
    code, verdict, _ = judged(H100, triton=False, compiled=None)
    assert code == 4 and "Triton is not installed" in verdict, verdict
    code, verdict, _ = judged(H100, c_compiler=None, compiled=None)
    assert code == 4 and "no C compiler" in verdict and "gcc" in verdict, verdict
    code, verdict, lines = judged(H100, compiled=False, compile_error="InvalidCxxCompiler: no working compiler")
    assert code == 4 and "InvalidCxxCompiler: no working compiler" in verdict, verdict
    assert "FAIL  compiler" in lines


def test_a_compile_error_is_reported_by_its_telling_line():
    wrapped = RuntimeError("backend='inductor' raised:\nRuntimeError: Failed to find C compiler. Please specify "
                           "via CC environment variable.\n\nSet TORCHDYNAMO_VERBOSE=1 for the internal stack trace")
    assert check.telling_line(wrapped) == "RuntimeError: Failed to find C compiler. Please specify via CC environment variable."
    assert check.telling_line(MemoryError()) == "MemoryError"


def test_missing_shards_or_tokenizer_say_run_prepare():
    code, verdict, _ = judged(H100, data_error="need at least 1 training shard ...: run `uv run prepare.py`")
    assert code == 1 and verdict.endswith("run `uv run prepare.py`"), verdict
    code, verdict, lines = judged(H100, tokenizer=False)
    assert code == 1 and "no tokenizer in /cache/tokenizer" in verdict, verdict
    assert "FAIL  tokenizer" in lines


def test_the_gpu_comes_before_the_data_in_the_gpu_profile():
    code, verdict, _ = judged(NO_GPU, tokenizer=False)
    assert code == 2, verdict


def test_the_cpu_profile_is_ready_without_a_gpu_and_gpu_findings_are_information():
    code, verdict, lines = judged(NO_GPU, profile="cpu")
    assert code == 0 and "`AUTORESEARCH_PROFILE=cpu uv run train.py` can start" in verdict, verdict
    assert "FAIL" not in lines and "info  gpu" in lines, lines
    code, verdict, lines = judged(H100, profile="cpu", gpu="Tesla V100-SXM2-16GB", capability=(7, 0), compiled=None)
    assert code == 0 and "FAIL" not in lines, lines
    code, verdict, _ = judged(NO_GPU, profile="cpu", tokenizer=False)
    assert code == 1 and "`AUTORESEARCH_PROFILE=cpu uv run prepare.py`" in verdict, verdict

# ---------------------------------------------------------------------------
# why_not_runnable: what train.py asks before building the model
# ---------------------------------------------------------------------------

@pytest.fixture
def fake_gpu(monkeypatch):
    """torch.cuda reports a GPU of the test's choosing: set(name, capability)."""
    def set_gpu(name, capability):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    return set_gpu


def test_why_not_runnable_names_a_gpu_without_bf16(fake_gpu):
    fake_gpu("Tesla V100-SXM2-16GB", (7, 0))
    assert gpu.why_not_runnable() == (
        "Tesla V100-SXM2-16GB (compute capability 7.0) has no bf16: the gpu profile needs an Ampere or newer "
        "NVIDIA GPU (sm_80+); use a newer GPU or AUTORESEARCH_PROFILE=cpu")


needs_triton = pytest.mark.skipif(not gpu.triton_found(), reason="Triton is not installed on this platform")


@needs_triton
@pytest.mark.skipif(not gpu.c_compiler(), reason="no C compiler on this machine")
def test_why_not_runnable_passes_an_h100_with_triton_and_a_c_compiler(fake_gpu):
    fake_gpu("NVIDIA H100 80GB HBM3", (9, 0))
    assert gpu.why_not_runnable() is None


def test_why_not_runnable_names_a_missing_triton(fake_gpu, monkeypatch):
    fake_gpu("NVIDIA H100 80GB HBM3", (9, 0))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else find_spec(name, *a))
    assert gpu.why_not_runnable().startswith("Triton is not installed, so torch.compile cannot build GPU kernels")


@needs_triton
def test_why_not_runnable_names_a_missing_c_compiler(fake_gpu, monkeypatch, tmp_path):
    fake_gpu("NVIDIA H100 80GB HBM3", (9, 0))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH with no gcc and no clang
    assert gpu.why_not_runnable().startswith("no C compiler ($CC, gcc or clang)")


def test_without_cuda_an_old_driver_from_nvidia_smi_is_the_reason(monkeypatch, tmp_path):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 470.82.01\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert gpu.nvidia_driver() == "470.82.01"
    assert gpu.why_not_runnable() == ("NVIDIA driver 470.82.01 is too old for torch's CUDA 12.8 (needs >= 570.26): "
                                      "update the NVIDIA driver")
    smi.write_text("#!/bin/sh\necho 570.133.20\n")
    assert "AUTORESEARCH_PROFILE=cpu" in gpu.why_not_runnable()
    smi.write_text("#!/bin/sh\necho 'WARNING: infoROM is corrupted at gpu 0000:4E:00.0'\necho 470.82.01\n")
    assert gpu.nvidia_driver() == "470.82.01", "a warning line was taken for the version"
    smi.write_text("#!/bin/sh\necho 'No devices were found'\n")
    assert gpu.nvidia_driver() is None and gpu.driver_problem("No devices were found", "12.8") is None

# train.py run as a script on a V100 that torch.cuda pretends to be: nothing reaches the device before the
# check. torch.compile, which train.py only wraps functions with at import, is left out to save 5 s of imports.
V100_TRAIN = """
import runpy, sys, torch
sys.path.insert(0, {root!r})
torch.cuda.is_available = lambda: True
torch.cuda.get_device_name = lambda device=None: "Tesla V100-SXM2-16GB"
torch.cuda.get_device_capability = lambda device=None: (7, 0)
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
    assert summary["error"] == gpu.bf16_problem("Tesla V100-SXM2-16GB", (7, 0))
    assert out.stderr.strip() == f"train.py stopped: {summary['error']}" and out.stdout == "", out.stderr[-2000:]


# ---------------------------------------------------------------------------
# The real command on this machine
# ---------------------------------------------------------------------------

def snapshot(root):
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


def run_check(env):
    return subprocess.run([sys.executable, "prepare.py", "--check"], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)


def test_check_passes_on_the_prepared_cpu_profile_and_writes_nothing(cpu_prepared):
    _, cache = cpu_prepared
    before = snapshot(cache)
    out = run_check({"AUTORESEARCH_PROFILE": "cpu", "AUTORESEARCH_CACHE": str(cache)})
    last = out.stdout.strip().splitlines()[-1]
    assert out.returncode == 0 and last.startswith("verdict: ready"), out.stdout + out.stderr
    assert snapshot(cache) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the verdict on a machine without a GPU")
def test_check_of_the_gpu_profile_without_a_gpu_names_the_cpu_profile(tmp_path):
    out = run_check({"AUTORESEARCH_PROFILE": "gpu", "AUTORESEARCH_CACHE": str(tmp_path)})
    last = out.stdout.strip().splitlines()[-1]
    assert out.returncode == 2 and last.startswith("verdict: not ready") and "AUTORESEARCH_PROFILE=cpu" in last, \
        out.stdout + out.stderr
    assert list(tmp_path.iterdir()) == [], "--check wrote into the cache"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: compiles and runs on the GPU")
def test_on_this_gpu_the_facts_are_real_and_the_compile_probe_runs():
    facts = check.gather()
    assert facts.gpu == torch.cuda.get_device_name() and 0 < facts.free_mib <= facts.total_mib
    if not gpu.bf16_problem(facts.gpu, facts.capability) and facts.profile == "gpu":
        assert facts.compiled is True, facts.compile_error
        assert gpu.why_not_runnable() is None

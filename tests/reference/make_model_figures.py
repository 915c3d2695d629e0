r"""Obtain the model, optimizer, schedule and training-loop figures from karpathy/autoresearch's own code,
and measure how far rounding on other kinds of CPU moves each of them.

Usage (from the repository root, with an AR checkout outside this repository; about 5 minutes on 2 cores):
    git clone https://github.com/karpathy/autoresearch /tmp/ar
    uv run python -m tests.reference.make_model_figures /tmp/ar     # rewrites tests/reference/model_figures.json
Then check the figures under a kind they were not made with, e.g.
    ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=COMPATIBLE ONEDNN_MAX_CPU_ISA=AVX512_CORE OMP_NUM_THREADS=3 \
        uv run pytest -m reference

Under each emulated CPU kind (KINDS), in fresh processes, it runs recipe.py on AR's definitions (load_ar)
and loop.py on AR's whole train.py (ar_loop_source), read from the checkout and executed in memory. The native
kind's figures are stored; each group of figures (common.group_of) gets TOLERANCE_MULTIPLE times the largest
spread another kind showed in it, so a group no kind moved must match exactly. Spreads grow along the steps:
Muon orthogonalizes in bf16, where one rounding that flips cascades.
"""
import argparse
import ast
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from tests.reference import recipe
from tests.reference.common import ar_commit, differences, explicit_attention, group_of, load_ar_module, patched

ROOT = Path(__file__).resolve().parent.parent.parent
FIGURES = Path(__file__).resolve().parent / "model_figures.json"
TOLERANCE_MULTIPLE = 10  # a group's tolerance: this times the largest spread any emulated kind showed in it
# Emulated CPU kinds, each swapping the kernels that round the numbers: ATen's vectorized kernels
# (ATEN_CPU_CAPABILITY), oneDNN's bf16 matmul, which Muon runs on (AVX512_CORE: AVX-512 without bf16),
# MKL's fp32 matmul (on a non-Intel CPU MKL honours only MKL_CBWR=COMPATIBLE), and threads splitting reductions.
KINDS = {
    "native": {},
    "avx512-no-bf16": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "MKL_CBWR": "COMPATIBLE"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "no-simd": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_CBWR": "COMPATIBLE"},
    "8-threads": {"OMP_NUM_THREADS": "8", "MKL_NUM_THREADS": "8"},
}

# AR's train.py up to its set-up, on a CPU in fp32; each must apply exactly once
PATCHES = [
    ("y = fa3.flash_attn_func(q, k, v, causal=True, window_size=window_size)",   # FA3 is Hopper-only
     "y = explicit_attention(q, k, v, window_size)"),
    ("@torch.compile(dynamic=False, fullgraph=True)\ndef adamw_step_fused", "def adamw_step_fused"),
    ("@torch.compile(dynamic=False, fullgraph=True)\ndef muon_step_fused", "def muon_step_fused"),
    # with no autocast on the CPU a bf16 embedding would feed fp32 layers (on the GPU both cast them)
    ("        self.transformer.wte.to(dtype=torch.bfloat16)\n"
     "        for ve in self.value_embeds.values():\n"
     "            ve.to(dtype=torch.bfloat16)\n", "        pass\n"),
    ("from kernels import get_kernel\ncap = torch.cuda.get_device_capability()\n"
     "# varunneal's FA3 is Hopper only, use kernels-community on non-Hopper GPUs\n"
     'repo = "varunneal/flash-attention-3" if cap == (9, 0) else "kernels-community/flash-attn3"\n'
     "fa3 = get_kernel(repo).flash_attn_interface\n", ""),
]
# ...and for its set-up and loop (loop.py stubs torch.cuda.synchronize and max_memory_allocated)
LOOP_PATCHES = [
    ("t_start = time.time()\n",
     "globals().update(LOOP_HYPERPARAMETERS)  # the cpu profile's sizes\nt_start = time.time()\n"),
    ('device = torch.device("cuda")', 'device = torch.device("cpu")'),
    ('autocast_ctx = torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16)', "autocast_ctx = nullcontext()"),
    ("model = torch.compile(model, dynamic=False)\n", ""),
]
FUNCTIONS = ["build_model_config", "get_lr_multiplier", "get_muon_momentum", "get_weight_decay"]
AR_PREPARE_CONSTANTS = ["MAX_SEQ_LEN", "TIME_BUDGET", "EVAL_TOKENS", "VOCAB_SIZE"]


def ar_loop_source(train_py):
    """AR's whole train.py, patched to train on a CPU with the cpu profile's sizes (loop.py runs it)."""
    return patched(Path(train_py).read_text(), PATCHES + LOOP_PATCHES, train_py)


def load_ar(ar_dir):
    """AR's definitions as a namespace: its train.py up to the set-up section (model, optimizer,
    hyperparameters), patched, and the FUNCTIONS, importing from AR's own prepare.py."""
    train_py = Path(ar_dir) / "train.py"
    src = train_py.read_text()
    header = patched(src[:src.index("# Setup: tokenizer, model, optimizer, dataloader")], PATCHES, train_py)
    functions = [ast.get_source_segment(src, node) for node in ast.parse(src).body
                 if isinstance(node, ast.FunctionDef) and node.name in FUNCTIONS]
    if len(functions) != len(FUNCTIONS):
        sys.exit(f"expected the functions {FUNCTIONS} at the top level of {train_py}")
    sys.modules["prepare"] = load_ar_module(Path(ar_dir) / "prepare.py")
    g = {"__name__": "ar_train", "explicit_attention": explicit_attention}
    source = header + "\n\n" + "\n\n".join(functions) + "\n"
    exec(compile(source, "autoresearch/train.py (patched)", "exec"), g)
    return g


def figures_under(kind, ar_dir, scratch):
    """The recipe's and the loop's figures from AR's code, each computed in a fresh process of this kind:
    in our environment less every variable any kind sets, plus this kind's own."""
    kind_vars = {var for env in KINDS.values() for var in env}
    env = {**{k: v for k, v in os.environ.items() if k not in kind_vars}, **KINDS[kind], "PYTHONPATH": str(ROOT)}
    recipe_out, loop_out = scratch / f"{kind}-recipe.json", scratch / f"{kind}-loop.json"
    for args in (["tests.reference.make_model_figures", ar_dir, "--recipe-only", "--out", str(recipe_out)],
                 ["tests.reference.loop", "ar", ar_dir, str(loop_out)]):
        t0 = time.time()
        subprocess.run([sys.executable, "-m", *args], env=env, cwd=scratch, check=True, stdout=subprocess.DEVNULL)
        print(f"{kind}: {args[0]} in {time.time() - t0:.0f}s", file=sys.stderr)
    return {**json.loads(recipe_out.read_text()), "loop": json.loads(loop_out.read_text())}


def spreads(native, others):
    """{group: {kind: largest relative difference from the native figures}}; exits on a difference in
    shape or in an exact value (an int, a string, a key): those must not depend on the CPU."""
    out = {}
    for kind, figures in others.items():
        for path, diff, _, _ in differences(figures, native):
            if diff is None:
                sys.exit(f"{kind}: {path} differs from the native figures in an exact value")
            by_kind = out.setdefault(group_of(path), {})
            by_kind[kind] = max(by_kind.get(kind, 0.0), diff)
    return out


def cpu_description():
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in info.splitlines()[:30] if ":" in line)}
    flags = set(fields.get("flags", "").split())
    return {"model": fields.get("model name", platform.processor()), "vendor": fields.get("vendor_id"),
            "family_model": f"{fields.get('cpu family')}/{fields.get('model')}", "cores": os.cpu_count(),
            "torch_capability": torch.backends.cpu.get_cpu_capability(),
            "isa_flags": [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "amx_bf16") if f in flags]}


def holds_containers(value):
    return isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value))


def to_json(value, indent=0):
    """JSON with one key per line, but a short flat dict, and a list of numbers or of lists of numbers
    (a fingerprint, a step's lr multipliers), on one line: small, and readable in a diff."""
    flat = json.dumps(value)
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    if not any(map(holds_containers, children)) and (not isinstance(value, dict) or len(flat) <= 100):
        return flat
    pad = " " * (indent + 1)
    if isinstance(value, list):
        return "[\n" + ",\n".join(pad + to_json(v, indent + 1) for v in value) + "\n" + " " * indent + "]"
    body = ",\n".join(f"{pad}{json.dumps(k)}: {to_json(v, indent + 1)}" for k, v in value.items())
    return "{\n" + body + "\n" + " " * indent + "}"


def first_line(text):
    return text.strip().splitlines()[0] if text.strip() else "(removed)"


def main(ar_dir, out):
    with tempfile.TemporaryDirectory() as tmp:
        by_kind = {kind: figures_under(kind, ar_dir, Path(tmp)) for kind in KINDS}
    native = by_kind.pop("native")
    spread = spreads(native, by_kind)
    meta = {"autoresearch_commit": ar_commit(ar_dir), "torch": torch.__version__,
            "python": platform.python_version(), "cpu": cpu_description(),
            "command": "uv run python -m tests.reference.make_model_figures /path/to/autoresearch",
            "patches": [f"{first_line(old)} -> {first_line(new)}" for old, new in PATCHES + LOOP_PATCHES],
            "kinds": KINDS, "tolerance_multiple": TOLERANCE_MULTIPLE,
            "spreads": {group: {kind: float(f"{x:.3g}") for kind, x in by.items()} for group, by in spread.items()},
            "tolerances": {group: TOLERANCE_MULTIPLE * max(by.values()) for group, by in spread.items()}}
    ar_prepare = load_ar_module(Path(ar_dir) / "prepare.py")  # the constants the gpu profile must keep
    figures = {"meta": meta, **native, "ar_prepare": {k: getattr(ar_prepare, k) for k in AR_PREPARE_CONSTANTS}}
    Path(out).write_text(to_json(figures) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("ar_dir", help="a checkout of karpathy/autoresearch")
    parser.add_argument("--out", default=str(FIGURES), help="where to write the figures")
    parser.add_argument("--recipe-only", action="store_true", help="only the recipe's figures, this process's kind")
    args = parser.parse_args()
    if args.recipe_only:
        Path(args.out).write_text(json.dumps(recipe.all_figures(load_ar(args.ar_dir))) + "\n")
    else:
        main(args.ar_dir, args.out)

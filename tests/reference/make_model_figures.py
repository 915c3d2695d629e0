"""Obtain the model, optimizer and schedule figures from karpathy/autoresearch's own train.py.

Usage (from the repository root, with an AR checkout outside this repository):
    uv run python -m tests.reference.make_model_figures /path/to/autoresearch tests/reference/model_figures.json

AR's train.py is read from that checkout and executed in memory: its model, optimizer and
hyperparameter blocks (everything between its `from prepare import` line and its set-up section), plus
its build_model_config and schedule functions. Nothing of it is stored here. Three substitutions make it
run in fp32 on a CPU, each checked to apply exactly once (see PATCHES):
  1. FlashAttention-3 (`fa3.flash_attn_func`, Hopper-only) -> common.explicit_attention, the same
     causal softmax over the same (left, 0) window, written out;
  2. the two `@torch.compile` decorators on the optimizer kernels are dropped: the kernels run eagerly;
  3. init_weights' cast of the embeddings to bf16 is dropped: with no autocast on the CPU a bf16
     embedding would feed fp32 layers (on the GPU both AR and we cast them, autocast computes in bf16).
Then tests/reference/recipe.py runs on the result and its figures are printed as JSON.
"""
import ast
import json
import math
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.reference import recipe
from tests.reference.common import explicit_attention

PATCHES = [
    ("y = fa3.flash_attn_func(q, k, v, causal=True, window_size=window_size)",
     "y = explicit_attention(q, k, v, window_size)"),
    ("@torch.compile(dynamic=False, fullgraph=True)\ndef adamw_step_fused", "def adamw_step_fused"),
    ("@torch.compile(dynamic=False, fullgraph=True)\ndef muon_step_fused", "def muon_step_fused"),
    ("        self.transformer.wte.to(dtype=torch.bfloat16)\n"
     "        for ve in self.value_embeds.values():\n"
     "            ve.to(dtype=torch.bfloat16)\n", "        pass\n"),
]
FUNCTIONS = ["build_model_config", "get_lr_multiplier", "get_muon_momentum", "get_weight_decay"]
MAX_SEQ_LEN = 2048  # AR's prepare.py constant, which its train.py imports


def ar_source(train_py):
    """AR's definitions, patched: the model/optimizer/hyperparameter span and the named functions."""
    src = train_py.read_text()
    start = src.index("\n", src.index("from prepare import")) + 1
    end = src.index("# Setup: tokenizer, model, optimizer, dataloader")
    body = src[start:end]
    for old, new in PATCHES:
        if body.count(old) != 1:
            sys.exit(f"patch target found {body.count(old)} times in {train_py}, expected once: {old!r}")
        body = body.replace(old, new)
    tree = ast.parse(src)
    functions = [ast.get_source_segment(src, node) for node in tree.body
                 if isinstance(node, ast.FunctionDef) and node.name in FUNCTIONS]
    if len(functions) != len(FUNCTIONS):
        sys.exit(f"expected the functions {FUNCTIONS} at the top level of {train_py}")
    return body + "\n\n" + "\n\n".join(functions) + "\n"


def load_ar(ar_dir):
    g = {"__name__": "ar_train", "torch": torch, "nn": nn, "F": F, "math": math, "time": time,
         "dataclass": dataclass, "asdict": asdict, "explicit_attention": explicit_attention,
         "MAX_SEQ_LEN": MAX_SEQ_LEN}
    exec(compile(ar_source(Path(ar_dir) / "train.py"), "autoresearch/train.py (patched)", "exec"), g)
    return g


def main(ar_dir, out):
    commit = subprocess.run(["git", "-C", ar_dir, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    g = load_ar(ar_dir)
    figures = recipe.all_figures(g)
    meta = {"autoresearch_commit": commit, "torch": torch.__version__, "python": platform.python_version(),
            "command": "uv run python -m tests.reference.make_model_figures /path/to/autoresearch "
                       "tests/reference/model_figures.json",
            "patches": [new.strip() for _, new in PATCHES]}
    Path(out).write_text(json.dumps({"meta": meta, **figures}, indent=1) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])

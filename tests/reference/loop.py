"""The training loop, run for real on both sides: our train.py's `__main__` block, executed as the script
it is (in the cpu profile, with the gpu profile's untimed warm-up steps), and karpathy/autoresearch's whole
train.py, patched for a CPU (make_model_figures.ar_loop_source) at the cpu profile's sizes. Both get the same
stand-ins (a tokenizer and a loader of bigram-chain rows, FakeClock, a fake metric, explicit attention, seeded
noise in the zero-initialised weights), and LoopFigures reads the same figures off both.

Usage (a fresh process for each run: train.py installs exit handlers and freezes the GC):
    PYTHONPATH=. AUTORESEARCH_PROFILE=cpu python -m tests.reference.loop ours train.py OUT.json
    PYTHONPATH=. python -m tests.reference.loop ar /path/to/autoresearch OUT.json
"""
import ast
import itertools
import json
import math
import sys
import threading
import time
import types
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from tests.reference import recipe
from tests.reference.common import explicit_attention, explicit_attention_our_layout, fingerprint, perturb_zero_init
from tests.reference.make_model_figures import ar_loop_source

LOOP_VOCAB = 512           # the stand-in tokenizer's vocabulary
LOOP_SEQ_LEN = 256         # MAX_SEQ_LEN: 8 rows of 256 tokens, two micro-batches per 2**12-token step
LOOP_TIME_BUDGET = 1.0     # TIME_BUDGET, in stand-in seconds
CLOCK_DT = 0.25            # stand-in seconds per time.time() call: 4 timed steps after the untimed ones
FAKE_BPB = 1.0             # what the stand-in evaluate_bpb returns
SPLITS = ["train", "val", "heldout"]  # each its own rows
# the cpu profile's sizes, which AR's hyperparameter block gets in place of its H100 ones
LOOP_HYPERPARAMETERS = {"ASPECT_RATIO": 32, "HEAD_DIM": 32, "TOTAL_BATCH_SIZE": 2**12, "DEPTH": 4,
                        "DEVICE_BATCH_SIZE": 8}
RECORDED_HYPERPARAMETERS = recipe.HYPERPARAMETERS + ["MAX_SEQ_LEN", "TIME_BUDGET"]


class Tokenizer:
    @classmethod
    def from_directory(cls, tokenizer_dir=None):
        return cls()

    def get_vocab_size(self):
        return LOOP_VOCAB


def make_dataloader(tokenizer, B, T, split, device="cpu", **_):
    """prepare.make_dataloader's interface, (inputs, targets, epoch) forever, on rows of bigram chains:
    each token one of 4 fixed successors of the one before it."""
    successors = torch.randint(LOOP_VOCAB, (LOOP_VOCAB, 4), generator=torch.Generator().manual_seed(0))
    for batch in itertools.count():
        gen = torch.Generator().manual_seed(10 * batch + SPLITS.index(split))
        rows = torch.empty(B, T + 1, dtype=torch.long)
        rows[:, 0] = torch.randint(LOOP_VOCAB, (B,), generator=gen)
        choices = torch.randint(4, (B, T), generator=gen)
        for t in range(T):
            rows[:, t + 1] = successors[rows[:, t], choices[:, t]]
        yield rows[:, :-1].contiguous(), rows[:, 1:].contiguous(), 1


class FakeClock:
    """time.time: CLOCK_DT later at every call from the main thread, so the step count and progress are the
    same on every machine; other threads (the run recorder's watchdog) read it without moving it."""
    now = 1_700_000_000.0  # an integer: now + n * CLOCK_DT is exact, and so is every difference

    def __call__(self):
        if threading.current_thread() is threading.main_thread():
            self.now += CLOCK_DT
        return self.now


class LoopFigures:
    """Per step, each micro-batch's loss, what the loop set in the optimizer and the gradient norm; the number
    of steps; the final parameters; read through hooks, and the model's first forward perturbs its weights.
    `attention` replaces train.py's: ours runs on the one AR's runs in place of FA3, as two kernels' rounding
    would grow over the steps (test_reference_model compares the attention itself)."""

    def __init__(self, attention=None):
        self.losses, self.steps, self.final_params, self.attention = [], [], None, attention
        self.training_calls = set()  # what a training forward returned: one kind is one compiled graph (dynamo)
        self._first_forward = torch.nn.modules.module.register_module_forward_pre_hook(self._on_first_forward)
        register_optimizer_step_pre_hook(self._on_step)

    def _on_first_forward(self, module, args):
        if type(module).__name__ != "GPT":
            return
        self._first_forward.remove()
        perturb_zero_init(module)
        if self.attention:
            namespace = type(module).forward.__globals__  # train.py's, as the script runs
            assert "attention" in namespace, "train.py has no function `attention` to run the loop on"
            namespace["attention"] = self.attention
        module.register_forward_hook(self._on_forward)

    def _on_forward(self, module, args, output):
        loss = output[0] if isinstance(output, tuple) else output
        if loss.ndim == 0:  # a training forward: the mean loss
            self.losses.append(loss.item())
            self.training_calls.add(type(output).__name__)

    def _on_step(self, optimizer, args, kwargs):
        groups = optimizer.param_groups
        grads = [p.grad.double() for group in groups for p in group["params"] if p.grad is not None]
        self.steps.append({
            "losses": self.losses,
            "lr_multiplier": [group["lr"] / group["initial_lr"] for group in groups],
            "muon_momentum": [group["momentum"] for group in groups if group["kind"] == "muon"],
            "muon_weight_decay": [group["weight_decay"] for group in groups if group["kind"] == "muon"],
            "grad_norm": math.sqrt(math.fsum(g.square().sum().item() for g in grads)),
        })
        self.losses = []

    def evaluate_bpb(self, model, tokenizer, batch_size):
        self.final_params = {name: fingerprint(p) for name, p in model.named_parameters()}
        return FAKE_BPB

    def collect(self, namespace):
        schedules = ("lr_multiplier", "muon_momentum", "muon_weight_decay")
        return {"hyperparameters": {k: namespace[k] for k in RECORDED_HYPERPARAMETERS}, "num_steps": len(self.steps),
                "schedules": {k: [step[k] for step in self.steps] for k in schedules},
                "training": [{"losses": step["losses"], "grad_norm": step["grad_norm"]} for step in self.steps],
                "final_params": self.final_params, "training_calls": sorted(self.training_calls)}


def gpu_timing_skip_steps(source):
    """train.py's source with TIMING_SKIP_STEPS set to its gpu-profile value (its own expression evaluated
    with gpu_profile True): AR's loop is the H100's, which leaves torch.compile's warm-up steps untimed."""
    tree = ast.parse(source)
    node = next(n for n in tree.body if isinstance(n, ast.Assign) and len(n.targets) == 1
                and getattr(n.targets[0], "id", None) == "TIMING_SKIP_STEPS")
    value = eval(compile(ast.Expression(node.value), "train.py", "eval"), {"gpu_profile": True})
    lines = source.splitlines(keepends=True)
    lines[node.lineno - 1:node.end_lineno] = [f"TIMING_SKIP_STEPS = {value!r}\n"]
    return "".join(lines)


def run_main(source, filename, prepare, figures, **namespace):
    """A train.py's source executed as `__main__` on the fake clock, with the stand-ins set on its prepare."""
    vars(prepare).update(MAX_SEQ_LEN=LOOP_SEQ_LEN, TIME_BUDGET=LOOP_TIME_BUDGET, Tokenizer=Tokenizer,
                         make_dataloader=make_dataloader, evaluate_bpb=figures.evaluate_bpb,
                         evaluate_bpb_sample=lambda *args, **kwargs: FAKE_BPB)
    namespace["__name__"] = "__main__"
    time.time = FakeClock()
    exec(compile(source, filename, "exec"), namespace)
    return figures.collect(namespace)


def run_ours(train_py):
    """Our train.py as `uv run train.py` runs it (its directory first on sys.path), on the stand-ins."""
    sys.path.insert(0, str(Path(train_py).resolve().parent))
    import prepare  # the real module: the cpu profile's
    source = gpu_timing_skip_steps(Path(train_py).read_text())
    return run_main(source, str(train_py), prepare, LoopFigures(attention=explicit_attention_our_layout),
                    __file__=str(train_py))


def run_ar(ar_dir):
    sys.modules["prepare"] = prepare = types.ModuleType("prepare")
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.max_memory_allocated = lambda *args, **kwargs: 0
    return run_main(ar_loop_source(Path(ar_dir) / "train.py"), "autoresearch/train.py (patched)", prepare,
                    LoopFigures(), LOOP_HYPERPARAMETERS=LOOP_HYPERPARAMETERS, explicit_attention=explicit_attention,
                    nullcontext=nullcontext)


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("ours", "ar"):
        sys.exit(__doc__)
    side, path, out = sys.argv[1:]
    torch.set_num_threads(1)  # figures independent of the core count (and on a busy machine, faster)
    result = run_ours(path) if side == "ours" else run_ar(path)
    Path(out).write_text(json.dumps(result) + "\n")

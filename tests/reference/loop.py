"""The training loop, run for real on both sides: our train.py's `__main__` block, executed as the script
it is, and karpathy/autoresearch's whole train.py (set-up and loop, patched for a CPU by
make_model_figures.ar_loop_source). Both get the same stand-ins for what a CPU test cannot have (stand_ins:
a tokenizer and a loader of bigram-chain rows, FakeClock, a fake metric; explicit attention; seeded noise
in the zero-initialised weights), and LoopFigures reads the same figures off both: per step, the loss of
each micro-batch, what the loop put into the optimizer (each group's lr multiplier, Muon's momentum and
weight decay) and the norm of the gradients it stepped with; the number of steps; the final parameters.
Ours runs in the cpu profile with prepare's real module, the stand-ins set on it, and the gpu profile's
untimed warm-up steps (gpu_timing_skip_steps); AR's runs with a stand-in `prepare` module and AR's
hyperparameters at the cpu profile's sizes (LOOP_HYPERPARAMETERS).

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

    def get_bos_token_id(self):
        return LOOP_VOCAB - 1


def bigram_rows(n_rows, T, seed):
    """(n_rows, T + 1) tokens: each token one of 4 fixed successors of the one before it."""
    successors = torch.randint(LOOP_VOCAB, (LOOP_VOCAB, 4), generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(seed)
    rows = torch.empty(n_rows, T + 1, dtype=torch.long)
    rows[:, 0] = torch.randint(LOOP_VOCAB, (n_rows,), generator=gen)
    choices = torch.randint(4, (n_rows, T), generator=gen)
    for t in range(T):
        rows[:, t + 1] = successors[rows[:, t], choices[:, t]]
    return rows


def make_dataloader(tokenizer, B, T, split, device="cpu", **_):
    """prepare.make_dataloader's interface: (inputs, targets, epoch) forever."""
    for batch in itertools.count():
        rows = bigram_rows(B, T, seed=10 * batch + SPLITS.index(split))
        yield rows[:, :-1].contiguous(), rows[:, 1:].contiguous(), 1


class FakeClock:
    """time.time: CLOCK_DT later at every call from the main thread, so a step (its t0 and t1 consecutive
    calls) lasts CLOCK_DT, and the step count and progress are the same on every machine. Other threads
    (the run recorder's watchdog) read it without moving it."""

    def __init__(self, start=1_700_000_000.0):
        self.now = start  # an integer: start + n * CLOCK_DT is exact, and so is every difference

    def __call__(self):
        if threading.current_thread() is threading.main_thread():
            self.now += CLOCK_DT
        return self.now


class LoopFigures:
    """Reads the figures off a run through hooks that both sides get alike: the first forward of the
    model (a module named GPT) perturbs its zero-initialised weights and hooks its later forwards (the
    losses); a global optimizer pre-step hook sees what the loop set; evaluate_bpb sees the result."""

    def __init__(self, on_model=None):
        self.losses, self.steps, self.final_params, self.on_model = [], [], None, on_model
        self._first_forward = torch.nn.modules.module.register_module_forward_pre_hook(self._on_first_forward)
        register_optimizer_step_pre_hook(self._on_step)

    def _on_first_forward(self, module, args):
        if type(module).__name__ != "GPT":
            return
        self._first_forward.remove()
        perturb_zero_init(module)
        if self.on_model:
            self.on_model(module)
        module.register_forward_hook(self._on_forward)

    def _on_forward(self, module, args, output):
        loss = output[0] if isinstance(output, tuple) else output
        if loss.ndim == 0:  # a training forward: the mean loss
            self.losses.append(loss.item())

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
                "final_params": self.final_params}


def stand_ins(figures):
    """What prepare gives train.py, replaced; the metric returns FAKE_BPB (after fingerprinting the model)."""
    return {"MAX_SEQ_LEN": LOOP_SEQ_LEN, "TIME_BUDGET": LOOP_TIME_BUDGET, "Tokenizer": Tokenizer,
            "make_dataloader": make_dataloader, "evaluate_bpb": figures.evaluate_bpb,
            "evaluate_bpb_sample": lambda *args, **kwargs: FAKE_BPB}


def use_explicit_attention(model):
    """Ours on the attention AR's side runs in place of FA3: here the loop is under test, and rounding
    differences between two attention kernels would grow over the steps like a machine's (the attention
    itself is compared in test_reference_model)."""
    namespace = type(model).forward.__globals__  # train.py's, as the script runs
    assert "attention" in namespace, "train.py has no function `attention` to run the loop on explicit attention"
    namespace["attention"] = explicit_attention_our_layout


def gpu_timing_skip_steps(source):
    """train.py's source with TIMING_SKIP_STEPS set to its gpu-profile value. AR's loop is the
    H100's, which leaves its first steps (torch.compile's warm-up) untimed; the cpu profile, where nothing
    compiles, times them. The assignment's own expression is evaluated with gpu_profile True, so the figures
    still catch a gpu value or a loop condition that departs from AR's by one step."""
    tree = ast.parse(source)
    node = next(n for n in tree.body if isinstance(n, ast.Assign) and len(n.targets) == 1
                and getattr(n.targets[0], "id", None) == "TIMING_SKIP_STEPS")
    value = eval(compile(ast.Expression(node.value), "train.py", "eval"), {"gpu_profile": True})
    lines = source.splitlines(keepends=True)
    lines[node.lineno - 1:node.end_lineno] = [f"TIMING_SKIP_STEPS = {value!r}\n"]
    return "".join(lines)


def run_main(source, filename, figures, **namespace):
    """A train.py's source executed as `__main__` on the fake clock; the figures read off it."""
    namespace["__name__"] = "__main__"
    time.time = FakeClock()
    exec(compile(source, filename, "exec"), namespace)
    return figures.collect(namespace)


def run_ours(train_py):
    """Our train.py as `uv run train.py` runs it (its directory first on sys.path), on the stand-ins."""
    sys.path.insert(0, str(Path(train_py).resolve().parent))
    import prepare  # the real module: the cpu profile's
    figures = LoopFigures(on_model=use_explicit_attention)
    for name, value in stand_ins(figures).items():
        setattr(prepare, name, value)
    source = gpu_timing_skip_steps(Path(train_py).read_text())
    return run_main(source, str(train_py), figures, __file__=str(train_py))


def run_ar(ar_dir):
    """AR's train.py, patched for the CPU (make_model_figures.ar_loop_source), on the stand-ins."""
    figures = LoopFigures()
    sys.modules["prepare"] = prepare = types.ModuleType("prepare")
    vars(prepare).update(stand_ins(figures))
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.max_memory_allocated = lambda *args, **kwargs: 0
    return run_main(ar_loop_source(Path(ar_dir) / "train.py"), "autoresearch/train.py (patched)", figures,
                    LOOP_HYPERPARAMETERS=LOOP_HYPERPARAMETERS, explicit_attention=explicit_attention,
                    nullcontext=nullcontext)


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("ours", "ar"):
        sys.exit(__doc__)
    side, path, out = sys.argv[1:]
    torch.set_num_threads(1)  # figures that do not depend on the machine's core count; and on a busy
                              # machine one thread is faster than two that wait for each other
    result = run_ours(path) if side == "ours" else run_ar(path)
    Path(out).write_text(json.dumps(result) + "\n")

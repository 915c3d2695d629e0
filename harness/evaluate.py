"""
The harness's own measurement of a trained model, its only evaluation under `analyze.py run`: val_bpb on the
pinned validation rows, heldout_bpb on the held-out shard, how far past logits move when later tokens change,
and the machine's speed before and after. harness/loop.py runs it after train.py exits, in a process of its
own, on the model prepare.evaluate_bpb handed off (AUTORESEARCH_HANDOFF), rebuilt from the committed train.py.

Usage (loop.py's command line; main() refuses to run without these flags):
    python -I -B -X pycache_prefix=DIR harness/evaluate.py --handoff model.pt --train-py COPY.py --out eval.json

One defence per threat:
- A module shadowing one the harness imports (an untracked argparse.py at the root): no harness process has
  the repository root ahead of the standard library. Here `python -I` (no script or current directory on
  sys.path, PYTHON* variables ignored), the root appended LAST, and check_sources(); analyze.py moves the root
  to the end before its own imports. train.py's process needs the root first (it imports prepare), so
  loop.py's preflight refuses to start beside any untracked root module.
- Forged bytecode (the repository's __pycache__, or any folder train.py could write): -B -X pycache_prefix=DIR,
  a folder made after train.py ended. Its price: torch's Python files are compiled afresh, ~4 s a run.
- A loss path that lies: the loss is F.cross_entropy in fp32 of the logits model(x) returns, computed here.
- Weights of another model than the code of record: rebuilt from the committed train.py, loaded strictly.
- The metric's settings reassigned by train.py at import (prepare.EVAL_TOKENS = ...): import_train() refuses.
- A model that sees later tokens, or one trained on the validation rows: future_leak() and heldout_bpb,
  which decide.py's caught cases read; a printed number that is not the model's: decide.py names it.

Compilation: on CUDA the model runs EAGER under bf16 autocast, never torch.compile'd here; the kernels
train.py compiles itself (FlexAttention) hit the profile's inductor cache (TORCHINDUCTOR_CACHE_DIR, FX graph
cache on, set by loop.py). The arithmetic, gpu profile (DEPTH 8, n_embd 512, vocab 8192, T 2048, SSSL):
29.4M matmul weights, 58.7 MFLOP a token forward + 13.6 MFLOP of attention = 72 MFLOP per evaluated token;
EVAL_TOKENS 21.0M + HELDOUT_TOKENS 5.2M = 26.2M tokens, 1.9 PFLOP: on an H100 (989 TFLOP/s dense bf16)
4.8 s at 40% MFU compiled, 7.7 s at 25% eager. A cold compile of the forward costs 20-60 s whenever the
model's code changes, as most experiments do, and a warm FX-cache hit still re-traces for seconds: eager
is ~8-10 s a run with the two speed probes (0.2 PFLOP each), compiled 10-15 s warm, 25-65 s cold. (Paper
figures until a GPU run replaces them.) On CPU the model runs eagerly in fp32.

Rows, byte rule and batch size are prepare.evaluate_bpb's (prepare.bits_per_byte is the metric's one
implementation), so an honest model scores what a manual run prints, to float rounding. Writes --out as
JSON (RESULT's keys; speeds in GFLOP/s); exits 0, or 1 with "error" a one-line reason, also on stderr.
"""
import argparse
import contextlib
import importlib.util
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # last: the standard library and site-packages win over anything in the root

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import prepare  # noqa: E402

SPEED_WORKLOADS = {"cpu": (1024, 16, torch.float32), "cuda": (8192, 200, torch.bfloat16)}  # (n, matmuls, dtype): ~0.3 s
HANDOFF_KEYS = ("model_class", "config_class", "config", "state_dict", "batch_size")  # prepare.save_handoff's
ERROR_CHARS = 300           # an error line is cut to this length
FIXED = ("MAX_SEQ_LEN", "EVAL_TOKENS", "HELDOUT_TOKENS", "VOCAB_SIZE")  # prepare's settings train.py may not change


class EvalError(Exception):
    """A measurement that cannot be made, with a one-line reason."""


def one_line(error):
    """An exception as one line: its type, then its message with every run of whitespace a single space."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}"[:ERROR_CHARS] if text else type(error).__name__


def machine_speed(device):
    """GFLOP/s of a fixed matmul workload: the same work every time, so a lower figure means a slower or
    busier machine, not different code."""
    device = torch.device(device)
    n, reps, dtype = SPEED_WORKLOADS[device.type]
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    a @ b  # warm-up: kernel choice, threads, allocation
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9

# ---------------------------------------------------------------------------
# The model: the hand-off rebuilt from the committed train.py

def load_handoff(path):
    """The dict prepare.save_handoff wrote. weights_only: tensors and plain values, never pickled code."""
    try:
        handoff = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # missing, truncated, or not a torch file: all say the same to loop.py
        raise EvalError(f"cannot read the hand-off {path}: {one_line(e)}") from e
    missing = [k for k in HANDOFF_KEYS if k not in handoff] if isinstance(handoff, dict) else list(HANDOFF_KEYS)
    if missing:
        raise EvalError(f"the hand-off {path} lacks {', '.join(missing)}")
    return handoff


def import_train(path):
    """The committed train.py (a copy) imported as module `train`, never as __main__: its definitions run,
    its training does not. An in-process caller's own `train` module is put back afterwards."""
    spec = importlib.util.spec_from_file_location("train", path)
    module = importlib.util.module_from_spec(spec)
    previous, fixed = sys.modules.get("train"), {k: getattr(prepare, k) for k in FIXED}
    sys.modules["train"] = module  # as a plain import does: dataclasses and inspect look the module up there
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:
        raise EvalError(f"cannot import train.py: {one_line(e)}") from e
    finally:
        if previous is not None:
            sys.modules["train"] = previous
    changed = [k for k, v in fixed.items() if getattr(prepare, k) != v]
    if changed:
        raise EvalError(f"train.py changed prepare.{', prepare.'.join(changed)}: the metric's settings are fixed")
    check_sources()
    return module


def check_sources():
    """prepare and harness.* must be the repository's own .py files (a compiled prepare.*.so beside
    prepare.py would win over it in the import system's order)."""
    for name, module in list(sys.modules.items()):
        if name == "prepare" or name == "harness" or name.startswith("harness."):
            want = ROOT / "harness" / "__init__.py" if name == "harness" else ROOT / (name.replace(".", "/") + ".py")
            got = Path(getattr(module, "__file__", None) or "?").resolve()
            if got != want:
                raise EvalError(f"module {name} was imported from {got}, not from {want}: remove {got.name}")


def rebuild_model(train, handoff, device):
    """train.<model_class>(train.<config_class>(**config)) on the meta device, materialised on device,
    init_weights() for the non-persistent buffers (rotary tables), then the handed-off weights, strictly."""
    for name in (handoff["model_class"], handoff["config_class"]):
        if not isinstance(getattr(train, name, None), type):
            raise EvalError(f"cannot rebuild the model: train.py has no class {name}")
    try:
        with torch.device("meta"):
            model = getattr(train, handoff["model_class"])(getattr(train, handoff["config_class"])(**handoff["config"]))
        model.to_empty(device=device)
        if hasattr(model, "init_weights"):
            model.init_weights()
        model.load_state_dict(handoff["state_dict"], strict=True)
    except Exception as e:  # whatever train.py's classes raise is the reason
        raise EvalError(f"cannot rebuild the model: {one_line(e)}") from e
    return model.eval()

# ---------------------------------------------------------------------------
# The measurement

def logits_loss(model, vocab_size):
    """token_nats(x, y) for prepare.bits_per_byte: the cross-entropy, in fp32 and in nats, of the logits
    model(x) returns. The targets never reach the model."""
    def token_nats(x, y):
        logits = model(x)
        if not (torch.is_tensor(logits) and logits.dim() == 3 and logits.shape[:2] == y.shape
                and logits.size(-1) >= vocab_size):
            got = tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
            raise EvalError(f"model(x) must return logits shaped (B, T, >= {vocab_size}) for x of shape "
                            f"{tuple(x.shape)}, got {got}")
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
    return token_nats


def autocast(device):
    """bf16 autocast on CUDA, as train.py evaluates; nothing on CPU (fp32)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16)


@torch.no_grad()
def future_leak(model, tokenizer, device):
    """How far the logits of the first half of one validation row move when every token of its second half
    changes: 0 for a causal model. A model that attends to later tokens predicts the validation text from
    itself, and scores as well on the held-out shard, so the val/held-out gap cannot see it."""
    x = next(prepare.make_dataloader(tokenizer, 1, prepare.MAX_SEQ_LEN, "val", device=device))[0]
    half = x.size(1) // 2
    changed = x.clone()
    changed[:, half:] = (changed[:, half:] + 1) % tokenizer.get_vocab_size()
    with autocast(device):
        a, b = model(x)[:, :half].float(), model(changed)[:, :half].float()
    return float((a - b).abs().max())


def measure(model, tokenizer, batch_size, device):
    """(val_bpb, heldout_bpb): val on prepare.evaluate_bpb's rows (EVAL_TOKENS), heldout on the first
    HELDOUT_TOKENS of the held-out split, both with the loss computed from the logits."""
    token_nats = logits_loss(model, tokenizer.get_vocab_size())
    result = []
    with autocast(device):
        for split, tokens in (("val", prepare.EVAL_TOKENS), ("heldout", prepare.HELDOUT_TOKENS)):
            bpb = prepare.bits_per_byte(token_nats, tokenizer, batch_size, tokens // prepare.MAX_SEQ_LEN, device, split)
            if not math.isfinite(bpb):
                raise EvalError(f"the model's logits are not finite on the {split} rows (bpb {bpb})")
            result.append(bpb)
    return tuple(result)


def evaluate(handoff_path, train_py, device=None, result=None):
    """Measure the handed-off model; fill and return result (RESULT's keys). On an error what was measured so
    far stays in result. device: the profile's (cuda for gpu, cpu for cpu) unless given."""
    result = dict(RESULT) if result is None else result
    device = torch.device(device or ("cuda" if prepare.PROFILE == "gpu" else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvalError("the gpu profile evaluates on CUDA, and torch sees no GPU")
    prepare.shard_paths("heldout")  # a missing shard fails before any work
    result["speed_before"] = machine_speed(device)
    t0 = time.perf_counter()
    handoff = load_handoff(handoff_path)
    model = rebuild_model(import_train(train_py), handoff, device)
    tokenizer = prepare.Tokenizer.from_directory()
    result["future_leak"] = future_leak(model, tokenizer, device)
    result["val_bpb"], result["heldout_bpb"] = measure(model, tokenizer, handoff["batch_size"], device)
    result["eval_s"] = time.perf_counter() - t0
    result["speed_after"] = machine_speed(device)
    return result


RESULT = {"val_bpb": None, "heldout_bpb": None, "eval_s": None, "future_leak": None, "speed_before": None,
          "speed_after": None, "error": None}

# ---------------------------------------------------------------------------
# Main

def isolated():
    """True when run with -I -B -X pycache_prefix=DIR (see the module docstring)."""
    return bool(sys.flags.isolated and sys.flags.dont_write_bytecode and sys.pycache_prefix)


def main(argv=None):
    parser = argparse.ArgumentParser(description="the harness's own measurement of a handed-off model")
    parser.add_argument("--handoff", required=True, help="the model file prepare.evaluate_bpb saved")
    parser.add_argument("--train-py", required=True, help="a copy of the committed train.py")
    parser.add_argument("--out", required=True, help="where to write the JSON result")
    args = parser.parse_args(argv)
    result = dict(RESULT)
    try:
        if not isolated():
            raise EvalError("run as `python -I -B -X pycache_prefix=DIR harness/evaluate.py ...`: "
                            "without these flags files in the repository could change what is measured")
        if torch.cuda.is_available():
            torch.set_float32_matmul_precision("high")  # as train.py sets it
        evaluate(args.handoff, args.train_py, result=result)
    except (EvalError, prepare.PrepareError) as e:
        result["error"] = " ".join(str(e).splitlines())
    except Exception as e:  # a harness bug or the machine (out of memory): the traceback helps, the line decides
        traceback.print_exc()
        result["error"] = f"evaluation failed: {one_line(e)}"
    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.part")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)  # whole or not at all: loop.py never reads half a result
    if result["error"]:
        print(f"evaluate.py: error: {result['error']}", file=sys.stderr)
        return 1
    print(f"val_bpb {result['val_bpb']:.6f} | heldout_bpb {result['heldout_bpb']:.6f} | eval {result['eval_s']:.1f}s | "
          f"machine {result['speed_before']:.0f} -> {result['speed_after']:.0f} GFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

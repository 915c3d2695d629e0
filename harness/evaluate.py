"""
The harness's own measurement of a trained model: val_bpb on the pinned validation rows, heldout_bpb on the
held-out shard, and the machine's speed before and after. `analyze.py run` runs it after train.py exits, in
a process of its own, on the model that prepare.evaluate_bpb handed off (AUTORESEARCH_HANDOFF), rebuilt
from the committed train.py. The number of record is this one, not the one train.py printed.

Usage (the runner's command line; main() refuses to run without these flags):
    python -I -B -X pycache_prefix=DIR harness/evaluate.py --handoff model.pt --train-py COPY.py --out eval.json

Why each isolation measure:
- -I: neither the script's directory nor the current one goes on sys.path, and PYTHON* variables
  (PYTHONPATH, PYTHONSTARTUP, ...) and the user's site-packages are ignored, so nothing around the process
  decides what it imports.
- The repository root is appended at the END of sys.path: the standard library and site-packages come
  first, so an untracked argparse.py (or json.py, torch/) in the root can never shadow them; prepare and
  harness.* are then checked to be the root's own source files (a compiled prepare.*.so beside
  prepare.py would win over it in the import system's order).
- -B -X pycache_prefix=DIR: bytecode is looked for only under DIR, never in the repository's
  __pycache__, so a forged prepare.cpython-*.pyc there is never run.
- The loss is computed here, F.cross_entropy in fp32 of the logits model(x) returns, never through the
  model's own loss path model(x, y): a forward that scales its loss cannot scale the number.
- The model is rebuilt from the committed train.py (a copy the runner made) and the handed-off
  state_dict, strictly: what is measured is the code of record with the weights it trained.

Rows, byte rule and batch size are prepare.evaluate_bpb's (prepare.bits_per_byte is the metric's one
implementation), so for an honest model val_bpb equals train.py's to float rounding. On CUDA the model is
compiled and run under bf16 autocast, as train.py evaluates it; on CPU it runs eagerly in fp32.

Writes --out as JSON: {"val_bpb", "heldout_bpb", "eval_s", "future_leak", "machine_speed": {"before", "after"},
"error"} (machine speed in GFLOP/s; future_leak: see future_leak()); exits 0, or 1 with "error" a one-line reason, also printed to stderr.
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

# ---------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------

# device type -> (matrix size, matmuls, dtype): a fixed workload of ~0.3 s on a laptop CPU or an H100
SPEED_WORKLOADS = {"cpu": (1024, 32, torch.float32), "cuda": (8192, 200, torch.bfloat16)}
HANDOFF_KEYS = ("model_class", "config_class", "config", "state_dict", "batch_size")  # prepare.save_handoff's
ERROR_CHARS = 300           # an error line is cut to this length


class EvalError(Exception):
    """A measurement that cannot be made, with a one-line reason."""


def one_line(error):
    """An exception as one line: its type, then its message with every run of whitespace a single space."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}"[:ERROR_CHARS] if text else type(error).__name__

# ---------------------------------------------------------------------------
# Machine speed
# ---------------------------------------------------------------------------

def machine_speed(device):
    """GFLOP/s of a fixed matmul workload (fp32 on a CPU, bf16 on CUDA). The same work every time, so a
    lower figure means a slower or busier machine, not different code: the runner tells the two apart
    with it."""
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
# ---------------------------------------------------------------------------

def load_handoff(path):
    """The dict prepare.save_handoff wrote. weights_only: tensors and plain values, never pickled code."""
    try:
        handoff = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # missing, truncated, or not a torch file: all say the same to the runner
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
    previous = sys.modules.get("train")
    sys.modules["train"] = module  # as a plain import does: dataclasses and inspect look the module up there
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:
        raise EvalError(f"cannot import train.py: {one_line(e)}") from e
    finally:
        if previous is not None:
            sys.modules["train"] = previous
    check_sources()
    return module


def check_sources():
    """prepare and harness.* must be the repository's own .py files (see the module docstring)."""
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
    return model

# ---------------------------------------------------------------------------
# The measurement
# ---------------------------------------------------------------------------

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


def for_device(model, tokenizer, device):
    """(model to call, context to call it in), as train.py evaluates. CUDA: one eager forward on one row
    first, which builds lazy caches such as attention masks that compiled code only reads, then
    torch.compile under bf16 autocast. CPU: the model itself, fp32, eager."""
    if device.type != "cuda":
        return model, contextlib.nullcontext()
    autocast = torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16)
    row = next(prepare.make_dataloader(tokenizer, 1, prepare.MAX_SEQ_LEN, "val", device=device))[0]
    with torch.no_grad(), autocast:
        model(row)
    return torch.compile(model, dynamic=False), autocast


@torch.no_grad()
def future_leak(model, tokenizer, device):
    """How far the logits of the first half of one validation row move when every token of its second half
    changes: 0 for a causal model. A model that attends to later tokens predicts the validation text from
    itself, and scores as well on the held-out shard, so the val/held-out gap cannot see it."""
    x = next(prepare.make_dataloader(tokenizer, 1, prepare.MAX_SEQ_LEN, "val", device=device))[0]
    half = x.size(1) // 2
    changed = x.clone()
    changed[:, half:] = (changed[:, half:] + 1) % tokenizer.get_vocab_size()
    autocast = (torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    with autocast:
        a, b = model(x)[:, :half].float(), model(changed)[:, :half].float()
    return float((a - b).abs().max())


def measure(model, tokenizer, batch_size, device):
    """(val_bpb, heldout_bpb): val on prepare.evaluate_bpb's rows (EVAL_TOKENS), heldout on the first
    HELDOUT_TOKENS of the held-out split, both with the loss computed from the logits."""
    model, autocast = for_device(model, tokenizer, device)
    token_nats = logits_loss(model, tokenizer.get_vocab_size())
    splits = {"val_bpb": ("val", prepare.EVAL_TOKENS), "heldout_bpb": ("heldout", prepare.HELDOUT_TOKENS)}
    result = {}
    with autocast:
        for key, (split, tokens) in splits.items():
            rows = tokens // prepare.MAX_SEQ_LEN
            result[key] = prepare.bits_per_byte(token_nats, tokenizer, batch_size, rows, device, split)[0]
            if not math.isfinite(result[key]):
                raise EvalError(f"{key} is {result[key]}: the model's logits are not finite on the {split} rows")
    return result["val_bpb"], result["heldout_bpb"]


def empty_result():
    return {"val_bpb": None, "heldout_bpb": None, "eval_s": None, "future_leak": None,
            "machine_speed": {"before": None, "after": None}, "error": None}


def evaluate(handoff_path, train_py, device=None, result=None):
    """Measure the handed-off model; fill and return result (empty_result()'s keys). On an error what was
    measured so far stays in result. device: the profile's (cuda for gpu, cpu for cpu) unless given."""
    result = empty_result() if result is None else result
    device = torch.device(device or ("cuda" if prepare.PROFILE == "gpu" else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvalError("the gpu profile evaluates on CUDA, and torch sees no GPU")
    prepare.shard_paths("heldout")  # a missing shard fails before any work
    result["machine_speed"]["before"] = machine_speed(device)
    t0 = time.perf_counter()
    handoff = load_handoff(handoff_path)
    model = rebuild_model(import_train(train_py), handoff, device)
    tokenizer = prepare.Tokenizer.from_directory()
    result["future_leak"] = future_leak(model, tokenizer, device)  # eager, before compiling
    result["val_bpb"], result["heldout_bpb"] = measure(model, tokenizer, handoff["batch_size"], device)
    result["eval_s"] = time.perf_counter() - t0
    result["machine_speed"]["after"] = machine_speed(device)
    return result

# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def write_json(path, obj):
    """Write whole or not at all: the runner never reads half a result."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def isolated():
    """True when run with -I -B -X pycache_prefix=DIR (see the module docstring)."""
    return bool(sys.flags.isolated and sys.flags.dont_write_bytecode and sys.pycache_prefix)


def main(argv=None):
    parser = argparse.ArgumentParser(description="the harness's own measurement of a handed-off model")
    parser.add_argument("--handoff", required=True, help="the model file prepare.evaluate_bpb saved")
    parser.add_argument("--train-py", required=True, help="a copy of the committed train.py")
    parser.add_argument("--out", required=True, help="where to write the JSON result")
    args = parser.parse_args(argv)
    result = empty_result()
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
    write_json(args.out, result)
    if result["error"]:
        print(f"evaluate.py: error: {result['error']}", file=sys.stderr)
        return 1
    speed = result["machine_speed"]
    print(f"val_bpb {result['val_bpb']:.6f} | heldout_bpb {result['heldout_bpb']:.6f} | eval {result['eval_s']:.1f}s | "
          f"machine {speed['before']:.0f} -> {speed['after']:.0f} GFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

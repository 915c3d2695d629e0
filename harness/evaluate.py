"""
The harness's own measurement of a trained model, its only evaluation under `analyze.py run`: val_bpb on the
pinned validation rows, heldout_bpb on the held-out shard, future_leak (how far logits move when only later
tokens change) and the machine's speed, of the model prepare.evaluate_bpb handed off, rebuilt from the committed
train.py, in train.py's sandbox. Writes --out as JSON (RESULT's keys); exits 0, or 1 with "error".

Usage (loop.py's command line; main() refuses to run without these flags):
    python -I -B harness/evaluate.py --handoff model.pt --train-py COPY.py --out eval.json

train.py's code runs here (torch.export cannot save FlexAttention's BlockMask). Guard refuses a train.py that
changes what the number is computed with (attributes of modules and classes, torch's modes and settings) at its
import, while the model is built or when it runs; a forward that edits objects it reaches through gc escapes it.
-I, the root last on sys.path and import_train's source check keep out planted modules; -B and a pycache_prefix
naming no folder, set once the libraries are imported from the venv's bytecode (which a contained run cannot
write), any bytecode a run left for the repository's code; the loss computed here from the logits, a lying loss;
Probe, a model that reads later tokens; heldout_bpb, one trained on the validation rows.
"""
import argparse
import builtins
import contextlib
import gc
import importlib.util
import json
import math
import os
import sys
import time
import traceback
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # last: the standard library and site-packages win over anything in the root

import numpy as np  # noqa: E402
import torch  # noqa: E402
# before any Guard, so neither is train.py's: importing torch._dynamo rebinds torch.manual_seed, and its first
# compile (train.py's flex kernel on CUDA) patches nn.Module.__init__ and __setstate__ as this call does
from torch._dynamo.mutation_guard import install_generation_tagging_init  # noqa: E402

install_generation_tagging_init()
import torch.nn.functional as F  # noqa: E402
from torch.nn.functional import cross_entropy  # noqa: E402  (the loss, bound before train.py can rebind it)
import torch.nn.attention.flex_attention  # noqa: E402, F401  (train.py's import, from the venv's bytecode too)

sys.pycache_prefix = os.path.join(os.devnull, "no-bytecode")  # a folder that cannot exist: no .pyc read or written
import prepare  # noqa: E402

SPEED_WORKLOADS = {"cpu": (1024, 16, torch.float32), "cuda": (8192, 200, torch.bfloat16)}  # (n, matmuls, dtype): ~0.3 s
ERROR_CHARS = 300           # an error line is cut to this length
PROBE_EVERY = 4             # one probe batch after every this many validation batches
RESULT = dict.fromkeys(("val_bpb", "heldout_bpb", "eval_s", "future_leak", "speed_before", "speed_after", "error"))


class EvalError(Exception):
    """A measurement that cannot be made, with a one-line reason."""


def one_line(error):
    """An exception as one line: its type, then its message with every run of whitespace a single space."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}"[:ERROR_CHARS] if text else type(error).__name__


def machine_speed(device):
    """GFLOP/s of a fixed matmul workload: a lower figure means a slower or busier machine, not different code."""
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


class Guard:
    """The state the number is computed with, taken before train.py is imported: the attributes of namespaces()
    (a function with its code and defaults) and settings(). check(when) refuses with one line naming changes."""

    def __init__(self):
        self.attributes = {name: attributes(ns) for name, ns in namespaces().items()}
        self.settings = settings()

    def check(self, when):
        changed = [k for k, v in settings().items() if v != self.settings[k]]
        for name, ns in namespaces().items():
            before, now = self.attributes.get(name, {}), attributes(ns)
            for k in sorted(before.keys() | now.keys()):
                value = now.get(k, (None,))[0]
                submodule = k not in before and isinstance(value, types.ModuleType) and value.__name__ == f"{name}.{k}"
                if not submodule and [id(v) for v in now.get(k, ())] != [id(v) for v in before.get(k, ())]:
                    changed.append(f"{name}.{k}")  # (a submodule imported since is none: torch imports some lazily)
        if changed:
            names = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
            raise EvalError(f"train.py changes {names} {when}: the harness measures with the library as installed")


def namespaces():
    """The modules and classes the number is computed with, by name; prepare's and this module's classes too."""
    found = {"builtins": builtins, "math": math, "os": os, "numpy": np, "torch": torch, "torch._C": torch._C,
             "torch._C._nn": torch._C._nn, "torch.nn.functional": F, "torch.Tensor": torch.Tensor,
             "torch.nn.Module": torch.nn.Module, "prepare": prepare, "harness.evaluate": sys.modules[__name__]}
    for module in ("prepare", "harness.evaluate"):
        found.update({f"{module}.{k}": v for k, v in list(vars(found[module]).items())
                      if isinstance(v, type) and v.__module__ == found[module].__name__})
    return found


def attributes(namespace):
    return {k: (v, v.__code__, v.__defaults__, v.__kwdefaults__) if isinstance(v, types.FunctionType) else (v,)
            for k, v in list(vars(namespace).items())}


def settings():
    """What changes torch's arithmetic, or runs code in the middle of the harness's, outside any attribute."""
    return {"torch's default dtype": torch.get_default_dtype(),
            "the float32 matmul precision": torch.get_float32_matmul_precision(),
            "torch's function modes": torch._C._len_torch_function_stack(),
            "torch's dispatch modes": torch._C._len_torch_dispatch_stack(),
            "sys.settrace": sys.gettrace(), "sys.setprofile": sys.getprofile(), "gc.callbacks": list(gc.callbacks)}


def import_train(path, guard=None):
    """The committed train.py imported as module `train`, not __main__ (its training does not run), then checked
    (Guard, and prepare and harness.* imported from their sources); an in-process caller's `train` is put back."""
    guard = guard or Guard()
    spec = importlib.util.spec_from_file_location("train", path)
    train = importlib.util.module_from_spec(spec)
    previous = sys.modules.get("train")
    sys.modules["train"] = train  # as a plain import does: dataclasses and inspect look the module up there
    try:
        spec.loader.exec_module(train)
    except (Exception, SystemExit) as e:
        raise EvalError(f"cannot import train.py: {one_line(e)}") from e
    finally:
        if previous is not None:
            sys.modules["train"] = previous
    guard.check("at import")
    for name, module in list(sys.modules.items()):  # the repository's own .py (a prepare.*.so beside it would win)
        if name == "prepare" or name == "harness" or name.startswith("harness."):
            want = ROOT / "harness" / "__init__.py" if name == "harness" else ROOT / (name.replace(".", "/") + ".py")
            got = Path(getattr(module, "__file__", None) or "?").resolve()
            if got != want:
                raise EvalError(f"module {name} was imported from {got}, not from {want}: remove {got.name}")
    return train


def rebuild_model(train, handoff, device):
    """train.<model_class>(<config_class>(**config)) built on meta, materialised on device, init_weights() for the
    non-persistent buffers (rotary tables), then the handed-off weights, strictly."""
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


class Probe:
    """future_leak: the largest change of a logit at a position whose inputs did not change. After every
    PROBE_EVERY-th scoring batch x, a batch of x's rows, half as they are and half with random tokens from a
    random cut on, shuffled: a causal model moves no logit before a cut (0 up to rounding); one that reads later
    tokens, or behaves otherwise in a batch holding probes, does. Cuts and tokens are fresh each run."""

    def __init__(self, model, vocab_size, every=PROBE_EVERY):
        self.model, self.vocab_size, self.every, self.batches, self.leak = model, vocab_size, every, 0, 0.0
        self.gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)

    def __call__(self, x, logits):
        self.batches += 1
        if self.batches % self.every:
            return
        (B, T), gen, device = x.shape, self.gen, x.device
        probe = torch.randperm(B, generator=gen) >= B // 2  # a random half of the rows; the rest are kept as they are
        cut = torch.where(probe, torch.randint(1, T, (B,), generator=gen), T)[:, None]
        changed = (torch.arange(T)[None, :] >= cut).to(device)  # (B, T)
        order = torch.randperm(B, generator=gen).to(device)
        noise = torch.randint(0, self.vocab_size, (B, T), generator=gen).to(device)
        moved = torch.empty_like(logits, dtype=torch.float32)
        moved[order] = self.model(torch.where(changed, noise, x)[order]).float()  # shuffled, then back in x's order
        diff = (moved - logits.float()).abs().amax(-1).masked_fill(changed, 0.0)
        self.leak = max(self.leak, float(diff.max()))


def logits_loss(model, vocab_size, probe=None, guard=None):
    """token_nats(x, y) for prepare.bits_per_byte: fp32 cross-entropy in nats of the logits model(x) returns (the
    targets never reach the model); probe(x, logits) after each batch, guard checked after each model call."""
    def token_nats(x, y):
        logits = model(x)
        if not (torch.is_tensor(logits) and logits.dim() == 3 and logits.shape[:2] == y.shape
                and logits.size(-1) >= vocab_size):
            got = tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
            raise EvalError(f"model(x) must return logits shaped (B, T, >= {vocab_size}) for x of shape "
                            f"{tuple(x.shape)}, got {got}")
        if probe is not None:
            probe(x, logits)
        if guard is not None:
            guard.check("when its model runs")
        return cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
    return token_nats


def evaluate(handoff_path, train_py, device=None, result=None):
    """The handed-off model measured into result (RESULT's keys; an error while scoring leaves them None): val_bpb on
    evaluate_bpb's rows with probe batches mixed in, heldout_bpb on HELDOUT_TOKENS; on CUDA under bf16 autocast."""
    result = dict(RESULT) if result is None else result
    device = torch.device(device or ("cuda" if prepare.PROFILE == "gpu" else "cpu"))  # train.py trained on it
    prepare.shard_paths("heldout")  # a missing shard fails before any work
    result["speed_before"] = machine_speed(device)
    t0 = time.perf_counter()
    try:  # weights_only: the dict prepare.save_handoff wrote, tensors and plain values, never pickled code
        handoff = torch.load(handoff_path, map_location="cpu", weights_only=True)
    except Exception as e:  # missing, truncated, or not a torch file: all say the same to loop.py
        raise EvalError(f"cannot read the hand-off {handoff_path}: {one_line(e)}") from e
    guard = Guard()
    model = rebuild_model(import_train(train_py, guard), handoff, device)
    guard.check("when its model is built")
    tokenizer = prepare.Tokenizer.from_directory()
    probe, scores = Probe(model, tokenizer.get_vocab_size()), {}
    autocast = torch.amp.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        for split, tokens in (("val", prepare.EVAL_TOKENS), ("heldout", prepare.HELDOUT_TOKENS)):
            token_nats = logits_loss(model, tokenizer.get_vocab_size(), probe if split == "val" else None, guard)
            bpb = prepare.bits_per_byte(token_nats, tokenizer, handoff["batch_size"], tokens // prepare.MAX_SEQ_LEN,
                                        device, split)
            if not math.isfinite(bpb):
                raise EvalError(f"the model's logits are not finite on the {split} rows (bpb {bpb})")
            scores[f"{split}_bpb"] = bpb
    result.update(scores, future_leak=probe.leak, eval_s=time.perf_counter() - t0)
    result["speed_after"] = machine_speed(device)  # a failure here keeps the scores
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description="the harness's own measurement of a handed-off model")
    parser.add_argument("--handoff", required=True, help="the model file prepare.evaluate_bpb saved")
    parser.add_argument("--train-py", required=True, help="a copy of the committed train.py")
    parser.add_argument("--out", required=True, help="where to write the JSON result")
    args = parser.parse_args(argv)
    result = dict(RESULT)
    try:
        if not (sys.flags.isolated and sys.flags.dont_write_bytecode):
            raise EvalError("run as `python -I -B harness/evaluate.py ...`: "
                            "without these flags files in the repository could change what is measured")
        if torch.cuda.is_available():
            torch.set_float32_matmul_precision("high")  # as train.py sets it
        evaluate(args.handoff, args.train_py, result=result)
    except (EvalError, prepare.PrepareError) as e:
        result["error"] = " ".join(str(e).splitlines())
    except Exception as e:  # a harness bug or the machine (out of memory): the traceback helps, the line decides
        traceback.print_exc()
        result["error"] = f"evaluation failed: {one_line(e)}"
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")  # half of it (killed) is no JSON to loop.py
    if result["error"]:
        print(f"evaluate.py: error: {result['error']}", file=sys.stderr)
    return 1 if result["error"] else 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no thread of train.py's import-time code outlives the result it could rewrite

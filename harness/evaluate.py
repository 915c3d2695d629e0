"""
The harness's own and only measurement of a model under `analyze.py run`, of the graph prepare.evaluate_bpb handed
off: val_bpb on the pinned validation rows, heldout_bpb on the held-out shard, future_leak (how far logits move when
only later tokens change) and the machine's speed. Writes --out as JSON (RESULT's keys); exits 0, or 1 with "error".

Usage (loop.py's command line; main() refuses to run without -I -B):
    python -I -B harness/evaluate.py --handoff model.pt --out eval.json

One defence per threat. train.py's code never runs here: the hand-off is a graph of aten operators plus weights
(torch.export in train.py's process), which load_graph refuses to deserialize if it holds anything else, and the
loss is computed here from its logits. Planted modules and bytecode: -I keeps the root off sys.path, prepare.py is
loaded by its path, and a pycache_prefix naming no folder (set once torch is imported from the venv's bytecode,
which a contained run cannot write) reads no .pyc. A graph that reads later tokens: Probe. One trained on the
validation rows: heldout_bpb.
"""
import argparse
import importlib.util
import json
import math
import os
import re
import sys
import time
import traceback
from operator import getitem
from pathlib import Path

import torch
import torch.nn.attention.flex_attention  # noqa: F401  (prepare.py's import, from the venv's bytecode too)

sys.pycache_prefix = os.path.join(os.devnull, "no-bytecode")  # a folder that cannot exist: no .pyc read or written
if "prepare" not in sys.modules:  # (a test imports this module beside its own prepare)
    # prepare.py by its path, never searched for: a prepare/ package or prepare.*.so planted beside it would win
    _spec = importlib.util.spec_from_file_location("prepare", Path(__file__).resolve().parent.parent / "prepare.py")
    sys.modules["prepare"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["prepare"])
prepare = sys.modules["prepare"]

SPEED_WORKLOADS = {"cpu": (1024, 16, torch.float32), "cuda": (8192, 200, torch.bfloat16)}  # (n, matmuls, dtype): ~0.3 s
OK_TARGET = re.compile(r"torch\.ops\.aten\.\w+\.\w+|_operator\.getitem")  # what a hand-off's graph may call
ERROR_CHARS = 300           # an error line is cut to this length
PROBE_EVERY = 4             # one probe batch after every this many validation batches
RESULT = dict.fromkeys(("val_bpb", "heldout_bpb", "future_leak", "speed_before", "speed_after", "error"))


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
    (a @ b)[0, 0].item()  # warm-up (kernel choice, threads, allocation); .item() waits for the device
    t0 = time.perf_counter()
    for _ in range(reps):
        c = a @ b
    c[0, 0].item()  # waits for every matmul queued before it
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def load_graph(path, device):
    """(the graph prepare.save_handoff wrote, as a module; its batch size). Tensors are read by weights_only and the
    graph's JSON checked (refusals) before torch deserializes it; then what changes state is refused."""
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass
    try:
        handoff = torch.load(path, map_location=device, weights_only=True)
        if not (isinstance(handoff, dict) and isinstance(handoff.get("graph"), str) and all(
                isinstance(handoff.get(k), dict) and all(map(torch.is_tensor, handoff[k].values()))
                for k in ("state_dict", "constants"))):  # torch unpickles anything else it is given (bytes)
            raise EvalError("the hand-off must be a graph's JSON and dicts of tensors, as prepare.save_handoff saves")
        graph = json.loads(handoff["graph"])
        if refused := sorted(set(refusals(graph))):
            raise EvalError(f"the hand-off's graph holds {', '.join(refused[:3])}: only aten operators run here")
        program = ExportedProgramDeserializer().deserialize(_dict_to_dataclass(schema.ExportedProgram, graph),
                                                            handoff["state_dict"], handoff["constants"])
        signature = program.graph_signature
        tokens = next((n.meta.get("val") for n in program.graph.nodes if n.name in signature.user_inputs[:1]), None)
    except EvalError:
        raise
    except Exception as e:  # missing, truncated, not a torch file, or a graph torch cannot read
        raise EvalError(f"cannot read the hand-off {path}: {one_line(e)}") from e
    if len(signature.user_inputs) != 1 or len(signature.user_outputs) != 1 or signature.buffers_to_mutate or \
            signature.user_inputs_to_mutate or not torch.is_tensor(tokens):
        raise EvalError("the hand-off's graph must take one tensor of tokens, return the logits and change nothing")
    impure = {str(n.target) for n in program.graph.nodes if n.op == "call_function" and n.target is not getitem
              and not (isinstance(n.target, torch._ops.OpOverload) and not n.target._schema.is_mutable)}
    if impure:
        raise EvalError(f"the hand-off's graph calls {', '.join(sorted(impure)[:3])}: only pure operators run here")
    if tokens.dim() != 2 or tokens.size(1) != prepare.MAX_SEQ_LEN:
        raise EvalError(f"the hand-off's graph takes {tuple(tokens.shape)}, not (batch, {prepare.MAX_SEQ_LEN}) tokens")
    return program.module(), tokens.size(0)


def refusals(node):
    """What in a serialized graph (json of torch's schema) could run code beyond a pure aten operator."""
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in children:
        if key == "target" and isinstance(value, str) and not OK_TARGET.fullmatch(value):
            yield value
        elif key in ("as_expr", "as_custom_obj", "as_graph", "guards_code", "range_constraints") and value:
            yield key
        else:
            yield from refusals(value)


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
        moved = self.model(torch.where(changed, noise, x)[order]).float()[order.argsort()]  # shuffled, then unshuffled
        diff = (moved - logits.float()).abs().amax(-1).masked_fill(changed, 0.0)
        self.leak = max(self.leak, float(diff.max()))


def logits_loss(model, vocab_size, probe=None):
    """token_nats(x, y) for prepare.bits_per_byte: fp32 cross-entropy in nats of the logits model(x) returns (the
    targets never reach the model); probe(x, logits) after each batch."""
    def token_nats(x, y):
        logits = model(x)
        if not (torch.is_tensor(logits) and logits.dim() == 3 and logits.shape[:2] == y.shape
                and logits.size(-1) >= vocab_size):
            got = tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
            raise EvalError(f"model(x) must return logits shaped (B, T, >= {vocab_size}) for x of shape "
                            f"{tuple(x.shape)}, got {got}")
        if probe is not None:
            probe(x, logits)
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
    return token_nats


def evaluate(handoff_path, result):
    """The handed-off graph measured into result (RESULT's keys; an error while scoring leaves them None): val_bpb
    on evaluate_bpb's rows with probe batches mixed in, heldout_bpb on HELDOUT_TOKENS."""
    device = torch.device("cuda" if prepare.PROFILE == "gpu" else "cpu")  # train.py trained on it
    prepare.shard_paths("heldout")  # a missing shard fails before any work
    result["speed_before"] = machine_speed(device)
    model, batch_size = load_graph(handoff_path, device)
    tokenizer = prepare.Tokenizer.from_directory()
    probe, scores = Probe(model, tokenizer.get_vocab_size()), {}
    with torch.no_grad():
        for split, tokens in (("val", prepare.EVAL_TOKENS), ("heldout", prepare.HELDOUT_TOKENS)):
            token_nats = logits_loss(model, tokenizer.get_vocab_size(), probe if split == "val" else None)
            bpb = prepare.bits_per_byte(token_nats, tokenizer, batch_size, tokens // prepare.MAX_SEQ_LEN, device, split)
            if not math.isfinite(bpb):
                raise EvalError(f"the model's logits are not finite on the {split} rows (bpb {bpb})")
            scores[f"{split}_bpb"] = bpb
    result.update(scores, future_leak=probe.leak)
    result["speed_after"] = machine_speed(device)  # a failure here keeps the scores


def main(argv=None):
    parser = argparse.ArgumentParser(description="the harness's own measurement of a handed-off model")
    parser.add_argument("--handoff", required=True, help="the model file prepare.evaluate_bpb saved")
    parser.add_argument("--out", required=True, help="where to write the JSON result")
    args = parser.parse_args(argv)
    result = dict(RESULT)
    try:
        if not (sys.flags.isolated and sys.flags.dont_write_bytecode):
            raise EvalError("run as `python -I -B harness/evaluate.py ...`: "
                            "without these flags files in the repository could change what is measured")
        if torch.cuda.is_available():
            torch.set_float32_matmul_precision("high")  # as train.py sets it
        evaluate(args.handoff, result)
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
    sys.exit(main())

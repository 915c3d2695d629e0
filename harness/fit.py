"""The device batch that fits: when DEVICE_BATCH_SIZE does not fit in GPU memory, the largest
power-of-two fraction of it that does, with TOTAL_BATCH_SIZE kept by gradient accumulation. The
optimizer sees the same tokens per step and the same math as karpathy/autoresearch's up to rounding (the
bf16 embedding gradients are summed over more micro-steps); the number of micro-steps per step changes,
and so the step time.

train.py calls it once, after building the model and optimizer and before the timed loop:

    fit = fit_device_batch(DEVICE_BATCH_SIZE, TOTAL_BATCH_SIZE, MAX_SEQ_LEN,
                           lambda B: trial_step(B, model, optimizer, health, autocast_ctx), model, optimizer,
                           enabled=FIT_DEVICE_BATCH, config=asdict(config), source=__file__)
    run.record_fit(fit)   # run_summary.json's device_batch block
    device_batch_size, grad_accum_steps = fit.used, fit.grad_accum_steps

How it decides. `trial_step(B, ...)` is one real training step at device batch B (forward, backward,
optimizer step: the loop's heaviest kind), written in train.py so that it stays the loop's own. Sizes
are tried from the requested one down (halved while even, then 1); the first that runs without
torch.cuda.OutOfMemoryError is used, so a requested size that fits is never changed. After every
try, fitting or not, parameters, gradients and optimizer state are put back as they were: the run
starts exactly as if no step had been taken. Each size tried compiles the model once more
(dynamic=False), so torch._dynamo's recompile limit is raised by the sizes tried. Peak memory stats
are reset afterwards, so peak_vram_mb is the training's, not a failed try's.

The cache. A GPU-sized answer is remembered in <profile cache>/device_batch.json, keyed by the GPU
(name, total memory), torch's version, MAX_SEQ_LEN, the requested size, the model's parameter shapes
and config, and train.py's code without its UPPER_CASE constant lines: a hyperparameter change reuses
the answer, an edit to the model or the loop finds it again. A cached size is still run once (the
compile it needs is the training's own), and if it no longer fits the search goes on below it; a reduced
answer decided while another process held memory is dropped once a GiB more is free (MORE_FREE_BYTES). A
corrupt or foreign cache file is ignored with one warning line and rewritten.

Nothing is fitted on the CPU (there is no device memory to run out of), nor with
FIT_DEVICE_BATCH = False: the requested size is used as set.

For tests only: AUTORESEARCH_FIT_TEST_MAX_ROWS=N makes every size above N rows run out of memory
(after its step ran, as a real failure may come late), on any device, the CPU included. A run made
with it records test_max_rows in its device_batch block.
"""
import copy
import gc
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import prepare
from harness.record import RunStopped, is_out_of_memory

TEST_MAX_ROWS_ENV = "AUTORESEARCH_FIT_TEST_MAX_ROWS"  # tests only: sizes above this many rows "do not fit"
CACHE_FORMAT = "auto-log-research device_batch cache v1"
CACHE_MAX_ENTRIES = 200  # newest kept: a night of model edits, with room to spare
MORE_FREE_BYTES = 2**30  # a reduced answer is tried again from the top when this much more memory is free now


@dataclass
class DeviceBatch:
    """What run_summary.json's device_batch block records."""
    requested: int               # DEVICE_BATCH_SIZE as train.py set it
    used: int                    # the device batch the run trains and evaluates with
    grad_accum_steps: int        # TOTAL_BATCH_SIZE // (used * MAX_SEQ_LEN)
    decided_by: str              # "probe", "cache", "cpu" (no device memory to fit) or "as set" (FIT_DEVICE_BATCH off)
    seconds: float               # spent deciding, outside the time budget
    too_big: list                # sizes that ran out of memory in this run, largest first
    gpu: str = None              # the GPU it was decided for, with its memory
    test_max_rows: int = None    # AUTORESEARCH_FIT_TEST_MAX_ROWS, when a test set it


def candidates(requested):
    """The device batches to try, largest first: requested, halved while even, then 1. Each divides
    requested, so each keeps TOTAL_BATCH_SIZE a whole number of micro-batches when requested does."""
    sizes = [requested]
    while sizes[-1] % 2 == 0:
        sizes.append(sizes[-1] // 2)
    return sizes if sizes[-1] == 1 else sizes + [1]


def grad_accum_steps(device_batch, total_batch_size, seq_len):
    tokens_per_fwdbwd = device_batch * seq_len
    if device_batch < 1 or total_batch_size % tokens_per_fwdbwd:
        raise ValueError(f"TOTAL_BATCH_SIZE {total_batch_size} is not a whole number of micro-batches of "
                         f"DEVICE_BATCH_SIZE {device_batch} x MAX_SEQ_LEN {seq_len} tokens: make DEVICE_BATCH_SIZE "
                         f"a power of two that divides TOTAL_BATCH_SIZE // {seq_len}")
    return total_batch_size // tokens_per_fwdbwd


def row_limit_from_env():
    value = os.environ.get(TEST_MAX_ROWS_ENV)
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{TEST_MAX_ROWS_ENV} must be a positive whole number of rows (tests only), got {value!r}")
    return int(value)

# ---------------------------------------------------------------------------
# Trying sizes
# ---------------------------------------------------------------------------

class TrainingState:
    """Parameters, buffers and optimizer state as they are now, kept on the host; restore() puts them back
    exactly, so trial steps leave no trace (not even a half-made one: an out-of-memory error may come
    halfway through the optimizer step)."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer
        self.tensors = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        self.optimizer_state = copy.deepcopy(optimizer.state_dict())  # empty before the first step

    @torch.no_grad()
    def restore(self):
        for k, v in self.model.state_dict().items():
            v.copy_(self.tensors[k])
        self.model.zero_grad(set_to_none=True)
        self.optimizer.load_state_dict(self.optimizer_state)


def fits(size, try_batch, restore):
    """True if try_batch(size) ran, False if it ran out of memory; any other error propagates. Either way
    that returns, restore() has put the state back."""
    try:
        try_batch(size)
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        ran = False
    else:
        ran = True
    restore()  # first: it drops the failed try's gradients and optimizer state, so they are handed back too
    if not ran:  # out here the failed step's frames (and the activations they held) are gone: hand the memory back
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return ran


def largest_that_fits(sizes, try_batch, restore):
    """(the first of sizes that fits or None, the sizes that ran out of memory before it)."""
    too_big = []
    for size in sizes:
        if fits(size, try_batch, restore):
            return size, too_big
        too_big.append(size)
    return None, too_big


def allow_recompiles(n):
    """Each size tried compiles the model once more (dynamic=False); without n more entries under torch._dynamo's
    per-function recompile limit, training's and the eval's own graphs could run uncompiled after them."""
    import torch._dynamo  # here, not at the top: seconds of import that a CPU run never needs
    torch._dynamo.config.recompile_limit += n


def with_row_limit(try_batch, max_rows):
    """try_batch, but sizes above max_rows run out of memory after their step ran (tests only)."""
    def limited(size):
        try_batch(size)
        if size > max_rows:
            raise torch.cuda.OutOfMemoryError(f"{TEST_MAX_ROWS_ENV}={max_rows}: {size} rows do not fit")
    return limited

# ---------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------

def default_cache_path():
    return prepare.DATA_DIR.parent / "device_batch.json"  # the profile's cache directory


def _sha(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def code_sha(source):
    """train.py's code without its top-level UPPER_CASE assignments: the model and loop, not the hyperparameters."""
    text = Path(source).read_text()
    return _sha(re.sub(r"(?m)^[A-Z][A-Z0-9_]*\s*=.*\n?", "", text))


def device_identity(device):
    """(name, total memory in bytes) of a CUDA device; (the device type, None) elsewhere."""
    if device.type != "cuda":
        return device.type, None
    props = torch.cuda.get_device_properties(device)
    return props.name, props.total_memory


def fit_key(requested, seq_len, model, config, source, max_rows):
    """What the answer depends on: the GPU, torch, the shapes that set activation memory, and the code."""
    gpu, memory = device_identity(next(model.parameters()).device)
    params = [(name, list(p.shape), str(p.dtype)) for name, p in model.named_parameters()]
    return {"gpu": gpu, "gpu_memory_bytes": memory, "torch": torch.__version__, "max_seq_len": seq_len,
            "requested": requested, "params_sha": _sha(params), "config": config,
            "code_sha": code_sha(source) if source else None, "test_max_rows": max_rows}


class FitCache:
    """device_batch.json: {"format", "entries": {id: {"key", "used", "too_big", "at"}}}, written atomically."""

    def __init__(self, path):
        self.path = Path(path)

    def get(self, key, free_bytes=None):
        """The cached size, unless it was reduced while less memory was free than now (another process held
        some): then None, and the search starts from the requested size again."""
        entry = self._read().get(_sha(key))
        if not entry:
            return None
        then = entry.get("free_bytes")
        if entry["too_big"] and None not in (then, free_bytes) and free_bytes > then + MORE_FREE_BYTES:
            return None
        return entry["used"]

    def put(self, key, used, too_big, free_bytes=None):
        entries = self._read(warn=False)  # re-read: another worker may have added entries meanwhile
        entries[_sha(key)] = {"key": key, "used": used, "too_big": too_big, "at": time.time(),
                              "free_bytes": free_bytes}
        newest = dict(sorted(entries.items(), key=lambda kv: kv[1]["at"])[-CACHE_MAX_ENTRIES:])
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.part")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"format": CACHE_FORMAT, "entries": newest}, indent=1, default=str) + "\n")
            os.replace(tmp, self.path)
        except OSError as e:
            print(f"fit: warning: could not write {self.path} ({e}); the next run will probe again", file=sys.stderr)

    def _read(self, warn=True):
        """The valid entries by id; a file that is not a cache of ours is reported once and counts as empty."""
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
            entries = data["entries"] if isinstance(data, dict) and data.get("format") == CACHE_FORMAT else None
            if not isinstance(entries, dict) or not all(map(_valid_entry, entries.items())):
                raise ValueError("not a device_batch cache of this format")
        except (OSError, ValueError, KeyError, TypeError) as e:
            if warn:
                print(f"fit: warning: ignoring {self.path} ({e}); it will be rewritten", file=sys.stderr)
            return {}
        return entries


def _valid_entry(item):
    entry_id, entry = item
    return (isinstance(entry, dict) and isinstance(entry.get("key"), dict) and entry_id == _sha(entry["key"])
            and type(entry.get("used")) is int and 1 <= entry["used"] <= entry["key"].get("requested", 0)
            and isinstance(entry.get("at"), (int, float)))

# ---------------------------------------------------------------------------
# The decision
# ---------------------------------------------------------------------------

def fit_device_batch(requested, total_batch_size, seq_len, try_batch, model, optimizer, *, enabled=True,
                     config=None, source=None, cache_path=None, probe_on_cpu=False):
    """The device batch to train with, as a DeviceBatch; see the module docstring. Raises RunStopped when
    not even one row fits. Sizes are tried on a GPU, or under AUTORESEARCH_FIT_TEST_MAX_ROWS; probe_on_cpu
    lets tests try them on the CPU with a try_batch of their own."""
    accum = grad_accum_steps(requested, total_batch_size, seq_len)
    max_rows = row_limit_from_env()
    device = next(model.parameters()).device
    on_gpu = device.type == "cuda"
    if not enabled or not (on_gpu or probe_on_cpu or max_rows is not None):
        return DeviceBatch(requested, requested, accum, device.type if enabled else "as set", 0.0, [],
                           test_max_rows=max_rows)
    t0 = time.time()
    if max_rows is not None:
        try_batch = with_row_limit(try_batch, max_rows)
    if on_gpu:
        allow_recompiles(len(candidates(requested)) - 1)
    key = fit_key(requested, seq_len, model, config, source, max_rows)
    cache = FitCache(cache_path or default_cache_path())
    free_bytes = torch.cuda.mem_get_info(device)[0] if on_gpu else None
    used, too_big, decided_by = search(requested, try_batch, TrainingState(model, optimizer).restore, cache, key,
                                       free_bytes)
    gpu = _gpu_label(key)
    if used is None:
        raise RunStopped(f"not even one row of {seq_len} tokens (DEVICE_BATCH_SIZE 1) fits in {gpu} with this model: "
                         "make it smaller (DEPTH, ASPECT_RATIO) or use the cpu profile (AUTORESEARCH_PROFILE=cpu)")
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)  # peak_vram_mb: the training's, not a failed try's
    fit = DeviceBatch(requested, used, grad_accum_steps(used, total_batch_size, seq_len), decided_by,
                      time.time() - t0, too_big, gpu, max_rows)
    if used != requested:
        print(f"DEVICE_BATCH_SIZE {requested} does not fit in {gpu}: using {used} with {fit.grad_accum_steps} "
              f"accumulation steps, same TOTAL_BATCH_SIZE {total_batch_size} ({decided_by}, {fit.seconds:.1f}s)")
    return fit


def search(requested, try_batch, restore, cache, key, free_bytes=None):
    """(used or None, sizes that ran out of memory, "cache" or "probe"): from the cached size when there is
    one (it is still tried), else from the requested size, down; a new answer is written to the cache."""
    sizes = candidates(requested)
    cached = cache.get(key, free_bytes)
    if cached in sizes:
        sizes = sizes[sizes.index(cached):]
    used, too_big = largest_that_fits(sizes, try_batch, restore)
    if used is not None and used != cached:
        cache.put(key, used, too_big, free_bytes)
    return used, too_big, "cache" if used is not None and used == cached else "probe"


def _gpu_label(key):
    if key["gpu_memory_bytes"] is None:
        return key["gpu"] + (f" (test limit {key['test_max_rows']} rows)" if key["test_max_rows"] else "")
    return f"{key['gpu']} ({key['gpu_memory_bytes'] / 2**30:.0f} GiB)"

"""What a training run writes about itself, so that a broken train.py can never lose it. train.py calls:

    run = RunRecorder(collect_config(globals())).start()   # metrics.jsonl now; run_summary.json at any exit
    run.record_fit(fit_batch(DEVICE_BATCH_SIZE, ...))       # (device batch, accumulation steps) that fit
    run.log(step, **metrics)                                # a metrics row (buffered, flushed every 2 s)
    run.check_divergence(step, loss)                        # NaN or > 100: the run ends as 'diverged'
    run.finish(val_bpb=..., ...)                            # the greppable block, status 'ok'

run_summary.json is written on every exit path, and the exit code says which (EXIT_CODES): crash (an exception,
or no finish()), timeout (the hard cap or SIGTERM; under `analyze.py run` the parent keeps the cap), interrupted.
"""
import atexit
import contextlib
import copy
import gc
import json
import math
import os
import platform
import signal
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import prepare
from harness.record import git, harness_file, sha256_file, write_atomic

ROOT = Path(__file__).resolve().parent.parent
FINAL_FORMATS = {"val_bpb": ".6f", "training_seconds": ".1f", "total_seconds": ".1f", "peak_vram_mb": ".1f",
                 "mfu_percent": ".2f", "total_tokens_M": ".1f", "num_steps": ".0f", "num_params_M": ".1f",
                 "depth": ".0f"}  # karpathy/autoresearch's greppable block, in his order
EXIT_CODES = {"ok": 0, "crash": 1, "diverged": 2, "timeout": 3, "interrupted": 130}
DIVERGED_LOSS = 100.0                      # a training loss above this has diverged
TEST_MAX_ROWS_ENV = "AUTORESEARCH_FIT_TEST_MAX_ROWS"  # tests only: batches above this many rows "run out of memory"
OOM_TEXTS = ("Triton Error [CUDA]: out of memory", "CUBLAS_STATUS_ALLOC_FAILED")  # plain RuntimeErrors


class Diverged(Exception):
    """Training loss became NaN/inf or exploded; the run ends with status 'diverged'."""


class RunStopped(Exception):
    """This machine cannot run train.py as it stands: a crash whose only output is the one line of what to do."""


def is_out_of_memory(exc):
    """True if exc, or an exception it was raised from (the compiler wraps them), is out of memory."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        runtime_oom = type(exc) is RuntimeError and any(text in str(exc) for text in OOM_TEXTS)
        if isinstance(exc, torch.OutOfMemoryError) or runtime_oom:
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


@dataclass
class DeviceBatch:
    """run_summary.json's device_batch block."""
    requested: int          # DEVICE_BATCH_SIZE as train.py set it
    used: int               # the device batch the run trains and evaluates with
    grad_accum_steps: int   # TOTAL_BATCH_SIZE // (used * MAX_SEQ_LEN)
    too_big: list           # sizes that ran out of memory, largest first
    seconds: float          # spent trying, before the clock starts


def fit_batch(requested, total_batch_size, seq_len, try_step, model, optimizer):
    """DEVICE_BATCH_SIZE if try_step(size) (the loop's heaviest step) runs on it, else the first of its halvings
    that does, TOTAL_BATCH_SIZE kept by accumulation; parameters and optimizer state are put back exactly after each
    try. Nothing is tried on the CPU (no device memory) unless TEST_MAX_ROWS_ENV is set. RunStopped: not one row."""
    if total_batch_size % (requested * seq_len):  # said before any try
        raise ValueError(f"TOTAL_BATCH_SIZE {total_batch_size} is not a multiple of DEVICE_BATCH_SIZE {requested} x "
                         f"MAX_SEQ_LEN {seq_len}: make it a power of two that divides {total_batch_size // seq_len}")
    t0, on_gpu, max_rows = time.time(), next(model.parameters()).is_cuda, os.environ.get(TEST_MAX_ROWS_ENV)
    if not (on_gpu or max_rows):  # no device memory to run out of: nothing to try, nothing to copy
        return DeviceBatch(requested, requested, total_batch_size // (requested * seq_len), [], 0.0)
    if on_gpu:  # each size tried compiles the model once more (dynamic=False): leave training its own graphs
        torch._dynamo.config.recompile_limit += requested.bit_length()
    params = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    state = copy.deepcopy(optimizer.state_dict())  # empty before the first step
    size, too_big = requested, []
    while True:
        try:
            try_step(size)
            if max_rows and size > int(max_rows):  # after the step ran, as a real failure may come late
                raise torch.OutOfMemoryError(f"{TEST_MAX_ROWS_ENV}={max_rows}: {size} rows do not fit")
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            too_big.append(size)
        model.load_state_dict(params)  # first: a failed try's gradients and optimizer state go, and their memory
        model.zero_grad(set_to_none=True)
        optimizer.load_state_dict(state)
        if size not in too_big:
            break
        if size == 1:
            raise RunStopped(f"not even one row of {seq_len} tokens (DEVICE_BATCH_SIZE 1) fits in GPU memory with "
                             "this model: make it smaller (DEPTH, ASPECT_RATIO) or use AUTORESEARCH_PROFILE=cpu")
        size = size // 2 if size % 2 == 0 else 1
        gc.collect()  # out here the failed step's frames, and the activations they held, are gone
        torch.cuda.empty_cache()  # a no-op where CUDA was never started
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()  # peak_vram_mb: the training's, not a failed try's
    fit = DeviceBatch(requested, size, total_batch_size // (size * seq_len), too_big, time.time() - t0)
    if too_big:
        print(f"DEVICE_BATCH_SIZE {requested} does not fit: using {size} with {fit.grad_accum_steps} accumulation "
              f"steps, same TOTAL_BATCH_SIZE {total_batch_size} ({fit.seconds:.1f}s)")
    return fit


def collect_config(namespace):
    """train.py's UPPER_CASE globals but prepare.py's, as JSON reads them back (a tuple as a list, frozen against later
    changes). One JSON cannot write ({(0, 1): 2}, a list holding itself) is left out: it would cost the summary."""
    config = {}
    for name, value in namespace.items():
        if name.isupper() and not name.startswith("_") and vars(prepare).get(name, object()) is not value:
            with contextlib.suppress(TypeError, ValueError):
                config[name] = json.loads(json.dumps(value))
    return config


def _json_default(value):
    """Tensors and numpy scalars become Python numbers; anything else its repr, so a row is never lost."""
    with contextlib.suppress(AttributeError, ValueError, RuntimeError):
        return value.item()
    return repr(value)


def provenance():
    """run_summary.json's git block (the commit; the scripts and harness files as they ran) and env block."""
    commit = (git("rev-parse", "HEAD", cwd=ROOT) or "").strip() or None
    status = git("status", "--porcelain", "--untracked-files=no", cwd=ROOT) if commit else None
    tracked = (git("ls-files", "-z", cwd=ROOT) or "").split("\0")
    git_block = {"commit": commit, "dirty": None if status is None else bool(status.strip()),
                 **{f"{n}_py_sha256": sha256_file(ROOT / f"{n}.py") for n in ("train", "prepare", "analyze")},
                 "harness_sha256": {p: sha256_file(ROOT / p) for p in sorted(tracked) if harness_file(p)}}
    env = dict(python=platform.python_version(), torch=torch.__version__, cuda=None, gpu_name=None, driver=None)
    if torch.cuda.is_available():
        env.update(cuda=torch.version.cuda, gpu_name=torch.cuda.get_device_name(), driver=prepare.nvidia_driver())
    return git_block, env


class LayerHealth:
    """Gradient norm and update-to-weight ratio of every block matrix, and the RMS of every block's output (the
    model's forward returns it, from inside the compiled graph), fetched with the step's loss in one transfer."""

    def __init__(self, named_params):  # model.transformer.h.named_parameters()
        self.names, self.params = zip(*((name.removesuffix(".weight"), p) for name, p in named_params))  # "0.attn.c_q"
        self.before = None

    def before_step(self):  # after backward, before optimizer.step(): the weights the step will change
        self.before = [p.detach().clone() for p in self.params]

    def forget(self):  # a step that failed halfway must not hold its snapshot's memory
        self.before = None

    @torch.no_grad()
    def fetch(self, loss, act_rms=None):
        """After optimizer.step(), before zero_grad(): (loss, layer/ metrics or {} without act_rms) in one transfer."""
        if act_rms is None:
            return loss.item(), {}
        tensors = ([p.grad for p in self.params], torch._foreach_sub(self.params, self.before), self.before)
        norms = [torch.stack(torch._foreach_norm(ts)) for ts in tensors]  # gradient, update, weight
        self.forget()
        loss, *values = torch.cat([t.float().view(-1) for t in (loss, *norms, act_rms)]).tolist()
        n, metrics = len(self.names), {}
        for name, g, u, w in zip(self.names, values[:n], values[n:2 * n], values[2 * n:3 * n]):
            metrics[f"layer/{name}/grad_norm"] = g
            metrics[f"layer/{name}/update_ratio"] = u / w if w > 0 else None  # zero-init weights have no ratio yet
        return loss, metrics | {f"layer/{i}/act_rms": rms for i, rms in enumerate(values[3 * n:])}


class ValCurve:
    """In-training val/bpb at `points` evenly spaced progress values, and once more at finish(). Each value gets
    its own metrics row, at the progress where it was measured; its seconds count as eval_s, not training time."""

    def __init__(self, run, measure, points, autocast_ctx):
        self.run, self.measure, self.autocast_ctx = run, measure, autocast_ctx
        self.due = [i / points for i in range(points)]  # progress values still to measure at

    def update(self, step, progress, elapsed_s):
        if self.due and progress >= self.due[0]:
            self.finish(step, elapsed_s, progress)
            self.due = [p for p in self.due if p > progress]

    def finish(self, step, elapsed_s, progress=1.0):
        t0 = time.time()
        with self.autocast_ctx:
            val_bpb = self.measure()
        self.run.timing("eval_s", time.time() - t0)
        self.run.log(step, elapsed_s=elapsed_s, **{"train/progress": progress, "val/bpb": val_bpb})


class RunRecorder:
    """A run's metrics.jsonl and run_summary.json: `RunRecorder(config).start()` for a whole script, or `with
    RunRecorder(config) as run:`. hard_cap_s 0: no watchdog; None: prepare's cap, or 0 under `analyze.py run`."""

    def __init__(self, config, out_dir=".", hard_cap_s=None, flush_every_s=2.0):
        if hard_cap_s is None:
            hard_cap_s = 0 if os.environ.get("AUTORESEARCH_HANDOFF") else prepare.hard_cap_s(prepare.TIME_BUDGET)
        self.config, self.out_dir, self.hard_cap_s = config, Path(out_dir), hard_cap_s
        self.final, self.device_batch, self.timings, self.exit_code = dict.fromkeys(FINAL_FORMATS), None, {}, None
        self._rows, self._last_step, self._last_elapsed, self._file, self._warned = [], None, None, None, set()
        self.flush_every_s, self._lock, self._finished = flush_every_s, threading.RLock(), False
        self._watchdog = threading.Timer(hard_cap_s, self._timeout, [f"hard cap of {hard_cap_s:.0f}s reached"])
        self._watchdog.daemon = True  # started only when hard_cap_s > 0; it waits on the monotonic clock

    def __enter__(self):
        for name in ("metrics.jsonl", "run_summary.json"):  # never let a previous run's outputs pass as ours
            (self.out_dir / name).unlink(missing_ok=True)
        self.started_at = self._last_flush = time.time()
        self.git, self.env = provenance()
        tokenizer_sha = sha256_file(prepare.TOKENIZER_DIR / "tokenizer.pkl")  # stands for the data it was trained on
        self.harness = {**prepare.HARNESS, "tokenizer": tokenizer_sha and tokenizer_sha[:16]}
        self._file = open(self.out_dir / "metrics.jsonl", "w")  # a directory that takes no file ends the run here
        if self.hard_cap_s:
            self._watchdog.start()
        return self

    def __exit__(self, exc_type, exc, tb):
        self._watchdog.cancel()
        trace = "".join(traceback.format_exception(exc_type, exc, tb)) if exc_type else ""  # stderr gets it, or a line
        if exc_type is None:
            status, error = ("ok", None) if self._finished else ("crash", "train.py ended without calling run.finish()")
        elif issubclass(exc_type, RunStopped):  # what to do, and nothing else
            status, error, trace = "crash", str(exc), f"train.py stopped: {exc}\n"
        elif issubclass(exc_type, KeyboardInterrupt):  # someone stopped it: not the code's failure, and no number
            status, error = "interrupted", _tail(trace, max_lines=12)
            trace = "\ntrain.py interrupted (Ctrl-C or SIGINT)\n"
        elif is_out_of_memory(exc):  # what to do first, naming the device batch; the traceback's tail after it
            used = (self.device_batch or {}).get("used", self.config.get("DEVICE_BATCH_SIZE"))
            line = (f"out of GPU memory at a device batch of {used} rows: set DEVICE_BATCH_SIZE below {used} "
                    "(TOTAL_BATCH_SIZE is kept by accumulation) or make the model smaller (DEPTH, ASPECT_RATIO)")
            status, error, trace = "crash", f"{line}\n{_tail(trace, max_lines=30)}", f"{trace}train.py: {line}\n"
        else:
            status, error = ("diverged" if issubclass(exc_type, Diverged) else "crash"), _tail(trace)
        sys.stderr.write(trace)
        self._close(status, error)
        return True

    def start(self):
        """Begin the run for a whole script: its end, however it comes, writes the summary and sets the exit code."""
        self.__enter__()
        sys.excepthook = self._end
        atexit.register(self._end, None, None, None)
        signal.signal(signal.SIGTERM, lambda *_: self._timeout("SIGTERM received"))
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C even where SIGINT was ignored (nohup, a job)
        return self

    def _end(self, *exc_info):  # sys.excepthook (an uncaught exception) and atexit; no exc_info: closed already
        if exc_info:
            self.__exit__(*exc_info)
        if self.exit_code:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(self.exit_code)

    def _timeout(self, reason):  # the watchdog and SIGTERM: where the main thread hung goes into the error
        stack = "".join(traceback.format_stack(sys._current_frames().get(threading.main_thread().ident)))
        if self._close("timeout", _tail(f"{reason}; main thread was at:\n{stack}")):
            print(f"\nRunRecorder: {reason}, wrote run_summary.json (status timeout)", file=sys.stderr)
            self._end()

    def _close(self, status, error):
        """Flush metrics and write the summary, once; False if another path already did."""
        with self._lock:
            if self.exit_code is not None:
                return False
            self.exit_code = EXIT_CODES[status]
            if not self._finished and self._last_step is not None:  # how far it got, unless train.py said more
                self.final["num_steps"] = self.final["num_steps"] or self._last_step + 1
                self.final["training_seconds"] = self.final["training_seconds"] or self._last_elapsed
            self.flush()
            self._file.close()
            summary = {"status": status, **self.final, "device_batch": self.device_batch, "config": self.config,
                       "harness": self.harness, "git": self.git, "env": self.env,
                       "timings": {**self.timings, "started_at": self.started_at, "finished_at": time.time()},
                       "error": error}
            text = json.dumps(summary, indent=2, default=_json_default) + "\n"
            try:
                write_atomic(self.out_dir / "run_summary.json", text)
            except OSError as e:
                print(f"RunRecorder: could not write run_summary.json: {e}", file=sys.stderr)
            return True

    def log(self, step, **metrics):
        """Buffer one metrics row; written at most every flush_every_s and at exit. Never raises on I/O."""
        with self._lock:
            if self._last_step is not None and step < self._last_step:
                self._warn_once("order", f"log(step={step}) after step {self._last_step}: row dropped")
                return
            self._last_step, self._last_elapsed = step, metrics.get("elapsed_s", self._last_elapsed)
            self._rows.append({"step": step, "time": time.time(), **metrics})
            if time.time() - self._last_flush >= self.flush_every_s:
                self.flush()

    def flush(self):
        with self._lock:
            rows, self._rows, self._last_flush = self._rows, [], time.time()
            if self._file.closed or not rows:
                return
            try:
                self._file.write("".join(json.dumps(r, default=_json_default) + "\n" for r in rows))
                self._file.flush()
            except OSError as e:
                self._warn_once("io", f"metrics.jsonl: {e}")

    def _warn_once(self, kind, message):
        if kind not in self._warned:
            self._warned.add(kind)
            print(f"RunRecorder: warning: {message} (further warnings of this kind suppressed)", file=sys.stderr)

    def set(self, **values):  # final-block values known so far: they reach the summary whatever the exit path
        if unknown := set(values) - set(FINAL_FORMATS):  # a typo (val_bpp) or a "status" would pass unseen
            raise KeyError(f"not final-block keys: {sorted(unknown)}; known: {list(FINAL_FORMATS)}")
        self.final.update(values)

    def timing(self, name, seconds):  # adds to run_summary.json's timings[name]
        self.timings[name] = self.timings.get(name, 0.0) + float(seconds)

    def record_fit(self, fit):  # fit_batch's DeviceBatch into device_batch and fit_s: (used, grad_accum_steps)
        self.device_batch = asdict(fit)
        self.timing("fit_s", fit.seconds)
        return fit.used, fit.grad_accum_steps

    def check_divergence(self, step, loss):
        if not math.isfinite(loss) or loss > DIVERGED_LOSS:
            raise Diverged(f"training loss {loss} at step {step}")

    def finish(self, **final):
        """Print AR's greppable block, ending the run 'ok'; val_bpb None (handed off: the harness's) is left out."""
        self.set(**final)
        self._finished = True
        print("---")
        for key, fmt in FINAL_FORMATS.items():
            value = self.final[key]
            if key != "val_bpb" or value is not None:
                print(f"{key + ':':<18}{'n/a' if value is None else format(float(value), fmt)}", flush=True)


def _tail(text, max_lines=40, max_chars=4000):
    return "\n".join(text.rstrip().splitlines()[-max_lines:])[-max_chars:]

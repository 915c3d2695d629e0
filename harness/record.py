"""Run recording: what a training run writes about itself, so that a broken train.py can never lose it.

train.py calls it in a handful of lines:

    run = RunRecorder(collect_config(globals())).start()   # metrics.jsonl now; run_summary.json at any exit
    run.log(step, **metrics)                                # a metrics row (buffered, flushed every 2 s)
    run.check_divergence(step, loss)                        # NaN or > 100: the run ends as 'diverged'
    run.finish(val_bpb=..., ...)                            # the greppable block, status 'ok'

The summary is written on every exit path: ok, crash (an uncaught exception, or the script ended
without finish()), diverged, timeout (the hard wall-clock cap or SIGTERM, which exit with code 3) and
interrupted (Ctrl-C or SIGINT: KeyboardInterrupt, exit code 130 as a shell gives it).
LayerHealth computes the per-layer statistics on the device, to be fetched with the step's loss.
"""
import atexit
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

import prepare
from harness.pin import is_pinned
from harness.gpu import nvidia_driver, peak_bf16_flops, why_not_runnable  # noqa: F401  (the last two: for train.py's import line)
from harness.progress import ProgressLine  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
FINAL_KEYS = ("val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent",
              "total_tokens_M", "num_steps", "num_params_M", "depth")
_FINAL_FORMATS = {"val_bpb": "{:.6f}", "training_seconds": "{:.1f}", "total_seconds": "{:.1f}",
                  "peak_vram_mb": "{:.1f}", "mfu_percent": "{:.2f}", "total_tokens_M": "{:.1f}",
                  "num_steps": "{:d}", "num_params_M": "{:.1f}", "depth": "{:d}"}
EXIT_CODES = {"ok": 0, "crash": 1, "diverged": 2, "timeout": 3, "interrupted": 130}  # the process's exit code by status
DIVERGED_LOSS = 100.0                                            # a training loss above this has diverged


class Diverged(Exception):
    """Training loss became NaN/inf or exploded; the run ends with status 'diverged'."""


class RunStopped(Exception):
    """This machine cannot run train.py as it stands (no bf16, no compiler, no batch that fits): the run
    ends as a crash whose error, and whose only output, is the message's one line saying what to do."""


# Out of memory outside torch's allocator: Triton loading a kernel (the compiled backward loads its kernels
# lazily, at peak activation memory) and cuBLAS creating a handle raise plain RuntimeErrors
_OUT_OF_MEMORY_TEXTS = ("Triton Error [CUDA]: out of memory", "CUBLAS_STATUS_ALLOC_FAILED")


def is_out_of_memory(exc):
    """True if exc is an out-of-memory error or was raised from one (the compiler may wrap it)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, torch.OutOfMemoryError) or (
                type(exc) is RuntimeError and any(text in str(exc) for text in _OUT_OF_MEMORY_TEXTS)):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False

# ---------------------------------------------------------------------------
# Config and provenance
# ---------------------------------------------------------------------------

def _jsonable(value):
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def collect_config(namespace):
    """Every UPPER_CASE global of train.py whose value is JSON-serialisable (tuples become lists),
    except the harness constants it imported from prepare.py."""
    config = {}
    harness = vars(prepare)
    for name, value in namespace.items():
        if not name.isupper() or name.startswith("_") or harness.get(name, object()) is value:
            continue
        try:
            json.dumps(_jsonable(value))
        except (TypeError, ValueError):
            continue
        config[name] = _jsonable(value)
    return config


def _json_default(value):
    """Tensors and numpy scalars become Python numbers; anything else its repr, so a row is never lost."""
    if hasattr(value, "item"):
        try:
            return value.item()
        except (ValueError, RuntimeError):
            pass
    return repr(value)


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def _git(*args):
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def provenance():
    """(git, env) blocks of run_summary.json: the commit and the sha256 of the scripts as run, and the
    software and hardware the run ran on."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    git = {"commit": commit, "dirty": None if status is None else bool(status)}
    git.update({f"{n}_py_sha256": _sha256(ROOT / f"{n}.py") for n in ("train", "prepare", "analyze")})
    # every pinned harness file as it was when the run started: an edit restored before archiving still shows
    tracked = (_git("ls-files", "-z") or "").split("\0") if commit else []
    git["harness_sha256"] = {p: _sha256(ROOT / p) for p in sorted(tracked) if p and is_pinned(p)}
    cuda = torch.cuda.is_available()
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda if cuda else None,
           "gpu_name": torch.cuda.get_device_name() if cuda else None, "driver": nvidia_driver() if cuda else None}
    return git, env

# ---------------------------------------------------------------------------
# Per-layer health: computed on the device, fetched with the step's loss in one transfer
# ---------------------------------------------------------------------------

class LayerHealth:
    """Gradient norm and update-to-weight ratio of every block matrix, plus the RMS of every block's
    output (which the model's forward returns, from inside the compiled graph). named_params: the
    blocks' (name, parameter) pairs, e.g. model.transformer.h.named_parameters()."""

    def __init__(self, named_params):
        named = list(named_params)
        self.names = [name.removesuffix(".weight") for name, _ in named]  # e.g. "0.attn.c_q"
        self.params = [p for _, p in named]
        self.grad_norms = self.before = None

    @torch.no_grad()
    def before_step(self):
        """Call after backward, before optimizer.step()."""
        self.grad_norms = torch.stack(torch._foreach_norm([p.grad for p in self.params]))
        self.before = [p.detach().clone() for p in self.params]

    def forget(self):
        """Drop what before_step() keeps: a step that failed halfway must not hold its snapshot's memory."""
        self.grad_norms = self.before = None

    @torch.no_grad()
    def after_step(self, act_rms):
        """All statistics as one flat device tensor (nothing is transferred here)."""
        weight_norms = torch.stack(torch._foreach_norm(self.before))
        update_norms = torch.stack(torch._foreach_norm(torch._foreach_sub(self.params, self.before)))
        self.before = None
        return torch.cat([self.grad_norms.float(), update_norms.float(), weight_norms.float(), act_rms.float()])

    def unpack(self, values):
        """The flat list from after_step(), fetched to the host, as metrics.jsonl keys."""
        n = len(self.names)
        grad_norms, update_norms, weight_norms, act_rms = values[:n], values[n:2*n], values[2*n:3*n], values[3*n:]
        metrics = {}
        for name, g, u, w in zip(self.names, grad_norms, update_norms, weight_norms):
            metrics[f"layer/{name}/grad_norm"] = g
            metrics[f"layer/{name}/update_ratio"] = u / w if w > 0 else None  # zero-init weights have no ratio yet
        for i, rms in enumerate(act_rms):
            metrics[f"layer/{i}/act_rms"] = rms
        return metrics

    def fetch(self, loss, stats):
        """(loss as a float, layer metrics) in one device-to-host transfer; stats from after_step or None."""
        if stats is None:
            return loss.item(), {}
        values = torch.cat([loss.float().view(1), stats]).tolist()
        return values[0], self.unpack(values[1:])

# ---------------------------------------------------------------------------
# The validation curve
# ---------------------------------------------------------------------------

class ValCurve:
    """In-training val/bpb at `points` evenly spaced progress values, and once more at the end. Each
    value gets its own metrics row, at the progress where it was measured (the step's row comes after
    the step), and its seconds count as eval_s, outside the training time."""

    def __init__(self, run, measure, points, autocast_ctx=None):
        self.run, self.measure, self.autocast_ctx = run, measure, autocast_ctx or contextlib.nullcontext()
        self.due = [i / points for i in range(points)]  # progress values still to measure at

    def update(self, step, progress, elapsed_s):
        if self.due and progress >= self.due[0]:
            self._measure(step, progress, elapsed_s)
            self.due = [p for p in self.due if p > progress]

    def finish(self, step, elapsed_s):
        self._measure(step, 1.0, elapsed_s)

    def _measure(self, step, progress, elapsed_s):
        t0 = time.time()
        with self.autocast_ctx:
            val_bpb = self.measure()
        self.run.timing("eval_s", time.time() - t0)
        self.run.log(step, elapsed_s=elapsed_s, **{"train/progress": progress, "val/bpb": val_bpb})

# ---------------------------------------------------------------------------
# The recorder
# ---------------------------------------------------------------------------

class RunRecorder:
    """Owns a run's outputs (metrics.jsonl, run_summary.json). Either `run = RunRecorder(config).start()`
    at the top of a script (uncaught exceptions and an exit without finish() are recorded through
    sys.excepthook and atexit), or `with RunRecorder(config) as run:` around the work."""

    def __init__(self, config, out_dir=".", hard_cap_s=None, flush_every_s=2.0):
        budget = prepare.TIME_BUDGET
        self.config = config
        self.out_dir = Path(out_dir)
        self.hard_cap_s = hard_cap_s if hard_cap_s is not None else max(2 * budget, budget + 300)
        self.flush_every_s = flush_every_s
        self.final = dict.fromkeys(FINAL_KEYS)
        self.extra = {}  # summary keys beside the final block, e.g. val_bpb_exact_bytes
        self.timings = {}
        self.exit_code = None
        self._rows, self._last_step, self._last_elapsed, self._file, self._warned = [], None, None, None, set()
        self._finished, self._closed = False, False
        self._metrics_lock, self._close_lock = threading.RLock(), threading.RLock()
        self._stop = threading.Event()
        self.started_at = self._last_flush = time.time()

    # -- lifecycle --

    def __enter__(self):
        for name in ("metrics.jsonl", "run_summary.json"):  # never let a previous run's outputs pass as ours
            (self.out_dir / name).unlink(missing_ok=True)
        self.started_at = self._last_flush = time.time()
        self.git, self.env = provenance()
        # the tokenizer stands for the data it was trained on (the cpu profile's text is this Python's
        # standard library): runs on another tokenizer are another harness
        tokenizer_sha = _sha256(prepare.TOKENIZER_DIR / "tokenizer.pkl")
        self.harness = {**prepare.HARNESS, "tokenizer": tokenizer_sha[:16] if tokenizer_sha else None}
        try:
            self._file = open(self.out_dir / "metrics.jsonl", "w")
        except OSError as e:
            self._warn_once("io", f"metrics.jsonl: {e}")
        threading.Thread(target=self._watchdog, name="run-hard-cap", daemon=True).start()
        self._old_sigterm = self._old_sigint = None
        if threading.current_thread() is threading.main_thread():
            self._old_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
            # Ctrl-C is KeyboardInterrupt even when SIGINT was ignored at start-up (a background job, nohup),
            # which Python would otherwise leave ignored: a run started there could not be interrupted
            self._old_sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
        return self

    def __exit__(self, exc_type, exc, tb):
        self._stop.set()
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)
            signal.signal(signal.SIGINT, self._old_sigint)
        if exc_type is None:
            status, error = ("ok", None) if self._finished else ("crash", "train.py ended without calling run.finish()")
        elif issubclass(exc_type, RunStopped):
            print(f"train.py stopped: {exc}", file=sys.stderr)
            status, error = "crash", str(exc)
        elif issubclass(exc_type, KeyboardInterrupt):  # someone stopped it: not the code's failure, and no number
            print("\ntrain.py interrupted (Ctrl-C or SIGINT)", file=sys.stderr)
            status = "interrupted"
            error = _tail("".join(traceback.format_exception(exc_type, exc, tb)), max_lines=12)
        else:
            traceback.print_exception(exc_type, exc, tb, file=sys.stderr)
            status = "diverged" if issubclass(exc_type, Diverged) else "crash"
            error = _tail("".join(traceback.format_exception(exc_type, exc, tb)))
            if is_out_of_memory(exc):  # the line that says what to do first, the traceback's tail after it
                line = self._out_of_memory_line()
                print(f"train.py: {line}", file=sys.stderr)
                error = f"{line}\n{_tail(error, max_lines=30)}"
        self._close(status, error)
        return True

    def start(self):
        """Begin the run for a whole script: its end, however it comes, writes the summary and sets the
        process's exit code (0 ok, 1 crash, 2 diverged, 3 timeout, 130 interrupted)."""
        self.__enter__()
        sys.excepthook = self._excepthook
        atexit.register(self._at_exit)
        return self

    def _excepthook(self, exc_type, exc, tb):
        self.__exit__(exc_type, exc, tb)
        self._exit_now()

    def _at_exit(self):
        if not self._closed:
            self.__exit__(None, None, None)
        if self.exit_code:
            self._exit_now()

    def _exit_now(self):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(self.exit_code)

    def _watchdog(self):
        # the cap may grow while we wait (record_fit): wait again for whatever is left of it
        while not self._stop.wait(max(0.0, self.started_at + self.hard_cap_s - time.time())):
            if time.time() >= self.started_at + self.hard_cap_s:
                self._timeout(f"hard cap of {self.hard_cap_s:.0f}s wall-clock reached")
                return

    def _on_sigterm(self, signum, frame):
        self._timeout("SIGTERM received")

    def _timeout(self, reason):
        frame = sys._current_frames().get(threading.main_thread().ident)
        stack = "".join(traceback.format_stack(frame)) if frame is not None else ""
        if self._close("timeout", _tail(f"{reason}; main thread was at:\n{stack}")):
            print(f"\nRunRecorder: {reason}, wrote run_summary.json (status timeout)", file=sys.stderr)
            self._exit_now()

    def _close(self, status, error):
        """Flush metrics and write the summary, once; False if another path already did."""
        with self._close_lock:
            if self._closed:
                return False
            self._closed = True
            self.exit_code = EXIT_CODES[status]
            if not self._finished and self._last_step is not None:
                # how far a run got before it died: the last logged step, unless train.py said more
                self.final["num_steps"] = self.final["num_steps"] or self._last_step + 1
                self.final["training_seconds"] = self.final["training_seconds"] or self._last_elapsed
            self.flush()
            with self._metrics_lock:
                if self._file is not None:
                    self._file.close()
            self._write_summary(status, error)
            return True

    # -- during the run --

    def log(self, step, **metrics):
        """Buffer one metrics row; written at most every flush_every_s and at exit. Never raises on I/O."""
        with self._metrics_lock:
            if self._last_step is not None and step < self._last_step:
                self._warn_once("order", f"log(step={step}) after step {self._last_step}: row dropped")
                return
            self._last_step = step
            if "elapsed_s" in metrics:
                self._last_elapsed = metrics["elapsed_s"]
            self._rows.append({"step": step, "time": time.time(), **metrics})
            if time.time() - self._last_flush >= self.flush_every_s:
                self.flush()

    def flush(self):
        with self._metrics_lock:
            rows, self._rows = self._rows, []
            self._last_flush = time.time()
            if self._file is None or self._file.closed or not rows:
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

    def set(self, **values):
        """Record final-block values known so far; they reach the summary whatever the exit path."""
        unknown = set(values) - set(FINAL_KEYS)
        if unknown:
            raise KeyError(f"not final-block keys: {sorted(unknown)}; known: {FINAL_KEYS}")
        self.final.update(values)

    def timing(self, name, seconds):
        """Add seconds to a named timing of run_summary.json's timings block."""
        self.timings[name] = self.timings.get(name, 0.0) + float(seconds)

    def record_fit(self, fit):
        """run_summary.json's device_batch block: the DeviceBatch harness.fit decided (requested, used, ...)."""
        self.extra["device_batch"] = dataclasses.asdict(fit)
        self.hard_cap_s += fit.seconds  # trying sizes happens before the budget: it must not eat the cap

    def _out_of_memory_line(self):
        """What to do about an out-of-memory crash, in one line that names the device batch."""
        fit = self.extra.get("device_batch")
        requested = (fit or {}).get("requested", self.config.get("DEVICE_BATCH_SIZE"))
        if fit is None and self._last_step is None:  # train.py fits (and records) before any batch runs
            return (f"out of GPU memory before any batch ran (DEVICE_BATCH_SIZE {requested} not yet tried): the "
                    "model and optimizer alone do not fit; make the model smaller (DEPTH, ASPECT_RATIO)")
        used = (fit or {}).get("used", requested)
        at = (f"DEVICE_BATCH_SIZE {used} (fitted down from the requested {requested})" if used != requested
              else f"DEVICE_BATCH_SIZE {used} (as requested)")
        if used == 1:
            return f"out of GPU memory at {at}: make the model smaller (DEPTH, ASPECT_RATIO)"
        fit_off = " (or set FIT_DEVICE_BATCH = True)" if (fit or {}).get("decided_by") == "as set" else ""
        return (f"out of GPU memory at {at}: lower DEVICE_BATCH_SIZE in train.py, e.g. to {used // 2}{fit_off}; "
                "TOTAL_BATCH_SIZE is kept by gradient accumulation")

    def check_divergence(self, step, loss):
        if not math.isfinite(loss) or loss > DIVERGED_LOSS:
            raise Diverged(f"training loss {loss} at step {step}")

    def finish(self, **final):
        """Set the final-block values, print karpathy/autoresearch's greppable block, end the run 'ok'."""
        exact = prepare.exact_bytes_bpb(final.get("val_bpb"))
        if final.get("val_bpb") is not None and exact is None:
            raise ValueError(f"val_bpb={final['val_bpb']!r} did not come from prepare.evaluate_bpb: the final "
                             "number must be the fixed metric, passed on as it returned it")
        self.set(**final)
        self.extra["val_bpb_exact_bytes"] = exact
        self._finished = True
        print("\n".join(["---"] + [f"{key + ':':<18}{self._formatted(key)}" for key in FINAL_KEYS]), flush=True)

    def _formatted(self, key):
        value, fmt = self.final[key], _FINAL_FORMATS[key]
        if value is None:
            return "n/a"
        return fmt.format(int(value) if fmt == "{:d}" else float(value))

    # -- the summary --

    def _write_summary(self, status, error):
        summary = {"status": status, **self.final, **self.extra, "config": self.config, "harness": self.harness,
                   "git": self.git, "env": self.env,
                   "timings": {**self.timings, "started_at": self.started_at, "finished_at": time.time()},
                   "error": error}
        path = self.out_dir / "run_summary.json"
        tmp = path.with_name(f".run_summary.json.{os.getpid()}.part")
        try:
            tmp.write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
            os.replace(tmp, path)
        except OSError as e:
            print(f"RunRecorder: could not write {path}: {e}", file=sys.stderr)


def _tail(text, max_lines=40, max_chars=4000):
    return "\n".join(text.rstrip().splitlines()[-max_lines:])[-max_chars:]

"""
Synthetic runs for tests: typed Runs and Metrics built in microseconds, no archive, no git, no torch.

    best = make_run(2.43, status="keep")                       # a finished, measured cpu-profile run
    idea = make_run(2.40, code_sha="idea", speed=20.0)         # same harness and machine class, another code
    bare = make_run(2.45, measured=None)                       # archived by hand: val_bpb is train.py's own
    m = make_metrics(steps=30, loss=lambda s: 3.0 * 0.98 ** s)
"""
import dataclasses
import itertools

from harness.record import Measured, Run, StatusChange, Trained
from harness.stats import Metrics

CPU_HARNESS = {"profile": "cpu", "MAX_SEQ_LEN": 256, "TIME_BUDGET": 60, "EVAL_TOKENS": 65536,
               "VOCAB_SIZE": 2048, "overrides": {}}
BUDGET = 60.0          # training seconds of the cpu profile
STARTUP_S = 4.0        # imports and set-up, before the first metrics row
CURVE_S = 3.0          # in-training validation curve (timings["eval_s"])
HANDOFF_S = 1.0        # the model saved for the evaluator
WALL_S = STARTUP_S + BUDGET + CURVE_S + HANDOFF_S  # a run's wall seconds: start-up, training, curve, hand-off
_count = itertools.count(1)

_RUN = {f.name for f in dataclasses.fields(Run)}
_TRAINED = {f.name for f in dataclasses.fields(Trained)}


def make_run(val_bpb=2.43, *, status="pending", steps=30, speed=25.0, **overrides):
    """A finished cpu-profile run measured by the harness, archived after the one made before it. Keywords: any
    field of Run, Trained or Measured, plus status (one StatusChange), steps (num_steps), speed (both speed probes)."""
    n = next(_count)
    trained = dict(outcome="ok", reported_val_bpb=None, training_seconds=BUDGET, total_seconds=WALL_S,
                   num_steps=steps, peak_vram_mb=0.0, num_params_M=3.4, depth=4, config={"DEPTH": 4},
                   timings={"startup_s": STARTUP_S, "warmup_s": 0.0, "eval_s": CURVE_S, "final_eval_s": HANDOFF_S})
    meas = dict(val_bpb=val_bpb, heldout_bpb=None if val_bpb is None else val_bpb + 0.04, future_leak=0.0,
                speed_before=speed, speed_after=speed, eval_s=8.0, wall_s=WALL_S, first_row_s=STARTUP_S,
                outside_cpu_s=STARTUP_S)
    run = dict(id=f"r{n:06d}", commit=f"{n:040x}", description=f"run {n}", branch="autoresearch/test",
               worker="w", started_at=1000.0 * n, archived_at=1000.0 * n + 90, harness=CPU_HARNESS, gpu="cpu",
               code_sha="base", pin="p" * 40, harness_changes=[], caught=[], decision=None,
               statuses=[StatusChange(status, f"2025-01-01T00:{n % 60:02d}:00Z", "harness")], evidence={})
    for key, value in overrides.items():  # an unknown keyword goes to Measured(), which refuses it
        (run if key in _RUN else trained if key in _TRAINED else meas)[key] = value
    if run.get("measured", True) is None and trained["reported_val_bpb"] is None:
        trained["reported_val_bpb"] = val_bpb
    run.setdefault("trained", Trained(**trained))
    run.setdefault("measured", Measured(**meas))
    return Run(**run)


def history(*bpbs, code_sha="base", first="keep", **overrides):
    """Runs of one code, oldest first: the first kept (the best), the others its repeats, discarded."""
    return [make_run(b, code_sha=code_sha, status=first if i == 0 else "discard", **overrides)
            for i, b in enumerate(bpbs)]


def metrics_rows(steps=100, loss=None, step_ms=None, lr=None, val_every=0):
    """metrics.jsonl rows: loss(step), step_ms(step) and lr(step) are functions (defaults: a decaying loss, 100 ms
    a step, a linear warmdown over the last half); a val/bpb row, loss - 0.3, every `val_every` steps if > 0."""
    loss = loss or (lambda s: 2.5 + 4.0 / (1 + 0.05 * s))
    step_ms = step_ms or (lambda s: 100.0)
    lr = lr or (lambda s: min(1.0, 2 * (1 - s / steps)))
    rows, elapsed = [], 0.0
    for s in range(steps):
        elapsed += step_ms(s) / 1000
        rows.append({"step": s, "train/loss": float(loss(s)), "train/progress": (s + 1) / steps,
                     "train/lr_multiplier": float(lr(s)), "perf/step_time_ms": float(step_ms(s)), "elapsed_s": elapsed})
        if val_every and (s + 1) % val_every == 0:
            rows.append({"step": s + 1, "val/bpb": float(loss(s) - 0.3), "elapsed_s": elapsed})
    return rows


def make_metrics(steps=100, **kwargs):
    """Metrics of metrics_rows(steps, **kwargs)."""
    return Metrics(metrics_rows(steps, **kwargs))

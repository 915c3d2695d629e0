"""
Synthetic runs for tests: typed Runs and Metrics built in microseconds, no archive, no git, no torch.

    from tests.factory import make_run, make_metrics
    best = make_run(2.43, status="keep")                       # a finished, measured cpu-profile run
    idea = make_run(2.40, code_sha="idea", speed=20.0)         # same harness and machine class, another code
    bare = make_run(2.45, measured=None)                       # archived by hand: val_bpb is train.py's own
    m = make_metrics(steps=30, loss=lambda s: 3.0 * 0.98 ** s)

make_run's keywords: any field of Run, Trained or Measured (they go where they belong), plus
`status` (one StatusChange), `steps` (trained.num_steps), `speed` (both machine-speed probes) and
`outside_s` (wall seconds beyond training). Each run is archived after the one made before it.
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
_count = itertools.count(1)

_RUN = {f.name for f in dataclasses.fields(Run)}
_TRAINED = {f.name for f in dataclasses.fields(Trained)}
_MEASURED = {f.name for f in dataclasses.fields(Measured)}


def make_run(val_bpb=2.43, *, status="pending", steps=30, speed=25.0, outside_s=None, **overrides):
    """A run of the cpu profile that finished and was measured by the harness: its wall time is the start-up,
    BUDGET seconds of training, the curve and the hand-off, unless outside_s says how many seconds beyond
    training it took. measured=None: archived by hand, val_bpb is train.py's own (trained.reported_val_bpb)."""
    n = next(_count)
    outside = STARTUP_S + CURVE_S + HANDOFF_S if outside_s is None else outside_s
    trained = dict(outcome="ok", reported_val_bpb=None, training_seconds=BUDGET, total_seconds=BUDGET + outside,
                   num_steps=steps, peak_vram_mb=0.0, num_params_M=3.4, depth=4, config={"DEPTH": 4},
                   timings={"startup_s": STARTUP_S, "warmup_s": 0.0, "eval_s": CURVE_S, "final_eval_s": HANDOFF_S})
    meas = dict(val_bpb=val_bpb, heldout_bpb=None if val_bpb is None else val_bpb + 0.04, future_leak=0.0,
                speed_before=speed, speed_after=speed, eval_s=8.0, wall_s=BUDGET + outside, first_row_s=STARTUP_S,
                outside_cpu_s=STARTUP_S)
    run = dict(id=f"r{n:06d}", commit=f"{n:040x}", description=f"run {n}", branch="autoresearch/test",
               worker="w", started_at=1000.0 * n, archived_at=1000.0 * n + 90, harness=CPU_HARNESS, gpu="cpu",
               code_sha="base", pin="p" * 40, harness_changes=[], caught=[], decision=None,
               statuses=[StatusChange(status, f"2025-01-01T00:{n % 60:02d}:00Z", "harness")], evidence={})
    for key, value in overrides.items():
        target = run if key in _RUN else trained if key in _TRAINED else meas if key in _MEASURED else None
        if target is None:
            raise TypeError(f"make_run: {key!r} is a field of no Run, Trained or Measured")
        target[key] = value
    if run.get("measured", True) is None and trained["reported_val_bpb"] is None:
        trained["reported_val_bpb"] = val_bpb
    run.setdefault("trained", Trained(**trained))
    run.setdefault("measured", Measured(**meas))
    return Run(**run)


def history(*bpbs, code_sha="base", first="keep", **overrides):
    """Runs of one code, oldest first: the first kept (the best), the others its repeats, discarded."""
    return [make_run(b, code_sha=code_sha, status=first if i == 0 else "discard", **overrides)
            for i, b in enumerate(bpbs)]


def metrics_rows(steps=100, loss=None, step_ms=None, lr=None, val_every=0, val=None, start=0):
    """metrics.jsonl rows of a run of `steps` counted steps: loss(step), step_ms(step) and lr(step) are
    functions (defaults: a decaying loss, 100 ms a step, a linear warmdown over the last half); a val/bpb
    row every `val_every` steps when val_every > 0 (val(step), default loss - 0.3). Steps before `start`
    are untimed warm-up steps at progress 0."""
    loss = loss or (lambda s: 2.5 + 4.0 / (1 + 0.05 * s))
    step_ms = step_ms or (lambda s: 100.0)
    lr = lr or (lambda s: min(1.0, 2 * (1 - s / steps)))
    val = val or (lambda s: loss(s) - 0.3)
    rows, elapsed = [], 0.0
    for s in range(start + steps):
        counted = s >= start
        elapsed += step_ms(s) / 1000 if counted else 0.0
        progress = (s - start + 1) / steps if counted else 0.0
        rows.append({"step": s, "train/loss": float(loss(s)), "train/progress": progress,
                     "train/lr_multiplier": float(lr(s - start)), "perf/step_time_ms": float(step_ms(s)),
                     "elapsed_s": elapsed})
        if val_every and counted and (s - start + 1) % val_every == 0:
            rows.append({"step": s + 1, "val/bpb": float(val(s)), "elapsed_s": elapsed})
    return rows


def make_metrics(steps=100, **kwargs):
    """Metrics of metrics_rows(steps, **kwargs)."""
    return Metrics(metrics_rows(steps, **kwargs))

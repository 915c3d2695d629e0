"""
metrics.jsonl as columns, and what one run's curves say on their own: the smoothed loss and its
noise, stalls, loss spikes, the trend over the last tenth of training, throughput, per-layer medians.
"""
import json
from functools import cached_property
from pathlib import Path

import numpy as np

SMOOTH_BETA = 0.9          # EMA of train/loss (as train.py's train/loss_smooth) when that key is absent
STALL_FACTOR = 3.0         # a step slower than this many times the median step is a stall
SPIKE_WINDOW = 50          # trailing steps that a loss value is compared against
SPIKE_Z = 6.0              # robust z-score above which a loss value is a spike
TREND_MIN_STEPS = 20       # fewer training steps than this in the last tenth: too noisy to call a trend


def read_metrics(path):
    """(Metrics or None, notes). Unreadable lines are skipped and reported, never fatal."""
    path = Path(path)
    if not path.exists():
        return None, [f"{path} is missing: no training curves for this run"]
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    rows, bad = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            bad.append(number)
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
            rows.append(row)
        else:
            bad.append(number)
    notes = []
    last = max((i for i, line in enumerate(lines, 1) if line.strip()), default=0)
    if bad and bad[-1] == last and not raw.endswith(b"\n"):
        notes.append(f"{path}: the last line (line {last}) is half-written, the process stopped mid-write; skipped")
        bad = bad[:-1]
    if bad:
        notes.append(f"{path}: {len(bad)} unreadable line(s) skipped (lines {', '.join(map(str, bad[:5]))})")
    if not rows:
        notes.append(f"{path} holds no readable rows: no training curves for this run")
        return None, notes
    rows.sort(key=lambda r: r["step"])
    return Metrics(rows), notes


class Metrics:
    """Every key of metrics.jsonl as (row index, value) arrays, aligned to step and training progress."""

    def __init__(self, rows):
        columns = {}
        for i, row in enumerate(rows):
            for key, value in row.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    columns.setdefault(key, ([], []))
                    columns[key][0].append(i)
                    columns[key][1].append(float(value))
        self.columns = {k: (np.array(idx), np.array(vals)) for k, (idx, vals) in columns.items()}
        self.keys = list(dict.fromkeys(k for row in rows for k in row))
        self.step = np.array([float(r["step"]) for r in rows])
        if "train/progress" in self.columns:
            idx, prog = self.columns["train/progress"]
            self.progress = np.interp(self.step, self.step[idx], prog)  # rows without it: by step
            self.progress[idx] = prog  # a val row shares its step with the next training row, not its progress
        else:
            self.progress = self.step / max(self.step.max(), 1.0)

    def __contains__(self, key):
        return key in self.columns or (key == "train/loss_smooth" and "train/loss" in self.columns)

    def series(self, key):
        """(progress, step, values) over the rows that hold `key`."""
        if key == "train/loss_smooth" and key not in self.columns:
            return self.smooth_loss
        idx, values = self.columns.get(key, (np.zeros(0, int), np.zeros(0)))
        return self.progress[idx], self.step[idx], values

    @cached_property
    def smooth_loss(self):
        """train.py's debiased EMA when logged, else the same EMA computed here."""
        if "train/loss_smooth" in self.columns:
            return self.series("train/loss_smooth")
        p, s, loss = self.series("train/loss")
        ema, out = 0.0, np.empty_like(loss)
        for i, x in enumerate(loss):
            ema = SMOOTH_BETA * ema + (1 - SMOOTH_BETA) * x
            out[i] = ema / (1 - SMOOTH_BETA ** (i + 1))
        return p, s, out

    @cached_property
    def loss_noise(self):
        """Robust std of train/loss around its smoothed curve over the second half of training."""
        p, _, loss = self.series("train/loss")
        ps, _, smooth = self.smooth_loss
        if len(loss) < 10 or len(smooth) < 10:
            return None
        resid = loss - np.interp(p, ps, smooth)
        resid = resid[(p >= 0.5 * p.max()) & np.isfinite(resid)]
        if len(resid) < 5:
            return None
        return float(1.4826 * np.median(np.abs(resid - np.median(resid))))

    @cached_property
    def training_progress(self):
        """Progress of the training rows (those holding train/loss) that count against the budget: the
        warm-up (compile) steps before the clock starts all sit at progress 0."""
        p = self.series("train/loss")[0] if "train/loss" in self.columns else self.progress
        return p[p > 0]

    @property
    def start(self):
        """First positive training progress; before it, runs can only be aligned by step."""
        p = self.training_progress
        return float(p.min()) if len(p) else 0.0

    @property
    def progress_per_step(self):
        """Typical progress one training step adds (its time over the budget), or None."""
        p = self.training_progress
        return float(np.median(np.diff(p))) if len(p) >= 2 else None

    @cached_property
    def stalls(self):
        """[(step, progress, ms)] of the counted steps slower than STALL_FACTOR x their median."""
        return self.slow_steps(self.median_step_ms)

    @cached_property
    def median_step_ms(self):
        """Median time of the counted steps, or None."""
        ms = counted(self, "perf/step_time_ms")[2]
        return float(np.median(ms)) if len(ms) else None

    def slow_steps(self, reference_ms):
        """[(step, progress, ms)] of the counted steps slower than STALL_FACTOR x reference_ms: the run's
        own median, or the same code's median on an undisturbed run, against which a run slowed down
        at every step shows every step."""
        p, step, ms = counted(self, "perf/step_time_ms")
        if not len(ms) or not reference_ms:
            return []
        slow = np.flatnonzero(ms > STALL_FACTOR * reference_ms)
        return [(int(step[i]), float(p[i]), float(ms[i])) for i in slow]

    def layer_keys(self):
        """{stat: {name: key}} for keys layer/<name>/<stat>."""
        out = {}
        for key in self.columns:
            parts = key.split("/")
            if parts[0] == "layer" and len(parts) >= 3:
                out.setdefault(parts[-1], {})["/".join(parts[1:-1])] = key
        return out


# ---------------------------------------------------------------------------
# One run's statistics (pure functions of its Metrics)

def counted(m, key):
    """(progress, step, values) of `key` over the counted training steps, finite values only. The
    warm-up/compile steps sit at progress 0, outside the budget (the summary's warmup_s)."""
    p, step, v = m.series(key)
    ok = (p > 0) & np.isfinite(v)
    return p[ok], step[ok], v[ok]


def throughput_stats(m):
    """Medians over the counted training steps: step time, tokens/s, MFU; and the stalls among them."""
    ms = counted(m, "perf/step_time_ms")[2]
    if not len(ms):
        return {}

    def median_of(key):
        values = counted(m, key)[2]
        return float(np.median(values)) if len(values) else None

    return {"step_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)),
            "tokens_per_sec": median_of("perf/tokens_per_sec"), "mfu": median_of("perf/mfu_percent"),
            "stalls": m.stalls}


def loss_spikes(step, progress, loss):
    """Loss values far above the trailing window's median, in robust z-scores; consecutive spike
    steps are one event, reported at its peak."""
    if len(loss) <= SPIKE_WINDOW:
        return []
    x = np.where(np.isfinite(loss), loss, np.nan)
    windows = np.lib.stride_tricks.sliding_window_view(x[:-1], SPIKE_WINDOW)
    med = np.nanmedian(windows, axis=1)
    mad = np.nanmedian(np.abs(windows - med[:, None]), axis=1)
    scale = np.maximum(1.4826 * mad, 1e-3 * np.abs(med) + 1e-8)
    z = (x[SPIKE_WINDOW:] - med) / scale
    hits = np.flatnonzero(z > SPIKE_Z) + SPIKE_WINDOW
    events = []
    for i in hits:
        if events and i - events[-1][-1] <= 3:
            events[-1].append(i)
        else:
            events.append([i])
    out = []
    for ev in events:
        i = max(ev, key=lambda j: z[j - SPIKE_WINDOW])
        out.append({"step": int(step[i]), "progress": float(progress[i]), "loss": float(loss[i]),
                    "baseline": float(med[i - SPIKE_WINDOW]), "z": float(z[i - SPIKE_WINDOW])})
    return out


def last_tenth_trend(metrics):
    """Fitted change of train/loss over the last tenth of progress, as a fraction of the final loss.
    {"steps": n} alone when the tenth holds under TREND_MIN_STEPS steps: a line through a few noisy
    losses says nothing (7 steps read as "rising" while the smoothed loss was at its minimum)."""
    p, _, loss = metrics.series("train/loss") if "train/loss" in metrics.columns else metrics.smooth_loss
    keep = (p >= p.max() - 0.1) & np.isfinite(loss)
    steps = int(keep.sum())
    if steps < TREND_MIN_STEPS:
        return {"steps": steps}
    slope = np.polyfit(p[keep], loss[keep], 1)[0]
    change = slope * 0.1
    final = float(np.median(loss[keep][-max(steps // 10, 1):]))
    return {"steps": steps, "slope": float(slope), "change": float(change),
            "fraction": float(change / final) if final else 0.0, "window": (float(p.max() - 0.1), float(p.max()))}


def layer_medians(m, names):
    """{name: median over the second half of training}, NaN when a value there is NaN/inf."""
    values = {}
    for name, key in names.items():
        p, _, v = m.series(key)
        v = v[p >= 0.5 * p.max()] if len(p) else v
        values[name] = float(np.median(v)) if len(v) and np.isfinite(v).all() else float("nan")
    return values

"""
The figures a run is judged and explained by, one function each; the decision, analysis.md, the lines
`analyze.py run` prints and progress.png all read them, so no two can disagree.

    band = noise(runs, run).band         # val_bpb, one run against one other
    m = machine(run, best_runs)          # this run's machine speed against the best's runs; m.moved()

A figure set against the best comes with the spread of the same quantity over the best's own repeats
(Versus.spread, Machine.spread, equal_step_spread): a difference within it is noise, and no cause is given
for it. A best run once has no spread, so nothing is attributed yet.
"""
import json
from dataclasses import dataclass
from functools import cached_property
from itertools import combinations
from pathlib import Path

import numpy as np

from harness.record import number

SMOOTH_BETA = 0.9          # EMA of train/loss (as train.py's train/loss_smooth) when that key is absent
STALL_FACTOR = 3.0         # a step slower than this many times the median step is a stall
SPIKE_WINDOW = 50          # trailing steps that a loss value is compared against
SPIKE_Z = 6.0              # robust z-score above which a loss value is a spike
TREND_MIN_STEPS = 20       # fewer training steps than this in the last tenth: too noisy to call a trend
NOISE_SIGMAS = 3.25        # the band: ±3.25 std of a difference of means (decide.py's keep; simulate() shows why)
MACHINE_DRIFT = 0.10       # a machine off the best's runs' median speed by more than 10% (and their spread) moved
PROBE_SPREAD = 0.25        # ... as did one whose two probes (before and after the evaluation) are 25% apart
GRID_POINTS = 200          # common training-progress grid on which two runs are compared
DEPARTURE_SIGMAS = 3.0     # smoothed losses "differ" beyond this many sigmas of their combined noise
DEPARTURE_HOLD = 5         # ... for this many consecutive points (one blip is not a departure)
LR_APART = 0.1             # LR multipliers further apart than this at one step: the schedules have parted

# metrics.jsonl as columns

def read_metrics(path):
    """(Metrics or None, notes). Unreadable lines are skipped and reported, never fatal."""
    path = Path(path)
    if not path.exists():
        return None, [f"{path} is missing: no training curves for this run"]
    raw = path.read_bytes()
    rows, bad, last = [], [], 0
    for i, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        last = i
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            row = None
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
            rows.append(row)
        else:
            bad.append(i)
    notes = []
    if bad and bad[-1] == last and not raw.endswith(b"\n"):
        notes.append(f"{path}: the last line (line {last}) is half-written, the process stopped mid-write; skipped")
        bad = bad[:-1]
    if bad:
        notes.append(f"{path}: {len(bad)} unreadable line(s) skipped (lines {', '.join(map(str, bad[:5]))})")
    if not rows:
        return None, notes + [f"{path} holds no readable rows: no training curves for this run"]
    return Metrics(sorted(rows, key=lambda r: r["step"])), notes


class Metrics:
    """Every key of metrics.jsonl as (row index, value) arrays, aligned to step and training progress."""

    def __init__(self, rows):
        columns = {}
        for i, row in enumerate(rows):
            for key, value in row.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    columns.setdefault(key, []).append((i, float(value)))
        self.columns = {k: tuple(map(np.array, zip(*pairs))) for k, pairs in columns.items()}
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
        return float(1.4826 * np.median(np.abs(resid - np.median(resid)))) if len(resid) >= 5 else None

    @property
    def start(self):
        """First positive training progress (the warm-up steps sit at 0, outside the budget)."""
        return float(p.min()) if len(p := counted(self, "train/loss")[0]) else 0.0

    @property
    def progress_per_step(self):
        """Typical progress one training step adds (its time over the budget), or None."""
        return float(np.median(np.diff(p))) if len(p := counted(self, "train/loss")[0]) >= 2 else None

    @cached_property
    def stalls(self):
        """[(step, progress, ms)] of the counted steps slower than STALL_FACTOR x their median."""
        p, step, ms = counted(self, "perf/step_time_ms")
        slow = np.flatnonzero(ms > STALL_FACTOR * np.median(ms)) if len(ms) else []
        return [(int(step[i]), float(p[i]), float(ms[i])) for i in slow]

    def layer_keys(self):
        """{stat: {name: key}} for keys layer/<name>/<stat>."""
        out = {}
        for key in (k for k in self.columns if k.startswith("layer/") and k.count("/") >= 2):
            name, stat = key.removeprefix("layer/").rsplit("/", 1)
            out.setdefault(stat, {})[name] = key
        return out


def finite(series, counted=False):
    """(progress, step, values) of a series without its NaN/inf values (and, counted: its warm-up steps)."""
    p, step, v = series
    ok = np.isfinite(v) & ((p > 0) if counted else True)
    return p[ok], step[ok], v[ok]


def counted(m, key):
    """(progress, step, values) of `key` over the counted training steps (progress > 0), finite values only."""
    return finite(m.series(key), counted=True)


def throughput_stats(m):
    """Medians over the counted training steps: step time, tokens/s, MFU; and the stalls among them."""
    ms = counted(m, "perf/step_time_ms")[2]
    tps, mfu = (float(np.median(v)) if len(v := counted(m, k)[2]) else None
                for k in ("perf/tokens_per_sec", "perf/mfu_percent"))
    return {"step_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)), "tokens_per_sec": tps,
            "mfu": mfu, "stalls": m.stalls} if len(ms) else {}


def loss_spikes(step, progress, loss):
    """Loss values far above the trailing window's median, in robust z-scores; consecutive spike steps are
    one event, reported at its peak."""
    if len(loss) <= SPIKE_WINDOW:
        return []
    x = np.where(np.isfinite(loss), loss, np.nan)
    windows = np.lib.stride_tricks.sliding_window_view(x[:-1], SPIKE_WINDOW)
    med = np.nanmedian(windows, axis=1)
    mad = np.nanmedian(np.abs(windows - med[:, None]), axis=1)
    z = (x[SPIKE_WINDOW:] - med) / np.maximum(1.4826 * mad, 1e-3 * np.abs(med) + 1e-8)
    hits = np.flatnonzero(z > SPIKE_Z)
    events = np.split(hits, np.flatnonzero(np.diff(hits) > 3) + 1) if len(hits) else []
    peaks = [ev[np.argmax(z[ev])] for ev in events]
    return [{"step": int(step[j + SPIKE_WINDOW]), "progress": float(progress[j + SPIKE_WINDOW]),
             "loss": float(loss[j + SPIKE_WINDOW]), "baseline": float(med[j]), "z": float(z[j])} for j in peaks]


def last_tenth_trend(m):
    """Fitted change of train/loss over the last tenth of progress, as a fraction of the final loss;
    {"steps": n} alone when the tenth holds under TREND_MIN_STEPS steps (a few noisy losses say nothing)."""
    p, _, loss = m.series("train/loss") if "train/loss" in m.columns else m.smooth_loss
    keep = (p >= p.max() - 0.1) & np.isfinite(loss)
    steps = int(keep.sum())
    if steps < TREND_MIN_STEPS:
        return {"steps": steps}
    slope = np.polyfit(p[keep], loss[keep], 1)[0]
    final = float(np.median(loss[keep][-max(steps // 10, 1):]))
    return {"steps": steps, "slope": float(slope), "change": float(slope * 0.1),
            "fraction": float(slope * 0.1 / final) if final else 0.0, "window": (float(p.max() - 0.1), float(p.max()))}


def layer_medians(m, names):
    """{name: median over the second half of training}, NaN when a value there is NaN/inf."""
    def median(p, _, v):
        v = v[p >= 0.5 * p.max()] if len(p) else v
        return float(np.median(v)) if len(v) and np.isfinite(v).all() else float("nan")
    return {name: median(*m.series(key)) for name, key in names.items()}


# Which runs compare, and the val_bpb noise band
def comparable(runs, run):
    """The finished runs that `run` is measured against: a val_bpb, neither invalid nor crash, the same
    harness and the same device class."""
    return [r for r in runs if r.val_bpb is not None and r.status not in ("invalid", "crash")
            and r.harness == run.harness and r.gpu == run.gpu]  # equal dicts: equal harness_key


def as_of(runs, run):
    """The runs archived no later than `run`, and `run` itself: the history it was decided on."""
    return [r for r in runs if r.archived_at <= run.archived_at and r.id != run.id] + [run]


def code_runs(runs, code_sha):
    """The runs of one code (comments aside)."""
    return [r for r in runs if r.code_sha == code_sha]


@dataclass
class Noise:
    """val_bpb's run-to-run noise as known when one run was archived: every code run twice or more
    counts, every run of it (a run on a busier machine too: the best and the challenger alike)."""
    groups: dict             # code_sha -> its comparable runs, oldest first
    pooled_std: float | None  # std of one run's val_bpb around its code's mean
    runs: int                # runs in the codes with repeats
    dof: int

    @property
    def band(self):
        """One run against one other run."""
        return difference_band(self.pooled_std, 1, 1)


def noise(runs, run):
    """The ONE noise band: pooled std of val_bpb over the repeats of each code, under run's harness and
    device class, whichever worker made them, among the runs archived up to `run`."""
    groups = {}
    for r in comparable(as_of(runs, run), run):
        groups.setdefault(r.code_sha, []).append(r)
    repeated = [np.array([r.val_bpb for r in g]) for g in groups.values() if len(g) >= 2]
    dof = sum(len(g) - 1 for g in repeated)
    std = float(np.sqrt(sum(((g - g.mean()) ** 2).sum() for g in repeated) / dof)) if dof else None
    return Noise(groups, std, sum(map(len, repeated)), dof)


def difference_band(std, n=1, m=1, sigmas=NOISE_SIGMAS):
    """Band for a mean of n runs minus a mean of m runs: sigmas x std x sqrt(1/n + 1/m)."""
    return None if std is None or not n or not m else float(sigmas * std * np.sqrt(1 / n + 1 / m))


# A run's figures against the best's runs, with their spread over the best's repeats
@dataclass
class Versus:
    """One quantity of a run against the mean of the same quantity over the best's runs."""
    value: float
    usual: float             # mean over the best's runs
    spread: float | None     # (max - min) / usual over the best's runs; None under two of them
    runs: int

    @property
    def change(self):
        return self.value / self.usual - 1

    @property
    def beyond(self):
        """The difference exceeds what the best's own repeats showed (never, without a spread)."""
        return self.spread is not None and abs(self.change) > self.spread


def versus(run, ref_runs, of):
    """Versus of the quantity of(run) against the best's runs (run itself left out), or None."""
    ref = [v for r in ref_runs if r.id != run.id and (v := of(r))]
    if not of(run) or not ref:
        return None
    usual = float(np.mean(ref))
    return Versus(float(of(run)), usual, (max(ref) - min(ref)) / usual if len(ref) >= 2 else None, len(ref))


def steps_vs(run, ref_runs):
    """Training steps of this run against the best's runs."""
    return versus(run, ref_runs, lambda r: r.steps)


def step_ms(run):
    """Mean milliseconds of a counted step: training seconds over steps (versus(run, ref, step_ms))."""
    t, n = run.trained.training_seconds, run.steps
    return 1000 * t / n if t and n else None


@dataclass
class Machine:
    """This run's machine against the best's runs, by the evaluator's fixed matmul (GFLOP/s)."""
    speed: float | None      # this run's: the mean of its two probes
    usual: float | None      # median over the best's runs
    runs: int                # the best's runs with a speed
    probes: tuple | None     # (before, after) of this run's evaluation
    spread: float | None     # (max - min) / usual of the best's runs' speeds; None under two

    @property
    def drift(self):
        return None if self.speed is None or self.usual is None else self.speed / self.usual - 1

    @property
    def probe_change(self):
        return None if not self.probes else self.probes[1] / self.probes[0] - 1

    def moved(self):
        """Why this run's machine was not the best's runs' machine, one phrase; None when nothing says so."""
        limit = max(MACHINE_DRIFT, self.spread or 0.0)
        if self.drift is not None and abs(self.drift) > limit:
            return (f"the machine ran {abs(self.drift):.0%} {'faster' if self.drift > 0 else 'slower'} than during "
                    f"the best's runs ({self.speed:,.0f} vs {self.usual:,.0f} GFLOP/s, limit {limit:.0%})")
        if self.probe_change is not None and abs(self.probe_change) > PROBE_SPREAD:
            return (f"the machine's speed changed by {self.probe_change:+.0%} during the run's evaluation "
                    f"({self.probes[0]:,.0f} -> {self.probes[1]:,.0f} GFLOP/s)")


def machine(run, ref_runs):
    """The ONE definition of this run's machine against the best's runs (itself left out)."""
    speeds = [r.measured.speed for r in ref_runs if r.id != run.id and r.measured and r.measured.speed]
    probes = (number(run.measured.speed_before), number(run.measured.speed_after)) if run.measured else (None,)
    usual = float(np.median(speeds)) if speeds else None
    return Machine(run.measured.speed if run.measured else None, usual, len(speeds),
                   probes if all(p and p > 0 for p in probes) else None,
                   (max(speeds) - min(speeds)) / usual if len(speeds) >= 2 else None)


# Learning per step: the smoothed loss at equal steps
@dataclass
class StepGap:
    """Smoothed train loss of run a minus run b at equal steps, and at equal progress."""
    step: int               # the last step both runs reached
    gap: float              # a - b there (negative: a is ahead)
    lr: tuple | None        # (a's, b's) LR multiplier at that step, when both logged it
    judged_step: int        # where learning per step is judged: the last step at which the LR schedules agree
    judged_gap: float
    threshold: float        # |gap| beyond this is more than the losses' noise
    progress_gap: float     # a - b at the last training progress both reached


def step_gaps(a, b):
    """(steps, a - b smoothed loss, (a's, b's) LR multipliers or None) up to the last step both reached, and
    a - b at the last progress both reached; or None."""
    (pa, sa, va), (pb, sb, vb) = finite(a.smooth_loss), finite(b.smooth_loss)
    if not len(sa) or not len(sb):
        return None
    steps, hi = sa[sa <= min(sa.max(), sb.max())], min(pa.max(), pb.max())
    lr = [(s, v) for _, s, v in (finite(m.series("train/lr_multiplier")) for m in (a, b)) if len(s)]
    lr = np.array([np.interp(steps, s, v) for s, v in lr]) if len(lr) == 2 else None
    return steps, np.interp(steps, sa, va) - np.interp(steps, sb, vb), lr, np.interp(hi, pa, va) - np.interp(hi, pb, vb)


def loss_threshold(a, b):
    """DEPARTURE_SIGMAS x the noise of the difference of two smoothed losses."""
    sd = [n for n in (a.loss_noise, b.loss_noise) if n is not None]
    ema = np.sqrt((1 - SMOOTH_BETA) / (1 + SMOOTH_BETA))  # an EMA shrinks white noise by this
    return max(DEPARTURE_SIGMAS * float(np.sqrt(np.mean(np.square(sd)) * 2)) * ema if sd else 0.0, 1e-4)


def equal_steps(a, b):
    """a's smoothed loss against b's at equal steps, or None. The LR schedules run on progress, so a run with
    more steps is still at a high LR where the other has annealed: learning per step is judged at the last
    step where the multipliers are within LR_APART."""
    if (gaps := step_gaps(a, b)) is None:
        return None
    steps, gap, lr, progress_gap = gaps
    agree = np.flatnonzero(np.abs(lr[0] - lr[1]) <= LR_APART) if lr is not None else []
    judged = int(agree[-1]) if len(agree) else len(steps) - 1
    lr = None if lr is None else (float(lr[0, -1]), float(lr[1, -1]))
    return StepGap(int(steps[-1]), float(gap[-1]), lr, int(steps[judged]), float(gap[judged]),
                   loss_threshold(a, b), float(progress_gap))


def equal_step_spread(ref_metrics):
    """The largest |judged gap| at equal steps between two of the best's repeats, or None under two: a gap
    of a challenger within it is noise (the same code, bit-identical early on, parts by its schedule)."""
    gaps = [g.judged_gap for a, b in combinations(ref_metrics, 2) if (g := equal_steps(a, b))]
    return max(map(abs, gaps)) if gaps else None


def departure(gap, threshold, hold=DEPARTURE_HOLD):
    """First index from which |gap| exceeds threshold (a number or one per point) at `hold` points in a row."""
    over = np.abs(gap) > threshold
    return next((i for i in range(len(gap) - hold + 1) if over[i:i + hold].all()), None)


def compare_steps(a, b):
    """(steps, gap, first departing index or None, threshold, first index where the LR schedules part or
    None): where a's smoothed loss leaves b's at equal steps; None without two curves."""
    if (gaps := step_gaps(a, b)) is None:
        return None
    steps, gap, lr, _ = gaps
    threshold = loss_threshold(a, b)
    parted = np.flatnonzero(np.abs(lr[0] - lr[1]) > LR_APART) if lr is not None else []
    return steps, gap, departure(gap, threshold), threshold, int(parted[0]) if len(parted) else None


def compare_curves(a, b, key="train/loss_smooth", threshold=None):
    """(progress points, a - b gap there, first departing index or None, threshold per point) of one curve
    on training progress from the later of the two runs' first counted step, or None without overlap. The
    threshold is the noise (loss_threshold, or `threshold`: the val_bpb band for val/bpb) plus the gap that
    one step of misalignment makes where the curve is steep."""
    if key not in a or key not in b:
        return None
    (pa, _, va), (pb, _, vb) = finite(a.series(key)), finite(b.series(key))
    lo, hi = max(a.start, b.start), min(pa.max(initial=0.0), pb.max(initial=0.0))
    if not len(pa) or not len(pb) or hi <= lo:
        return None
    sparse = key != "train/loss_smooth"
    points = pa[(pa >= lo) & (pa <= hi)] if sparse else np.linspace(lo, hi, GRID_POINTS)
    half = max(a.progress_per_step or 0.0, b.progress_per_step or 0.0) / 2
    slack = np.abs(np.interp(points + half, pb, vb) - np.interp(points - half, pb, vb))
    limit = (loss_threshold(a, b) if threshold is None else threshold) + slack
    gap = np.interp(points, pa, va) - np.interp(points, pb, vb)
    return points, gap, departure(gap, limit, 2 if sparse else DEPARTURE_HOLD), limit

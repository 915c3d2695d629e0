"""
The figures a run is judged and explained by, one function each: the decision, analysis.md, the lines
`analyze.py run` prints and progress.png all read them, so no two can disagree. A figure set against the
best comes with the spread of the same quantity over the best's repeats: a difference within it is noise.

    band = noise(runs, run).band         # val_bpb, one run against one other
    m = machine(run, best_runs)          # this run's machine speed against the best's runs; m.moved()
"""
import json
from dataclasses import dataclass
from functools import cached_property
from itertools import accumulate, combinations

import numpy as np

SMOOTH_BETA = 0.9          # EMA of train/loss (as train.py's train/loss_smooth) when that key is absent
SPIKE_WINDOW = 50          # trailing steps that a loss value is compared against
SPIKE_Z = 6.0              # robust z-score above which a loss value is a spike
TREND_MIN_STEPS = 20       # fewer training steps than this in the last tenth: too noisy to call a trend
NOISE_SIGMAS = 3.25        # the band: ±3.25 std of a difference of means (decide.py's keep; tests/bench.py shows why)
MACHINE_DRIFT = 0.10       # a machine off the best's runs' median speed by more than 10% (and their spread) moved
PROBE_SPREAD = 0.25        # ... as did one whose two probes (before and after the evaluation) are 25% apart
STEPS_DRIFT = 0.02         # step counts within 2% of the best's runs' mean (or their spread) are reruns' noise
GRID_POINTS = 200          # common training-progress grid on which two runs are compared
DEPARTURE_SIGMAS = 3.0     # smoothed losses "differ" beyond this many sigmas of their combined noise
DEPARTURE_HOLD = 5         # ... for this many consecutive points (one blip is not a departure)
LR_APART = 0.1             # LR multipliers further apart than this at one step: the schedules have parted
SPREAD_REPEATS = 8         # the best's most recent repeats whose equal-step gaps, pair by pair, make the spread


def read_metrics(path):
    """(Metrics or None, notes). Unreadable lines are skipped and reported, never fatal."""
    if not path.exists():
        return None, [f"{path} is missing: no training curves for this run"]
    raw = path.read_bytes()
    rows, bad, notes = [], [], []
    for i, line in enumerate(raw.split(b"\n"), 1):
        try:
            row = json.loads(line)
        except ValueError:  # not JSON, not UTF-8, or blank
            row = None
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
            rows.append(row)
        elif line.strip():
            bad.append(i)
    if bad and bad[-1] == raw.count(b"\n") + 1:  # a bad line after the last newline: cut off mid-write
        notes.append(f"{path}: the last line (line {bad.pop()}) is half-written (stopped mid-write): skipped")
    if bad:
        notes.append(f"{path}: {len(bad)} unreadable line(s) skipped (lines {', '.join(map(str, bad[:5]))})")
    if not rows:
        return None, notes + [f"{path} holds no readable rows: no training curves for this run"]
    return Metrics(sorted(rows, key=lambda r: r["step"])), notes


class Metrics:
    """Every numeric key of metrics.jsonl as a (progress, step, values) series over the rows that hold it.
    train/loss_smooth is train.py's debiased EMA of train/loss, or, when not logged, the same EMA computed here."""

    def __init__(self, rows):
        cells = {}
        for i, row in enumerate(rows):
            for key, value in row.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    cells.setdefault(key, []).append((i, float(value)))
        columns = {k: (np.array([i for i, _ in c]), np.array([v for _, v in c])) for k, c in cells.items()}
        step = np.array([float(r["step"]) for r in rows])
        if "train/progress" in columns:
            idx, prog = columns["train/progress"]
            progress = np.interp(step, step[idx], prog)  # rows without it: by step
            progress[idx] = prog  # a val row shares its step with the next training row, not its progress
        else:
            progress = step / max(step.max(), 1.0)
        self.columns = {k: (progress[idx], step[idx], v) for k, (idx, v) in columns.items()}
        if "train/loss_smooth" not in self.columns and "train/loss" in self.columns:
            p, s, loss = self.columns["train/loss"]
            ema = list(accumulate(loss, lambda e, x: SMOOTH_BETA * e + (1 - SMOOTH_BETA) * x, initial=0.0))[1:]
            self.columns["train/loss_smooth"] = (p, s, np.array(ema) / (1 - SMOOTH_BETA ** np.arange(1, len(p) + 1)))

    def series(self, key):
        return self.columns.get(key, (np.zeros(0), np.zeros(0), np.zeros(0)))

    def finite(self, key, counted=False):
        """series(key) without its NaN/inf values (and, counted: without the warm-up steps, at progress 0)."""
        p, step, v = self.series(key)
        ok = np.isfinite(v) & ((p > 0) if counted else True)
        return p[ok], step[ok], v[ok]

    @cached_property
    def loss_noise(self):
        """Robust std of train/loss around its smoothed curve over the second half of training."""
        p, _, loss = self.series("train/loss")
        ps, _, smooth = self.series("train/loss_smooth")
        if len(loss) < 10 or len(smooth) < 10:
            return None
        resid = loss - np.interp(p, ps, smooth)
        resid = resid[(p >= 0.5 * p.max()) & np.isfinite(resid)]
        return float(1.4826 * np.median(np.abs(resid - np.median(resid)))) if len(resid) >= 5 else None


def loss_spikes(m):
    """train/loss values far above the trailing window's median, in robust z-scores; a run of spikes is one event."""
    progress, step, loss = m.series("train/loss")
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
    """Fitted change of train/loss over the last tenth of progress, and as a fraction of the final loss;
    {"steps": n} alone when the tenth holds under TREND_MIN_STEPS steps (a few noisy losses say nothing)."""
    p, _, loss = m.series("train/loss" if "train/loss" in m.columns else "train/loss_smooth")
    keep = (p >= p.max() - 0.1) & np.isfinite(loss)
    steps = int(keep.sum())
    if steps < TREND_MIN_STEPS:
        return {"steps": steps}
    change = float(np.polyfit(p[keep], loss[keep], 1)[0] * 0.1)
    final = float(np.median(loss[keep][-max(steps // 10, 1):]))
    return {"steps": steps, "change": change, "fraction": change / final if final else 0.0}


def layer_medians(m):
    """{stat: {name: median over the second half of training (NaN if any is NaN/inf)}} of layer/<name>/<stat>."""
    out = {}
    for key, (p, _, v) in m.columns.items():
        if key.startswith("layer/") and key.count("/") >= 2:
            name, stat = key.removeprefix("layer/").rsplit("/", 1)
            v = v[p >= 0.5 * p.max()]
            out.setdefault(stat, {})[name] = float(np.median(v)) if len(v) and np.isfinite(v).all() else float("nan")
    return out


# Which runs compare, and the val_bpb noise band
def comparable(runs, run):
    """The finished runs `run` is measured against: a val_bpb, not invalid or crash, its harness and device class."""
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
    """val_bpb's run-to-run noise as known when one run was archived."""
    groups: dict             # code_sha -> its comparable runs, oldest first
    pooled_std: float | None  # std of one run's val_bpb around its code's mean
    runs: int                # runs in the codes with repeats
    dof: int
    band: float | None       # one run against one other run


def noise(runs, run):
    """The ONE noise band: pooled std of val_bpb over the repeats of each code, under run's harness and device
    class, whichever worker made them (a run on a busier machine too), among the runs archived up to `run`."""
    groups = {}
    for r in comparable(as_of(runs, run), run):
        groups.setdefault(r.code_sha, []).append(r)
    repeated = [np.array([r.val_bpb for r in g]) for g in groups.values() if len(g) >= 2]
    dof = sum(len(g) - 1 for g in repeated)
    std = float(np.sqrt(sum(((g - g.mean()) ** 2).sum() for g in repeated) / dof)) if dof else None
    return Noise(groups, std, sum(map(len, repeated)), dof, difference_band(std))


def difference_band(std, n=1, m=1, sigmas=NOISE_SIGMAS):
    """Band for a mean of n runs minus a mean of m runs: sigmas x std x sqrt(1/n + 1/m)."""
    return None if std is None or not n or not m else float(sigmas * std * np.sqrt(1 / n + 1 / m))


# A run's figures against the best's runs, with their spread over the best's repeats
@dataclass
class Versus:
    """Training steps of a run against the best's runs: a change within `limit` is reruns' noise."""
    usual: float             # mean over the best's runs
    spread: float | None     # (max - min) / usual over the best's runs; None under two of them
    runs: int
    change: float            # steps / usual - 1
    limit: float             # max(STEPS_DRIFT, spread): two or three repeats can agree by chance far closer than reruns
    beyond: bool             # |change| beyond the limit; never without a spread (one run of the best shows no noise)


def steps_vs(run, ref_runs):
    """Training steps of this run against the best's runs (itself left out), or None."""
    ref = [r.steps for r in ref_runs if r.id != run.id and r.steps]
    if not run.steps or not ref:
        return None
    usual = float(np.mean(ref))
    spread = (max(ref) - min(ref)) / usual if len(ref) >= 2 else None
    change, limit = run.steps / usual - 1, max(STEPS_DRIFT, spread or 0.0)
    return Versus(usual, spread, len(ref), change, limit, spread is not None and abs(change) > limit)


@dataclass
class Machine:
    """This run's machine against the best's runs, by the evaluator's fixed matmul (GFLOP/s)."""
    speed: float | None      # this run's: the mean of its two probes
    usual: float | None      # median over the best's runs
    runs: int                # the best's runs with a speed
    probes: tuple | None     # (before, after) of this run's evaluation
    spread: float | None     # (max - min) / usual of the best's runs' speeds; None under two
    drift: float | None      # speed / usual - 1
    limit: float             # the drift beyond which the machine moved: max(MACHINE_DRIFT, spread)

    def moved(self):
        """Why this run's machine was not the best's runs' machine, one phrase; None when nothing says so."""
        if self.drift is not None and abs(self.drift) > self.limit:
            return (f"the machine ran {abs(self.drift):.0%} {'faster' if self.drift > 0 else 'slower'} than during "
                    f"the best's runs ({self.speed:,.0f} vs {self.usual:,.0f} GFLOP/s, limit {self.limit:.0%})")
        if self.probes and abs(change := self.probes[1] / self.probes[0] - 1) > PROBE_SPREAD:
            return (f"the machine's speed changed by {change:+.0%} during the run's evaluation "
                    f"({self.probes[0]:,.0f} -> {self.probes[1]:,.0f} GFLOP/s)")


def machine(run, ref_runs):
    """The ONE definition of this run's machine against the best's runs (itself left out)."""
    speeds = [r.measured.speed for r in ref_runs if r.id != run.id and r.measured and r.measured.speed]
    speed = run.measured.speed if run.measured else None
    probes = (run.measured.speed_before, run.measured.speed_after) if run.measured else (None,)
    usual = float(np.median(speeds)) if speeds else None
    spread = (max(speeds) - min(speeds)) / usual if len(speeds) >= 2 else None
    drift = None if speed is None or usual is None else speed / usual - 1
    return Machine(speed, usual, len(speeds), probes if all(p and p > 0 for p in probes) else None, spread, drift,
                   max(MACHINE_DRIFT, spread or 0.0))


# Learning per step: the smoothed loss at equal steps, and where curves part
def loss_threshold(a, b):
    """DEPARTURE_SIGMAS x the noise of the difference of two smoothed losses."""
    sd = [n for n in (a.loss_noise, b.loss_noise) if n is not None]
    ema = np.sqrt((1 - SMOOTH_BETA) / (1 + SMOOTH_BETA))  # an EMA shrinks white noise by this
    return max(DEPARTURE_SIGMAS * float(np.sqrt(np.mean(np.square(sd)) * 2)) * ema if sd else 0.0, 1e-4)


def departure(gap, threshold, hold=DEPARTURE_HOLD):
    """First index from which |gap| exceeds threshold (a number or one per point) at `hold` points in a row."""
    over = np.abs(gap) > threshold
    return next((i for i in range(len(gap) - hold + 1) if over[i:i + hold].all()), None)


@dataclass
class StepGap:
    """Smoothed train loss of run a minus run b at each step both reached. The LR schedules run on progress, so the
    run with more steps anneals later: learning per step is judged where the multipliers are within LR_APART."""
    steps: np.ndarray
    gaps: np.ndarray         # a - b at each step (negative: a is ahead)
    lr: tuple | None         # (a's, b's) LR multiplier at the last step, when both logged it
    judged: int              # index of the last step at which the LR schedules agree
    parted: int | None       # index of the first step at which they do not
    departs: int | None      # index from which the gap stays beyond the threshold (departure())
    threshold: float         # |gap| beyond this is more than the losses' noise
    progress_gap: float      # a - b at the last training progress both reached


def equal_steps(a, b):
    """a's smoothed loss against b's at equal steps (a StepGap), or None without two curves."""
    (pa, sa, va), (pb, sb, vb) = (m.finite("train/loss_smooth") for m in (a, b))
    if not len(sa) or not len(sb):
        return None
    steps, hi = sa[sa <= min(sa.max(), sb.max())], min(pa.max(), pb.max())
    gaps, threshold = np.interp(steps, sa, va) - np.interp(steps, sb, vb), loss_threshold(a, b)
    logged = [(s, v) for _, s, v in (m.finite("train/lr_multiplier") for m in (a, b)) if len(s)]
    lr = np.array([np.interp(steps, s, v) for s, v in logged]) if len(logged) == 2 else np.zeros((2, len(steps)))
    apart = np.abs(lr[0] - lr[1]) > LR_APART
    agree, parted = np.flatnonzero(~apart), np.flatnonzero(apart)
    return StepGap(steps, gaps, (float(lr[0, -1]), float(lr[1, -1])) if len(logged) == 2 else None,
                   int(agree[-1]) if len(agree) else len(steps) - 1, int(parted[0]) if len(parted) else None,
                   departure(gaps, threshold), threshold, float(np.interp(hi, pa, va) - np.interp(hi, pb, vb)))


def equal_step_spread(ref_metrics):
    """The largest |judged gap| at equal steps between two of the best's last SPREAD_REPEATS repeats (the pairs grow
    as their square), or None under two: a challenger's gap within it is noise (the same code parts by its schedule)."""
    gaps = [g.gaps[g.judged] for a, b in combinations(ref_metrics[-SPREAD_REPEATS:], 2) if (g := equal_steps(a, b))]
    return max(map(abs, gaps)) if gaps else None


def compare_curves(a, b, key="train/loss_smooth", threshold=None):
    """(progress points, a - b there, first departing index or None, threshold per point) of one curve from the later
    first counted step, or None: the noise (loss_threshold, or val/bpb's band) plus half a step's misalignment."""
    (pa, _, va), (pb, _, vb) = a.finite(key), b.finite(key)
    trained = [m.finite("train/loss", counted=True)[0] for m in (a, b)]  # warm-up steps sit at progress 0
    lo, hi = max(float(p.min()) if len(p) else 0.0 for p in trained), min(pa.max(initial=0.0), pb.max(initial=0.0))
    if hi <= lo:  # no curve, or no overlap past the warm-up
        return None
    sparse = key != "train/loss_smooth"
    points = pa[(pa >= lo) & (pa <= hi)] if sparse else np.linspace(lo, hi, GRID_POINTS)
    half = max(float(np.median(np.diff(p))) if len(p) >= 2 else 0.0 for p in trained) / 2  # half a step
    slack = np.abs(np.interp(points + half, pb, vb) - np.interp(points - half, pb, vb))
    limit = (loss_threshold(a, b) if threshold is None else threshold) + slack
    gap = np.interp(points, pa, va) - np.interp(points, pb, vb)
    return points, gap, departure(gap, limit, 2 if sparse else DEPARTURE_HOLD), limit

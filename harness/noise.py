"""
Whether two runs differ beyond noise: the val_bpb band measured from repeats of one train.py, and
where two training curves part by more than their noise plus one step of misalignment.
"""
import numpy as np

from harness.archive import comparable, row_bpb
from harness.metrics import SMOOTH_BETA, STALL_FACTOR

NOISE_SIGMAS = 2.0         # noise band = +-2 std of the difference of two runs (sqrt(2) x one run's std)
STEPS_OUTLIER = 0.05       # a repeat whose num_steps is off its group's median by more than 5% is an outlier on steps
GRID_POINTS = 200          # common training-progress grid on which two runs are compared
DEPARTURE_SIGMAS = 3.0     # smoothed losses "differ" beyond this many sigmas of their combined noise
DEPARTURE_HOLD = 5         # ... for this many consecutive grid points (one blip is not a departure)
VAL_DEPARTURE_HOLD = 2     # in-training val/bpb (~10 points a run) differs for this many consecutive points
VAL_BPB_TOLERANCE = 0.005  # in-training val/bpb threshold while the noise band is still unknown
GAP_GROWS = 1.25           # |gap at the end| / |gap at the departure| above this: the gap grows
GAP_CLOSES = 0.8           # ... below this: it closes; in between: steady

# ---------------------------------------------------------------------------
# The val_bpb noise band, from runs of identical train.py under one harness

def noise_band(history, run_row):
    """val_bpb spread among runs of identical train.py under one harness, per sha and pooled."""
    groups = {}
    for r in comparable(history, run_row.get("harness")):
        if r.get("train_py_sha"):
            groups.setdefault(r["train_py_sha"], []).append(r)
    own = groups.get(run_row.get("train_py_sha"), [])
    repeated = {sha: g for sha, g in groups.items() if len(g) >= 2}
    pooled, runs, dof = pooled_std(repeated.values())
    outliers = {}  # run_id -> its group's median num_steps
    for g in repeated.values():
        outliers.update(step_outliers(g))
    return {"own": own, "by_sha": groups, "repeated": repeated, "pooled_std": pooled,
            "runs": runs, "dof": dof, "band": difference_band(pooled), "outliers": outliers}


def pooled_std(groups):
    """(pooled std of val_bpb, runs, degrees of freedom) over the groups of two or more runs."""
    groups = [np.array([row_bpb(r) for r in g]) for g in groups if len(g) >= 2]
    dof = sum(len(g) - 1 for g in groups)
    std = float(np.sqrt(sum(((g - g.mean()) ** 2).sum() for g in groups) / dof)) if dof else None
    return std, sum(len(g) for g in groups), dof


def row_steps(row):
    try:
        return float(row.get("num_steps", ""))
    except ValueError:
        return None


def step_outliers(group):
    """{run_id: the group's median num_steps} for the repeats off it by more than STEPS_OUTLIER: one
    train.py trained for fewer (a stall, a busy machine) or more steps, and its val_bpb moves with them."""
    steps = {r["run_id"]: row_steps(r) for r in group}
    known = [n for n in steps.values() if n is not None]
    if len(known) < 2:
        return {}
    median = float(np.median(known))
    return {run_id: median for run_id, n in steps.items() if n is not None and abs(n - median) > STEPS_OUTLIER * median}


def difference_band(std, n=1, m=1):
    """Band for the difference of a mean of n runs and a mean of m runs: its std is
    std x sqrt(1/n + 1/m), so one run against one other gets sqrt(2) x one run's std."""
    return None if std is None else NOISE_SIGMAS * std * np.sqrt(1 / n + 1 / m)


# ---------------------------------------------------------------------------
# Where two training curves depart (pure functions of arrays)

def compare_curves(a, b, val_band, this, other):
    """Loss and in-training val/bpb of a against b, on training progress from the later of the two
    runs' first counted step. Each point's threshold is the noise plus the gap that one step of
    misalignment makes there (the larger of the two runs' progress per step)."""
    lo = max(a.start, b.start)
    per_step = max(a.progress_per_step or 0.0, b.progress_per_step or 0.0)
    lines = []
    if "train/loss_smooth" in a and "train/loss_smooth" in b:
        ca, cb = finite(a.smooth_loss), finite(b.smooth_loss)
        hi = min(ca[0].max(initial=0.0), cb[0].max(initial=0.0))
        if hi > lo:
            points = np.linspace(lo, hi, GRID_POINTS)
            lines.append(compare_line("train loss (smoothed)", ca, cb, points, loss_threshold(a, b), per_step,
                                      DEPARTURE_HOLD, this, other))
        else:
            lines.append("- train loss (smoothed): no overlap in training progress to compare")
    if "val/bpb" in a.columns and "val/bpb" in b.columns:
        ca, cb = finite(a.series("val/bpb")), finite(b.series("val/bpb"))
        hi = min(ca[0].max(initial=0.0), cb[0].max(initial=0.0))
        points = ca[0][(ca[0] >= lo) & (ca[0] <= hi)]  # this run's own val points, not interpolated ones
        if len(points) >= VAL_DEPARTURE_HOLD:
            lines.append(compare_line("in-training val/bpb", ca, cb, points, val_band or VAL_BPB_TOLERANCE, per_step,
                                      VAL_DEPARTURE_HOLD, this, other)
                         + ("" if val_band else f" (base threshold {VAL_BPB_TOLERANCE} while the noise band is unknown)"))
        else:
            lines.append(f"- in-training val/bpb: {len(points)} val point(s) after the warm-up in common: too few to compare")
    return (lines or ["- no curves in common"]) + stall_note([(this, a), (other, b)])


def compare_line(name, ca, cb, points, base, per_step, hold, this, other):
    slack = misalignment(cb, points, per_step)
    gap, start = departure(ca, cb, points, base + slack, hold)
    return describe_departure(name, points, gap, start, base, slack, this, other)


def departure(a, b, points, threshold, hold):
    """Gap a-b at progress `points` (both curves interpolated) and the first index from which |gap|
    exceeds `threshold` (one per point) at `hold` consecutive points (None: never)."""
    (pa, va), (pb, vb) = a, b
    gap = np.interp(points, pa, va) - np.interp(points, pb, vb)
    over = np.abs(gap) > threshold
    start = next((i for i in range(len(points) - hold + 1) if over[i:i + hold].all()), None)
    return gap, start


def misalignment(curve, points, per_step):
    """The gap that a shift of one training step alone makes: |slope of the curve| x progress per step.
    Where the curve is steep (early training) two repeats of one train.py differ by this much."""
    p, v = curve
    return np.abs(np.interp(points + per_step / 2, p, v) - np.interp(points - per_step / 2, p, v))


def gap_trend(first, last):
    """How the gap went from the departure to the end of the comparison."""
    if np.sign(first) != np.sign(last):
        return "reverses (the sign flips after the departure)"
    ratio = abs(last) / abs(first)
    return "grows" if ratio > GAP_GROWS else "closes" if ratio < GAP_CLOSES else "steady"


def describe_departure(name, points, gap, start, base, slack, this, other):
    """One line: where a's curve leaves b's by more than base + slack (slack: the misalignment allowance)."""
    allowance = f"{base:.4f}, plus up to {np.max(slack):.4f} where the curve is steep, for one step of misalignment"
    peak = int(np.argmax(np.abs(gap)))  # a gap that rises and falls again: the ends alone hide its size
    largest = f"largest |gap| {gap[peak]:+.4f} at progress {points[peak]:.2f}"
    if start is None:
        return (f"- {name}: within the threshold of {other} at all {len(points)} points of progress "
                f"{points[0]:.2f}-{points[-1]:.2f} (threshold {allowance}); final gap {gap[-1]:+.4f}; {largest}")
    return (f"- {name}: departs from {other} at progress {points[start]:.2f} (gap {gap[start]:+.4f}, threshold "
            f"{base:.4f} + {slack[start]:.4f} for one step of misalignment); the gap goes {gap[start]:+.4f} -> "
            f"{gap[-1]:+.4f} from there to progress {points[-1]:.2f}, the last common point: "
            f"{gap_trend(gap[start], gap[-1])}; {largest}; {this} is {'ahead' if gap[-1] < 0 else 'behind'} at the end")


def stall_note(runs):
    """Stalls of either run by progress: a stall spends budget without training, so the stalled run's
    curve lags on the progress axis from there, and the gap's shape may come from it."""
    found = []
    for label, m in runs:
        slow = m.stalls
        if slow:
            found.append(f"{label}: {len(slow)} at progress {slow[0][1]:.2f}-{slow[-1][1]:.2f} "
                         f"({sum(ms for _, _, ms in slow) / 1000:.1f} s in them)")
    return [f"- stalls (counted step > {STALL_FACTOR:g}x median): {'; '.join(found)}"] if found else []


def finite(series):
    """(progress, values) of a Metrics series without its NaN/inf values."""
    p, _, v = series
    ok = np.isfinite(v)
    return p[ok], v[ok]


def loss_threshold(a, b):
    """DEPARTURE_SIGMAS x the noise of the difference of two smoothed losses."""
    noise = [n for n in (a.loss_noise, b.loss_noise) if n is not None]
    ema_factor = np.sqrt((1 - SMOOTH_BETA) / (1 + SMOOTH_BETA))  # an EMA shrinks white noise by this
    sigma = float(np.sqrt(np.mean(np.square(noise)) * 2)) * ema_factor if noise else 0.0
    return max(DEPARTURE_SIGMAS * sigma, 1e-4)

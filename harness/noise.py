"""
Whether two runs differ beyond noise: the val_bpb band measured from repeats of one code, leaving out
the repeats that a busier or quieter machine made run at another speed; whether a run's speed is its
code's or its machine's; and where two training curves part, on training progress and at equal steps.
"""
from dataclasses import dataclass

import numpy as np

from harness.archive import comparable, row_bpb, row_gpu
from harness.identity import row_code
from harness.metrics import SMOOTH_BETA, STALL_FACTOR

NOISE_SIGMAS = 2.0         # noise band = +-2 std of the difference of two runs (sqrt(2) x one run's std)
SPEED_FLOOR = 0.05         # a run off its code's usual step count by more than 5% ran on another machine load ...
SPEED_SIGMAS = 3.0         # ... or by more than 3 robust stds of its repeats' step counts, when that is larger,
SPEED_CLUSTER = 0.25       # ... up to 25%: step counts within 25% of each other may be one code's usual speed
MIN_DOF = 2                # a band from fewer degrees of freedom is a rough one
GRID_POINTS = 200          # common training-progress grid on which two runs are compared
DEPARTURE_SIGMAS = 3.0     # smoothed losses "differ" beyond this many sigmas of their combined noise
DEPARTURE_HOLD = 5         # ... for this many consecutive grid points (one blip is not a departure)
VAL_DEPARTURE_HOLD = 2     # in-training val/bpb (~10 points a run) differs for this many consecutive points
VAL_BPB_TOLERANCE = 0.005  # in-training val/bpb threshold while the noise band is still unknown
GAP_GROWS = 1.25           # |gap at the end| / |gap at the departure| above this: the gap grows
GAP_CLOSES = 0.8           # ... below this: it closes; in between: steady
LR_APART = 0.1             # LR multipliers further apart than this at one step: the schedules have parted

# ---------------------------------------------------------------------------
# The val_bpb noise band, from runs of one code under one harness

@dataclass
class Noise:
    """The noise model of one harness's history, seen from one run."""
    groups: dict            # code identity -> the comparable rows that ran it, in order
    own: list               # this run's code's rows
    disturbed: dict         # run_id -> (its steps, its code's usual steps): runs left out of the band
    speed_tol: float        # relative step difference within which a repeat ran at its code's speed
    speed_spread: float | None  # robust relative std of the steps of undisturbed repeats, when measurable
    pooled_std: float | None
    runs: int               # runs the band is estimated from
    dof: int
    band: float | None

    def clean(self, code):
        """The runs of one code that the band is estimated from."""
        return [r for r in self.groups.get(code, []) if r["run_id"] not in self.disturbed]

    @property
    def repeated(self):
        """{code: rows} of the codes that have two or more runs, disturbed ones included."""
        return {code: g for code, g in self.groups.items() if len(g) >= 2}


def noise_band(history, run_row):
    """val_bpb spread among the runs of one code that ran at that code's usual speed, under run_row's
    harness on its GPU model, whichever worker made them. A repeat with a step count far off its code's
    usual one ran on a machine busier or quieter than usual: its val_bpb measures the machine, so it is
    left out, as is run_row itself when its speed is off that of its code's other runs."""
    groups = {}
    for r in comparable(history, run_row.get("harness"), row_gpu(run_row)):
        if row_code(r):
            groups.setdefault(row_code(r), []).append(r)
    tol, spread = speed_tolerance(groups.values())
    disturbed = {}
    for g in groups.values():
        disturbed.update(off_speed(g, usual_steps(g), tol))
    own = groups.get(row_code(run_row), [])
    others = [r for r in own if r["run_id"] != run_row.get("run_id")]
    if row_bpb(run_row) is not None:
        disturbed.update(off_speed([run_row], usual_steps(others), tol))
    clean = [[r for r in g if r["run_id"] not in disturbed] for g in groups.values()]
    pooled, runs, dof = pooled_std(clean)
    return Noise(groups, own, disturbed, tol, spread, pooled, runs, dof, difference_band(pooled))


def pooled_std(groups):
    """(pooled std of val_bpb, runs, degrees of freedom) over the groups of two or more runs."""
    groups = [np.array([row_bpb(r) for r in g]) for g in groups if len(g) >= 2]
    dof = sum(len(g) - 1 for g in groups)
    std = float(np.sqrt(sum(((g - g.mean()) ** 2).sum() for g in groups) / dof)) if dof else None
    return std, sum(len(g) for g in groups), dof


def difference_band(std, n=1, m=1):
    """Band for the difference of a mean of n runs and a mean of m runs: its std is
    std x sqrt(1/n + 1/m), so one run against one other gets sqrt(2) x one run's std."""
    return None if std is None else NOISE_SIGMAS * std * np.sqrt(1 / n + 1 / m)


def row_steps(row):
    try:
        return float(row.get("num_steps", ""))
    except ValueError:
        return None


def usual_cluster(rows):
    """The largest set of a code's runs whose step counts lie within SPEED_CLUSTER of one run's, or []
    when two such sets tie: then no speed is the usual one. Runs disturbed by a busy machine rarely agree
    with each other, so up to half of a code's runs may be disturbed without moving it."""
    steps = [n for n in map(row_steps, rows) if n]
    sets = [[m for m in steps if abs(np.log(m / n)) <= np.log(1 + SPEED_CLUSTER)] for n in steps]
    size = max(map(len, sets), default=0)
    largest = {tuple(sorted(x)) for x in sets if len(x) == size}
    return list(largest.pop()) if len(largest) == 1 else []


def usual_steps(rows):
    """A code's usual step count: the median of its usual cluster, or None."""
    cluster = usual_cluster(rows)
    return float(np.median(cluster)) if cluster else None


def speed_tolerance(groups):
    """(tolerance, spread): the spread is the robust relative std of the step counts within each code's
    usual cluster; the tolerance is SPEED_SIGMAS x that, within SPEED_FLOOR and SPEED_CLUSTER."""
    devs = []
    for g in groups:
        cluster = usual_cluster(g)
        if len(cluster) >= 2:
            devs += [n / np.median(cluster) - 1 for n in cluster]
    spread = float(1.4826 * np.median(np.abs(devs))) if devs else None
    return float(np.clip(SPEED_SIGMAS * (spread or 0.0), SPEED_FLOOR, SPEED_CLUSTER)), spread


def off_speed(rows, usual, tol):
    """{run_id: (steps, usual)} of the rows whose step count is off `usual` by more than tol and by
    more than one step (the cpu profile's runs take a few dozen)."""
    if not usual:
        return {}
    return {r["run_id"]: (row_steps(r), usual) for r in rows
            if row_steps(r) and abs(row_steps(r) / usual - 1) > tol and abs(row_steps(r) - usual) > 1}


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


# ---------------------------------------------------------------------------
# Learning per step against speed: the smoothed loss at equal steps

@dataclass
class StepGap:
    """Smoothed train loss of run a minus run b at equal steps and at equal progress."""
    step: int               # the last step both runs reached
    gap: float              # a - b there (negative: a is ahead)
    lr: tuple | None        # (a's, b's) LR multiplier at that step, when both logged it
    judged_step: int        # where learning per step is judged: the last step at which the LR schedules agree
    judged_gap: float
    threshold: float        # |gap| beyond this is more than the losses' noise
    progress: float         # the last training progress both reached
    progress_gap: float     # a - b there


def equal_steps(a, b):
    """a's smoothed train loss against b's at the same step, or None without two curves. The LR
    schedules run on progress, so a run with more steps is still at a high LR where the other has
    annealed; per-step learning is judged at the last step where the multipliers are within LR_APART."""
    gaps = step_gaps(a, b)
    if gaps is None:
        return None
    steps, gap, lr_a, lr_b = gaps
    judged = len(steps) - 1
    if lr_a is not None and lr_b is not None:
        agree = np.flatnonzero(np.abs(lr_a - lr_b) <= LR_APART)
        judged = int(agree[-1]) if len(agree) else judged
    (pa, _, va), (pb, _, vb) = finite_steps(a.smooth_loss), finite_steps(b.smooth_loss)
    hi = min(pa.max(), pb.max())
    progress_gap = float(np.interp(hi, pa, va) - np.interp(hi, pb, vb))
    lr = None if lr_a is None or lr_b is None else (float(lr_a[-1]), float(lr_b[-1]))
    return StepGap(int(steps[-1]), float(gap[-1]), lr, int(steps[judged]), float(gap[judged]),
                   loss_threshold(a, b), float(hi), progress_gap)


def step_gaps(a, b):
    """(steps, a - b smoothed train loss, a's LR multipliers, b's) at a's steps up to the last step
    both reached, or None without two curves. The LR multipliers are None when a run did not log them."""
    if "train/loss_smooth" not in a or "train/loss_smooth" not in b:
        return None
    (_, sa, va), (_, sb, vb) = finite_steps(a.smooth_loss), finite_steps(b.smooth_loss)
    if not len(sa) or not len(sb):
        return None
    steps = sa[sa <= min(sa.max(), sb.max())]
    gap = np.interp(steps, sa, va) - np.interp(steps, sb, vb)
    return steps, gap, lr_at(a, steps), lr_at(b, steps)


def compare_steps(a, b, this, other):
    """One line: where a's smoothed loss leaves b's at equal steps. Where it never does, per step the two
    learn alike, and any gap on progress comes from the steps each run had taken by then."""
    gaps = step_gaps(a, b)
    if gaps is None:
        return []
    steps, gap, lr_a, lr_b = gaps
    threshold = loss_threshold(a, b)
    parted = np.flatnonzero(np.abs(lr_a - lr_b) > LR_APART) if lr_a is not None and lr_b is not None else []
    lr = f"; the LR schedules part at step {int(steps[parted[0]])}" if len(parted) else ""
    over = np.abs(gap) > threshold
    start = next((i for i in range(len(steps) - DEPARTURE_HOLD + 1) if over[i:i + DEPARTURE_HOLD].all()), None)
    head = f"- train loss (smoothed) at equal steps, steps {int(steps[0])}-{int(steps[-1])}"
    if start is None:
        return [f"{head}: within {threshold:.4f} of {other} at every step (final gap {gap[-1]:+.4f}){lr}; "
                f"per step {this} learns as {other} does, so a gap on progress comes from speed"]
    return [f"{head}: departs from {other} at step {int(steps[start])} (gap {gap[start]:+.4f}, threshold "
            f"{threshold:.4f}){lr}; gap at step {int(steps[-1])} {gap[-1]:+.4f}: {this} is "
            f"{'ahead' if gap[-1] < 0 else 'behind'} per step"]


def finite_steps(series):
    """(progress, step, values) of a Metrics series without its NaN/inf values."""
    p, step, v = series
    ok = np.isfinite(v)
    return p[ok], step[ok], v[ok]


def lr_at(m, steps):
    """The LR multiplier at `steps`, or None when the run did not log it."""
    _, s, lr = finite_steps(m.series("train/lr_multiplier"))
    return np.interp(steps, s, lr) if len(s) else None

"""
What the harness says about runs, in words and pictures: analysis.md (one function per section) and its plots,
progress.png, the lines `analyze.py run` prints, and the texts of `analyze.py list | show | compare | best`.

    text = write_analysis(run, archive.runs(), archive)   # analysis.md + PNGs in archive.run_dir(run.id)

Every figure set against the best is harness.stats' and the verdict harness.decide's: this module words them (and
counts a run's own step times). A difference from the best is named as a cause (learning per step, speed, the
machine, a clock-driven schedule) only beyond the spread of that quantity over the best's repeats, else as noise.
"""
import io
import re
from itertools import dropwhile
from pathlib import Path

import numpy as np

from harness import stats
from harness.decide import best_code_runs, best_of
from harness.record import git, write_atomic

STALL_FACTOR = 3.0         # a step slower than this many times the median step is a stall
PLATEAU_DROP = 0.002       # a fitted loss drop under 0.2% over the last tenth of training = plateaued
LAYER_RATIO = 2.0          # a layer this many times above/below the best's same layer is listed ...
LAYER_SHOWN = 5            # ... at most this many per stat, the most extreme first
PLOT_DPI = 80              # with PLOT_POINTS, keeps each PNG well under 200 KB
PLOT_POINTS = 500          # longer curves are drawn as bin medians (stalls and spikes are in the text)
PROGRESS_LABELS = 40       # progress.png labels at most the last 40 kept runs, ...
LABEL_CHARS = 40           # ... with this much of each description
PLOTS = (  # (metric key, panel title, file): one figure per file, one panel per row
    ("train/loss_smooth", "training loss (smoothed)", "loss.png"),
    ("val/bpb", "validation bpb (in-training slice)", "val_bpb.png"),
    ("train/lr_multiplier", "LR multiplier", "schedules.png"),
    ("train/muon_momentum", "Muon momentum", "schedules.png"),
    ("train/weight_decay", "weight decay", "schedules.png"),
    ("perf/mfu_percent", "MFU (%)", "throughput.png"),
    ("perf/step_time_ms", "step time (ms)", "throughput.png"),
)
STYLES = ({"color": "C0", "lw": 1.6}, {"color": "C2", "lw": 1.2, "ls": "--"}, {"color": "C7", "lw": 1.0, "ls": ":"})


def fmt(x, spec=".4f", unit=""):
    return "n/a" if x is None or not np.isfinite(x) else format(x, spec) + unit


class View:
    """What one analysis.md is written from: the run, its best (the one recorded, else decide.best_of), the best
    code's other runs (ref, as the decision's), both curves, and stats' figures, each computed once for all sections."""

    def __init__(self, run, runs, archive):
        self.run, self.dir = run, archive.run_dir(run.id)
        self.best = next((r for r in runs if run.best_id and r.id == run.best_id), None) or best_of(runs, run)
        self.ref = best_code_runs(runs, run, self.best)
        self.curves, self.notes = stats.read_metrics(self.dir / "metrics.jsonl")
        wanted = [r.id for r in self.ref[-stats.SPREAD_REPEATS:]] + ([self.best.id] if self.best else [])
        ref_curves = {i: stats.read_metrics(archive.run_dir(i) / "metrics.jsonl")[0] for i in dict.fromkeys(wanted)}
        self.best_curves = ref_curves.get(self.best.id) if self.best else None
        self.gap = (stats.equal_steps(self.curves, self.best_curves)  # the smoothed losses at equal steps
                    if self.curves is not None and self.best_curves is not None else None)
        self.noise, self.machine = stats.noise(runs, run), stats.machine(run, self.ref)
        self.gap_spread = stats.equal_step_spread([m for m in ref_curves.values() if m is not None])
        self.same_code = self.best is not None and self.best.code_sha == run.code_sha


# The sections, in the order analysis.md has them
def section_headline(v):
    run, vram = v.run, v.run.trained.peak_vram_mb
    lines = ["# Run " + run.id, "", "## Headline", *("- " + line for line in uncontained(run)), number_line(run),
             f"- commit {run.commit[:7]}: {run.description or '(no subject)'}; harness {run.harness_key} on "
             f"{run.gpu}; {time_line(run)}; peak VRAM {fmt(vram and vram / 1024, '.1f', ' GiB')}", against_line(v)]
    lines += [f"- caught: {c.case}: {c.detail}" for c in run.caught] + equal_steps_lines(v)
    lines += machine_line(v.machine, v.best) + [f"- harness changed since it was pinned: {change}"
                                              for change in run.harness_changes]
    return "\n".join(lines + [f"- note: {n}" for n in run.notes + v.notes if not n.startswith("uncontained")])


def against_line(v):
    """This run against the best: the decision's figures (n runs' mean minus m runs') if any, else run against run."""
    run, best, d = v.run, v.best, v.run.decision
    if best is None or run.val_bpb is None:  # a crash's decision still has its code's earlier runs' delta
        return f"- vs best {best.id}: this run has no number" if best else "- vs best: no earlier comparable run"
    if d is not None and d.delta is not None:  # the same numbers as the decision's line, never two verdicts
        return (f"- vs best {d.best_id}: delta {d.delta:+.6f} (n {d.n} vs {d.m}: the mean of this code's runs minus "
                f"the best code's, as the decision), {band_words(d.delta, d.band)}")
    delta = run.val_bpb - best.val_bpb
    return f"- vs best {best.id} ({best.val_bpb:.6f}): {delta:+.6f}, {band_words(delta, v.noise.band)}"


def band_words(delta, band):
    if band is None:
        return "noise band unknown"
    return f"{'within' if abs(delta) <= band else 'beyond'} the noise band" + (f" ±{band:.6f}" if band else "")


def uncontained(run):
    """Said first of a run made outside the sandbox: nothing kept train.py from the pinned rows or the harness."""
    why = next((n for n in run.notes if n.startswith("uncontained")), "uncontained: train.py ran without a sandbox")
    return [why] if run.contained is False else []


def number_line(run):
    line = f"- val_bpb **{fmt(run.val_bpb, '.6f')}**, status `{run.status}`, outcome `{run.trained.outcome}`"
    if run.val_bpb is None:
        return line
    if run.measured is None:
        return line + "; train.py's own number (archived by hand, not measured by the harness)"
    printed, heldout = run.trained.reported_val_bpb, run.measured.heldout_bpb
    return (line + "; measured by the harness" + (f" (train.py printed {printed:.6f})" if printed is not None else "")
            + (f"; held-out bpb {heldout:.6f}" if heldout is not None else ""))


def time_line(run):
    wall, trained = run.measured.wall_s if run.measured else run.trained.total_seconds, run.trained.training_seconds
    return (fmt(run.steps, ".0f") + " steps; " + (f"{trained:.1f} s training" if trained else
                                                   "did not train (no counted training second)")
            + ("" if wall is None else f", wall {wall:.1f} s") + ("" if run.outside_s is None else
               f", {run.outside_s:.1f} s outside the {fmt(run.harness.get('TIME_BUDGET'), 'g')} s budget"))


def equal_steps_lines(v):
    """The smoothed train loss at equal steps (CONTRACT), then each cause (learning, schedule, speed) and its noise."""
    g = v.gap if v.run.val_bpb else None
    if g is None:
        return []
    lines = [f"- at equal steps {g.gaps[-1]:+.4f} smoothed train loss against the best (step {g.steps[-1]:.0f}, the "
             f"last both reached); at equal progress {g.progress_gap:+.4f}; steps {fmt(v.run.steps, '.0f')} vs "
             f"{fmt(v.best.steps, '.0f')}"]
    if v.same_code:
        lines.append(f"- identical code: train.py's code is the best's (code_sha {v.run.code_sha[:8]}, comments and "
                     "blank lines aside): a difference is noise, the machine or the clock")
    limit = max(v.gap_spread or 0.0, g.threshold)  # the best's repeats' largest gap, at least the losses' noise
    found = [x for x in (learning(v, g, limit), schedule(v, g, limit), speed(v)) if x]
    causes = [name for name, beyond, _ in found if beyond]
    lines.append("- explained by: " + (", ".join(causes) if causes else "nothing beyond the noise of repeats"))
    return lines + [f"  - {name}: {text}" for name, _, text in found]


def learning(v, g, limit):
    """(name, beyond noise?, text): the gap at equal steps, where the LR schedules still agree."""
    gap, beyond = g.gaps[g.judged], abs(g.gaps[g.judged]) > limit
    at = f"{gap:+.4f} at step {g.steps[g.judged]:.0f}" + (
        ", the last where the LR schedules agree" if g.judged < len(g.steps) - 1 else "")
    of = ("the largest gap between the best's repeats" if (v.gap_spread or 0.0) >= g.threshold else
          "the losses' own noise" + (" (the best ran once)" if v.gap_spread is None else
                                     f" (the best's repeats differ by up to {v.gap_spread:.4f})"))
    said = (f"{'ahead of' if gap < 0 else 'behind'} the best at equal steps: {at}, beyond" if beyond else
            f"within noise: {at}, within")
    return None if v.same_code else ("learning per step", beyond, f"{said} {limit:.4f}, {of}")


def schedule(v, g, limit):
    """A schedule on the clock puts two runs of different step counts at different LRs at one step: named only when
    the LRs part and the loss gap there is beyond noise, with no per-step learning before they parted to explain it."""
    if not g.lr or abs(g.lr[0] - g.lr[1]) <= stats.LR_APART or abs(g.gaps[-1]) <= limit or (
            not v.same_code and abs(g.gaps[g.judged]) > limit):
        return None
    return "the clock-driven schedule", True, (
        f"at step {g.steps[-1]:.0f} the LR multiplier is {g.lr[0]:.2f} here and {g.lr[1]:.2f} in the best (more "
        f"than {stats.LR_APART:g} apart, the step counts differ and the schedule runs on training time): the loss "
        f"gap there, {g.gaps[-1]:+.4f}, beyond {limit:.4f}, comes with it")


def speed(v):
    """The step count against the best's runs (stats.steps_vs), and whose the difference is."""
    s = stats.steps_vs(v.run, v.ref)
    if s is None:
        return None
    counts = f"{v.run.steps} steps vs {s.usual:.0f}, the mean of the best's {s.runs} run(s) ({s.change:+.0%})"
    name = "the machine" if v.same_code else "speed"
    limit = (f"{s.limit:.0%} (the larger of {stats.STEPS_DRIFT:.0%} and the {fmt(s.spread, '.0%')} spread of the "
             "best's runs)")
    if not s.beyond:
        return name, False, (f"{counts}; the best ran once, so no spread to tell noise from a cause" if s.spread is None
                             else f"within noise: {counts}, within {limit}")
    moved = v.machine.moved()
    whose = (f"the machine was {'slower' if s.change < 0 else 'faster'}, since the code is the best's"
             if v.same_code else
             f"the code's or the machine's: {moved}" if moved else
             "the code's: the machine's speed was within noise of the best's runs'" if v.machine.drift is not None
             else "the code's or the machine's: no machine speed tells them apart")
    return name, True, f"{counts}, beyond {limit}: {whose}"


def machine_line(m, best):
    if m.speed is None:
        return []
    line = f"- machine speed {m.speed:,.0f} GFLOP/s"
    if m.usual is None:
        return [line + ("" if best is None else "; the best's runs have no machine speed: not compared")]
    return [line + f" vs {m.usual:,.0f}, the median of the best's {m.runs} run(s): {m.drift:+.0%}; "
            + (m.moved() or f"within {m.limit:.0%} (the larger of {stats.MACHINE_DRIFT:.0%} and the spread of the "
               "best's runs): the same machine")]


def section_crash(v):
    if v.run.status != "crash" and v.run.trained.outcome == "ok" and v.run.val_bpb is not None:
        return ""
    error, source = error_text(v.run, v.dir / "run.log")
    return "\n".join(["## Crash", f"- outcome `{v.run.trained.outcome}`; {exception_line(error)}; the error's tail "
                      f"(from {source}):", "```", error.rstrip(), "```"]) if error else ""


def error_text(run, log_path):
    """(the traceback's tail, where it came from): train.py's own, the harness's, else run.log's."""
    if run.trained.error:
        return run.trained.error, "train.py's summary"
    if log_path.exists():
        lines = log_path.read_text(errors="replace").rstrip().splitlines()
        starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
        if starts or run.measured is None or not run.measured.error:
            return "\n".join((lines[starts[-1]:] if starts else lines)[-30:]), "run.log"
    return (run.measured.error, "the harness") if run.measured and run.measured.error else (None, None)


def exception_line(error):
    """The exception's last line (its type and message); an out-of-memory error named as such."""
    lines = [line for line in error.rstrip().splitlines() if line.strip()]
    last = ([line for line in lines if not line[0].isspace()] or lines or ["(no error text)"])[-1].strip()
    return ("out of memory: " if re.search(r"OutOfMemoryError|out of memory", last, re.I) else "error: ") + last


def section_changes(v):
    if v.best is None:
        return "## What changed\n- no earlier comparable run: nothing to set this run against"
    patch = (v.dir / "diff.patch").read_text() if (v.dir / "diff.patch").exists() else None
    return "\n".join([f"## What changed (against best {v.best.id})"] + what_changed(v.best, v.run, patch, "diff.patch"))


def what_changed(old, new, patch, where):
    """The config's changes, then the code's: identical (comments and blank lines aside), or the patch's counts."""
    a, b = old.trained.config, new.trained.config
    lines = [f"  - {k}: {a[k]!r} -> {b[k]!r}" for k in a if k in b and a[k] != b[k]]
    lines += [f"  - {k} = {b[k]!r} (new)" for k in b if k not in a]
    lines += [f"  - {k} (removed; was {a[k]!r})" for k in a if k not in b]
    lines = ["- config:"] + lines if lines else ["- config: identical"]
    if old.code_sha == new.code_sha:
        return lines + [f"- code: identical (code_sha {new.code_sha[:8]})" + (
            ", train.py differs only in comments and blank lines" if patch and patch.strip() else "")]
    if patch is None:
        return lines + [f"- code: {where} not available"]
    body = list(dropwhile(lambda line: not line.startswith("@@"), patch.splitlines()))  # past the file header
    changed = [line[0] for line in body if line[:1] in "+-" and line[1:].strip()]
    return lines + [f"- code: +{changed.count('+')} -{changed.count('-')} lines in train.py, "
                    f"{sum(line.startswith('@@') for line in body)} hunk(s): the lines are in {where}"]


def section_trajectory(v):
    m = v.curves
    p, step, smooth = m.finite("train/loss_smooth") if m is not None else [np.zeros(0)] * 3
    if not len(smooth):
        return "## Trajectory\n- no training loss recorded (or every value NaN or inf)"
    low = np.argmin(smooth)
    lines = ["## Trajectory", f"- smoothed loss: first {smooth[0]:.4f} (step {step[0]:.0f}), final {smooth[-1]:.4f} "
             f"(step {step[-1]:.0f}, progress {p[-1]:.2f}), minimum {smooth[low]:.4f} (step {step[low]:.0f}, "
             f"progress {p[low]:.2f})"]
    trend = stats.last_tenth_trend(m)
    if "change" in trend:  # too few steps in the last tenth tell no trend
        # flat: under PLATEAU_DROP of the loss or the fit's noise (noise s moves the fit over n steps by s x sqrt(12/n))
        limit = max(stats.DEPARTURE_SIGMAS * (m.loss_noise or 0.0) * np.sqrt(12 / trend["steps"]),
                    PLATEAU_DROP * abs(smooth[-1]))
        state = (f"flat within {limit:.4f} (the larger of {PLATEAU_DROP:.1%} of the loss and the fit's noise)"
                 if abs(trend["change"]) <= limit else "rising at the end" if trend["change"] > 0 else
                 "still falling " + ("when time ran out" if v.run.trained.outcome == "ok" else "when it stopped"))
        lines.append(f"- last tenth of training: fitted change {trend['change']:+.4f} over {trend['steps']} steps "
                     f"({100 * trend['fraction']:+.2f}% of the loss): {state}")
    return "\n".join(lines)


def section_departure(v):
    if v.curves is None or v.best_curves is None:  # None too when there is no best
        return ""
    return "\n".join([f"## Where it departs from the best ({v.best.id}), on training progress and at equal steps"]
                     + departure_lines(v.curves, v.best_curves, v.gap, v.noise.band, "this run", "the best"))


def departure_lines(a, b, g, band, this, other):
    """Where a's curves leave b's, each worded alike: the smoothed loss and in-training val/bpb on training progress,
    and the smoothed loss at equal steps, g = stats.equal_steps(a, b) (with the step where the LR schedules part)."""
    found = [(name, "progress", ".2f", curve, "") for key, name, threshold in
             (("train/loss_smooth", "train loss (smoothed)", None), ("val/bpb", "in-training val/bpb", band))
             if (curve := stats.compare_curves(a, b, key, threshold)) is not None]
    if g is not None:
        lr = f"; the LR schedules part at step {g.steps[g.parted]:.0f}" if g.parted is not None else ""
        found.append(("train loss (smoothed) at equal steps", "step", ".0f",
                      (g.steps, g.gaps, g.departs, np.full(len(g.gaps), g.threshold)), lr))
    lines = []
    for name, axis, spec, (x, gap, start, limit), lr in found:
        peak = int(np.argmax(np.abs(gap)))
        lines.append(f"- {name}, {axis} {x[0]:{spec}}-{x[-1]:{spec}}: " + (
            f"within the threshold of {other} at all {len(x)} points (final gap {gap[-1]:+.4f}, largest "
            f"{gap[peak]:+.4f} at {axis} {x[peak]:{spec}}){lr}" if start is None else
            f"departs from {other} at {axis} {x[start]:{spec}} (gap {gap[start]:+.4f}, threshold {limit[start]:.4f})"
            f"{lr}; gap at the end {gap[-1]:+.4f}: {this} is {'ahead' if gap[-1] < 0 else 'behind'}"))
    return lines or ["- no curves in common"]


def section_stability_throughput(v):
    """Spikes and NaN/inf in the run's own curves, then its speed: stalls, and where the seconds went."""
    m, lines = v.curves, ["## Stability and throughput"]
    if m is not None and "train/loss" in m.columns:
        bad = [f"{key} from step {step[~np.isfinite(x)][0]:.0f} ({(~np.isfinite(x)).sum()} rows)"
               for key, (_, step, x) in m.columns.items() if not np.isfinite(x).all()]
        spikes = stats.loss_spikes(m)
        lines.append(f"- loss spikes: {len(spikes) or 'none'}; NaN/inf: {'; '.join(bad[:8]) or 'none'}")
        lines += [f"  - spike at step {e['step']} (progress {e['progress']:.2f}): loss {e['loss']:.4f} vs "
                  f"{e['baseline']:.4f} typical ({e['loss'] - e['baseline']:+.4f}, z {e['z']:.1f})"
                  for e in spikes[:10]]
    _, step, ms = m.finite("perf/step_time_ms", counted=True) if m is not None else [np.zeros(0)] * 3
    if len(ms):  # medians over the counted steps (the warm-up's compile steps are not the run's speed)
        tps, mfu = (np.median(x) if len(x := m.finite(key, counted=True)[2]) else None
                    for key in ("perf/tokens_per_sec", "perf/mfu_percent"))
        slow = STALL_FACTOR * np.median(ms)
        stalls = [f", step {s:.0f} ({x:.0f} ms)" for s, x in zip(step, ms) if x > slow]
        lines.append(f"- counted steps: step time median {np.median(ms):.1f} ms (p90 {np.percentile(ms, 90):.1f}); "
                     f"tokens/s median {fmt(tps, ',.0f')}; MFU median {fmt(mfu, '.2f', '%')}; stalls (> "
                     f"{STALL_FACTOR:g}x the median step): {len(stalls) or 'none'}" + "".join(stalls[:8]))
    spent = [f"{k} {x:.1f} s" for k, x in v.run.trained.timings.items()
             if isinstance(x, (int, float)) and k.endswith("_s") and x]  # seconds, not the start and end times
    return "\n".join(lines + ["- time: " + (", ".join(spent) or "no timings")])


def section_layers(v):
    """Each layer against the best's same layer: layers differ by design, so only a change is news. Left out
    without a best's layers, for an unfinished run, and for identical code (whose layers differ by noise)."""
    mine, best = (stats.layer_medians(m) if m is not None else {} for m in (v.curves, v.best_curves))
    if not mine or not best or v.run.val_bpb is None or v.same_code:
        return ""
    lines = [f"## Per-layer health (median over the second half of training, against best {v.best.id}'s same layer)"]
    for stat, x in sorted(mine.items()):
        base = best.get(stat, {})
        far = {n: abs(np.log(x[n] / base[n])) for n in x if np.isfinite(x[n]) and base.get(n, 0) > 0}
        found = [f"{n} is NaN/inf" for n in x if not np.isfinite(x[n])] + [
            f"{n} at {x[n] / base[n]:.2f}x ({x[n]:.3g} vs {base[n]:.3g})"
            for n in sorted(far, key=far.get, reverse=True) if far[n] > np.log(LAYER_RATIO)]
        lines.append(f"- {stat} ({len(x)} layers): {'; '.join(found[:LAYER_SHOWN]) or f'none beyond {LAYER_RATIO:g}x'}")
    return "\n".join(lines)


def section_noise(v):
    n, own = v.noise, v.noise.groups.get(v.run.code_sha, [])
    lines = ["## Noise"]
    if len(own) >= 2:
        x = np.array([r.val_bpb for r in own])
        lines.append(f"- this code ({v.run.code_sha[:8]}): {len(own)} runs ({', '.join(r.id for r in own)}); "
                     f"val_bpb mean {x.mean():.6f}, std {x.std(ddof=1):.6f}, range {np.ptp(x):.6f}")
    lines.append("- noise band: unknown: no code has two comparable runs; rerunning an unchanged commit measures it"
                 if n.band is None else f"- noise band: ±{n.band:.6f} (one run against one: {stats.NOISE_SIGMAS:g} x "
                 f"sqrt(2) x pooled std {n.pooled_std:.6f}, from {n.runs} runs, {n.dof} degrees of freedom)")
    return "\n".join(lines)


SECTIONS = (section_headline, section_crash, section_changes, section_trajectory, section_departure,
            section_stability_throughput, section_layers, section_noise)


def write_analysis(run, runs, archive):
    """analysis.md and the plots of one archived run, in its directory; returns the text (callers hold the lock). The
    decision's line first (none for a run archived by hand); the Agent notes last, kept under their heading."""
    path = archive.run_dir(run.id) / "analysis.md"
    old, heading, notes = (path.read_text() if path.exists() else "\n## Agent notes\n").partition("\n## Agent notes")
    if not heading:  # the agent's heading is gone: its file stays as it is, rather than lose what it wrote
        return old
    v = View(run, runs, archive)
    head = [run.decision.line()] if run.decision is not None else []
    text = "\n\n".join(head + [s for s in (section(v) for section in SECTIONS) if s]) + "\n\n## Agent notes" + notes
    write_atomic(path, text)
    if v.curves is not None:  # a run without curves gets no plots of other runs' curves
        draw_overlays(v.dir, [(f"this ({run.id})", v.curves)]
                      + ([(f"best ({v.best.id})", v.best_curves)] if v.best is not None else []))
    return text


# The lines `analyze.py run` prints, and the other commands' texts
def run_lines(run, best, note, runs, archive):
    """analysis.md's headline, shorter: decision, number, time, machine, what was caught, a crash's exception."""
    lines = uncontained(run) + ([run.decision.line()] if run.decision is not None else [])
    lines += [f"run {run.id}: commit {run.commit[:7]} {run.description}"] + ([note] if note else [])
    lines += [number_line(run)[2:].replace("**", "").replace("`", "") if run.val_bpb is not None else
              f"status {run.status}, outcome {run.trained.outcome}", time_line(run)]
    if best is not None:
        lines += [line[2:] for line in machine_line(stats.machine(run, best_code_runs(runs, run, best)), best)]
    lines += [f"caught: {c.case}: {c.detail}" for c in run.caught]
    if run.val_bpb is None and (error := error_text(run, archive.run_dir(run.id) / "run.log")[0]):
        lines.append(exception_line(error))
    return lines + [f"analysis: {archive.run_dir(run.id) / 'analysis.md'}"]


def list_text(runs):
    """Every run, one line each; a * marks each worker's best."""
    if not runs:
        return "no runs archived yet"
    bests = {b.id for b in (current_best(runs, w) for w in {r.worker for r in runs}) if b is not None}
    row = "{:<11}{:1} {:>9} {:>6}  {:<8} {:<11} {:<%d} {:<14} {}" % max(len(r.worker) for r in runs)
    return "\n".join([row.format("run", "", "val_bpb", "steps", "status", "outcome", "worker", "gpu", "description")]
                     + [row.format(r.id, "*" if r.id in bests else "", fmt(r.val_bpb, ".6f"), fmt(r.steps, ".0f"),
                                   r.status, r.trained.outcome, r.worker, r.gpu, r.description) for r in runs])


def current_best(runs, worker):
    """`worker`'s best now: the best rule (decide.best_of) applied after its latest run."""
    last = next((r for r in reversed(runs) if r.worker == worker), None)
    return last if last is None or (last.status == "keep" and last.val_bpb is not None) else best_of(runs, last)


def show_text(run, archive):
    path = archive.run_dir(run.id) / "analysis.md"
    return path.read_text() if path.exists() else write_analysis(run, archive.runs(), archive)


def best_text(runs, worker):
    """`worker`'s best, one tab-separated line (contrib/shared.py's `workers` shows every worker's)."""
    if (b := current_best(runs, worker)) is None:
        return f"no best run yet: no run kept by worker {worker}"
    return "\t".join([b.id, f"commit {b.commit[:7]}", f"val_bpb {b.val_bpb:.6f}", f"status {b.status}",
                      f"worker {b.worker}", b.description])


def compare_text(a, b, archive):
    """Two runs side by side, B against A, and the overlay plots in the archive."""
    lines = [f"compare {a.id} (A) with {b.id} (B)"]
    lines += [f"- {tag} {r.id}: val_bpb {fmt(r.val_bpb, '.6f')}, status {r.status}, steps {r.steps}, harness "
              f"{r.harness_key}, worker {r.worker}, GPU {r.gpu}: {r.description}" for tag, r in (("A", a), ("B", b))]
    if a.val_bpb is not None and b.val_bpb is not None:
        lines.append(f"- val_bpb B - A: {b.val_bpb - a.val_bpb:+.6f}")
    if a.harness_key != b.harness_key or a.gpu != b.gpu:
        lines.append("- different harness settings or devices: their numbers are not comparable")
    patch = "" if a.code_sha == b.code_sha else git("diff", "--no-color", a.commit, b.commit, "--", "train.py")
    lines += what_changed(a, b, patch, f"`git diff {a.commit[:7]} {b.commit[:7]} -- train.py`")
    ma, mb = (stats.read_metrics(archive.run_dir(r.id) / "metrics.jsonl")[0] for r in (a, b))
    if ma is not None and mb is not None:
        lines += departure_lines(mb, ma, stats.equal_steps(mb, ma), stats.noise(archive.runs(), b).band, "B", "A")
    out = archive.dir / f"compare_{a.id}_{b.id}"
    files = draw_overlays(out, [(f"A {a.id}", ma), (f"B {b.id}", mb)])
    return "\n".join(lines + [f"- plots: {', '.join(str(out / f) for f in files) or 'none (no metrics)'}"])


# The PNGs: PLOTS drawn by one overlay helper, and progress.png
def draw_overlays(out_dir, curves):
    """One PNG per file of PLOTS, a panel per key some run holds, each run in its own style against training
    progress (the y range leaves out the first tenth: the initial loss would flatten the rest); returns the files."""
    from matplotlib.figure import Figure  # imported when drawing only: the other commands start quickly
    curves, written = [(label, m) for label, m in curves if m is not None], []
    for file in dict.fromkeys(row[2] for row in PLOTS):
        panels = [(key, title) for key, title, f in PLOTS if f == file and any(key in m.columns for _, m in curves)]
        if not panels:
            continue
        axes = Figure(figsize=(7, 2.6 * len(panels))).subplots(len(panels), 1, squeeze=False)[:, 0]
        for ax, (key, title) in zip(axes, panels):
            lo, hi = [], []
            for (label, m), style in zip(curves, STYLES):
                p, _, y = m.finite(key)
                if (k := -(-len(y) // PLOT_POINTS)) > 1:  # bin medians: a 5000-step noisy line makes a PNG of MBs
                    p, y = (np.array([np.median(a[j:j + k]) for j in range(0, len(a), k)]) for a in (p, y))
                if len(y):
                    ax.plot(p, y, label=label, marker="o" if len(y) < 30 else None, ms=3, **style)
                    lo, hi = lo + [y.min()], hi + [(y[p >= 0.1] if (p >= 0.1).any() else y).max()]
            if lo:
                pad = 0.05 * (max(hi) - min(lo)) or 0.05 * abs(max(hi)) or 0.05
                ax.set_ylim(min(lo) - pad, max(hi) + pad)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("training progress (fraction of the time budget)", fontsize=8)
        save(axes[0].figure, Path(out_dir) / file)
        written.append(file)
    return written


def save(fig, path):
    """Every panel gridded, with its legend; written atomically: two writers of one file leave one whole PNG."""
    for ax in fig.axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, dpi=PLOT_DPI, format="png")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, png.getvalue())


def draw_progress(runs, path):
    """val_bpb of every comparable run of the latest run's harness and GPU, in order; the latest run's worker's
    best so far as steps, inside the one noise band (stats.noise, as analysis.md's); the last kept runs labelled."""
    from matplotlib.figure import Figure
    latest = next((r for r in reversed(runs) if r.val_bpb is not None), None)
    if latest is None:
        return
    pool = {r.id for r in stats.comparable(runs, latest)} | {latest.id}
    points = [(i, r) for i, r in enumerate(runs) if r.id in pool]
    kept, band = [(i, r) for i, r in points if r.status == "keep"], stats.noise(runs, latest).band
    best = []  # after each point, the best as the best rule had it then: its code's mean so far, not its luckiest draw
    for i, _ in points:
        now, before = current_best(runs[:i + 1], latest.worker), stats.comparable(runs[:i + 1], latest)
        ref = stats.code_runs(before, now.code_sha) if now is not None and now.id in {r.id for r in before} else []
        best.append(np.mean([r.val_bpb for r in ref]) if ref else np.nan)
    xs, ys = [i for i, _ in points] + [len(runs) - 1], np.array(best + best[-1:])  # the line runs to the last run
    ax = Figure(figsize=(12, 5)).subplots()
    ax.scatter([i for i, _ in points], [r.val_bpb for _, r in points], s=12, color="0.6", label="not kept")
    ax.scatter([i for i, _ in kept], [r.val_bpb for _, r in kept], s=30, color="C2", zorder=3, label="kept")
    ax.step(xs, ys, where="post", color="C2", lw=1, label=f"{latest.worker}'s best so far (its code's mean)")
    if band is not None:
        ax.fill_between(xs, ys - band, ys + band, step="post", color="C2", alpha=0.15, lw=0,
                        label=f"noise band (±{band:.4f})")
    for i, r in kept[-PROGRESS_LABELS:]:
        ax.annotate(r.description[:LABEL_CHARS], (i, r.val_bpb), fontsize=6, rotation=30, xytext=(3, 3),
                    textcoords="offset points", color="0.3")
    ax.set(xlabel="run (order archived)", ylabel="val_bpb")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title(f"val_bpb per run, harness {latest.harness_key}, {latest.gpu}", fontsize=9)
    save(ax.figure, Path(path))

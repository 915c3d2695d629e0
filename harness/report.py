"""
analysis.md: one function per section, each returning its text (or "" to leave it out), joined
once; and the plots that go with it.
"""
import re
from dataclasses import dataclass

import numpy as np

from harness.archive import (Run, best_for, comparable, load_run, own, paths, previous_for, remove_leftovers, row_bpb,
                             row_gpu, same_gpu, vetted_best, write_atomic)
from harness.capture import check_harness, uncommitted_train_py
from harness.changes import config_diff, config_only, diff_summary
from harness.decide import MACHINE_DRIFT, PROBE_SPREAD, Decision, Standing, judge, standing
from harness.identity import row_code, same_code
from harness.metrics import (SPIKE_WINDOW, SPIKE_Z, STALL_FACTOR, last_tenth_trend,
                             layer_medians, loss_spikes, throughput_stats)
from harness.noise import (MIN_DOF, NOISE_SIGMAS, SPEED_FLOOR, Noise, compare_curves, compare_steps, equal_steps,
                           row_steps)
from harness.plots import draw_layer_heatmap, draw_overlays

PLATEAU_DROP = 0.002       # a fitted loss drop under 0.2% over the last tenth of training = plateaued
LAYER_BEST_RATIO = 2.0     # a layer whose stat is this many times above/below the best's same layer is listed
LAYER_OUTLIER_RATIO = 3.0  # without a best: a layer this many times above/below its peers' median stands out
LAYER_SHOWN = 5            # at most this many layers listed per stat, the most extreme first
STALLS_SHOWN = 8           # at most this many stalls listed, the first ones; the count is of all

# ---------------------------------------------------------------------------
# What one analysis.md is written from

@dataclass
class Context:
    """Everything one analysis.md is written from."""
    run: Run
    best: Run | None
    prev: Run | None
    history: list           # results.tsv rows up to and including this run
    diff: str
    noise: Noise
    harness_change: str | None  # which of prepare.py / analyze.py differ from the pinned sha256
    uncommitted: tuple | None   # (sha256 as run, sha256 at the commit) of a train.py run with uncommitted changes
    standing: Standing          # the facts the decision is taken on, which every other line uses too
    decision: Decision


def build_context(run, rows):
    """Measured against what came before it, and against the best its diff.patch was written against
    (decisions taken since may have changed which run is best), so a rebuilt analysis.md reads as the
    original did. The decision is taken against that same best."""
    history = rows[:rows.index(run.row) + 1]
    recorded = next((r for r in history[:-1] if run.best_id and r.get("run_id") == run.best_id), None)
    best_row = recorded or best_for(history[:-1], run.row)
    prev_row = previous_for(history[:-1], run.row)
    best = load_run(best_row) if best_row else None
    prev = best if prev_row is best_row else (load_run(prev_row) if prev_row else None)
    diff = (run.dir / "diff.patch").read_text() if (run.dir / "diff.patch").exists() else ""
    changed = check_harness(run.summary) if run.summary else None
    facts = standing(run.row, history, best_row, run.measurement)
    return Context(run, best, prev, history, diff, facts.noise, changed, uncommitted_train_py(run.summary), facts,
                   judge(facts))


def report_run(run, rows):
    """analysis.md and the plots of one archived run; returns the analysis text. Callers hold the lock."""
    remove_leftovers(run.dir)
    ctx = build_context(run, rows)
    if run.metrics is not None:  # a run without curves gets no plots of other runs' curves
        others = [("best", ctx.best)] + ([("previous", ctx.prev)] if ctx.prev is not ctx.best else [])
        curves = [(f"this ({run.id})", run.metrics)]
        curves += [(f"{label} ({other.id})", other.metrics) for label, other in others if other is not None]
        draw_overlays(run.dir, curves)
        draw_layer_heatmap(run.dir, run.metrics)
    return write_analysis(ctx)


def fmt(x, spec=".4f", unit=""):
    return "n/a" if x is None or not np.isfinite(x) else format(x, spec) + unit


# ---------------------------------------------------------------------------
# The sections, in the order analysis.md has them

def section_headline(ctx):
    run, s = ctx.run, ctx.run.summary or {}
    lines = [f"# Run {run.id}", "", "## Headline", number_line(ctx),
             f"- commit {run.row['commit']}: {run.row['description'] or '(no subject)'}; harness "
             f"{run.row['harness'] or 'unknown'}; {run.row.get('num_steps') or 'n/a'} steps, "
             f"{fmt(s.get('training_seconds'), '.1f')} s training{wall_time(run)}, peak VRAM "
             f"{fmt(None if s.get('peak_vram_mb') is None else s['peak_vram_mb'] / 1024, '.1f', ' GiB')}"]
    lines += against_line(ctx) + machine_speed_line(ctx) + caught_lines(run) + other_gpu_line(ctx)
    lines += learning_vs_speed(ctx) + machine_line(ctx)
    if ctx.uncommitted:
        ran, committed = ctx.uncommitted
        lines.append(f"- [uncommitted changes]: train.py as run (sha256 {ran[:8]}) is not commit {run.row['commit']}'s "
                     f"(sha256 {committed[:8]}); no commit holds the code measured, and `status keep` refuses this run")
    if ctx.harness_change:
        lines.append(f"- harness changed since it was pinned: {ctx.harness_change}. The run is `invalid` "
                     "(or a crash) and is never the best")
    lines += [f"- note: {n}" for n in run.notes]
    return "\n".join(lines)


def number_line(ctx):
    """val_bpb and whose number it is: the harness's own measurement (`analyze.py run`: the model
    re-evaluated on the pinned rows and on the held-out shard), or, in a bare archive, train.py's."""
    run, m = ctx.run, ctx.run.measurement or {}
    line = f"- val_bpb **{fmt(run.bpb, '.6f')}**, status `{run.row['status']}`, outcome `{run.row['outcome']}`"
    if run.bpb is None:
        return line
    if not ctx.decision.measured:
        return line + "; the number the run printed itself (archived by `analyze.py`, not measured by the harness)"
    heldout = number(m.get("heldout_bpb"), run.row.get("heldout_bpb"))
    reported = number(m.get("reported_val_bpb"))
    return (line + "; measured by the harness" + (f" (train.py printed {reported:.6f})" if reported is not None else "")
            + f"; held-out bpb {fmt(heldout, '.6f')}")


def number(*values):
    """The first of `values` that is a finite number (a JSON number or a results.tsv field), or None."""
    for value in values:
        try:
            x = float(value)
        except (TypeError, ValueError):
            continue
        if np.isfinite(x):
            return x
    return None


def wall_time(run):
    m = run.measurement or {}
    wall, outside = number(m.get("wall_s"), run.row.get("wall_s")), number(m.get("outside_s"), run.row.get("outside_s"))
    return "" if wall is None else f", {wall:.1f} s wall" + ("" if outside is None else f" ({outside:.1f} s outside the budget)")


def against_line(ctx):
    """This run's val_bpb against the best's and the previous run's: one run against one, as facts; the
    decision's delta is of the means."""
    run, against = ctx.run, []
    others = (("best", ctx.best),) + ((("previous", ctx.prev),) if ctx.prev is not ctx.best else ())
    for label, other in others:
        if other is None:
            against.append(f"vs {label}: no earlier comparable run")
        elif run.bpb is not None:
            delta = run.bpb - other.bpb
            against.append(f"vs {label} ({other.id}, {other.bpb:.6f}): {delta:+.6f} "
                           f"({'lower' if delta < 0 else 'higher' if delta > 0 else 'equal'})")
    return ["- " + "; ".join(against)] if against else []


def machine_speed_line(ctx):
    """The evaluator's machine speed for this run against the best's runs: the facts of the decision's
    machine rule."""
    m = ctx.standing.machine
    if m.speed is None:
        return []
    probes = "" if not m.probes else (
        f" (probes {m.probes[0]:,.0f} before and {m.probes[1]:,.0f} after the evaluation, {m.spread:.0%} apart"
        + (f", beyond {PROBE_SPREAD:.0%}" if m.spread > PROBE_SPREAD else "") + ")")
    line = f"- machine speed {m.speed:,.0f} GFLOP/s{probes}"
    if ctx.best is None:
        return [line + ": no best to compare with"]
    if m.usual is None:
        return [line + "; the best's runs have no machine speed (archived without `analyze.py run`): not compared"]
    beyond = abs(m.drift) > MACHINE_DRIFT
    return [line + f" vs {m.usual:,.0f}, the median of the best's {m.runs} run(s): {m.drift:+.0%}, "
            + (f"beyond {MACHINE_DRIFT:.0%}: the machine was {'faster' if m.drift > 0 else 'slower'}" if beyond
               else f"within {MACHINE_DRIFT:.0%}: the same machine")]


def caught_lines(run):
    """The cases the harness caught, with what it found (measurement.json)."""
    found = [c for c in (run.measurement or {}).get("caught") or [] if isinstance(c, dict)]
    if found:
        return [f"- caught: {c.get('case')}: {c.get('detail') or 'no detail'}" for c in found]
    return [f"- caught: {run.row['caught']}"] if run.row.get("caught") else []


def other_gpu_line(ctx):
    """With no best on this run's GPU model, the worker's best on another one (or anyone's): named with
    both devices, never compared, since on a fixed time budget val_bpb depends on the device."""
    run = ctx.run
    if ctx.best is not None or not row_gpu(run.row):
        return []
    elsewhere = [r for r in comparable(ctx.history[:-1], run.row["harness"])
                 if not same_gpu(row_gpu(r), row_gpu(run.row))]
    best = (vetted_best([r for r in elsewhere if own(r, run.row.get("worker"))])[0]
            or vetted_best(elsewhere)[0])
    if best is None:
        return []
    whose = "" if own(best, run.row.get("worker")) else f" by worker {best.get('worker')}"
    return [f"- GPU: this run ran on {row_gpu(run.row)}; the best under this harness{whose} is {best['run_id']} "
            f"(val_bpb {best['val_bpb']}) on {row_gpu(best)}: another device, so it is not compared"]


def learning_vs_speed(ctx):
    """The smoothed train loss at equal steps beside equal progress, and the step counts: on a fixed
    time budget a run that took more steps is ahead at every point of progress without learning more
    per step, so the two comparisons together say which of the two made the val_bpb difference."""
    run, best = ctx.run, ctx.best
    if best is None or run.bpb is None or run.metrics is None or best.metrics is None:
        return []
    g = equal_steps(run.metrics, best.metrics)
    steps, ref = row_steps(run.row), row_steps(best.row)
    if g is None or not steps or not ref:
        return []
    lr = (f"; LR multiplier there {g.lr[0]:.2f} vs {g.lr[1]:.2f}" if g.lr and abs(g.lr[0] - g.lr[1]) > 0.05 else "")
    tok = [throughput_stats(m).get("tokens_per_sec") for m in (run.metrics, best.metrics)]
    line = (f"- learning vs speed: at equal steps {g.gap:+.4f} smoothed train loss against the best (step {g.step}, "
            f"the last both reached{lr}); at equal progress {g.progress_gap:+.4f} (progress {g.progress:.2f}); "
            f"steps {steps:.0f} vs {ref:.0f}, median tokens/s {fmt(tok[0], ',.0f')} vs {fmt(tok[1], ',.0f')}")
    return [line, "- explained by: " + cause(g, steps / ref - 1, ctx.noise.speed_tol, steps_source(ctx))]


def steps_source(ctx):
    """Where a difference in step count comes from, by the decision's facts about the machine."""
    if same_code(ctx.run.row, ctx.best.row):
        return " with the best's code, so from the machine"
    m = ctx.standing.machine
    if m.moved():
        return f" while {m.moved()}"
    if m.drift is not None:
        return f" on a machine within {MACHINE_DRIFT:.0%} of its speed during the best's runs, so from the code"
    return " (the code differs, so from the code or the machine: a rerun of this commit tells them apart)"


def cause(g, more, tol, source):
    """Which of learning per step (the loss at equal steps) and speed (the step count) tells the two
    runs apart; `more` is the relative step difference, `tol` the speed noise of repeats, `source` what
    made the steps differ (steps_source)."""
    per_step = "ahead" if g.judged_gap < -g.threshold else "behind" if g.judged_gap > g.threshold else None
    faster = "more" if more > tol else "fewer" if more < -tol else None
    at = f"{g.judged_gap:+.4f} at step {g.judged_step}" + (
        ", the last where the LR schedules agree" if g.judged_step != g.step else "")
    steps = f"{abs(more):.0%} {faster} steps{source}"
    if per_step is None and faster is None:
        return (f"neither: the loss at equal steps matches the best's ({at}, within {g.threshold:.4f}) and the step "
                f"counts are within {tol:.0%}")
    if per_step is None:
        return f"speed: per step it learns as the best does ({at}, within {g.threshold:.4f}); it took {steps}"
    if faster is None:
        return (f"learning per step: {per_step} of the best at equal steps ({at}, beyond {g.threshold:.4f}) with as "
                f"many steps (within {tol:.0%})")
    both = "and" if (per_step == "ahead") == (faster == "more") else "but"
    return f"both: {per_step} per step ({at}, beyond {g.threshold:.4f}) {both} {steps}"


def machine_line(ctx):
    """Same code at another speed than that code's other runs: the machine was slower or faster (a fact
    the decision's machine rule reads too)."""
    if not ctx.standing.machine.steps:
        return []
    steps, usual = ctx.standing.machine.steps
    whose = ("the best's code" if ctx.best is not None and same_code(ctx.run.row, ctx.best.row)
             else "the code of earlier runs")
    return [f"- the machine, not the code: train.py is {whose} (comments and blank lines aside), and this run took "
            f"{steps:.0f} steps where that code's other runs take {usual:.0f} ({steps / usual - 1:+.0%}, beyond the "
            f"{ctx.noise.speed_tol:.0%} speed noise of repeats): the machine was {'slower' if steps < usual else 'faster'}. "
            "The run is left out of the noise band"]


def section_crash(ctx):
    run = ctx.run
    if run.row["status"] != "crash":
        return ""
    error = (run.summary or {}).get("error")
    if not error and (run.dir / "run.log").exists():
        error = traceback_tail((run.dir / "run.log").read_text(errors="replace"))
    return "\n".join(["## Crash", f"- outcome `{run.row['outcome']}`; the error's tail "
                      f"({'from run_summary.json' if (run.summary or {}).get('error') else 'from run.log'}):",
                      "```", (error or "(no error text: run.log is empty or missing)").rstrip(), "```"])


def traceback_tail(log, max_lines=30):
    lines = log.rstrip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    tail = lines[starts[-1]:] if starts else lines
    return "\n".join(tail[-max_lines:])


def section_changes(ctx):
    best = ctx.best
    if best is None:
        return "## What changed\n- no earlier comparable run: diff.patch is empty"
    lines = [f"## What changed (against best {best.id})"]
    old, new = ((r.summary or {}).get("config") or {} for r in (best, ctx.run))
    if ctx.run.summary and best.summary:
        lines += config_diff(old, new)
    else:
        lines.append("- config: unknown (a run has no summary)")
    if ctx.diff.strip() and same_code(ctx.run.row, best.row):
        changed = diff_summary(ctx.diff)[0].split(": ", 1)[1]
        lines.append(f"- diff.patch: train.py differs from the best's only in comments and blank lines ({changed}): "
                     "the same code, so this run is a repeat of the best's")
    elif ctx.diff.strip() and config_only(ctx.diff, old, new):
        lines.append(f"- diff.patch: {diff_summary(ctx.diff)[0].split(': ', 1)[1]}, only the config lines above")
    else:
        lines += diff_summary(ctx.diff)
    return "\n".join(lines)


def section_trajectory(ctx):
    m = ctx.run.metrics
    if m is None or "train/loss_smooth" not in m:
        return "## Trajectory\n- no training loss recorded"
    p, step, smooth = m.smooth_loss
    finite = np.isfinite(smooth)
    if not finite.any():
        return "## Trajectory\n- every smoothed loss value is NaN or inf"
    i_min = int(np.nanargmin(np.where(finite, smooth, np.nan)))
    last = np.flatnonzero(finite)[-1]
    lines = ["## Trajectory",
             f"- smoothed loss: first {smooth[finite][0]:.4f} (step {int(step[finite][0])}), final {smooth[last]:.4f} "
             f"(step {int(step[last])}, progress {p[last]:.2f}), minimum {smooth[i_min]:.4f} "
             f"(step {int(step[i_min])}, progress {p[i_min]:.2f})"]
    trend = last_tenth_trend(m)
    if "slope" in trend:  # a run with fewer than TREND_MIN_STEPS steps in its last tenth has no trend to tell
        falling = trend["fraction"] < -PLATEAU_DROP
        stop = "when time ran out" if ctx.run.row.get("outcome") == "ok" else "when it stopped"
        state = (f"still improving {stop}" if falling else
                 "rising at the end" if trend["fraction"] > PLATEAU_DROP else "plateaued")
        lines.append(f"- last tenth of training: fitted change {trend['change']:+.4f} over {trend['steps']} steps "
                     f"({100 * trend['fraction']:+.2f}% of the loss; slope {trend['slope']:+.3f} per unit progress): "
                     f"{state}" + warmdown_note(m, trend["window"], falling))
    return "\n".join(lines)


def warmdown_note(m, window, falling):
    """The LR multiplier across the last tenth: a warmdown lowers the loss there by itself."""
    p, _, lr = m.series("train/lr_multiplier")
    ok = np.isfinite(lr)
    if ok.sum() < 2:
        return ""
    start, end = np.interp(window, p[ok], lr[ok])
    if end >= start:
        return ""
    return f"; LR multiplier over that window: {start:.3f} -> {end:.3f}" + (
        "; part of the fall is this annealing" if falling else "")


def section_departure(ctx):
    run, best = ctx.run, ctx.best
    if best is None or best.metrics is None or run.metrics is None:
        return "## Where it departs from the best\n- no comparison: " + (
            "no earlier comparable run" if best is None else "a run has no metrics")
    lines = [f"## Where it departs from the best ({best.id}), on training progress and at equal steps"]
    lines += compare_curves(run.metrics, best.metrics, ctx.noise.band, "this run", "the best")
    lines += compare_steps(run.metrics, best.metrics, "this run", "the best")
    return "\n".join(lines)


def section_stability(ctx):
    m = ctx.run.metrics
    if m is None:
        return "## Stability\n- no metrics"
    bad = []
    for key, (idx, values) in m.columns.items():
        nonfinite = ~np.isfinite(values)
        if nonfinite.any():
            bad.append(f"{key} from step {int(m.step[idx[nonfinite][0]])} ({int(nonfinite.sum())} rows)")
    nans = "NaN/inf: " + ("none" if not bad else "; ".join(bad[:8]) + (" ..." if len(bad) > 8 else ""))
    if "train/loss" not in m.columns:
        return f"## Stability\n- {nans}"
    p, step, loss = m.series("train/loss")
    spikes = loss_spikes(step, p, loss)
    lines = ["## Stability", f"- loss spikes (robust z > {SPIKE_Z:g} against the trailing {SPIKE_WINDOW} steps): "
             f"{len(spikes) or 'none'}; {nans}"]
    lines += [f"  - step {e['step']} (progress {e['progress']:.2f}): loss {e['loss']:.4f} vs {e['baseline']:.4f} "
              f"typical ({e['loss'] - e['baseline']:+.4f}, z {e['z']:.1f})" for e in spikes[:10]]
    return "\n".join(lines)


def section_throughput(ctx):
    m, s = ctx.run.metrics, ctx.run.summary or {}
    lines = ["## Throughput"]
    stats = throughput_stats(m) if m is not None else {}
    if stats:
        lines.append(f"- counted steps (progress > 0): step time median {stats['step_ms']:.1f} ms (p90 "
                     f"{stats['p90_ms']:.1f}); tokens/s median {fmt(stats['tokens_per_sec'], ',.0f')}; MFU median "
                     f"{fmt(stats['mfu'], '.2f', '%')} (summary {fmt(s.get('mfu_percent'), '.2f', '%')})")
        lines.append(stalls_line(ctx, m))
    timings = {k: v for k, v in (s.get("timings") or {}).items() if k not in ("started_at", "finished_at")}
    spent = [f"{k} {v:.1f} s" for k, v in timings.items() if isinstance(v, (int, float))]
    spent += [f"{k} {s[k]:.1f} s" for k in ("training_seconds", "total_seconds") if s.get(k) is not None]
    lines.append("- time: " + (", ".join(spent) if spent else "no timings in the summary"))
    if ctx.best is not None and ctx.best.metrics is not None and stats:
        lines += throughput_vs_best(ctx, stats, throughput_stats(ctx.best.metrics))
    return "\n".join(lines)


def stalls_line(ctx, m):
    """Stalls against the fastest median step of this code's loaded runs (this one, the best, the
    previous one): a run slowed down at every step has no stall against its own median."""
    ref, ref_id = m.median_step_ms, None
    for other in (ctx.best, ctx.prev):
        if other is not None and other.id != ctx.run.id and other.metrics is not None \
                and same_code(other.row, ctx.run.row) and (other.metrics.median_step_ms or ref) < ref:
            ref, ref_id = other.metrics.median_step_ms, other.id
    if ref_id is None:
        rule = f"counted step > {STALL_FACTOR:g}x median"
    elif m.median_step_ms > STALL_FACTOR * ref:
        return (f"- every step slow: median step time {m.median_step_ms:.0f} ms, {m.median_step_ms / ref:.1f}x the "
                f"{ref:.0f} ms of the same code's run {ref_id}: the machine was slower throughout")
    else:
        rule = f"counted step > {STALL_FACTOR:g}x {ref:.0f} ms, the median step of the same code's run {ref_id}"
    slow = m.slow_steps(ref)
    shown = ", ".join(f"step {st} ({ms:.0f} ms)" for st, _, ms in slow[:STALLS_SHOWN])
    more = f", and {len(slow) - STALLS_SHOWN} more" if len(slow) > STALLS_SHOWN else ""
    return f"- stalls ({rule}): " + (f"{len(slow)}: {shown}{more}" if slow else "none")


def throughput_vs_best(ctx, stats, ref):
    """Step time and tokens/s against the best: a halved batch halves the step time while tokens/s falls."""
    if not ref:
        return []
    line = (f"- vs best ({ctx.best.id}): step time {stats['step_ms']:.1f} vs {ref['step_ms']:.1f} ms "
            f"({100 * (stats['step_ms'] / ref['step_ms'] - 1):+.1f}%)")
    tok, ref_tok = stats["tokens_per_sec"], ref["tokens_per_sec"]
    if tok is not None and ref_tok:
        line += f"; tokens/s {tok:,.0f} vs {ref_tok:,.0f} ({100 * (tok / ref_tok - 1):+.1f}%)"
    if same_code(ctx.run.row, ctx.best.row):
        line += "; the same code, so any difference is the machine's"
    return [line]


def section_layers(ctx):
    """Each layer against the best's same layer when the best logged layers: layers differ by design
    (value-embedding blocks carry ~6x the gradient norm), so only a change from the best is news.
    Without a best, each layer against the same module in the other blocks. Left out for a run that
    did not finish (its second half of training is not the best's) and for a repeat of the best's code."""
    m = ctx.run.metrics
    if ctx.run.row["status"] == "crash" or ctx.run.row.get("outcome", "ok") != "ok":
        return ""
    if ctx.best is not None and same_code(ctx.run.row, ctx.best.row):
        return ""  # a repeat of the best's code: its layers can differ from the best's only by noise and speed
    stats = m.layer_keys() if m is not None else {}
    if not stats:
        return "## Per-layer health\n- no layer/ keys in metrics.jsonl"
    best = ctx.best.metrics if ctx.best is not None else None
    ref = best.layer_keys() if best is not None else {}
    if ref:
        lines = [f"## Per-layer health (median over the second half of training, this run / best {ctx.best.id}'s "
                 f"same layer; listed beyond {LAYER_BEST_RATIO:g}x or below {1 / LAYER_BEST_RATIO:g}x, "
                 f"at most {LAYER_SHOWN} per stat, the largest first)"]
        empty = f"none beyond {LAYER_BEST_RATIO:g}x or below {1 / LAYER_BEST_RATIO:g}x of the best"
    else:
        lines = [f"## Per-layer health (median over the second half of training; a layer stands out at "
                 f"{LAYER_OUTLIER_RATIO:g}x above or below the median of the same module in other blocks; "
                 f"at most {LAYER_SHOWN} per stat, the largest first)"]
        empty = "nothing stands out"
    quiet = []
    for stat, names in sorted(stats.items()):
        values = layer_medians(m, names)
        missing = len(set(values) - set(ref.get(stat, {}))) if ref else 0
        head = f"{stat} ({len(values)} layers" + (f", {missing} not in the best" if missing else "") + ")"
        found = layers_vs_best(values, layer_medians(best, ref.get(stat, {}))) if ref else layer_outliers(values)
        if not found:
            quiet.append(head)
            continue
        more = f"; {len(found) - LAYER_SHOWN} more" if len(found) > LAYER_SHOWN else ""
        lines.append(f"- {head}: " + "; ".join(found[:LAYER_SHOWN]) + more)
    if quiet:  # the stats where nothing is listed share one line
        lines.insert(1, f"- {', '.join(quiet)}: {empty}")
    return "\n".join(lines)


def layers_vs_best(values, ref):
    """NaN/inf layers, then the layers whose ratio to the best's same layer is beyond LAYER_BEST_RATIO,
    the largest first."""
    out = [f"{name} is NaN/inf" for name, v in values.items() if not np.isfinite(v)]
    ratios = {name: v / ref[name] for name, v in values.items()
              if np.isfinite(v) and v > 0 and np.isfinite(ref.get(name, np.nan)) and ref[name] > 0}
    far = [n for n, r in ratios.items() if r > LAYER_BEST_RATIO or r < 1 / LAYER_BEST_RATIO]
    far.sort(key=lambda n: -abs(np.log(ratios[n])))
    return out + [f"{n} at {ratios[n]:.2f}x ({values[n]:.3g} vs {ref[n]:.3g})" for n in far]


def layer_outliers(values):
    """Compare each layer with the same module in the other blocks: '3.attn.c_q' is grouped with
    'attn.c_q' of every other block, a bare block index with the other blocks. The largest first."""
    groups = {}
    for name, value in values.items():
        head, _, rest = name.partition(".")
        groups.setdefault(rest if head.isdigit() else name, []).append((name, value))
    out, found = [], []
    for members in groups.values():
        out += [f"{name} is NaN/inf" for name, v in members if not np.isfinite(v)]
        finite = [(name, v) for name, v in members if np.isfinite(v) and v > 0]
        if len(finite) < 3:
            continue
        for name, v in finite:
            median = float(np.median([w for other, w in finite if other != name]))
            if v > LAYER_OUTLIER_RATIO * median or v < median / LAYER_OUTLIER_RATIO:
                found.append((abs(np.log(v / median)),
                              f"{name} {v:.3g} ({v / median:.1f}x the median {median:.3g} of the other blocks)"))
    return out + [text for _, text in sorted(found, key=lambda f: -f[0])]


def section_noise(ctx):
    """One line for this code's runs, one for the band, then the runs left out and what makes the band
    rough, only when there are any."""
    noise, code = ctx.noise, row_code(ctx.run.row) or "unknown"
    own, clean = noise.own, noise.clean(code)
    lines = ["## Noise"]
    if len(own) >= 2:  # a code run once has nothing to say here
        line = f"- this code ({code[:8]}): {len(own)} runs ({', '.join(r['run_id'] for r in own)})"
        if len(clean) >= 2:
            vals = np.array([row_bpb(r) for r in clean])
            line += (f"; val_bpb{'' if clean == own else f' of the {len(clean)} at its usual speed'}: mean "
                     f"{vals.mean():.6f}, std {vals.std(ddof=1):.6f}, range {np.ptp(vals):.6f}")
        lines.append(line)
    if noise.band is None:
        lines.append("- noise band: unknown: no code has two runs at its usual speed under this harness. Rerunning an "
                     "unchanged commit measures it; each rerun is archived as <commit7>-2, -3, ...")
    else:
        codes = sum(len(noise.clean(c)) >= 2 for c in noise.groups)
        lines.append(f"- noise band: +-{noise.band:.6f} ({NOISE_SIGMAS:g} x sqrt(2) x pooled std {noise.pooled_std:.6f}: "
                     f"one run against one best run; from {noise.runs} runs of {codes} repeated code(s) at their usual "
                     f"speed, {noise.dof} degrees of freedom)" + means_band(ctx.decision))
    return "\n".join(lines + left_out(noise) + band_trust(noise))


def means_band(d):
    """The band of the decision's difference of means, when it is not one run against one."""
    if d.band is None or (d.n, d.m) == (1, 1):
        return ""
    return (f"; for the decision's means of {d.n} vs {d.m} runs: +-{d.band:.6f} ({NOISE_SIGMAS:g} x pooled std x "
            f"sqrt(1/{d.n} + 1/{d.m}))")


def left_out(noise):
    """The runs at another speed than their code's usual one, which the band leaves out."""
    if not noise.disturbed:
        return []
    rows = {r["run_id"]: r for g in noise.groups.values() for r in g}
    runs = [f"{run_id} {steps:.0f} steps vs {usual:.0f} ({steps / usual - 1:+.0%}"
            + (f", val_bpb {row_bpb(rows[run_id]):.6f})" if run_id in rows else ")")
            for run_id, (steps, usual) in noise.disturbed.items()]
    return [f"- left out, at another speed than their code's usual one (beyond {noise.speed_tol:.0%}): " + "; ".join(runs)]


def band_trust(noise):
    """What makes the band rough, and what would firm it up; nothing when nothing does."""
    found = []
    if noise.band is not None and noise.dof < MIN_DOF:
        found.append((f"{noise.dof} degree of freedom", "another repeat of the best's code"))
    if noise.speed_spread and noise.speed_spread > SPEED_FLOOR:
        found.append((f"the step counts of repeats at their usual speed spread {noise.speed_spread:.0%} (robust std), "
                      "so speed differences of the machine are inside the band", "repeats on a quieter machine"))
    repeats = sum(len(g) for g in noise.repeated.values())
    if repeats and 2 * len(noise.disturbed) >= repeats:
        found.append((f"{len(noise.disturbed)} of {repeats} repeats ran at another speed than their code's usual one",
                      "repeats while nothing else runs on the machine"))
    if not found:
        return []
    return [f"- the band is rough: {'; '.join(r for r, _ in found)}. What would firm it up: "
            f"{'; '.join(dict.fromkeys(f for _, f in found))}"]


def section_agent_notes(ctx):
    return "## Agent notes\n"


# ---------------------------------------------------------------------------
# Writing analysis.md, and rewriting its status line

SECTIONS = (section_headline, section_crash, section_changes, section_trajectory, section_departure,
            section_stability, section_throughput, section_layers, section_noise, section_agent_notes)


def write_analysis(ctx):
    """The decision's line first, then the sections."""
    text = "\n\n".join([ctx.decision.line()] + [t for t in (section(ctx) for section in SECTIONS) if t])
    write_atomic(ctx.run.dir / "analysis.md", text)
    return text


def set_headline_status(row):
    """Rewrite the status in the run's analysis.md headline; the Agent notes below it are the agent's."""
    path = paths().run_dir(row["run_id"]) / "analysis.md"
    if not path.exists():
        return
    head, sep, notes = path.read_text().partition("\n## Agent notes")
    head = re.sub(r"^(- val_bpb \*\*[^*]*\*\*, status )`\w+`", rf"\g<1>`{row['status']}`", head, count=1, flags=re.M)
    write_atomic(path, head + sep + notes)

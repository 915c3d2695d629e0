"""
analysis.md: one function per section, each returning its text (or "" to leave it out), joined
once; and the plots that go with it.
"""
import re
from dataclasses import dataclass

import numpy as np

from harness.archive import (ARCHIVE_DIR, RESULTS_TSV, Run, comparable, load_run, pick_best, pick_previous,
                             remove_leftovers, row_bpb, write_atomic)
from harness.capture import check_harness, uncommitted_train_py
from harness.changes import config_diff, diff_summary
from harness.metrics import (SPIKE_WINDOW, SPIKE_Z, STALL_FACTOR, TREND_MIN_STEPS, last_tenth_trend,
                             layer_medians, loss_spikes, throughput_stats)
from harness.noise import NOISE_SIGMAS, compare_curves, difference_band, noise_band, pooled_std, row_steps
from harness.plots import draw_layer_heatmap, draw_overlays

PLATEAU_DROP = 0.002       # a fitted loss drop under 0.2% over the last tenth of training = plateaued
LAYER_BEST_RATIO = 2.0     # a layer whose stat is this many times above/below the best's same layer is listed
LAYER_OUTLIER_RATIO = 3.0  # without a best: a layer this many times above/below its peers' median stands out
LAYER_SHOWN = 5            # at most this many layers listed per stat, the most extreme first

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
    noise: dict
    harness_change: str | None  # which of prepare.py / analyze.py differ from the pinned sha256
    uncommitted: tuple | None   # (sha256 as run, sha256 at the commit) of a train.py run with uncommitted changes


def build_context(run, rows):
    """Measured against what came before it, and against the best its diff.patch was written against
    (decisions taken since may have changed which run is best), so a rebuilt analysis.md reads as the
    original did."""
    history = rows[:rows.index(run.row) + 1]
    recorded = next((r for r in history[:-1] if run.best_id and r.get("run_id") == run.best_id), None)
    best_row = recorded or pick_best(history[:-1], run.row["harness"])
    prev_row = pick_previous(history[:-1], run.row["harness"])
    best = load_run(best_row) if best_row else None
    prev = best if prev_row is best_row else (load_run(prev_row) if prev_row else None)
    diff = (run.dir / "diff.patch").read_text() if (run.dir / "diff.patch").exists() else ""
    changed = check_harness(run.summary) if run.summary else None
    return Context(run, best, prev, history, diff, noise_band(history, run.row), changed,
                   uncommitted_train_py(run.summary))


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
    lines = [f"# Run {run.id}", "", "## Headline",
             f"- val_bpb **{fmt(run.bpb, '.6f')}**, status `{run.row['status']}`, outcome `{run.row['outcome']}`",
             f"- commit {run.row['commit']}: {run.row['description'] or '(no subject)'}; harness "
             f"{run.row['harness'] or 'unknown'}; {run.row.get('num_steps') or 'n/a'} steps, "
             f"{fmt(s.get('training_seconds'), '.1f')} s training, peak VRAM "
             f"{fmt(None if s.get('peak_vram_mb') is None else s['peak_vram_mb'] / 1024, '.1f', ' GiB')}"]
    for label, other in (("best", ctx.best), ("previous", ctx.prev)):
        if other is None:
            lines.append(f"- vs {label}: no earlier comparable run")
        elif run.bpb is not None:
            delta = run.bpb - other.bpb
            lines.append(f"- vs {label} ({other.id}, {other.bpb:.6f}): {delta:+.6f} "
                         f"({'better' if delta < 0 else 'worse' if delta > 0 else 'equal'})")
    lines.append(f"- verdict, this run alone: {verdict(ctx)}")
    lines += mean_verdict(ctx)
    if ctx.uncommitted:
        ran, committed = ctx.uncommitted
        lines.append(f"- [uncommitted changes]: train.py as run (sha256 {ran[:8]}) is not commit {run.row['commit']}'s "
                     f"(sha256 {committed[:8]}); no commit holds the code measured, and `status keep` refuses this run")
    if ctx.harness_change:
        lines.append(f"- harness changed since it was pinned: {ctx.harness_change}. The run is `invalid` "
                     "(or a crash) and is never the best")
    lines += [f"- note: {n}" for n in run.notes]
    return "\n".join(lines)


def verdict(ctx):
    run, band = ctx.run, ctx.noise["band"]
    if run.bpb is None:
        return "no val_bpb (the run did not finish)"
    if run.row["status"] == "invalid":
        return "not comparable: the harness changed (see below)"
    if ctx.best is None:
        return "first comparable run: nothing to beat yet"
    delta = run.bpb - ctx.best.bpb
    if band is None:
        return f"{delta:+.6f} against the best; the noise band is unknown, so its significance is unknown"
    basis = f"+-{band:.6f} from {ctx.noise['runs']} runs, {ctx.noise['dof']} degrees of freedom"
    if ctx.noise["outliers"]:
        basis += f"; {len(ctx.noise['outliers'])} of them outliers on steps, see Noise"
    if abs(delta) <= band:
        return f"{delta:+.6f} against the best lies within the noise band ({basis})"
    return (f"{delta:+.6f} against the best is {'an improvement' if delta < 0 else 'a regression'} "
            f"beyond the noise band ({basis})")


def mean_verdict(ctx):
    """Mean val_bpb of this train.py's runs against the mean of the best's, once either is repeated:
    the difference of an N-run and an M-run mean has std pooled_std x sqrt(1/N + 1/M)."""
    run, best, noise = ctx.run, ctx.best, ctx.noise
    if run.bpb is None or best is None or run.row["status"] == "invalid":
        return []
    own, ref = noise["own"], noise["by_sha"].get(best.row.get("train_py_sha"), [])
    if not own or not ref or max(len(own), len(ref)) < 2:
        return []
    mean, ref_mean = np.mean([row_bpb(r) for r in own]), np.mean([row_bpb(r) for r in ref])
    if own is ref:
        return [f"- mean val_bpb of this train.py's {len(own)} run(s): {mean:.6f} (the best's train.py is the same)"]
    delta, pooled = mean - ref_mean, noise["pooled_std"]
    line = (f"- verdict, means of repeated runs ({len(own)} vs {len(ref)}): mean val_bpb of this train.py's "
            f"{len(own)} run(s) {mean:.6f}, of the best's train.py's {len(ref)} run(s) {ref_mean:.6f}; "
            f"difference {delta:+.6f}")
    if pooled is None:
        return [line + "; the noise band for a difference of means is unknown"]
    band = difference_band(pooled, len(own), len(ref))
    basis = f"+-{band:.6f} = {NOISE_SIGMAS:g} x pooled std {pooled:.6f} x sqrt(1/{len(own)} + 1/{len(ref)})"
    if abs(delta) <= band:
        return [f"{line}: within the band for a difference of means ({basis})"]
    return [f"{line}: {'an improvement' if delta < 0 else 'a regression'} beyond the band for a difference "
            f"of means ({basis})"]


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
    if ctx.run.summary and best.summary:
        lines += config_diff((best.summary.get("config") or {}), (ctx.run.summary.get("config") or {}))
    else:
        lines.append("- config: unknown (a run has no summary)")
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
    if "slope" not in trend:
        lines.append(f"- last tenth of training: {trend['steps']} steps, too few to call a trend "
                     f"(a fit needs {TREND_MIN_STEPS})")
    else:
        falling = trend["fraction"] < -PLATEAU_DROP
        stop = "when time ran out" if ctx.run.row.get("outcome") == "ok" else "when it stopped"
        state = (f"still improving {stop}" if falling else
                 "rising at the end" if trend["fraction"] > PLATEAU_DROP else "plateaued")
        lines.append(f"- last tenth of training: fitted change {trend['change']:+.4f} over {trend['steps']} steps "
                     f"({100 * trend['fraction']:+.2f}% of the loss; slope {trend['slope']:+.3f} per unit progress): "
                     f"{state}")
        lines += warmdown_note(m, trend["window"], falling)
    return "\n".join(lines)


def warmdown_note(m, window, falling):
    """The LR multiplier across the last tenth: a warmdown lowers the loss there by itself."""
    p, _, lr = m.series("train/lr_multiplier")
    ok = np.isfinite(lr)
    if ok.sum() < 2:
        return []
    start, end = np.interp(window, p[ok], lr[ok])
    if end >= start:
        return []
    return [f"- LR multiplier over that window: {start:.3f} -> {end:.3f}"
            + ("; part of the fall is this annealing" if falling else "")]


def section_departure(ctx):
    run, best = ctx.run, ctx.best
    if best is None or best.metrics is None or run.metrics is None:
        return "## Where it departs from the best\n- no comparison: " + (
            "no earlier comparable run" if best is None else "a run has no metrics")
    lines = [f"## Where it departs from the best ({best.id}), aligned on training progress"]
    lines += compare_curves(run.metrics, best.metrics, ctx.noise["band"], "this run", "the best")
    return "\n".join(lines)


def section_stability(ctx):
    m = ctx.run.metrics
    if m is None:
        return "## Stability\n- no metrics"
    lines = ["## Stability"]
    if "train/loss" in m.columns:
        p, step, loss = m.series("train/loss")
        spikes = loss_spikes(step, p, loss)
        lines.append(f"- loss spikes (robust z > {SPIKE_Z:g} against the trailing {SPIKE_WINDOW} steps): "
                     + ("none" if not spikes else f"{len(spikes)}"))
        lines += [f"  - step {e['step']} (progress {e['progress']:.2f}): loss {e['loss']:.4f} vs {e['baseline']:.4f} "
                  f"typical ({e['loss'] - e['baseline']:+.4f}, z {e['z']:.1f})" for e in spikes[:10]]
    bad = []
    for key, (idx, values) in m.columns.items():
        nonfinite = ~np.isfinite(values)
        if nonfinite.any():
            bad.append(f"{key} from step {int(m.step[idx[nonfinite][0]])} ({int(nonfinite.sum())} rows)")
    lines.append("- NaN/inf: " + ("none" if not bad else "; ".join(bad[:8]) + (" ..." if len(bad) > 8 else "")))
    return "\n".join(lines)


def section_throughput(ctx):
    m, s = ctx.run.metrics, ctx.run.summary or {}
    lines = ["## Throughput"]
    stats = throughput_stats(m) if m is not None else {}
    if stats:
        lines.append(f"- counted steps (progress > 0): step time median {stats['step_ms']:.1f} ms (p90 "
                     f"{stats['p90_ms']:.1f}); tokens/s median {fmt(stats['tokens_per_sec'], ',.0f')}; MFU median "
                     f"{fmt(stats['mfu'], '.2f', '%')} (summary {fmt(s.get('mfu_percent'), '.2f', '%')})")
        slow = stats["stalls"]
        lines.append(f"- stalls (counted step > {STALL_FACTOR:g}x median): " + ("none" if not slow else
                     f"{len(slow)}: " + ", ".join(f"step {st} ({ms:.0f} ms)" for st, _, ms in slow[:8])))
    timings = {k: v for k, v in (s.get("timings") or {}).items() if k not in ("started_at", "finished_at")}
    spent = [f"{k} {v:.1f} s" for k, v in timings.items() if isinstance(v, (int, float))]
    spent += [f"{k} {s[k]:.1f} s" for k in ("training_seconds", "total_seconds") if s.get(k) is not None]
    lines.append("- time: " + (", ".join(spent) if spent else "no timings in the summary"))
    if ctx.best is not None and ctx.best.metrics is not None and stats:
        lines += throughput_vs_best(ctx, stats, throughput_stats(ctx.best.metrics))
    return "\n".join(lines)


def throughput_vs_best(ctx, stats, ref):
    """Step time and tokens/s against the best: a halved batch halves the step time while tokens/s falls."""
    if not ref:
        return []
    steps = (ctx.run.summary or {}).get("num_steps", "n/a"), (ctx.best.summary or {}).get("num_steps", "n/a")
    line = (f"- vs best ({ctx.best.id}): step time {stats['step_ms']:.1f} vs {ref['step_ms']:.1f} ms "
            f"({100 * (stats['step_ms'] / ref['step_ms'] - 1):+.1f}%)")
    tok, ref_tok = stats["tokens_per_sec"], ref["tokens_per_sec"]
    if tok is not None and ref_tok:
        line += f"; tokens/s {tok:,.0f} vs {ref_tok:,.0f} ({100 * (tok / ref_tok - 1):+.1f}%)"
    return [line + f"; steps {steps[0]} vs {steps[1]}"]


def section_layers(ctx):
    """Each layer against the best's same layer when the best logged layers: layers differ by design
    (value-embedding blocks carry ~6x the gradient norm), so only a change from the best is news.
    Without a best, each layer against the same module in the other blocks."""
    m = ctx.run.metrics
    stats = m.layer_keys() if m is not None else {}
    if not stats:
        return "## Per-layer health\n- no layer/ keys in metrics.jsonl"
    best = ctx.best.metrics if ctx.best is not None else None
    ref = best.layer_keys() if best is not None else {}
    if ref:
        lines = [f"## Per-layer health (median over the second half of training, this run / best {ctx.best.id}'s "
                 f"same layer; listed beyond {LAYER_BEST_RATIO:g}x or below {1 / LAYER_BEST_RATIO:g}x, "
                 f"at most {LAYER_SHOWN} per stat, the largest first)"]
    else:
        lines = [f"## Per-layer health (median over the second half of training; a layer stands out at "
                 f"{LAYER_OUTLIER_RATIO:g}x above or below the median of the same module in other blocks; "
                 f"at most {LAYER_SHOWN} per stat, the largest first)"]
    for stat, names in sorted(stats.items()):
        values = layer_medians(m, names)
        if ref:
            found = layers_vs_best(values, layer_medians(best, ref.get(stat, {})))
            missing = len(set(values) - set(ref.get(stat, {})))
            head = f"- {stat} ({len(values)} layers" + (f", {missing} not in the best" if missing else "") + "): "
            empty = f"none beyond {LAYER_BEST_RATIO:g}x or below {1 / LAYER_BEST_RATIO:g}x of the best"
        else:
            found, head, empty = layer_outliers(values), f"- {stat} ({len(values)} layers): ", "nothing stands out"
        more = f"; {len(found) - LAYER_SHOWN} more" if len(found) > LAYER_SHOWN else ""
        lines.append(head + ("; ".join(found[:LAYER_SHOWN]) + more if found else empty))
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
    noise, sha = ctx.noise, ctx.run.row.get("train_py_sha") or "unknown"
    own = noise["own"]
    lines = ["## Noise"]
    if len(own) >= 2:
        vals = np.array([row_bpb(r) for r in own])
        lines.append(f"- this train.py (sha256 {sha[:8]}): {len(own)} runs ({', '.join(r['run_id'] for r in own)}); "
                     f"val_bpb mean {vals.mean():.6f}, std {vals.std(ddof=1):.6f}, range {np.ptp(vals):.6f}")
    else:
        lines.append(f"- this train.py (sha256 {sha[:8]}): {len(own)} run(s) under this harness")
    if noise["band"] is None:
        lines.append("- noise band: unknown, fewer than two runs of an identical train.py under this harness. "
                     "Rerunning an unchanged commit measures it; each rerun is archived as <commit7>-2, -3, ...")
    else:
        lines.append(f"- noise band: +-{noise['band']:.6f} ({NOISE_SIGMAS:g} x sqrt(2) x pooled std "
                     f"{noise['pooled_std']:.6f}: one run against one best run; estimated from {noise['runs']} runs "
                     f"of {len(noise['repeated'])} repeated train.py version(s), {noise['dof']} degrees of freedom):")
        lines += noise_runs(ctx)
        lines += band_without_outliers(noise)
    return "\n".join(lines)


def noise_runs(ctx):
    """The runs the band is estimated from, per train.py. Stalls are counted only for the runs this
    analysis loads anyway (this run, the best, the previous one): reading every repeat would make the
    cost grow with history."""
    loaded = {r.id: r.metrics for r in (ctx.run, ctx.best, ctx.prev) if r is not None and r.metrics is not None}
    outliers = ctx.noise["outliers"]
    lines = []
    for sha, group in ctx.noise["repeated"].items():
        runs = []
        for r in group:
            steps = row_steps(r)
            text = f"{r['run_id']} {row_bpb(r):.6f}, {fmt(steps, '.0f')} steps"
            if r["run_id"] in outliers:
                text += f" (outlier on steps: {steps:.0f} steps vs the group's median {outliers[r['run_id']]:g})"
            if r["run_id"] in loaded:
                slow = loaded[r["run_id"]].stalls
                text += f", {len(slow)} stall(s) ({sum(ms for _, _, ms in slow) / 1000:.1f} s)" if slow else ", no stalls"
            runs.append(text)
        lines.append(f"  - train.py {sha[:8]}: " + "; ".join(runs))
    return lines


def band_without_outliers(noise):
    """The same estimate without the outliers on steps, beside the band rather than in its place."""
    if not noise["outliers"]:
        return []
    clean = [[r for r in g if r["run_id"] not in noise["outliers"]] for g in noise["repeated"].values()]
    std, runs, dof = pooled_std(clean)
    head = f"- without the {len(noise['outliers'])} outlier(s) on steps: "
    if std is None:
        return [head + "no train.py version keeps two runs, so no band"]
    return [head + f"+-{difference_band(std):.6f} (pooled std {std:.6f}, {runs} runs, {dof} degrees of freedom)"]


def section_lineage(ctx, max_rows=25):
    kept = [r for r in comparable(ctx.history, ctx.run.row["harness"]) if r["status"] == "keep"]
    if not kept:
        return "## Lineage of kept runs\n- nothing kept yet under this harness"
    lines = ["## Lineage of kept runs", "| run | commit | val_bpb | change | description |", "|---|---|---|---|---|"]
    prev = None
    rows = []
    for r in kept:
        change = "" if prev is None else "rerun" if same_code(r, prev) else f"{row_bpb(r) - row_bpb(prev):+.6f}"
        rows.append(f"| {r['run_id']} | {r['commit']} | {row_bpb(r):.6f} | {change} | {r['description'][:70]} |")
        prev = r
    if len(rows) > max_rows:
        lines.append(f"| ... | {len(rows) - max_rows} earlier kept runs | | | |")
    return "\n".join(lines + rows[-max_rows:])


def same_code(a, b):
    """Two rows ran the same train.py: the same sha256 where both recorded one, else the same commit."""
    if a.get("train_py_sha") and b.get("train_py_sha"):
        return a["train_py_sha"] == b["train_py_sha"]
    return a["commit"] == b["commit"]


def section_files(ctx):
    run = ctx.run
    files = sorted({p.name for p in run.dir.iterdir()} | {"analysis.md"})
    lines = ["## Files", f"- this run: {run.dir}/ ({', '.join(files)})"]
    lines += [f"- {label}: {other.dir}/" for label, other in (("best", ctx.best), ("previous", ctx.prev)) if other]
    if run.metrics is not None:
        plain = [k for k in run.metrics.keys if not k.startswith("layer/")]
        lines.append(f"- metrics.jsonl keys: {', '.join(plain)}")
        layers = run.metrics.layer_keys()
        if layers:
            names = {n for v in layers.values() for n in v}
            example = next(iter(next(iter(layers.values())).values()))
            lines.append(f"- per-layer keys: layer/<name>/<stat>, {len(names)} names x stats "
                         f"{', '.join(sorted(layers))} (e.g. {example})")
        lines.append(f"- load: `pandas.read_json('{run.dir / 'metrics.jsonl'}', lines=True)`; "
                     f"the run list is {RESULTS_TSV} (tab-separated)")
    return "\n".join(lines)


def section_agent_notes(ctx):
    return "## Agent notes\n"


# ---------------------------------------------------------------------------
# Writing analysis.md, and rewriting its status line

SECTIONS = (section_headline, section_crash, section_changes, section_trajectory, section_departure,
            section_stability, section_throughput, section_layers, section_noise, section_lineage,
            section_files, section_agent_notes)


def write_analysis(ctx):
    text = "\n\n".join(t for t in (section(ctx) for section in SECTIONS) if t)
    write_atomic(ctx.run.dir / "analysis.md", text)
    return text


def set_headline_status(row):
    """Rewrite the status in the run's analysis.md headline; the Agent notes below it are the agent's."""
    path = ARCHIVE_DIR / row["run_id"] / "analysis.md"
    if not path.exists():
        return
    head, sep, notes = path.read_text().partition("\n## Agent notes")
    head = re.sub(r"^(- val_bpb \*\*[^*]*\*\*, status )`\w+`", rf"\g<1>`{row['status']}`", head, count=1, flags=re.M)
    write_atomic(path, head + sep + notes)

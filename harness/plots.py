"""
The PNGs: one table of (metric key, panel title, file) rows drawn by one overlay helper, a heatmap
of a per-layer stat, and progress.png, val_bpb of every run.
"""
import os
import uuid
from pathlib import Path

import numpy as np

from harness.archive import best_after_each, comparable, latest_row, own, paths, row_bpb, row_gpu
from harness.noise import noise_band

PLOT_DPI = 80              # with PLOT_POINTS, keeps each PNG well under 200 KB
PLOT_POINTS = 500          # longer curves are drawn as bin medians (stalls and spikes are in the text)
HEATMAP_COLUMNS = 200      # at most this many progress columns in a per-layer heatmap
PROGRESS_LABELS = 40       # progress.png lists at most the last 40 kept runs ...
PROGRESS_LABEL_CHARS = 60  # ... with this much of each commit subject
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


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def overlay(ax, key, title, curves):
    """curves: [(label, Metrics)], drawn against training progress. The y range ignores the first
    tenth of training so that the initial loss does not flatten the part that matters."""
    top, bottom = [], []
    for (label, m), style in zip(curves, STYLES):
        p, _, v = m.series(key)
        ok = np.isfinite(v)
        if not ok.any():
            continue
        p, v = thin(p[ok], v[ok])
        ax.plot(p, v, label=label, marker="o" if len(v) < 30 else None, ms=3, **style)
        late = v[p >= 0.1]
        top.append((late if len(late) else v).max())
        bottom.append(v.min())
    if top:
        lo, hi = min(bottom), max(top)
        pad = 0.05 * (hi - lo) or 0.05 * abs(hi) or 0.05
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("training progress (fraction of the time budget)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def thin(x, y, points=PLOT_POINTS):
    """At most `points` bin medians: a noisy 5000-step line would make a PNG of megabytes."""
    if len(x) <= points:
        return x, y
    k = -(-len(x) // points)
    n = len(x) // k * k
    return (np.append(np.median(x[:n].reshape(-1, k), axis=1), x[-1]),
            np.append(np.median(y[:n].reshape(-1, k), axis=1), y[-1]))


def draw_overlays(out_dir, curves):
    """One PNG per file of PLOTS, panels only for keys some run holds. Returns the files written."""
    plt = pyplot()
    curves = [(label, m) for label, m in curves if m is not None]
    written = []
    for file in dict.fromkeys(row[2] for row in PLOTS):
        panels = [(key, title) for key, title, f in PLOTS if f == file and any(key in m for _, m in curves)]
        if not panels:
            continue
        fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * len(panels)), squeeze=False)
        for ax, (key, title) in zip(axes[:, 0], panels):
            overlay(ax, key, title, [(label, m) for label, m in curves if key in m])
        fig.tight_layout()
        save(fig, Path(out_dir) / file)
        written.append(file)
    return written


def draw_layer_heatmap(out_dir, m, stat="grad_norm"):
    """log10 of one per-layer stat: layers (by block, then module) against training progress."""
    names = (m.layer_keys() if m is not None else {}).get(stat)
    if not names:
        return []
    plt = pyplot()
    order = sorted(names, key=lambda n: (int(n.split(".")[0]) if n.split(".")[0].isdigit() else -1, n))
    series = [m.series(names[n]) for n in order]
    lo, hi = min(p.min() for p, _, _ in series), max(p.max() for p, _, _ in series)
    if hi <= lo:  # one logging point: no progress axis to draw
        return []
    columns = np.linspace(lo, hi, min(HEATMAP_COLUMNS, max(len(p) for p, _, _ in series)))
    with np.errstate(divide="ignore", invalid="ignore"):
        grid = np.array([np.interp(columns, p, np.log10(np.where(v > 0, v, np.nan))) for p, _, v in series])
    fig, ax = plt.subplots(figsize=(7, min(8.0, 1.5 + 0.12 * len(order))))
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis",
                      extent=(lo, hi, len(order) - 0.5, -0.5))
    every = -(-len(order) // 32)  # at most ~32 labels: text is the slow part of drawing
    ax.set_yticks(range(0, len(order), every), order[::every], fontsize=7)
    ax.set_xlabel("training progress", fontsize=8)
    ax.set_title(f"log10 {stat} per layer", fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    save(fig, Path(out_dir) / f"layers_{stat}.png")
    return [f"layers_{stat}.png"]


def save(fig, path):
    """A unique temporary name, then rename: two writers of one file (from two worktrees or machines)
    leave one whole PNG, never a mix."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    fig.savefig(tmp, dpi=PLOT_DPI, format="png")
    pyplot().close(fig)
    os.replace(tmp, path)


def draw_progress(rows):
    """val_bpb of every run of the latest harness and GPU model, in order; each worker's current best's
    val_bpb as steps (it may step up when a simplification is kept) inside the noise band; kept runs
    numbered, their subjects listed beside the plot, where no label can overlap another. A view draws
    into its --out directory, or nowhere."""
    target = paths().progress if not paths().view else paths().out and paths().out / "progress.png"
    latest = latest_row(rows)
    if not target or latest is None:
        return
    harness, gpu = latest["harness"], row_gpu(latest)
    pool = {id(r) for r in comparable(rows, harness, gpu or None)}
    points = [(i, r) for i, r in enumerate(rows) if id(r) in pool]
    if not points:
        return
    plt = pyplot()
    fig, (ax, side) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": (2.2, 1)})
    ax.scatter([i for i, _ in points], [row_bpb(r) for _, r in points], s=12, color="0.6",
               label="pending / discarded (below the band yet discarded: within noise, or discarded by the agent)")
    band = noise_band(rows, {"harness": harness, "gpu": gpu}).band
    workers = list(dict.fromkeys(r.get("worker") for _, r in points if r.get("worker"))) or [None]
    kept = {}  # row index -> (row, colour of the first worker it counts for)
    colors = ("C2", "C0", "C3", "C4", "C1", "C5", "C6", "C8", "C9")  # grey (C7) is the unkept runs'
    for n, worker in enumerate(workers):  # two nodes of 8 GPUs are 16 workers: colours repeat, nobody is dropped
        color = colors[n % len(colors)]
        mine = [(i, r) for i, r in points if own(r, worker)]
        draw_best_line(ax, mine, len(rows) - 1, band, color, "" if len(workers) == 1 else f" of {worker}")
        for i, r in mine:
            if r["status"] == "keep":
                kept.setdefault(i, (r, color))
    kept = [(i, r, color) for i, (r, color) in sorted(kept.items())][-PROGRESS_LABELS:]
    for n, (i, r, color) in enumerate(kept, 1):
        ax.scatter([i], [row_bpb(r)], s=30, color=color, zorder=3, label="kept" if n == 1 else None)
        ax.annotate(str(n), (i, row_bpb(r)), fontsize=7, xytext=(3, 3), textcoords="offset points")
    who = (lambda r: f"{r.get('worker') or '?'}  ") if len(workers) > 1 else (lambda r: "")
    side.axis("off")
    side.text(0, 1, "\n".join(f"{n:>2}  {r['run_id']}  {who(r)}{r['description'][:PROGRESS_LABEL_CHARS]}"
                              for n, (_, r, _) in enumerate(kept, 1)) or "no run kept yet",
              va="top", family="monospace", fontsize=6, transform=side.transAxes)
    side.set_title("kept runs", fontsize=9, loc="left")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_xlabel("run (order archived)")
    ax.set_ylabel("val_bpb")
    ax.set_title(f"val_bpb per run, harness {harness}" + (f", {gpu}" if gpu else ""), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    save(fig, Path(target))


def draw_best_line(ax, points, last_x, band, color, label):
    """One worker's best after each of its runs, as steps to the right edge, inside the noise band."""
    if not points:
        return
    xs = [i for i, _ in points]
    best = np.array([np.nan if b is None else row_bpb(b) for b in best_after_each([r for _, r in points])])
    steps_x, steps_y = xs + [last_x], np.append(best, best[-1:])
    ax.step(steps_x, steps_y, where="post", color=color, lw=1, label=f"current best{label} (last kept)")
    if band is not None:
        ax.fill_between(steps_x, steps_y - band, steps_y + band, step="post", color=color, alpha=0.15, lw=0,
                        label=f"noise band of the best{label} (+-{band:.4f})")

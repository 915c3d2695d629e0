"""
What the harness costs: every second outside the model is a second the experiment loses. Prints each figure as it
is measured, with the machine's load average; writes nothing into the repository (all scratch is in a temp dir).

Usage:
    uv run tests/bench.py              # every CPU section, plus the GPU sections when CUDA is present
    uv run tests/bench.py --cpu-only   # skip the GPU sections
    uv run tests/bench.py --gpu-only   # only the GPU sections (the baseline needs `uv run prepare.py` first)

Seconds outside the training budget of a manual `uv run train.py` and of `analyze.py run`, side by side, and
their ratio: on the cpu profile from a fresh cache, and under CUDA on the gpu profile with a 60 s budget (AR spends
25.8 s outside its 300 s on an H100). CPU also: the packed loader at the gpu batch shape, the recorder's cost per
step, the bare analyze.py with a few and 400 archived runs, and the decision rules simulated over nights.
"""

import argparse
import contextlib
import io
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":  # as a script: the repository importable, and no __pycache__ left in it
    sys.path.insert(0, str(ROOT))
    sys.dont_write_bytecode = True
from harness.decide import NOISE_SIGMAS, Rules, decide  # noqa: E402
from harness.record import StatusChange, load_run  # noqa: E402
from harness.stats import code_runs  # noqa: E402
from tests.factory import make_run  # noqa: E402

LOADER_B, LOADER_T = 128, 2048  # the gpu profile's batch shape, where the loader must keep up
LOADER_BATCHES = 4              # timed batches per loader (after one warm-up batch)
LOADER_DOC_CHARS = 3000         # median document size after regrouping: web pages, not docstrings
LOADER_DOC_SIGMA = 1.0          # log-normal spread of document sizes, as web text has
ANALYZE_HISTORY = 400           # archived runs for the "long night" analyze.py measurement
LOGGING_ROWS = 2000             # metrics rows timed for the per-step logging cost
GPU_STEP_MS = 315.0             # karpathy/autoresearch's H100 step: 953 steps in 300 s
SIM_NIGHTS = 100                # simulated nights of 80 experiments per row of the decision trade-off
SIM_CHANGES = 400               # simulated single changes better by 3σ per row
GPU_BUDGET_S = "60"             # the gpu profile's training seconds here: enough steps past compilation


def record(section, figure, value, note=""):
    print(f"  {section:<10} {figure:<48} {value:>14}  {note}", flush=True)


def load():
    return "load {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())


def run(cmd, cwd, env, log=None):
    """Run a harness command as a user would: its seconds; raise with its output's tail if it fails."""
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if log is not None:
        Path(log).write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        tail = "\n".join((out.stdout + out.stderr).splitlines()[-20:])
        raise SystemExit(f"bench: {' '.join(map(str, cmd))} failed in {cwd} (exit {out.returncode}):\n{tail}")
    return elapsed


def make_repo(dest):
    """A throwaway git checkout of the scripts and the harness package, the way the agent's branch looks."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("prepare.py", "train.py", "analyze.py", ".gitignore"):
        shutil.copy(ROOT / name, dest / name)
    shutil.copytree(ROOT / "harness", dest / "harness", ignore=shutil.ignore_patterns("__pycache__"))
    for cmd in (["init", "-q", "-b", "autoresearch/bench"], ["add", "-A"], ["commit", "-qm", "baseline"]):
        subprocess.run(["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", *cmd], cwd=dest, check=True)
    return dest


def harness_env(profile, **settings):
    """The user's environment less their AUTORESEARCH_ settings but the cache (the gpu data `prepare.py` made)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_") or k == "AUTORESEARCH_CACHE"}
    return dict(env, AUTORESEARCH_PROFILE=profile, AUTORESEARCH_WORKER=f"bench:{profile}", PYTHONUNBUFFERED="1",
                **settings)


# CPU: seconds outside the budget, a manual run against `analyze.py run` (also prepares a cache)
def bench_outside(repo, env, section):
    """A manual run (train.py evaluates its own model), its bare archive, then `analyze.py run` (the harness
    evaluates the handed-off model once): the manual run's summary."""
    t_manual = run([sys.executable, "train.py"], repo, env, log=repo / "run.log")
    manual = json.loads((repo / "run_summary.json").read_text())
    run([sys.executable, "analyze.py"], repo, env)
    t_harness = run([sys.executable, "analyze.py", "run"], repo, env)
    harness = max((load_run(p) for p in (repo / ".auto-log-research").glob("*/run.json")), key=lambda r: r.archived_at)
    out_manual = t_manual - manual["training_seconds"]
    out_harness = t_harness - harness.trained.training_seconds
    timings = ", ".join(f"{k} {v:.1f}" for k, v in manual["timings"].items() if k.endswith("_s"))
    record(section, "manual train.py: wall, outside the budget (s)", f"{t_manual:.1f}, {out_manual:.1f}",
           f"{timings}; budget {manual['harness']['TIME_BUDGET']} s, {manual['num_steps']} steps, {load()}")
    record(section, "analyze.py run: wall, outside the budget (s)", f"{t_harness:.1f}, {out_harness:.1f}",
           f"train.py {harness.outside_s:.1f} (its hand-off, the export, "
           f"{harness.trained.timings.get('final_eval_s') or 0:.1f}) + evaluator {harness.measured.eval_s:.1f} "
           f"+ archive and decide; {harness.steps} steps, {load()}")
    record(section, "outside the budget, harness / manual", f"{out_harness / out_manual:.2f}x",
           f"training is {harness.trained.training_seconds / t_harness:.0%} of analyze.py run's wall time"
           + ("; goal >= 50% on an idle 2-core machine" if section == "cpu" else ""))
    return manual


# CPU: the packed loader at the gpu profile's batch shape
def web_length_shards(dest):
    """The cpu profile's text regrouped into documents of log-normally spread sizes around LOADER_DOC_CHARS, as
    the gpu profile's web pages are, so that the packer sees a realistic number of documents per row."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import prepare
    rng = random.Random(0)
    dest.mkdir(parents=True, exist_ok=True)
    for shard in prepare.shard_paths("train") + prepare.shard_paths("val"):
        docs, current, target = [], "", LOADER_DOC_CHARS
        for text in (t for chunk in prepare.read_texts(shard) for t in chunk):
            current = f"{current}\n\n{text}" if current else text
            if len(current) >= target:
                docs.append(current)
                current, target = "", rng.lognormvariate(math.log(LOADER_DOC_CHARS), LOADER_DOC_SIGMA)
        pq.write_table(pa.table({"text": docs}), dest / shard.name)
    return dest


def bench_loader(cache, scratch):
    os.environ.update(AUTORESEARCH_PROFILE="cpu", AUTORESEARCH_CACHE=str(cache))
    import prepare  # after AUTORESEARCH_PROFILE is set: it reads the profile at import
    tokenizer = prepare.Tokenizer.from_directory()
    data_dir = web_length_shards(scratch / "web_length")
    loader = prepare.make_dataloader(tokenizer, LOADER_B, LOADER_T, "train", device="cpu", data_dir=data_dir)
    next(loader)  # warm-up: first shard load, token cache, buffer fill
    t0 = time.perf_counter()
    for _ in range(LOADER_BATCHES):
        next(loader)
    ours = (time.perf_counter() - t0) / LOADER_BATCHES
    record("loader", f"packed loader B={LOADER_B} T={LOADER_T} (ms/batch)", f"{ours * 1e3:.1f}",
           f"{LOADER_B * LOADER_T / ours / 1e6:.1f} M tok/s; an H100 step takes {GPU_STEP_MS:.0f} ms")


# CPU: the metrics path of one training step
def bench_logging(scratch, layer_every=25, depth=8):
    """A row as train.py logs it every step (the CONTRACT's train/ and perf/ keys), and every layer_every steps
    the per-layer health keys of a LAYER_STATS_EVERY row at the gpu baseline's depth."""
    from harness.recorder import RunRecorder  # imports prepare, after bench_loader set the profile
    keys = ("train/loss", "train/loss_smooth", "train/lr_multiplier", "train/muon_momentum", "train/weight_decay",
            "train/progress", "perf/step_time_ms", "perf/tokens_per_sec", "perf/mfu_percent", "elapsed_s")
    matrices = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    layers = {f"layer/{i}.{m}/{stat}": 0.01 * i for i in range(depth) for m in matrices
              for stat in ("grad_norm", "update_ratio")}
    layers.update({f"layer/{i}/act_rms": 1.0 for i in range(depth)})
    (scratch / "logging").mkdir(exist_ok=True)
    # flush_every_s=0 writes and flushes every row: the worst case of the recorder's buffering
    with RunRecorder({}, out_dir=scratch / "logging", hard_cap_s=0, flush_every_s=0.0) as rec:
        t0 = time.perf_counter()
        for step in range(LOGGING_ROWS):
            row = {key: 3.0 + step * 1e-4 + i for i, key in enumerate(keys)}
            if step % layer_every == 0:
                row.update(layers)
            rec.log(step, **row)
        per_step_ms = (time.perf_counter() - t0) / LOGGING_ROWS * 1e3
        with contextlib.redirect_stdout(io.StringIO()):  # the final block is not a figure
            rec.finish()
    record("logging", "RunRecorder.log row, written+flushed (ms/step)", f"{per_step_ms:.3f}",
           f"{per_step_ms / GPU_STEP_MS:.3%} of an H100 step ({GPU_STEP_MS:.0f} ms), goal < 1%; "
           f"layer keys every {layer_every} steps")


# CPU: the bare analyze.py after a few and after ANALYZE_HISTORY archived runs
def next_run(repo):
    """The last run's files presented as a new run (another start), for a bare analyze.py."""
    summary = json.loads((repo / "run_summary.json").read_text())
    summary["timings"].update(started_at=time.time() - 100, finished_at=time.time())
    summary.update(status="ok", val_bpb=2.5)
    (repo / "run_summary.json").write_text(json.dumps(summary))
    (repo / "run.log").write_text("---\nval_bpb:          2.500000\n")


def grow_history(repo, n_runs):
    """The archive padded to n_runs run directories of earlier, discarded experiments."""
    archive = repo / ".auto-log-research"
    src = max(archive.glob("*/run.json"), key=lambda p: json.loads(p.read_text())["archived_at"]).parent
    template = json.loads((src / "run.json").read_text())
    for i in range(n_runs - len(list(archive.glob("*/run.json")))):
        run_id = f"e{i:06x}"
        shutil.copytree(src, archive / run_id, copy_function=os.link, ignore=shutil.ignore_patterns("run.json"))
        statuses = [{**template["statuses"][0], "status": "discard"}]
        (archive / run_id / "run.json").write_text(json.dumps({**template, "id": run_id, "statuses": statuses,
                                                               "archived_at": template["archived_at"] - 1e4 + i}))


def bench_analyze(repo, env):
    runs = len(list((repo / ".auto-log-research").glob("*/run.json")))
    next_run(repo)
    with_few = run([sys.executable, "analyze.py"], repo, env)
    grow_history(repo, ANALYZE_HISTORY)
    next_run(repo)
    with_many = run([sys.executable, "analyze.py"], repo, env)
    record("analyze", f"bare analyze.py with {runs} / {ANALYZE_HISTORY} archived runs (s)",
           f"{with_few:.2f} / {with_many:.2f}", f"{with_many / with_few:.2f}x; goal <= 2x and < 20 s")


# CPU: the decision rules over simulated nights of experiments, each run decided by harness/decide.py
def night(rules, sigma, effect, experiments, rng):
    """(changes kept, runs each change took, the best's number below its code's true mean in σ) of one
    night of finished runs that differ only in their code and their val_bpb."""
    runs, truth = [], {}

    def experiment(code, mean):
        truth[code] = mean
        while True:
            runs.append(latest := make_run(mean + sigma * rng.standard_normal(), code_sha=code))
            d = decide(latest, runs, rules, size=lambda commit: None)
            latest.statuses.append(StatusChange("pending" if d.kind == "rerun" else d.kind, "", "simulate"))
            if d.kind != "rerun":
                return d.kind == "keep", len(code_runs(runs, code))
    experiment("base", 1.0)
    experiment("base", 1.0)  # the baseline, then its repeats until decide() stops them
    best, kept, took = "base", 0, []
    for e in range(experiments):
        keep, n = experiment(f"e{e}", truth[best] - effect * sigma)
        best, kept, took = f"e{e}" if keep else best, kept + keep, took + [n]
    return kept, took, (truth[best] - np.mean([r.val_bpb for r in code_runs(runs, best)])) / sigma


def simulate(rules=Rules(), sigma=0.01, effect=0.0, experiments=80, trials=100, seed=0):
    """Nights of a baseline, its repeats and `experiments` changes, each truly better than the best it starts
    from by `effect` σ (0: no-ops), σ being one run's val_bpb std over repeats of one code. The figures:
    p_any_kept (a night kept one or more), p_kept (per change), best_below (the best's number below its code's
    true mean at the night's end, in σ), runs_per_experiment (1: deciding on one run)."""
    rng = np.random.default_rng(seed)
    kept, took, below = map(np.array, zip(*(night(rules, sigma, effect, experiments, rng) for _ in range(trials))))
    return {"p_any_kept": float(np.mean(kept > 0)), "p_kept": float(kept.sum() / (trials * experiments)),
            "best_below": float(below.mean()), "runs_per_experiment": float(np.mean(took))}


def bench_decisions():
    """simulate() for each noise threshold, and for deciding on one run (README's table of the decision's odds)."""
    t0 = time.perf_counter()
    curve = [(f"±{k:g}σ", Rules(sigmas=k)) for k in (2.5, 3.0, NOISE_SIGMAS, 3.5)]
    curve.append(("one run", Rules(promising=float("inf"), enough=1)))
    for name, rules in curve:
        noop = simulate(rules, effect=0.0, trials=SIM_NIGHTS)
        better = simulate(rules, effect=3.0, experiments=1, trials=SIM_CHANGES)
        default = " (default)" if rules == Rules() else ""
        record("decide", f"{name}{default}: P(a no-op kept in 80) / best below", f"{noop['p_any_kept']:.0%} / "
               f"{noop['best_below']:.2f}σ", "goals <= 25%, within 0.5σ")
        record("decide", f"{name}{default}: P(3σ kept) / runs per no-op, 3σ", f"{better['p_kept']:.0%} / "
               f"{noop['runs_per_experiment']:.2f}, {better['runs_per_experiment']:.2f}", "goal >= 80%; 1.00 = one run")
    record("decide", "simulation (s)", f"{time.perf_counter() - t0:.1f}",
           f"{SIM_NIGHTS} nights of 80, {SIM_CHANGES} single changes per row")


def main():
    parser = argparse.ArgumentParser(description="auto-log-research performance figures")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--cpu-only", action="store_true", help="skip the GPU sections")
    group.add_argument("--gpu-only", action="store_true", help="only the GPU sections")
    args = parser.parse_args()
    import torch
    cuda = torch.cuda.is_available()
    machine = torch.cuda.get_device_name() if cuda else f"{cpu_name()}, {os.cpu_count()} cores"
    print(f"auto-log-research bench on {machine} (torch {torch.__version__}), {load()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="alr-bench-") as tmp:
        scratch = Path(tmp)
        if not args.gpu_only:
            repo, cache = make_repo(scratch / "cpu"), scratch / "cache"
            env = harness_env("cpu", AUTORESEARCH_CACHE=str(cache))
            t_prepare = run([sys.executable, "prepare.py"], repo, env)
            record("cpu", "prepare.py, fresh cache (s)", f"{t_prepare:.1f}", load())
            bench_outside(repo, env, "cpu")
            bench_loader(cache, scratch)
            bench_logging(scratch)
            bench_analyze(repo, env)
            bench_decisions()
        if cuda and not args.cpu_only:
            env = harness_env("gpu", AUTORESEARCH_TIME_BUDGET=GPU_BUDGET_S)
            manual = bench_outside(make_repo(scratch / "gpu"), env, "gpu")
            record("gpu", "MFU (%) / peak VRAM (GB)", f"{manual['mfu_percent'] or 0:.1f} / "
                   f"{(manual['peak_vram_mb'] or 0) / 1024:.1f}", "karpathy/autoresearch FA3: 39.8% / 45 GB")
        elif not args.cpu_only:
            print("GPU sections skipped: no CUDA device", flush=True)
    print(f"bench done, {load()}")


def cpu_name():
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


if __name__ == "__main__":
    main()

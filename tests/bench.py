"""
What the harness costs the GPU: every second spent outside the model is a second the experiment loses.
Prints one table of figures; writes nothing into the repository (all scratch lives in a temp dir).

Usage:
    uv run tests/bench.py              # every CPU section, plus the GPU sections when CUDA is present
    uv run tests/bench.py --cpu-only   # skip the GPU sections
    uv run tests/bench.py --gpu-only   # only the GPU sections (the baseline needs `uv run prepare.py` first)

CPU sections: the packed loader against the naive reference, analyze.py at 1 and 400 archived runs,
the metrics path per training step, the cpu-profile loop end to end on a fresh cache.
GPU sections: attention forward+backward per backend at the baseline shape, and the baseline
configuration for a fixed number of steps (tokens/s, MFU, peak VRAM, seconds outside training).
"""

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.dont_write_bytecode = True  # importing prepare/train from ROOT must not leave __pycache__ there
SCRIPTS = ("prepare.py", "train.py", "analyze.py")
PACKAGE = "harness"  # the modules analyze.py runs on

# ---------------------------------------------------------------------------
# Benchmark settings
# ---------------------------------------------------------------------------

LOADER_B, LOADER_T = 128, 2048  # the gpu profile's batch shape, where the loader must keep up
LOADER_BATCHES = 8              # timed batches per loader (after one warm-up batch)
NAIVE_BUFFER_DOCS = 1000        # the naive reference scans this many buffered documents per placement
LOADER_DOC_CHARS = 3000         # median document size after regrouping: web pages, not docstrings
LOADER_DOC_SIGMA = 1.0          # log-normal spread of document sizes, as web text has
ANALYZE_HISTORY = 400           # archived runs for the "long night" analyze.py measurement
LOGGING_ROWS = 2000             # metrics rows timed for the per-step logging cost
GPU_STEP_MS = 315.0             # karpathy/autoresearch's H100 step: 953 steps in 300 s

ROWS = []  # (section, figure, value, goal)


def record(section, figure, value, goal=""):
    ROWS.append((section, figure, value, goal))
    print(f"  {section:<10} {figure:<44} {value:>14}  {goal}", flush=True)


def run(cmd, cwd, env, log=None):
    """Run a harness command as a user would; raise with its output's tail if it fails."""
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
    """A throwaway git checkout of the three scripts and the harness package, the way the agent's branch looks."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in SCRIPTS:
        shutil.copy(ROOT / name, dest / name)
    shutil.copytree(ROOT / PACKAGE, dest / PACKAGE, ignore=shutil.ignore_patterns("__pycache__"))
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=dest, check=True)
    subprocess.run([*git, "add", *SCRIPTS, PACKAGE], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "baseline"], cwd=dest, check=True)
    return dest


def cpu_env(cache, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    env.update(AUTORESEARCH_PROFILE="cpu", AUTORESEARCH_CACHE=str(cache), PYTHONUNBUFFERED="1", **extra)
    return env

# ---------------------------------------------------------------------------
# CPU: the cpu-profile loop end to end (also leaves a prepared cache for the loader section)
# ---------------------------------------------------------------------------

def bench_loop(scratch):
    repo, cache = make_repo(scratch / "loop"), scratch / "cache"
    env = cpu_env(cache)
    t_prepare = run([sys.executable, "prepare.py"], repo, env)
    t_train = run([sys.executable, "train.py"], repo, env, log=repo / "run.log")
    t_analyze = run([sys.executable, "analyze.py"], repo, env)
    summary = json.loads((repo / "run_summary.json").read_text())
    total = t_prepare + t_train + t_analyze
    record("loop", "prepare.py, fresh cache (s)", f"{t_prepare:.1f}")
    record("loop", "train.py (s)", f"{t_train:.1f}",
           f"budget {summary['harness']['TIME_BUDGET']} s, val_bpb {summary['val_bpb']:.4f}")
    record("loop", "analyze.py (s)", f"{t_analyze:.1f}")
    record("loop", "prepare + train + analyze (s)", f"{total:.1f}", "goal < 180 s")
    steps = [json.loads(line) for line in (repo / "metrics.jsonl").read_text().splitlines()]
    step_ms = [r["perf/step_time_ms"] for r in steps if r.get("perf/step_time_ms") is not None]
    return repo, cache, statistics.median(step_ms)

# ---------------------------------------------------------------------------
# CPU: the packed loader against the naive reference
# ---------------------------------------------------------------------------

def naive_batches(tokenizer, texts, B, T, buffer_size=NAIVE_BUFFER_DOCS):
    """The reference the loader must beat: tokenize each buffer refill on the fly, scan the whole buffer
    linearly for the largest document that fits, and build one tensor per document."""
    import torch
    bos = tokenizer.get_bos_token_id()
    texts, buffer, i = list(texts), [], 0
    while True:
        rows = []
        for _ in range(B):
            row, pos = [], 0
            while pos < T + 1:
                if len(buffer) < buffer_size:
                    batch = [texts[(i + k) % len(texts)] for k in range(buffer_size - len(buffer))]
                    i += len(batch)
                    buffer.extend(torch.tensor(ids) for ids in tokenizer.encode(batch, prepend=bos))
                remaining = T + 1 - pos
                best = -1
                for j, doc in enumerate(buffer):
                    if len(doc) <= remaining and (best < 0 or len(doc) > len(buffer[best])):
                        best = j
                if best < 0:
                    best = min(range(len(buffer)), key=lambda j: len(buffer[j]))
                doc = buffer.pop(best)[:remaining]
                row.append(doc)
                pos += len(doc)
            rows.append(torch.cat(row))
        batch = torch.stack(rows)
        yield batch[:, :-1], batch[:, 1:]


def time_batches(batches, n=LOADER_BATCHES):
    next(batches)  # warm-up: first shard load, token cache, buffer fill
    t0 = time.perf_counter()
    for _ in range(n):
        next(batches)
    return (time.perf_counter() - t0) / n


def web_length_shards(dest):
    """The cpu profile's text regrouped into documents of log-normally spread sizes around
    LOADER_DOC_CHARS, like the web pages of the gpu profile's data, so that the packer sees a realistic
    number and spread of documents per row."""
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
    sys.path.insert(0, str(ROOT))
    import prepare
    tokenizer = prepare.Tokenizer.from_directory()
    data_dir = web_length_shards(scratch / "web_length")
    loader = prepare.make_dataloader(tokenizer, LOADER_B, LOADER_T, "train", device="cpu", data_dir=data_dir)
    ours = time_batches(loader)
    texts = [t for shard in prepare.shard_paths("train", data_dir) for chunk in prepare.read_texts(shard)
             for t in chunk]
    naive = time_batches(naive_batches(tokenizer, texts, LOADER_B, LOADER_T), n=max(2, LOADER_BATCHES // 4))
    tokens = LOADER_B * LOADER_T
    record("loader", f"packed loader B={LOADER_B} T={LOADER_T} (ms/batch)", f"{ours * 1e3:.1f}",
           f"{tokens / ours / 1e6:.1f} M tok/s")
    record("loader", "naive reference (ms/batch)", f"{naive * 1e3:.1f}", f"{tokens / naive / 1e6:.2f} M tok/s")
    record("loader", "speed-up over naive", f"{naive / ours:.1f}x", "goal >= 4x")
    record("loader", "crop fraction (tokens dropped)", f"{loader.crop_fraction:.2%}")

# ---------------------------------------------------------------------------
# CPU: the metrics path of one training step
# ---------------------------------------------------------------------------

def step_row(step):
    """A row as train.py logs it every step: the CONTRACT's train/ and perf/ keys."""
    keys = ("train/loss", "train/loss_smooth", "train/lr_multiplier", "train/muon_momentum",
            "train/weight_decay", "train/progress", "perf/step_time_ms", "perf/tokens_per_sec",
            "perf/mfu_percent", "elapsed_s")
    return {key: 3.0 + step * 1e-4 + i for i, key in enumerate(keys)}


def layer_row(depth=8):
    """The per-layer health keys of one LAYER_STATS_EVERY row at the gpu baseline's depth."""
    matrices = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    row = {f"layer/{i}.{m}/{stat}": 0.01 * i for i in range(depth) for m in matrices
           for stat in ("grad_norm", "update_ratio")}
    row.update({f"layer/{i}/act_rms": 1.0 for i in range(depth)})
    return row


def bench_logging(scratch, cpu_step_ms, layer_every=25):
    sys.path.insert(0, str(ROOT))
    from harness.record import RunRecorder
    out_dir = scratch / "logging"
    out_dir.mkdir(exist_ok=True)
    layers = layer_row()
    # flush_every_s=0 writes and flushes every row: the worst case of the recorder's buffering
    with RunRecorder({}, out_dir=out_dir, hard_cap_s=3600, flush_every_s=0.0) as run:
        t0 = time.perf_counter()
        for step in range(LOGGING_ROWS):
            row = step_row(step)
            if step % layer_every == 0:
                row.update(layers)
            run.log(step, **row)
        per_step_ms = (time.perf_counter() - t0) / LOGGING_ROWS * 1e3
        with contextlib.redirect_stdout(io.StringIO()):  # the final block is not a figure
            run.finish()
    record("logging", "RunRecorder.log row, written+flushed (ms/step)", f"{per_step_ms:.3f}",
           f"layer keys every {layer_every} steps")
    record("logging", "  share of an H100 baseline step", f"{per_step_ms / GPU_STEP_MS:.3%}",
           f"goal < 1% ({GPU_STEP_MS:.0f} ms step)")
    record("logging", "  share of a cpu-profile step", f"{per_step_ms / cpu_step_ms:.3%}",
           f"goal < 1% ({cpu_step_ms:.0f} ms step)")

# ---------------------------------------------------------------------------
# CPU: analyze.py after 1 and after ANALYZE_HISTORY archived runs
# ---------------------------------------------------------------------------

def next_run(repo, n):
    """Commit a new train.py and present the last run's outputs as this commit's fresh run."""
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    with open(repo / "train.py", "a") as f:
        f.write(f"# bench experiment {n}\n")
    subprocess.run([*git, "commit", "-qam", f"experiment {n}"], cwd=repo, check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    summary = json.loads((repo / "run_summary.json").read_text())
    summary["git"].update(commit=commit, train_py_sha256=hashlib.sha256((repo / "train.py").read_bytes()).hexdigest())
    now = time.time()
    summary["timings"].update(started_at=now - 100 + n * 1e-3, finished_at=now)
    os.utime(repo / "run.log", (now - 1, now - 1))
    (repo / "run_summary.json").write_text(json.dumps(summary))


def grow_history(repo, n_runs):
    """Pad results.tsv (and the archive) to n_runs rows of earlier, discarded experiments."""
    archive = repo / ".auto-log-research"
    lines = (archive / "results.tsv").read_text().splitlines()
    header, template = lines[0].split("\t"), dict(zip(lines[0].split("\t"), lines[-1].split("\t")))
    src = archive / template["run_id"]
    rows = []
    for i in range(n_runs - (len(lines) - 1)):
        run_id = f"e{i:06x}"
        shutil.copytree(src, archive / run_id, copy_function=os.link)
        row = {**template, "commit": run_id, "run_id": run_id, "status": "discard", "run_key": f"bench{i}",
               "description": f"earlier idea {i}"}
        rows.append("\t".join(row[k] for k in header))
    (archive / "results.tsv").write_text("\n".join([lines[0], *rows, *lines[1:]]) + "\n")


def bench_analyze(repo, env):
    next_run(repo, 1)
    with_one = run([sys.executable, "analyze.py"], repo, env)
    grow_history(repo, ANALYZE_HISTORY)
    next_run(repo, 2)
    with_many = run([sys.executable, "analyze.py"], repo, env)
    rows = len((repo / ".auto-log-research" / "results.tsv").read_text().splitlines()) - 1
    record("analyze", "analyze.py with 1 archived run (s)", f"{with_one:.2f}")
    record("analyze", f"analyze.py with {rows - 1} archived runs (s)", f"{with_many:.2f}",
           f"{with_many / with_one:.2f}x; goal <= 2x and < 20 s")

# ---------------------------------------------------------------------------
# GPU: attention backends at the baseline shape, forward + backward
# ---------------------------------------------------------------------------

ATTN_B, ATTN_T, ATTN_H, ATTN_D = 128, 2048, 4, 128  # DEVICE_BATCH_SIZE, MAX_SEQ_LEN, heads of HEAD_DIM
ATTN_ITERS = 20


def attention_flops(T, window):
    """Forward+backward FLOPs of causal attention per (batch, head): 2 matmuls of 2*D flops per visible
    (query, key) pair forward, 2.5x that backward."""
    visible = sum(min(i, window) + 1 for i in range(T))
    return 3.5 * 4 * ATTN_D * visible


def time_attention(fn, q, k, v):
    import torch
    grad = torch.randn_like(q)
    for _ in range(3):  # compile, autotune, warm caches
        fn(q, k, v).backward(grad)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(ATTN_ITERS):
        fn(q, k, v).backward(grad)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / ATTN_ITERS / 1e3


def bench_attention():
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import train
    shape = (ATTN_B, ATTN_H, ATTN_T, ATTN_D)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    half = ATTN_T // 2
    window_mask = train.sliding_window_block_mask(ATTN_T, half, "cuda")
    full_mask = train.sliding_window_block_mask(ATTN_T, ATTN_T, "cuda")

    def sdpa(backend):
        def fn(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return fn

    cases = [
        ("full", ATTN_T, "SDPA flash", sdpa(SDPBackend.FLASH_ATTENTION)),
        ("full", ATTN_T, "SDPA cuDNN", sdpa(SDPBackend.CUDNN_ATTENTION)),
        ("full", ATTN_T, "FlexAttention", lambda q, k, v: train.flex_attention_compiled(q, k, v, block_mask=full_mask)),
        ("half window", half, "FlexAttention", lambda q, k, v: train.flex_attention_compiled(q, k, v, block_mask=window_mask)),
        ("half window", half, "train.attention (as used)", lambda q, k, v: train.attention(q, k, v, window_mask)),
    ]
    for layer, window, name, fn in cases:
        try:
            seconds = time_attention(fn, q, k, v)
        except RuntimeError as e:  # a backend this GPU/torch build lacks: say so, keep measuring the rest
            record("attention", f"{layer}: {name}", "unavailable", str(e).splitlines()[0][:60])
            continue
        tflops = attention_flops(ATTN_T, window) * ATTN_B * ATTN_H / seconds / 1e12
        record("attention", f"{layer}: {name} (ms fwd+bwd)", f"{seconds * 1e3:.2f}", f"{tflops:.0f} TFLOP/s")

# ---------------------------------------------------------------------------
# GPU: the baseline configuration, short budget
# ---------------------------------------------------------------------------

BASELINE_BUDGET_S = 60  # training seconds: enough steps past compilation for steady-state throughput


def bench_baseline(scratch):
    env = {k: v for k, v in os.environ.items() if k != "AUTORESEARCH_PROFILE"}
    env.update(AUTORESEARCH_PROFILE="gpu", AUTORESEARCH_TIME_BUDGET=str(BASELINE_BUDGET_S), PYTHONUNBUFFERED="1")
    repo = make_repo(scratch / "baseline")
    run([sys.executable, "train.py"], repo, env, log=repo / "run.log")
    s = json.loads((repo / "run_summary.json").read_text())
    t = s["timings"]
    outside = s["total_seconds"] - s["training_seconds"]
    tokens_per_s = s["total_tokens_M"] * 1e6 / s["training_seconds"]
    gpu = s["env"]["gpu_name"]
    record("baseline", f"steps in {BASELINE_BUDGET_S} s ({gpu})", f"{s['num_steps']}")
    record("baseline", "tokens/s", f"{tokens_per_s / 1e6:.2f} M")
    record("baseline", "MFU (%)", f"{s['mfu_percent']:.1f}" if s["mfu_percent"] is not None else "n/a",
           "goal >= 40%; karpathy/autoresearch FA3: 39.8%")
    record("baseline", "peak VRAM (GB)", f"{s['peak_vram_mb'] / 1024:.1f}", "karpathy/autoresearch: 45 GB")
    for key in ("startup_s", "warmup_s", "eval_s", "final_eval_s"):
        if key in t:
            record("baseline", f"  {key}", f"{t[key]:.1f}")
    record("baseline", "seconds outside training", f"{outside:.1f}",
           "goal < 15 s; karpathy/autoresearch: 25.8 s")

# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description="auto-log-research performance figures")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--cpu-only", action="store_true", help="skip the GPU sections")
    group.add_argument("--gpu-only", action="store_true", help="only the GPU sections")
    args = parser.parse_args()
    import torch
    cuda = torch.cuda.is_available()
    machine = torch.cuda.get_device_name() if cuda else f"{cpu_name()}, {os.cpu_count()} cores"
    print(f"auto-log-research bench on {machine} (torch {torch.__version__})", flush=True)
    with tempfile.TemporaryDirectory(prefix="alr-bench-") as tmp:
        scratch = Path(tmp)
        if not args.gpu_only:
            repo, cache, cpu_step_ms = bench_loop(scratch)
            bench_loader(cache, scratch)
            bench_logging(scratch, cpu_step_ms)
            bench_analyze(repo, cpu_env(cache))
        if args.cpu_only:
            pass
        elif cuda:
            bench_attention()
            bench_baseline(scratch)
        else:
            print("GPU sections skipped: no CUDA device", flush=True)
    print_table(machine)


def cpu_name():
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def print_table(machine):
    print(f"\n| section | figure | value | note |   (machine: {machine})")
    print("| --- | --- | ---: | --- |")
    for section, figure, value, goal in ROWS:
        print(f"| {section} | {figure.strip()} | {value} | {goal} |")


if __name__ == "__main__":
    main()

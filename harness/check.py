"""`uv run prepare.py --check`: can this machine run the current profile? Downloads nothing and changes
nothing of the project or its data (the compile probe leaves its kernels in torch's and Triton's caches).

Prints one line per finding and the verdict last, and exits with a status a script can use:
    0  a run can start
    1  data shards or tokenizer missing for this profile: run `uv run prepare.py`
    2  no usable GPU for the gpu profile (none, torch without CUDA, or no bf16): use AUTORESEARCH_PROFILE=cpu
    3  the NVIDIA driver is too old for torch's CUDA: update the driver
    4  torch.compile cannot build GPU kernels (no Triton, no C compiler, or a tiny compiled function failed)
    5  not enough free GPU memory for even one row of the baseline: free the GPU
In the cpu profile only 1 applies: what it finds about a GPU is information.

The verdict is a pure function of a Facts record, so every kind of machine can be tested without owning it.
"""
from dataclasses import dataclass

import torch

import prepare
from harness.gpu import (MIN_CAPABILITY, bf16_problem, c_compiler, compiler_problem, driver_problem, min_driver,
                         no_gpu_problem, nvidia_driver, peak_bf16_flops, triton_found)

# Memory of karpathy/autoresearch's baseline (gpu profile): peak_vram_mb 45060.2 at DEVICE_BATCH_SIZE 128 on
# an H100 (his README). Modelled as a fixed part (the 50M parameters with their gradients and optimizer
# state, ~0.5 GiB, rounded up to 1 GiB) plus a per-row part (activations of one 2048-token row), plus headroom for
# what max_memory_allocated does not count (allocator slack, workspaces). An estimate, not a measurement.
BASELINE_ROWS = 128                  # AR's DEVICE_BATCH_SIZE
BASELINE_PEAK_MIB = 45060.2          # AR's peak_vram_mb at those rows
FIXED_MIB = 1024.0                   # parameters, gradients, optimizer state
ROW_MIB = (BASELINE_PEAK_MIB - FIXED_MIB) / BASELINE_ROWS  # ~344 MiB of activations per row
HEADROOM = 1.10                      # allocator slack and workspaces on top of the allocated peak


@dataclass
class Facts:
    """What --check found; every field can be set by hand in tests."""
    profile: str                       # AUTORESEARCH_PROFILE
    torch_version: str
    torch_cuda: str | None             # the CUDA torch was built with; None: a CPU-only torch
    driver: str | None = None          # nvidia-smi's driver version; None: no nvidia-smi or no GPU it sees
    gpu: str | None = None             # torch.cuda.get_device_name(); None: torch sees no CUDA GPU
    capability: tuple = (0, 0)         # compute capability
    total_mib: float = 0.0
    free_mib: float = 0.0              # torch.cuda.mem_get_info: free to this process now
    gpu_error: str = ""                # why torch could not use the GPU it reported, if it could not
    triton: bool = False               # importable
    c_compiler: str | None = None      # what Triton would build its launchers with
    compiled: bool | None = None       # a tiny torch.compile'd function ran right on the GPU; None: not tried
    compile_error: str = ""
    data_error: str | None = None      # prepare.shard_paths' message when shards are missing
    train_shards: int = 0
    tokenizer: bool = False            # tokenizer.pkl present
    cache: str = ""                    # this profile's data and tokenizer directory

# ---------------------------------------------------------------------------
# The verdict: pure functions of Facts
# ---------------------------------------------------------------------------

def rows_needed_mib(rows):
    """Estimated GPU memory (MiB) the baseline needs at `rows` rows per micro-step."""
    return (FIXED_MIB + rows * ROW_MIB) * HEADROOM


def fitting_rows(free_mib):
    """The largest power-of-two device batch up to the baseline's 128 rows whose estimate fits, or None: what
    train.py will settle on by trying, halving DEVICE_BATCH_SIZE on out-of-memory, same TOTAL_BATCH_SIZE."""
    rows = BASELINE_ROWS
    while rows >= 1 and rows_needed_mib(rows) > free_mib:
        rows //= 2
    return rows or None


def gpu_blocker(f):
    """(exit code, what to do) for the first thing that stops the gpu profile on this machine, or None."""
    if f.gpu is None:
        driver = driver_problem(f.driver, f.torch_cuda)
        if driver and driver[0]:
            return 3, driver[1]
        if f.gpu_error:
            return 2, (f"torch cannot use the GPU ({f.gpu_error}): see what nvidia-smi says; for a small CPU "
                       "run use AUTORESEARCH_PROFILE=cpu")
        return 2, no_gpu_problem(f.torch_version, f.torch_cuda)
    if reason := bf16_problem(f.gpu, f.capability):
        return 2, reason
    if reason := compiler_problem(f.triton, f.c_compiler):
        return 4, reason
    if f.compiled is False:
        return 4, (f"a tiny torch.compile'd function failed on the GPU ({f.compile_error}): fix the torch/Triton "
                   "install (`uv sync --locked`) or the C compiler it names")
    if fitting_rows(f.free_mib) is None:
        return 5, (f"{f.free_mib / 1024:.1f} GiB free on {f.gpu}, below the ~{rows_needed_mib(1) / 1024:.1f} GiB "
                   "one row of the baseline needs: stop what holds the GPU (nvidia-smi lists it) or use a larger GPU")
    return None


def _with_profile(message, profile):
    """prepare.py's advice, with the profile in the command when it is not the default."""
    command = "`uv run prepare.py`" if profile == "gpu" else f"`AUTORESEARCH_PROFILE={profile} uv run prepare.py`"
    return message.replace("`uv run prepare.py`", command)


def data_blocker(f):
    """(1, what to do) when this profile's shards or tokenizer are missing, or None."""
    if f.data_error:
        return 1, _with_profile(f.data_error, f.profile)
    if not f.tokenizer:
        return 1, _with_profile(f"no tokenizer in {f.cache}/tokenizer: run `uv run prepare.py`", f.profile)
    return None


def verdict(f):
    """(exit code, the verdict line): the one thing to do, or that a run can start."""
    blocker = (gpu_blocker(f) if f.profile == "gpu" else None) or data_blocker(f)
    if blocker:
        return blocker[0], f"verdict: not ready: {blocker[1]}"
    if f.profile != "gpu":
        return 0, f"verdict: ready: `AUTORESEARCH_PROFILE={f.profile} uv run train.py` can start"
    rows = fitting_rows(f.free_mib)
    fit = "" if rows == BASELINE_ROWS else f", fitting about {rows} rows a micro-step by gradient accumulation"
    return 0, f"verdict: ready: `uv run train.py` can start{fit}"

# ---------------------------------------------------------------------------
# Findings: one line each, also pure
# ---------------------------------------------------------------------------

def _driver_finding(f):
    problem = driver_problem(f.driver, f.torch_cuda)
    if problem:  # blocking only where torch cannot use the GPU: a forward-compatibility package may make it work
        return ("FAIL" if problem[0] and f.gpu is None else "warn"), "driver", problem[1]
    if f.driver is None:
        return "info", "driver", "unknown (no nvidia-smi, or it sees no GPU)"
    need = min_driver(f.torch_cuda)
    return ("ok", "driver", f"{f.driver} (torch's CUDA {f.torch_cuda} needs >= {need})" if need else
            f"{f.driver}")


def _device_findings(f):
    if f.gpu is None:
        return [("FAIL", "gpu", f"none that torch can use{f' ({f.gpu_error})' if f.gpu_error else ''}")]
    peak = peak_bf16_flops(f.gpu)
    peak_text = f"dense bf16 peak {peak / 1e12:g} TFLOP/s" if peak else "bf16 peak unknown, so MFU will be null"
    major, minor = f.capability
    bf16 = bf16_problem(f.gpu, f.capability)
    return [("ok", "gpu", f"{f.gpu}, {f.total_mib / 1024:.1f} GiB, compute capability {major}.{minor}, {peak_text}"),
            ("FAIL", "bf16", bf16) if bf16 else
            ("ok", "bf16", f"tensor cores (sm_{major}{minor}, sm_{MIN_CAPABILITY[0]}{MIN_CAPABILITY[1]}+ needed)")]


def _compiler_finding(f):
    if reason := compiler_problem(f.triton, f.c_compiler):
        return "FAIL", "compiler", reason
    if f.compiled is None:
        return "info", "compiler", f"Triton and a C compiler ({f.c_compiler}) present; not tried on a GPU"
    if not f.compiled:
        return "FAIL", "compiler", f"a tiny torch.compile'd function failed on the GPU: {f.compile_error}"
    return "ok", "compiler", f"a tiny torch.compile'd function ran on the GPU and matched eager (C compiler {f.c_compiler})"


def _memory_finding(f):
    estimate = (f"estimate: {FIXED_MIB / 1024:.1f} GiB fixed + {ROW_MIB / 1024:.2f} GiB a {prepare.PROFILES['gpu']['MAX_SEQ_LEN']}"
                f"-token row, +{HEADROOM - 1:.0%}")
    free, rows = f.free_mib / 1024, fitting_rows(f.free_mib)
    need = rows_needed_mib(BASELINE_ROWS) / 1024
    if rows == BASELINE_ROWS:
        return "ok", "memory", f"{free:.1f} GiB free; the baseline's {BASELINE_ROWS} rows need ~{need:.1f} GiB ({estimate})"
    if rows:
        return "warn", "memory", (f"{free:.1f} GiB free, short of the ~{need:.1f} GiB {BASELINE_ROWS} rows need "
                                  f"({estimate}): train.py will fit a smaller device batch by gradient accumulation, "
                                  f"about {rows} rows ({BASELINE_ROWS // rows}x the micro-steps, same TOTAL_BATCH_SIZE)")
    return "FAIL", "memory", f"{free:.1f} GiB free, below the ~{rows_needed_mib(1) / 1024:.1f} GiB one row needs ({estimate})"


def _data_findings(f):
    shards = (("FAIL", "data", _with_profile(f.data_error, f.profile)) if f.data_error else
              ("ok", "data", f"{f.train_shards} training shard(s), the validation and the held-out shard in {f.cache}/data"))
    tokenizer = (("ok", "tokenizer", f"{f.cache}/tokenizer/tokenizer.pkl") if f.tokenizer else
                 ("FAIL", "tokenizer", f"none in {f.cache}/tokenizer"))
    return [shards, tokenizer]


def findings(f):
    """The report's lines before the verdict. In the cpu profile what concerns the GPU is information only."""
    cuda = f"CUDA {f.torch_cuda}" if f.torch_cuda else "built without CUDA"
    gpu = [("info", "torch", f"{f.torch_version}, {cuda}"), _driver_finding(f), *_device_findings(f)]
    if f.gpu is not None:
        gpu += [_compiler_finding(f), _memory_finding(f)]
    if f.profile != "gpu":
        gpu = [("info", topic, text) for _, topic, text in gpu]
    return [f"{mark:<4}  {topic:<9}  {text}" for mark, topic, text in gpu + _data_findings(f)]

# ---------------------------------------------------------------------------
# Gathering the facts of this machine (reads only)
# ---------------------------------------------------------------------------

def telling_line(error):
    """The first line of an error that says something: dynamo wraps the backend's error after a line
    "backend='inductor' raised:", and a bare exception has only its type."""
    lines = [line.strip() for line in str(error).splitlines()]
    return next((line for line in lines if line and not line.startswith("backend=")), type(error).__name__)[:300]


def compile_probe(device="cuda"):
    """Compile a tiny function with torch.compile (Inductor: a cuBLAS matmul and a Triton reduction on a GPU)
    and run it: "" when it ran and matched eager, else the error's first telling line."""
    def tiny(a, b):
        return (a @ b).float().relu().sum(dim=-1)
    try:
        a = torch.randn(64, 64, device=device, dtype=torch.bfloat16)
        got = torch.compile(tiny, dynamic=False, fullgraph=True)(a, a)
        want = tiny(a, a)
    except Exception as e:  # whatever Inductor, Triton, ptxas or the C compiler raised is the finding
        return telling_line(e)
    if not torch.allclose(got, want, rtol=1e-2, atol=1e-2):
        return f"its result differs from eager by {(got - want).abs().max().item():.3g}"
    return ""


def _gather_gpu(f, probe):
    try:
        device = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(device)
        free, total = torch.cuda.mem_get_info(device)
    except RuntimeError as e:  # a GPU the driver lists but cannot open (busy in exclusive mode, in error)
        f.gpu_error = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return
    f.gpu, f.capability = props.name, (props.major, props.minor)
    f.total_mib, f.free_mib = total / 2**20, free / 2**20
    if probe and not bf16_problem(f.gpu, f.capability) and not compiler_problem(f.triton, f.c_compiler):
        print("....  compiler   compiling a tiny function on the GPU (cold caches take up to a minute)", flush=True)
        f.compile_error = compile_probe()
        f.compiled = not f.compile_error


def gather(probe=True):
    """The Facts of this machine and profile. probe: run the compile probe on the GPU (gpu profile only)."""
    f = Facts(profile=prepare.PROFILE, torch_version=torch.__version__, torch_cuda=torch.version.cuda,
              driver=nvidia_driver(), triton=triton_found(), c_compiler=c_compiler(),
              cache=str(prepare.DATA_DIR.parent))
    try:
        f.train_shards = len(prepare.shard_paths("train"))
        prepare.shard_paths("heldout")  # the harness scores it after every run
    except prepare.PrepareError as e:
        f.data_error = str(e)
    f.tokenizer = (prepare.TOKENIZER_DIR / "tokenizer.pkl").exists()
    if torch.cuda.is_available():
        _gather_gpu(f, probe and f.profile == "gpu")
    return f


def main():
    """Print the findings and the verdict; return the exit status."""
    settings = ", ".join(f"{k} {v}" for k, v in prepare.HARNESS.items() if k != "profile" and (k != "overrides" or v))
    print(f"info  profile    {prepare.PROFILE} ({settings})", flush=True)
    facts = gather()
    for line in findings(facts):
        print(line)
    code, line = verdict(facts)
    print(line)
    return code

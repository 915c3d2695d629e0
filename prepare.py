"""
One-time data preparation, and the fixed data runtime that every experiment's number comes out of.
Downloads the data shards (or, in the cpu profile, builds them from the standard library's own text),
trains the BPE tokenizer and tokenizes every shard once into a token cache. train.py imports the
runtime half: the tokenizer, the packed dataloader and the fixed bits-per-byte metric. A third split,
held out from training and validation alike, is scored by the harness alone (harness/evaluate.py): a model
that trained on the validation rows does better on them than on it.

Usage:
    uv run prepare.py                              # 10 training shards + the validation and held-out shards, tokenizer
    uv run prepare.py --num-shards 8               # fewer training shards (-1 = all 6541)
    uv run prepare.py --download-workers 16        # more parallel downloads
    AUTORESEARCH_PROFILE=cpu uv run prepare.py     # tiny laptop harness, no network at all
    uv run prepare.py --check                      # can this machine run the profile? changes nothing

Data and tokenizer live in $AUTORESEARCH_CACHE (default ~/.cache/autoresearch); the cpu profile
keeps its own copy under cpu/ and never shares it with gpu. Re-running does no work twice.
"""

import argparse
import ast
import bisect
import concurrent.futures
import dataclasses
import hashlib
import importlib.util
import itertools
import math
import os
import pickle
import platform
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import requests
import rustbpe
import tiktoken
import torch

# ---------------------------------------------------------------------------
# Profiles and paths (fixed, do not modify)
# ---------------------------------------------------------------------------

PROFILES = {
    # gpu: karpathy/autoresearch's H100 harness, constants unchanged
    "gpu": dict(MAX_SEQ_LEN=2048, TIME_BUDGET=300, EVAL_TOKENS=40 * 524288, VOCAB_SIZE=8192),
    # cpu: the same loop scaled down so it runs on a 2-core laptop in minutes, with no network
    "cpu": dict(MAX_SEQ_LEN=256, TIME_BUDGET=60, EVAL_TOKENS=2**16, VOCAB_SIZE=2048),
}
PROFILE = os.environ.get("AUTORESEARCH_PROFILE", "gpu")
if PROFILE not in PROFILES:
    raise SystemExit(f"prepare.py: AUTORESEARCH_PROFILE must be one of {sorted(PROFILES)}, got {PROFILE!r}")

CACHE_DIR = Path(os.environ.get("AUTORESEARCH_CACHE") or Path.home() / ".cache" / "autoresearch")
_PROFILE_DIR = CACHE_DIR if PROFILE == "gpu" else CACHE_DIR / "cpu"   # the profiles never share a cache
DATA_DIR = _PROFILE_DIR / "data"            # shard_NNNNN.parquet files, plus their token cache
TOKENIZER_DIR = _PROFILE_DIR / "tokenizer"  # tokenizer.pkl (tiktoken encoding) + token_bytes.pt

MAX_SEQ_LEN = PROFILES[PROFILE]["MAX_SEQ_LEN"]   # context length
TIME_BUDGET = PROFILES[PROFILE]["TIME_BUDGET"]   # training time budget in seconds
EVAL_TOKENS = PROFILES[PROFILE]["EVAL_TOKENS"]   # number of tokens for the final val eval
HELDOUT_TOKENS = EVAL_TOKENS // (4 if PROFILE == "gpu" else 1)  # held-out tokens the harness scores beside val_bpb
VOCAB_SIZE = PROFILES[PROFILE]["VOCAB_SIZE"]     # BPE vocabulary size, special tokens included

_overrides = {}
if os.environ.get("AUTORESEARCH_TIME_BUDGET"):
    try:
        TIME_BUDGET = float(os.environ["AUTORESEARCH_TIME_BUDGET"])
    except ValueError:
        TIME_BUDGET = -1.0
    if not (TIME_BUDGET > 0 and math.isfinite(TIME_BUDGET)):
        raise SystemExit("prepare.py: AUTORESEARCH_TIME_BUDGET must be a positive number of seconds, "
                         f"got {os.environ['AUTORESEARCH_TIME_BUDGET']!r}")
    _overrides["AUTORESEARCH_TIME_BUDGET"] = TIME_BUDGET
if os.environ.get("AUTORESEARCH_DATA_URL") and PROFILE == "gpu":  # the cpu profile never downloads
    _overrides["AUTORESEARCH_DATA_URL"] = os.environ["AUTORESEARCH_DATA_URL"]

# two runs are comparable only if their HARNESS dicts are equal
HARNESS = {"profile": PROFILE, "MAX_SEQ_LEN": MAX_SEQ_LEN, "TIME_BUDGET": TIME_BUDGET,
           "EVAL_TOKENS": EVAL_TOKENS, "VOCAB_SIZE": VOCAB_SIZE, "overrides": _overrides}

if PROFILE == "cpu" and "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)  # a tiny model: on a busy 2-core machine torch's extra threads spin (2.6x slower)


def hard_cap_s(budget, outside_ref_s=None):
    """Wall-clock seconds after which a run of train.py is stopped: the budget plus the larger of a floor
    (the budget itself, at least 120 s) and three times the seconds the best run spent outside its budget.
    The one rule: the recorder's watchdog uses it for a manual run, `analyze.py run` for its child."""
    return budget + max(budget, 120.0, 3 * (outside_ref_s or 0.0))

# ---------------------------------------------------------------------------
# Data and tokenizer (fixed, do not modify)
# ---------------------------------------------------------------------------

BASE_URL = (os.environ.get("AUTORESEARCH_DATA_URL")
            or "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main")
MAX_SHARD = 6542                                 # the last shard is shard_06542.parquet
VAL_SHARD = MAX_SHARD                            # pinned validation shard
VAL_FILENAME = f"shard_{VAL_SHARD:05d}.parquet"  # same name in both profiles
HELDOUT_SHARD = MAX_SHARD - 1                    # held-out shard: never trained on, never the metric
HELDOUT_FILENAME = f"shard_{HELDOUT_SHARD:05d}.parquet"  # same name in both profiles
DEV_FILENAME = f"dev_{VAL_SHARD:05d}.parquet"    # validation documents the pinned rows never load: the in-training curve's
SPLITS = ("train", "val", "heldout", "dev")      # what make_dataloader serves
# GPT-4 split pattern, with numbers in groups of one or two (\p{N}{1,2} instead of {1,3})
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
SPECIAL_TOKENS = [f"<|reserved_{i}|>" for i in range(4)]  # reserved ids at the top of the vocabulary
BOS_TOKEN = SPECIAL_TOKENS[0]                    # starts every document and every packed row
TOKENIZER_MAX_CHARS = 1_000_000_000              # training text for the BPE merges
TOKENIZER_DOC_CAP = 10_000                       # characters kept per document for BPE training
LOADER_BUFFER_DOCS = 1000                        # the packer refills its buffer whenever it holds fewer
LOADER_BATCH_DOCS = 128                          # ...by this many documents of one row group at a time

# cpu profile data: built from the standard library's docstrings, comments and pydoc topics
CPU_TRAIN_SHARDS = 4        # training shards (shard_00000..), plus the validation and held-out shards
CPU_DOC_CHARS = 300         # paragraphs grouped into documents up to this size: rows of 256 hold several
CPU_VAL_FRACTION = 0.15     # share of characters, as whole modules, held out for validation
CPU_HELDOUT_FRACTION = 0.12 # share of characters, as whole modules, for the held-out shard (from training's share)
CPU_SEED = 1337             # fixed shuffle: the same standard library always gives the same shards

# ---------------------------------------------------------------------------
# Configuration (how the work gets done; changes no number)
# ---------------------------------------------------------------------------

DOWNLOAD_ATTEMPTS = 5       # tries per shard before giving up
RETRY_BACKOFF_S = 1.0       # sleep before retry k is RETRY_BACKOFF_S * 2**(k-1): 1+2+4+8 s at most
CONNECT_TIMEOUT_S = 5.0     # per address: a host name with several addresses takes a multiple of it
READ_TIMEOUT_S = 30.0       # a stalled transfer is retried
GIVE_UP_S = 55.0            # no retry starts this long after a shard's last received byte
PINNED_SLOTS = 3            # host staging buffers in flight per CUDA loader


class PrepareError(RuntimeError):
    """An expected failure with a one-line message that says what to do."""


def shard_name(index):
    return f"shard_{index:05d}.parquet"


class ProgressLine:
    """One live line on a terminal (rewritten with \\r); whole lines at most every `every_s` otherwise, so a
    log file never holds a megabyte-long line of carriage returns. The downloads and train.py's loop use it."""

    def __init__(self, every_s=5.0, stream=None):
        self.every_s, self.stream = every_s, stream or sys.stdout
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last, self._width = -math.inf, 0

    def _rewrite(self, text):
        self.stream.write("\r" + text + " " * max(0, self._width - len(text)))
        self._width = len(text)

    def update(self, text):
        if self.live:
            self._rewrite(text)
        elif time.monotonic() - self._last >= self.every_s:
            self.stream.write(text + "\n")
            self._last = time.monotonic()
        self.stream.flush()

    def done(self, text):
        if self.live:
            self._rewrite(text)
        self.stream.write("\n" if self.live else text + "\n")
        self.stream.flush()

# ---------------------------------------------------------------------------
# Data download (gpu profile)
# ---------------------------------------------------------------------------

class _Retryable(Exception):
    """A failure worth another attempt: connection trouble, a 5xx, a body that is not a whole shard."""


def _check_text_column(pf):
    if "text" not in pf.schema_arrow.names:
        raise ValueError(f"no 'text' column (columns: {pf.schema_arrow.names})")
    kind = pf.schema_arrow.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(f"its 'text' column holds {kind}, not strings")


def check_shard(path):
    """Raise ValueError unless `path` reads as parquet with a string `text` column, every row group included."""
    try:
        pf = pq.ParquetFile(path)
        _check_text_column(pf)
        for rg in range(pf.num_row_groups):
            pf.read_row_group(rg, columns=["text"])
    except (pa.ArrowException, OSError) as e:
        raise ValueError(str(e).splitlines()[0] if str(e) else type(e).__name__) from e


def _download_once(url, dest, stop, on_bytes):
    """Stream `url` into a temp file next to `dest`; rename it into place only once it is a whole shard."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                with requests.get(url, stream=True, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S),
                                  headers={"Accept-Encoding": "identity"}) as r:
                    if r.status_code >= 500 or r.status_code == 429:
                        raise _Retryable(f"HTTP {r.status_code}")
                    if r.status_code >= 400:
                        raise PrepareError(f"{url} answered HTTP {r.status_code}")
                    expected = r.headers.get("Content-Length")
                    written = 0
                    for chunk in r.iter_content(chunk_size=1 << 20):
                        if stop.is_set():
                            raise PrepareError(f"download of {url} cancelled")
                        f.write(chunk)
                        written += len(chunk)
                        on_bytes(len(chunk))
                    f.flush()
                    os.fsync(f.fileno())  # whole on disk before the rename makes it a shard
            except requests.RequestException as e:
                raise _Retryable(type(e).__name__) from e
        if expected is not None and written != int(expected):
            raise _Retryable(f"body cut short: {written} of {expected} bytes")
        try:
            check_shard(tmp)
        except ValueError as e:
            raise _Retryable(f"not a parquet shard with a text column: {e}") from e
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep a shared cache from other users
        os.replace(tmp, dest)
    except OSError as e:  # disk full, permissions: not worth a retry
        raise PrepareError(f"could not write {dest} ({e.strerror or e}): free space or fix permissions "
                           f"under {dest.parent}, then re-run `uv run prepare.py`") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def download_shard(index, base_url, data_dir, stop, on_bytes, backoff_s):
    """Download one shard with retries and exponential backoff; raise PrepareError naming the URL.
    Retries stop after DOWNLOAD_ATTEMPTS, or once GIVE_UP_S have passed without a byte from the mirror,
    so a dead or stalled mirror fails in about a minute however many addresses its name resolves to."""
    dest = Path(data_dir) / shard_name(index)
    url = f"{base_url.rstrip('/')}/{dest.name}"
    last_byte = [time.monotonic()]

    def on_shard_bytes(n):
        last_byte[0] = time.monotonic()
        on_bytes(n)

    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        try:
            _download_once(url, dest, stop, on_shard_bytes)
            return
        except _Retryable as e:
            reason = str(e)
        wait = backoff_s * 2 ** (attempt - 1)
        if attempt == DOWNLOAD_ATTEMPTS or time.monotonic() + wait - last_byte[0] > GIVE_UP_S or stop.wait(wait):
            break
    raise PrepareError(f"could not download {url} ({reason}, {attempt} attempts)")


def download_data(num_shards, download_workers=8, base_url=None, data_dir=None, backoff_s=None):
    """Download training shards 0..num_shards-1 plus the pinned validation and held-out shards, in parallel.
    The held-out shard is the last before the validation shard, so it is never among the training ones."""
    base_url, data_dir = base_url or BASE_URL, Path(data_dir or DATA_DIR)
    backoff_s = RETRY_BACKOFF_S if backoff_s is None else backoff_s
    data_dir.mkdir(parents=True, exist_ok=True)
    for stale in data_dir.glob(".shard_*.part"):  # left by a killed run
        stale.unlink()
    ids = list(range(min(num_shards, HELDOUT_SHARD))) + [HELDOUT_SHARD, VAL_SHARD]
    todo = [i for i in ids if not (data_dir / shard_name(i)).exists()]
    if not todo:
        print(f"Data: all {len(ids)} shards already at {data_dir}")
        return
    print(f"Data: downloading {len(todo)} shards from {base_url} ({len(ids) - len(todo)} already there)")
    stop, lock, nbytes = threading.Event(), threading.Lock(), [0]

    def on_bytes(n):
        with lock:
            nbytes[0] += n

    progress, t0, done = ProgressLine(every_s=10.0), time.time(), 0
    with concurrent.futures.ThreadPoolExecutor(max(1, min(download_workers, len(todo)))) as pool:
        pending = {pool.submit(download_shard, i, base_url, data_dir, stop, on_bytes, backoff_s) for i in todo}
        try:
            while pending:
                finished, pending = concurrent.futures.wait(pending, timeout=0.5, return_when="FIRST_COMPLETED")
                for fut in finished:
                    fut.result()  # the first failure stops every other download
                    done += 1
                mb = nbytes[0] / 1e6
                progress.update(f"Data: {done}/{len(todo)} shards | {mb:,.1f} MB | "
                                f"{mb / max(time.time() - t0, 1e-9):.1f} MB/s")
        except BaseException:
            stop.set()
            for fut in pending:
                fut.cancel()
            raise
    progress.done(f"Data: {len(ids)} shards ready at {data_dir} ({nbytes[0] / 1e6:,.1f} MB in {time.time() - t0:.0f}s)")

# ---------------------------------------------------------------------------
# Standard-library shards (cpu profile: real English text, no network)
# ---------------------------------------------------------------------------

def _stdlib_sources():
    """Every pure-Python module of the standard library, test suites and installed packages excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    return root, sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))


def _comment_blocks(source):
    """(line, text) of each block of consecutive comment lines that reads like prose."""
    blocks, lines, start = [], [], 0
    for i, line in enumerate(source.splitlines() + [""], start=1):
        s = line.strip()
        if s.startswith("#") and not s.startswith("#!"):
            start = start or i
            lines.append(s.lstrip("#").strip())
            continue
        text = " ".join(t for t in lines if t)
        letters = sum(c.isalpha() or c == " " for c in text)
        if len(text) >= 40 and letters >= 0.8 * len(text) and "coding" not in text[:30]:
            blocks.append((start, text))
        lines, start = [], 0
    return blocks


def _module_units(path):
    """Docstrings and comment blocks of one module, in source order."""
    source = path.read_text(encoding="utf-8", errors="replace")
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    units = _comment_blocks(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and doc.strip():
                units.append((getattr(node, "lineno", 0), doc.strip()))
    return [text for _, text in sorted(units)]


def _group_paragraphs(units, max_chars):
    """Join paragraphs, in order, into documents of at most max_chars (a longer paragraph stands alone)."""
    docs, cur = [], ""
    for para in (p.strip() for u in units for p in u.split("\n\n")):
        if not para:
            continue
        if cur and len(cur) + 2 + len(para) > max_chars:
            docs.append(cur)
            cur = ""
        cur = f"{cur}\n\n{para}" if cur else para
    return docs + [cur] if cur else docs


def stdlib_documents(paths=None):
    """{source name: [documents]} from the standard library's docstrings, comments and pydoc topics."""
    root, default_paths = _stdlib_sources()
    groups = {}
    for path in default_paths if paths is None else paths:
        docs = _group_paragraphs(_module_units(path), CPU_DOC_CHARS)
        if docs:
            groups[path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name] = docs
    if paths is None:
        from pydoc_data.topics import topics  # the language reference's prose, shipped with pydoc
        for key in sorted(topics):
            groups[f"pydoc_data/topics/{key}"] = _group_paragraphs([topics[key]], CPU_DOC_CHARS)
    return groups


def split_documents(groups, num_train_shards=CPU_TRAIN_SHARDS, val_fraction=CPU_VAL_FRACTION,
                    heldout_fraction=CPU_HELDOUT_FRACTION, seed=CPU_SEED):
    """Deterministic split into (training shards, val, heldout): whole modules go to validation until it
    holds val_fraction of the text, the next ones to the held-out set until it holds heldout_fraction;
    duplicate documents are dropped; each split is shuffled; training is cut into equal shards. The
    held-out modules come out of training's share, so validation is the same whatever heldout_fraction."""
    rng = random.Random(seed)
    names = sorted(groups)
    rng.shuffle(names)
    total = sum(len(d) for docs in groups.values() for d in docs)
    seen, val, heldout, train, val_chars, heldout_chars = set(), [], [], [], 0, 0
    for name in names:
        fresh = [d for d in groups[name] if d not in seen]
        seen.update(fresh)
        if val_chars < val_fraction * total:
            val.extend(fresh)
            val_chars += sum(map(len, fresh))
        elif heldout_chars < heldout_fraction * total:
            heldout.extend(fresh)
            heldout_chars += sum(map(len, fresh))
        else:
            train.extend(fresh)
    for split in (val, train, heldout):  # val first: its order is the one it had before the held-out split
        rng.shuffle(split)
    bounds = np.linspace(0, len(train), num_train_shards + 1).astype(int)
    return [train[a:b] for a, b in zip(bounds[:-1], bounds[1:])], val, heldout


def _write_shard(texts, dest):
    tmp = dest.with_name(f".{dest.name}.part")
    pq.write_table(pa.table({"text": pa.array(texts, type=pa.string())}), tmp, row_group_size=1024)
    os.replace(tmp, dest)


def build_cpu_shards(data_dir=None, paths=None, tokenizer_dir=None):
    """Write the cpu profile's shards (shard_00000.., the validation and the held-out shard) from
    standard-library text. A cache built before the held-out shard existed is rebuilt: its training shards
    hold the held-out text. New training shards make a tokenizer in tokenizer_dir stale (it stands for the
    data it was trained on), so it is removed before the held-out shard, written last, completes the set."""
    data_dir = Path(data_dir or DATA_DIR)
    names = [shard_name(i) for i in range(CPU_TRAIN_SHARDS)] + [VAL_FILENAME, HELDOUT_FILENAME]
    if all((data_dir / n).exists() for n in names):
        print(f"Data: all {len(names)} cpu shards already at {data_dir}")
        return
    t0 = time.time()
    train, val, heldout = split_documents(stdlib_documents(paths))
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, texts in zip(names[:-1], train + [val]):
        _write_shard(texts, data_dir / name)
    stale = tokenizer_dir is not None and (Path(tokenizer_dir) / "tokenizer.pkl").exists()
    if stale:
        (Path(tokenizer_dir) / "tokenizer.pkl").unlink()  # "trained" no more; token_bytes.pt is rewritten with it
    _write_shard(heldout, data_dir / HELDOUT_FILENAME)
    mchars = [sum(map(len, t)) / 1e6 for t in (sum(train, []), val, heldout)]
    print(f"Data: built {len(names)} cpu shards from the standard library of Python {platform.python_version()} "
          f"in {time.time() - t0:.1f}s: train {mchars[0]:.2f}M chars, val {mchars[1]:.2f}M, held-out {mchars[2]:.2f}M")
    if stale:
        print("Tokenizer: the one in the cache was trained on the earlier training shards; it is trained again")

# ---------------------------------------------------------------------------
# Tokenizer training
# ---------------------------------------------------------------------------

def shard_paths(split, data_dir=None):
    """The shards of a split. train and val check there is at least one training shard plus the validation
    shard; heldout and dev, that their file is there. Neither pinned shard is ever a training shard."""
    assert split in SPLITS, split
    data_dir = Path(data_dir or DATA_DIR)
    if split in ("heldout", "dev"):
        name, what = (HELDOUT_FILENAME, "held-out shard") if split == "heldout" else (DEV_FILENAME, "dev slice")
        if not (data_dir / name).exists():
            raise PrepareError(f"no {what} {name} in {data_dir}: run `uv run prepare.py`")
        return [data_dir / name]
    val = data_dir / VAL_FILENAME
    train = sorted(p for p in data_dir.glob("shard_*.parquet") if p.name not in (VAL_FILENAME, HELDOUT_FILENAME))
    if not train or not val.exists():
        raise PrepareError(f"need at least 1 training shard plus the validation shard {VAL_FILENAME} in "
                           f"{data_dir}, found {len(train)} training shard(s) and "
                           f"{'the' if val.exists() else 'no'} validation shard: run `uv run prepare.py`")
    return train if split == "train" else [val]


def read_texts(path):
    """Yield the `text` column of a shard one row group at a time; a broken file is a clear error."""
    try:
        pf = pq.ParquetFile(path)
        _check_text_column(pf)
        for rg in range(pf.num_row_groups):
            yield pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()
    except (pa.ArrowException, OSError, ValueError) as e:
        raise _corrupt_shard(path, e) from e


def _corrupt_shard(path, error):
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return PrepareError(f"{path} is corrupt or not a parquet shard with a text column ({reason}): "
                        f"delete it and re-run `uv run prepare.py`")


def _training_text(paths, max_chars, doc_cap):
    nchars = 0
    for path in paths:
        for texts in read_texts(path):
            for text in texts:
                yield text[:doc_cap]
                nchars += min(len(text), doc_cap)
                if nchars >= max_chars:
                    return


def train_tokenizer(data_dir=None, tokenizer_dir=None, vocab_size=None):
    """Train BPE with rustbpe on the training shards only; save a tiktoken encoding and the byte table."""
    tokenizer_dir = Path(tokenizer_dir or TOKENIZER_DIR)
    vocab_size = vocab_size or VOCAB_SIZE
    if (tokenizer_dir / "tokenizer.pkl").exists() and (tokenizer_dir / "token_bytes.pt").exists():
        print(f"Tokenizer: already trained at {tokenizer_dir}")
        return
    paths = shard_paths("train", data_dir)
    print(f"Tokenizer: training a {vocab_size}-token BPE on {len(paths)} training shard(s)...")
    t0 = time.time()
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(_training_text(paths, TOKENIZER_MAX_CHARS, TOKENIZER_DOC_CAP),
                            vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    ranks = {bytes(k): v for k, v in bpe.get_mergeable_ranks()}
    specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
    enc = tiktoken.Encoding(name="rustbpe", pat_str=bpe.get_pattern(), mergeable_ranks=ranks,
                            special_tokens=specials)
    token_bytes = metric_token_bytes(enc)
    _sanity_check(enc, token_bytes)
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    _save(tokenizer_dir / "token_bytes.pt", lambda f: torch.save(token_bytes, f))
    _save(tokenizer_dir / "tokenizer.pkl", lambda f: pickle.dump(enc, f))  # last: it means "trained"
    print(f"Tokenizer: trained in {time.time() - t0:.1f}s (vocab_size={enc.n_vocab}), saved to {tokenizer_dir}")


def _save(path, write):
    """Write a file whole or not at all."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def metric_token_bytes(enc):
    """int32 (vocab_size,): the bytes each token counts for in bits per byte, by karpathy/autoresearch's
    rule: the UTF-8 length of the token decoded alone. A token holding part of a multi-byte character
    decodes to U+FFFD and counts 3; special tokens count 0 and so drop out of the metric."""
    texts = (enc.decode([i]) for i in range(enc.n_vocab))
    specials = enc.special_tokens_set
    return torch.tensor([0 if t in specials else len(t.encode("utf-8")) for t in texts], dtype=torch.int32)


def _sanity_check(enc, token_bytes):
    """Round-trips text in several scripts; where every token is whole characters (ASCII) the counts
    must add up to the UTF-8 length, and special tokens must count 0."""
    for text in ["Hello world! Numbers: 123456. Unicode: 你好 naïve café 🦀", "\n\t  tabs and\r\nnewlines"]:
        ids = enc.encode_ordinary(text)
        if enc.decode(ids) != text:
            raise PrepareError(f"tokenizer round-trip failed: {text!r} -> {enc.decode(ids)!r}; "
                               "this is a bug in tokenizer training, please report it")
    for text in ["Hello world! Numbers: 123456.", "\n\t  tabs and\r\nnewlines"]:
        nbytes = int(token_bytes[enc.encode_ordinary(text)].sum())
        if nbytes != len(text):
            raise PrepareError(f"token bytes {nbytes} != {len(text)} bytes for {text!r}; "
                               "this is a bug in tokenizer training, please report it")
    specials = [enc.encode_single_token(name) for name in SPECIAL_TOKENS]
    if token_bytes[specials].any():
        raise PrepareError(f"special tokens count {token_bytes[specials].tolist()} bytes, not 0; "
                           "this is a bug in tokenizer training, please report it")

# ---------------------------------------------------------------------------
# Runtime utilities (imported by train.py)
# ---------------------------------------------------------------------------

class Tokenizer:
    """A tiktoken encoding trained above, plus the byte tables the metric needs."""

    def __init__(self, enc, directory=None, fingerprint=""):
        self.enc = enc
        self.directory = directory
        self.fingerprint = fingerprint  # names this tokenizer's token cache
        self.bos_token_id = enc.encode_single_token(BOS_TOKEN)
        self._token_bytes = {}          # device -> the metric's byte table, from the encoding itself

    @classmethod
    def from_directory(cls, tokenizer_dir=None):
        tokenizer_dir = Path(tokenizer_dir or TOKENIZER_DIR)
        pkl = tokenizer_dir / "tokenizer.pkl"
        if not pkl.exists():
            raise PrepareError(f"no tokenizer at {tokenizer_dir}: run `uv run prepare.py` first "
                               f"(profile {PROFILE})")
        blob = pkl.read_bytes()
        return cls(pickle.loads(blob), tokenizer_dir, hashlib.sha256(blob).hexdigest()[:16])

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_bos_token_id(self):
        return self.bos_token_id

    def encode(self, text, prepend=None, num_threads=8):
        """Token ids of a string (list) or of a list of strings (list of lists); `prepend` is a
        special-token string or id put in front of each."""
        if isinstance(prepend, str):
            prepend = self.enc.encode_single_token(prepend)
        if isinstance(text, str):
            ids = self.enc.encode_ordinary(text)
            return ids if prepend is None else [prepend] + ids
        if isinstance(text, list):
            rows = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
            return rows if prepend is None else [[prepend] + row for row in rows]
        raise TypeError(f"encode takes a str or a list of str, got {type(text).__name__}")

    def decode(self, ids):
        return self.enc.decode(ids)

    def token_bytes(self, device="cpu"):
        """int32 (vocab_size,): the bytes each token counts for in the metric (see metric_token_bytes),
        computed from the encoding (token_bytes.pt is written for other readers, never read back)."""
        if str(device) not in self._token_bytes:
            self._token_bytes[str(device)] = metric_token_bytes(self.enc).to(device)
        return self._token_bytes[str(device)]

# ---------------------------------------------------------------------------
# Token cache: every shard is tokenized once, then the loader only slices arrays
# ---------------------------------------------------------------------------

def _token_cache_paths(tokenizer, shard):
    cache = shard.parent / "tokens" / tokenizer.fingerprint
    return cache / f"{shard.stem}.tokens.npy", cache / f"{shard.stem}.offsets.npy"


def cache_tokens(tokenizer, shard):
    """Tokenize one shard into (tokens: uint16/int32 flat array, offsets: int64 document boundaries)."""
    tok_path, off_path = _token_cache_paths(tokenizer, shard)
    # offsets are written last, so their presence means the pair is whole; a shard rebuilt since is redone
    if off_path.exists() and off_path.stat().st_mtime_ns >= shard.stat().st_mtime_ns:
        return
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 2**16 else np.int32
    pieces, lengths = [], []
    for texts in read_texts(shard):
        rows = tokenizer.encode(texts, num_threads=os.cpu_count() or 1)
        lengths.extend(map(len, rows))
        pieces.append(np.fromiter(itertools.chain.from_iterable(rows), dtype=dtype, count=sum(map(len, rows))))
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tok_path.parent.mkdir(parents=True, exist_ok=True)
    for path, array in ((tok_path, np.concatenate(pieces) if pieces else np.zeros(0, dtype)), (off_path, offsets)):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)


def load_tokens(tokenizer, shard):
    """The cached (tokens, offsets) of a shard, building the cache first if needed."""
    cache_tokens(tokenizer, shard)
    tok_path, off_path = _token_cache_paths(tokenizer, shard)
    return np.load(tok_path, mmap_mode="r"), np.load(off_path)


def _row_group_sizes(path):
    try:
        metadata = pq.ParquetFile(path).metadata
        return [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
    except (pa.ArrowException, OSError) as e:
        raise _corrupt_shard(path, e) from e


def _document_batches(tokenizer, paths, batch_docs=LOADER_BATCH_DOCS):
    """Infinite stream of (tokens, offsets, epoch): runs of up to batch_docs consecutive documents of one
    parquet row group, shard after shard, epoch after epoch. These are the batches karpathy/autoresearch's
    loader tokenizes and adds to its buffer at once, so the buffer holds what his holds, document for
    document; here they are slices of the token cache."""
    for epoch in itertools.count(1):
        ndocs = 0
        for path in paths:
            tokens, offsets = load_tokens(tokenizer, path)
            sizes = _row_group_sizes(path)
            if sum(sizes) != len(offsets) - 1:
                raise PrepareError(f"the token cache of {path} holds {len(offsets) - 1} documents, the shard "
                                   f"{sum(sizes)}: delete {_token_cache_paths(tokenizer, path)[0].parent} "
                                   "and re-run `uv run prepare.py`")
            first = 0  # the row group's first document
            for size in sizes:
                for a in range(first, first + size, batch_docs):
                    yield tokens, offsets[a:min(a + batch_docs, first + size) + 1], epoch
                first += size
            ndocs += first
        if ndocs == 0:
            raise PrepareError(f"no documents in {', '.join(map(str, paths))}: re-run `uv run prepare.py`")


class _BestFitPacker:
    """BOS-aligned best-fit packing: each row is filled with the largest buffered document that fits;
    when none fits, the shortest is cropped to fill the row exactly. No padding. Ties go to the document
    that entered the buffer first. The buffer is kept sorted by length, so a placement is a bisect
    instead of a scan; the choices are karpathy/autoresearch's, row for row."""

    def __init__(self, batches, bos, buffer_size):
        self.batches, self.bos, self.buffer_size = batches, bos, buffer_size
        self.lens, self.refs = [], []  # parallel lists sorted by length (BOS included); ties oldest first
        self.epoch = 1                 # epoch of the last batch of documents read
        self.taken_tokens = 0          # tokens drawn from documents, BOS included
        self.cropped_tokens = 0        # of those, dropped from the tail of cropped documents

    def _refill(self):
        while len(self.lens) < self.buffer_size:
            tokens, offsets, self.epoch = next(self.batches)
            bounds = offsets.tolist()
            for start, end in zip(bounds[:-1], bounds[1:]):
                i = bisect.bisect_right(self.lens, end - start + 1)
                self.lens.insert(i, end - start + 1)
                self.refs.insert(i, (tokens, start))

    def fill(self, rows):
        """Fill rows (B, T+1) in place; return the epoch of the last batch of documents read."""
        capacity = rows.shape[1]
        for row in rows:
            pos = 0
            while pos < capacity:
                self._refill()
                remaining = capacity - pos
                j = bisect.bisect_right(self.lens, remaining) - 1
                j = bisect.bisect_left(self.lens, self.lens[j]) if j >= 0 else 0  # no fit: crop the shortest
                n = self.lens.pop(j)
                tokens, start = self.refs.pop(j)
                take = min(n, remaining)
                row[pos] = self.bos
                row[pos + 1:pos + take] = tokens[start:start + take - 1]
                pos += take
                self.taken_tokens += n
                self.cropped_tokens += n - take
        return self.epoch


class _DataLoader:
    """Iterator of (inputs, targets, epoch), inputs/targets int64 (B, T). On CUDA each batch is staged in
    one of PINNED_SLOTS pinned host buffers and copied without blocking into a fresh device tensor; a
    slot is refilled only after the CUDA event recorded behind its last copy has completed, so a copy in
    flight is never overwritten. On CPU: plain fresh tensors."""

    def __init__(self, packer, B, T, device):
        self.packer, self.B, self.T, self.device = packer, B, T, device
        self.rows = np.empty((B, T + 1), dtype=np.int64)
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.slots = [torch.empty((2, B, T), dtype=torch.long, pin_memory=True) for _ in range(PINNED_SLOTS)]
            self.events = [None] * PINNED_SLOTS
            self.step = 0

    @property
    def crop_fraction(self):
        """Share of document tokens dropped by cropping so far."""
        return self.packer.cropped_tokens / max(self.packer.taken_tokens, 1)

    def __iter__(self):
        return self

    def __next__(self):
        epoch = self.packer.fill(self.rows)
        if not self.cuda:
            batch = torch.empty((2, self.B, self.T), dtype=torch.long)
            self._split(batch.numpy())
            return batch[0], batch[1], epoch
        k = self.step % PINNED_SLOTS
        self.step += 1
        if self.events[k] is not None:
            self.events[k].synchronize()  # the slot's previous copy has landed on the device
        self._split(self.slots[k].numpy())
        batch = torch.empty((2, self.B, self.T), dtype=torch.long, device=self.device)
        batch.copy_(self.slots[k], non_blocking=True)
        self.events[k] = torch.cuda.Event()
        self.events[k].record(torch.cuda.current_stream(self.device))  # the stream the copy was queued on
        return batch[0], batch[1], epoch

    def _split(self, out):
        out[0] = self.rows[:, :-1]  # inputs
        out[1] = self.rows[:, 1:]   # targets: the same rows shifted by one


def make_dataloader(tokenizer, B, T, split, device=None, buffer_size=LOADER_BUFFER_DOCS, data_dir=None):
    """Infinite iterator of (inputs, targets, epoch) over BOS-aligned, best-fit packed rows of T+1 tokens.
    The row sequence depends only on the split and T: the same for every B, every time."""
    assert split in SPLITS, split
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    paths = shard_paths(split, data_dir)
    packer = _BestFitPacker(_document_batches(tokenizer, paths), tokenizer.get_bos_token_id(), buffer_size)
    return _DataLoader(packer, B, T, torch.device(device))


def pinned_documents(tokenizer, data_dir=None):
    """The indices of the validation shard's documents that the pinned rows (the first EVAL_TOKENS //
    MAX_SEQ_LEN) hold, whole or cropped: the packer's choices replayed. The documents still in its buffer when
    the last pinned row is full were loaded but are in no pinned row."""
    path, loaded, n_rows = shard_paths("val", data_dir)[0], [0], EVAL_TOKENS // MAX_SEQ_LEN

    def counted(batches):
        for tokens, offsets, epoch in batches:
            if epoch > 1:
                raise PrepareError(f"the validation shard {path.name} is too small for its pinned rows ({n_rows} rows of "
                                  f"{MAX_SEQ_LEN} tokens, and a dev slice beside them): is the mirror climbmix's?")
            loaded[0] += len(offsets) - 1
            yield tokens, offsets, epoch

    packer = _BestFitPacker(counted(_document_batches(tokenizer, [path])), tokenizer.get_bos_token_id(),
                            LOADER_BUFFER_DOCS)
    rows = np.empty((64, MAX_SEQ_LEN + 1), dtype=np.int64)
    for first in range(0, n_rows, len(rows)):
        packer.fill(rows[:n_rows - first])
    offsets = load_tokens(tokenizer, path)[1]
    buffered = {int(np.searchsorted(offsets, start)) for _, start in packer.refs}
    return set(range(loaded[0])) - buffered


def build_dev_slice(tokenizer, data_dir=None):
    """Write DEV_FILENAME: the validation shard's documents that no pinned row holds (pinned_documents), for the
    curve train.py draws during training (evaluate_bpb_sample), so that a sandbox can serve it without the
    validation shard. Rebuilt when the shard or the tokenizer (which decides the packing) is newer."""
    data_dir = Path(data_dir or DATA_DIR)
    val, dest = data_dir / VAL_FILENAME, data_dir / DEV_FILENAME
    tokenizer_file = Path(tokenizer.directory or TOKENIZER_DIR) / "tokenizer.pkl"
    newest = max(val.stat().st_mtime_ns, tokenizer_file.stat().st_mtime_ns if tokenizer_file.exists() else 0)
    if dest.exists() and dest.stat().st_mtime_ns >= newest:
        return
    pinned = pinned_documents(tokenizer, data_dir)
    texts = [t for i, t in enumerate(itertools.chain.from_iterable(read_texts(val))) if i not in pinned]
    if not texts:
        raise PrepareError(f"the validation shard {VAL_FILENAME} has no document outside its pinned rows")
    _write_shard(texts, dest)
    tokens, _ = load_tokens(tokenizer, dest)
    print(f"Dev slice: {len(texts)} validation documents ({len(tokens) / 1e3:.0f}k tokens) that no pinned row "
          f"holds, in {dest.name}")

# ---------------------------------------------------------------------------
# Evaluation (DO NOT CHANGE: this is the fixed metric)
# ---------------------------------------------------------------------------

def _model_device(model):
    param = next(model.parameters(), None) if hasattr(model, "parameters") else None
    if param is not None:
        return param.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def evaluate_bpb(model, tokenizer, batch_size):
    """
    Bits per byte on the pinned validation shard: THE number every experiment is judged by.

    Loss per token depends on the vocabulary: a bigger vocabulary packs more text into each token, so
    its per-token loss is higher for the same model quality. Bytes of text do not depend on the
    tokenizer, so we sum the cross-entropy (nats) over all target tokens, divide by the number of bytes
    those tokens spell, and convert nats to bits (/ ln 2). The result is the cost of encoding the
    validation text, per byte, and stays comparable when the vocabulary or tokenizer changes. Bytes are
    counted as karpathy/autoresearch counts them (metric_token_bytes), so the numbers compare with his.
    Special tokens (0 bytes, e.g. BOS) are excluded from both sums.

    Fixed MAX_SEQ_LEN and EVAL_TOKENS: the first EVAL_TOKENS // MAX_SEQ_LEN packed val rows, the same
    rows every time and for every batch_size (when batch_size does not divide them, the rows past the
    end of the last batch are computed but not counted, so every batch has one shape). These are his
    rows whenever batch_size * MAX_SEQ_LEN divides EVAL_TOKENS; otherwise he scores fewer, the
    EVAL_TOKENS // (batch_size * MAX_SEQ_LEN) whole batches, and his number depends on batch_size.
    `model(x, y, reduction='none')` must return per-token nats shaped like y (or flat).

    Under `analyze.py run` (AUTORESEARCH_HANDOFF set) the model is handed off instead and None returned: the
    harness measures it once, itself, in a process of its own (harness/evaluate.py), and writes the number.
    """
    if os.environ.get("AUTORESEARCH_HANDOFF"):
        save_handoff(model, batch_size, os.environ["AUTORESEARCH_HANDOFF"])
        return None
    return _bits_per_byte(model, tokenizer, batch_size, EVAL_TOKENS // MAX_SEQ_LEN)


def evaluate_bpb_sample(model, tokenizer, batch_size, eval_tokens):
    """The same computation on the first eval_tokens of the dev slice (validation text that the pinned rows
    never read, build_dev_slice): for validation curves during training, so that watching the curve never
    reads the metric's rows. Not the metric: a final val_bpb must come from evaluate_bpb."""
    return _bits_per_byte(model, tokenizer, batch_size, eval_tokens // MAX_SEQ_LEN, "dev")


def _bits_per_byte(model, tokenizer, batch_size, n_rows, split="val"):
    """Bits per byte over the first n_rows packed rows of a split, with the model's own loss."""
    return bits_per_byte(lambda x, y: model(x, y, reduction="none"), tokenizer, batch_size, n_rows,
                         _model_device(model), split)


@torch.no_grad()
def bits_per_byte(token_nats, tokenizer, batch_size, n_rows, device, split="val"):
    """Bits per byte over the first n_rows packed rows of a split, where
    token_nats(x, y) gives each target's nats: the metric's one implementation, for train.py's loss and the
    harness's alike (harness/evaluate.py computes nats from the logits)."""
    if n_rows < 1:
        raise ValueError(f"an eval set of less than one row of {MAX_SEQ_LEN} tokens")
    token_bytes = tokenizer.token_bytes(device)
    val_loader = make_dataloader(tokenizer, batch_size, MAX_SEQ_LEN, split, device=device)
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    for first in range(0, n_rows, batch_size):
        x, y, _ = next(val_loader)
        nats = token_nats(x, y).reshape(y.shape).double()
        nbytes = token_bytes[y]  # (B, T)
        nbytes[n_rows - first:] = 0  # rows past the eval set count in neither sum
        total_nats += torch.where(nbytes > 0, nats, 0.0).sum()  # special tokens (0 bytes) count no loss
        total_bytes += nbytes.sum()
    return (total_nats / (math.log(2) * total_bytes.double())).item()  # float64 throughout


def save_handoff(model, batch_size, path):
    """Save the trained model for the harness (harness/evaluate.py rebuilds it from the committed train.py
    and scores it with a loss it computes itself), whole or not at all. raw: without torch.compile's wrapper."""
    raw = getattr(model, "_orig_mod", model)
    config = getattr(raw, "config", None)
    if not dataclasses.is_dataclass(config):
        raise PrepareError(f"cannot hand the model to the harness: {type(raw).__name__} needs a dataclass "
                           f".config (train.py's model is rebuilt as Model(Config(**config)))")
    handoff = {"model_class": type(raw).__name__, "config_class": type(config).__name__,
               "config": dataclasses.asdict(config), "state_dict": raw.state_dict(), "batch_size": batch_size}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(path, lambda f: torch.save(handoff, f))

# ---------------------------------------------------------------------------
# Can this machine run the profile? (`uv run prepare.py --check`; train.py asks gpu_problem() first)
# ---------------------------------------------------------------------------

# Dense (not 2:4 sparse) bf16 tensor-core peak FLOP/s, MFU's denominator, from NVIDIA's datasheets and
# whitepapers: a sparse-only figure is halved, GeForce cards count at their fp32-accumulate rate. Keys are
# whole names once vendor, memory and socket words are dropped: "A10" never reads as "A100", nor "L4" as "L40".
PEAK_BF16_FLOPS = {
    "A100": 312e12, "A100 PCIE": 312e12, "A800": 312e12, "A10": 125e12, "A10G": 70e12, "A30": 165e12,
    "A40": 149.7e12, "L4": 121e12, "L40": 181.05e12, "L40S": 362.05e12, "H100": 989.5e12, "H100 PCIE": 756.5e12,
    "H100 NVL": 835.5e12, "H800": 989.5e12, "H200": 989.5e12, "H200 NVL": 835.5e12, "GH200": 989.5e12,
    "B100": 1750e12, "B200": 2250e12, "GB200": 2500e12, "RTX 3090": 71e12, "RTX 3090 TI": 80e12,
    "RTX 4080": 97.5e12, "RTX 4090": 165.2e12, "RTX 5080": 112.6e12, "RTX 5090": 209.5e12, "RTX A6000": 154.8e12,
    "RTX 6000 ADA GENERATION": 364.25e12, "RTX PRO 6000 BLACKWELL WORKSTATION EDITION": 503.8e12,
}
_NAME_NOISE = re.compile(r"NVIDIA|GEFORCE|\d+GB?|HBM\d*E?|SXM\d*")  # words of a device name that keep its peak
MIN_DRIVER = {"12": (525, 60, 13), "13": (580, 65, 6)}  # torch's CUDA major -> oldest Linux driver that runs it
CPU_HINT = "for a small CPU run use AUTORESEARCH_PROFILE=cpu (after `AUTORESEARCH_PROFILE=cpu uv run prepare.py`)"


def peak_bf16_flops(device_name):
    """Dense bf16 peak FLOP/s of a GPU by its torch.cuda.get_device_name(), or None when unknown (MFU is then
    null, never wrong): "NVIDIA A100-SXM4-80GB" and "NVIDIA A100 80GB PCIe" are both an A100."""
    words = re.split(r"[\s\-_]+", (device_name or "").upper())
    return PEAK_BF16_FLOPS.get(" ".join(w for w in words if w and not _NAME_NOISE.fullmatch(w)))


def baseline_gib(rows):
    """GPU memory AR's baseline needs at `rows` rows a micro-step: ~1 GiB of weights and optimizer state plus
    ~0.34 GiB of activations a 2048-token row (his peak: 45,060 MiB at 128 rows), and 10% allocator slack."""
    return (1.0 + rows * 0.336) * 1.1


def nvidia_driver():
    """The driver version nvidia-smi reports (not a warning it prints first), or None."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return next((v.strip() for v in out.splitlines() if re.fullmatch(r"\d+(\.\d+)+", v.strip())), None)


def _compile_probe():
    """"" when a tiny torch.compile'd function (a cuBLAS matmul, a Triton reduction) runs on the GPU and
    matches eager, else the error's first telling line (dynamo puts "backend='inductor' raised:" first)."""
    def tiny(a, b):
        return (a @ b).float().relu().sum(dim=-1)
    print("....       compiling a tiny function on the GPU (cold caches take up to a minute)", flush=True)
    try:
        a = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
        torch.testing.assert_close(torch.compile(tiny, dynamic=False, fullgraph=True)(a, a), tiny(a, a),
                                   rtol=1e-2, atol=1e-2)
    except Exception as e:  # whatever Inductor, Triton or the C compiler raised is the finding
        lines = [line.strip() for line in str(e).splitlines()]
        return next((line for line in lines if line and not line.startswith("backend=")), type(e).__name__)[:300]
    return ""


def gpu_problem(probe=False):
    """(exit code, one line: what is missing and what to do) for the first thing that keeps this machine from
    running the gpu profile, or None. Without bf16 or Triton the five minutes would time a different, slower
    program than every other run's: one line serves better than a run that looks valid and is not. probe (for
    --check): also compile a tiny function and check there is free memory for one row of the baseline."""
    if not torch.cuda.is_available():
        driver, cuda = nvidia_driver(), torch.version.cuda
        floor = MIN_DRIVER.get((cuda or "").split(".")[0])
        if driver and floor and tuple(map(int, driver.split("."))) < floor:
            return 3, (f"NVIDIA driver {driver} is too old for torch's CUDA {cuda} (needs >= "
                       f"{'.'.join(map(str, floor))}): update the NVIDIA driver")
        if cuda is None:  # e.g. Linux aarch64, where PyPI's torch has no CUDA
            return 2, f"this torch ({torch.__version__}) has no CUDA, which uv.lock installs on Linux x86_64 only: {CPU_HINT}"
        return 2, f"torch sees no CUDA GPU (see nvidia-smi, and CUDA_VISIBLE_DEVICES if set): {CPU_HINT}"
    try:
        name, (major, minor) = torch.cuda.get_device_name(), torch.cuda.get_device_capability()
        free_gib = torch.cuda.mem_get_info()[0] / 2**30
    except RuntimeError as e:  # listed by the driver but not usable (busy in exclusive mode, in error)
        return 2, f"torch cannot use the GPU ({str(e).strip().splitlines()[0]}): see nvidia-smi; {CPU_HINT}"
    if major < 8:
        return 2, (f"{name} (compute capability {major}.{minor}) has no bf16: the gpu profile needs an Ampere or "
                   "newer NVIDIA GPU (sm_80+); use a newer GPU or AUTORESEARCH_PROFILE=cpu")
    if importlib.util.find_spec("triton") is None:
        return 4, ("Triton is not installed, so torch.compile cannot build GPU kernels: the gpu profile needs "
                   "Linux x86_64 with torch's CUDA wheel, which brings Triton (`uv sync --locked`)")
    if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")):
        return 4, ("no C compiler ($CC, gcc or clang), which Triton needs to build its kernel launchers: "
                   "install gcc (e.g. `apt-get install gcc`) or set CC")
    if probe and (error := _compile_probe()):
        return 4, (f"a tiny torch.compile'd function failed on the GPU ({error}): fix the torch/Triton install "
                   "(`uv sync --locked`) or the C compiler it names")
    if probe and free_gib < baseline_gib(1):
        return 5, (f"{free_gib:.1f} GiB free on {name}, below the ~{baseline_gib(1):.1f} GiB one row of the "
                   "baseline needs: stop what holds the GPU (nvidia-smi lists it) or use a larger GPU")
    return None


def check():
    """`uv run prepare.py --check`: what this machine has for the profile, a line each, the verdict last.
    Changes nothing (the compile probe leaves kernels in torch's caches). Exit status: 0 a run can start;
    1 data or tokenizer missing; 2 no usable GPU (none, torch without CUDA, no bf16); 3 the driver is too old
    for torch's CUDA; 4 torch.compile cannot build GPU kernels; 5 no free GPU memory for one row. In the cpu
    profile only 1 applies: what it finds of a GPU is information."""
    settings = ", ".join(f"{k} {v}" for k, v in HARNESS.items() if k != "profile" and (k != "overrides" or v))
    print(f"profile    {PROFILE} ({settings})", flush=True)
    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
    print(f"torch      {torch.__version__}, {cuda}; NVIDIA driver {nvidia_driver() or 'unknown'}")
    rows = 0
    if torch.cuda.is_available():
        name, free = torch.cuda.get_device_name(), torch.cuda.mem_get_info()[0] / 2**30
        peak = peak_bf16_flops(name)
        rows = next((r for r in (128, 64, 32, 16, 8, 4, 2, 1) if baseline_gib(r) <= free), 0)
        print(f"gpu        {name}, compute capability {'.'.join(map(str, torch.cuda.get_device_capability()))}, "
              f"{free:.1f} GiB free (the baseline's 128 rows need ~{baseline_gib(128):.0f} GiB), "
              + (f"dense bf16 peak {peak / 1e12:g} TFLOP/s" if peak else "bf16 peak unknown: MFU will be null"))
    blocker = gpu_problem(probe=True) if PROFILE == "gpu" else None
    prepare_cmd = "uv run prepare.py" if PROFILE == "gpu" else f"AUTORESEARCH_PROFILE={PROFILE} uv run prepare.py"
    try:
        shard_paths("heldout"), shard_paths("dev")  # the harness scores the one, train.py's curve reads the other
        print(f"data       {len(shard_paths('train'))} training shard(s), the validation and the held-out shard "
              f"in {DATA_DIR}")
        if not (TOKENIZER_DIR / "tokenizer.pkl").exists():
            raise PrepareError(f"no tokenizer in {TOKENIZER_DIR}: run `uv run prepare.py`")
    except PrepareError as e:
        blocker = blocker or (1, str(e).replace("`uv run prepare.py`", f"`{prepare_cmd}`"))
    if blocker:
        print(f"verdict: not ready: {blocker[1]}")
        return blocker[0]
    command = "uv run train.py" if PROFILE == "gpu" else f"AUTORESEARCH_PROFILE={PROFILE} uv run train.py"
    fitted = f", fitting about {rows} rows a micro-step by gradient accumulation" if 0 < rows < 128 and PROFILE == "gpu" else ""
    print(f"verdict: ready: `{command}` can start{fitted}")
    return 0

# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description="Prepare data and tokenizer for auto-log-research")
    parser.add_argument("--num-shards", type=int, default=10, help="training shards to download (-1 = all); "
                        "the validation and held-out shards always come too")
    parser.add_argument("--download-workers", type=int, default=8, help="parallel downloads")
    parser.add_argument("--check", action="store_true",
                        help="check, changing nothing, whether this machine can run the current profile (exit 0 if so)")
    args = parser.parse_args(argv)
    if args.check:
        raise SystemExit(check())
    num_shards = MAX_SHARD if args.num_shards == -1 else args.num_shards
    try:
        if num_shards < 1:
            raise PrepareError(f"--num-shards must be at least 1 (or -1 for all), got {args.num_shards}")
        print(f"Profile: {PROFILE} | cache: {DATA_DIR.parent}")
        if PROFILE == "cpu":
            build_cpu_shards(DATA_DIR, tokenizer_dir=TOKENIZER_DIR)
        else:
            download_data(num_shards, args.download_workers)
        train_tokenizer(DATA_DIR, TOKENIZER_DIR, VOCAB_SIZE)
        tokenizer = Tokenizer.from_directory(TOKENIZER_DIR)
        build_dev_slice(tokenizer, DATA_DIR)
        t0, shards = time.time(), [p for split in SPLITS for p in shard_paths(split, DATA_DIR)]
        for shard in shards:
            cache_tokens(tokenizer, shard)
        print(f"Tokens: {len(shards)} shards tokenized into {DATA_DIR / 'tokens'} ({time.time() - t0:.1f}s)")
    except PrepareError as e:
        raise SystemExit(f"prepare.py: error: {e}") from None
    print("Done! Ready to train.")


if __name__ == "__main__":
    main()

"""
One-time data preparation, and the fixed data runtime every experiment's number comes out of: downloads the data
shards (the cpu profile builds them from the standard library's prose), trains the BPE tokenizer, tokenizes every
shard once. train.py imports the tokenizer, the packed dataloader and the fixed bits-per-byte metric.

Usage:
    uv run prepare.py                              # 10 training shards + the validation and held-out shards, tokenizer
    uv run prepare.py --num-shards 8               # fewer training shards (-1 = all 6541)
    uv run prepare.py --download-workers 16        # more parallel downloads
    AUTORESEARCH_PROFILE=cpu uv run prepare.py     # tiny laptop harness, no network at all
    uv run prepare.py --check                      # can this machine run the profile? changes nothing

Data and tokenizer live in $AUTORESEARCH_CACHE (default ~/.cache/autoresearch; the cpu profile's under cpu/).
"""

import argparse
import bisect
import collections.abc
import concurrent.futures
import hashlib
import importlib.util
import itertools
import math
import operator
import os
import pickle
import platform
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
import tokenize
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import requests
import rustbpe
import tiktoken
import torch
import torch.nn.attention.flex_attention as flex

# ---------------------------------------------------------------------------
# Profiles, data and tokenizer (fixed, do not modify)
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

_overrides, _budget = {}, os.environ.get("AUTORESEARCH_TIME_BUDGET", "")
if _budget:  # for tests and smoke runs only
    if not re.fullmatch(r"\d+\.?\d*|\.\d+", _budget) or float(_budget) == 0:
        raise SystemExit(f"prepare.py: AUTORESEARCH_TIME_BUDGET must be a positive number of seconds, got {_budget!r}")
    TIME_BUDGET = _overrides["AUTORESEARCH_TIME_BUDGET"] = float(_budget)
if os.environ.get("AUTORESEARCH_DATA_URL") and PROFILE == "gpu":  # the cpu profile never downloads
    _overrides["AUTORESEARCH_DATA_URL"] = os.environ["AUTORESEARCH_DATA_URL"]

# two runs are comparable only if their HARNESS dicts are equal
HARNESS = {"profile": PROFILE, **PROFILES[PROFILE], "TIME_BUDGET": TIME_BUDGET, "overrides": _overrides}

if PROFILE == "cpu" and "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)  # a tiny model: on a busy 2-core machine torch's extra threads spin (2.6x slower)

BASE_URL = (os.environ.get("AUTORESEARCH_DATA_URL")
            or "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main")
VAL_SHARD = 6542                                 # pinned validation shard: the dataset's last
VAL_FILENAME = f"shard_{VAL_SHARD:05d}.parquet"  # same name in both profiles
HELDOUT_SHARD = VAL_SHARD - 1                    # held-out shard: never trained on, never the metric
HELDOUT_FILENAME = f"shard_{HELDOUT_SHARD:05d}.parquet"  # same name in both profiles
DEV_FILENAME = f"dev2_{VAL_SHARD:05d}.parquet"   # the curve's text, no pinned row's (2: renamed with its rule)
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
READ_TIMEOUT_S = 20.0       # a stalled transfer is retried


class PrepareError(RuntimeError):
    """An expected failure with a one-line message that says what to do."""


def shard_name(index):
    return f"shard_{index:05d}.parquet"


def hard_cap_s(budget, outside_ref_s=None):
    """Wall-clock seconds after which a run of train.py is stopped (the one rule, for the recorder's watchdog and
    `analyze.py run`): the budget plus the largest of the budget, 120 s, 3x the best run's seconds outside it."""
    return budget + max(budget, 120.0, 3 * (outside_ref_s or 0.0))


class ProgressLine:
    """One live line on a terminal; in a log file, a whole line every `every_s` s at most (not a megabyte of \r)."""

    def __init__(self, every_s=5.0, stream=None):
        self.every_s, self.stream, self.last = every_s, stream or sys.stdout, -math.inf
        self.live = self.stream.isatty()  # asked once: update() runs every training step

    def update(self, text, end=""):
        if self.live:
            self.stream.write("\r\033[K" + text + end)  # \033[K: erase the rest of the old line
        elif end or time.monotonic() - self.last >= self.every_s:
            self.stream.write(text + "\n")
            self.last = time.monotonic()
        self.stream.flush()  # a no-op when nothing was written

# ---------------------------------------------------------------------------
# Data and tokenizer: climbmix shards downloaded (gpu profile) or built from standard-library prose (cpu profile)
# ---------------------------------------------------------------------------

def download_shard(index, base_url, data_dir, stop):
    """Download one shard whole or not at all, retrying a failed request or a broken body with backoff; size in MB."""
    dest = Path(data_dir) / shard_name(index)
    url, tmp = f"{base_url.rstrip('/')}/{dest.name}", dest.with_name(f".{dest.name}.{os.getpid()}.part")
    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        try:
            with requests.get(url, stream=True, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S)) as r:
                r.raise_for_status()
                with open(tmp, "wb") as f:
                    for chunk in r.iter_content(chunk_size=1 << 20):
                        if stop.is_set():  # another shard failed
                            return 0.0
                        f.write(chunk)
            for _ in read_texts(tmp):  # a body cut short or an HTML error page is no shard
                pass
            os.replace(tmp, dest)
            return dest.stat().st_size / 1e6
        except requests.RequestException as e:
            reason = type(e).__name__ if e.response is None else f"HTTP {e.response.status_code}"
        except PrepareError:
            reason = "not a parquet shard with a text column"
        finally:
            tmp.unlink(missing_ok=True)
        if attempt == DOWNLOAD_ATTEMPTS or stop.wait(RETRY_BACKOFF_S * 2 ** (attempt - 1)):
            break
    raise PrepareError(f"could not download {url} ({reason}, {attempt} attempts)")


def download_data(num_shards, download_workers=8, base_url=None, data_dir=None):
    """Download training shards 0..num_shards-1 (never the held-out one) and the pinned shards, in parallel."""
    base_url, data_dir = base_url or BASE_URL, Path(data_dir or DATA_DIR)
    data_dir.mkdir(parents=True, exist_ok=True)
    ids = list(range(min(num_shards, HELDOUT_SHARD))) + [HELDOUT_SHARD, VAL_SHARD]
    todo = [i for i in ids if not (data_dir / shard_name(i)).exists()]
    print(f"Data: {len(ids) - len(todo)} of {len(ids)} shards at {data_dir}, {len(todo)} to fetch from {base_url}")
    stop = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(max(1, download_workers)) as pool:
        futures = {pool.submit(download_shard, i, base_url, data_dir, stop): i for i in todo}
        try:
            for done, future in enumerate(concurrent.futures.as_completed(futures), start=1):
                mb = future.result()  # the first failure stops every other download
                print(f"Data: {done}/{len(todo)} {shard_name(futures[future])} ({mb:,.1f} MB)", flush=True)
        finally:  # after a failure, or Ctrl-C, nothing else starts and every transfer stops
            stop.set()
            pool.shutdown(cancel_futures=True)


def _module_prose(path):
    """A module's comments and triple-quoted strings in source order; a blank line where the source had a gap."""
    text, last = "", 0
    with tokenize.open(path) as f:
        for tok in tokenize.generate_tokens(f.readline):
            docstring = tok.type == tokenize.STRING and tok.string.endswith('"""')
            if docstring or tok.type == tokenize.COMMENT:
                piece = tok.string.lstrip("rbfuRBFU")[3:-3] if docstring else tok.string.lstrip("#")
                text += ("\n\n" if tok.start[0] > last + 1 else "\n") + piece
                last = tok.end[0]
    return text


def _group_paragraphs(text, max_chars=CPU_DOC_CHARS):
    """Paragraphs that read like prose (80% letters and spaces), joined in order into documents of max_chars."""
    docs = []
    for para in re.split(r"\n\s*\n", re.sub(r"(?m)^[ \t]+", "", text)):
        para = para.strip()
        if not para or sum(c.isalpha() or c.isspace() for c in para) < 0.8 * len(para):
            continue
        if docs and len(docs[-1]) + 2 + len(para) <= max_chars:
            docs[-1] += "\n\n" + para
        else:
            docs.append(para)
    return docs


def stdlib_documents():
    """{source name: [documents]}: the standard library's docstrings and comments (tests excluded), pydoc topics."""
    from pydoc_data.topics import topics
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
    texts = {p.relative_to(root).as_posix(): _module_prose(p) for p in sorted(root.rglob("*.py"))
             if not skip & set(p.relative_to(root).parts)}
    texts.update({f"pydoc_data/topics/{key}": topics[key] for key in sorted(topics)})
    return {name: docs for name, text in texts.items() if (docs := _group_paragraphs(text))}


def split_documents(groups, num_train_shards=CPU_TRAIN_SHARDS):
    """Deterministic (training shards, val, heldout): whole sources in a seeded shuffle fill val, then heldout, to
    their fractions of the text, the rest is training; duplicate documents are dropped; each split is shuffled."""
    rng = random.Random(CPU_SEED)
    names = sorted(groups)
    rng.shuffle(names)
    total = sum(len(d) for docs in groups.values() for d in docs)
    seen, val, heldout, train = set(), [], [], []
    shares = ((val, CPU_VAL_FRACTION), (heldout, CPU_HELDOUT_FRACTION))
    for name in names:
        fresh = [d for d in dict.fromkeys(groups[name]) if d not in seen]  # each document once
        seen.update(fresh)
        next((split for split, share in shares if sum(map(len, split)) < share * total), train).extend(fresh)
    for split in (val, train, heldout):
        rng.shuffle(split)
    bounds = np.linspace(0, len(train), num_train_shards + 1).astype(int)
    return [train[a:b] for a, b in zip(bounds[:-1], bounds[1:])], val, heldout


def _write_shard(texts, dest):
    _save(dest, lambda f: pq.write_table(pa.table({"text": pa.array(texts, type=pa.string())}), f, row_group_size=1024))


def build_cpu_shards():
    """Build the cpu profile's shards unless all are there; a tokenizer trained on older ones is removed first."""
    names = [shard_name(i) for i in range(CPU_TRAIN_SHARDS)] + [VAL_FILENAME, HELDOUT_FILENAME]
    if all((DATA_DIR / n).exists() for n in names):
        print(f"Data: all {len(names)} cpu shards already at {DATA_DIR}")
        return
    t0 = time.time()
    (TOKENIZER_DIR / "tokenizer.pkl").unlink(missing_ok=True)
    train, val, heldout = split_documents(stdlib_documents())
    for name, texts in zip(names, train + [val, heldout]):
        _write_shard(texts, DATA_DIR / name)
    print(f"Data: built {len(names)} cpu shards from the standard library of Python {platform.python_version()} "
          f"in {time.time() - t0:.1f}s")


def shard_paths(split, data_dir=None):
    """The shards of a split, or PrepareError when they are missing. A pinned shard is never a training shard."""
    data_dir = Path(data_dir or DATA_DIR)
    pinned = {"val": VAL_FILENAME, "heldout": HELDOUT_FILENAME, "dev": DEV_FILENAME}
    if split == "train":
        paths = sorted(p for p in data_dir.glob("shard_*.parquet") if p.name not in pinned.values())
    else:
        paths = [data_dir / pinned[split]] if (data_dir / pinned[split]).exists() else []
    if not paths:
        raise PrepareError(f"no {pinned.get(split, 'training shard')} in {data_dir}: run `uv run prepare.py`")
    return paths


def read_texts(path):
    """Yield the `text` column of a shard one row group at a time; a broken file is a one-line PrepareError."""
    try:
        pf = pq.ParquetFile(path)
        columns = dict(zip(pf.schema_arrow.names, map(str, pf.schema_arrow.types)))
        if columns.get("text") not in ("string", "large_string"):
            raise ValueError(f"no 'text' column of strings (columns: {columns})")
        for rg in range(pf.num_row_groups):
            yield pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()
    except (pa.ArrowException, OSError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PrepareError(f"{path} is corrupt or not a parquet shard with a text column ({reason}): "
                           "delete it and re-run `uv run prepare.py`") from e


def _training_text(paths):
    nchars = 0
    for text in itertools.chain.from_iterable(texts for path in paths for texts in read_texts(path)):
        yield text[:TOKENIZER_DOC_CAP]
        nchars += min(len(text), TOKENIZER_DOC_CAP)
        if nchars >= TOKENIZER_MAX_CHARS:
            return


def train_tokenizer(data_dir=None, tokenizer_dir=None, vocab_size=None):
    """Train BPE with rustbpe on the training shards only; save a tiktoken encoding and the byte table."""
    tokenizer_dir, vocab_size = Path(tokenizer_dir or TOKENIZER_DIR), vocab_size or VOCAB_SIZE
    if (tokenizer_dir / "tokenizer.pkl").exists() and (tokenizer_dir / "token_bytes.pt").exists():
        print(f"Tokenizer: already trained at {tokenizer_dir}")
        return
    paths = shard_paths("train", data_dir)
    print(f"Tokenizer: training a {vocab_size}-token BPE on {len(paths)} training shard(s)...")
    t0 = time.time()
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(_training_text(paths), vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    ranks = {bytes(k): v for k, v in bpe.get_mergeable_ranks()}
    specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
    enc = tiktoken.Encoding(name="rustbpe", pat_str=bpe.get_pattern(), mergeable_ranks=ranks, special_tokens=specials)
    test = "Hello world! Numbers: 123456. Unicode: 你好 naïve café 🦀\n\t tabs and\r\nnewlines"
    assert enc.decode(enc.encode_ordinary(test)) == test, "tokenizer round-trip failed"
    _save(tokenizer_dir / "token_bytes.pt", lambda f: torch.save(Tokenizer(enc).token_bytes(), f))
    _save(tokenizer_dir / "tokenizer.pkl", lambda f: pickle.dump(enc, f))  # last: it means "trained"
    print(f"Tokenizer: trained in {time.time() - t0:.1f}s (vocab_size={enc.n_vocab}), saved to {tokenizer_dir}")


def _save(path, write):
    """Write a file whole or not at all, making its folder."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

# ---------------------------------------------------------------------------
# Runtime: tokenizer, token cache and packed dataloader (imported by train.py)
# ---------------------------------------------------------------------------

class Tokenizer:
    """The tiktoken encoding trained above; `fingerprint` names its token cache."""

    def __init__(self, enc, directory=None, fingerprint=""):
        self.enc, self.directory, self.fingerprint = enc, directory, fingerprint

    @classmethod
    def from_directory(cls, tokenizer_dir=None):
        path = Path(tokenizer_dir or TOKENIZER_DIR) / "tokenizer.pkl"
        try:
            blob = path.read_bytes()
            return cls(pickle.loads(blob), path.parent, hashlib.sha256(blob).hexdigest()[:16])
        except FileNotFoundError:
            raise PrepareError(f"no tokenizer at {path.parent}: run `uv run prepare.py` (profile {PROFILE})") from None
        except Exception as e:  # cut short, or not a tokenizer at all
            raise PrepareError(f"{path} is unreadable ({type(e).__name__}): delete it, run `uv run prepare.py`") from e

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_bos_token_id(self):
        return self.enc.encode_single_token(BOS_TOKEN)

    def encode(self, text, prepend=None, num_threads=8):
        """Token ids of a string, or of each string of a list; `prepend`: a special token (string or id) put first."""
        if isinstance(prepend, str):
            prepend = self.enc.encode_single_token(prepend)
        if isinstance(text, str):
            ids = self.enc.encode_ordinary(text)
            return ids if prepend is None else [prepend] + ids
        rows = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
        return rows if prepend is None else [[prepend] + row for row in rows]

    def decode(self, ids):
        return self.enc.decode(ids)

    def token_bytes(self, device="cpu"):
        """int32 (vocab_size,), the metric's bytes per token, AR's rule: the UTF-8 length of the token decoded alone
        (part of a multi-byte character decodes to U+FFFD: 3), special tokens 0. token_bytes.pt is never read back."""
        texts = (self.enc.decode([i]) for i in range(self.enc.n_vocab))
        specials = self.enc.special_tokens_set
        return torch.tensor([0 if t in specials else len(t.encode()) for t in texts], dtype=torch.int32).to(device)


def load_tokens(tokenizer, shard):
    """A shard's (tokens, memory-mapped; document offsets), tokenized once into .npy files by tokenizer fingerprint."""
    cache = shard.parent / "tokens" / tokenizer.fingerprint
    tok_path, off_path = cache / f"{shard.stem}.tokens.npy", cache / f"{shard.stem}.offsets.npy"
    # offsets are written last, so their presence means the pair is whole; a shard rebuilt since is redone
    if not (off_path.exists() and off_path.stat().st_mtime_ns >= shard.stat().st_mtime_ns):
        dtype = np.uint16 if tokenizer.get_vocab_size() <= 2**16 else np.int32
        pieces, lengths = [np.zeros(0, dtype)], [0]
        for texts in read_texts(shard):
            rows = tokenizer.encode(texts, num_threads=os.cpu_count() or 1)
            lengths += map(len, rows)
            pieces.append(np.fromiter(itertools.chain.from_iterable(rows), dtype=dtype, count=sum(map(len, rows))))
        _save(tok_path, lambda f: np.save(f, np.concatenate(pieces)))
        _save(off_path, lambda f: np.save(f, np.cumsum(lengths, dtype=np.int64)))
    return np.load(tok_path, mmap_mode="r"), np.load(off_path)


def _document_batches(tokenizer, paths, batch_docs=LOADER_BATCH_DOCS):
    """(tokens, offsets, epoch) forever: up to batch_docs documents of one row group at a time, as AR's loader reads."""
    for epoch in itertools.count(1):
        ndocs = 0
        for path in paths:
            tokens, offsets = load_tokens(tokenizer, path)
            metadata = pq.ParquetFile(path).metadata
            first = 0  # the row group's first document
            for size in (metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)):
                for a in range(first, first + size, batch_docs):
                    yield tokens, offsets[a:min(a + batch_docs, first + size) + 1], epoch
                first += size
            ndocs += first
        if ndocs == 0:
            raise PrepareError(f"no documents in {', '.join(map(str, paths))}: re-run `uv run prepare.py`")


class _DataLoader(collections.abc.Iterator):
    """(inputs, targets, epoch), int64 (B, T), over BOS-aligned best-fit packed rows, karpathy/autoresearch's row for
    row: each row takes the largest buffered document that fits (ties: the oldest), else crops the shortest to fill
    the row exactly. The buffer is kept sorted by length: a placement is a bisect, not a scan. On CUDA a batch goes
    through pinned memory: torch's pinned-memory cache reuses a buffer only once its non-blocking copy has landed."""

    def __init__(self, batches, bos, B, T, device, buffer_size=LOADER_BUFFER_DOCS):
        self.batches, self.bos, self.buffer_size, self.device = batches, bos, buffer_size, torch.device(device)
        self.lens, self.refs = [], []  # parallel lists sorted by length (BOS included); ties oldest first
        self.epoch = 1                 # epoch of the last batch of documents read
        self.loaded_docs = 0           # documents read into the buffer so far
        self.rows = np.empty((B, T + 1), dtype=np.int64)

    def _refill(self):
        while len(self.lens) < self.buffer_size:
            tokens, offsets, self.epoch = next(self.batches)
            bounds = offsets.tolist()
            self.loaded_docs += len(bounds) - 1
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
        return self.epoch

    def __next__(self):
        epoch = self.fill(self.rows)
        batch = torch.empty((2, *self.rows[:, 1:].shape), dtype=torch.long, pin_memory=self.device.type == "cuda")
        np.stack([self.rows[:, :-1], self.rows[:, 1:]], out=batch.numpy())  # targets: the rows shifted by one
        batch = batch.to(self.device, non_blocking=True)  # on the CPU the batch itself
        return batch[0], batch[1], epoch


def make_dataloader(tokenizer, B, T, split, device=None, buffer_size=LOADER_BUFFER_DOCS, data_dir=None):
    """Infinite iterator of (inputs, targets, epoch) over BOS-aligned, best-fit packed rows of T+1 tokens.
    The row sequence depends only on the split and T: the same for every B, every time."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    batches = _document_batches(tokenizer, shard_paths(split, data_dir))
    return _DataLoader(batches, tokenizer.get_bos_token_id(), B, T, device, buffer_size)


def build_dev_slice(tokenizer, data_dir=None):
    """Write DEV_FILENAME for train.py's curve: the validation documents after the last one the pinned rows' packer
    read (it is replayed). Rebuilt when the shard or the tokenizer (which decides the packing) is newer."""
    data_dir = Path(data_dir or DATA_DIR)
    val, dest, n_rows = data_dir / VAL_FILENAME, data_dir / DEV_FILENAME, EVAL_TOKENS // MAX_SEQ_LEN
    newest = max(val.stat().st_mtime_ns, (Path(tokenizer.directory) / "tokenizer.pkl").stat().st_mtime_ns)
    if dest.exists() and dest.stat().st_mtime_ns >= newest:
        return
    packer = _DataLoader(_document_batches(tokenizer, [val]), tokenizer.get_bos_token_id(), 1, MAX_SEQ_LEN, "cpu")
    for _ in range(n_rows):
        if packer.fill(packer.rows) > 1:  # around the shard and back: no document is left for the dev slice
            break
    if not (texts := list(itertools.islice(itertools.chain.from_iterable(read_texts(val)), packer.loaded_docs, None))):
        raise PrepareError(f"the validation shard {val.name} is too small for its pinned rows ({n_rows} rows of "
                           f"{MAX_SEQ_LEN} tokens, and a dev slice beside them): is the mirror climbmix's?")
    _write_shard(texts, dest)
    print(f"Dev slice: the {len(texts)} validation documents the pinned rows' packer never read, in {dest.name}")

# ---------------------------------------------------------------------------
# Evaluation (DO NOT CHANGE: this is the fixed metric)
# ---------------------------------------------------------------------------

def evaluate_bpb(model, tokenizer, batch_size):
    """THE number every experiment is judged by: bits per byte on the first EVAL_TOKENS // MAX_SEQ_LEN packed rows of
    the pinned validation shard, for any batch_size. Loss per token depends on the vocabulary, bytes of text do not:
    the summed nats of model(x, y, reduction='none') over the bytes the targets spell, as karpathy/autoresearch
    counts them. Under `analyze.py run` (AUTORESEARCH_HANDOFF set) harness/evaluate.py measures it: None here."""
    if os.environ.get("AUTORESEARCH_HANDOFF"):
        save_handoff(model, batch_size, os.environ["AUTORESEARCH_HANDOFF"])
        return None
    return _bits_per_byte(model, tokenizer, batch_size, EVAL_TOKENS // MAX_SEQ_LEN)


def evaluate_bpb_sample(model, tokenizer, batch_size, eval_tokens):
    """The same on the first eval_tokens of the dev slice (build_dev_slice): a validation curve during training
    that never reads the metric's rows. Not the metric: a final val_bpb must come from evaluate_bpb."""
    return _bits_per_byte(model, tokenizer, batch_size, eval_tokens // MAX_SEQ_LEN, "dev")


def _bits_per_byte(model, tokenizer, batch_size, n_rows, split="val"):
    """Bits per byte over the first n_rows packed rows of a split, with the model's own loss, on its weights' device."""
    device = next((p.device for p in model.parameters()), torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return bits_per_byte(lambda x, y: model(x, y, reduction="none"), tokenizer, batch_size, n_rows, device, split)


@torch.no_grad()
def bits_per_byte(token_nats, tokenizer, batch_size, n_rows, device, split="val"):
    """Bits per byte over the first n_rows packed rows of a split, token_nats(x, y) giving each target's nats:
    the metric's one implementation, for train.py's loss and the harness's (which computes nats from logits)."""
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
    """The trained model for harness/evaluate.py as a graph of torch's own operators plus its weights, so that no
    code of train.py's runs where the number is computed: model(x) for one (batch_size, MAX_SEQ_LEN) batch exported
    as eager with bf16 autocast's casts on CUDA, flex_attention as the SDPA it equals (a BlockMask cannot be saved)."""
    from torch._export.serde.serialize import serialize
    raw = getattr(model, "_orig_mod", model).eval()  # without torch.compile's wrapper; dropout and the like off
    x = torch.zeros(batch_size, MAX_SEQ_LEN, dtype=torch.long, device=next(raw.parameters()).device)
    autocast = torch.amp.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda")
    try:
        with torch.no_grad(), autocast, torch.compiler.set_stance("force_eager"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "flex_attention called without torch.compile")  # traced, never run
            program = torch.export.export(raw, (x,), strict=False).run_decompositions({})
            if any(node.target is torch.ops.higher_order.flex_attention for node in program.graph.nodes):
                sdpa = _flex_as_sdpa(program.module())
                program = torch.export.export(sdpa, (x,), strict=False).run_decompositions({})  # ATEN, as above
        graph = serialize(program).exported_program.decode()
    except Exception as e:
        reason = " ".join(str(e).split("\n")[0].split())[:200]
        raise PrepareError("cannot hand the model to the harness: torch.export of model(x) failed "
                           f"({type(e).__name__}: {reason}); keep forward(idx) one graph of torch operators returning "
                           "logits (B, T, vocab): no Python branch on a tensor's value, no .item(), .tolist() or print "
                           "of a tensor") from e
    weights = {"graph": graph, "state_dict": dict(program.state_dict), "constants": dict(program.constants)}
    _save(Path(path), lambda f: torch.save(weights, f))


def _flex_as_sdpa(module):
    """Each flex_attention call of an exported graph as scaled_dot_product_attention with the (T, T) mask its block
    mask and mask_mod compute; a score_mod, a mask by batch or head, or a used logsumexp cannot be handed off."""
    graph, masks = module.graph, {}
    for node in [n for n in graph.nodes if n.target is torch.ops.higher_order.flex_attention]:
        q, k, v, score_mod, block_mask, scale, _, score_args, mask_args = node.args
        q_len, kv_len, kv_num, kv_indices, full_num, full_indices, *_, q_block, kv_block, mask_mod = block_mask
        score_graph, mask_graph = _attr(module, score_mod).graph, _attr(module, mask_mod)
        returned = [n.args[0] for n in score_graph.nodes if n.op == "output"]
        by_batch_or_head = any(p.users for p in list(mask_graph.graph.nodes)[:2])  # mask_mod reads b or h
        if (returned != [next(iter(score_graph.nodes))] or score_args or _attr(module, kv_num).shape[:2] != (1, 1)
                or by_batch_or_head or any(user.args[1] != 0 for user in node.users)):
            raise ValueError("flex_attention with a score_mod, a per-batch or per-head mask, or its logsumexp")

        def inside(num, indices):  # (T, T): each query in a key block its query block visits
            if num is None:
                return False
            blocks = flex.BlockMask.from_kv_blocks(_attr(module, num), _attr(module, indices),
                                                   BLOCK_SIZE=(q_block, kv_block)).to_dense()[0, 0]
            return blocks.repeat_interleave(q_block, 0).repeat_interleave(kv_block, 1)[:q_len, :kv_len] > 0

        mask_fn = lambda b, h, i, j: mask_graph(b, h, i, j, *(_attr(module, a) for a in mask_args))  # noqa: E731
        computed = flex.create_mask(mask_fn, 1, 1, q_len, kv_len, q.meta["val"].device)[0, 0]
        mask = inside(full_num, full_indices) | (inside(kv_num, kv_indices) & computed)
        name = next((n for n, m in masks.items() if torch.equal(m, mask)), f"flex_mask_{len(masks)}")
        if name not in masks:
            module.register_buffer(name, mask)
            masks[name] = mask
        with graph.inserting_before(node):
            gqa = q.meta["val"].size(1) != k.meta["val"].size(1)
            attention = graph.call_function(torch.ops.aten.scaled_dot_product_attention.default,
                                            (q, k, v, graph.get_attr(name)), {"scale": scale, "enable_gqa": gqa})
        for user in list(node.users):  # getitem(node, 0): the attention's output
            user.replace_all_uses_with(attention)
            graph.erase_node(user)
        graph.erase_node(node)
    module.recompile()
    return module


def _attr(module, node):
    """What an exported graph's get_attr node names (a tensor or a subgraph); None stays None."""
    return None if node is None else operator.attrgetter(node.target)(module)

# ---------------------------------------------------------------------------
# Can this machine run the profile? (`uv run prepare.py --check`; train.py asks gpu_problem() first)
# ---------------------------------------------------------------------------

# Dense bf16 tensor-core peak FLOP/s (MFU's denominator) from NVIDIA's datasheets: a 2:4-sparse figure halved, GeForce
# at its fp32-accumulate rate. Keys are whole names less vendor, memory and socket words ("A10" never reads as "A100").
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
# GPU memory of AR's baseline: ~1 GiB of weights and optimizer state, ~0.34 GiB of activations a 2048-token row
# (his peak: 45,060 MiB at 128 rows), 10% allocator slack; --check wants room for one row
ONE_ROW_GIB, BASELINE_GIB = (1.0 + 0.336) * 1.1, (1.0 + 128 * 0.336) * 1.1
CPU_HINT = "for a small CPU run use AUTORESEARCH_PROFILE=cpu (after `AUTORESEARCH_PROFILE=cpu uv run prepare.py`)"


def peak_bf16_flops(device_name):
    """Dense bf16 peak FLOP/s of a GPU by its torch.cuda.get_device_name(), or None when unknown (MFU is then
    null, never wrong): "NVIDIA A100-SXM4-80GB" and "NVIDIA A100 80GB PCIe" are both an A100."""
    words = re.split(r"[\s\-_]+", (device_name or "").upper())
    return PEAK_BF16_FLOPS.get(" ".join(w for w in words if w and not _NAME_NOISE.fullmatch(w)))


def nvidia_driver():
    """The driver version nvidia-smi reports (not a warning it prints first), or None."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return next((v.strip() for v in out.splitlines() if re.fullmatch(r"\d+(\.\d+)+", v.strip())), None)


def gpu_problem(probe=False):
    """(exit code, one line saying what to do) for the first thing that keeps this machine from the gpu profile, or
    None: without bf16 or Triton a run times a slower program. With probe (--check) also memory and a compile."""
    if not torch.cuda.is_available():
        driver, cuda = nvidia_driver(), torch.version.cuda
        floor = MIN_DRIVER.get((cuda or "").split(".")[0])
        if driver and floor and tuple(map(int, driver.split("."))) < floor:
            return 3, (f"NVIDIA driver {driver} is too old for torch's CUDA {cuda} (needs >= "
                       f"{'.'.join(map(str, floor))}): update the NVIDIA driver")
        if cuda is None:  # e.g. Linux aarch64, where PyPI's torch has no CUDA
            return 2, f"this torch ({torch.__version__}) has no CUDA: uv.lock installs it on Linux x86_64; {CPU_HINT}"
        return 2, f"torch sees no CUDA GPU (see nvidia-smi, and CUDA_VISIBLE_DEVICES if set): {CPU_HINT}"
    try:
        name, (major, minor) = torch.cuda.get_device_name(), torch.cuda.get_device_capability()
        free_gib = torch.cuda.mem_get_info()[0] / 2**30
    except RuntimeError as e:  # listed by the driver but not usable (busy in exclusive mode, in error)
        return 2, f"torch cannot use the GPU ({str(e).strip().splitlines()[0]}): see nvidia-smi; {CPU_HINT}"
    if probe:  # --check prints what it found
        flops = peak_bf16_flops(name)
        peak = f"dense bf16 peak {flops / 1e12:g} TFLOP/s" if flops else "bf16 peak unknown: MFU will be null"
        print(f"gpu        {name}, compute capability {major}.{minor}, {free_gib:.1f} GiB free (the baseline's 128 "
              f"rows need ~{BASELINE_GIB:.0f} GiB), {peak}")
    if major < 8:
        return 2, (f"{name} (compute capability {major}.{minor}) has no bf16: the gpu profile needs an Ampere or "
                   "newer NVIDIA GPU (sm_80+); use a newer GPU or AUTORESEARCH_PROFILE=cpu")
    if importlib.util.find_spec("triton") is None:
        return 4, ("Triton is not installed, so torch.compile cannot build GPU kernels: the gpu profile needs "
                   "Linux x86_64 with torch's CUDA wheel, which brings Triton (`uv sync --locked`)")
    if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")):
        return 4, ("no C compiler ($CC, gcc or clang), which Triton needs to build its kernel launchers: "
                   "install gcc (e.g. `apt-get install gcc`) or set CC")
    if probe and free_gib < ONE_ROW_GIB:
        return 5, (f"{free_gib:.1f} GiB free on {name}, below the ~{ONE_ROW_GIB:.1f} GiB one row of the "
                   "baseline needs: stop what holds the GPU (nvidia-smi lists it) or use a larger GPU")
    if probe:  # a tiny matmul and reduction, compiled, must match eager
        def tiny(a):
            return (a @ a).float().relu().sum(dim=-1)
        print("....       compiling a tiny function on the GPU (cold caches take up to a minute)", flush=True)
        try:
            a = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
            torch.testing.assert_close(torch.compile(tiny, fullgraph=True)(a), tiny(a), rtol=1e-2, atol=1e-2)
        except Exception as e:  # whatever Inductor, Triton or the C compiler raised is the finding
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            error = next((line for line in lines if not line.startswith("backend=")), type(e).__name__)[:300]
            return 4, (f"a tiny torch.compile'd function failed on the GPU ({error}): fix the torch/Triton install "
                       "(`uv sync --locked`) or the C compiler it names")
    return None


def check():
    """`uv run prepare.py --check`: what this machine has for the profile, the verdict last; changes nothing. Exit
    0: a run can start; 1 data or tokenizer missing; 2 no usable GPU (none, no CUDA, no bf16); 3 driver too old
    for torch's CUDA; 4 torch.compile cannot build GPU kernels; 5 no GPU memory for one row (cpu profile: 0/1)."""
    settings = ", ".join(f"{k} {v}" for k, v in HARNESS.items() if k != "profile" and (k != "overrides" or v))
    print(f"profile    {PROFILE} ({settings})", flush=True)
    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
    print(f"torch      {torch.__version__}, {cuda}; NVIDIA driver {nvidia_driver() or 'unknown'}")
    blocker = gpu_problem(probe=True) if PROFILE == "gpu" else None
    env = "" if PROFILE == "gpu" else f"AUTORESEARCH_PROFILE={PROFILE} "
    try:
        paths = {split: shard_paths(split) for split in SPLITS}
        print(f"data       {len(paths['train'])} training shard(s), validation, held-out and dev in {DATA_DIR}")
        Tokenizer.from_directory()
    except PrepareError as e:
        blocker = blocker or (1, str(e).replace("`uv run prepare.py`", f"`{env}uv run prepare.py`"))
    if blocker:
        print(f"verdict: not ready: {blocker[1]}")
        return blocker[0]
    print(f"verdict: ready: `{env}uv run train.py` can start")
    return 0

# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description="Prepare data and tokenizer for auto-log-research")
    parser.add_argument("--num-shards", type=int, default=10, help="training shards (-1 = all), plus val and held-out")
    parser.add_argument("--download-workers", type=int, default=8, help="parallel downloads")
    parser.add_argument("--check", action="store_true", help="can this machine run the profile? (changes nothing)")
    args = parser.parse_args(argv)
    if args.check:
        raise SystemExit(check())
    num_shards = HELDOUT_SHARD if args.num_shards == -1 else args.num_shards  # -1: every training shard
    try:
        if num_shards < 1:
            raise PrepareError(f"--num-shards must be at least 1 (or -1 for all), got {args.num_shards}")
        print(f"Profile: {PROFILE} | cache: {DATA_DIR.parent}")
        if PROFILE == "cpu":
            build_cpu_shards()
        else:
            download_data(num_shards, args.download_workers)
        train_tokenizer()
        tokenizer = Tokenizer.from_directory()
        build_dev_slice(tokenizer)
        t0, shards = time.time(), [p for split in SPLITS for p in shard_paths(split)]
        for shard in shards:
            load_tokens(tokenizer, shard)
        print(f"Tokens: {len(shards)} shards tokenized into {DATA_DIR / 'tokens'} ({time.time() - t0:.1f}s)")
    except (PrepareError, OSError) as e:  # OSError: a full disk, a folder we may not write
        raise SystemExit(f"prepare.py: error: {e}") from None
    print("Done! Ready to train.")


if __name__ == "__main__":
    main()

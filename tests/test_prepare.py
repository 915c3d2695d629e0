"""prepare.py is the fixed harness: shards arrive whole or not at all, the tokenizer round-trips and counts
bytes as karpathy/autoresearch does, the packer never pads or invents tokens, the metric matches a hand
computation, and every data error is one clear line. Hermetic: loopback servers only,
no network. (tests/test_reference_data.py compares the same parts with figures from his own code.)"""
import contextlib
import hashlib
import http.server
import io
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import prepare  # noqa: E402

B, T = 4, 64  # small packed batches for the loader tests


def run_python(code, env=None, cwd=ROOT, timeout=120):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def shard_bytes(texts):
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": texts}), sink)
    return sink.getvalue().to_pybytes()

# ---------------------------------------------------------------------------
# cpu profile, end to end (also the data every loader and metric test below uses)
# ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def cpu_cache(cpu_prepared):
    """The cpu profile prepared for real (conftest.py): (completed process, data_dir, tokenizer_dir)."""
    out, cache = cpu_prepared
    return out, cache / "cpu" / "data", cache / "cpu" / "tokenizer"


@pytest.fixture(scope="session")
def tokenizer(cpu_cache):
    return prepare.Tokenizer.from_directory(cpu_cache[2])


def test_cpu_profile_prepares_end_to_end_without_network(cpu_cache):
    out, data_dir, tokenizer_dir = cpu_cache
    assert out.returncode == 0, f"prepare.py failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    names = sorted(p.name for p in data_dir.glob("shard_*.parquet"))
    expected = [prepare.shard_name(i) for i in range(prepare.CPU_TRAIN_SHARDS)] + [prepare.HELDOUT_FILENAME,
                                                                                  prepare.VAL_FILENAME]
    assert names == expected, f"cpu shards: {names}"
    assert (tokenizer_dir / "tokenizer.pkl").exists() and (tokenizer_dir / "token_bytes.pt").exists()
    assert not (data_dir.parent.parent / "data").exists(), "cpu profile wrote into the gpu cache"
    tok = prepare.Tokenizer.from_directory(tokenizer_dir)
    assert tok.get_vocab_size() == prepare.PROFILES["cpu"]["VOCAB_SIZE"]


def test_cpu_profile_rerun_does_no_work_twice(cpu_cache):
    _, data_dir, _ = cpu_cache
    before = {p: p.stat().st_mtime_ns for p in data_dir.rglob("*") if p.is_file()}
    env = {"AUTORESEARCH_PROFILE": "cpu", "AUTORESEARCH_CACHE": str(data_dir.parent.parent)}
    out = run_python("import prepare; prepare.main([])", env=env)
    assert out.returncode == 0, out.stderr
    assert "already" in out.stdout, out.stdout
    after = {p: p.stat().st_mtime_ns for p in data_dir.rglob("*") if p.is_file()}
    assert after == before, "re-running prepare.py rewrote files"


def test_cpu_validation_shard_holds_the_eval_set_without_repeating(cpu_cache, tokenizer):
    _, data_dir, _ = cpu_cache
    tokens, _ = prepare.load_tokens(tokenizer, data_dir / prepare.VAL_FILENAME)
    need = prepare.PROFILES["cpu"]["EVAL_TOKENS"]
    assert len(tokens) > 1.5 * need, f"val shard has {len(tokens)} tokens for EVAL_TOKENS={need}"


def documents_by_split(data_dir):
    return {split: {text for path in prepare.shard_paths(split, data_dir) for chunk in prepare.read_texts(path)
                    for text in chunk} for split in prepare.SPLITS}


def test_cpu_held_out_shard_holds_its_tokens_and_shares_no_document_with_train_or_val(cpu_cache, tokenizer):
    _, data_dir, _ = cpu_cache
    tokens, _ = prepare.load_tokens(tokenizer, data_dir / prepare.HELDOUT_FILENAME)
    need = prepare.PROFILES["cpu"]["EVAL_TOKENS"]  # the cpu profile's HELDOUT_TOKENS
    assert len(tokens) > 1.5 * need, f"held-out shard has {len(tokens)} tokens for HELDOUT_TOKENS={need}"
    docs = documents_by_split(data_dir)
    assert prepare.shard_paths("heldout", data_dir) == [data_dir / prepare.HELDOUT_FILENAME]
    assert data_dir / prepare.HELDOUT_FILENAME not in prepare.shard_paths("train", data_dir)
    for other in ("train", "val"):
        shared = docs["heldout"] & docs[other]
        assert not shared, f"{len(shared)} of {len(docs['heldout'])} held-out documents are also in {other}"


def test_held_out_rows_come_from_the_held_out_shard(cpu_cache, tokenizer):
    data_dir = cpu_cache[1]
    heldout = {tuple(ids) for chunk in prepare.read_texts(data_dir / prepare.HELDOUT_FILENAME)
               for ids in tokenizer.encode(chunk)}
    x, y, _ = next(prepare.make_dataloader(tokenizer, B, T, "heldout", device="cpu", data_dir=data_dir))
    bos = tokenizer.get_bos_token_id()
    for row in rows_of(x, y).tolist():
        starts = [i for i, t in enumerate(row) if t == bos]
        whole = [tuple(row[a + 1:b]) for a, b in zip(starts, starts[1:])]  # every segment but the row's last
        assert all(seg in heldout for seg in whole), "a held-out row holds a document of another shard"


def test_stdlib_shards_are_deterministic_and_split_by_module():
    _, paths = prepare._stdlib_sources()
    subset = paths[::25]  # a spread of modules keeps this fast
    first = prepare.split_documents(prepare.stdlib_documents(subset), num_train_shards=2)
    second = prepare.split_documents(prepare.stdlib_documents(subset), num_train_shards=2)
    assert first == second, "the same standard library gave different shards"
    train, val, heldout = first
    assert val and heldout and all(train), \
        f"empty split: val {len(val)}, heldout {len(heldout)}, train {[len(t) for t in train]}"
    splits = {"train": {d for shard in train for d in shard}, "val": set(val), "heldout": set(heldout)}
    for a, b in (("train", "val"), ("train", "heldout"), ("val", "heldout")):
        assert not splits[a] & splits[b], f"{len(splits[a] & splits[b])} documents in both {a} and {b}"


def test_the_held_out_split_leaves_validation_as_it_was():
    _, paths = prepare._stdlib_sources()
    groups = prepare.stdlib_documents(paths[::25])
    train, val, heldout = prepare.split_documents(groups, num_train_shards=2)
    before_train, before_val, none = prepare.split_documents(groups, num_train_shards=2, heldout_fraction=0)
    assert val == before_val, "carving out the held-out shard changed the validation rows"
    assert none == [] and {d for s in before_train for d in s} == {d for s in train for d in s} | set(heldout)


def test_a_cpu_cache_built_before_the_held_out_shard_gets_it_and_a_fresh_tokenizer(tmp_path):
    _, paths = prepare._stdlib_sources()
    subset = paths[::25]
    data, tok = tmp_path / "data", tmp_path / "tokenizer"
    old_train, old_val, _ = prepare.split_documents(prepare.stdlib_documents(subset), heldout_fraction=0)
    data.mkdir(), tok.mkdir()
    for i, texts in enumerate(old_train):  # what the cpu profile built before: training held every other module
        prepare._write_shard(texts, data / prepare.shard_name(i))
    prepare._write_shard(old_val, data / prepare.VAL_FILENAME)
    (tok / "tokenizer.pkl").write_bytes(b"trained on the old training shards")
    prepare.build_cpu_shards(data, paths=subset, tokenizer_dir=tok)
    docs = documents_by_split(data)
    assert docs["heldout"] and not docs["heldout"] & docs["train"], "the training shards still hold held-out text"
    assert [t for chunk in prepare.read_texts(data / prepare.VAL_FILENAME) for t in chunk] == old_val
    assert not (tok / "tokenizer.pkl").exists(), "a tokenizer trained on the old training shards survived"
    before = {p: p.stat().st_mtime_ns for p in data.iterdir()}
    prepare.build_cpu_shards(data, paths=subset, tokenizer_dir=tok)
    assert {p: p.stat().st_mtime_ns for p in data.iterdir()} == before, "a complete cache was rebuilt"

# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

UNICODE_TEXTS = ["Hello world! Numbers: 1234567.", "naïve café, Straße, 你好世界, emoji 🦀🚀, ∑ x²",
                 "  tabs\tand\r\nnewlines\n\n", "", "a" * 500]


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_tokenizer_round_trips_and_token_bytes_count_as_the_reference_does(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    utf8 = len(text.encode("utf-8"))
    exact = int(tokenizer.exact_token_bytes()[ids].sum()) if ids else 0
    assert exact == utf8, f"exact token bytes {exact} != utf-8 bytes {utf8}"
    # the metric's rule: each token decoded alone, so part of a character counts as U+FFFD (3 bytes)
    counted = int(tokenizer.token_bytes()[ids].sum()) if ids else 0
    assert counted == sum(len(tokenizer.decode([i]).encode("utf-8")) for i in ids)
    assert counted == utf8 if text.isascii() else counted >= utf8, f"metric bytes {counted}, utf-8 bytes {utf8}"


def test_a_token_holding_part_of_a_character_counts_three_bytes(tokenizer):
    # a lone byte of a multi-byte character decodes to U+FFFD: 3 bytes in the metric, 1 raw byte
    for b in (0x80, 0xE4, 0xF0):
        i = tokenizer.enc.encode_single_token(bytes([b]))
        assert (int(tokenizer.token_bytes()[i]), int(tokenizer.exact_token_bytes()[i])) == (3, 1), f"byte {b:#x}"


def test_a_stale_token_bytes_file_is_rewritten_on_load(cpu_cache, tmp_path, capsys):
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "tokenizer.pkl").write_bytes((cpu_cache[2] / "tokenizer.pkl").read_bytes())
    tokenizer = prepare.Tokenizer.from_directory(tok_dir)
    want = tokenizer.token_bytes()
    assert torch.equal(torch.load(tok_dir / "token_bytes.pt"), want), "a missing table was not written"
    # an earlier version's raw-byte counts, another dtype, another size, a damaged file
    for stale in (tokenizer.exact_token_bytes(), want.long(), want[:-1], None):
        if stale is None:
            (tok_dir / "token_bytes.pt").write_bytes(b"not a tensor")
        else:
            torch.save(stale, tok_dir / "token_bytes.pt")
        capsys.readouterr()
        prepare.Tokenizer.from_directory(tok_dir)
        on_disk = torch.load(tok_dir / "token_bytes.pt")
        assert on_disk.dtype == torch.int32 and torch.equal(on_disk, want), "a stale token_bytes.pt survived a load"
        assert "rewrote" in capsys.readouterr().out
    before = (tok_dir / "token_bytes.pt").stat().st_mtime_ns
    prepare.Tokenizer.from_directory(tok_dir)
    assert (tok_dir / "token_bytes.pt").stat().st_mtime_ns == before, "an up-to-date table was rewritten"


def test_token_bytes_are_zero_exactly_for_special_tokens(tokenizer):
    table = tokenizer.token_bytes()
    special = [tokenizer.enc.encode_single_token(s) for s in prepare.SPECIAL_TOKENS]
    assert special[0] == tokenizer.get_bos_token_id()
    assert table.shape == (tokenizer.get_vocab_size(),)
    assert table[special].tolist() == [0] * len(special)
    nonzero = int((table > 0).sum())
    assert nonzero == tokenizer.get_vocab_size() - len(special), f"{nonzero} tokens with bytes"


def test_encode_prepends_a_special_token_given_by_name_or_id(tokenizer):
    bos = tokenizer.get_bos_token_id()
    plain = tokenizer.encode(["one doc", "two docs"])
    assert tokenizer.encode(["one doc", "two docs"], prepend=prepare.BOS_TOKEN) == [[bos] + r for r in plain]
    assert tokenizer.encode("one doc", prepend=bos) == [bos] + plain[0]


def test_split_pattern_is_gpt4s_with_numbers_in_groups_of_one_or_two(tokenizer):
    assert tokenizer.enc._pat_str == prepare.SPLIT_PATTERN
    digits = [tokenizer.decode([i]) for i in tokenizer.encode("1234567")]
    assert "".join(digits) == "1234567" and all(len(d) <= 2 for d in digits), digits


def test_tokenizer_learns_from_training_shards_only(tmp_path):
    train_word, val_word = "quokkaberry", "zyzzogeton"
    pq.write_table(pa.table({"text": [f"the {train_word} grows here. " * 40] * 30}), tmp_path / "shard_00000.parquet")
    pq.write_table(pa.table({"text": [f"a {val_word} hums there. " * 40] * 30}), tmp_path / prepare.VAL_FILENAME)
    prepare.train_tokenizer(tmp_path, tmp_path / "tok", vocab_size=320)
    tok = prepare.Tokenizer.from_directory(tmp_path / "tok")
    n_train, n_val = len(tok.encode(" " + train_word)), len(tok.encode(" " + val_word))
    assert n_train <= 2 and n_val >= 5, \
        f"' {train_word}' (training text) -> {n_train} tokens, ' {val_word}' (validation only) -> {n_val} tokens"


def test_missing_tokenizer_says_to_run_prepare(tmp_path):
    with pytest.raises(prepare.PrepareError, match=r"uv run prepare\.py"):
        prepare.Tokenizer.from_directory(tmp_path)

# ---------------------------------------------------------------------------
# Packer and loader
# ---------------------------------------------------------------------------

def rows_of(inputs, targets):
    return torch.cat([inputs[:, :1], targets], dim=1)  # (B, T+1)


def test_packed_rows_start_with_bos_and_targets_are_inputs_shifted(cpu_cache, tokenizer):
    loader = prepare.make_dataloader(tokenizer, B, T, "train", device="cpu", data_dir=cpu_cache[1])
    for _ in range(20):
        x, y, epoch = next(loader)
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
        assert (x[:, 0] == tokenizer.get_bos_token_id()).all(), f"first tokens {x[:, 0].tolist()}"
        assert torch.equal(x[:, 1:], y[:, :-1]), "targets are not inputs shifted by one"
        assert epoch == 1


def test_every_packed_token_comes_from_a_real_document(cpu_cache, tokenizer):
    data_dir = cpu_cache[1]
    docs = {}  # first token -> documents of shard 0, the shard these first batches come from
    for texts in prepare.read_texts(data_dir / prepare.shard_name(0)):
        for ids in tokenizer.encode(texts):
            docs.setdefault(ids[0], []).append(ids)
    bos = tokenizer.get_bos_token_id()
    loader = prepare.make_dataloader(tokenizer, B, T, "train", device="cpu", data_dir=data_dir)
    for _ in range(10):
        for row in rows_of(*next(loader)[:2]).tolist():
            starts = [i for i, t in enumerate(row) if t == bos]
            assert starts[0] == 0
            for k, (a, b) in enumerate(zip(starts, starts[1:] + [len(row)])):
                seg, last = row[a + 1:b], b == len(row)
                # a segment is a whole document; only the one that ends a row may be cropped
                ok = (last and not seg) or any(d == seg or (last and d[:len(seg)] == seg) for d in docs.get(seg[0], []))
                assert ok, f"segment {k} of {len(seg)} tokens is not {'a prefix of ' if last else ''}a document"


def test_loader_is_deterministic_and_independent_of_batch_size(cpu_cache, tokenizer):
    def rows(b, n):
        ld = prepare.make_dataloader(tokenizer, b, T, "val", device="cpu", data_dir=cpu_cache[1])
        return torch.cat([rows_of(*next(ld)[:2]) for _ in range(n)])
    a, again, halves = rows(4, 6), rows(4, 6), rows(2, 12)
    assert torch.equal(a, again), "two val loaders gave different batches"
    assert torch.equal(a, halves), "the packed rows depend on the batch size"


def linear_scan_best_fit(batches, capacity, buffer_size, n_rows):
    """karpathy/autoresearch's packing, as a plain linear scan over a list: whenever the buffer holds fewer
    than buffer_size documents it takes in a whole batch; largest fit first (earliest on ties), else the
    shortest (earliest) is cropped. Returns each row as [(document index, tokens placed)]."""
    stream, buf, out = iter(batches), [], []
    for _ in range(n_rows):
        row, pos = [], 0
        while pos < capacity:
            while len(buf) < buffer_size:
                buf.extend(next(stream))
            fits = [k for k, (_, n) in enumerate(buf) if n <= capacity - pos]
            k = (max(fits, key=lambda k: (buf[k][1], -k)) if fits
                 else min(range(len(buf)), key=lambda k: (buf[k][1], k)))
            doc, n = buf.pop(k)
            row.append((doc, min(n, capacity - pos)))
            pos += row[-1][1]
        out.append(row)
    return out


def test_best_fit_packer_matches_a_linear_scan_that_refills_a_batch_at_a_time():
    rng = random.Random(0)
    lengths = [rng.randint(2, 90) for _ in range(5000)]  # BOS included; many ties
    sizes = [rng.randint(1, 12) for _ in range(5000)]    # documents per batch, as row groups cut them
    capacity, buffer_size, n_rows = 65, 50, 300
    # document i holds the ids 1000*i+1, 1000*i+2, ...: every placed token names its document and position
    tokens = np.concatenate([np.arange(1000 * i + 1, 1000 * i + n, dtype=np.int64) for i, n in enumerate(lengths)])
    offsets = np.concatenate([[0], np.cumsum([n - 1 for n in lengths])])
    starts = np.cumsum([0] + sizes)
    batches = [range(a, min(b, len(lengths))) for a, b in zip(starts[:-1], starts[1:]) if a < len(lengths)]
    packer = prepare._BestFitPacker(((tokens, offsets[b.start:b.stop + 1], 1) for b in batches), bos=0,
                                    buffer_size=buffer_size)
    rows = np.empty((n_rows, capacity), dtype=np.int64)
    packer.fill(rows)
    expected = linear_scan_best_fit(([(i, lengths[i]) for i in b] for b in batches), capacity, buffer_size, n_rows)
    for r, (row, want) in enumerate(zip(rows, expected)):
        got = []
        for seg in np.split(row, np.flatnonzero(row == 0))[1:]:  # each segment starts with its BOS
            doc = want[len(got)][0] if len(seg) == 1 else int(seg[1]) // 1000
            assert (seg[1:] == np.arange(1000 * doc + 1, 1000 * doc + len(seg))).all(), f"row {r}: tokens out of order"
            got.append((doc, len(seg)))
        assert got == want, f"row {r}: placed {got}, the linear-scan reference placed {want}"
    crop = packer.cropped_tokens / packer.taken_tokens
    assert 0 < crop < 0.5, f"crop fraction {crop:.3f}"


def test_loader_reads_batches_of_at_most_128_documents_within_a_row_group(tmp_path, tokenizer):
    texts = [f"document {i}" for i in range(700)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "shard_00000.parquet", row_group_size=300)
    pq.write_table(pa.table({"text": texts[:5]}), tmp_path / prepare.VAL_FILENAME)
    batches = prepare._document_batches(tokenizer, prepare.shard_paths("train", tmp_path))
    sizes = [(len(next(batches)[1]) - 1) for _ in range(8)]
    assert sizes == [128, 128, 44, 128, 128, 44, 100, 128], sizes  # row groups of 300, 300, 100; then epoch 2
    assert next(batches)[2] == 2


def test_a_split_without_documents_is_a_clear_error(tmp_path, tokenizer):
    pq.write_table(pa.table({"text": pa.array([], type=pa.string())}), tmp_path / "shard_00000.parquet")
    (tmp_path / prepare.VAL_FILENAME).write_bytes(shard_bytes(["validation text"]))
    with pytest.raises(prepare.PrepareError, match="no documents"):
        next(prepare.make_dataloader(tokenizer, B, T, "train", device="cpu", data_dir=tmp_path))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_loader_gives_the_same_batches_as_cpu_while_copies_overlap(cpu_cache, tokenizer):
    cpu = prepare.make_dataloader(tokenizer, 8, T, "train", device="cpu", data_dir=cpu_cache[1])
    gpu = prepare.make_dataloader(tokenizer, 8, T, "train", device="cuda", data_dir=cpu_cache[1])
    torch.cuda._sleep(2_000_000_000)  # hold the stream (~1 s): every copy queued below is still in flight
    held = [next(gpu) for _ in range(3 * prepare.PINNED_SLOTS)]  # keep every batch alive, reuse every slot
    for i, (x, y, _) in enumerate(held):
        cx, cy, _ = next(cpu)
        assert x.is_cuda and torch.equal(x.cpu(), cx) and torch.equal(y.cpu(), cy), f"batch {i} differs"

# ---------------------------------------------------------------------------
# The metric
# ---------------------------------------------------------------------------

class UniformModel(torch.nn.Module):
    """Uniform logits over V tokens: every token costs ln(V) nats."""

    def __init__(self, vocab_size, flat=False):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.zeros(vocab_size))
        self.flat = flat

    def forward(self, x, y, reduction="mean"):
        logits = self.logits.expand(*y.shape, -1)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none")
        return loss if self.flat else loss.view_as(y)


class TokenCostModel(torch.nn.Module):
    """A made-up per-token cost that depends on the target id, so different rows give different numbers."""

    def forward(self, x, y, reduction="mean"):
        return (y % 7).float() * 0.25 + 0.5


EVAL_T = 256  # the cpu profile's context: rows hold several documents, so BOS shows up among targets


EVAL_ROWS = 12  # rows in the small eval set


@pytest.fixture
def small_eval(monkeypatch, cpu_cache):
    monkeypatch.setattr(prepare, "DATA_DIR", cpu_cache[1])
    monkeypatch.setattr(prepare, "MAX_SEQ_LEN", EVAL_T)
    monkeypatch.setattr(prepare, "EVAL_TOKENS", EVAL_ROWS * EVAL_T)
    monkeypatch.setattr(prepare, "_METRIC_RESULTS", {})


@pytest.mark.parametrize("flat", [False, True])
def test_evaluate_bpb_of_uniform_logits_is_log2_vocab_times_tokens_over_bytes(small_eval, tokenizer, flat):
    batch_size, steps = 4, 3
    V = tokenizer.get_vocab_size()
    bpb = prepare.evaluate_bpb(UniformModel(V, flat), tokenizer, batch_size)
    # by hand: the same val rows, bytes from each token's own byte string, special tokens skipped
    loader = prepare.make_dataloader(tokenizer, batch_size, EVAL_T, "val", device="cpu")
    specials = {tokenizer.enc.encode_single_token(s) for s in prepare.SPECIAL_TOKENS}
    ntokens = nbytes = exact_bytes = nspecial = 0
    for _ in range(steps):
        for t in next(loader)[1].reshape(-1).tolist():
            if t in specials:
                nspecial += 1
                continue
            ntokens += 1
            nbytes += len(tokenizer.decode([t]).encode("utf-8"))  # karpathy/autoresearch's rule
            exact_bytes += len(tokenizer.enc.decode_single_token_bytes(t))
    expected = math.log2(V) * ntokens / nbytes
    assert nspecial > 0, "no BOS among the targets: the exclusion of special tokens went untested"
    assert bpb == pytest.approx(expected, rel=1e-6), \
        f"bpb {bpb:.6f} != log2({V}) x {ntokens} / {nbytes} = {expected:.6f}"
    assert prepare.exact_bytes_bpb(bpb) == pytest.approx(math.log2(V) * ntokens / exact_bytes, rel=1e-6)


def test_evaluate_bpb_uses_the_same_val_rows_every_time_for_any_batch_size(small_eval, tokenizer):
    model = TokenCostModel()
    a = prepare.evaluate_bpb(model, tokenizer, 4)
    b = prepare.evaluate_bpb(model, tokenizer, 4)
    # 12 rows: 5 and 8 leave a short last batch, whose extra rows must count in neither sum
    others = {bs: prepare.evaluate_bpb(model, tokenizer, bs) for bs in (2, 5, 8)}
    assert a == b and all(v == pytest.approx(a, rel=1e-12) for v in others.values()), \
        f"bpb {a!r}, again {b!r}, at other batch sizes {others}"
    more = prepare.evaluate_bpb_sample(model, tokenizer, 4, (EVAL_ROWS + 4) * EVAL_T)
    assert more != pytest.approx(a, rel=1e-9), "four more rows did not change the number: rows are not counted"


def test_evaluate_bpb_sample_is_the_metric_on_a_prefix_of_the_same_rows(small_eval, tokenizer):
    model = TokenCostModel()
    full = prepare.evaluate_bpb(model, tokenizer, 4)
    assert prepare.evaluate_bpb_sample(model, tokenizer, 3, EVAL_ROWS * EVAL_T) == pytest.approx(full, rel=1e-12)
    with pytest.raises(ValueError, match="less than one row"):
        prepare.evaluate_bpb_sample(model, tokenizer, 8, EVAL_T - 1)


def test_a_final_val_bpb_must_come_from_evaluate_bpb(small_eval, tokenizer, tmp_path):
    from harness.record import RunRecorder
    bpb = prepare.evaluate_bpb(TokenCostModel(), tokenizer, 4)
    sample = prepare.evaluate_bpb_sample(TokenCostModel(), tokenizer, 4, 2 * EVAL_T)
    (tmp_path / "ok").mkdir(), (tmp_path / "sample").mkdir()
    with RunRecorder({}, out_dir=tmp_path / "ok", hard_cap_s=60) as run:
        run.finish(val_bpb=bpb)
    ok = json.loads((tmp_path / "ok" / "run_summary.json").read_text())
    assert run.exit_code == 0 and ok["val_bpb_exact_bytes"] == prepare.exact_bytes_bpb(bpb) is not None, ok
    with RunRecorder({}, out_dir=tmp_path / "sample", hard_cap_s=60) as run:
        run.finish(val_bpb=sample)
    s = json.loads((tmp_path / "sample" / "run_summary.json").read_text())
    assert s["status"] == "crash" and s["val_bpb"] is None and "prepare.evaluate_bpb" in s["error"], s

# ---------------------------------------------------------------------------
# Broken data: clear one-line errors
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("content", [b"", b"<html>502 Bad Gateway</html>", shard_bytes(["ok"])[:-20],
                                     "no_text_column", "int_text_column"],
                         ids=["empty", "html", "truncated", "no_text", "int_text"])
def test_corrupt_shard_names_the_file_and_says_delete_and_rerun(tmp_path, tokenizer, content):
    if content == "no_text_column":
        pq.write_table(pa.table({"body": ["x"]}), tmp_path / "shard_00000.parquet")
    elif content == "int_text_column":
        pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "shard_00000.parquet")
    else:
        (tmp_path / "shard_00000.parquet").write_bytes(content)
    (tmp_path / prepare.VAL_FILENAME).write_bytes(shard_bytes(["validation text"]))
    with pytest.raises(prepare.PrepareError) as err:
        next(prepare.make_dataloader(tokenizer, B, T, "train", device="cpu", data_dir=tmp_path))
    msg = str(err.value)
    assert "shard_00000.parquet" in msg and "delete it and re-run" in msg and "\n" not in msg, msg


def test_fewer_than_one_training_shard_plus_validation_is_a_clear_error(tmp_path):
    (tmp_path / prepare.VAL_FILENAME).write_bytes(shard_bytes(["validation text"]))
    with pytest.raises(prepare.PrepareError, match="need at least 1 training shard"):
        prepare.train_tokenizer(tmp_path, tmp_path / "tok", vocab_size=300)
    (tmp_path / prepare.VAL_FILENAME).unlink()
    (tmp_path / "shard_00000.parquet").write_bytes(shard_bytes(["training text"]))
    with pytest.raises(prepare.PrepareError, match="no validation shard"):
        prepare.shard_paths("val", tmp_path)


def test_cli_refuses_zero_shards_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(["--num-shards", "0"])
    msg = str(exit_info.value.code)
    assert msg.startswith("prepare.py: error:") and "\n" not in msg, msg

# ---------------------------------------------------------------------------
# Download: loopback mirrors
# ---------------------------------------------------------------------------

SERVED = {prepare.shard_name(i): shard_bytes([f"document {i}.{j} " * 20 for j in range(50)])
          for i in (0, 1, 2, prepare.HELDOUT_SHARD, prepare.VAL_SHARD)}


class Mirror(http.server.BaseHTTPRequestHandler):
    mode = "good"        # good | fail_first | truncate | html | empty | missing
    fail_first = 2       # 503 answers before the real one, per file
    hits = {}            # file name -> requests

    def do_GET(self):
        name = self.path.rsplit("/", 1)[-1]
        n = Mirror.hits[name] = Mirror.hits.get(name, 0) + 1
        body = SERVED.get(name)
        if body is None or self.mode == "missing":
            return self.send_error(404)
        if self.mode == "fail_first" and n <= self.fail_first:
            return self.send_error(503)
        if self.mode == "html":
            body = b"<html><body>rate limited</body></html>"
        if self.mode == "empty":
            body = b""
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:len(body) // 2] if self.mode == "truncate" else body)

    def log_message(self, *args):
        pass


@pytest.fixture
def mirror():
    Mirror.hits = {}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Mirror)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/data"
    server.shutdown()
    server.server_close()
    Mirror.mode = "good"


def leftovers(data_dir):
    return sorted(p.name for p in data_dir.iterdir()) if data_dir.exists() else []


def test_download_gets_whole_shards_and_a_rerun_downloads_nothing(mirror, tmp_path):
    prepare.download_data(2, download_workers=3, base_url=mirror, data_dir=tmp_path, backoff_s=0.01)
    names = [prepare.shard_name(0), prepare.shard_name(1), prepare.HELDOUT_FILENAME, prepare.VAL_FILENAME]
    assert leftovers(tmp_path) == sorted(names)
    for name in names:
        assert (tmp_path / name).read_bytes() == SERVED[name], f"{name} differs from what was served"
    before = sum(Mirror.hits.values())
    prepare.download_data(2, download_workers=3, base_url=mirror, data_dir=tmp_path, backoff_s=0.01)
    assert sum(Mirror.hits.values()) == before, "re-running downloaded again"
    assert prepare.shard_paths("train", tmp_path) == [tmp_path / n for n in names[:2]], "a pinned shard is trained on"


def test_a_cache_missing_only_the_held_out_shard_downloads_just_that(mirror, tmp_path):
    prepare.download_data(2, download_workers=3, base_url=mirror, data_dir=tmp_path, backoff_s=0.01)
    (tmp_path / prepare.HELDOUT_FILENAME).unlink()  # a cache made before the held-out shard existed
    with pytest.raises(prepare.PrepareError, match=r"no held-out shard .* run `uv run prepare\.py`") as err:
        prepare.shard_paths("heldout", tmp_path)
    assert "\n" not in str(err.value)
    Mirror.hits = {}
    prepare.download_data(2, download_workers=3, base_url=mirror, data_dir=tmp_path, backoff_s=0.01)
    assert Mirror.hits == {prepare.HELDOUT_FILENAME: 1}, Mirror.hits
    assert (tmp_path / prepare.HELDOUT_FILENAME).read_bytes() == SERVED[prepare.HELDOUT_FILENAME]



def test_download_retries_5xx_answers_then_succeeds(mirror, tmp_path):
    Mirror.mode = "fail_first"
    prepare.download_data(1, download_workers=2, base_url=mirror, data_dir=tmp_path, backoff_s=0.01)
    assert (tmp_path / prepare.shard_name(0)).read_bytes() == SERVED[prepare.shard_name(0)]
    assert Mirror.hits[prepare.shard_name(0)] == Mirror.fail_first + 1, Mirror.hits


@pytest.mark.parametrize("mode", ["truncate", "html", "empty"])
def test_a_body_that_is_not_a_whole_shard_never_becomes_one(mirror, tmp_path, mode):
    Mirror.mode = mode
    with pytest.raises(prepare.PrepareError, match=r"could not download http://127\.0\.0\.1:\d+/data/shard_"):
        prepare.download_data(1, download_workers=2, base_url=mirror, data_dir=tmp_path, backoff_s=0.01)
    assert leftovers(tmp_path) == [], f"left behind: {leftovers(tmp_path)}"
    assert max(Mirror.hits.values()) == prepare.DOWNLOAD_ATTEMPTS, Mirror.hits


def test_a_missing_file_fails_without_retrying(mirror, tmp_path):
    Mirror.mode = "missing"
    with pytest.raises(prepare.PrepareError, match="HTTP 404"):
        prepare.download_data(1, download_workers=1, base_url=mirror, data_dir=tmp_path, backoff_s=0.01)
    assert set(Mirror.hits.values()) == {1}, f"a 404 was retried: {Mirror.hits}"
    assert leftovers(tmp_path) == []


def test_unreachable_mirror_ends_with_a_one_line_error_naming_the_url(monkeypatch, tmp_path, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/mirror"
    for name, value in {"PROFILE": "gpu", "DATA_DIR": tmp_path / "data", "TOKENIZER_DIR": tmp_path / "tok",
                        "BASE_URL": url, "RETRY_BACKOFF_S": 0.01}.items():
        monkeypatch.setattr(prepare, name, value)
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(["--num-shards", "2"])
    msg = str(exit_info.value.code)
    assert msg.startswith("prepare.py: error: could not download " + url) and "\n" not in msg, msg
    assert leftovers(tmp_path / "data") == [], f"left behind: {leftovers(tmp_path / 'data')}"


def test_a_mirror_that_accepts_but_never_answers_gives_up_after_the_deadline(monkeypatch, tmp_path):
    with socket.socket() as server:  # accepts connections (the kernel's backlog) and never says a word
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        url = f"http://127.0.0.1:{server.getsockname()[1]}/mirror"
        monkeypatch.setattr(prepare, "READ_TIMEOUT_S", 0.5)
        monkeypatch.setattr(prepare, "GIVE_UP_S", 2.0)
        with pytest.raises(prepare.PrepareError, match="could not download " + url) as err:
            prepare.download_data(1, download_workers=2, base_url=url, data_dir=tmp_path, backoff_s=0.2)
    attempts = int(re.search(r"(\d+) attempts", str(err.value)).group(1))
    assert attempts < prepare.DOWNLOAD_ATTEMPTS, f"{attempts} attempts: retries went on past GIVE_UP_S=2s"
    assert leftovers(tmp_path) == [], f"left behind: {leftovers(tmp_path)}"


def test_the_download_deadline_is_about_a_minute():
    worst_attempt = prepare.CONNECT_TIMEOUT_S * 2 + prepare.READ_TIMEOUT_S  # two addresses, then a stall
    assert prepare.GIVE_UP_S + worst_attempt <= 120 and prepare.GIVE_UP_S <= 60, \
        f"a dead mirror may take {prepare.GIVE_UP_S + worst_attempt:.0f}s to report"

# ---------------------------------------------------------------------------
# Profiles and harness constants
# ---------------------------------------------------------------------------

def test_gpu_profile_prepares_end_to_end_from_a_local_mirror(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    import local_mirror  # the mirror a GPU box without internet uses
    names = local_mirror.build_shards(tmp_path / "mirror", train_shards=2)
    server = local_mirror.make_server(tmp_path / "mirror")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        env = {"AUTORESEARCH_PROFILE": "gpu", "AUTORESEARCH_CACHE": str(tmp_path / "cache"),
               "AUTORESEARCH_DATA_URL": url}
        out = run_python("import prepare; prepare.main(['--num-shards', '2'])", env=env, timeout=300)
    finally:
        server.shutdown()
        server.server_close()
    assert out.returncode == 0, f"prepare.py (gpu profile, local mirror) failed:\n{out.stdout}\n{out.stderr}"
    data = tmp_path / "cache" / "data"
    assert sorted(p.name for p in data.glob("shard_*.parquet")) == sorted(names)
    for name in names:
        assert (data / name).read_bytes() == (tmp_path / "mirror" / name).read_bytes(), f"{name} differs"
    tok = prepare.Tokenizer.from_directory(tmp_path / "cache" / "tokenizer")
    assert tok.get_vocab_size() == prepare.PROFILES["gpu"]["VOCAB_SIZE"] == 8192


def test_profiles_use_separate_caches_and_record_overrides(tmp_path):
    code = """
        import json, prepare
        paths = {"data": str(prepare.DATA_DIR), "tok": str(prepare.TOKENIZER_DIR)}
        print(json.dumps({**paths, "harness": prepare.HARNESS, "heldout_tokens": prepare.HELDOUT_TOKENS}))
    """
    env = {"AUTORESEARCH_CACHE": str(tmp_path), "AUTORESEARCH_PROFILE": "cpu", "AUTORESEARCH_TIME_BUDGET": "12.5"}
    out = run_python(code, env=env)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["data"] == str(tmp_path / "cpu" / "data") and got["tok"] == str(tmp_path / "cpu" / "tokenizer")
    assert got["harness"] == {"profile": "cpu", "MAX_SEQ_LEN": 256, "TIME_BUDGET": 12.5, "EVAL_TOKENS": 2**16,
                              "VOCAB_SIZE": 2048, "overrides": {"AUTORESEARCH_TIME_BUDGET": 12.5}}, got
    assert got["heldout_tokens"] == 2**16, "the cpu profile scores as many held-out tokens as val tokens"
    assert prepare.PROFILES["gpu"] == dict(MAX_SEQ_LEN=2048, TIME_BUDGET=300, EVAL_TOKENS=40 * 524288, VOCAB_SIZE=8192)


def test_the_gpu_profile_scores_a_quarter_of_the_val_tokens_on_the_held_out_shard():
    out = run_python("import prepare; print(prepare.HELDOUT_TOKENS, prepare.EVAL_TOKENS, prepare.HELDOUT_FILENAME)",
                     env={"AUTORESEARCH_PROFILE": "gpu"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(40 * 524288 // 4), str(40 * 524288), "shard_06541.parquet"], out.stdout


@pytest.mark.parametrize("env,needle", [({"AUTORESEARCH_PROFILE": "tpu"}, "AUTORESEARCH_PROFILE"),
                                        ({"AUTORESEARCH_TIME_BUDGET": "-5"}, "AUTORESEARCH_TIME_BUDGET")])
def test_bad_environment_fails_in_one_line(env, needle):
    out = run_python("import prepare", env=env)
    assert out.returncode != 0
    assert out.stderr.strip().count("\n") == 0 and needle in out.stderr, out.stderr

"""Reference figures for the data path and the metric, produced by karpathy/autoresearch's own prepare.py.

Usage (from the repository root, with an AR checkout outside this repository; a few seconds):
    uv run python -m tests.reference.make_data_figures /path/to/autoresearch   # rewrites data_figures.json

It builds a small deterministic corpus, runs *his* prepare.py on it (tokenizer training, also with the
character cap lowered so that it is reached, the token-bytes table, the packed loader, evaluate_bpb) and
stores what came out; tests/test_reference_data.py rebuilds the corpus, runs ours, and compares. The corpus
is text nobody here wrote, from parts of the standard library that do not change between Python releases;
its row groups make the loader's 128-document batches end early at row-group ends and inside shards.
"""

import argparse
import codecs
import contextlib
import hashlib
import html.entities
import importlib.metadata
import inspect
import io
import json
import platform
import tempfile
import unicodedata
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from tests.reference.common import ar_commit, load_ar_module

FIGURES = Path(__file__).resolve().parent / "data_figures.json"

VOCAB_SIZE = 1024               # tokenizer size for the figures: trains in about a second
SMALL_MAX_CHARS = 170_000       # a character cap reached in the second shard, past a document the document
                                # cap cuts: where it stops depends on counting only the characters kept
LINES_PER_DOC = (1, 3, 0, 2, 1, 5, 1, 2, 9, 1, 2, 1, 25, 3, 1, 2)  # character lines per document, cycled
VAL_SHARD_NAME = "shard_06542.parquet"
ROW_GROUPS = {"shard_00000.parquet": 333, "shard_00001.parquet": 128, "shard_00002.parquet": 1000,
              VAL_SHARD_NAME: 200}  # documents per parquet row group, by shard
TRAIN_SHARDS = [name for name in ROW_GROUPS if name != VAL_SHARD_NAME]

LOADER_SETTINGS = [("train", 8, 64, 150), ("train", 3, 250, 100), ("val", 4, 128, 70)]  # (split, B, T, batches)
EVAL_T, EVAL_ROWS = 128, 240    # evaluate_bpb: MAX_SEQ_LEN and EVAL_TOKENS // MAX_SEQ_LEN
EVAL_BATCH_SIZES = (4, 8)       # both divide EVAL_ROWS, so his evaluate_bpb scores exactly EVAL_ROWS rows
ENCODE_TEXTS = ["Hello world! Numbers: 1234567.", "naïve café, Straße, 你好世界, 🦀 ∑ x²",
                "U+0416 Ж CYRILLIC CAPITAL LETTER ZHE", "&rarr; →\n&Aacute; Á", "  tabs\tand\r\nnewlines\n\n"]
RAW_ROWS = 2                    # rows of the first batch of each loader setting stored as token ids

# his loader's pinned and "cuda" buffers and his metric's byte table go to the CPU (the values do not change)
SUBSTITUTIONS = [("dtype=torch.long, pin_memory=True)", "dtype=torch.long)"),
                 ('dtype=torch.long, device="cuda")', 'dtype=torch.long, device="cpu")'),
                 ('get_token_bytes(device="cuda")', 'get_token_bytes(device="cpu")')]


def unicode_lines():
    """'U+0416 Ж CYRILLIC CAPITAL LETTER ZHE' for every named character of Unicode 3.2 (every Python ships it
    unchanged, for IDNA), but of the ideographs and Hangul syllables, named by number, every 97th only."""
    ucd = unicodedata.ucd_3_2_0
    for cp in range(0x110000):
        name = ucd.name(chr(cp), "")
        numbered = name.startswith(("CJK UNIFIED IDEOGRAPH", "HANGUL SYLLABLE"))
        if name and not (numbered and cp % 97):
            yield f"U+{cp:04X} {chr(cp)} {name}"


def documents():
    """The corpus's documents, in order: the character lines grouped by LINES_PER_DOC."""
    lines, docs, k = list(unicode_lines()), [], 0
    while lines:
        n = LINES_PER_DOC[k % len(LINES_PER_DOC)]
        docs.append("\n".join(lines[:n]))
        lines, k = lines[n:], k + 1
    return docs


def corpus():
    """{shard name: documents}: two in five, and the last tenth (the rarest scripts), for validation; the Zen
    of Python opens the third training shard, and the HTML5 entity table, one document of 25,000 characters
    (over the tokenizer's 10,000-character document cap), sits in the middle of the second."""
    docs = documents()
    tail = len(docs) * 9 // 10
    val = [d for i, d in enumerate(docs[:tail]) if i % 5 in (1, 3)] + docs[tail:]
    train = [d for i, d in enumerate(docs[:tail]) if i % 5 not in (1, 3)]
    a, b = len(train) // 3, 2 * len(train) // 3
    with contextlib.redirect_stdout(io.StringIO()):
        import this  # prints the Zen on import
    zen = [line for line in codecs.decode(this.s, "rot13").splitlines() if line]
    entities = "\n".join(f"&{name} {char}" for name, char in html.entities.html5.items())
    second = train[a:b]
    shards = [train[:a], second[:len(second) // 2] + [entities] + second[len(second) // 2:], zen + train[b:]]
    return {**dict(zip(TRAIN_SHARDS, shards)), VAL_SHARD_NAME: val}


def build_shards(data_dir):
    """Write the corpus as parquet shards into data_dir; return {name: (documents, sha256, row groups)}."""
    data_dir.mkdir(parents=True, exist_ok=True)
    summary = {}
    for name, texts in corpus().items():
        pq.write_table(pa.table({"text": pa.array(texts, type=pa.string())}), data_dir / name,
                       row_group_size=ROW_GROUPS[name])
        meta = pq.ParquetFile(data_dir / name).metadata
        digest = hashlib.sha256(json.dumps(texts, ensure_ascii=False).encode("utf-8")).hexdigest()
        summary[name] = {"documents": len(texts), "sha256": digest,
                         "row_groups": [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]}
    return summary


class StandInModel(torch.nn.Module):
    """No weights: each token's loss in nats is a fixed function of its input and target ids, so two
    metrics given the same rows see the same numbers; only rows, masks, byte counts and sums can differ."""

    def forward(self, x, y, reduction="none"):
        return ((7 * x + 13 * y) % 101).double() / 25 + 0.5


def ranks_digest(mergeable_ranks):
    """sha256 of the merges: one 'rank hex-bytes' line per token, in rank order."""
    lines = "".join(f"{rank} {token.hex()}\n" for token, rank in sorted(mergeable_ranks.items(), key=lambda kv: kv[1]))
    return hashlib.sha256(lines.encode()).hexdigest()


def loader_figures(loader, n_batches):
    """Digest (of inputs then targets as little-endian int64) and epoch of each batch, and the first RAW_ROWS
    rows (T+1 tokens) of the first batch."""
    digests, epochs, raw = [], [], None
    for _ in range(n_batches):
        x, y, epoch = next(loader)
        x, y = x.cpu().numpy().astype("<i8"), y.cpu().numpy().astype("<i8")  # a copy: his loader reuses its buffers
        digests.append(hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()[:16])
        epochs.append(int(epoch))
        if raw is None:
            raw = np.concatenate([x[:RAW_ROWS, :1], y[:RAW_ROWS]], axis=1).tolist()
    return {"batch_sha256_16": digests, "epochs": epochs, "first_rows": raw}


def defaults(fn):
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


def his_constants(ar):
    return {"text_iterator": defaults(ar.text_iterator),
            "tokenizer_batch_size": defaults(ar._document_batches)["tokenizer_batch_size"],
            "buffer_size": defaults(ar.make_dataloader)["buffer_size"],
            "SPLIT_PATTERN": ar.SPLIT_PATTERN, "SPECIAL_TOKENS": ar.SPECIAL_TOKENS, "BOS_TOKEN": ar.BOS_TOKEN,
            "VAL_FILENAME": ar.VAL_FILENAME}


def tokenizer_figures(ar, tokenizer):  # ar: his prepare module, or ours in the test
    enc = tokenizer.enc
    return {"vocab_size": enc.n_vocab, "pattern": enc._pat_str, "bos_token_id": tokenizer.get_bos_token_id(),
            "special_token_ids": {name: enc.encode_single_token(name) for name in ar.SPECIAL_TOKENS},
            "mergeable_ranks_sha256": ranks_digest(enc._mergeable_ranks),
            "encodings": {text: tokenizer.encode(text) for text in ENCODE_TEXTS}}


def token_bytes_figures(ar, tokenizer):
    table = ar.get_token_bytes("cpu").tolist()
    enc = tokenizer.enc
    partial = [i for i in range(len(table)) if "\ufffd" in enc.decode([i])]
    return {"sha256": hashlib.sha256(np.asarray(table, dtype="<i4").tobytes()).hexdigest(), "table": table,
            "partial_utf8_tokens": len(partial),
            "partial_utf8_raw_bytes": sum(len(enc.decode_single_token_bytes(i)) for i in partial),
            "partial_utf8_counted_bytes": sum(table[i] for i in partial)}


def to_json(value, indent=0):
    """JSON with one key per line and every list on one line: small, and readable in a diff."""
    if not (isinstance(value, dict) and value):
        return json.dumps(value, ensure_ascii=False)
    pad = " " * (indent + 1)
    items = ",\n".join(f"{pad}{json.dumps(k, ensure_ascii=False)}: {to_json(v, indent + 1)}" for k, v in value.items())
    return "{\n" + items + "\n" + " " * indent + "}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("ar_dir", help="a checkout of karpathy/autoresearch")
    parser.add_argument("--out", default=str(FIGURES), help="where to write the figures")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        shards = build_shards(scratch / "data")
        ar = load_ar_module(Path(args.ar_dir) / "prepare.py", SUBSTITUTIONS)
        ar.DATA_DIR, ar.TOKENIZER_DIR = str(scratch / "data"), str(scratch / "tokenizer")
        ar.VOCAB_SIZE, ar.MAX_SEQ_LEN, ar.EVAL_TOKENS = VOCAB_SIZE, EVAL_T, EVAL_ROWS * EVAL_T
        ar.train_tokenizer()
        tokenizer = ar.Tokenizer.from_directory(ar.TOKENIZER_DIR)
        figures = {
            "ar_commit": ar_commit(args.ar_dir),
            "command": "uv run python -m tests.reference.make_data_figures /path/to/ar",
            "python": platform.python_version(),
            **{name: importlib.metadata.version(name) for name in ("torch", "rustbpe", "tiktoken", "pyarrow", "numpy")},
            "settings": {"VOCAB_SIZE": VOCAB_SIZE, "EVAL_T": EVAL_T, "EVAL_ROWS": EVAL_ROWS},
            "constants": his_constants(ar),
            "corpus": shards,
            "tokenizer": tokenizer_figures(ar, tokenizer),
            "token_bytes": token_bytes_figures(ar, tokenizer),
            "loader": [{"split": split, "B": B, "T": T, **loader_figures(ar.make_dataloader(tokenizer, B, T, split), n)}
                       for split, B, T, n in LOADER_SETTINGS],
            "evaluate_bpb": {str(B): ar.evaluate_bpb(StandInModel(), tokenizer, B) for B in EVAL_BATCH_SIZES},
        }
        ar.TOKENIZER_DIR = str(scratch / "tokenizer_small_cap")  # his tokenizer retrained, the cap lowered
        ar.text_iterator.__defaults__ = (SMALL_MAX_CHARS, ar.text_iterator.__defaults__[1])
        ar.train_tokenizer()
        merges = ranks_digest(ar.Tokenizer.from_directory(ar.TOKENIZER_DIR).enc._mergeable_ranks)
        figures["small_cap_tokenizer"] = {"max_chars": SMALL_MAX_CHARS, "mergeable_ranks_sha256": merges}
    Path(args.out).write_text(to_json(figures) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

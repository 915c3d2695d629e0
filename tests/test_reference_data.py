"""The data path and the metric against karpathy/autoresearch's own prepare.py: ours, on the corpus of
tests/reference/make_data_figures.py, must give his tokenizer, byte table, packed rows (bit for bit) and
bits per byte (to 1e-12), as stored in tests/reference/data_figures.json."""
import json
from types import SimpleNamespace

import pytest
import torch

import prepare
from tests.reference import make_data_figures as ref

HIS = json.loads(ref.FIGURES.read_text())
pytestmark = pytest.mark.reference


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """Our prepare.py on the figures' corpus: the shards, and the tokenizer trained on them."""
    root = tmp_path_factory.mktemp("reference_data")
    assert ref.build_shards(root / "data") == HIS["corpus"], "the rebuilt corpus is not the figures'"
    prepare.train_tokenizer(root / "data", root / "tokenizer", vocab_size=HIS["settings"]["VOCAB_SIZE"])
    tokenizer = prepare.Tokenizer.from_directory(root / "tokenizer")
    return SimpleNamespace(root=root, data=root / "data", tokenizer=tokenizer)


def first_difference(a, b):  # None where the lists are equal
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return None if a == b else i


def test_data_path_constants_are_his():
    his = HIS["constants"]
    ours = {"text_iterator": {"max_chars": prepare.TOKENIZER_MAX_CHARS, "doc_cap": prepare.TOKENIZER_DOC_CAP},
            "tokenizer_batch_size": prepare.LOADER_BATCH_DOCS, "buffer_size": prepare.LOADER_BUFFER_DOCS,
            "SPLIT_PATTERN": prepare.SPLIT_PATTERN, "SPECIAL_TOKENS": prepare.SPECIAL_TOKENS,
            "BOS_TOKEN": prepare.BOS_TOKEN, "VAL_FILENAME": prepare.VAL_FILENAME}
    assert ours == his, "constants that differ from karpathy/autoresearch's"


def test_tokenizer_has_his_merges_and_encodings(ours):
    assert ref.tokenizer_figures(prepare, ours.tokenizer) == HIS["tokenizer"]


def test_tokenizer_stops_at_his_character_cap(ours, monkeypatch):
    his = HIS["small_cap_tokenizer"]
    monkeypatch.setattr(prepare, "TOKENIZER_MAX_CHARS", his["max_chars"])
    prepare.train_tokenizer(ours.data, ours.root / "tokenizer_small_cap", vocab_size=HIS["settings"]["VOCAB_SIZE"])
    enc = prepare.Tokenizer.from_directory(ours.root / "tokenizer_small_cap").enc
    assert ref.ranks_digest(enc._mergeable_ranks) == his["mergeable_ranks_sha256"], \
        f"trained on the first {his['max_chars']:,} characters, the merges differ from his"


def test_token_bytes_are_his_partial_characters_included(ours):
    his, table = HIS["token_bytes"]["table"], ours.tokenizer.token_bytes().tolist()
    i = first_difference(table, his)
    assert i is None, (f"token {i} ({ours.tokenizer.enc.decode_single_token_bytes(i)!r}) counts {table[i]} bytes, "
                       f"his {his[i]}; {sum(a != b for a, b in zip(table, his))} tokens differ")
    saved = torch.load(ours.root / "tokenizer" / "token_bytes.pt")
    assert saved.dtype == torch.int32 and saved.tolist() == table, "token_bytes.pt is not Tokenizer.token_bytes()"


@pytest.mark.parametrize("his", HIS["loader"], ids=lambda s: f"{s['split']}-B{s['B']}-T{s['T']}")
def test_loader_rows_and_epochs_are_his(ours, his):
    split, B, T = his["split"], his["B"], his["T"]
    loader = prepare.make_dataloader(ours.tokenizer, B, T, split, device="cpu", data_dir=ours.data)
    got = ref.loader_figures(loader, len(his["batch_sha256_16"]))
    assert got["first_rows"] == his["first_rows"], f"{split} B={B} T={T}: the first rows differ from his"
    ours_d, his_d = got["batch_sha256_16"], his["batch_sha256_16"]
    k = first_difference(ours_d, his_d)
    assert k is None, (f"{split} B={B} T={T}: batch {k} (rows {k * B}..{k * B + B - 1}) is the first that differs "
                       f"from his; {sum(a != b for a, b in zip(ours_d, his_d))} of {len(his_d)} batches differ")
    assert got["epochs"] == his["epochs"], f"{split} B={B} T={T}: the batches' epochs differ from his"


@pytest.mark.parametrize("batch_size", [4, 8, 7])
def test_evaluate_bpb_is_his(ours, monkeypatch, batch_size):
    # 7 does not divide the eval rows: ours still scores the same rows, so it must give his number for 4
    settings, his = HIS["settings"], HIS["evaluate_bpb"]
    want = his.get(str(batch_size), his["4"])
    for name, value in {"DATA_DIR": ours.data, "MAX_SEQ_LEN": settings["EVAL_T"],
                        "EVAL_TOKENS": settings["EVAL_ROWS"] * settings["EVAL_T"]}.items():
        monkeypatch.setattr(prepare, name, value)
    bpb = prepare.evaluate_bpb(ref.StandInModel(), ours.tokenizer, batch_size)
    assert bpb == pytest.approx(want, rel=1e-12, abs=0), f"batch size {batch_size}: bpb {bpb!r}, his {want!r}"

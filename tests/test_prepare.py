"""prepare.py, the fixed harness: shards arrive whole or not at all, the tokenizer learns from training shards
only, the CUDA loader serves the CPU loader's batches, every data error is one line. Hermetic. The metric and the
packing against karpathy/autoresearch's own figures: test_reference_data.py."""
import collections
import http.server
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import prepare

ROOT = Path(__file__).resolve().parent.parent
B, T = 4, 64  # small packed batches for the loader tests


def run_python(code, env=None):
    """code in a fresh interpreter at the repository root, with env over the test's (OMP_NUM_THREADS unset)."""
    env = {**{k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}, **(env or {})}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def shard_bytes(texts, column="text"):
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({column: texts}), sink)
    return sink.getvalue().to_pybytes()


@pytest.fixture(scope="session")
def data_dir(cpu_prepared):
    return cpu_prepared[1] / "cpu" / "data"


@pytest.fixture(scope="session")
def tokenizer(data_dir):
    return prepare.Tokenizer.from_directory(data_dir.parent / "tokenizer")


def test_cpu_profile_prepares_disjoint_splits_offline_and_a_rerun_does_nothing(data_dir, tokenizer):
    assert not (data_dir.parent.parent / "data").exists(), "cpu profile wrote into the gpu cache"
    assert tokenizer.get_vocab_size() == prepare.PROFILES["cpu"]["VOCAB_SIZE"]
    before = {p: p.stat().st_mtime_ns for p in data_dir.parent.rglob("*") if p.is_file()}
    again = run_python("import prepare; prepare.main([])",
                       env={"AUTORESEARCH_PROFILE": "cpu", "AUTORESEARCH_CACHE": str(data_dir.parent.parent)})
    assert again.returncode == 0 and "already" in again.stdout, again.stdout + again.stderr
    assert {p: p.stat().st_mtime_ns for p in data_dir.parent.rglob("*") if p.is_file()} == before, "a rerun wrote"
    for name in (prepare.VAL_FILENAME, prepare.HELDOUT_FILENAME):  # each holds more than the profile evaluates
        tokens, need = prepare.load_tokens(tokenizer, data_dir / name)[0], prepare.PROFILES["cpu"]["EVAL_TOKENS"]
        assert len(tokens) > 1.5 * need, f"{name} has {len(tokens)} tokens for {need} to evaluate"
    docs = {split: {text for path in prepare.shard_paths(split, data_dir) for chunk in prepare.read_texts(path)
                    for text in chunk} for split in prepare.SPLITS}
    for a, b in (("heldout", "train"), ("heldout", "val"), ("val", "train")):
        assert not docs[a] & docs[b], f"{len(docs[a] & docs[b])} documents are in both {a} and {b}"


@pytest.mark.quick
def test_tokenizer_learns_from_training_shards_only(tmp_path):
    train_word, val_word = "quokkaberry", "zyzzogeton"
    pq.write_table(pa.table({"text": [f"the {train_word} grows here. " * 40] * 30}), tmp_path / "shard_00000.parquet")
    pq.write_table(pa.table({"text": [f"a {val_word} hums there. " * 40] * 30}), tmp_path / prepare.VAL_FILENAME)
    prepare.train_tokenizer(tmp_path, tmp_path / "tok", vocab_size=320)
    tok = prepare.Tokenizer.from_directory(tmp_path / "tok")
    n_train, n_val = len(tok.encode(" " + train_word)), len(tok.encode(" " + val_word))
    assert n_train <= 2 and n_val >= 5, f"training word -> {n_train} tokens, validation-only word -> {n_val}"
    with pytest.raises(prepare.PrepareError, match=r"uv run prepare\.py"):
        prepare.Tokenizer.from_directory(tmp_path / "nowhere")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_loader_gives_the_same_batches_as_cpu_while_copies_overlap(tokenizer, data_dir):
    cpu, gpu = (prepare.make_dataloader(tokenizer, 8, T, "train", device=d, data_dir=data_dir) for d in ("cpu", "cuda"))
    torch.cuda._sleep(2_000_000_000)  # hold the stream (~1 s): every copy queued below is still in flight
    held = [next(gpu) for _ in range(9)]  # every batch alive: no pinned buffer may be reused before its copy
    for i, ((x, y, _), (cx, cy, _)) in enumerate(zip(held, cpu)):
        assert x.is_cuda and torch.equal(x.cpu(), cx) and torch.equal(y.cpu(), cy), f"batch {i} differs"


CORRUPT = r"shard_00000\.parquet is corrupt .*: delete it and re-run `uv run prepare\.py`"


@pytest.mark.parametrize("content", [b"", b"<html>502 Bad Gateway</html>", shard_bytes(["ok"])[:-20],
                                     shard_bytes(["x"], column="body")], ids=["empty", "html", "truncated", "no_text"])
def test_a_corrupt_shard_is_one_line_saying_what_to_do(tmp_path, tokenizer, content):
    (tmp_path / "shard_00000.parquet").write_bytes(content)  # a missing one: test_check.py's empty cache
    with pytest.raises(prepare.PrepareError, match=CORRUPT) as err:
        next(prepare.make_dataloader(tokenizer, B, T, "train", device="cpu", data_dir=tmp_path))
    assert "\n" not in str(err.value)


def test_bad_settings_are_one_line_and_good_ones_are_the_runs_harness(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(["--num-shards", "0"])
    assert str(exit_info.value.code).startswith("prepare.py: error:") and "\n" not in str(exit_info.value.code)
    for name, value in (("AUTORESEARCH_PROFILE", "tpu"), ("AUTORESEARCH_TIME_BUDGET", "-5")):
        out = run_python("import prepare", env={name: value})
        assert out.returncode != 0 and out.stderr.strip().count("\n") == 0 and name in out.stderr, out.stderr
    code = "import json, prepare, torch; print(json.dumps([str(prepare.DATA_DIR), torch.get_num_threads(), " \
           "prepare.HARNESS]))"
    env = {"AUTORESEARCH_CACHE": str(tmp_path), "AUTORESEARCH_PROFILE": "cpu", "AUTORESEARCH_TIME_BUDGET": "12.5"}
    data, threads, harness = json.loads(run_python(code, env).stdout)
    assert (data, threads) == (str(tmp_path / "cpu" / "data"), 1), "the cpu profile has its own cache and one thread"
    assert (harness["profile"], harness["TIME_BUDGET"], harness["overrides"]) == \
        ("cpu", 12.5, {"AUTORESEARCH_TIME_BUDGET": 12.5}), f"a run's overrides are its harness: {harness}"


SERVED = {prepare.shard_name(i): shard_bytes([f"document {i}.{j} " * 20 for j in range(50)])
          for i in (0, 1, 2, prepare.HELDOUT_SHARD, prepare.VAL_SHARD)}


class Mirror(http.server.BaseHTTPRequestHandler):
    mode = "good"  # good | fail_first (two 503s, then the shard) | truncate | html | missing | silent
    hits = collections.Counter()   # file name -> requests

    def do_GET(self):
        name = self.path.rsplit("/", 1)[-1]
        Mirror.hits[name] += 1
        if name not in SERVED or self.mode == "missing":
            return self.send_error(404)
        if self.mode == "fail_first" and Mirror.hits[name] <= 2:
            return self.send_error(503)
        if self.mode == "silent":
            return time.sleep(2 * prepare.READ_TIMEOUT_S)
        body = b"<html><body>rate limited</body></html>" if self.mode == "html" else SERVED[name]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:len(body) // 2] if self.mode == "truncate" else body)


@pytest.fixture
def mirror(monkeypatch):
    monkeypatch.setattr(prepare, "RETRY_BACKOFF_S", 0.01)
    monkeypatch.setattr(prepare, "READ_TIMEOUT_S", 0.5)
    Mirror.hits, Mirror.mode = collections.Counter(), "good"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Mirror)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/data"
    server.shutdown()
    server.server_close()


@pytest.mark.quick
def test_download_gets_whole_shards_retrying_5xx_and_a_rerun_downloads_nothing(mirror, tmp_path):
    Mirror.mode = "fail_first"
    prepare.download_data(2, download_workers=3, base_url=mirror, data_dir=tmp_path)
    names = [prepare.shard_name(0), prepare.shard_name(1), prepare.HELDOUT_FILENAME, prepare.VAL_FILENAME]
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == {n: SERVED[n] for n in names}, "not what was served"
    assert set(Mirror.hits.values()) == {3}, f"two 503s then the shard, each: {Mirror.hits}"
    Mirror.hits, Mirror.mode = collections.Counter(), "good"
    (tmp_path / prepare.HELDOUT_FILENAME).unlink()
    prepare.download_data(2, download_workers=3, base_url=mirror, data_dir=tmp_path)
    assert Mirror.hits == {prepare.HELDOUT_FILENAME: 1}, f"a rerun downloaded more than the missing one: {Mirror.hits}"


@pytest.mark.quick
@pytest.mark.parametrize("mode", ["truncate", "html", "missing", "silent"])
def test_a_broken_body_never_becomes_a_shard_and_a_dead_mirror_is_one_line(mirror, tmp_path, mode):
    Mirror.mode = mode
    with pytest.raises(prepare.PrepareError, match=r"http://127\.0\.0\.1:\d+/data/shard_\d+\.parquet") as err:
        prepare.download_data(1, download_workers=3, base_url=mirror, data_dir=tmp_path)
    assert list(tmp_path.iterdir()) == [] and "\n" not in str(err.value), f"left behind: {list(tmp_path.iterdir())}"
    assert max(Mirror.hits.values()) == prepare.DOWNLOAD_ATTEMPTS, Mirror.hits


def test_an_eval_set_too_small_is_refused_not_scored_on_less(monkeypatch, tokenizer, data_dir, tmp_path):
    with pytest.raises(ValueError, match="less than one row"):
        prepare.evaluate_bpb_sample(torch.nn.Linear(1, 1), tokenizer, 4, prepare.MAX_SEQ_LEN - 1)
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 10**9)  # a mirror that is not climbmix, e.g. tests/local_mirror.py
    (tmp_path / prepare.VAL_FILENAME).write_bytes((data_dir / prepare.VAL_FILENAME).read_bytes())
    with pytest.raises(prepare.PrepareError, match="too small for its pinned rows"):
        prepare.build_dev_slice(tokenizer, tmp_path)


@pytest.mark.quick
def test_a_missing_or_corrupt_tokenizer_is_one_line_saying_what_to_do(tmp_path):
    with pytest.raises(prepare.PrepareError, match="no tokenizer at .*: run `uv run prepare.py`"):
        prepare.Tokenizer.from_directory(tmp_path)
    (tmp_path / "tokenizer.pkl").write_bytes(b"garbage")  # e.g. a copy cut short
    with pytest.raises(prepare.PrepareError, match=r"tokenizer\.pkl is unreadable \(UnpicklingError\): delete it"):
        prepare.Tokenizer.from_directory(tmp_path)


@pytest.mark.quick
def test_the_hard_cap_grows_with_the_time_the_best_spent_outside_its_budget():
    assert prepare.hard_cap_s(300) == 600, "the gpu profile's cap: AR's budget, doubled"
    assert prepare.hard_cap_s(60) == 180 and prepare.hard_cap_s(60, outside_ref_s=20) == 180, "a floor of 120 s"
    assert prepare.hard_cap_s(60, outside_ref_s=100) == 360, "a slow machine's finished runs are never cut"


@pytest.mark.quick
@pytest.mark.parametrize("tty, written", [(False, "step 10\ndone\n"),
                                          (True, "\r\033[Kstep 10\r\033[Kstep 9\r\033[Kdone\n")])
def test_progress_line_rewrites_one_line_on_a_tty_and_writes_whole_lines_to_a_log(tty, written):
    stream = io.StringIO()
    stream.isatty = lambda: tty
    line = prepare.ProgressLine(every_s=3600, stream=stream)
    line.update("step 10")
    line.update("step 9")
    line.update("done", end="\n")
    assert stream.getvalue() == written, repr(stream.getvalue())

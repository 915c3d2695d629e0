"""prepare.py is the fixed harness: shards arrive whole or not at all, the tokenizer learns from training
shards only, the loader and the metric count the same rows for any batch size, and every data error is one
clear line. Hermetic: loopback servers only. (tests/test_reference_data.py compares the tokenizer, the
packer and the metric with figures from karpathy/autoresearch's own code; tests/test_evaluate.py the
hand-off.)"""
import http.server
import io
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import prepare  # noqa: E402

B, T = 4, 64  # small packed batches for the loader tests


def run_python(code, env=None, timeout=120):
    """code in a fresh interpreter at the repository root, with env over the test's environment."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env={**os.environ, **(env or {})},
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


def test_cpu_profile_prepares_end_to_end_without_network_and_a_rerun_does_nothing(cpu_cache):
    out, data_dir, tokenizer_dir = cpu_cache
    assert out.returncode == 0, f"prepare.py failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    names = sorted(p.name for p in data_dir.glob("shard_*.parquet"))
    assert names == [prepare.shard_name(i) for i in range(prepare.CPU_TRAIN_SHARDS)] + [
        prepare.HELDOUT_FILENAME, prepare.VAL_FILENAME], names
    assert not (data_dir.parent.parent / "data").exists(), "cpu profile wrote into the gpu cache"
    assert prepare.Tokenizer.from_directory(tokenizer_dir).get_vocab_size() == prepare.PROFILES["cpu"]["VOCAB_SIZE"]
    before = {p: p.stat().st_mtime_ns for p in data_dir.parent.rglob("*") if p.is_file()}
    again = run_python("import prepare; prepare.main([])",
                       env={"AUTORESEARCH_PROFILE": "cpu", "AUTORESEARCH_CACHE": str(data_dir.parent.parent)})
    assert again.returncode == 0 and "already" in again.stdout, again.stdout + again.stderr
    assert {p: p.stat().st_mtime_ns for p in data_dir.parent.rglob("*") if p.is_file()} == before, "a rerun rewrote files"


def test_cpu_val_and_held_out_shards_hold_their_eval_sets_and_share_no_document(cpu_cache, tokenizer):
    data_dir, need = cpu_cache[1], prepare.PROFILES["cpu"]["EVAL_TOKENS"]  # = the cpu profile's HELDOUT_TOKENS
    for name in (prepare.VAL_FILENAME, prepare.HELDOUT_FILENAME):
        tokens, _ = prepare.load_tokens(tokenizer, data_dir / name)
        assert len(tokens) > 1.5 * need, f"{name} has {len(tokens)} tokens for {need} to evaluate"
    docs = {split: {text for path in prepare.shard_paths(split, data_dir) for chunk in prepare.read_texts(path)
                    for text in chunk} for split in prepare.SPLITS}
    for a, b in (("heldout", "train"), ("heldout", "val"), ("val", "train")):
        assert not docs[a] & docs[b], f"{len(docs[a] & docs[b])} documents are in both {a} and {b}"


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

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

# ---------------------------------------------------------------------------
# Packer and loader
# ---------------------------------------------------------------------------

def test_loader_is_deterministic_and_independent_of_batch_size(cpu_cache, tokenizer):
    def rows(b, n):
        loader = prepare.make_dataloader(tokenizer, b, T, "val", device="cpu", data_dir=cpu_cache[1])
        return torch.cat([torch.cat([x[:, :1], y], dim=1) for x, y, _ in (next(loader) for _ in range(n))])
    a, again, halves = rows(4, 6), rows(4, 6), rows(2, 12)
    assert torch.equal(a, again) and torch.equal(a, halves), "the packed val rows depend on the run or the batch size"


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
# The metric, and the hand-off under the harness
# ---------------------------------------------------------------------------

def token_cost(x, y, reduction="mean"):
    """A made-up per-token cost that depends on the target id, so different rows give different numbers."""
    return (y % 7).float() * 0.25 + 0.5


EVAL_T, EVAL_ROWS = 256, 12  # the cpu profile's context (BOS shows up among targets); a small eval set


@pytest.fixture
def small_eval(monkeypatch, cpu_cache):
    for name, value in {"DATA_DIR": cpu_cache[1], "MAX_SEQ_LEN": EVAL_T, "EVAL_TOKENS": EVAL_ROWS * EVAL_T}.items():
        monkeypatch.setattr(prepare, name, value)
    monkeypatch.delenv("AUTORESEARCH_HANDOFF", raising=False)


def test_evaluate_bpb_uses_the_same_val_rows_every_time_for_any_batch_size(small_eval, tokenizer):
    a = prepare.evaluate_bpb(token_cost, tokenizer, 4)
    # 12 rows: 5 and 8 leave a short last batch, whose extra rows must count in neither sum
    others = {bs: prepare.evaluate_bpb(token_cost, tokenizer, bs) for bs in (4, 2, 5, 8)}
    assert all(v == pytest.approx(a, rel=1e-12) for v in others.values()), f"bpb {a!r}, by batch size {others}"
    assert prepare._bits_per_byte(token_cost, tokenizer, 3, EVAL_ROWS) == pytest.approx(a, rel=1e-12)
    more = prepare._bits_per_byte(token_cost, tokenizer, 4, EVAL_ROWS + 4)
    assert more != pytest.approx(a, rel=1e-9), "four more rows did not change the number: rows are not counted"
    with pytest.raises(ValueError, match="less than one row"):
        prepare.evaluate_bpb_sample(token_cost, tokenizer, 8, EVAL_T - 1)


# ---------------------------------------------------------------------------
# Broken data: clear one-line errors
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("content", [b"", b"<html>502 Bad Gateway</html>", shard_bytes(["ok"])[:-20], "no_text_column"],
                         ids=["empty", "html", "truncated", "no_text"])
def test_corrupt_shard_names_the_file_and_says_delete_and_rerun(tmp_path, tokenizer, content):
    if content == "no_text_column":
        pq.write_table(pa.table({"body": ["x"]}), tmp_path / "shard_00000.parquet")
    else:
        (tmp_path / "shard_00000.parquet").write_bytes(content)
    (tmp_path / prepare.VAL_FILENAME).write_bytes(shard_bytes(["validation text"]))
    with pytest.raises(prepare.PrepareError) as err:
        next(prepare.make_dataloader(tokenizer, B, T, "train", device="cpu", data_dir=tmp_path))
    assert "shard_00000.parquet" in str(err.value) and "delete it and re-run" in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_shards_and_bad_settings_are_one_line_each(tmp_path, capsys):
    (tmp_path / prepare.VAL_FILENAME).write_bytes(shard_bytes(["validation text"]))
    with pytest.raises(prepare.PrepareError, match="need at least 1 training shard"):
        prepare.shard_paths("train", tmp_path)
    with pytest.raises(prepare.PrepareError, match=r"no held-out shard .* run `uv run prepare\.py`"):
        prepare.shard_paths("heldout", tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(["--num-shards", "0"])
    assert str(exit_info.value.code).startswith("prepare.py: error:") and "\n" not in str(exit_info.value.code)
    for env, needle in (({"AUTORESEARCH_PROFILE": "tpu"}, "AUTORESEARCH_PROFILE"),
                        ({"AUTORESEARCH_TIME_BUDGET": "-5"}, "AUTORESEARCH_TIME_BUDGET")):
        out = run_python("import prepare", env=env)
        assert out.returncode != 0 and out.stderr.strip().count("\n") == 0 and needle in out.stderr, out.stderr

# ---------------------------------------------------------------------------
# Download: loopback mirrors
# ---------------------------------------------------------------------------

SERVED = {prepare.shard_name(i): shard_bytes([f"document {i}.{j} " * 20 for j in range(50)])
          for i in (0, 1, 2, prepare.HELDOUT_SHARD, prepare.VAL_SHARD)}


class Mirror(http.server.BaseHTTPRequestHandler):
    mode = "good"        # good | fail_first | truncate | html | missing
    hits = {}            # file name -> requests

    def do_GET(self):
        name = self.path.rsplit("/", 1)[-1]
        n = Mirror.hits[name] = Mirror.hits.get(name, 0) + 1
        body = SERVED.get(name)
        if body is None or self.mode == "missing":
            return self.send_error(404)
        if self.mode == "fail_first" and n <= 2:
            return self.send_error(503)
        body = b"<html><body>rate limited</body></html>" if self.mode == "html" else body
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:len(body) // 2] if self.mode == "truncate" else body)

    def log_message(self, *args):
        pass


@pytest.fixture
def mirror():
    Mirror.hits, Mirror.mode = {}, "good"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Mirror)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/data"
    server.shutdown()
    server.server_close()


def download(mirror, data_dir, num_shards=2):
    prepare.download_data(num_shards, download_workers=3, base_url=mirror, data_dir=data_dir, backoff_s=0.01)


@pytest.mark.quick
def test_download_gets_whole_shards_retrying_5xx_and_a_rerun_downloads_nothing(mirror, tmp_path):
    Mirror.mode = "fail_first"
    download(mirror, tmp_path)
    names = [prepare.shard_name(0), prepare.shard_name(1), prepare.HELDOUT_FILENAME, prepare.VAL_FILENAME]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    assert all((tmp_path / name).read_bytes() == SERVED[name] for name in names), "a shard differs from what was served"
    assert set(Mirror.hits.values()) == {3}, f"two 503s then the shard, each: {Mirror.hits}"
    Mirror.hits, Mirror.mode = {}, "good"
    (tmp_path / prepare.HELDOUT_FILENAME).unlink()
    download(mirror, tmp_path)
    assert Mirror.hits == {prepare.HELDOUT_FILENAME: 1}, f"a rerun downloaded more than the missing shard: {Mirror.hits}"
    assert prepare.shard_paths("train", tmp_path) == [tmp_path / n for n in names[:2]], "a pinned shard is trained on"


@pytest.mark.quick
@pytest.mark.parametrize("mode", ["truncate", "html", "missing"])
def test_a_body_that_is_not_a_whole_shard_never_becomes_one(mirror, tmp_path, mode):
    Mirror.mode = mode
    with pytest.raises(prepare.PrepareError, match=r"http://127\.0\.0\.1:\d+/data/shard_\d+\.parquet"):
        download(mirror, tmp_path, num_shards=1)
    assert list(tmp_path.iterdir()) == [], f"left behind: {list(tmp_path.iterdir())}"
    attempts = 1 if mode == "missing" else prepare.DOWNLOAD_ATTEMPTS  # a 404 is never retried
    assert max(Mirror.hits.values()) == attempts, Mirror.hits


@pytest.mark.quick
def test_a_dead_or_silent_mirror_ends_in_one_line_naming_the_url(monkeypatch, tmp_path):
    with socket.socket() as dead:  # a port nobody listens on
        dead.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{dead.getsockname()[1]}/mirror"
    for name, value in {"PROFILE": "gpu", "DATA_DIR": tmp_path / "data", "TOKENIZER_DIR": tmp_path / "tok",
                        "BASE_URL": url, "RETRY_BACKOFF_S": 0.01, "READ_TIMEOUT_S": 0.5, "GIVE_UP_S": 2.0}.items():
        monkeypatch.setattr(prepare, name, value)
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(["--num-shards", "2"])
    msg = str(exit_info.value.code)
    assert msg.startswith("prepare.py: error: could not download " + url) and "\n" not in msg, msg
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/mirror"
        with pytest.raises(prepare.PrepareError, match="could not download " + url) as err:
            prepare.download_data(1, download_workers=2, base_url=url, data_dir=tmp_path / "data", backoff_s=0.2)
    attempts = int(re.search(r"(\d+) attempts", str(err.value)).group(1))
    assert attempts < prepare.DOWNLOAD_ATTEMPTS, f"{attempts} attempts: retries went on past GIVE_UP_S=2s"
    assert list((tmp_path / "data").iterdir()) == [], "a partial download was left behind"

# ---------------------------------------------------------------------------
# Profiles, the hard cap, the progress line
# ---------------------------------------------------------------------------

def test_gpu_profile_prepares_end_to_end_from_a_local_mirror(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    import local_mirror  # the mirror a GPU box without internet uses
    names = local_mirror.build_shards(tmp_path / "mirror", train_shards=2)
    server = local_mirror.make_server(tmp_path / "mirror")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {"AUTORESEARCH_PROFILE": "gpu", "AUTORESEARCH_CACHE": str(tmp_path / "cache"),
               "AUTORESEARCH_DATA_URL": f"http://127.0.0.1:{server.server_address[1]}"}
        out = run_python("import prepare; prepare.main(['--num-shards', '2'])", env=env, timeout=300)
    finally:
        server.shutdown()
        server.server_close()
    # standard-library text is far short of the 21M pinned validation tokens: the shard is refused in one line,
    # after the download and the tokenizer, since no dev slice outside the pinned rows can be cut from it
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 1 and "too small for its pinned rows" in last, f"{out.stdout}\n{out.stderr}"
    data = tmp_path / "cache" / "data"
    assert sorted(p.name for p in data.glob("shard_*.parquet")) == sorted(names)
    assert prepare.Tokenizer.from_directory(tmp_path / "cache" / "tokenizer").get_vocab_size() == 8192


def test_profiles_use_separate_caches_record_overrides_and_one_thread_on_the_cpu(tmp_path):
    code = """
        import json, prepare, torch
        print(json.dumps({"data": str(prepare.DATA_DIR), "harness": prepare.HARNESS, "threads": torch.get_num_threads()}))
    """
    env = {"AUTORESEARCH_CACHE": str(tmp_path), "AUTORESEARCH_PROFILE": "cpu", "AUTORESEARCH_TIME_BUDGET": "12.5"}
    clean = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env={**clean, **env},
                         capture_output=True, text=True, timeout=120)
    got = json.loads(out.stdout)
    assert got["data"] == str(tmp_path / "cpu" / "data") and got["threads"] == 1, got
    assert (got["harness"]["profile"], got["harness"]["TIME_BUDGET"]) == ("cpu", 12.5), got
    assert got["harness"]["overrides"] == {"AUTORESEARCH_TIME_BUDGET": 12.5}, "a run's overrides are its harness"


@pytest.mark.quick
def test_the_hard_cap_grows_with_the_time_the_best_spent_outside_its_budget():
    assert prepare.hard_cap_s(300) == 600, "the gpu profile's cap: AR's budget, doubled"
    assert prepare.hard_cap_s(60) == 180 and prepare.hard_cap_s(60, outside_ref_s=20) == 180, "a floor of 120 s"
    assert prepare.hard_cap_s(60, outside_ref_s=100) == 360, "a slow machine's finished runs are never cut"


@pytest.mark.quick
def test_progress_line_rewrites_one_line_on_a_tty_and_writes_whole_lines_to_a_log():
    class Tty(io.StringIO):
        def isatty(self):
            return True
    log, tty = io.StringIO(), Tty()
    for stream in (log, tty):
        line = prepare.ProgressLine(every_s=3600, stream=stream)
        for text in ("step 10", "step 9"):
            line.update(text)
        line.done("done")
    assert log.getvalue() == "step 10\ndone\n", repr(log.getvalue())
    assert tty.getvalue() == "\rstep 10\rstep 9 \rdone  \n", repr(tty.getvalue())

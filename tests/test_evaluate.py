"""harness/evaluate.py is the harness's own measurement, the only evaluation of a model under `analyze.py
run`: run as loop.py runs it (a real `python -I` subprocess) on a model that train.py handed off, it gives
prepare.evaluate_bpb's number for an honest model, the honest number for a model whose loss path lies, sees a
model that reads later tokens, refuses a train.py that changes what the number is computed with, at import or
from its forward, and never runs files planted in the repository. Hermetic: the cpu profile's real data
(conftest.cpu_prepared), tiny models built in-process."""
import importlib.util
import json
import marshal
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import prepare  # noqa: E402
from harness import evaluate  # noqa: E402
from harness.decide import FUTURE_TOLERANCE  # noqa: E402

CPU = prepare.PROFILES["cpu"]
T = CPU["MAX_SEQ_LEN"]
TINY = dict(n_layer=1, n_head=1, n_kv_head=1, n_embd=32)  # a GPTConfig small enough to score fast
SMALL_ROWS = 8  # rows per split for the in-process measurements
CHEAT = '''

class ScaledLossGPT(GPT):  # honest logits from model(x), a loss scaled by 0.9 from model(x, y)
    def forward(self, idx, targets=None, reduction="mean", return_act_rms=False):
        out = super().forward(idx, targets, reduction, return_act_rms)
        return out if targets is None else 0.9 * out
'''


def set_cpu_profile(monkeypatch, cache, rows=None):
    """This process's prepare set to the cpu profile on the prepared cache; rows: score only so many a split."""
    tokens = rows * T if rows else CPU["EVAL_TOKENS"]
    profile_dir = cache / "cpu"
    for name, value in {"PROFILE": "cpu", "DATA_DIR": profile_dir / "data", "TOKENIZER_DIR": profile_dir / "tokenizer",
                        "MAX_SEQ_LEN": T, "EVAL_TOKENS": tokens, "HELDOUT_TOKENS": tokens}.items():
        monkeypatch.setattr(prepare, name, value)
    monkeypatch.delenv("AUTORESEARCH_HANDOFF", raising=False)
    return prepare.Tokenizer.from_directory()


@pytest.fixture
def cpu_profile(monkeypatch, cpu_prepared):
    """The cpu profile in this process, scoring SMALL_ROWS rows a split: the tokenizer."""
    return set_cpu_profile(monkeypatch, cpu_prepared[1], rows=SMALL_ROWS)


def tiny_model(train, tokenizer, cls="GPT", seed=0):
    """A train.py model of TINY size with weights moved off their initial values, so logits differ by token."""
    config = train.GPTConfig(sequence_len=T, vocab_size=tokenizer.get_vocab_size(), **TINY)
    with torch.device("meta"):
        model = getattr(train, cls)(config)
    model.to_empty(device="cpu")
    model.init_weights()
    model.attention_masks(T, "cpu")  # as train.py does before training
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def run_evaluator(root, handoff, train_py, out, env, tmp_path):
    """loop.py's command line, cwd = root."""
    cmd = [sys.executable, "-I", "-B", "-X", f"pycache_prefix={tmp_path / 'pycache'}", str(root / "harness" / "evaluate.py"),
           "--handoff", str(handoff), "--train-py", str(train_py), "--out", str(out)]
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def handed_off(cpu_prepared, tmp_path_factory):
    """A tiny train.py model scored by prepare.evaluate_bpb as a manual run would, then handed off as under
    `analyze.py run` (evaluate_bpb saves it and returns None): (the hand-off, a train.py copy, the score, env)."""
    import train
    tmp = tmp_path_factory.mktemp("handoff")
    shutil.copy(ROOT / "train.py", tmp / "train.py")
    with pytest.MonkeyPatch.context() as monkeypatch:
        tokenizer = set_cpu_profile(monkeypatch, cpu_prepared[1])
        model = tiny_model(train, tokenizer)
        reported = prepare.evaluate_bpb(model, tokenizer, 8)
        monkeypatch.setenv("AUTORESEARCH_HANDOFF", str(tmp / "run" / "model.pt"))
        assert prepare.evaluate_bpb(model, tokenizer, 8) is None, "under the harness train.py evaluates nothing"
    assert [p.name for p in (tmp / "run").iterdir()] == ["model.pt"], "a temp file was left behind"
    env = {**os.environ, "AUTORESEARCH_PROFILE": "cpu", "AUTORESEARCH_CACHE": str(cpu_prepared[1])}
    return tmp / "run" / "model.pt", tmp / "train.py", reported, env

# ---------------------------------------------------------------------------
# The evaluator, as loop.py runs it

def test_the_isolated_evaluator_gives_evaluate_bpbs_number_and_a_held_out_one(handed_off, tmp_path):
    handoff, train_py, reported, env = handed_off
    out = run_evaluator(ROOT, handoff, train_py, tmp_path / "eval.json", env, tmp_path)
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "eval.json").read_text())
    assert set(result) == set(evaluate.RESULT) and result["error"] is None, result
    assert result["future_leak"] == 0.0, "train.py's model is causal: no logit moved in the probe batches"
    assert result["val_bpb"] == pytest.approx(reported, rel=1e-9, abs=0), (result["val_bpb"], reported)
    assert math.isfinite(result["heldout_bpb"]) and result["heldout_bpb"] != result["val_bpb"]
    assert result["speed_before"] > 0 and result["speed_after"] > 0 and result["eval_s"] > 0, result
    assert not list(tmp_path.glob(".eval.json.*")), "a temp file was left behind"


@pytest.fixture(scope="module")
def planted_run(handed_off, tmp_path_factory):
    """The evaluator in a copy of the root with an untracked argparse.py and a forged prepare .pyc planted (each
    writes a marker if it runs), on a committed train.py whose model class was renamed: it fails on that after
    every import is done. (the process, its JSON, the marker, what the planted files do under a plain python)"""
    _, train_py, _, env = handed_off
    tmp = tmp_path_factory.mktemp("planted")
    root, marker = tmp / "root", tmp / "planted_code_ran"
    (root / "harness").mkdir(parents=True)
    shutil.copy(ROOT / "prepare.py", root / "prepare.py")
    for path in (ROOT / "harness").glob("*.py"):
        shutil.copy(path, root / "harness" / path.name)
    plant = "open({marker!r}, 'a').write({name!r} + '\\n')\nraise ImportError('planted')\n"
    (root / "argparse.py").write_text(plant.format(marker=str(marker), name="argparse.py"))
    forged = compile(plant.format(marker=str(marker), name="forged prepare .pyc"), str(root / "prepare.py"), "exec")
    st = (root / "prepare.py").stat()  # a header that matches the source: the import system would trust it
    header = importlib.util.MAGIC_NUMBER + (0).to_bytes(4, "little") + \
        (int(st.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little") + (st.st_size & 0xFFFFFFFF).to_bytes(4, "little")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / f"prepare.{sys.implementation.cache_tag}.pyc").write_bytes(header + marshal.dumps(forged))
    for probe in ("import argparse", "import prepare"):  # a plain interpreter in the root runs both
        subprocess.run([sys.executable, "-c", probe], cwd=root, env=env, capture_output=True, timeout=120)
    control = marker.read_text().splitlines()
    marker.unlink()
    renamed = tmp / "train.py"
    renamed.write_text(train_py.read_text().replace("class GPT(nn.Module)", "class Transformer(nn.Module)"))
    out = run_evaluator(root, handed_off[0], renamed, tmp / "eval.json", env, tmp)
    return out, json.loads((tmp / "eval.json").read_text()), marker, control


def test_planted_argparse_and_forged_bytecode_in_the_root_never_run(planted_run):
    out, result, marker, control = planted_run
    assert control == ["argparse.py", "forged prepare .pyc"], f"the planted files are not live: {control}"
    assert not marker.exists(), f"the evaluator ran planted code: {marker.read_text()}"
    assert "planted" not in out.stderr and "forged" not in out.stderr, out.stderr


def test_a_train_py_without_the_model_class_is_a_one_line_error(planted_run):
    out, result, _, _ = planted_run
    assert out.returncode != 0 and result["val_bpb"] is None
    assert result["error"] == "cannot rebuild the model: train.py has no class GPT", result["error"]
    assert out.stderr.strip() == f"evaluate.py: error: {result['error']}", out.stderr


def test_the_evaluator_refuses_to_run_without_its_isolation_flags(tmp_path):
    code = evaluate.main(["--handoff", "x", "--train-py", "y", "--out", str(tmp_path / "eval.json")])
    error = json.loads((tmp_path / "eval.json").read_text())["error"]
    assert code == 1 and "python -I -B -X pycache_prefix=DIR" in error and "\n" not in error, error

# ---------------------------------------------------------------------------
# The measurement, in-process

def test_a_loss_path_that_scales_the_loss_is_measured_honestly(cpu_profile, tmp_path):
    train_py = tmp_path / "train.py"
    train_py.write_text((ROOT / "train.py").read_text() + CHEAT)
    model = tiny_model(evaluate.import_train(train_py), cpu_profile, cls="ScaledLossGPT")
    reported = prepare.evaluate_bpb(model, cpu_profile, 4)
    prepare.save_handoff(model, 4, tmp_path / "model.pt")
    measured = evaluate.evaluate(tmp_path / "model.pt", train_py, device="cpu")
    assert measured["val_bpb"] == pytest.approx(reported / 0.9, rel=1e-6), (reported, measured["val_bpb"])


def test_a_missing_held_out_shard_says_to_run_prepare(cpu_profile, monkeypatch, tmp_path):
    monkeypatch.setattr(prepare, "DATA_DIR", tmp_path)
    with pytest.raises(prepare.PrepareError, match=r"^no held-out shard .*: run `uv run prepare\.py`$"):
        evaluate.evaluate(tmp_path / "model.pt", ROOT / "train.py", device="cpu")


@pytest.mark.parametrize("handoff,needle", [(b"not a torch file", "cannot read the hand-off"),
                                            ({"model_class": "GPT"}, "lacks config_class, config, state_dict")])
def test_a_broken_hand_off_is_a_one_line_error(tmp_path, handoff, needle):
    path = tmp_path / "model.pt"
    path.write_bytes(handoff) if isinstance(handoff, bytes) else torch.save(handoff, path)
    with pytest.raises(evaluate.EvalError, match=needle) as err:
        evaluate.load_handoff(path)
    assert "\n" not in str(err.value)


def test_weights_that_do_not_fit_the_committed_model_are_refused(cpu_profile):
    import train
    handoff = {"model_class": "GPT", "config_class": "GPTConfig", "batch_size": 4,
               "config": {**vars(tiny_model(train, cpu_profile).config), "n_layer": 2},
               "state_dict": tiny_model(train, cpu_profile).state_dict()}
    with pytest.raises(evaluate.EvalError, match=r"^cannot rebuild the model: RuntimeError: .*Missing key"):
        evaluate.rebuild_model(train, handoff, torch.device("cpu"))


def test_logits_of_the_wrong_shape_are_a_one_line_error():
    token_nats = evaluate.logits_loss(lambda x: torch.zeros(*x.shape, 10), vocab_size=16)
    x = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(evaluate.EvalError, match=r"shaped \(B, T, >= 16\) for x of shape \(2, 4\), got \(2, 4, 10\)"):
        token_nats(x, x)


# ---------------------------------------------------------------------------
# Guard: train.py changes nothing the number is computed with

PATCHES = {  # a line train.py runs at import -> what the refusal names
    "F.cross_entropy = lambda *a, **k: 0.97 * _ce(*a, **k)": "torch.nn.functional.cross_entropy",
    "prepare.EVAL_TOKENS = 4 * prepare.MAX_SEQ_LEN": "prepare.EVAL_TOKENS",
    "torch.Tensor.sum = lambda self, *a, **k: 0.97 * _sum(self, *a, **k)": "torch.Tensor.sum",
    "prepare.make_dataloader.__code__ = (lambda *a, **k: iter(())).__code__": "prepare.make_dataloader",
    "prepare.Tokenizer.token_bytes = lambda self, device: None": "prepare.Tokenizer.token_bytes",
    "sys.modules['harness.evaluate'].cross_entropy = lambda *a, **k: 0 * _ce(*a, **k)": "harness.evaluate.cross_entropy",
    "torch.set_default_dtype(torch.float64)": "torch's default dtype",
    "torch.overrides.TorchFunctionMode().__enter__()": "torch's function modes",  # every torch call through train.py
}


@pytest.mark.parametrize("patch", PATCHES)
def test_a_train_py_that_changes_what_the_number_is_computed_with_is_refused(cpu_profile, monkeypatch, tmp_path, patch):
    import torch.nn.functional as F
    for target, name in ((F, "cross_entropy"), (prepare, "EVAL_TOKENS"), (torch.Tensor, "sum"),
                         (prepare.make_dataloader, "__code__"), (prepare.Tokenizer, "token_bytes"),
                         (evaluate, "cross_entropy")):
        monkeypatch.setattr(target, name, getattr(target, name))  # put back after the test, whatever it changed
    default_dtype = torch.get_default_dtype()
    train_py = tmp_path / "train.py"
    train_py.write_text("import sys, torch, prepare\nimport torch.nn.functional as F\n"
                        f"_ce, _sum = F.cross_entropy, torch.Tensor.sum\n{patch}\n")
    try:
        with pytest.raises(evaluate.EvalError) as err:
            evaluate.import_train(train_py)
    finally:
        torch.set_default_dtype(default_dtype)
        while torch._C._len_torch_function_stack():
            torch._C._pop_torch_function_stack()
    assert re.fullmatch(f"train.py changes {re.escape(PATCHES[patch])}(, .*)? at import: the harness measures with "
                        "the library as installed", str(err.value)), err.value


def test_the_committed_train_py_changes_nothing_and_a_forward_that_patches_the_loss_is_refused(cpu_profile,
                                                                                               monkeypatch):
    import torch.nn.functional as F
    guard = evaluate.Guard()
    train = evaluate.import_train(ROOT / "train.py", guard)
    model = tiny_model(train, cpu_profile)
    assert evaluate.measure(model, cpu_profile, 4, torch.device("cpu"), guard)[2] == 0.0
    monkeypatch.setattr(F, "cross_entropy", F.cross_entropy)
    honest = model.forward
    def patches(idx):  # a forward that rebinds the loss the first time it runs
        F.cross_entropy = lambda *a, **k: torch.zeros(())
        return honest(idx)
    with pytest.raises(evaluate.EvalError, match=r"^train.py changes torch.nn.functional.cross_entropy when its model"):
        evaluate.measure(patches, cpu_profile, 4, torch.device("cpu"), guard)

# ---------------------------------------------------------------------------
# The causality probe

def probe_leak(model, tokenizer, batches=4):
    """future_leak of model over the first batches of 4 validation rows, every batch probed."""
    probe = evaluate.Probe(model, tokenizer.get_vocab_size(), every=1)
    loader = prepare.make_dataloader(tokenizer, 4, T, "val", device="cpu")
    with torch.no_grad():
        for _ in range(batches):
            x = next(loader)[0]
            probe(x, model(x))
    return probe.leak


def test_the_probe_sees_a_model_that_reads_later_tokens_and_not_a_causal_one(cpu_profile):
    """Non-causal attention predicts the validation text from itself: it scores well on held-out text too, so
    only a look at the logits themselves can tell; a model that reads ahead only in the second half of a row,
    or only in batches without probes, is seen as well."""
    import train
    model = tiny_model(train, cpu_profile)
    assert probe_leak(model, cpu_profile) == 0.0, "a causal model's logits moved"
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(train, "attention", lambda q, k, v, mask: sdpa(q, k, v))  # no mask: sees everything
        assert probe_leak(model, cpu_profile) > 5 * FUTURE_TOLERANCE, "a non-causal model went unseen"
    honest = model.forward
    def second_half_peeks(idx):  # the next token's embedding added to the logits, from T/2 on
        logits = honest(idx)
        ahead = torch.nn.functional.one_hot(idx.roll(-1, 1), logits.size(-1)).float()
        return logits + 5 * ahead * (torch.arange(idx.size(1)) >= idx.size(1) // 2)[None, :, None]
    assert probe_leak(second_half_peeks, cpu_profile) > 5 * FUTURE_TOLERANCE, "a half-peeking model went unseen"
    rows = prepare.make_dataloader(cpu_profile, 4, T, "val", device="cpu")
    known = {tuple(row.tolist()) for _ in range(4) for row in next(rows)[0]}  # a model that memorised the val rows
    def hides_from_probes(idx):  # causal whenever a batch holds a row it does not know, that is a probe
        return honest(idx) if any(tuple(row.tolist()) not in known for row in idx) else second_half_peeks(idx)
    assert probe_leak(hides_from_probes, cpu_profile) > 5 * FUTURE_TOLERANCE, "a model that hid went unseen"


@pytest.mark.quick
def test_a_compiled_call_in_train_pys_model_is_not_a_change():
    """On CUDA train.py's flex kernel is torch.compile'd and compiles at the evaluator's first forward; dynamo's
    first compile patches nn.Module.__init__ and __setstate__. The evaluator installs that patch before any Guard,
    so an honest GPU run is never refused for it (without it this test fails naming torch.nn.Module.__init__)."""
    guard = evaluate.Guard()
    torch.compile(lambda x: x * 2, backend="eager", fullgraph=True)(torch.ones(3))
    guard.check("after a compiled call")

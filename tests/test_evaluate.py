"""harness/evaluate.py on handed-off tiny models and the cpu profile's real data: evaluate_bpb's number for the
honest logits of a lying loss path; later tokens read, what the number is computed with changed, refused."""
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

import prepare
from harness import evaluate
from harness.decide import FUTURE_TOLERANCE

ROOT = Path(__file__).resolve().parent.parent
CPU = prepare.PROFILES["cpu"]
T = CPU["MAX_SEQ_LEN"]
TINY = dict(n_layer=1, n_head=1, n_kv_head=1, n_embd=32)  # a GPTConfig small enough to score fast
CHEAT = '''
class HalvedLossGPT(GPT):  # honest logits from model(x), a loss halved (exactly, in floating point) from model(x, y)
    def forward(self, idx, targets=None, **kwargs):
        out = super().forward(idx, targets, **kwargs)
        return out if targets is None else 0.5 * out
'''


def set_cpu_profile(monkeypatch, cache, rows=None):
    """This process's prepare set to the cpu profile on the prepared cache; rows: score only so many a split."""
    tokens = rows * T if rows else CPU["EVAL_TOKENS"]
    for name, value in {"PROFILE": "cpu", "DATA_DIR": cache / "cpu/data", "TOKENIZER_DIR": cache / "cpu/tokenizer",
                        "MAX_SEQ_LEN": T, "EVAL_TOKENS": tokens, "HELDOUT_TOKENS": tokens}.items():
        monkeypatch.setattr(prepare, name, value)
    return prepare.Tokenizer.from_directory()


@pytest.fixture
def cpu_profile(monkeypatch, cpu_prepared):
    """The cpu profile in this process, scoring 8 rows a split: the tokenizer."""
    return set_cpu_profile(monkeypatch, cpu_prepared[1], rows=8)


def tiny_model(train, tokenizer, cls="GPT"):
    """A train.py model of TINY size with weights moved off their initial values, so logits differ by token."""
    model = getattr(train, cls)(train.GPTConfig(sequence_len=T, vocab_size=tokenizer.get_vocab_size(), **TINY))
    model.init_weights()
    model.attention_masks(T, "cpu")  # as train.py does before training
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def test_the_isolated_evaluator_measures_the_logits_and_never_runs_planted_files(cpu_prepared, monkeypatch, tmp_path):
    """A tiny model whose loss path halves its loss, handed off by prepare.evaluate_bpb and measured as loop.py runs
    the evaluator, in a copy of the root where an untracked argparse.py and a forged prepare .pyc write a marker."""
    env = {**os.environ, "AUTORESEARCH_PROFILE": "cpu", "AUTORESEARCH_CACHE": str(cpu_prepared[1])}
    tokenizer = set_cpu_profile(monkeypatch, cpu_prepared[1])
    train_py, handoff = tmp_path / "train.py", tmp_path / "model.pt"
    train_py.write_text((ROOT / "train.py").read_text() + CHEAT)
    model = tiny_model(evaluate.import_train(train_py), tokenizer, cls="HalvedLossGPT")
    reported = prepare.evaluate_bpb(model, tokenizer, 8)
    monkeypatch.setenv("AUTORESEARCH_HANDOFF", str(handoff))
    assert prepare.evaluate_bpb(model, tokenizer, 8) is None, "under the harness train.py evaluates nothing"
    root, marker = tmp_path / "root", tmp_path / "planted_code_ran"
    (root / "harness").mkdir(parents=True)
    for path in [ROOT / "prepare.py", *(ROOT / "harness").glob("*.py")]:
        shutil.copy(path, root / path.relative_to(ROOT))
    plant = "open({marker!r}, 'a').write({name!r} + '\\n')\nraise ImportError('planted')\n"
    (root / "argparse.py").write_text(plant.format(marker=str(marker), name="argparse.py"))
    forged = compile(plant.format(marker=str(marker), name="forged prepare .pyc"), str(root / "prepare.py"), "exec")
    st = (root / "prepare.py").stat()  # a header that matches the source: the import system would trust it
    header = importlib.util.MAGIC_NUMBER + (0).to_bytes(4, "little") + \
        (int(st.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little") + (st.st_size & 0xFFFFFFFF).to_bytes(4, "little")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / f"prepare.{sys.implementation.cache_tag}.pyc").write_bytes(header + marshal.dumps(forged))
    for probe in ("import argparse", "import prepare"):
        subprocess.run([sys.executable, "-c", probe], cwd=root, env=env, capture_output=True, timeout=120)
    assert marker.read_text().splitlines() == ["argparse.py", "forged prepare .pyc"], "the planted files are not live"
    marker.unlink()
    out = subprocess.run([sys.executable, "-I", "-B", root / "harness" / "evaluate.py", "--handoff", handoff,
                          "--train-py", train_py, "--out", tmp_path / "eval.json"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=300)
    result = json.loads((tmp_path / "eval.json").read_text())
    assert out.returncode == 0 and not marker.exists(), (out.stderr, marker.exists() and marker.read_text())
    assert set(result) == set(evaluate.RESULT) and result["error"] is None, result
    assert result["future_leak"] == 0.0, "train.py's model is causal: no logit moved in the probe batches"
    assert result["val_bpb"] == pytest.approx(2 * reported, rel=1e-9, abs=0), (result["val_bpb"], reported)
    assert math.isfinite(result["heldout_bpb"]) and result["heldout_bpb"] != result["val_bpb"]
    assert result["speed_before"] > 0 and result["speed_after"] > 0 and result["eval_s"] > 0, result


def test_the_evaluator_refuses_to_run_without_its_isolation_flags(tmp_path, capsys):
    code = evaluate.main(["--handoff", "x", "--train-py", "y", "--out", str(tmp_path / "eval.json")])
    error = json.loads((tmp_path / "eval.json").read_text())["error"]
    assert code == 1 and "python -I -B harness/evaluate.py" in error and "\n" not in error, error
    assert capsys.readouterr().err == f"evaluate.py: error: {error}\n"


def test_a_hand_off_that_does_not_fit_the_committed_model_is_a_one_line_error(cpu_profile):
    import train
    model = tiny_model(train, cpu_profile)
    handoff = {"model_class": "GPT", "config_class": "GPTConfig", "batch_size": 4,
               "config": {**vars(model.config), "n_layer": 2}, "state_dict": model.state_dict()}
    with pytest.raises(evaluate.EvalError, match=r"^cannot rebuild the model: RuntimeError: .*Missing key"):
        evaluate.rebuild_model(train, handoff, torch.device("cpu"))
    with pytest.raises(evaluate.EvalError, match=r"^cannot rebuild the model: AttributeError: .* 'Transformer'$"):
        evaluate.rebuild_model(train, {**handoff, "model_class": "Transformer"}, torch.device("cpu"))


PATCHES = {  # a line train.py runs at import -> what the refusal names
    "F.cross_entropy = lambda *a, **k: 0.97 * _ce(*a, **k)": "torch.nn.functional.cross_entropy",
    "prepare.EVAL_TOKENS = 4 * prepare.MAX_SEQ_LEN": "prepare.EVAL_TOKENS",
    "torch.Tensor.sum = lambda self, *a, **k: 0.97 * _sum(self, *a, **k)": "torch.Tensor.sum",
    "prepare.make_dataloader.__code__ = (lambda *a, **k: iter(())).__code__": "prepare.make_dataloader",
    "prepare.Tokenizer.token_bytes = lambda self, device: None": "prepare.Tokenizer.token_bytes",
    "sys.modules['harness.evaluate'].cross_entropy = lambda *a, **k: 0": "harness.evaluate.cross_entropy",
    "torch.set_default_dtype(torch.float64)": "torch's default dtype",
    "torch.overrides.TorchFunctionMode().__enter__()": "torch's function modes",  # every torch call through train.py
}


@pytest.mark.parametrize("patch", PATCHES)
def test_a_train_py_that_changes_what_the_number_is_computed_with_is_refused(cpu_profile, monkeypatch, tmp_path, patch):
    for target, name in ((torch.nn.functional, "cross_entropy"), (prepare, "EVAL_TOKENS"), (torch.Tensor, "sum"),
                         (prepare.make_dataloader, "__code__"), (prepare.Tokenizer, "token_bytes"),
                         (evaluate, "cross_entropy")):
        monkeypatch.setattr(target, name, getattr(target, name))  # put back after the test, whatever it changed
    train_py = tmp_path / "train.py"
    train_py.write_text("import sys, torch, prepare\nimport torch.nn.functional as F\n"
                        f"_ce, _sum = F.cross_entropy, torch.Tensor.sum\n{patch}\n")
    refusal = f"^train.py changes {re.escape(PATCHES[patch])}(, .*)? at import: the harness measures with the library"
    try:
        with pytest.raises(evaluate.EvalError, match=refusal + " as installed$"):
            evaluate.import_train(train_py)
    finally:
        torch.set_default_dtype(torch.float32)
        while torch._C._len_torch_function_stack():
            torch._C._pop_torch_function_stack()


def test_a_forward_that_patches_the_loss_is_refused(cpu_profile, monkeypatch):
    import train
    guard, model, F = evaluate.Guard(), tiny_model(train, cpu_profile), torch.nn.functional
    monkeypatch.setattr(F, "cross_entropy", F.cross_entropy)
    def patches(idx):  # a forward that rebinds the loss the first time it runs
        F.cross_entropy = lambda *a, **k: torch.zeros(())
        return model(idx)
    x = torch.zeros(2, T, dtype=torch.long)
    with pytest.raises(evaluate.EvalError, match=r"^train.py changes torch.nn.functional.cross_entropy when its model"):
        evaluate.logits_loss(patches, cpu_profile.get_vocab_size(), guard=guard)(x, x)


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
    """Non-causal attention scores well on held-out text too: only the logits tell. Also seen: a model that reads
    ahead only in the second half of a row, or only in batches without probes."""
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
    """dynamo's first compile (train.py's flex kernel, on CUDA) patches nn.Module.__init__ and __setstate__: the
    evaluator does so before any Guard, or this fails naming torch.nn.Module.__init__ (an honest GPU run refused)."""
    guard = evaluate.Guard()
    torch.compile(lambda x: x * 2, backend="eager", fullgraph=True)(torch.ones(3))
    guard.check("after a compiled call")

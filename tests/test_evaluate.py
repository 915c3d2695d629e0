"""harness/evaluate.py on graphs handed off by tiny train.py models and the cpu profile's real data:
evaluate_bpb's number for the honest logits of a lying loss path, with no code of train.py's run; flex_attention
handed off as the SDPA it equals; a forged hand-off and a model that reads later tokens, refused or seen."""
import json
import math
import os
import pickle
import py_compile
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.attention.flex_attention as flex

import prepare
import train
from harness import evaluate
from harness.decide import FUTURE_TOLERANCE

ROOT = Path(__file__).resolve().parent.parent
CPU = prepare.PROFILES["cpu"]
T = CPU["MAX_SEQ_LEN"]
TINY = dict(n_layer=1, n_head=1, n_kv_head=1, n_embd=32)  # a GPTConfig small enough to score fast


class LyingGPT(train.GPT):
    """Honest logits from model(x), a halved loss from model(x, y), and a line in `marker` from every call."""
    marker = None

    def forward(self, idx, targets=None, **kwargs):
        open(self.marker, "a").write("forward ran\n")
        out = super().forward(idx, targets, **kwargs)
        return out if targets is None else 0.5 * out


@pytest.fixture
def cpu_profile(monkeypatch, cpu_prepared):
    """This process's prepare set to the cpu profile on the prepared cache, as the evaluator's is: the tokenizer."""
    for name, value in {"DATA_DIR": cpu_prepared[1] / "cpu/data", "TOKENIZER_DIR": cpu_prepared[1] / "cpu/tokenizer",
                        "MAX_SEQ_LEN": T, "EVAL_TOKENS": CPU["EVAL_TOKENS"]}.items():
        monkeypatch.setattr(prepare, name, value)
    return prepare.Tokenizer.from_directory()


def tiny_model(tokenizer, cls=train.GPT, **config):
    """A train.py model of TINY size with weights moved off their initial values, so logits differ by token."""
    model = cls(train.GPTConfig(sequence_len=T, vocab_size=tokenizer.get_vocab_size(), **{**TINY, **config}))
    model.init_weights()
    model.attention_masks(T, "cpu")  # as train.py does before training
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def test_the_isolated_evaluator_measures_the_graph_and_never_runs_train_pys_code_or_planted_files(
        cpu_prepared, cpu_profile, monkeypatch, tmp_path, capsys):
    """A tiny model whose loss path lies and whose forward writes a marker, handed off by prepare.evaluate_bpb and
    measured as loop.py runs the evaluator, in a copy of the root where an untracked argparse.py, a forged prepare
    .pyc and a prepare/ package write the marker too; run without its isolation flags, the evaluator refuses."""
    env = {**os.environ, "AUTORESEARCH_PROFILE": "cpu", "AUTORESEARCH_CACHE": str(cpu_prepared[1])}
    handoff, marker, out_json = tmp_path / "model.pt", tmp_path / "code_ran", tmp_path / "eval.json"
    monkeypatch.setattr(LyingGPT, "marker", str(marker))
    model = tiny_model(cpu_profile, LyingGPT)
    reported = prepare.evaluate_bpb(model, cpu_profile, 8)
    monkeypatch.setenv("AUTORESEARCH_HANDOFF", str(handoff))
    assert prepare.evaluate_bpb(model, cpu_profile, 8) is None, "under the harness train.py evaluates nothing"
    root = tmp_path / "root"
    shutil.copytree(ROOT / "harness", root / "harness", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "prepare.py", root)
    plant = "open({marker!r}, 'a').write({name!r} + '\\n')\nraise ImportError('planted')\n"
    (root / "argparse.py").write_text(plant.format(marker=str(marker), name="argparse.py"))
    (tmp_path / "forged.py").write_text(plant.format(marker=str(marker), name="forged prepare .pyc"))
    py_compile.compile(tmp_path / "forged.py", root / "__pycache__" / f"prepare.{sys.implementation.cache_tag}.pyc",
                       doraise=True, invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)  # trusted as is
    for probe in ("import argparse", "import prepare"):
        subprocess.run([sys.executable, "-c", probe], cwd=root, env=env, capture_output=True, timeout=120)
    assert marker.read_text().splitlines()[-2:] == ["argparse.py", "forged prepare .pyc"], "the plants are not live"
    (root / "prepare").mkdir()  # a package is found before the module beside it, bytecode or not
    (root / "prepare" / "__init__.py").write_text(plant.format(marker=str(marker), name="prepare package"))
    subprocess.run([sys.executable, "-c", "import prepare"], cwd=root, env=env, capture_output=True, timeout=120)
    assert marker.read_text().splitlines()[-1] == "prepare package", "the planted package is not live"
    marker.unlink()
    out = subprocess.run([sys.executable, "-I", "-B", root / "harness" / "evaluate.py", "--handoff", handoff,
                          "--out", out_json], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    result = json.loads(out_json.read_text())
    assert out.returncode == 0 and not marker.exists(), (out.stderr, marker.exists() and marker.read_text())
    assert set(result) == set(evaluate.RESULT) and result["error"] is None, result
    assert result["future_leak"] == 0.0, "train.py's model is causal: no logit moved in the probe batches"
    assert result["val_bpb"] == pytest.approx(2 * reported, rel=1e-9, abs=0), (result["val_bpb"], reported)
    assert math.isfinite(result["heldout_bpb"]) and result["heldout_bpb"] != result["val_bpb"]
    assert result["speed_before"] > 0 and result["speed_after"] > 0, result
    code = evaluate.main(["--handoff", str(handoff), "--out", str(out_json)])  # this process has neither -I nor -B
    error = json.loads(out_json.read_text())["error"]
    assert code == 1 and "python -I -B harness/evaluate.py" in error and "\n" not in error, error
    assert capsys.readouterr().err == f"evaluate.py: error: {error}\n"


def handed_off(model, path, batch_size=2):
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("AUTORESEARCH_HANDOFF", str(path))
        prepare.evaluate_bpb(model, None, batch_size)
    return torch.load(path, weights_only=True)


@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")  # the eager reference
def test_the_hand_off_is_the_models_eval_mode_logits_with_flex_attention_as_the_sdpa_it_equals(cpu_profile, tmp_path):
    """train.py's CUDA path (flex_attention, sliding-window BlockMasks, grouped heads) built on the CPU, with a dropout
    left in training mode: the graph holds SDPA, each distinct mask once, and gives the eval-mode logits; a score_mod
    or a mask by head is refused."""
    model = tiny_model(cpu_profile, n_layer=3, n_head=2, window_pattern="SSL")
    model.lm_head = torch.nn.Sequential(model.lm_head, torch.nn.Dropout(0.5))
    model._masks[(T, "cpu")] = [train.sliding_window_mask(T, w, "cpu", flex=True) if w < T - 1 else None
                                for w in model.window_sizes]
    x = next(prepare.make_dataloader(cpu_profile, 2, T, "val", device="cpu"))[0]
    with torch.no_grad():
        expected = model.eval()(x)
    saved = handed_off(model.train(), tmp_path / "model.pt")
    assert "flex_attention" not in saved["graph"] and [k for k in saved["state_dict"] if "mask" in k] == ["flex_mask_0"]
    graph, batch_size = evaluate.load_graph(tmp_path / "model.pt", torch.device("cpu"))
    assert batch_size == 2 and torch.allclose(graph(x), expected, atol=1e-5), (graph(x) - expected).abs().max()

    def scored(q, k, v, mask):  # train.py's attention with a score_mod
        return train.flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: s * 0.5, block_mask=mask, enable_gqa=True)
    refusal = r"^cannot hand the model to the harness: [^\n]*\(ValueError: flex_attention with a score_mod[^\n]*$"
    with pytest.MonkeyPatch.context() as monkeypatch, pytest.raises(prepare.PrepareError, match=refusal):
        monkeypatch.setattr(train, "attention", scored)
        handed_off(model, tmp_path / "scored.pt")
    by_head = flex.create_block_mask(lambda b, h, i, j: (i >= j) & (h == 0), None, None, T, T, device="cpu")
    model._masks[(T, "cpu")] = [by_head if m is not None else None for m in model._masks[(T, "cpu")]]
    with pytest.raises(prepare.PrepareError, match=refusal):  # a (1, 1) block mask whose mask_mod reads h
        handed_off(model, tmp_path / "by_head.pt")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: train.py's compiled model, flex and autocast")
def test_the_gpu_models_hand_off_gives_its_logits_on_cuda(monkeypatch, tmp_path):
    """The gpu profile's model as train.py runs it (torch.compile, compiled flex_attention, bf16 autocast and
    embeddings), handed off and loaded as the evaluator loads it: the graph, run without autocast, gives its logits."""
    T_gpu = prepare.PROFILES["gpu"]["MAX_SEQ_LEN"]
    monkeypatch.setattr(prepare, "MAX_SEQ_LEN", T_gpu)
    config = train.GPTConfig(sequence_len=T_gpu, vocab_size=8192, n_layer=4, n_head=4, n_kv_head=4, n_embd=512)
    with torch.device("meta"):
        model = train.GPT(config)
    model.to_empty(device="cuda")
    model.init_weights()
    model.attention_masks(T_gpu, model.cos.device)  # as train.py builds them, before torch.compile
    compiled = torch.compile(model, dynamic=False)
    x = torch.randint(0, 8192, (4, T_gpu), device="cuda")
    with torch.no_grad(), torch.amp.autocast("cuda", dtype=torch.bfloat16):
        expected = compiled(x).float()
        saved = handed_off(compiled, tmp_path / "model.pt", batch_size=4)
    assert "flex_attention" not in saved["graph"] and "scaled_dot_product_attention" in saved["graph"]
    graph, batch_size = evaluate.load_graph(tmp_path / "model.pt", torch.device("cuda"))
    with torch.no_grad():
        got = graph(x).float()
    err = ((got - expected).abs().max() / expected.abs().max()).item()
    assert batch_size == 4 and err < 2e-2, f"the handed-off graph's logits differ by {err:.2e} of the largest"


class Planted:
    """Unpickled, it makes the folder `marker`: proof that the evaluator ran code from the hand-off."""
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def in_graph(old, new):
    """A real hand-off with `new` for `old` in its graph's JSON (without `old`, nothing is refused: the test fails)."""
    return lambda saved, marker: {**saved, "graph": saved["graph"].replace(old, new)}


@pytest.mark.parametrize("forge, refusal", [  # a forgery of a real hand-off -> what the refusal says
    (in_graph("torch.ops.aten.tanh.default", "torch.os.system"), "holds torch.os.system"),
    (lambda saved, marker: in_graph('"verifiers": ["ATEN"]', '"verifiers": ["TRAINING"]')(
        in_graph("torch.ops.aten.tanh.default", "torch.ops.aten.tanh_.default")(saved, marker), marker),
     "aten.tanh_.default: only pure operators run here"),  # in a dialect torch's verifier does not check: ours does
    (in_graph('{"as_int": %d}' % T, '{"as_expr": {"expr_str": "s0", "hint": null}}'), "holds as_expr"),
    (lambda saved, marker: {**saved, "state_dict": {"w": Planted(marker)}}, "UnpicklingError"),
    (lambda saved, marker: {**saved, "state_dict": pickle.dumps({"w": Planted(marker)})}, "dicts of tensors"),
], ids=["a call into os", "an in-place operator", "a symbolic shape", "a pickled object", "pickle bytes"])
def test_a_forged_hand_off_is_refused_in_one_line_before_any_of_it_runs(cpu_profile, tmp_path, forge, refusal):
    """Pickle bytes beside a real graph: weights_only lets them through, and torch's deserializer would unpickle."""
    marker = tmp_path / "unpickled"
    torch.save(forge(handed_off(tiny_model(cpu_profile), tmp_path / "real.pt"), marker), tmp_path / "forged.pt")
    with pytest.raises(evaluate.EvalError, match=refusal) as refused:
        evaluate.load_graph(tmp_path / "forged.pt", torch.device("cpu"))
    assert "\n" not in str(refused.value) and not marker.exists(), "the hand-off ran code in the evaluator"


def probe_leak(model, tokenizer):
    """future_leak of model over the first 4 batches of 4 validation rows, every batch probed."""
    probe = evaluate.Probe(model, tokenizer.get_vocab_size(), every=1)
    loader = prepare.make_dataloader(tokenizer, 4, T, "val", device="cpu")
    with torch.no_grad():
        for _ in range(4):
            x = next(loader)[0]
            probe(x, model(x))
    return probe.leak


def test_the_probe_sees_a_model_that_reads_later_tokens_even_one_that_hides_from_probe_batches(cpu_profile):
    """Non-causal attention scores well on held-out text too: only the logits tell. Also seen: a model that reads
    ahead in the second half of a row (test_cheats' "sees ahead", run for real) only in batches without probes."""
    model = tiny_model(cpu_profile)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(train, "attention", lambda q, k, v, mask: sdpa(q, k, v))  # no mask: sees everything
        leak = probe_leak(model, cpu_profile)
    assert leak > 5 * FUTURE_TOLERANCE, f"a non-causal model went unseen: future_leak {leak:.2e}"
    rows = prepare.make_dataloader(cpu_profile, 4, T, "val", device="cpu")
    known = {tuple(row.tolist()) for _ in range(4) for row in next(rows)[0]}  # a model that memorised the val rows

    def hides_from_probes(idx):  # causal on a batch with a row it does not know (a probe), else it reads ahead
        logits = model(idx)
        if any(tuple(row.tolist()) not in known for row in idx):
            return logits
        ahead = torch.nn.functional.one_hot(idx.roll(-1, 1), logits.size(-1)).float()  # the next token, from T/2 on
        return logits + 5 * ahead * (torch.arange(idx.size(1)) >= idx.size(1) // 2)[None, :, None]
    leak = probe_leak(hides_from_probes, cpu_profile)
    assert leak > 5 * FUTURE_TOLERANCE, f"a model that hid from the probes went unseen: future_leak {leak:.2e}"

"""train.py's compiled GPU path (the model around FlexAttention and its cached block masks, the two optimizer
kernels) on the CPU: inductor cannot compile FlexAttention with gradients there, so the training graph is traced
with fullgraph and run through AOT autograd, the evaluation graph and the kernels through inductor. A change
that adds a graph break, or a recompilation as the schedules move step to step, fails here."""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import train

B, T, VOCAB = 2, 256, 64  # two of flex's 128-token blocks: full, partial and skipped blocks all occur
CALL_KINDS = 2            # what the loop compiles: a train step (with the layer stats' RMS), no-grad eval
pytestmark = pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")


@pytest.fixture(autouse=True)
def flex_masks(monkeypatch):
    """CUDA's attention on the CPU: block masks and flex_attention, a fresh dynamo state per test."""
    mask = train.sliding_window_mask
    monkeypatch.setattr(train, "sliding_window_mask", lambda T, window, device, flex: mask(T, window, device, True))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def small_model(n_layer=2, pattern="SL", masks=True):
    torch.manual_seed(0)
    model = train.GPT(train.GPTConfig(T, VOCAB, n_layer, n_head=2, n_kv_head=2, n_embd=64, window_pattern=pattern))
    model.init_weights()
    if masks:
        model.attention_masks(T, torch.device("cpu"))  # as train.py does, before compiling
    return model


def batch(seed):
    rows = torch.randint(0, VOCAB, (B, T + 1), generator=torch.Generator().manual_seed(seed))
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def test_the_bf16_training_loop_is_two_graphs_that_never_recompile_once_its_masks_are_built(monkeypatch):
    """Several steps of the loop as CUDA runs it (bf16 embeddings, bf16 autocast, the optimizer's kernels
    compiled, the schedules moving every step) on the model compiled with fullgraph, so a graph break fails:
    the model keeps its two graphs, the kernels one per shape group, and attention sees one dtype. A model compiled
    before its masks are built is refused: a mask built inside the graph would be rebuilt every step."""
    with pytest.raises(Exception, match="build the masks before torch.compile"):
        torch.compile(small_model(masks=False), dynamic=False, fullgraph=True, backend="aot_eager")(*batch(5))
    model = small_model()
    for embedding in (model.transformer.wte, *model.value_embeds.values()):
        embedding.to(dtype=torch.bfloat16)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)  # stands in for CUDA's
    dtypes, attention = set(), train.attention

    def spy(q, k, v, mask):
        dtypes.add((q.dtype, k.dtype, v.dtype))
        return attention(q, k, v, mask)
    with monkeypatch.context() as patch, autocast:  # eager: the spy's set would be a guard of the compiled graph
        patch.setattr(train, "attention", spy)
        model(*batch(4))
    assert dtypes == {(torch.bfloat16,) * 3}, f"q, k, v dtypes under autocast: {dtypes}"
    model_counter, kernel_counter = CompileCounterWithBackend("aot_eager"), CompileCounterWithBackend("eager")
    compiled = torch.compile(model, dynamic=False, fullgraph=True, backend=model_counter)
    for name in ("adamw_step", "muon_step"):
        monkeypatch.setattr(train, name, torch.compile(getattr(train, name), dynamic=False, fullgraph=True,
                                                       backend=kernel_counter))
    optimizer, kernel_compiles = model.setup_optimizer(matrix_lr=0.04, embedding_lr=0.6, weight_decay=0.2), []
    for step in range(4):
        x, y = batch(step)
        with autocast:
            loss = compiled(x, y, return_act_rms=True)[0]
        loss.backward()
        for group in optimizer.param_groups:  # what the loop's schedules do
            group["lr"] = group["initial_lr"] * (1 - step / 4)
            if group["kind"] == "muon":
                group["momentum"] = train.get_muon_momentum(step)
                group["weight_decay"] = train.get_weight_decay(step / 4)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        with torch.no_grad(), autocast:
            compiled(x, y, reduction="none")
        kernel_compiles.append(kernel_counter.frame_count)
    assert model_counter.frame_count == CALL_KINDS, f"{model_counter.frame_count} graphs for {CALL_KINDS} kinds of call"
    assert kernel_compiles[1:] == kernel_compiles[:1] * 3, f"kernel compilations after each step: {kernel_compiles}"


def test_compiled_training_and_evaluation_graphs_equal_eager():
    model = small_model(n_layer=4, pattern="SSSL")
    x, y = batch(1)
    steps, compiled = [], torch.compile(model, dynamic=False, fullgraph=True, backend="aot_eager_decomp_partition")
    for forward in (model, compiled):  # the training graph: loss, block output RMS and every gradient
        loss, act_rms = forward(x, y, return_act_rms=True)
        loss.backward()
        steps.append({"loss": loss, "act_rms": act_rms, **{f"{n}.grad": p.grad for n, p in model.named_parameters()}})
        model.zero_grad(set_to_none=True)
    for name, want in steps[0].items():  # eager, then compiled
        err = (steps[1][name] - want).abs().max().item()
        assert err < 1e-5, f"{name}: compiled vs eager differ by {err:.2e}"
    torch._dynamo.reset()
    with torch.no_grad():  # the evaluation graph, through inductor
        eager, nats = model(x, y, reduction="none"), torch.compile(model, dynamic=False, fullgraph=True)(
            x, y, reduction="none")
    err = (nats - eager).abs().max().item()
    assert nats.shape == (B * T,) and err < 1e-5, f"per-token nats: compiled vs eager differ by {err:.2e}"


def test_inductor_optimizer_kernels_equal_eager():
    """Both kernels compiled by inductor update their arguments in place as eager does, every hyperparameter moving
    (that none recompiles them: the loop test). AdamW agrees to rounding. Muon's bf16 polar express magnifies
    rounding (inductor keeps fused intermediates in fp32) to ~7% of the update's norm, AR's kernel alike: only a
    gross departure (no update, a wrong branch, a lost in-place write) fails there."""
    adamw, muon = (torch.compile(f, dynamic=False, fullgraph=True) for f in (train.adamw_step, train.muon_step))
    torch.manual_seed(3)
    start = {"adamw": [torch.randn(16, 8), torch.zeros(16, 8), torch.zeros(16, 8)],  # parameter, first, second moment
             "muon": [torch.randn(2, 32, 16), torch.zeros(2, 32, 16), torch.zeros(2, 32, 1)]}
    eager, compiled = ({k: [s.clone() for s in v] for k, v in start.items()} for _ in range(2))
    for step in range(1, 4):  # every hyperparameter moves every step, as the schedules do, each a 0-d tensor
        grad, grads = torch.randn(16, 8), torch.randn(2, 32, 16)
        hyper = [torch.tensor(float(h)) for h in (step, 0.01 / step, 0.8, 0.95, 1e-10, 0.1 * step)]
        muon_hyper = [torch.tensor(h) for h in (0.85 + 0.03 * step, 0.04 / step, 0.2 / step, 0.95)] + [5, -1]
        for kernels, state in (((train.adamw_step, train.muon_step), eager), ((adamw, muon), compiled)):
            kernels[0](state["adamw"][0], grad, *state["adamw"][1:], *hyper)
            kernels[1](grads.clone(), state["muon"][0], *state["muon"][1:], *muon_hyper)
    for kind, i, name, rel in [("adamw", 0, "update", 1e-5), ("adamw", 2, "second moment", 1e-5),
                               ("muon", 1, "momentum", 1e-5), ("muon", 0, "update", 0.25),
                               ("muon", 2, "second moment", 0.25)]:
        a, b = (state[kind][i] - start[kind][i] for state in (eager, compiled))  # what the steps changed
        err = ((a - b).norm() / a.norm()).item()
        assert err <= rel, f"{kind} {name}: inductor vs eager differ by {err:.2e} of its norm (allowed {rel})"

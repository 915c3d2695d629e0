"""Our train.py against figures from karpathy/autoresearch's own train.py (tests/reference/: the recipe,
its generator and the stored figures). The model's initialisation, forward, loss and gradients, the
MuonAdamW steps under the schedules, the schedules and the hyperparameters must all be AR's.

Two attention paths: our own (SDPA on the CPU) must match AR's within float32 rounding; with the
recipe's explicit attention swapped in, everything else must match to the last bits, which is what lets
a handful of optimizer steps (whose bf16 orthogonalization amplifies any rounding difference) be
compared tightly. Tolerances assume the CPU kind the figures were made on (see meta in the JSON)."""
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from tests.reference import recipe  # noqa: E402
from tests.reference.common import explicit_attention  # noqa: E402

pytestmark = pytest.mark.reference
FIGURES = json.loads((ROOT / "tests" / "reference" / "model_figures.json").read_text())
MODELS = sorted(recipe.CONFIGS)


@pytest.fixture
def ours():
    return vars(train)


@pytest.fixture
def ours_on_explicit_attention(monkeypatch):
    """train.py with the recipe's attention in place of ours: query i sees keys i-w..i, w read off our mask."""
    def attention(q, k, v, mask):  # (B, H, T, D), as train.attention takes them
        window = q.size(2) if mask is None else int(mask[-1].sum()) - 1
        y = explicit_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), (window, 0))
        return y.transpose(1, 2)
    monkeypatch.setattr(train, "attention", attention)
    return vars(train)


def assert_close(ours, ref, path, rel):
    """Walk two figure trees; a float may differ by rel times the scale of its fingerprint."""
    if isinstance(ref, dict):
        assert sorted(ours) == sorted(ref), f"{path}: keys {sorted(ours)} != AR's {sorted(ref)}"
        for k in ref:
            assert_close(ours[k], ref[k], f"{path}/{k}", rel)
    elif isinstance(ref, list) and len(ref) == 3 and all(isinstance(x, float) for x in ref):
        scale = max(abs(ref[1]), 1e-30)  # a fingerprint: [sum, abs sum, weighted sum]
        worst = max(abs(a - b) for a, b in zip(ours, ref)) / scale
        assert worst <= rel, f"{path}: ours {ours} vs AR {ref} (off by {worst:.2e} of its scale, allowed {rel:.0e})"
    elif isinstance(ref, list):
        assert len(ours) == len(ref), f"{path}: {len(ours)} items, AR has {len(ref)}"
        for i, (a, b) in enumerate(zip(ours, ref)):
            assert_close(a, b, f"{path}[{i}]", rel)
    elif isinstance(ref, float):
        assert math.isclose(ours, ref, rel_tol=rel, abs_tol=rel), f"{path}: ours {ours!r}, AR {ref!r}"
    else:
        assert ours == ref, f"{path}: ours {ours!r}, AR {ref!r}"


def as_json(figures):
    return json.loads(json.dumps(figures))  # tuples to lists, int keys to str: as stored


def test_hyperparameters_are_ars(ours):
    if train.PROFILE != "gpu":
        pytest.skip("the gpu profile's hyperparameters")
    assert_close(as_json(recipe.hyperparameter_figures(ours)), FIGURES["hyperparameters"], "hyperparameters", 0)


def test_optimizer_constants_are_ars(ours):
    assert_close(recipe.constant_figures(ours), FIGURES["constants"], "constants", 0)


def test_optimizer_kernels_are_ars_in_settings_training_never_reaches(ours):
    assert_close(recipe.kernel_figures(ours), FIGURES["kernels"], "kernels", 1e-9)


def test_model_shape_from_depth_is_ars(ours):
    assert_close(as_json(recipe.model_config_figures(ours)), FIGURES["model_configs"], "model_configs", 0)


def test_schedules_are_ars(ours):
    assert_close(as_json(recipe.schedule_figures(ours)), FIGURES["schedules"], "schedules", 1e-12)


@pytest.mark.parametrize("name", MODELS)
def test_initial_parameters_are_ars(ours, name):
    assert_close(as_json(recipe.init_figures(ours, name)), FIGURES["models"][name]["init"], f"{name}/init", 0)


@pytest.mark.parametrize("name", MODELS)
def test_forward_and_gradients_match_ars_on_our_attention(ours, name):
    assert_close(as_json(recipe.forward_figures(ours, name)), FIGURES["models"][name]["forward"],
                 f"{name}/forward", 2e-5)


@pytest.mark.parametrize("name", MODELS)
def test_forward_and_gradients_are_ars_bit_for_bit_on_the_same_attention(ours_on_explicit_attention, name):
    assert_close(as_json(recipe.forward_figures(ours_on_explicit_attention, name)),
                 FIGURES["models"][name]["forward"], f"{name}/forward", 1e-12)


@pytest.mark.parametrize("name", MODELS)
def test_optimizer_steps_under_the_schedules_are_ars(ours_on_explicit_attention, name):
    assert_close(as_json(recipe.step_figures(ours_on_explicit_attention, name)),
                 FIGURES["models"][name]["optimizer"], f"{name}/optimizer", 1e-6)

"""Our train.py against figures from karpathy/autoresearch's own code (tests/reference/), each group within
the tolerance stored with it (meta.tolerances). On the recipe's explicit attention the figures of the machine
that made them are AR's bit for bit; our own attention (SDPA) adds float32 rounding, up to OUR_ATTENTION_TOLERANCE."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import prepare
import train
from tests.reference import recipe
from tests.reference.common import differences, explicit_attention_our_layout, group_of

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.reference
FIGURES = json.loads((ROOT / "tests" / "reference" / "model_figures.json").read_text())
OUR_ATTENTION_TOLERANCE = 2e-5  # SDPA against the explicit softmax attention, relative, on one machine


def assert_matches(ours, where, slack=0.0):
    """ours, as JSON stores it, against the figures at `where` ('models/sl_gqa/forward'): every number within
    its group's tolerance (exact for a group no kind moved) or `slack`, everything else equal."""
    his = FIGURES
    for key in where.strip("/").split("/"):
        his = his[key]
    for path, diff, a, b in differences(json.loads(json.dumps(ours)), his, where):
        assert diff is not None, f"{path}: ours {a!r}, AR's {b!r}"
        tolerance = max(slack, FIGURES["meta"]["tolerances"].get(group_of(path), 0.0))
        assert diff <= tolerance, \
            f"{path}: ours {a} vs AR's {b}: off by {diff:.2e} of its scale, allowed {tolerance:.1e}"


@pytest.mark.parametrize("where", recipe.SETTINGS)
def test_settings_and_schedules_are_ars(where):
    assert_matches(recipe.SETTINGS[where](vars(train)), where)


def test_gpu_profile_keeps_ars_harness_constants():
    assert_matches({k: prepare.PROFILES["gpu"].get(k) for k in FIGURES["ar_prepare"]}, "ar_prepare")


@pytest.mark.parametrize("name", sorted(recipe.CONFIGS))
@pytest.mark.parametrize("part, attention, slack", [
    pytest.param("init", None, 0.0, id="initial_parameters"),
    pytest.param("forward", None, OUR_ATTENTION_TOLERANCE, id="forward_on_our_attention"),
    pytest.param("forward", explicit_attention_our_layout, 0.0, id="forward_on_the_same_attention"),
    pytest.param("optimizer", explicit_attention_our_layout, 0.0, id="optimizer_steps_under_the_schedules"),
])
def test_model_and_optimizer_are_ars(monkeypatch, name, part, attention, slack):
    if attention:
        monkeypatch.setattr(train, "attention", attention)
    assert_matches(recipe.MODEL_PARTS[part](vars(train), name), f"models/{name}/{part}", slack)


@pytest.fixture(scope="module")
def our_loop(tmp_path_factory):
    """train.py's figures, run in the cpu profile in a fresh process on loop.py's stand-ins."""
    tmp = tmp_path_factory.mktemp("reference_loop")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    env.update(AUTORESEARCH_PROFILE="cpu", AUTORESEARCH_CACHE=str(tmp / "cache"), PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-m", "tests.reference.loop", "ours", str(ROOT / "train.py"),
                          str(tmp / "figures.json")], cwd=tmp, env=env, capture_output=True, text=True)
    assert run.returncode == 0, f"train.py on the loop's stand-ins exited {run.returncode}:\n{run.stderr[-4000:]}"
    return json.loads((tmp / "figures.json").read_text())


@pytest.mark.parametrize("parts", [["hyperparameters", "num_steps", "schedules"], ["training"], ["final_params"]],
                         ids=["steps_and_schedules", "losses_and_gradient_norms", "final_parameters"])
def test_training_loop_is_ars(our_loop, parts):
    """AR's hyperparameters at the cpu profile's sizes, as many steps on the same clock (one more time.time()
    call in a step doubles its length), the same schedules, losses, gradient norms and final parameters."""
    for part in parts:
        assert_matches(our_loop[part], f"loop/{part}")


def test_the_loop_trains_through_one_kind_of_call_so_torch_compile_makes_one_training_graph(our_loop):
    """dynamo guards on forward's arguments: a loop that asks for the layer stats only on some steps compiles
    the training graph twice, outside the budget (test_compile counts the graphs of one kind of call)."""
    assert our_loop["training_calls"] == ["tuple"], f"training forwards returned {our_loop['training_calls']}"

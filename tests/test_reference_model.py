"""Our train.py against figures from karpathy/autoresearch's own code (tests/reference/: the recipes, their
generator and the stored figures). The model's initialisation, forward, loss and gradients, MuonAdamW's
steps under the schedules, the schedules and hyperparameters, the gpu profile's harness constants, and
the training loop itself (train.py run as the script it is) must all be AR's.

Each group of figures has a tolerance stored with them (meta.tolerances): the generator recomputed AR's
figures under several emulated CPU kinds (ATen's vectorization, oneDNN's bf16 and MKL's fp32 matmul
kernels, thread counts), and a group's tolerance is a fixed multiple of the largest difference any kind
made in it (meta.spreads). Settings, schedules and step counts no kind moved by a bit and must match
exactly; figures along the training steps are held step by step, tightly at first, loosely later (one
bf16 rounding that flips in Muon cascades). With the recipe's explicit attention in place of ours, the
figures of the machine that made them are AR's bit for bit; our own attention (SDPA on the CPU) adds
float32 rounding, up to OUR_ATTENTION_TOLERANCE."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import prepare  # noqa: E402
import train  # noqa: E402
from tests.reference import recipe  # noqa: E402
from tests.reference.common import differences, explicit_attention_our_layout  # noqa: E402
from tests.reference.loop import CLOCK_DT  # noqa: E402

pytestmark = pytest.mark.reference
FIGURES = json.loads((ROOT / "tests" / "reference" / "model_figures.json").read_text())
TOLERANCES = FIGURES["meta"]["tolerances"]
MODELS = sorted(recipe.CONFIGS)
OUR_ATTENTION_TOLERANCE = 2e-5  # SDPA against the explicit softmax attention, relative, on one machine


@pytest.fixture
def ours():
    return vars(train)


@pytest.fixture
def ours_on_explicit_attention(monkeypatch):
    monkeypatch.setattr(train, "attention", explicit_attention_our_layout)
    return vars(train)


def assert_matches(ours, ref, what, tolerance):
    """Every number within `tolerance` (relative, see common.differences), everything else equal."""
    for path, diff, a, b in differences(ours, ref):
        assert diff is not None, f"{what}{path}: ours {a!r}, AR's {b!r}"
        assert diff <= tolerance, f"{what}{path}: ours {a} vs AR's {b}: off by {diff:.2e} of its scale, allowed {tolerance:.1e}"


def as_json(figures):
    return json.loads(json.dumps(figures))  # tuples to lists, int keys to str: as stored

# ---------------------------------------------------------------------------
# Hyperparameters, constants, schedules
# ---------------------------------------------------------------------------

def test_hyperparameters_are_ars(ours):
    assert_matches(as_json(recipe.hyperparameter_figures(ours)), FIGURES["hyperparameters"], "hyperparameters", 0)


def test_gpu_profile_keeps_ars_harness_constants():
    ours, his = prepare.PROFILES["gpu"], FIGURES["ar_prepare"]
    differ = {k: (ours.get(k), his[k]) for k in his if ours.get(k) != his[k]}
    assert not differ, f"prepare.PROFILES['gpu'] differs from AR's prepare.py (ours, his): {differ}"


def test_optimizer_constants_are_ars(ours):
    assert_matches(recipe.constant_figures(ours), FIGURES["constants"], "constants", TOLERANCES["constants"])


def test_optimizer_kernels_are_ars_in_settings_training_never_reaches(ours):
    assert_matches(recipe.kernel_figures(ours), FIGURES["kernels"], "kernels", TOLERANCES["kernels"])


def test_model_shape_from_depth_is_ars(ours):
    assert_matches(as_json(recipe.model_config_figures(ours)), FIGURES["model_configs"], "model_configs", 0)


def test_schedules_are_ars(ours):
    assert_matches(as_json(recipe.schedule_figures(ours)), FIGURES["schedules"], "schedules", TOLERANCES["schedules"])

# ---------------------------------------------------------------------------
# The model and the optimizer
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_initial_parameters_are_ars(ours, name):
    assert_matches(as_json(recipe.init_figures(ours, name)), FIGURES["models"][name]["init"], f"{name}/init",
                   TOLERANCES["init"])


@pytest.mark.parametrize("name", MODELS)
def test_forward_and_gradients_match_ars_on_our_attention(ours, name):
    assert_matches(as_json(recipe.forward_figures(ours, name)), FIGURES["models"][name]["forward"],
                   f"{name}/forward", max(OUR_ATTENTION_TOLERANCE, TOLERANCES["forward"]))


@pytest.mark.parametrize("name", MODELS)
def test_forward_and_gradients_are_ars_on_the_same_attention(ours_on_explicit_attention, name):
    assert_matches(as_json(recipe.forward_figures(ours_on_explicit_attention, name)),
                   FIGURES["models"][name]["forward"], f"{name}/forward", TOLERANCES["forward"])


@pytest.mark.parametrize("name", MODELS)
def test_optimizer_steps_under_the_schedules_are_ars(ours_on_explicit_attention, name):
    ours, his = as_json(recipe.step_figures(ours_on_explicit_attention, name)), FIGURES["models"][name]["optimizer"]
    assert_matches(ours["param_groups"], his["param_groups"], f"{name}/param_groups", TOLERANCES["optimizer_param_groups"])
    assert len(ours["steps"]) == len(his["steps"])
    for step, (a, b) in enumerate(zip(ours["steps"], his["steps"])):
        assert_matches(a, b, f"{name}/step {step}", TOLERANCES[f"optimizer_steps[{step}]"])
    assert_matches(ours["state"], his["state"], f"{name}/optimizer state", TOLERANCES["optimizer_state"])


# ---------------------------------------------------------------------------
# The training loop: train.py run as a script (tests/reference/loop.py)
# ---------------------------------------------------------------------------

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


def test_training_loop_takes_ars_steps_under_ars_schedules(our_loop):
    his = FIGURES["loop"]
    assert_matches(our_loop["hyperparameters"], his["hyperparameters"],
                   "loop (AR's hyperparameters at the cpu profile's sizes)/hyperparameters", 0)
    assert our_loop["num_steps"] == his["num_steps"], \
        (f"{our_loop['num_steps']} steps, AR took {his['num_steps']} on the same clock: TIME_BUDGET "
         f"{his['hyperparameters']['TIME_BUDGET']}s of steps of {CLOCK_DT}s after the untimed warm-up steps "
         f"(a time.time() call between a step's t0 and t1 would make it last {2 * CLOCK_DT}s)")
    assert_matches(our_loop["schedules"], his["schedules"], "loop/schedules set in the optimizer",
                   TOLERANCES["loop_schedules"])


def test_training_loop_losses_and_gradients_are_ars(our_loop):
    for step, (ours, his) in enumerate(zip(our_loop["training"], FIGURES["loop"]["training"])):
        assert_matches(ours, his, f"loop/step {step}", TOLERANCES[f"loop_training[{step}]"])


def test_training_loop_ends_on_ars_parameters(our_loop):
    assert_matches(our_loop["final_params"], FIGURES["loop"]["final_params"], "loop/final_params",
                   TOLERANCES["loop_final_params"])

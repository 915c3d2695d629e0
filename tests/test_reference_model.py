"""Our train.py against figures from karpathy/autoresearch's own code (tests/reference/): the model's
initialisation, forward, loss and gradients, MuonAdamW's steps under the schedules, the schedules and
hyperparameters, the gpu profile's harness constants, and the training loop itself (train.py run as the
script it is) must all be AR's, each group of figures within the tolerance stored with it (meta.tolerances,
from the CPU kinds make_model_figures emulates). With the recipe's explicit attention in place of ours,
the figures of the machine that made them are AR's bit for bit; our own attention (SDPA on the CPU) adds
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
from tests.reference.common import differences, explicit_attention_our_layout, group_of  # noqa: E402
from tests.reference.loop import CLOCK_DT  # noqa: E402

pytestmark = pytest.mark.reference
FIGURES = json.loads((ROOT / "tests" / "reference" / "model_figures.json").read_text())
TOLERANCES = FIGURES["meta"]["tolerances"]
MODELS = sorted(recipe.CONFIGS)
OUR_ATTENTION_TOLERANCE = 2e-5  # SDPA against the explicit softmax attention, relative, on one machine


def assert_matches(ours, where, slack=0.0):
    """ours against the stored figures at `where` ('models/sl_gqa/forward'), as stored (JSON): every
    number within its group's tolerance (common.group_of; exact for a group no kind moved) or `slack`,
    everything else equal."""
    his = FIGURES
    for key in where.strip("/").split("/"):
        his = his[key]
    for path, diff, a, b in differences(json.loads(json.dumps(ours)), his, where):
        assert diff is not None, f"{path}: ours {a!r}, AR's {b!r}"
        tolerance = max(slack, TOLERANCES.get(group_of(path), 0.0))
        assert diff <= tolerance, \
            f"{path}: ours {a} vs AR's {b}: off by {diff:.2e} of its scale, allowed {tolerance:.1e}"


@pytest.mark.parametrize("where, figures", [
    ("hyperparameters", recipe.hyperparameter_figures),
    ("constants", recipe.constant_figures),  # the optimizer's
    ("kernels", recipe.kernel_figures),      # the optimizer's, in settings training never reaches
    ("model_configs", recipe.model_config_figures),  # the model's shape from DEPTH
    ("schedules", recipe.schedule_figures),
])
def test_settings_and_schedules_are_ars(where, figures):
    assert_matches(figures(vars(train)), where)


def test_gpu_profile_keeps_ars_harness_constants():
    assert_matches({k: prepare.PROFILES["gpu"].get(k) for k in FIGURES["ar_prepare"]}, "ar_prepare")


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("part, figures, attention, slack", [
    pytest.param("init", recipe.init_figures, None, 0.0, id="initial_parameters"),
    pytest.param("forward", recipe.forward_figures, None, OUR_ATTENTION_TOLERANCE, id="forward_on_our_attention"),
    pytest.param("forward", recipe.forward_figures, explicit_attention_our_layout, 0.0,
                 id="forward_on_the_same_attention"),
    pytest.param("optimizer", recipe.step_figures, explicit_attention_our_layout, 0.0,
                 id="optimizer_steps_under_the_schedules"),
])
def test_model_and_optimizer_are_ars(monkeypatch, name, part, figures, attention, slack):
    if attention:
        monkeypatch.setattr(train, "attention", attention)
    assert_matches(figures(vars(train), name), f"models/{name}/{part}", slack)


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
    """AR's hyperparameters at the cpu profile's sizes, as many steps, the same schedules set in the optimizer."""
    his = FIGURES["loop"]
    assert_matches(our_loop["hyperparameters"], "loop/hyperparameters")
    assert our_loop["num_steps"] == his["num_steps"], \
        (f"{our_loop['num_steps']} steps, AR took {his['num_steps']} on the same clock: TIME_BUDGET "
         f"{his['hyperparameters']['TIME_BUDGET']}s of steps of {CLOCK_DT}s after the untimed warm-up steps "
         f"(a time.time() call between a step's t0 and t1 would make it last {2 * CLOCK_DT}s)")
    assert_matches(our_loop["schedules"], "loop/schedules")


@pytest.mark.parametrize("figures", ["training", "final_params"])  # each step's losses and gradient norm; the end
def test_training_loop_losses_gradients_and_final_parameters_are_ars(our_loop, figures):
    assert_matches(our_loop[figures], f"loop/{figures}")

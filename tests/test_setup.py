"""The set-up files keep runs reproducible and keep run outputs out of the agent's commits."""
import subprocess
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11; .python-version pins 3.11

ROOT = Path(__file__).resolve().parent.parent
RUN_OUTPUTS = ["run.log", "metrics.jsonl", "run_summary.json", "results.tsv",
               ".auto-log-research/results.tsv", ".auto-log-research/abc1234/analysis.md"]


def test_run_outputs_are_never_committed():
    # the agent commits with `git add train.py`, but a stray `git add -A` must not sweep run outputs in
    out = subprocess.run(["git", "check-ignore", "--no-index", *RUN_OUTPUTS],
                         cwd=ROOT, capture_output=True, text=True)
    ignored = set(out.stdout.split())
    assert ignored == set(RUN_OUTPUTS), f"not ignored: {sorted(set(RUN_OUTPUTS) - ignored)}"


def test_torch_is_pinned_exactly_and_there_is_no_build_system():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "build-system" not in project, "set-up is uv alone: no build system"
    torch_req = [d for d in project["project"]["dependencies"] if d.startswith("torch")]
    assert len(torch_req) == 1 and "==" in torch_req[0], f"torch must be pinned exactly: {torch_req}"
    assert any(d.startswith("pytest") for d in project["dependency-groups"]["dev"])

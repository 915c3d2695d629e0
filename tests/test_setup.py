"""The set-up files keep runs reproducible, keep run outputs out of the agent's commits, and let the
agent write train.py and its notes and nothing else that the harness or the audit relies on."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from permissions import decide

pytestmark = pytest.mark.quick

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = json.loads((ROOT / ".claude" / "settings.json").read_text())
SHARED = "/srv/alr/.auto-log-research"  # an archive that workers.py's agents share, outside their worktrees
RUN_OUTPUTS = ["run.log", "metrics.jsonl", "run_summary.json", "results.tsv",
               ".auto-log-research/results.tsv", ".auto-log-research/abc1234/analysis.md"]


def test_run_outputs_are_never_committed():
    # the agent commits with `git add train.py`, but a stray `git add -A` must not sweep run outputs in
    out = subprocess.run(["git", "check-ignore", "--no-index", *RUN_OUTPUTS], cwd=ROOT, capture_output=True, text=True)
    ignored = set(out.stdout.split())
    assert ignored == set(RUN_OUTPUTS), f"not ignored: {sorted(set(RUN_OUTPUTS) - ignored)}"


# .claude/settings.json: the agent writes train.py and its notes, and nothing that audit checks
AGENT_WRITES = ["train.py", ".auto-log-research/insights.md", ".auto-log-research/ideas_queue.md",
                ".auto-log-research/a1b2c3d/analysis.md", ".auto-log-research/a1b2c3d-2/analysis.md",
                f"{SHARED}/a1b2c3d/analysis.md"]
RUN_FILES = ("run.json", "run.log", "metrics.jsonl", "diff.patch")  # a run directory's record and evidence
EVIDENCE = [".auto-log-research/results.tsv", ".auto-log-research/results.tsv.torn", ".auto-log-research/claims.tsv",
            ".auto-log-research/workers/node7%3A0/insights.md", f"{SHARED}/results.tsv", ".git/packed-refs",
            *(f"{archive}/{run}/{name}" for archive in (".auto-log-research", SHARED)
              for run in ("a1b2c3d", "a1b2c3d-2") for name in RUN_FILES),
            "run.json", "run_summary.json", "metrics.jsonl",  # train.py's outputs before they are archived
            "prepare.py", "analyze.py", "harness/record.py", "harness/loop.py", "program.md", ".claude/settings.json",
            ".git/refs/auto-log-research/pins/autoresearch/mar5", ".git/logs/refs/auto-log-research/pins/x"]
# analyze.py writes these, rebuilt from the evidence: not denied, but Claude Code asks and `claude -p` refuses
NOT_THE_AGENTS = ["run.log", "results.tsv", "README.md", "tests/test_setup.py", "../outside.txt", "/srv/alr/train.py",
                  ".auto-log-research/progress.png", ".auto-log-research/a1b2c3d/loss.png",
                  ".auto-log-research/compare_a_b/loss.png", ".auto-log-research/harness.json",
                  ".auto-log-research/.lock", ".auto-log-research/notes.txt", f"{SHARED}/progress.png",
                  f"{SHARED}/insights.md", f"{SHARED}/a1b2c3d/loss.png"]


@pytest.mark.parametrize("path", AGENT_WRITES + NOT_THE_AGENTS)
def test_the_agent_may_write_train_py_and_its_notes_and_nothing_else(path):
    verdicts = [decide(SETTINGS, tool, path) for tool in ("Edit", "Write")]
    assert verdicts == ["allow"] * 2 if path in AGENT_WRITES else "allow" not in verdicts, (path, verdicts)


@pytest.mark.parametrize("path", EVIDENCE)
def test_the_evidence_and_the_harness_are_denied_to_every_tool_that_writes(path):
    calls = [(tool, path) for tool in ("Edit", "Write", "NotebookEdit")] + [("Bash", command) for command in (
        f"cat .auto-log-research/scratch/x.txt > {path}", f"tail -n 1 run.log >> {path}", f"git diff --output={path}")]
    verdicts = {call: decide(SETTINGS, *call) for call in calls}
    assert set(verdicts.values()) == {"deny"}, f"{path}: {verdicts}"


def test_the_agent_runs_no_code_of_its_own_lists_branches_and_reads_only_its_own_variables():
    """train.py runs only under the harness; the agent's own scripts not at all; no secrets reach it."""
    refused = ["uv run train.py > run.log 2>&1", "uv run python x.py", "python3 -c 'print(1)'", "printenv", "env",
               "printenv ANTHROPIC_API_KEY", "printenv AUTORESEARCH_WORKER ANTHROPIC_API_KEY",
               "git branch autoresearch/other 1a2b3c4", "git worktree add ../x autoresearch/t-1",
               "git worktree remove ../alr-workers/t-1", "git push . HEAD:autoresearch/t-1"]
    allowed = ['git branch --list "autoresearch/*"', "git branch --show-current", "printenv AUTORESEARCH_WORKER",
               "printenv AUTORESEARCH_ARCHIVE"]
    assert [c for c in refused if decide(SETTINGS, "Bash", c) == "allow"] == []
    assert [c for c in allowed if decide(SETTINGS, "Bash", c) != "allow"] == []


@pytest.mark.parametrize("command", [
    "git update-ref refs/auto-log-research/pins/autoresearch/mar5 HEAD", "git tag -d alr-pin", "git gc --prune=now",
    "git replace 1a2b3c4 5d6e7f8", "git reflog expire --expire=now --all", "git prune", "git rebase -i HEAD~3",
    "git symbolic-ref HEAD refs/heads/x", "git config core.logAllRefUpdates false", "git filter-branch --force HEAD",
    "git branch -m autoresearch/mar5 x", "git branch -M x", "git branch --move x", "git branch -c x", "git branch -f x",
    "git branch -D autoresearch/mar5", "git reset --hard HEAD~1", "git commit --amend -m x", "uv run analyze.py repin",
    "uv run python analyze.py repin", "uv run analyze.py list && uv run analyze.py repin",
])
def test_the_agent_cannot_move_or_remove_the_pin(command):
    assert decide(SETTINGS, "Bash", command) == "deny", f"{command!r} is {decide(SETTINGS, 'Bash', command)}"


def test_the_default_install_leaves_skypilot_out():
    if not shutil.which("uv"):
        pytest.skip("uv is not on PATH")
    out = subprocess.run(["uv", "export", "--frozen", "--no-hashes", "-q"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    pulled_in = [line for line in out.stdout.splitlines() if line.startswith(("skypilot", "kubernetes"))]
    assert not pulled_in, f"`uv sync` would install SkyPilot: {pulled_in}"

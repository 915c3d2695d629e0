"""Claude Code's permission rules, matched as Claude Code matches them: decide(tool, arg) is what
.claude/settings.json decides for one tool call, 'deny', 'allow' or 'ask' (which `claude -p` refuses too).

As documented (code.claude.com/docs/en/permissions): a deny always wins; `Bash(cmd)` matches exactly, `*` any
characters, a single trailing ` *` the bare command too (`Bash(ls *)` matches `ls`, `ls -la`, not `lsof`); a
compound command is split, every part must be allowed and a denied part denies the whole; redirections are not
matched. Edit rules (every tool that writes) and Read rules are gitignore-style paths: `//abs`, `/from-root`, else
relative to the working directory, a pattern without a slash at any depth. Where the documentation is silent,
the matcher refuses: a redirection to a file that an Edit rule denies is denied, one outside the project needs
an Edit allow rule, and a command substitution is never allowed.
"""
import json
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = json.loads((ROOT / ".claude" / "settings.json").read_text())
REDIRECT = re.compile(r"^(\d*|&)(>>|>\||>)(.*)$")
GLOB = {r"\*\*/": "(?:.*/)?", r"\*\*": ".*", r"\*": "[^/]*", r"\?": "[^/]"}  # on re.escape's output
# a shell line's pieces: quoted strings, escapes, operators (`&>` and `>&` are redirections), other text
TOKEN = re.compile(r"""'[^']*'|"(?:\\.|[^"\\])*"|\\.|&&|\|\||>&|&>|[^\s'"\\;|&>]+|.""", re.S)


def parse_rule(rule):
    m = re.fullmatch(r"(\w+)(?:\((.*)\))?", rule, re.S)
    assert m, f"not a permission rule: {rule!r}"
    return m.group(1), m.group(2)


def bash_rule_matches(spec, command):
    """Does one Bash rule specifier match one simple command (no operators, no redirections)?"""
    if spec.endswith(" *") and spec.count("*") == 1:  # a trailing " *" also matches the bare command
        return re.fullmatch(re.escape(spec[:-2]) + r"(?: .*)?", command, re.S) is not None
    return re.fullmatch(".*".join(map(re.escape, spec.split("*"))), command, re.S) is not None


def path_rule_matches(spec, path):
    """gitignore-style match of an Edit/Read specifier against a file path (absolute or relative to the root)."""
    if spec is None:
        return True
    target = Path(os.path.normpath(ROOT / path))
    if spec.startswith("//"):  # an absolute path
        pattern = spec[1:]
    else:  # from the project root (the working directory here) if it has a slash, else at any depth
        pattern = f"{ROOT}/{'' if '/' in spec.rstrip('/') else '**/'}{spec.lstrip('/')}"
    regex = re.compile(re.sub(r"\\\*\\\*/|\\\*\\\*|\\\*|\\\?", lambda m: GLOB[m.group()],
                              re.escape(pattern.rstrip("/"))))
    # as in gitignore, a pattern that matches a directory covers everything below it
    return any(regex.fullmatch(str(p)) for p in [target, *target.parents])


def lex(line):
    """Words of each simple command in a shell line, quotes kept."""
    commands, words, word = [], [], ""
    for token in TOKEN.findall(line):
        if token.isspace() or token in ("&&", "||", ";", "|", "&"):
            words, word = words + [word] if word else words, ""
            if token not in (" ", "\t"):  # an operator or a newline ends the command
                commands, words = commands + [words] if words else commands, []
        else:
            word += token
    words = words + [word] if word else words
    return commands + [words] if words else commands


def split_command(line):
    """[(words without redirections, [files they write])] per simple command; None for what Claude Code
    would not auto-allow (a command substitution). 2>&1 reads as the file `&1`, in the project: no verdict changes."""
    if "$(" in line or "`" in line:
        return None
    parts = []
    for words in map(iter, lex(line)):
        kept, targets = [], []
        for word in words:
            if m := REDIRECT.match(word):
                targets.append((m.group(3) or next(words, "")).strip("'\""))  # attached, or the next word
            else:
                kept.append(word)
        parts.append((kept, targets))
    return parts


def decide(tool, arg):
    """'deny', 'allow' or 'ask' for one tool call, as Claude Code's rules would decide it."""
    perms = SETTINGS["permissions"]

    def matches(kind, rule_tool, value):
        matcher = bash_rule_matches if rule_tool == "Bash" else path_rule_matches
        return any(matcher(spec, value) for t, spec in map(parse_rule, perms.get(kind, [])) if t == rule_tool)

    def verdict(rule_tool, value):
        return "deny" if matches("deny", rule_tool, value) else "allow" if matches("allow", rule_tool, value) else "ask"

    if tool in ("Edit", "Write", "NotebookEdit"):
        return verdict("Edit", arg)
    if tool in ("Read", "Glob", "Grep"):  # Read rules cover every tool that reads
        return verdict("Read", arg)
    assert tool == "Bash", tool
    parts = split_command(arg)
    if parts is None:
        return "ask"
    verdicts = []
    for words, targets in parts:
        verdicts.append(verdict("Bash", " ".join(words)))
        for target in targets:  # one that an Edit rule denies, or one outside the project, must be writable too
            if verdict("Edit", target) == "deny" or ROOT not in Path(os.path.normpath(ROOT / target)).parents:
                verdicts.append(verdict("Edit", target))
    return "deny" if "deny" in verdicts else "allow" if set(verdicts) == {"allow"} else "ask"

"""Claude Code's permission rules, matched as Claude Code matches them: decide(settings, tool, arg) is what
.claude/settings.json decides for one tool call, 'deny', 'allow' or 'ask' (which `claude -p` refuses too).

As documented (code.claude.com/docs/en/permissions): a deny always wins; `Bash(cmd)` matches exactly, `*` any
characters, a single trailing ` *` the bare command too (`Bash(ls *)` matches `ls`, `ls -la`, not `lsof`); a
compound command is split, every part must be allowed and a denied part denies the whole; redirections are not
matched. Edit rules (every tool that writes) and Read rules are gitignore-style paths: `//abs`, `/from-root`, else
relative to the working directory, a pattern without a slash at any depth. Where the documentation is silent,
the matcher refuses: a redirection to a file that an Edit rule denies is denied, one outside the project needs
an Edit allow rule, and command substitution or heredocs are never allowed.
"""
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REDIRECT = re.compile(r"^(\d*|&)(>>|>\||>|<)(.*)$")
GLOB = {r"\*\*/": "(?:.*/)?", r"\*\*": ".*", r"\*": "[^/]*", r"\?": "[^/]"}  # on re.escape's output
# a shell line's pieces: quoted strings, escapes, operators (`&>` and `>&` are redirections), other text
TOKEN = re.compile(r"""'[^']*'|"(?:\\.|[^"\\])*"|\\.|&&|\|\||>&|&>|[^\s'"\\;|&>]+|.""", re.S)


def parse_rule(rule):
    m = re.fullmatch(r"(\w+)(?:\((.*)\))?", rule, re.S)
    assert m, f"not a permission rule: {rule!r}"
    return m.group(1), m.group(2)


def bash_rule_matches(spec, command):
    """Does one Bash rule specifier match one simple command (no operators, no redirections)?"""
    if spec is None:
        return True
    if spec.endswith(" *") and spec.count("*") == 1:  # a trailing " *" also matches the bare command
        return re.fullmatch(re.escape(spec[:-2]) + r"(?: .*)?", command, re.S) is not None
    return re.fullmatch(".*".join(map(re.escape, spec.split("*"))), command, re.S) is not None


def path_rule_matches(spec, path, cwd=ROOT):
    """gitignore-style match of an Edit/Read specifier against a file path (absolute or cwd-relative)."""
    if spec is None:
        return True
    target = Path(os.path.normpath(Path(cwd) / path))
    if spec.startswith("/"):
        pattern = spec[1:] if spec.startswith("//") else str(ROOT) + spec
    else:
        rel = spec.removeprefix("./")
        pattern = f"{cwd}/{'' if '/' in rel.rstrip('/') else '**/'}{rel}"  # no slash: at any depth
    regex = re.compile(re.sub(r"\\\*\\\*/|\\\*\\\*|\\\*|\\\?", lambda m: GLOB[m.group()],
                              re.escape(pattern.rstrip("/"))))
    # as in gitignore, a pattern that matches a directory covers everything below it
    return any(regex.fullmatch(str(p)) for p in [target, *target.parents])


def lex(line):
    """Words of each simple command in a shell line, quotes kept; None if a quote is left open."""
    commands, words, word = [], [], ""
    for token in TOKEN.findall(line):
        if token in ("'", '"'):
            return None
        if token.startswith("#") and not word:
            break  # a comment runs to the end of the line
        if token.isspace() or token in ("&&", "||", ";", "|", "&"):
            words, word = words + [word] if word else words, ""
            if token not in (" ", "\t"):  # an operator or a newline ends the command
                commands, words = commands + [words] if words else commands, []
        else:
            word += token
    words = words + [word] if word else words
    return commands + [words] if words else commands


def split_command(line):
    """[(words without redirections, [(operator, target file)])] per simple command; None for what Claude Code
    would not auto-allow (substitution, heredocs). fd duplications like 2>&1 are dropped."""
    if "<<" in line or "$(" in line or "`" in line or (commands := lex(line)) is None:
        return None
    parts = []
    for words in map(iter, commands):
        kept, targets = [], []
        for word in words:
            m = REDIRECT.match(word)
            if not m:
                kept.append(word)
                continue
            target = m.group(3) or next(words, "")  # attached, or the next word
            if not re.fullmatch(r"&\d+|&-", target):
                targets.append((m.group(2), target.strip("'\"")))
        parts.append((kept, targets))
    return parts


def decide(settings, tool, arg):
    """'deny', 'allow' or 'ask' for one tool call, as Claude Code's rules would decide it."""
    perms = settings["permissions"]

    def matches(kind, rule_tool, value):
        matcher = bash_rule_matches if rule_tool == "Bash" else path_rule_matches
        return any(matcher(spec, value) for t, spec in map(parse_rule, perms.get(kind, [])) if t == rule_tool)

    def verdict(rule_tool, value):
        return "deny" if matches("deny", rule_tool, value) else "allow" if matches("allow", rule_tool, value) else "ask"

    if tool in ("Edit", "Write", "NotebookEdit"):
        return verdict("Edit", arg)
    if tool in ("Read", "Glob", "Grep"):  # a bare tool rule (`Read`) allows what no path rule decides
        path_verdict = verdict("Read", arg)
        return "allow" if path_verdict == "ask" and tool in perms.get("allow", []) else path_verdict
    assert tool == "Bash", tool
    if matches("deny", "Bash", arg.strip()):
        return "deny"
    parts = split_command(arg)
    if parts is None:
        return "ask"
    verdicts = []
    for words, targets in parts:
        verdicts.append(verdict("Bash", " ".join(words)))
        for op, target in targets:
            if op == "<" or target == "/dev/null":
                continue
            path = Path(os.path.normpath(ROOT / target))
            if verdict("Edit", target) == "deny" or (path != ROOT and ROOT not in path.parents):
                verdicts.append(verdict("Edit", target))  # denied, or outside the project: must be writable too
    return "deny" if "deny" in verdicts else "allow" if set(verdicts) == {"allow"} else "ask"

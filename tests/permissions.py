"""Claude Code's permission rules, matched as Claude Code matches them, so tests can ask of
.claude/settings.json what Claude Code would decide for one tool call: decide(settings, tool, arg) is
'deny', 'allow' or 'ask' (which `claude -p --permission-mode dontAsk` refuses too).

The matcher follows Claude Code's documented permission semantics (code.claude.com/docs/en/permissions):
- rules are `Tool` or `Tool(specifier)`; deny is checked before allow, and a deny always wins;
- Bash: `Bash(cmd)` matches exactly; `*` matches any characters, spaces included; a single
  trailing ` *` also matches the bare command (`Bash(ls *)` matches `ls` and `ls -la`, not `lsof`);
  the legacy `Bash(cmd:*)` means the same as `Bash(cmd *)`; compound commands (`&&`, `||`, `;`,
  `|`, `&`) are split and every part must be allowed, while a deny on any part denies the whole;
  output redirections are not part of the matched command;
- Edit/Read: gitignore-style paths (`//abs`, `~/home`, `/from-project-root`, otherwise relative to the
  working directory, where a pattern without a slash matches at any depth); Edit rules govern every
  tool that writes files (Edit, Write, NotebookEdit).
Where Claude Code's behaviour is not documented the matcher errs towards refusing: a redirection to a
file that an Edit rule denies denies the command, one to a file outside the project needs an Edit allow
rule (a redirection inside the project, such as `> run.log`, is part of the allowed command), and
command substitution or heredocs are never auto-allowed.
"""
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REDIRECT = re.compile(r"^(\d*|&)(>>|>\||>|<)(.*)$")


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


GLOB = {r"\*\*/": "(?:.*/)?", r"\*\*": ".*", r"\*": "[^/]*", r"\?": "[^/]"}  # on re.escape's output


def glob_to_regex(pattern):
    return re.sub(r"\\\*\\\*/|\\\*\\\*|\\\*|\\\?", lambda m: GLOB[m.group()], re.escape(pattern))


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
            if not inside_project(target):
                verdicts.append(verdict)
    return "allow" if verdicts and all(v == "allow" for v in verdicts) else "ask"


def inside_project(path, cwd=ROOT):
    target = Path(os.path.normpath(Path(cwd) / path))
    return target == ROOT or ROOT in target.parents

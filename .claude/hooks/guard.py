"""A Claude Code PreToolUse hook: the agent's Bash commands are exactly the ones program.md gives.

Permission rules match a command as text, and the shell does not read it as text: git takes `git commit
--amen` as --amend, the shell turns `status ID k'ee'p` into `keep`, and `cat x > .venv/.../evil.pth`
writes a file. So the command is read as bash reads it, by the standard library: shlex (POSIX,
punctuation_chars) splits words where bash does, on blanks and on `;&|()<>`, gives those operators as
tokens of their own, and removes quotes as bash does. That is enough because all else that bash would
read differently is refused in the raw text first: `$` (in double quotes too), backticks, backslashes,
newlines, `<(`, unquoted `#`, unquoted `~` at a word's start, and unquoted globs outside the read-only
tools. Nothing is left to expand, so the words shlex gives are the words the program gets. Commands may
be joined by `;` `&&` `||` `|`; every other operator (a redirect, a subshell, `&`) is refused, except
`2>&1`. Each simple command must match a row of COMMANDS; options are read one letter of a cluster at a
time (-qB is -q -B) and only in full, as git and argparse would expand a unique prefix (`--amen`).

Claude Code sends {"tool_name": "Bash", "tool_input": {"command": ...}} on stdin. Exit 2 refuses the
call and shows the line on stderr to the agent; exit 0 hands it on to settings.json's rules. Any
failure exits 2: a guard that crashes must not let the command through.

Usage:  python3 -I -S .claude/hooks/guard.py < hook.json   (the standard library only: no site-packages)
"""
import json
import re
import shlex
import sys

# -----------------------------------------------------------------------------
# The commands program.md gives. Options: `-m=` takes a value (attached or the next word),
# `--format=?` only an attached one, `-<n>` is a count (-5); ANY: every option, and unquoted globs
# (these tools only read). Every other word must match the pattern; "most" caps how many there are.

ANY = "*"
WORD = r"[^-].*"  # a revision, a path, a run id
GIT_LOG = "--oneline --stat --graph --all --decorate -p --patch --name-only --name-status " \
          "--format=? --pretty=? -n= --max-count= -<n>"
COMMANDS = [  # words it starts with,       options,                        other words,     most
    ("git status",                          "-s --short -b --branch",        WORD,            None),
    ("git log",                             GIT_LOG,                         WORD,            None),
    ("git show",                            GIT_LOG,                         WORD,            None),
    ("git diff",                            "--stat --name-only --cached",   WORD,            None),
    ("git branch --list",                   "-a --all -v --verbose",         WORD,            None),
    ("git branch --show-current",           "",                              WORD,            0),
    ("git rev-parse",                       "--short --abbrev-ref --verify", WORD,            None),
    ("git add",                             "",                              r"train\.py",    1),
    ("git commit",                          "-m= --message=",                r"train\.py",    1),
    ("git checkout -b",                     "",                      r"autoresearch/[\w.-]+", 1),
    ("uv run analyze.py",                   "-h --help",                     WORD,            0),
    ("uv run analyze.py run",               "-h --help",                     r".+",           1),
    ("uv run analyze.py pin",               "-h --help",                     WORD,            0),
    ("uv run analyze.py audit",             "-h --help",                     WORD,            0),
    ("uv run analyze.py list",              "-h --help",                     WORD,            0),
    ("uv run analyze.py best",              "-h --help",                     WORD,            0),
    ("uv run analyze.py show",              "-h --help",                     WORD,            1),
    ("uv run analyze.py compare",           "-h --help",                     WORD,            2),
    ("uv run analyze.py curve",             "-h --help --at=",               WORD,            None),
    ("uv run contrib/shared.py claims",     "-h --help",                     WORD,            0),
    ("uv run contrib/shared.py insights",   "-h --help",                     WORD,            1),
    ("uv run contrib/shared.py claim",      "-h --help",                     r".+",           1),
    ("printenv AUTORESEARCH_WORKER",        "",                              WORD,            0),
    ("printenv AUTORESEARCH_ARCHIVE",       "",                              WORD,            0),
    ("sleep",                               "",                    r"\d+(\.\d+)?[smh]?",      1),
    ("nvidia-smi",                          "",                              WORD,            0),
] + [(tool, ANY, r".*", None) for tool in ("cat", "head", "tail", "grep", "wc", "ls")]
SEPARATORS = {";", "&&", "||", "|"}  # not "&": nothing the agent starts may outlive the call


def options_of(spec):
    """{spelling: 0 no value, 1 a value, 2 an attached value only}, or None for ANY."""
    return None if spec == ANY else {o.split("=")[0]: 2 if o.endswith("=?") else int(o.endswith("="))
                                     for o in spec.split()}


ROWS = [(tuple(lead.split()), options_of(spec), pattern, most) for lead, spec, pattern, most in COMMANDS]


class Refused(Exception):
    pass


def scan(command):
    """The command with `2>&1` blanked out, and a copy in which each quoted character is `_`: the two
    split alike, and the copy shows which characters of a word no quote protects."""
    plain, masked, quote, i = [], [], None, 0
    while i < len(command):
        c = command[i]
        if quote != "'" and (c in "$`\\\n" or command.startswith(("<(", ">("), i)):
            raise Refused(f"no {command[i:i + 2] if c in '<>' else c!r} outside single quotes: it expands")
        if quote is None and c == "#":
            raise Refused("quote the '#' (the shell may read a comment)")
        if quote is None and command[i - 1:i] in " \t" and re.match(r"2>&1($|[ \t;|&])", command[i:]):
            plain.append("    "), masked.append("    ")  # stderr into stdout: no file is opened
            i += 4
            continue
        masked.append("_" if quote and c != quote else c), plain.append(c)
        quote, i = (None if quote else c) if c in "'\"" and quote in (None, c) else quote, i + 1
    return "".join(plain), "".join(masked)


def simple_commands(command):
    """[(argv after quote removal, the same words with quoted characters `_`)], one per command."""
    tokens, masks = [], []
    for text, out in zip(scan(command), (tokens, masks)):
        lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.whitespace, lexer.commenters = True, " \t", ""  # bash's blanks
        out += list(lexer) + [";"]
    if len(tokens) != len(masks):
        raise Refused("quoting too intricate to check")
    commands, argv, mask = [], [], []
    for token, m in zip(tokens, masks):
        if not (m and set(m) <= set("();<>|&")):  # a word: a quoted operator is masked
            argv.append(token), mask.append(m)
        elif m not in SEPARATORS:
            raise Refused(f"no `{m}` (a redirect, subshell or background job): one plain command at a time")
        elif argv:  # an empty one (`ls;`, `ls | | ls`) runs nothing
            commands.append((argv, mask))
            argv, mask = [], []
    return commands


def take_value(option, rest):
    """The next word is the option's value. git takes any word, argparse none that starts with '-':
    refused then, so that both read the command alike."""
    if rest and rest.pop(0).startswith("-"):
        raise Refused(f"the value of {option} may not start with '-'")


def check_words(argv, lead, options, pattern, most):
    name, rest, words = " ".join(lead), list(argv[len(lead):]), []
    while rest:
        w = rest.pop(0)
        if w == "--":
            words += rest
            break
        if options is None or not w.startswith("-") or w == "-":
            words.append(w)
        elif w.startswith("--"):
            option, eq, _ = w.partition("=")
            takes = options.get(option)
            if takes is None or (eq and not takes):
                raise Refused(f"option {w} is not allowed in `{name}` (options must be written in full)")
            if takes == 1 and not eq:
                take_value(w, rest)
        elif not (re.fullmatch(r"-\d+", w) and "-<n>" in options):
            for i, letter in enumerate(w[1:], 1):  # -qB is -q -B; -mmsg is -m with its value
                takes = options.get("-" + letter)
                if takes is None:
                    raise Refused(f"option -{letter} (in {w}) is not allowed in `{name}`")
                if takes:
                    if i == len(w) - 1:
                        take_value(w, rest)
                    break
    if most == 0 and words:
        raise Refused(f"`{' '.join(argv[:len(lead) + 1])}` is not a command program.md gives")
    if most is not None and len(words) > most:
        raise Refused(f"`{name}` takes at most {most} argument(s), got {words}")
    for w in words:
        if not re.fullmatch(pattern, w, re.DOTALL):
            raise Refused(f"`{name}` does not take {w!r}")


def check(argv, mask):
    """One simple command: a row of COMMANDS, its words read as git and argparse read them."""
    if any(re.search(r"(^|[=:])~", m) for m in mask):
        raise Refused(f"no unquoted tilde (~ is the home folder): `{' '.join(argv)}`")
    rows = [row for row in ROWS if tuple(argv[:len(row[0])]) == row[0]]
    if not rows:
        raise Refused(f"`{' '.join(argv[:3])}` is not a command program.md gives")
    lead, options, pattern, most = max(rows, key=lambda row: len(row[0]))
    if options is not None and any(set(m) & set("*?[{") for m in mask):
        raise Refused(f"quote the glob or brace characters in `{' '.join(argv)}`")
    check_words(argv, lead, options, pattern, most)


def main():
    try:
        call = json.load(sys.stdin)
        if call.get("tool_name") != "Bash":
            return 0
        command = call["tool_input"]["command"]
        for argv, mask in simple_commands(command):
            check(argv, mask)
        return 0
    except Refused as e:
        reason = str(e)
    except Exception as e:  # noqa: BLE001 -- a parse error or a bug: refuse, never fail open
        reason = f"could not check this command ({type(e).__name__}: {e})"
    print("guard.py refused: " + " ".join(reason.split()), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

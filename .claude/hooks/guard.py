"""A Claude Code PreToolUse hook: the agent's Bash commands are exactly the ones program.md gives.

Permission rules match a command as text; bash and git do not: git takes `git commit --amen` as --amend, bash
turns `status ID k'ee'p` into `keep`, and `cat x > .venv/.../evil.pth` writes a file. So the command is read as
bash reads it: shlex splits words and operators where bash does and removes quotes, and all else that bash would
read differently (`$`, backticks, backslashes, newlines, `<(`, an unquoted `#`, `~` or glob) is refused first.
Commands may be joined by `;` `&&` `||` `|`; `2>&1` is the one redirect. Each must match a row of COMMANDS, its
options read as git and argparse read them: -qB is -q -B, and only in full (both would expand `--amen`).

Usage (Claude Code sends {"tool_name": "Bash", "tool_input": {"command": ...}}; exit 2 refuses the call and shows
the agent the line on stderr, exit 0 hands it on to settings.json, any failure exits 2):
    python3 -I -S .claude/hooks/guard.py < hook.json   (the standard library only: no site-packages)
"""
import json
import re
import shlex
import sys

# The commands program.md gives. Options: `-m=` takes a value (attached or the next word), `--format=?` only an
# attached one, `-<n>` is a count (-5). Every other word must match the pattern; "most" caps how many there are.
ANY = "*"  # every option, and unquoted globs (these tools only read)
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
    *[(f"uv run analyze.py {sub}", "-h --help", WORD, 0) for sub in ("pin", "audit", "list", "best")],
    ("uv run analyze.py show",              "-h --help",                     WORD,            1),
    ("uv run analyze.py compare",           "-h --help",                     WORD,            2),
    ("uv run analyze.py curve",             "-h --help --at=",               WORD,            None),
    ("uv run contrib/shared.py claims",     "-h --help",                     WORD,            0),
    ("uv run contrib/shared.py insights",   "-h --help",                     WORD,            1),
    ("uv run contrib/shared.py claim",      "-h --help",                     r".+",           1),
    *[(f"printenv AUTORESEARCH_{name}", "", WORD, 0) for name in ("WORKER", "ARCHIVE")],
    ("sleep",                               "",                    r"\d+(\.\d+)?[smh]?",      1),
    ("nvidia-smi",                          "",                              WORD,            0),
    *[(tool, ANY, r".*", None) for tool in ("cat", "head", "tail", "grep", "wc", "ls")],
]
SEPARATORS = {";", "&&", "||", "|"}  # not "&": nothing the agent starts may outlive the call


class Refused(Exception):
    pass


def scan(command):
    """A copy of the command in which each quoted character is `_` and `2>&1` is blanked out, and the command
    blanked alike: the two split alike, and the copy shows which characters of a word no quote protects."""
    masked, quote = [], None
    for i, c in enumerate(command):
        if quote != "'" and (c in "$`\\\n" or command.startswith(("<(", ">("), i)):
            raise Refused(f"no {command[i:i + 2] if c in '<>' else c!r} outside single quotes: it expands")
        if quote is None and c == "#":
            raise Refused("quote the '#' (the shell may read a comment)")
        masked.append("_" if quote and c != quote else c)
        quote = (None if quote else c) if c in "'\"" and quote in (None, c) else quote
    masked = re.sub(r"(?<![^ \t])2>&1(?=$|[ \t;|&])", "    ", "".join(masked))  # stderr into stdout: opens no file
    return "".join(" " if m == " " else c for c, m in zip(command, masked)), masked


def simple_commands(command):
    """[(argv after quote removal, the same words with quoted characters `_`)], one per command."""
    def split(text):
        lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.whitespace, lexer.commenters = True, " \t", ""  # bash's blanks
        return list(lexer) + [";"]
    tokens, masks = map(split, scan(command))
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


def check(argv, mask):
    """One simple command: a row of COMMANDS, its words read as git and argparse read them."""
    if any(re.search(r"(^|[=:])~", m) for m in mask):
        raise Refused(f"no unquoted tilde (~ is the home folder): `{' '.join(argv)}`")
    rows = [row for row in COMMANDS if argv[:len(row[0].split())] == row[0].split()]
    if not rows:
        raise Refused(f"`{' '.join(argv[:3])}` is not a command program.md gives")
    name, spec, pattern, most = max(rows, key=lambda row: len(row[0]))
    if spec != ANY and any(set(m) & set("*?[{") for m in mask):
        raise Refused(f"quote the glob or brace characters in `{' '.join(argv)}`")
    # {spelling: 0 no value, 1 a value, 2 an attached value only}, or None for ANY
    options = None if spec == ANY else {o.split("=")[0]: 2 if o.endswith("=?") else int(o.endswith("="))
                                        for o in spec.split()}
    rest, words = argv[len(name.split()):], []
    while rest:
        w = rest.pop(0)
        if w == "--":
            words += rest
            break
        if options is None or not w.startswith("-") or w == "-":
            words.append(w)
        elif not (re.fullmatch(r"-\d+", w) and "-<n>" in options):
            long = w.startswith("--")  # --opt[=value]; else a cluster: -qB is -q -B, -mmsg is -m with its value
            flags = [w.partition("=")[:2]] if long else [("-" + c, w[i + 1:]) for i, c in enumerate(w[1:], 1)]
            for option, attached in flags:
                takes = options.get(option)
                if takes is None or (long and attached and not takes):
                    raise Refused(f"option {option} (in {w}) is not allowed in `{name}` (write options in full)")
                if takes == 1 and not attached and rest and rest.pop(0).startswith("-"):
                    # git takes any next word as the value, argparse none that starts with '-': both read it alike
                    raise Refused(f"the value of {option} may not start with '-'")
                if takes:
                    break
    if most is not None and len(words) > most:
        raise Refused(f"`{name}` takes at most {most} argument(s), got {words}" if most else
                      f"`{name} {words[0]}` is not a command program.md gives")
    for w in words:
        if not re.fullmatch(pattern, w, re.DOTALL):
            raise Refused(f"`{name}` does not take {w!r}")


def main():
    try:
        call = json.load(sys.stdin)
        if call.get("tool_name") == "Bash":
            for argv, mask in simple_commands(call["tool_input"]["command"]):
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

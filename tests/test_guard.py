""".claude/hooks/guard.py, fed the hook protocol's JSON: the commands the loop leads to are allowed (exit 0;
test_program checks program.md's own), the spellings that a text-matching rule lets through are refused (exit 2, one
line on stderr) once the command is read as bash and git read it, and the words checked are the words bash passes."""
import contextlib
import importlib.util
import io
import json
import subprocess
from pathlib import Path
from unittest import mock

import pytest

pytestmark = pytest.mark.quick

ROOT = Path(__file__).resolve().parent.parent
SPEC = importlib.util.spec_from_file_location("guard", ROOT / ".claude" / "hooks" / "guard.py")
MODULE = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(MODULE)

ALSO_ALLOWED = [  # commands that program.md's loop leads to beyond its literal code spans, and quoting as bash reads it
    "git status --short", "git status -sb",  # -sb: a cluster of two allowed options
    "git log --oneline -n 20", "git log --oneline -5 -- train.py", "git diff HEAD~1 -- train.py", "sleep 60",
    "git show HEAD:train.py | head -n 40", "git branch --show-current", "git log --format='%h %s' -- train.py",
    "git add train.py && git commit -m 'MATRIX_LR 0.04 -> 0.05' -- train.py", "uv run analyze.py list;",
    'uv run analyze.py run "MATRIX_LR 0.04 -> 0.05; DEPTH 8"', "uv run analyze.py curve val/bpb a1 b2 --at=0.5,1",
    "tail -n 50 .auto-log-research/x1/run.log 2>&1", "git diff HEAD~1 -- train.py 2>&1 | head -n 40",
    "grep -n val_bpb .auto-log-research/*/analysis.md | wc -l", 'git commit -m "a; b && c > d" -- train.py',
    "ls \"a\"b'c'",  # the shell's `abc`, and shlex's
    "grep -n 'val_bpb$' .auto-log-research/x1/run.log",  # single quotes: nothing expands
    "ls a'b'\"c d\"e '' \"\" 'x\"y' \"p'q\" f'*' '$x' \"a#\"", "ls \tx\r", 'git branch --list "autoresearch/*"',
]

REFUSED = {
    "git commit --amen -m x": "--amen",                              # git expands it to --amend
    "git checkout -qB autoresearch/x HEAD~2": "git checkout -qB",    # -q -B: resets a branch
    "git checkout -b autoresearch/x HEAD~2": "at most 1",            # a start point moves the branch
    "git commit -qm x": "-q", "git commit -m --amend": "value of -m",
    "uv run analyze.py curve val/bpb a1 --at --out x": "value of --at",
    "uv run analyze.py status x1 k'ee'p": "analyze.py status",       # the shell makes it `keep`
    "cat x > .venv/lib/python3.11/site-packages/evil.pth": "redirect",
    "ls 2>/dev/null": "redirect", "cat <<EOF\n$(id)\nEOF": "'\\n'", "git status; rm -rf /": "rm -rf",
    'cat "$(touch x)"': "'$'",  # double quotes do not stop an expansion
    "ls `touch x`": "'`'", "ls $(touch x)": "'$'", "ls <(id)": "'<('", "ls >(id)": "'>('", "ls a\\ b": "'\\\\'",
    "git log x#;rm -rf /": "'#'", "ls # x": "'#'",  # shlex would read a comment where bash reads `x#`, then `rm`
    "git add train.py 2 >&1": "`>&`",  # `2` is a word here: only `2>&1` written together passes
    "cat x 2>&1 > y": "`>`", "ls x&>y": "`&>`", "git status |& cat": "`|&`", "ls ;; ls": "`;;`",
    "ls 'x": "could not check",  # an unclosed quote
    "cat train.py | sh": "sh", "(git status)": "subshell", "{ git status; }": "`{ git status`",
    "uv run analyze.py run x &": "&", "uv run python -c 'print(1)'": "uv run python",
    "uv run train.py": "uv run train.py", "uv run --with requests analyze.py list": "uv run --with",
    "AUTORESEARCH_TIME_BUDGET=600 uv run analyze.py run x": "not a command", "git -c core.pager=sh log": "git -c",
    "git log --pretty --output=x": "--output",  # --pretty takes no next word, so --output is an option
    "git diff --outp=x": "--outp", "git branch --list -D autoresearch/x": "-D",
    "git branch --list autoresearch/*": "quote the glob", "ls x ~/y": "tilde",
    "git add -f harness/decide.py": "-f", "git add .": "does not take", "printenv": "printenv",
    "uv run analyze.py curve x --at=~": "tilde",  # bash expands `a=~` in any word
}


def hook(payload):
    """(exit code, stderr) of the guard's main() for one hook call, run in-process (test_program runs the hook)."""
    err = io.StringIO()
    with mock.patch("sys.stdin", io.StringIO(payload)), contextlib.redirect_stderr(err):
        return MODULE.main(), err.getvalue()


def guard(command):
    return hook(json.dumps({"tool_name": "Bash", "tool_input": {"command": command, "description": "test"}}))


@pytest.mark.parametrize("command,why", REFUSED.items())
def test_refuses_with_one_line(command, why):
    rc, err = guard(command)
    assert rc == 2, f"{command!r} allowed (exit {rc}, stderr {err!r})"
    assert err.endswith("\n") and err.count("\n") == 1 and err.startswith("guard.py refused"), err
    assert why in err, f"{command!r}: the reason does not name {why!r}: {err}"


def test_other_tools_pass_and_bad_input_is_refused():
    assert hook(json.dumps({"tool_name": "Read", "tool_input": {"file_path": "x"}})) == (0, "")
    rc, err = hook("not json")
    assert rc == 2 and "could not check" in err, err


@pytest.mark.parametrize("command", ALSO_ALLOWED)
def test_allows_what_the_loop_leads_to_and_checks_the_words_bash_passes(command, tmp_path):
    """Each program is a bash function that writes its argv to fd 3 (in one write, as a pipeline's run side by
    side), so bash itself shows the words; in an empty folder, where no glob matches."""
    shim = "exec 3>&2; for f in git uv ls cat head tail grep wc sleep printenv; do " \
           "eval \"$f() { printf '%s\\0' $f \\\"\\$@\\\" $'\\1' >&3; }\"; done\n"
    rc, err = guard(command)
    assert rc == 0, f"{command!r} refused: {err}"
    ours = sorted(argv for argv, _ in MODULE.simple_commands(command))
    out = subprocess.run(["bash", "-c", shim + command], capture_output=True, cwd=tmp_path, timeout=30, check=False)
    bash = sorted(argv.split("\0")[:-1] for argv in out.stderr.decode().split("\1\0")[:-1])
    assert ours == bash, f"{command!r}: the guard checks {ours}, bash passes {bash}"

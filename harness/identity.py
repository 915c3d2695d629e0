"""
Which runs ran the same code: train.py's identity once comments and blank lines are ignored. A change
to a comment is a repeat of the code before it, so its run joins that code's noise group and is
explained as a repeat, not as an idea.
"""
import hashlib
import io
import subprocess
import tokenize
from pathlib import Path

SKIPPED = (tokenize.COMMENT, tokenize.NL, tokenize.ENCODING)  # comments, blank and continuation lines


def code_text(source):
    """train.py's tokens without its comments and blank lines, one per line; spacing inside a line is
    no code either. A file that does not tokenize (a crash of a syntax error) keeps its non-blank lines
    that are not whole-line comments."""
    if isinstance(source, bytes):
        source = source.decode("utf-8", errors="replace")
    try:
        tokens = tokenize.generate_tokens(io.StringIO(source).readline)
        return "\n".join(f"{tok.type} {'' if tok.type == tokenize.INDENT else tok.string}"
                         for tok in tokens if tok.type not in SKIPPED)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return "\n".join(line.strip() for line in source.splitlines()
                         if line.strip() and not line.strip().startswith("#"))


def code_sha(source):
    """First 12 hex digits of the sha256 of code_text: equal for two train.py that differ only in
    comments and blank lines."""
    return hashlib.sha256(code_text(source).encode()).hexdigest()[:12]


def ran_code_sha(summary, commit):
    """code_sha of the train.py that ran: the working tree's when its sha256 is the one the summary
    recorded (or there is no summary: a crash of the checkout), else the commit's when that matches;
    "" when neither is the code measured."""
    ran = ((summary or {}).get("git") or {}).get("train_py_sha256")
    candidates = [Path("train.py").read_bytes()] if Path("train.py").exists() else []
    out = subprocess.run(["git", "show", f"{commit}:train.py"], capture_output=True)
    if out.returncode == 0:
        candidates.append(out.stdout)
    for source in candidates:
        if ran is None or hashlib.sha256(source).hexdigest() == ran:
            return code_sha(source)
    return ""


def row_code(row):
    """The code identity of a results.tsv row: its code_sha, or for a row archived before that column
    existed the sha256 of train.py as a file (comments then count)."""
    return row.get("code_sha") or row.get("train_py_sha") or None


def same_code(a, b):
    """Two rows ran the same code: the same code identity where both have one, else the same commit."""
    if row_code(a) and row_code(b):
        return row_code(a) == row_code(b)
    return bool(a.get("commit")) and a.get("commit") == b.get("commit")

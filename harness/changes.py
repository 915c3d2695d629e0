"""
What changed between two runs' code: the config constants that differ, and the changed lines of the
first hunks of a train.py diff.
"""
import re

from harness.archive import git
from harness.capture import uncommitted_train_py

DIFF_HUNKS = 6             # What changed: at most this many hunks of diff.patch ...
DIFF_HUNK_LINES = 4        # ... with at most this many changed lines each, cut at DIFF_LINE_CHARS
DIFF_LINE_CHARS = 100


def config_diff(old, new):
    changed = [f"  - {k}: {old[k]!r} -> {new[k]!r}" for k in old if k in new and old[k] != new[k]]
    added = [f"  - {k} = {new[k]!r} (new)" for k in new if k not in old]
    removed = [f"  - {k} (removed; was {old[k]!r})" for k in old if k not in new]
    body = changed + added + removed
    return ["- config: identical"] if not body else ["- config:"] + body


def config_only(patch, old, new):
    """The changed lines of `patch` are all assignments of config constants whose values differ between
    the two configs: the config lines already say everything the diff would."""
    changed = {k for k in old.keys() | new.keys() if old.get(k, object()) != new.get(k, object())}
    lines = [line[1:] for _, body in diff_hunks(patch) for line in body if line[1:].strip()]
    names = [re.match(r"([A-Z][A-Z0-9_]*)\s*=", line) for line in lines]
    return bool(lines) and all(m and m.group(1) in changed for m in names)


def diff_summary(patch, label="diff.patch", same="train.py is identical to the best commit's"):
    """Counts, then the changed lines of the first hunks (a hunk header's own text is whatever line
    precedes the hunk, e.g. WINDOW_PATTERN for a MATRIX_LR change, so it is not shown)."""
    if not patch.strip():
        return [f"- {label}: {same}"]
    hunks = diff_hunks(patch)
    changed = [line for _, body in hunks for line in body]
    added, removed = sum(line[0] == "+" for line in changed), sum(line[0] == "-" for line in changed)
    lines = [f"- {label}: +{added} -{removed} lines in train.py, {len(hunks)} hunk(s)"
             + (f"; the first {DIFF_HUNKS} shown" if len(hunks) > DIFF_HUNKS else "")]
    shown = []
    for first_line, body in hunks[:DIFF_HUNKS]:
        body = [line for line in body if line[1:].strip()]
        preview = hunk_preview(body)
        shown.append(f"@@ line {first_line} @@")
        shown += [line if len(line) <= DIFF_LINE_CHARS else line[:DIFF_LINE_CHARS - 3] + "..." for line in preview]
        if len(body) > len(preview):
            shown.append(f"  ({len(body) - len(preview)} more changed lines)")
    return lines + ["```diff", *shown, "```"]


def hunk_preview(body, budget=DIFF_HUNK_LINES):
    """The first removed and the first added lines of a hunk, half the budget each when both sides
    are long: a rewritten block lists all its removals before its additions."""
    removed, added = [line for line in body if line[0] == "-"], [line for line in body if line[0] == "+"]
    n_removed = min(len(removed), max(budget // 2, budget - len(added)))
    return removed[:n_removed] + added[:budget - n_removed]


def diff_hunks(patch):
    """[(first line in the new train.py, [changed lines])] for each hunk of a one-file unified diff; its
    ---/+++ header lines come before the first hunk."""
    hunks = []
    for line in patch.splitlines():
        if line.startswith("@@"):
            match = re.match(r"@@ -\d+(?:,\d+)? \+(\d+)", line)
            hunks.append((int(match.group(1)) if match else 0, []))
        elif hunks and line.startswith(("+", "-")):
            hunks[-1][1].append(line)
    return hunks


def code_diff(a, b):
    """train.py from A's commit to B's: a code change that is no config constant (a removed softcap)
    shows only here. A run of uncommitted changes measured code that neither commit holds."""
    ca, cb = a.row["commit"], b.row["commit"]
    patch = git("diff", "--no-color", ca, cb, "--", "train.py")
    if patch is None:
        return [f"- code: `git diff {ca} {cb}` failed: a commit is gone"]
    lines = diff_summary(patch, f"code (git diff {ca} {cb} -- train.py)", "train.py is identical in both commits")
    lines += [f"- {tag} ran train.py with uncommitted changes: the code it measured is not its commit's"
              for tag, r in (("A", a), ("B", b)) if uncommitted_train_py(r.summary)]
    return lines

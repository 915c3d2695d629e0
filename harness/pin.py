"""
The harness pin: which harness an experiment's runs must be made with. It lives in git, not in the
archive. `refs/auto-log-research/pins/<branch>` names the commit where the branch began, and the
pinned harness is what that commit holds for every tracked Python file except train.py and tests/
(prepare.py, analyze.py, harness/*.py, and whatever joins them later).

Why a ref of its own: the agent's git commands (status, log, diff, show, rev-parse, branch --list,
add train.py, commit, checkout) move HEAD and branches, never a ref outside refs/heads, and
.claude/settings.json denies those that could (update-ref, tag, replace, reflog, gc, ...). analyze.py
only ever creates a pin, never moves one; moving it is `analyze.py repin`, which asks a human at a
terminal. Every pin a branch has had stays in the ref's reflog, so runs archived under an earlier pin
can still be checked against it.

Every git call here passes --no-replace-objects: a `git replace` must not swap the pinned commit.
"""
import hashlib
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

PIN_REFS = "refs/auto-log-research/pins/"
EXCLUDED = ("train.py",)        # the agent's file: never part of the harness
EXCLUDED_DIRS = ("tests/",)     # tests are run by humans and CI, not by the loop


def git_bytes(*args, stdin=None):
    """stdout of a git command as bytes, or None when git fails."""
    out = subprocess.run(["git", "--no-replace-objects", *args], input=stdin, capture_output=True)
    return out.stdout if out.returncode == 0 else None


def git_text(*args, stdin=None):
    out = git_bytes(*args, stdin=None if stdin is None else stdin.encode())
    return None if out is None else out.decode()


def is_pinned(path):
    return path.endswith(".py") and path not in EXCLUDED and not path.startswith(EXCLUDED_DIRS)


# ---------------------------------------------------------------------------
# The ref

def current_branch():
    """The branch HEAD is on, or None when HEAD is detached."""
    out = git_text("symbolic-ref", "--quiet", "--short", "HEAD")
    return out.strip() if out else None


def pin_ref(branch):
    return PIN_REFS + branch


def read_pin(branch):
    """Full sha of the commit pinned for `branch`, or None."""
    out = git_text("rev-parse", "--verify", "--quiet", f"{pin_ref(branch)}^{{commit}}")
    return out.strip() if out else None


def pin_history(branch):
    """Every commit `branch` has been pinned to, newest first (the current one, then the reflog's)."""
    current = read_pin(branch)
    logged = (git_text("reflog", "show", "--format=%H", pin_ref(branch), "--") or "").split()
    return list(dict.fromkeys(([current] if current else []) + logged))


def create_pin(branch, commit, message):
    """Create the pin; False when one already exists (create-only: an empty old value)."""
    return git_bytes("update-ref", "--create-reflog", "-m", message, pin_ref(branch), commit, "") is not None


def move_pin(branch, commit, message):
    """Re-pin (humans only, through `analyze.py repin`); the reflog keeps the earlier pins."""
    old = read_pin(branch) or ""
    return git_bytes("update-ref", "--create-reflog", "-m", message, pin_ref(branch), commit, old) is not None


def resolve_commit(rev):
    out = git_text("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    return out.strip() if out else None


def branch_commits(branch):
    """Full shas of every commit on `branch`, or None when there is no such branch."""
    out = git_text("rev-list", f"refs/heads/{branch}", "--")
    return None if out is None else set(out.split())


# ---------------------------------------------------------------------------
# The pinned files

def pinned_blobs(commit):
    """{path: blob id} of the harness files `commit` holds."""
    out = git_bytes("ls-tree", "-r", "-z", "--full-tree", commit) or b""
    blobs = {}
    for entry in out.decode().split("\0"):
        if "\t" in entry:
            meta, path = entry.split("\t", 1)
            if is_pinned(path) and meta.split()[1] == "blob":
                blobs[path] = meta.split()[2]
    return blobs


def worktree_blobs(paths):
    """{path: blob id} of the working-tree files among `paths`, hashed as git would store them; a missing
    file is left out."""
    present = [p for p in paths if Path(p).is_file()]
    out = git_text("hash-object", "--stdin-paths", stdin="".join(p + "\n" for p in present)) if present else ""
    return dict(zip(present, (out or "").split()))


def tracked_harness_files():
    out = git_bytes("ls-files", "-z", "--full-name") or b""
    return [p for p in out.decode().split("\0") if p and is_pinned(p)]


def tree_digest(blobs):
    """One sha256 for a set of harness files: what a run records of the harness it was archived with."""
    return hashlib.sha256("".join(f"{p} {b}\n" for p, b in sorted(blobs.items())).encode()).hexdigest()


def blob_changes(pinned, found):
    """What differs between two {path: blob} maps, one phrase per file."""
    changes = [f"{p} (changed)" for p in sorted(pinned) if p in found and found[p] != pinned[p]]
    changes += [f"{p} (deleted)" for p in sorted(pinned) if p not in found]
    changes += [f"{p} (added)" for p in sorted(found) if p not in pinned]
    return changes


def pinned_sha256(commit, paths):
    """{path: sha256 of its content at `commit`}, for the files a run summary records hashes of."""
    paths = list(paths)
    out = git_bytes("cat-file", "--batch", stdin="".join(f"{commit}:{p}\n" for p in paths).encode()) if paths else None
    if not out:
        return {}
    shas, pos = {}, 0
    for path in paths:
        end = out.index(b"\n", pos)
        header = out[pos:end].split()
        pos = end + 1
        if len(header) < 3 or header[1] == b"missing":
            continue
        size = int(header[2])
        shas[path] = hashlib.sha256(out[pos:pos + size]).hexdigest()
        pos += size + 1
    return shas


def recorded_sha256(summary):
    """{path: sha256} of the harness files a run summary records, as they were when train.py ran:
    `harness_sha256` holds every pinned file; `<stem>_py_sha256` the top-level scripts (older runs)."""
    git_info = (summary or {}).get("git") or {}
    recorded = {f"{k[:-len('_py_sha256')]}.py": v for k, v in git_info.items() if k.endswith("_py_sha256")}
    recorded.update(git_info.get("harness_sha256") or {})
    return {p: v for p, v in recorded.items() if is_pinned(p)}


def summary_changes(summary, pinned):
    """Pinned files whose sha256 as the summary recorded them differ from `pinned` ({path: sha256})."""
    recorded = recorded_sha256(summary)
    return [f"{p} (sha256 {recorded[p][:8]} when it ran vs pinned {pinned[p][:8]})" if recorded[p] else
            f"{p} (missing when it ran)" for p in sorted(recorded) if p in pinned and recorded[p] != pinned[p]]


def pinned_files_sha256(commit, blobs):
    """sha256 of each of `commit`'s harness files `blobs`: what summaries record."""
    return pinned_sha256(commit, list(blobs))


# ---------------------------------------------------------------------------
# Pinning a branch, and checking a run against its pin

def ensure_pin(branch, earlier_runs):
    """(pin, None), pinning HEAD first when `branch` has none and no run was archived on it yet (the
    set-up of an experiment); (None, why) when the branch cannot be pinned without a human."""
    pin = read_pin(branch)
    if pin:
        return pin, None
    if earlier_runs:
        return None, (f"branch {branch} has no pin although {len(earlier_runs)} run(s) ({earlier_runs[0]} to "
                      f"{earlier_runs[-1]}) were archived on it: a pin is only ever created at set-up, so this one "
                      f"was removed; a human restores it with `uv run analyze.py repin <commit>`")
    head = resolve_commit("HEAD")
    pinned = pinned_blobs(head)
    changes = blob_changes(pinned, worktree_blobs(sorted(set(pinned) | set(tracked_harness_files()))))
    if changes:
        return None, (f"the working tree's harness differs from HEAD {head[:7]} ({', '.join(changes)}), so "
                      f"{branch} cannot be pinned at HEAD; restore those files, or, if a human changed the "
                      "harness, commit the change first")
    create_pin(branch, head, f"pin: {branch} begins at {head[:7]}")  # a concurrent creator may have won
    return read_pin(branch), None


@dataclass
class HarnessCheck:
    """The harness of the run being archived, against its branch's pin."""
    branch: str | None
    pin: str | None                 # full sha, or None when there is none
    digest: str = ""                # tree_digest of the working tree's harness files at archive time
    changes: list = field(default_factory=list)   # one phrase per file that differs, or why nothing was checked


def check_run(summary, rows):
    """The harness a run is archived with against its branch's pin, pinning the branch if this is its
    first run."""
    branch = current_branch()
    if branch is None:
        return HarnessCheck(None, None, changes=["HEAD is detached, so there is no branch pin to check the harness "
                                                 "against; check out the experiment's branch"])
    pin, problem = ensure_pin(branch, [r["run_id"] for r in rows if r.get("branch") == branch])
    return HarnessCheck(branch, None, changes=[problem]) if problem else check_against(branch, pin, summary)


def check_against(branch, pin, summary):
    """The working tree's harness files, and the hashes the summary recorded when train.py ran (None: no
    summary), against `pin`."""
    pinned = pinned_blobs(pin)
    found = worktree_blobs(sorted(set(pinned) | set(tracked_harness_files())))
    changes = blob_changes(pinned, found)
    changed = {c.split()[0] for c in changes}
    changes += [c for c in summary_changes(summary, pinned_files_sha256(pin, pinned)) if c.split()[0] not in changed]
    return HarnessCheck(branch, pin, tree_digest(found), [f"{c} against the pin {pin[:7]} of {branch}" for c in changes])

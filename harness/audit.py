"""
`analyze.py audit`: re-derive the archive from its evidence and name every inconsistency, one line
each; and run_problems, the same check for one run, which keeps a run with inconsistent evidence from
ever becoming the best.

The evidence of a run is what was written when it was archived and what git holds: the files stored
in its directory (their sha256 in record.json), the final block of its run.log, its run_summary.json,
the harness's own measurement.json (runs of `analyze.py run`), the decisions made through `analyze.py
status` (decisions.jsonl, appended), the pin of its branch and its commit's place on that branch.
results.tsv is an index built from these: where it disagrees with them, results.tsv is what was changed.
Every case the harness caught in a run (trained on validation data, a slowed clock, ...) is named too:
such a run is `invalid`, and the audit says why.
"""
import time
from collections import defaultdict
from dataclasses import dataclass, field

from harness.archive import (MEASUREMENT_JSON, RECORD_JSON, archive_lock, own, parse_results, paths, read_decisions,
                             read_json, sha256_file, worker_name)
from harness.capture import final_block
from harness.pin import (branch_commits, check_against, current_branch, git_text, pin_history, pinned_blobs, read_pin,
                         pinned_files_sha256, summary_changes, tree_digest)


# ---------------------------------------------------------------------------
# What the per-run checks compare with, each read once

@dataclass
class Evidence:
    """The decisions log, and per branch and pin what git says, for checking many runs at once."""
    decisions: dict                                     # run_id -> the last status decided
    worker: str                                         # who audits: other workers' pins may be in other clones
    _pins: dict = field(default_factory=dict)           # branch -> every commit it has been pinned to
    _commits: dict = field(default_factory=dict)        # branch -> its commits, or None when it is gone
    _pinned: dict = field(default_factory=dict)         # pin -> (tree digest, {script: sha256})

    def pins(self, branch):
        if branch not in self._pins:
            self._pins[branch] = pin_history(branch)
        return self._pins[branch]

    def commits(self, branch):
        if branch not in self._commits:
            self._commits[branch] = branch_commits(branch)
        return self._commits[branch]

    def pinned(self, pin):
        if pin not in self._pinned:
            blobs = pinned_blobs(pin)
            self._pinned[pin] = (tree_digest(blobs), pinned_files_sha256(pin, blobs))
        return self._pinned[pin]


def load_evidence():
    decided, _ = read_decisions()
    return Evidence(decided, worker_name())


# ---------------------------------------------------------------------------
# One run

def run_problems(row, evidence=None):
    """Every way the row of one run disagrees with its evidence, one phrase each; [] when it agrees."""
    return run_checks(row, evidence)[0]


def run_checks(row, evidence=None):
    """(problems, what cannot be checked here): the second holds another worker's pin and branch when
    they live in another clone writing the same archive, whose refs this clone cannot see."""
    run_dir = paths().run_dir(row.get("run_id") or "?")
    if not row.get("run_id") or not run_dir.is_dir():
        return [f"results.tsv lists it, but there is no run directory {run_dir}"], []
    record, problem = read_json(run_dir / RECORD_JSON)
    if problem:
        return [problem], []
    if not isinstance(record.get("files"), dict):
        return [f"its {RECORD_JSON} keeps no file digests (archived before audits existed, or edited), so nothing "
                "about it can be checked"], []
    evidence = evidence or load_evidence()
    summary = read_json(run_dir / "run_summary.json")[0] if "run_summary.json" in record["files"] else None
    measurement = read_json(run_dir / MEASUREMENT_JSON)[0] if MEASUREMENT_JSON in record["files"] else None
    numbers = (measured_problems(row, record, summary, measurement) if measurement is not None
               else number_problems(row, record, summary, run_dir))
    problems = file_problems(run_dir, record) + numbers + caught_problems(row, record, measurement) + \
        status_problems(row, record, evidence)
    if elsewhere(record, evidence):
        return problems, [f"worker {record.get('worker')}'s branch {record.get('branch')} and its pin "
                          f"{str(record.get('pin'))[:7]} live in another clone: its harness and lineage cannot be "
                          "verified here (its files, val_bpb and status were)"]
    return problems + harness_problems(record, summary, evidence) + lineage_problems(row, record, evidence), []


def elsewhere(record, evidence):
    """Another worker's run whose branch and pin this clone does not hold: its clone, on another machine,
    has them. The auditor's own runs, those of unknown worker, and those of a branch this clone has (the
    workers of one node share one repository) are always checked in full: a pin missing there is a lost pin."""
    worker, branch, pin = record.get("worker"), record.get("branch"), record.get("pin")
    return (bool(worker) and worker != evidence.worker and bool(branch) and evidence.commits(branch) is None
            and pin not in evidence.pins(branch))


def file_problems(run_dir, record):
    problems = []
    for name, digest in sorted(record["files"].items()):
        path = run_dir / name
        if not path.exists():
            problems.append(f"{name} was archived but is gone")
        elif (now := sha256_file(path)) != digest:
            problems.append(f"{name} changed after archiving (sha256 {digest[:8]} when archived, {now[:8]} now)")
    return problems


def number_problems(row, record, summary, run_dir):
    """val_bpb and outcome of the row, against record.json, the summary and run.log's final block."""
    val, outcome = record.get("val_bpb"), record.get("outcome")
    problems = [f"results.tsv says {key} {row.get(key)}, but it was archived with {key} {want}"
                for key, want in (("val_bpb", val), ("outcome", outcome), ("commit", str(record.get("commit"))[:7]))
                if row.get(key) != want]
    if summary is not None and not record.get("caught"):  # a caught claim is named by caught_problems
        if (summary.get("status") or "crash") != outcome:
            problems.append(f"run_summary.json says status {summary.get('status')}, but the run was archived "
                            f"with outcome {outcome}")
        bpb = summary.get("val_bpb")
        said = f"{bpb:.6f}" if isinstance(bpb, (int, float)) else repr(bpb)
        if outcome == "ok" and said != val:
            problems.append(f"run_summary.json says val_bpb {said}, but it was archived with {val}")
    logged = final_block(run_dir / "run.log").get("val_bpb")
    if outcome == "ok" and logged not in (None, "n/a") and logged != val:
        problems.append(f"run.log's final block says val_bpb {logged}, but it was archived with {val}")
    if row.get("measured"):
        problems.append(f"results.tsv says measured {row['measured']!r}, but the run has no {MEASUREMENT_JSON}: "
                        "its val_bpb is train.py's own")
    return problems


def measured_problems(row, record, summary, measurement):
    """A run of `analyze.py run`: its row against record.json and measurement.json, and train.py's own
    claims (run_summary.json) against the measurement, which is the run's number."""
    status, val = measurement.get("status"), measurement.get("val_bpb")
    said = f"{val:.6f}" if status in ("ok", "invalid") and isinstance(val, (int, float)) else "0.000000"
    problems = [f"results.tsv says {key} {row.get(key)}, but it was archived with {key} {want}"
                for key, want in (("val_bpb", record.get("val_bpb")), ("outcome", record.get("outcome")),
                                  ("commit", str(record.get("commit"))[:7])) if row.get(key) != want]
    if said != record.get("val_bpb"):
        problems.append(f"{MEASUREMENT_JSON} says val_bpb {said} (status {status}), but it was archived with "
                        f"{record.get('val_bpb')}")
    if row.get("measured") != "harness":
        problems.append(f"results.tsv says measured {row.get('measured')!r}, but the run has the harness's "
                        f"{MEASUREMENT_JSON}")
    if summary is not None and summary.get("status") == "ok" and status not in ("ok", "invalid"):  # invalid: caught
        problems.append(f"run_summary.json claims ok, but {MEASUREMENT_JSON} says {status}: "
                        f"{measurement.get('error') or 'no reason given'}")
    return problems


def caught_problems(row, record, measurement):
    """Every case the harness caught in the run, one line each, and a row whose `caught` column says
    otherwise than the evidence."""
    if measurement is not None:
        found = [(c.get("case", "?"), c.get("detail")) for c in measurement.get("caught") or [] if isinstance(c, dict)]
    else:
        found = [(case, None) for case in record.get("caught") or []]
    problems = [f"caught: {case}" + (f": {detail}" if detail else "") for case, detail in found]
    if (row.get("caught") or "") != "; ".join(case for case, _ in found):
        problems.append(f"results.tsv says caught {row.get('caught')!r}, but the run was archived with "
                        f"{'; '.join(case for case, _ in found) or 'nothing caught'}")
    return problems


def status_problems(row, record, evidence):
    """The row's status, against the status it was archived with and the decisions made since."""
    initial, decided = record.get("status"), evidence.decisions.get(row["run_id"])
    problems = []
    if decided and (initial == "invalid" or decided == "keep" and initial != "pending"):
        problems.append(f"{paths().decisions.name} holds `{decided}` for a run archived `{initial}`, "
                        "which `status` refuses")
    expected = initial if initial == "invalid" or not decided else decided
    if row.get("status") != expected:
        source = (f"the last decision made through `analyze.py status` was `{decided}`" if expected == decided
                  else f"it was archived `{initial}`, and " + ("no decision changes that" if decided else
                                                             "no decision was made through `analyze.py status`"))
        problems.append(f"results.tsv says status `{row.get('status')}`, but {source}")
    return problems


def harness_problems(record, summary, evidence):
    """The run's harness against its branch's pin, as recorded when it was archived and re-derived now."""
    if record.get("harness_changed"):
        return [f"its harness was not its branch's pin when archived: {'; '.join(record['harness_changed'])}"]
    branch, pin = record.get("branch"), record.get("pin")
    if not branch or not pin:
        return ["record.json names no branch pin"]
    if pin not in evidence.pins(branch):
        known = ", ".join(p[:7] for p in evidence.pins(branch)) or "none"
        return [f"archived under pin {pin[:7]}, which is not one of branch {branch}'s pins (now: {known})"]
    digest, scripts = evidence.pinned(pin)
    problems = [] if record.get("harness_digest") == digest else [
        f"its harness files at archive time (digest {str(record.get('harness_digest'))[:8]}) are not the pin "
        f"{pin[:7]}'s ({digest[:8]})"]
    return problems + [f"{c} against the pin {pin[:7]} of {branch}" for c in summary_changes(summary, scripts)]


def lineage_problems(row, record, evidence):
    """A kept run is one the branch stands on: its commit must be on the branch."""
    if row.get("status") != "keep":
        return []
    branch = record.get("branch")
    commits = evidence.commits(branch) if branch else None
    if commits is None:
        return [f"kept, but its branch {branch} no longer exists"]
    if record.get("commit") not in commits:
        return [f"kept, but its commit {str(record.get('commit'))[:7]} is not an ancestor of branch {branch}"]
    return []


# ---------------------------------------------------------------------------
# The whole archive

def audit_lines():
    """(problem lines, lines of what cannot be verified here, runs those are about, runs checked): every
    run's problems, then the archive's own."""
    rows, torn = parse_results()
    evidence = load_evidence()
    by_problem, by_note = defaultdict(list), defaultdict(list)  # the same problem in many runs (a lost pin) is one line
    for row in rows:
        problems, notes = run_checks(row, evidence)
        for text, found in [(p, by_problem) for p in problems] + [(n, by_note) for n in notes]:
            found[text].append(row.get("run_id") or row.get("commit", "?"))
    lines = [f"{name_runs(ids)}: {problem}" for problem, ids in by_problem.items()]
    lines += [f"{paths().results} line {number} is torn: {line[:60]!r}" for number, line in torn]
    lines += archive_problems(rows, evidence) + worktree_problems(rows, current_branch(), evidence.worker)
    notes = [f"{name_runs(ids)}: {note}" for note, ids in by_note.items()]
    return lines, notes, sum(map(len, by_note.values())), len(rows)


def name_runs(ids):
    return ids[0] if len(ids) == 1 else f"{len(ids)} runs ({', '.join(ids[:3])}{', ...' if len(ids) > 3 else ''})"


def archive_problems(rows, evidence):
    """Rows without run ids, run ids twice, decisions about no run, stored runs without a row."""
    ids = [r.get("run_id") for r in rows]
    results = paths().results
    lines = [f"{results} has no run_id column (karpathy/autoresearch's five columns): there is no evidence "
             "to check its rows against"] if rows and "run_id" not in rows[0] else []
    lines += [f"{run_id}: listed {ids.count(run_id)} times in {results}" for run_id in sorted(set(ids))
              if run_id and ids.count(run_id) > 1]
    lines += [problem for _, problem in read_decisions()[1]]
    lines += [f"{run_id}: {paths().decisions} holds a decision about it, but {results} has no such run"
              for run_id in sorted(set(evidence.decisions) - set(ids))]
    stored = {p.parent.name for p in paths().dir.glob(f"*/{RECORD_JSON}")}
    lines += [f"{run_id}: stored in {paths().run_dir(run_id)}, but {results} has no row for it (an archive "
              "killed half-way: `uv run analyze.py` adopts it while its run files are in the working directory)"
              for run_id in sorted(stored - set(ids))]
    return lines


def worktree_problems(rows, branch, worker):
    """The harness the next run would be archived with, and harness commits on the branch since its pin.
    Reads only: the pin of a new branch is made by `analyze.py pin` or its first archived run."""
    pin = read_pin(branch) if branch else None
    if pin is None:
        earlier = [r["run_id"] for r in rows if branch and r.get("branch") == branch and own(r, worker)]
        return [f"working tree: branch {branch} has no pin although {name_runs(earlier)} were archived on it; "
                "a human restores it with `uv run analyze.py repin <commit>`"] if earlier else []
    check = check_against(branch, pin, None)
    lines = [f"working tree: {c}; the next run will be recorded invalid" for c in check.changes]
    log = git_text("log", "--format=%h%x09%s", f"{pin}..HEAD", "--", "*.py", ":(exclude)train.py", ":(exclude)tests/")
    return lines + [f"commit {sha} on {branch} changes harness files after its pin {pin[:7]}: {subject}"
                    for sha, subject in (line.split("\t", 1) for line in (log or "").splitlines())]


def cmd_audit():
    """Print every inconsistency, one line each, and a verdict line; exit status 1 when there is any."""
    t0 = time.perf_counter()
    with archive_lock():  # a snapshot: no `status` or archive is half-way through while we read
        lines, notes, partial, runs = audit_lines()
    branch = current_branch()
    pins = pin_history(branch) if branch else []
    print(f"audit: branch {branch or '(detached HEAD)'}, pinned at {pins[0][:7] if pins else 'nothing'}")
    for line in lines + [f"not verifiable here: {note}" for note in notes]:
        print(line)
    verdict = f"{len(lines)} inconsistencies" if lines else "clean"
    verdict += f"; {partial} run(s) of other clones checked in part" if partial else ""
    print(f"audit: {runs} runs, {verdict} ({time.perf_counter() - t0:.2f} s)")
    return 1 if lines else 0

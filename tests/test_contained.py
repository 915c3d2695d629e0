"""train.py runs contained: in a bubblewrap sandbox that shows it the filesystem read-only but for its own run
directory, without the validation and held-out shards, and whose whole process tree dies with it; where there is
no sandbox, the run says `uncontained` first. Two cpu-profile runs of `analyze.py run` in a lab like
tests/test_cheats.py's: one whose train.py probes the walls (reads both shards, writes into the repository and
the venv, leaves a process in a session of its own behind), one made without bwrap on PATH whose train.py trains on
the validation rows (caught by the held-out gap, where no sandbox hides them). The dev slice that the in-training
curve reads and preflight's refusal of a foreign .pth file are tested without a run."""
import os
import sys
import sysconfig
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import prepare  # noqa: E402
from harness import loop  # noqa: E402
from harness.decide import TRAINED_ON_VAL  # noqa: E402
from tests.test_cheats import VAL_HIDDEN, cases, lab  # noqa: E402, F401  (lab: the module's own, built as test_cheats's)
from tests.test_loop import running  # noqa: E402

NO_SANDBOX = loop.sandbox_problem()
needs_sandbox = pytest.mark.skipif(NO_SANDBOX is not None, reason=f"no sandbox on this machine: {NO_SANDBOX}")
STRAY = ("sleep", "617.5")  # the process train.py leaves behind
PTH = Path(sysconfig.get_path("purelib")) / "zz_test_contained.pth"
PROBES = f"""import time
import subprocess as _sp, prepare as _prep
_sp.Popen({list(STRAY)!r}, start_new_session=True)  # in a session of its own: it outlives train.py unless contained

def _probe(what, act):
    try:
        print(f"PROBE {{what}}: {{act()!r}}", flush=True)
    except Exception as e:
        print(f"PROBE {{what}}: {{type(e).__name__}}", flush=True)

_probe("val shard", lambda: len(open(_prep.DATA_DIR / _prep.VAL_FILENAME, "rb").read()))
_probe("held-out shard", lambda: len(open(_prep.DATA_DIR / _prep.HELDOUT_FILENAME, "rb").read()))
_probe("val rows", lambda: next(_prep.make_dataloader(_prep.Tokenizer.from_directory(), 1, 8, "val", "cpu"))[0].sum().item())
_probe("dev rows", lambda: next(_prep.make_dataloader(_prep.Tokenizer.from_directory(), 1, 8, "dev", "cpu"))[0].shape[1])
_probe("write prepare.py", lambda: open(_prep.__file__, "a").write("# planted"))
_probe("write pth", lambda: open({str(PTH)!r}, "w").write("# planted"))
"""


@pytest.fixture(scope="module")
def probed(lab):
    """The lab's first run, with PROBES at the top of train.py: (stdout, the Run, its run.log, prepare.py before).
    Only in a sandbox: outside one, its writes would land in this venv."""
    if NO_SANDBOX:
        pytest.skip(f"no sandbox on this machine: {NO_SANDBOX}")
    source = (lab.path / "train.py").read_text()
    (lab.path / "train.py").write_text(source.replace("import time\n", PROBES, 1))
    before = (lab.path / "prepare.py").read_text()
    try:
        out, run = lab.run("probe the sandbox's walls")
        time.sleep(0.5)
        return out.stdout, run, (lab.archive / run.id / "run.log").read_text(), before
    finally:
        PTH.unlink(missing_ok=True)
        for pid in running(*STRAY):
            os.kill(pid, 9)
        (lab.path / "train.py").write_text(source)


def probe(log, what):
    return next(line.split(": ", 1)[1] for line in log.splitlines() if line.startswith(f"PROBE {what}: "))


@needs_sandbox
def test_a_contained_run_reads_neither_pinned_shard_but_the_dev_slice(probed):
    stdout, run, log, _ = probed
    seen = {what: probe(log, what) for what in ("val shard", "held-out shard", "val rows")}
    assert all(s in ("0", "PermissionError") or s.endswith("Error") for s in seen.values()), f"train.py read {seen}"
    assert probe(log, "dev rows") == "8", log[-3000:]
    assert run.contained is True and run.val_bpb is not None and stdout.startswith("decision: "), stdout


@needs_sandbox
def test_a_contained_run_writes_nothing_into_the_repository_or_the_venv(lab, probed):
    _, run, log, before = probed
    assert probe(log, "write prepare.py") == probe(log, "write pth") == "OSError", log[-3000:]
    assert (lab.path / "prepare.py").read_text() == before and not PTH.exists()


@needs_sandbox
def test_nothing_train_py_started_outlives_its_run(probed):
    assert running(*STRAY) == [], "a process train.py started in a session of its own outlived the run"


def test_without_bwrap_the_run_says_uncontained_first_and_training_on_val_is_still_caught(lab, tmp_path):
    """PATH without bwrap: every command of /usr/bin but it. train.py trains on the validation rows, in its loop and
    untimed before it, as test_cheats.py's cheater tries to."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for entry in Path("/usr/bin").iterdir():
        if entry.name != "bwrap":
            (bin_dir / entry.name).symlink_to(entry)
    path = [str(bin_dir)] + [d for d in os.environ["PATH"].split(":") if d and not Path(d, "bwrap").exists()]
    saved, source = dict(lab.env), (lab.path / "train.py").read_text()
    lab.env["PATH"] = ":".join(path)
    lab.plant("trains on val", "untimed training")
    try:
        out, run = lab.run("no sandbox, and training on val")
    finally:
        lab.env.clear()
        lab.env.update(saved)
        (lab.path / "train.py").write_text(source)
    first = out.stdout.splitlines()[0]
    assert first.startswith("uncontained: ") and "no bwrap on PATH" in first, out.stdout + out.stderr[-2000:]
    assert run.contained is False and run.val_bpb is not None, run
    assert VAL_HIDDEN not in (lab.archive / run.id / "run.log").read_text(), "train.py could not read the val rows"
    assert TRAINED_ON_VAL in cases(run), (run.measured.heldout_bpb, run.val_bpb, run.caught)
    headline = (lab.archive / run.id / "analysis.md").read_text().split("## Headline\n", 1)[1]
    assert headline.startswith("- uncontained: "), headline[:300]


def test_a_pth_file_no_installed_package_lists_is_refused(tmp_path, monkeypatch):
    site = tmp_path / "site-packages"
    (site / "ok-1.0.dist-info").mkdir(parents=True)
    (site / "ok-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: ok\nVersion: 1.0\n")
    (site / "ok-1.0.dist-info" / "RECORD").write_text("ok.pth,,\nok-1.0.dist-info/RECORD,,\n")
    (site / "ok.pth").write_text("import os\n")
    monkeypatch.setattr(loop.sysconfig, "get_path", lambda name: str(site))
    loop.refuse_startup_files()  # the package's own .pth is explained by its RECORD
    for name in ("evil.pth", "sitecustomize.py"):
        (site / name).write_text("import os\n")
        with pytest.raises(loop.Refused, match=f"{name} is in no installed package's RECORD"):
            loop.refuse_startup_files()
        (site / name).unlink()


def test_the_dev_slice_shares_no_document_with_the_pinned_rows(cpu_prepared, monkeypatch):
    data = cpu_prepared[1] / "cpu" / "data"
    monkeypatch.setattr(prepare, "MAX_SEQ_LEN", prepare.PROFILES["cpu"]["MAX_SEQ_LEN"])
    monkeypatch.setattr(prepare, "EVAL_TOKENS", prepare.PROFILES["cpu"]["EVAL_TOKENS"])
    tokenizer = prepare.Tokenizer.from_directory(cpu_prepared[1] / "cpu" / "tokenizer")
    T, n_rows = prepare.MAX_SEQ_LEN, prepare.EVAL_TOKENS // prepare.MAX_SEQ_LEN
    rows = next(prepare.make_dataloader(tokenizer, n_rows, T, "val", "cpu", data_dir=data))[0].tolist()
    bos = tokenizer.get_bos_token_id()
    whole = set()  # the documents a pinned row holds whole (a document cut at the row's end may continue nowhere)
    for row in rows:
        starts = [i for i, t in enumerate(row) if t == bos]
        whole.update(tuple(row[a + 1:b]) for a, b in zip(starts, starts[1:]))
    dev_tokens, dev_offsets = prepare.load_tokens(tokenizer, data / prepare.DEV_FILENAME)
    dev = {tuple(dev_tokens[a:b].tolist()) for a, b in zip(dev_offsets[:-1], dev_offsets[1:])}
    assert len(whole) > n_rows and not whole & dev, f"{len(whole & dev)} pinned documents are in the dev slice"
    assert len(dev_tokens) >= 2**13, f"the dev slice holds {len(dev_tokens)} tokens, train.py's cpu curve reads 2**13"

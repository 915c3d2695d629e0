"""Fixtures that more than one test module needs, built once per test session."""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Each test sets the profile, cache and budget it needs: what the user's shell exported (the laptop quick
# start's AUTORESEARCH_PROFILE=cpu, a cache, a handoff) must not reach prepare.py's module-level reads
for _name in [name for name in os.environ if name.startswith("AUTORESEARCH_")]:
    del os.environ[_name]

# One torch thread per test process: the suite runs in as many processes as there are cores (pyproject's addopts),
# and threads that outnumber the cores spin-wait (a cpu experiment ran 2.6x slower for it on a busy 2-core box)
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Inductor's cache of its own, per session: the suite neither reads nor fills the user's (seen here: a shared cache
# filled under OMP_NUM_THREADS=1 made test_compile abort inside a cached CPU kernel when run with two threads)
INDUCTOR_CACHE = tempfile.mkdtemp(prefix="alr-tests-inductor-")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = INDUCTOR_CACHE


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(INDUCTOR_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def cpu_prepared(tmp_path_factory):
    """`prepare.py` in the cpu profile, run for real into a temp cache, with a dead mirror URL so any
    network access would fail. Returns (the completed process, the cache root)."""
    cache = tmp_path_factory.mktemp("cache")
    env = {**os.environ, "AUTORESEARCH_PROFILE": "cpu", "AUTORESEARCH_CACHE": str(cache),
           "AUTORESEARCH_DATA_URL": "http://127.0.0.1:9/nowhere"}
    out = subprocess.run([sys.executable, "prepare.py"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, f"prepare.py failed, so no test that needs its data can run:\n{out.stdout}{out.stderr}"
    return out, cache

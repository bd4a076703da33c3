import contextlib
import fcntl
import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# Each pytest-xdist worker, and every process it starts (`gmwae train`, the benchmarks'
# smoke modes), gets its share of the cores for PyTorch's threads: by default each would
# start one thread per core, and two workers' OpenMP threads spinning on the same two cores
# slow both. (Ray's trial workers already take 1 thread per CPU of the trial.) A value set
# by the caller stands.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
GMWAE = str(Path(sys.executable).parent / "gmwae")


def gmwae(*args, cwd, timeout=900):
    """The `gmwae` command in a subprocess, as a user runs it."""
    return subprocess.run([GMWAE, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


# `make test` runs the suite on two pytest-xdist workers, a test file's tests on one worker
# (`--dist loadfile`), so a module-scoped fixture (a trained run, a study, a cluster) is
# built once. Each worker builds its own smoke study (below) when one of its tests needs it.
# Tests that start a multi-node Ray cluster of processes run one at a time, so two clusters
# never share the two cores: each holds a lock file shared by the run's workers, for its
# module when the module is marked, else for the test. (pytest-xdist's `xdist_group` cannot
# do it: with pytest 9.2 its groups silently do not take, pytest-dev/pytest-xdist#1386, and
# with pytest 9.1 a grouped test's changed node id hid a conftest fixture from it.)
LOCAL_CLUSTERS = pytest.mark.local_clusters
"""For a test (or, as `pytestmark`, a module) that starts a Ray cluster of processes (`ray
start`, `ray up`, the autoscaler)."""


@contextlib.contextmanager
def _cluster_lock(tmp_path_factory, needed: bool):
    if not needed or "PYTEST_XDIST_WORKER" not in os.environ:
        yield
        return
    lock = tmp_path_factory.getbasetemp().parent / "local_clusters.lock"  # the run's, shared
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _marks(node) -> bool:
    return any(m.name == "local_clusters" for m in node.own_markers)


@pytest.fixture(scope="module", autouse=True)
def _one_cluster_module_at_a_time(request, tmp_path_factory):
    with _cluster_lock(tmp_path_factory, _marks(request.node)):  # before the module's fixtures
        yield


@pytest.fixture(autouse=True)
def _one_cluster_test_at_a_time(request, tmp_path_factory):
    module = request.node.getparent(pytest.Module)
    with _cluster_lock(tmp_path_factory, _marks(request.node) and not _marks(module)):
        yield


@pytest.fixture(scope="session")
def smoke_study(tmp_path_factory):
    """A finished smoke study (3 trials per family) and a 2-seed confirmation of it, in real
    stores (local Ray, Optuna sqlite, MLflow sqlite); yields (spec file, its folder)."""
    folder = tmp_path_factory.mktemp("smoke-study")
    text = (ROOT / "studies/smoke.yaml").read_text()
    text = text.replace("sqlite:///runs/{name}", f"sqlite:///{folder}").replace(
        "ray: runs/{name}/ray", f"ray: {folder}/ray")
    spec = folder / "smoke.yaml"
    spec.write_text(text)
    done = gmwae("study", "run", spec, "--quiet", cwd=folder)
    assert done.returncode == 0, done.stderr[-4000:]
    confirmed = gmwae("study", "confirm", spec, "--seeds", "2", "--out", folder / "confirm",
                      "--quiet", cwd=folder)
    assert confirmed.returncode == 0, confirmed.stderr[-4000:]
    return spec, folder


# The suite runs Ray, Tune, gRPC, PyTorch and Playwright in this one process. CI's run of
# 1083fb4 passed all 211 tests, then died with SIGSEGV while the interpreter tore down
# their native threads (Ray's own tracker: ray-project/ray#31145). Nothing is left to check
# by then, so the session ends as it would have, with its exit status, without that
# teardown; the threads still alive are named, so the cause stays visible.
@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    session.config._gmwae_exitstatus = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    import threading

    status = getattr(config, "_gmwae_exitstatus", None)
    if status is None or os.environ.get("GMWAE_TEST_TEARDOWN") == "1":
        return      # GMWAE_TEST_TEARDOWN=1: tear down as usual (to reproduce the crash)
    alive = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    if alive:
        print(f"\nconftest: {len(alive)} threads still alive at exit ({', '.join(alive[:8])}"
              f"{', ...' if len(alive) > 8 else ''}); exiting with status {status} without "
              f"interpreter teardown", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)

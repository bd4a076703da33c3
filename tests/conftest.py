import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

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


# `make test` runs the suite on two pytest-xdist workers (`--dist loadgroup`). A group's
# tests run on one worker, in file order, so the session's smoke study is built once and its
# stores see the tests in the order a serial run gives them; the multi-node clusters run one
# at a time, so two never share the two cores; and a module's tests that share a
# module-scoped fixture (a trained run, a study, a Ray instance) stay together, so it is
# built once: dealt out one by one, they met other modules' tests on both workers, and
# pytest tore the fixture down and built it again each time (CI: the smoke run of
# test_cli_train twice, 95 s each).
SMOKE_STUDY_GROUP = "smoke_study"
LOCAL_CLUSTERS = pytest.mark.xdist_group("local_clusters")
"""For a test that starts a Ray cluster of processes (`ray start`, `ray up`, the autoscaler)."""


def _uses_a_module_fixture(item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    return info is not None and any(
        defs and defs[-1].scope == "module" for defs in info.name2fixturedefs.values())


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups from the marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        if "smoke_study" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group(SMOKE_STUDY_GROUP))
        elif item.get_closest_marker("xdist_group") is None and _uses_a_module_fixture(item):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))


_GROUP_LOST = pytest.StashKey[str]()


@pytest.hookimpl(trylast=True)  # after xdist's hook has (or has not) applied the groups
def pytest_collection_finish(session):
    """On an xdist worker with `--dist loadgroup`, every grouped test's node id must carry
    its group, which is how xdist's scheduler sees it; pytest 9.2 dropped that silently
    (pytest-dev/pytest-xdist#1386) and the groups were dealt out test by test. Each such
    test then fails with the reason (an error raised here would only crash the worker)."""
    if not getattr(session.config.option, "loadgroup", False):
        return
    for item in session.items:
        if item.get_closest_marker("xdist_group") and "@" not in item.nodeid:
            item.stash[_GROUP_LOST] = (
                f"pytest-xdist's --dist loadgroup did not take effect with pytest "
                f"{pytest.__version__}: this grouped test lost its group, so the clusters "
                f"could overlap and shared studies be built twice. Install the test extra's "
                f"pytest (`pip install -e '.[test]'`: pytest<9.2), or run the tests in one "
                f"process (`make test TEST_WORKERS=0`).")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if _GROUP_LOST in item.stash:
        pytest.fail(item.stash[_GROUP_LOST], pytrace=False)


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

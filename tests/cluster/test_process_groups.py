"""Stopping a local cluster waits for its process groups to exit, and no longer."""
import os
import signal
import subprocess
import sys
import time

from cluster.local import LocalCluster, _group_alive


def test_an_exited_group_leader_not_yet_reaped_does_not_count_as_running():
    # Popen'd in a new session, as LocalCluster starts mlflow and the Ray nodes.
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    pgid = proc.pid
    assert _group_alive(pgid)
    os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _group_alive(pgid):
        time.sleep(0.05)
    # Before, the unreaped leader (a zombie) still took signal 0: stop() waited its 15 s.
    assert not _group_alive(pgid)


def test_a_group_whose_leader_exited_runs_while_a_member_runs():
    # The leader exits at once; the member it started (same group) keeps running.
    proc = subprocess.Popen(["bash", "-c", "sleep 60 & exit 0"], start_new_session=True)
    proc.wait()
    try:
        assert _group_alive(proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _group_alive(proc.pid):
        time.sleep(0.05)
    assert not _group_alive(proc.pid)


def test_stop_kills_a_process_of_the_cluster_that_left_its_groups(tmp_path):
    # A process in a session of its own (none of the groups stop() signals) that names one
    # of the cluster's temp folders, as a Ray node's processes do.
    folder = tmp_path / "gmwae-worker-x"
    folder.mkdir()
    stray = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(folder)],
                             start_new_session=True)
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        cluster = LocalCluster(tmp_path / "cluster")
        cluster.state.temp_dirs.append(str(folder))
        assert [p.pid for p in cluster.processes()] == [stray.pid]
        cluster.stop()
        assert stray.wait(timeout=5) == -signal.SIGKILL
        assert bystander.poll() is None  # a process that is not the cluster's is left alone
        assert not folder.exists() and not cluster.processes()
    finally:
        for proc in (stray, bystander):
            proc.kill()
            proc.wait()

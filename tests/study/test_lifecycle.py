"""Study lifecycle on real components: kill -9 the driver, resume; run on an existing name."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna

ROOT = Path(__file__).parents[2]
GMWAE = str(Path(sys.executable).parent / "gmwae")
TRIALS = 4


def spec_file_in(tmp_path, name="smoke", **changes) -> Path:
    text = (ROOT / "studies/smoke.yaml").read_text()
    text = text.replace("sqlite:///runs/{name}", f"sqlite:///{tmp_path}").replace(
        "ray: runs/{name}/ray", f"ray: {tmp_path}/ray").replace("name: smoke", f"name: {name}")
    for key, value in changes.items():
        text = "\n".join(f"{key}: {value}" if line.startswith(f"{key}:") else line
                         for line in text.splitlines())
    path = tmp_path / f"{name}-{len(changes)}.yaml"
    path.write_text(text)
    return path


def optuna_trials(tmp_path, study):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=study, storage=f"sqlite:///{tmp_path}/optuna.db").trials
    except (KeyError, Exception):
        return []


def gmwae(*args, cwd, timeout=900):
    return subprocess.run([GMWAE, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


def test_resume_after_kill_9_completes_each_family_once(tmp_path):
    # No ASHA, 3 iterations: the kill lands while a trial has a checkpoint and is not done.
    spec = spec_file_in(tmp_path, scheduler="{type: none}", max_iterations=3,
                        steps_per_iteration=15)
    driver = subprocess.Popen([GMWAE, "study", "run", spec, "--trials", str(TRIALS), "--quiet"],
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and driver.poll() is None:
            trials = optuna_trials(tmp_path, "smoke/gmwae")
            done = [t for t in trials if t.state.name == "COMPLETE"]
            cut = [t for t in trials if t.state.name == "RUNNING"
                   and 1 <= t.user_attrs.get("latest_iteration", 0) < 3]
            if len(done) >= 1 and cut:
                break
            time.sleep(0.2)
        assert driver.poll() is None, "the study ended before it could be killed"
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        time.sleep(2)
        try:
            os.killpg(driver.pid, signal.SIGKILL)  # Ray's processes the dead driver left behind
        except ProcessLookupError:
            pass
    before = {t.number: t.value for t in optuna_trials(tmp_path, "smoke/gmwae")
              if t.state.name == "COMPLETE"}
    cut_off = {t.number: t.user_attrs["latest_iteration"] for t in optuna_trials(
        tmp_path, "smoke/gmwae") if t.state.name == "RUNNING" and "latest_iteration" in t.user_attrs}
    assert len(before) >= 1 and cut_off

    # A plain `run` on the existing name is refused and changes nothing.
    again = gmwae("study", "run", spec, "--quiet", cwd=tmp_path)
    assert again.returncode == 2
    assert "already exists" in again.stderr and "gmwae study resume smoke" in again.stderr

    resumed = gmwae("study", "resume", spec, "--quiet", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]

    for family in ("gmwae", "gmvae"):
        trials = optuna_trials(tmp_path, f"smoke/{family}")
        states = [t.state.name for t in trials]
        assert states.count("COMPLETE") == TRIALS, (family, states)
        assert len(trials) == TRIALS  # none counted twice, none left RUNNING
    after = {t.number: t.value for t in optuna_trials(tmp_path, "smoke/gmwae")}
    assert all(after[n] == v for n, v in before.items())

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["smoke"])
    children = runs[runs["tags.role"] == "trial"]
    assert len(children) == 2 * TRIALS
    for family in ("gmwae", "gmvae"):
        numbers = children[children["tags.family"] == family]["tags.optuna_trial"]
        assert sorted(numbers.astype(int)) == list(range(TRIALS))
    assert set(children["status"]) == {"FINISHED"}
    assert len(runs[runs["tags.role"] == "study"]) == 1

    # The cut-off trials went on from their last checkpoint: each iteration logged once.
    client = mlflow.MlflowClient()
    wae = children[children["tags.family"] == "gmwae"].set_index("tags.optuna_trial")
    for number, iteration in cut_off.items():
        run_id = wae.loc[str(number), "run_id"]
        steps = [m.step for m in client.get_metric_history(run_id, "val/cluster_acc")]
        assert steps == [1, 2, 3], (number, iteration, steps)
        assert wae.loc[str(number), "tags.tune_trial_id"] != wae.loc[str(number), "tags.trial_id"]


def test_resume_refuses_a_changed_spec_and_a_missing_study(tmp_path):
    spec = spec_file_in(tmp_path)
    first = gmwae("study", "run", spec, "--trials", "1", "--quiet", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    before = [(t.number, t.value) for t in optuna_trials(tmp_path, "smoke/gmwae")]

    changed = spec_file_in(tmp_path, space="wide", fixed="{eval_size: 200}")
    refused = gmwae("study", "resume", changed, cwd=tmp_path)
    assert refused.returncode == 2
    assert "spec changed in space: recorded 'smoke', now 'wide'" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert [(t.number, t.value) for t in optuna_trials(tmp_path, "smoke/gmwae")] == before

    missing = gmwae("study", "resume", spec_file_in(tmp_path, name="never-ran"), cwd=tmp_path)
    assert missing.returncode == 2
    assert "No study 'never-ran' to resume" in missing.stderr

    # More trials is a compatible change: the study grows to the new budget.
    grown = gmwae("study", "resume", spec, "--trials", "2", "--quiet", cwd=tmp_path)
    assert grown.returncode == 0, grown.stderr[-4000:]
    assert [t.state.name for t in optuna_trials(tmp_path, "smoke/gmvae")] == ["COMPLETE"] * 2
    assert [(t.number, t.value) for t in optuna_trials(tmp_path, "smoke/gmwae")][:1] == before

"""A trial that asks for a GPU never trains on a CPU by accident: on a Ray node that
advertises a GPU (here a fake one: this machine has no CUDA), the study stops at the first
such trial with what is wrong and how to fix it, unless the spec says `device: cpu`."""
import mlflow
import optuna
import pytest

from study.cluster import ClusterError
from study.runner import run_study
from study.spec import spec_from_dict


@pytest.fixture(scope="module")
def ray_with_a_fake_gpu():
    import ray

    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def gpu_spec(tmp_path, name, trials=2, **fixed):
    return spec_from_dict({
        "name": name, "dataset": "synthetic", "space": "smoke", "trials": trials,
        "families": ["gmwae"], "max_iterations": 1, "steps_per_iteration": 5, "max_failures": 2,
        "resources": {"cpu": 1, "gpu": 0.5},
        "fixed": {"decoder_width": 8, "batch_size": 32, "pretrain_steps": 2, "eval_size": 100,
                  **fixed},
        "storage": {"optuna": f"sqlite:///{tmp_path}/o.db", "mlflow": f"sqlite:///{tmp_path}/m.db",
                    "ray": str(tmp_path / "ray")}})


def test_a_gpu_trial_on_a_node_without_cuda_stops_the_study_naming_node_torch_and_fix(
        tmp_path, ray_with_a_fake_gpu):
    import torch

    with pytest.raises(ClusterError) as raised:
        run_study(gpu_spec(tmp_path, "nocuda", trials=6), verbose=0)
    message = str(raised.value)
    assert message.startswith("A trial asks resources.gpu 0.5, but node ")
    assert f"has no CUDA device visible to torch {torch.__version__}" in message
    assert "`fixed: {device: cpu}`" in message and "gmwae study resume" in message
    assert "Traceback" not in message
    # stopped at the first failure: the two trials the GPU holds at once started, none
    # finished, no later one was asked (6 in the spec), none left for Tune to retry
    trials = optuna.load_study(study_name="nocuda/gmwae", storage=f"sqlite:///{tmp_path}/o.db").trials
    assert 1 <= len(trials) <= 2 and all(t.state.name != "COMPLETE" for t in trials)
    # what was recorded stays: the study's parent run in MLflow
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/m.db")
    assert client.get_experiment_by_name("nocuda") is not None


def test_device_cpu_in_the_spec_trains_a_gpu_share_on_cpus_deliberately(tmp_path,
                                                                       ray_with_a_fake_gpu):
    summary = run_study(gpu_spec(tmp_path, "oncpu", device="cpu"), verbose=0)
    trials = optuna.load_study(study_name="oncpu/gmwae", storage=f"sqlite:///{tmp_path}/o.db").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert summary["gmwae"]["trials"] == 2

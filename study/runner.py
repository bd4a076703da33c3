"""Run a study: per family, OptunaSearch on the spec's storage, ASHA, Ray Tune, MLflow.

    spec = load_spec("studies/smoke.yaml")
    summary = run_study(spec)           # {family: best trial row}

Each family gets its own Optuna study ("{name}/{family}") and the same trial budget, so
the comparison is fair; the paper's point is enqueued first. Stores are checked before
any trial starts.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
from pathlib import Path
from typing import Any, Callable, Optional

from .spec import SpecError, StudySpec
from .tracking import VAL_ACC, VAL_ACTIVE, StudyTracker, TrialLogger

__all__ = ["run_study", "resolve_study_data", "mask_url", "open_optuna_storage", "StoreError"]


class StoreError(SpecError):
    """A store named by the spec cannot be reached or opened."""


def mask_url(url: str) -> str:
    """The URL with any password replaced by ***."""
    return re.sub(r"(://[^:/@]+:)[^@]+@", r"\1***@", url)


def _ensure_sqlite_folder(url: str) -> None:
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True, exist_ok=True)


def open_optuna_storage(url: str):
    import optuna
    import sqlalchemy.exc

    _ensure_sqlite_folder(url)
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as e:
        raise StoreError(f"Cannot open the Optuna storage {mask_url(url)}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0]}. Check storage.optuna "
                         f"in the spec (sqlite:///FILE or postgresql://USER:PASS@HOST/DB).") from None


def _probe_http(url: str, timeout: float = 5.0) -> None:
    """Fail fast on an unreachable tracking server (MLflow's client retries for minutes)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout).read()
    except (urllib.error.URLError, OSError) as e:
        raise StoreError(f"Cannot reach the MLflow tracking server {mask_url(url)}: {e}. Start it, "
                         f"forward its port, or fix storage.mlflow in the spec.") from None


def _open_tracker(spec: StudySpec) -> StudyTracker:
    url = spec.store("mlflow")
    _ensure_sqlite_folder(url)
    if url.startswith(("http://", "https://")):
        _probe_http(url)
    try:
        return StudyTracker(url, spec.name)
    except Exception as e:  # noqa: BLE001 - any failure to reach the store means the same
        raise StoreError(f"Cannot reach the MLflow tracking store {mask_url(url)}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Check "
                         f"storage.mlflow in the spec (sqlite:///FILE or http://HOST:PORT).") from None


def _check_resources(spec: StudySpec) -> None:
    import ray

    total = ray.cluster_resources()
    if spec.resources.gpu > total.get("GPU", 0):
        raise SpecError(f"`resources.gpu` is {spec.resources.gpu} per trial, but the Ray cluster "
                        f"has {total.get('GPU', 0):g} GPUs (resources: CPU {total.get('CPU', 0):g}, "
                        f"GPU {total.get('GPU', 0):g}). Set resources.gpu: 0 or start GPU nodes.")
    if spec.resources.cpu > total.get("CPU", 0):
        raise SpecError(f"`resources.cpu` is {spec.resources.cpu} per trial, but the Ray cluster "
                        f"has {total.get('CPU', 0):g} CPUs. Lower resources.cpu.")


def resolve_study_data(spec: StudySpec) -> StudySpec:
    """Check the data folder on the driver and give trials its absolute path.

    Trials run in their own working folders (and, on a cluster, on other nodes), so a
    relative --data-dir or GMWAE_DATA_DIR would not resolve there.
    """
    from gmwae_core.data import find_idx_files, resolve_data_dir

    folder = resolve_data_dir(spec.run_config(spec.families[0], {}).data)
    if spec.dataset not in ("mnist", "fashion-mnist") or folder is None:
        return spec
    find_idx_files(folder)  # DataError naming the missing files, before any trial starts
    return dataclasses.replace(spec, data_dir=str(folder.resolve()))


def run_study(spec: StudySpec, address: Optional[str] = None, verbose: int = 1,
              trainable: Optional[Callable] = None) -> dict[str, Any]:
    """Run every family's search to its trial budget; returns {family: best row}.

    `trainable(config, setup)` defaults to study.trainable.train_trial.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import optuna
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from search_spaces import SPACES, paper_point

    from .trainable import TrialSetup, train_trial

    spec = resolve_study_data(spec)
    storage = open_optuna_storage(spec.store("optuna"))
    tracker = _open_tracker(spec)
    tracker.log_spec(spec.to_dict())
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, logging_level="WARNING")
    _check_resources(spec)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ray_storage = spec.store("ray")
    if "://" not in ray_storage:
        ray_storage = str(Path(ray_storage).expanduser().resolve())
    summary: dict[str, Any] = {}
    for family in spec.families:
        searcher = OptunaSearch(
            space=functools.partial(SPACES[spec.space], family=family),
            metric=VAL_ACC, mode="max", storage=storage,
            study_name=f"{spec.name}/{family}", seed=spec.seed,
            points_to_evaluate=[paper_point(spec.space, family)])
        scheduler = None
        if spec.scheduler.type == "asha":
            scheduler = ASHAScheduler(time_attr="training_iteration", max_t=spec.max_iterations,
                                      grace_period=spec.scheduler.grace_period,
                                      reduction_factor=spec.scheduler.reduction_factor)
        trial_fn = _family_trainable(trainable or train_trial, TrialSetup(spec, family))
        trainable_with_resources = tune.with_resources(
            trial_fn, {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})
        tuner = tune.Tuner(
            trainable_with_resources,
            tune_config=tune.TuneConfig(metric=VAL_ACC, mode="max", search_alg=searcher,
                                        scheduler=scheduler, num_samples=spec.trials,
                                        max_concurrent_trials=spec.max_concurrent),
            run_config=tune.RunConfig(
                name=f"{spec.name}-{family}", storage_path=ray_storage, verbose=verbose,
                callbacks=[TrialLogger(tracker, family, spec.max_iterations)],
                failure_config=tune.FailureConfig(max_failures=0),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2)))
        results = tuner.fit()
        summary[family] = _best_row(results, family)
    tracker.client.set_terminated(tracker.parent_run_id, "FINISHED")
    return summary


def _family_trainable(fn: Callable, setup: Any) -> Callable:
    """fn(config, setup) as a one-argument trainable named after the family.

    A closure rather than tune.with_parameters: with_parameters keys its object store
    entries and Tune's registry by the wrapped function, which both families share.
    """
    def trial(config: dict) -> None:
        return fn(config, setup)

    trial.__name__ = f"{setup.family}_trial"
    return trial


def _best_row(results, family: str) -> dict[str, Any]:
    ok = [r for r in results if r.error is None and r.metrics and VAL_ACC in r.metrics]
    failed = sum(r.error is not None for r in results)
    if not ok:
        return {"family": family, "trials": len(results), "failed": failed}
    best = max(ok, key=lambda r: r.metrics[VAL_ACC])
    return {"family": family, "trials": len(results), "failed": failed,
            VAL_ACC: best.metrics[VAL_ACC], VAL_ACTIVE: best.metrics.get(VAL_ACTIVE),
            "iterations": best.metrics.get("iteration"), "params": best.config}

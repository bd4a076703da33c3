"""Run a study: per family, OptunaSearch on the spec's storage, ASHA, Ray Tune, MLflow.

    spec = load_spec("studies/smoke.yaml")
    summary = run_study(spec)           # {family: best trial row}

Each family gets its own Optuna study ("{name}/{family}") and the same trial budget, so
the comparison is fair; the paper's point is enqueued first, then the spec's `points`.
Stores are checked before any trial starts.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

from .cluster import ClusterError
from .objective import Objective
from .resume import StudyExistsError, comparable
from .spec import StudySpec
from .stores import mask_url, open_optuna_storage, open_tracker, resolve_study_data
from .tracking import VAL_ACTIVE, TrialLogger

__all__ = ["run_study", "connect_ray", "trial_bundle", "family_trainable"]


def trial_bundle(spec: StudySpec) -> dict[str, float]:
    """One trial's Ray resources."""
    return {"CPU": spec.resources.cpu, "GPU": spec.resources.gpu}


def _probe_ray_address(target: str, timeout: float = 5.0) -> None:
    """Fail fast on a HOST:PORT nobody listens on (ray.init would retry for minutes)."""
    import socket

    match = re.fullmatch(r"(?:ray://)?\[?([\w.\-:]+?)\]?:(\d+)", target)
    if not match:
        return  # "local", "auto": Ray resolves these itself
    try:
        socket.create_connection((match.group(1), int(match.group(2))), timeout=timeout).close()
    except OSError as e:
        raise ClusterError(f"Cannot reach the Ray cluster at {target!r} ({e.strerror or e}). "
                           f"Check --address: the head's GCS address (HOST:6379 on a `ray up` "
                           f"cluster, as `ray status` prints it), or leave it out to start Ray "
                           f"on this machine.") from None


def connect_ray(spec: StudySpec, address: Optional[str],
                announce: bool = True) -> tuple[str, StudySpec]:
    """Join (or start) the Ray cluster, say which it is, check that a trial fits it (now
    or once the autoscaler adds nodes) and that its nodes reach the Ray storage; return the
    storage path trials write to (absolute, or a URI such as s3://...) and the spec the
    trials get: without a data folder that only this machine has, and with the GPU share
    sized from the node types' GPU memory when the spec does not give it.

    No address: the job's cluster when run by `ray job submit` (RAY_ADDRESS), else a new
    Ray on this machine, never a cluster some earlier `ray start` left running (pass
    `--address auto` to join that one).
    """
    import ray

    from .cluster import (check_storage_reachable, check_trial_fits, data_dir_for_trials,
                          read_cluster_shape, size_gpu_share)

    if not ray.is_initialized():
        target = address or os.environ.get("RAY_ADDRESS") or "local"
        _probe_ray_address(target)
        try:
            ray.init(address=target, include_dashboard=False, logging_level="WARNING")
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ClusterError(f"Cannot join the Ray cluster at {target!r}: "
                               f"{str(e).splitlines()[0] if str(e) else type(e).__name__}. "
                               f"Check --address (HOST:PORT of the head's GCS, or auto for a "
                               f"cluster started on this machine with `ray start`).") from None
    started_here = address is None and not os.environ.get("RAY_ADDRESS")
    shape = read_cluster_shape(joined=not started_here)
    memory = shape.gpu_memory_gb()
    if spec.resources.gpu > 0 and spec.resources.gpu_memory_gb is None and memory:
        # the node types name their GPUs: size each trial's share from them
        print(f"GPU memory of the cluster's GPU node types: {memory:g} GiB", flush=True)
        spec = dataclasses.replace(spec, resources=dataclasses.replace(
            spec.resources, gpu_memory_gb=memory))
        spec, lines = size_gpu_share(spec)
        for line in lines[-1:]:
            print(line, flush=True)
    note = check_trial_fits(shape, trial_bundle(spec))
    if announce:
        how = "started on this machine for this study" if started_here else "joined"
        print(shape.describe(how) + (f"\n  {note}" if note else ""), flush=True)
    ray_storage = spec.store("ray")
    if "://" not in ray_storage:
        ray_storage = str(Path(ray_storage).expanduser().resolve())
    check_storage_reachable(shape, ray_storage)
    data_dir, why = data_dir_for_trials(shape, spec.data_dir, spec.dataset)
    if why:
        print(why, flush=True)
        spec = dataclasses.replace(spec, data_dir=data_dir)
    return ray_storage, spec


def run_study(spec: StudySpec, address: Optional[str] = None, verbose: int = 1,
              trainable: Optional[Callable] = None, resume: bool = False) -> dict[str, Any]:
    """Run every family's search to its trial budget; returns {family: best row}.

    A name whose Optuna storage already holds trials needs `resume=True`: then the
    storage decides what is left (see study.search), whatever stopped the last driver.
    `trainable(config, setup)` defaults to study.trainable.train_trial.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Tune warns on every short iteration that snapshots are frequent; they are cheap here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    import optuna
    from ray.tune.schedulers import ASHAScheduler

    from gmwae_core.data import describe_splits

    from .cluster import size_gpu_share
    from .tracking import log_dataset
    from .search import ITERATION, StudySearch, TrialLedger, plan_family, stale_runs_closed
    from .trainable import TrialSetup, train_trial

    spec = resolve_study_data(spec)
    objective = spec.objective
    for line in objective.warnings(spec.searched_keys()):
        print(line, file=sys.stderr, flush=True)
    spec, gpu_lines = size_gpu_share(spec)  # before any store is written: a refusal loses nothing
    for line in gpu_lines:
        print(line, flush=True)
    storage = open_optuna_storage(spec.store("optuna"))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    plans = {f: plan_family(storage, f"{spec.name}/{f}", spec.trials) for f in spec.families}
    if not resume and any(p.exists for p in plans.values()):
        n = sum(p.finished + len(p.retry) for p in plans.values())
        raise StudyExistsError(
            f"Study {spec.name!r} already exists: {n} trials in {mask_url(spec.store('optuna'))}. "
            f"Continue it with `gmwae study resume {spec.name}` (or `study run SPEC --resume`), "
            f"or start a new study with `--name NEW`.")
    # The cluster's checks refuse before MLflow is written: a refused study leaves no
    # experiment behind.
    ray_storage, trial_spec = connect_ray(spec, address)
    tracker = open_tracker(spec)
    tracker.log_spec(spec.to_dict(), mask=mask_url)
    space = spec.search_space
    starts = {family: spec.start_points(family) for family in spec.families}
    tracker.log_views(spec.families, sorted({p.name for p in space.params}),
                      objective.metric, objective.mode)
    dataset = describe_splits(spec.run_config(spec.families[0], {}).data)
    log_dataset(tracker.client, tracker.parent_run_id, dataset)
    summary: dict[str, Any] = {}
    parts: dict[str, dict[str, Any]] = {}  # per family still to run: searcher, scheduler, ...
    for family in spec.families:
        plan = plans[family]
        study = optuna.create_study(study_name=plan.study_name, storage=storage,
                                    direction=objective.direction, load_if_exists=True)
        if study.metric_names is None:  # optuna-dashboard and plots name the objective
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names([objective.metric])
        study.set_user_attr("spec", comparable(spec.to_dict()))
        if plan.exists:
            stale_runs_closed(storage, plan.study_name, tracker.client, tracker.experiment_id,
                              family)
        if plan.samples == 0:
            continue
        parts[family] = {
            "samples": plan.samples,
            "searcher": StudySearch(
                space=functools.partial(space, family=family),
                metric=objective.metric, mode=objective.mode, storage=storage,
                study_name=plan.study_name,
                # a resumed sampler must not replay the first run's random draws
                seed=spec.seed + plan.finished + len(plan.retry),
                points_to_evaluate=(None if plan.exists or not starts[family]
                                    else starts[family]),
                retry=plan.retry, origins=spec.start_origins(family),
                pruned_below=spec.max_iterations if spec.scheduler.type == "asha" else None),
            "scheduler": (ASHAScheduler(time_attr=ITERATION, max_t=spec.max_iterations,
                                        grace_period=spec.scheduler.grace_period,
                                        reduction_factor=spec.scheduler.reduction_factor)
                          if spec.scheduler.type == "asha" else None),
            "callbacks": [TrialLedger(storage, plan.study_name, objective),
                          TrialLogger(tracker, family, spec.max_iterations,
                                      run_config=functools.partial(spec.run_config, family),
                                      dataset=dataset)],
            "setup": TrialSetup(trial_spec, family)}
    if spec.run_families == "together" and len(parts) > 1:
        groups = [list(parts)]  # one Tune run: the cluster never idles between families
    else:
        groups = [[family] for family in parts]
    for group in groups:
        _run_group(trial_spec, {f: parts[f] for f in group}, trainable or train_trial,
                   ray_storage, verbose)
        for family in group:  # these families are done: their best on the parent run
            _log_best(tracker, storage, plans[family].study_name, family, objective)
    for family in spec.families:
        summary[family] = _best_from_optuna(
            optuna.load_study(study_name=plans[family].study_name, storage=storage), family,
            objective)
    tracker.client.set_terminated(tracker.parent_run_id, "FINISHED")
    return summary


def _run_group(spec: StudySpec, parts: dict[str, dict[str, Any]], fn: Callable,
               ray_storage: str, verbose: int) -> None:
    """One Tune run over the given families' trials (see study.together for several)."""
    from ray import tune

    from .cluster import NoCudaStop, NodeWait
    from .together import ByFamily, FamilyScheduler, FamilySearch

    families = list(parts)
    if len(families) == 1:
        (family, part), = parts.items()
        searcher, scheduler, callbacks = part["searcher"], part["scheduler"], part["callbacks"]
        trial_fn = family_trainable(fn, part["setup"])
        name = f"{spec.name}-{family}"
    else:
        searcher = FamilySearch({f: p["searcher"] for f, p in parts.items()},
                                {f: p["samples"] for f, p in parts.items()},
                                spec.objective.metric, spec.objective.mode)
        scheduler = (FamilyScheduler({f: p["scheduler"] for f, p in parts.items()})
                     if spec.scheduler.type == "asha" else None)
        callbacks = [ByFamily({f: p["callbacks"] for f, p in parts.items()})]
        trial_fn = _families_trainable(fn, {f: p["setup"] for f, p in parts.items()})
        name = spec.name
    wait = NodeWait(spec.node_wait_minutes, trial_bundle(spec),
                    f"{spec.name}/{'+'.join(families)}")
    no_cuda = NoCudaStop()
    tuner = tune.Tuner(
        tune.with_resources(trial_fn, {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu}),
        tune_config=tune.TuneConfig(metric=spec.objective.metric, mode=spec.objective.mode,
                                    search_alg=searcher,
                                    scheduler=scheduler,
                                    num_samples=sum(p["samples"] for p in parts.values()),
                                    max_concurrent_trials=spec.max_concurrent,
                                    # a worker runs the next trial: no new process, torch
                                    # import or data load per trial
                                    reuse_actors=True),
        run_config=tune.RunConfig(
            name=name, storage_path=ray_storage, verbose=verbose,
            callbacks=[*callbacks, wait, no_cuda],
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=spec.objective.metric,
                checkpoint_score_order=spec.objective.mode)))
    tune_log = logging.getLogger(NoCudaStop.LOGGER)
    tune_log.addFilter(no_cuda)
    try:
        tuner.fit()
    except Exception:
        for stop in (wait, no_cuda):  # no node for the trials, or a GPU node without CUDA
            if stop.error is not None:
                raise stop.error from None
        raise
    finally:
        tune_log.removeFilter(no_cuda)
    for stop in (wait, no_cuda):
        if stop.error is not None:
            raise stop.error


def _families_trainable(fn: Callable, setups: dict[str, Any]) -> Callable:
    """fn(config, setups[config's family]) as one trainable for a run of several families."""
    from .together import FAMILY

    def trial(config: dict) -> None:
        return fn(config, setups[config[FAMILY]])

    trial.__name__ = "_".join(setups) + "_trial"
    return trial


def family_trainable(fn: Callable, setup: Any) -> Callable:
    """fn(config, setup) as a one-argument trainable named after the family.

    A closure rather than tune.with_parameters: with_parameters keys its object store
    entries and Tune's registry by the wrapped function, which both families share.
    """
    def trial(config: dict) -> None:
        return fn(config, setup)

    trial.__name__ = f"{setup.family}_trial"
    return trial


def _log_best(tracker, storage, study_name: str, family: str, objective: Objective) -> None:
    import optuna

    study = optuna.load_study(study_name=study_name, storage=storage)
    best = _best_from_optuna(study, family, objective)
    if "number" in best:
        trial = study.trials[best["number"]]
        tracker.log_family_best(family, best["number"], trial.user_attrs.get("best_iteration"),
                                objective.metric)


def _best_from_optuna(study, family: str, objective: Objective) -> dict[str, Any]:
    """The family's best scored trial by `objective`, from Optuna (the whole study, resumed
    parts too): its number, best value (under the metric's name and `value`), params."""
    from .trial_states import best_value, scored_trials

    trials = study.get_trials(deepcopy=False)
    ok = scored_trials(study)
    failed = sum(t.state.name == "FAIL" for t in trials)
    if not ok:
        return {"family": family, "trials": len(trials), "failed": failed}
    best = objective.best(ok, best_value, lambda t: t.number)
    return {"family": family, "trials": len(trials), "failed": failed, "number": best.number,
            "metric": objective.metric, "value": best_value(best),
            objective.metric: best_value(best),
            VAL_ACTIVE: best.user_attrs.get("best_active"),
            "iterations": best.user_attrs.get("latest_iteration"),
            "origin": best.user_attrs.get("origin", "sampled"),
            "params": best.params}

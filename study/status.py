"""`gmwae study status`: a study's trials so far, read from its stores (during a run or after).

    gmwae study status quickstart              # studies/quickstart.yaml, else default stores
    gmwae study status path/to/spec.yaml
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from .spec import SpecError, StudySpec, load_spec, spec_from_dict
from .trial_states import best_value, scored_trials

__all__ = ["find_spec", "study_status", "study_exists"]


def find_spec(name_or_path: str, studies_dir: str | Path = "studies") -> StudySpec:
    """A spec file, else studies/NAME.yaml, else the default stores of a study NAME."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        return load_spec(path)
    shipped = Path(studies_dir) / f"{name_or_path}.yaml"
    if shipped.is_file():
        return load_spec(shipped)
    return spec_from_dict({"name": name_or_path})


def study_exists(spec: StudySpec) -> None:
    """Raise SpecError when the study's sqlite Optuna storage does not exist (and make none)."""
    from .stores import mask_url, sqlite_file_missing

    url = spec.store("optuna")
    if sqlite_file_missing(url):
        raise SpecError(f"No study {spec.name!r}: its Optuna storage {mask_url(url)} does not exist. "
                        f"Run `gmwae study run SPEC` first, or pass the spec file it ran with.")


def study_status(spec: StudySpec) -> dict[str, Any]:
    """Per family: Optuna trial states, best value and params; MLflow child runs by status."""
    import optuna
    from mlflow.tracking import MlflowClient

    from .resume import recorded_objective, recorded_spec
    from .stores import open_optuna_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study_exists(spec)
    storage = open_optuna_storage(spec.store("optuna"))
    recorded = recorded_spec(storage, spec) or {}
    objective = recorded_objective(storage, spec)
    requested = recorded.get("trials", spec.trials)
    names = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    runs = []
    if recorded:  # the driver records the spec after it opened (and set up) the MLflow store;
        # reading it earlier could race the driver's first schema migration of a sqlite file
        client = MlflowClient(spec.store("mlflow"))
        exp = client.get_experiment_by_name(spec.name)
        runs = client.search_runs([exp.experiment_id], "tags.role = 'trial'") if exp else []
    out: dict[str, Any] = {}
    for family in spec.families:
        study_name = f"{spec.name}/{family}"
        if study_name not in names:
            out[family] = {"states": {}, "requested": requested}
            continue
        study = optuna.load_study(study_name=study_name, storage=storage)
        trials = study.trials
        best = objective.best(scored_trials(study), best_value, lambda t: t.number)
        out[family] = {
            "metric": objective.metric,
            "requested": requested,
            "states": dict(Counter(t.state.name for t in trials)),
            "best_value": best_value(best) if best else None,
            "best_params": best.params if best else None,
            "mlflow_runs": dict(Counter(r.info.status for r in runs
                                        if r.data.tags.get("family") == family)),
        }
    return out


def _metric(status: dict[str, Any]) -> str:
    return next((row["metric"] for row in status.values() if "metric" in row), "value")


def format_status(spec: StudySpec, status: dict[str, Any]) -> str:
    lines = [f"study {spec.name}  (optuna {spec.store('optuna')}, mlflow {spec.store('mlflow')})",
             f"{'family':<8}{'requested':>10}{'complete':>9}{'pruned':>7}{'running':>8}{'failed':>7}"
             f"{'best ' + _metric(status):>20}  best params / mlflow runs"]
    for family, row in status.items():
        states = row["states"]
        best = "" if row.get("best_value") is None else f"{row['best_value']:.4g}"
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in sorted((row.get("best_params") or {}).items()))
        lines.append(f"{family:<8}{row['requested']:>10}{states.get('COMPLETE', 0):>9}"
                     f"{states.get('PRUNED', 0):>7}{states.get('RUNNING', 0):>8}{states.get('FAIL', 0):>7}{best:>20}  "
                     f"{params or 'no finished trial'}")
        if row.get("mlflow_runs"):
            lines.append(f"{'':<8}mlflow child runs: {row['mlflow_runs']}")
    return "\n".join(lines)

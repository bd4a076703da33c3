"""`gmwae study export`: the best trials' best checkpoints -> a folder and the Model Registry.

    gmwae study export quickstart --top 2 --out exports/quickstart

Per chosen trial, OUT/{family}-trial{N:03d}/ holds a checkpoint folder `gmwae evaluate`
reads (weights.pt loadable with torch.load(weights_only=True), config.json, metrics.json
with the val and test metrics, manifest.json), figures/ and README.md (a model card).
OUT/export.json lists what was exported and registered. Nothing is trained: the
checkpoints the trials wrote are loaded and evaluated. Everything is written to a
temporary folder first and renamed into place only when every trial and every
registration succeeded.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

from gmwae_core.config import ConfigError
from gmwae_core.families import FAMILY_DEFS

from .objective import Objective
from .resume import recorded_objective
from .stores import StoreError, mask_url, open_optuna_storage, sqlite_file_missing
from .spec import StudySpec
from .trial_states import best_value, scored_trials

__all__ = ["export_study", "ExportError", "chosen_trials", "registered_model_name", "CHAMPION"]


class ExportError(ConfigError):
    """Nothing to export, or the export cannot be written where asked."""


CHAMPION = "champion"
"""The registry alias of each family's best exported version: models:/NAME-FAMILY@champion."""


def registered_model_name(study: str, family: str) -> str:
    return f"{study}-{family}"


def chosen_trials(spec: StudySpec, top: int, families: Optional[list[str]] = None
                  ) -> dict[str, list]:
    """Per family, its `top` scored trials with a checkpoint, best by the study's objective
    (its metric's best value over the trial's iterations) first."""
    return _ranked_trials(spec, top, families)[1]


def _ranked_trials(spec: StudySpec, top: int, families: Optional[list[str]]
                   ) -> tuple[Objective, dict[str, list]]:
    """chosen_trials, with the objective the study ran with (its recorded spec's)."""
    import optuna

    if top < 1:
        raise ExportError(f"`--top` must be at least 1, but got {top}. Use --top 1.")
    url = spec.store("optuna")
    if sqlite_file_missing(url):
        raise ExportError(f"No study {spec.name!r}: its Optuna storage {mask_url(url)} does not "
                          f"exist. Pass the spec file the study ran with.")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_optuna_storage(url)
    objective = recorded_objective(storage, spec)
    out: dict[str, list] = {}
    for family in families or spec.families:
        try:
            study = optuna.load_study(study_name=f"{spec.name}/{family}", storage=storage)
        except KeyError:
            continue
        done = objective.ranked(
            [t for t in scored_trials(study) if "best_checkpoint" in t.user_attrs],
            best_value, lambda t: t.number)
        if done:
            out[family] = done[:top]
    if not out:
        which = ", ".join(families or spec.families)
        raise ExportError(f"Study {spec.name!r} has no finished trial with a checkpoint for "
                          f"{which} in {mask_url(url)}. Run or resume it first "
                          f"(`gmwae study status {spec.name}` shows its trials).")
    return objective, out


def _registry_client(spec: StudySpec, registry_uri: Optional[str]):
    from mlflow.tracking import MlflowClient

    from .stores import probe_http

    tracking = spec.store("mlflow")
    registry = registry_uri or tracking
    for url in {tracking, registry}:
        if url.startswith(("http://", "https://")):
            probe_http(url)
    client = MlflowClient(tracking, registry_uri=registry)
    try:
        client.search_registered_models(max_results=1)
        experiment = client.get_experiment_by_name(spec.name)
    except Exception as e:  # noqa: BLE001 - any failure here means the registry is unusable
        raise StoreError(f"Cannot reach the MLflow Model Registry {mask_url(registry)}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Fix "
                         f"--registry-uri (default: the spec's storage.mlflow).") from None
    if experiment is None:
        raise ExportError(f"The MLflow store {mask_url(tracking)} has no experiment {spec.name!r}; "
                          f"the study's trials were tracked elsewhere. Pass the spec file it ran with.")
    return client, experiment.experiment_id


def _target_folder(out: str | Path) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"`--out` {out} already exists and is not an empty folder; an export "
                          f"never overwrites. Choose a new folder or remove it.")
    return out


def export_study(spec: StudySpec, out: str | Path, top: int = 1,
                 families: Optional[list[str]] = None, registry_uri: Optional[str] = None,
                 log=print) -> list[dict[str, Any]]:
    """Export the top trials of each family; returns one row per exported trial."""
    out = _target_folder(out)
    objective, trials = _ranked_trials(spec, top, families)
    client, experiment_id = _registry_client(spec, registry_uri)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    versions: list[tuple[str, str]] = []
    try:
        rows = []
        for family, chosen in trials.items():
            for trial in chosen:
                folder = tmp / f"{family}-trial{trial.number:03d}"
                log(f"exporting {family} trial {trial.number} (best value "
                    f"{best_value(trial):.4g}, iteration "
                    f"{trial.user_attrs.get('best_iteration')}) -> {out / folder.name}")
                row = _export_trial(spec, family, trial, folder)
                row["objective"] = {"metric": objective.metric, "mode": objective.mode,
                                    "value": row["metrics"].get(objective.metric)}
                run_id = _child_run_id(client, experiment_id, family, trial.number)
                row.update(_register(client, spec, family, trial, folder, run_id, versions))
                rows.append(row)
        for family, chosen in trials.items():  # each family's best: chosen[0], by the objective
            best = next(r for r in rows if r["family"] == family
                        and r["optuna_trial"] == chosen[0].number)
            client.set_registered_model_alias(best["registered_model"], CHAMPION,
                                              best["version"])
            best["alias"] = CHAMPION
        (tmp / "export.json").write_text(json.dumps(
            {"study": spec.name, "top": top, "trials": rows}, indent=2, sort_keys=True))
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for name, version in versions:  # no registered version may point at a missing export
            try:
                client.delete_model_version(name, version)
            except Exception:  # noqa: BLE001 - best effort; the original error matters
                pass
        raise
    for row in rows:
        row["folder"] = str(out / row["folder"])
        if row.get("run_id"):
            client.set_tag(row["run_id"], "exported_to", str(Path(row["folder"]).resolve()))
    return rows


def _export_trial(spec: StudySpec, family: str, trial, folder: Path) -> dict[str, Any]:
    from gmwae_core import CheckpointError, Trainer, load_checkpoint, load_splits, save_checkpoint
    from gmwae_core.checkpoint import read_config
    from gmwae_core.figures import write_figures

    with _local_copy(trial.user_attrs["best_checkpoint"]) as trial_folder:
        source = trial_folder / "checkpoint"
        if not source.is_dir():
            raise ExportError(f"The best checkpoint of {family} trial {trial.number} is gone: "
                              f"{source} does not exist (Ray storage {spec.store('ray')} moved or "
                              f"cleaned?). Restore the folder, or export other trials with --top.")
        try:
            cfg = read_config(source)
            trainer = Trainer(cfg, load_splits(cfg.data))
            saved = load_checkpoint(source, trainer)
        except CheckpointError as e:
            raise ExportError(f"{family} trial {trial.number}: {e}") from None
    val, test = trainer.evaluate("val"), trainer.evaluate("test")
    metrics = {k: v for k, v in saved.items() if not k.startswith(("val/", "test/"))}
    metrics.update(val.metrics)
    metrics.update(test.metrics)
    save_checkpoint(trainer, folder, metrics)
    write_figures(trainer, test, folder / "figures", split="test")
    (folder / "README.md").write_text(_model_card(spec, family, trial, cfg, metrics))
    example = trainer.splits.test_x[:2].reshape(2, -1).cpu().numpy()
    _save_mlflow_model(folder, example, f"{family} trial {trial.number}")
    return {"family": family, "optuna_trial": trial.number, "folder": folder.name,
            "tune_trial_id": trial.user_attrs.get("tune_trial_id"),
            "iteration": trial.user_attrs.get("best_iteration"),
            "params": dict(trial.params),
            "metrics": {k: v for k, v in metrics.items() if k.startswith(("val/", "test/"))}}


PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
CHECKPOINT_FILES = ("weights.pt", "trainer_state.pt", "config.json", "metrics.json",
                    "manifest.json")
"""What the model's `checkpoint` artifact holds: the files the manifest checks."""


def _save_mlflow_model(folder: Path, example, what: str) -> None:
    """Make the export folder an MLflow Model too (MLmodel, the pyfunc's code, gmwae_core,
    the checkpoint as its artifact, a signature and an input example), and check that it
    loads and predicts here: a model whose packaged code cannot run is not exported."""
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types.schema import Schema, TensorSpec

    import gmwae_core

    with tempfile.TemporaryDirectory(prefix="gmwae-pyfunc-") as tmp:
        checkpoint = Path(tmp) / "checkpoint"
        checkpoint.mkdir()
        for name in CHECKPOINT_FILES:
            shutil.copy2(folder / name, checkpoint / name)
        model_dir = Path(tmp) / "model"
        inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, 784))])
        try:
            mlflow.pyfunc.save_model(
                str(model_dir), python_model=str(PYFUNC_CODE),
                artifacts={"checkpoint": str(checkpoint)},
                code_paths=[str(Path(gmwae_core.__file__).parent)],
                signature=ModelSignature(inputs=inputs), input_example=example,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                                  f"numpy=={np.__version__}", "pandas", "scipy", "scikit-learn",
                                  f"mlflow=={mlflow.__version__}"])
            loaded = mlflow.pyfunc.load_model(str(model_dir))
            predicted = loaded.predict(example)
        except Exception as e:  # noqa: BLE001 - any failure: the model would not serve
            first = str(e).splitlines()[0].rstrip(".") if str(e) else ""
            raise ExportError(f"The MLflow Model of {what} does not load or predict: "
                              f"{type(e).__name__}: {first}. Nothing was registered.") from None
        # the output schema from what the model really returns
        signature = infer_signature(example, predicted)
        signature = ModelSignature(inputs=inputs, outputs=signature.outputs)
        from mlflow.models import Model

        meta = Model.load(str(model_dir / "MLmodel"))
        meta.signature = signature
        meta.save(str(model_dir / "MLmodel"))
        for item in model_dir.iterdir():
            shutil.move(str(item), str(folder / item.name))


@contextlib.contextmanager
def _local_copy(location: str):
    """A checkpoint as a local folder: itself, or a download of a remote one (s3://...)."""
    if "://" not in location:
        yield Path(location)
        return
    from ray import tune

    with tempfile.TemporaryDirectory(prefix="gmwae-export-") as tmp:
        try:
            tune.Checkpoint(location).to_directory(tmp)
        except Exception as e:  # noqa: BLE001 - any download failure reads the same
            raise ExportError(f"Cannot download the checkpoint {location}: {e}. Check the Ray "
                              f"storage's credentials on this machine.") from None
        yield Path(tmp)


def _child_run_id(client, experiment_id: str, family: str, number: int) -> Optional[str]:
    runs = client.search_runs([experiment_id], f"tags.role = 'trial' and tags.family = "
                                               f"'{family}' and tags.optuna_trial = '{number}'",
                              max_results=1)
    return runs[0].info.run_id if runs else None


def _register(client, spec: StudySpec, family: str, trial, folder: Path, run_id: Optional[str],
              versions: list) -> dict[str, Any]:
    from mlflow.exceptions import MlflowException

    name = registered_model_name(spec.name, family)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, tags={"study": spec.name, "family": family},
                                       description=f"{family} models of study {spec.name}")
    if run_id is not None:
        client.log_artifacts(run_id, str(folder), "model")
        source = f"runs:/{run_id}/model"
    else:
        source = folder.resolve().as_uri()
    metrics = json.loads((folder / "metrics.json").read_text())
    tags = {"study": spec.name, "family": family, "optuna_trial": str(trial.number),
            "trial_id": str(trial.user_attrs.get("tune_trial_id")), "export_folder": folder.name}
    tags.update({k: f"{v:.6g}" for k, v in metrics.items()
                 if k in ("val/cluster_acc", "test/cluster_acc", "test/nmi",
                          "test/active_components", "test/mmd") and math.isfinite(v)})
    mv = client.create_model_version(name, source, run_id=run_id, tags=tags,
                                     description=(folder / "README.md").read_text())
    versions.append((name, mv.version))
    return {"registered_model": name, "version": mv.version, "run_id": run_id, "source": source}


def _model_card(spec: StudySpec, family: str, trial, cfg, metrics: dict) -> str:
    from gmwae_core.figures import FIGURE_NAMES

    fam = FAMILY_DEFS[family]
    name = fam.label
    m = cfg.model
    lines = [f"# {name}, study `{spec.name}`, trial {trial.number}", "",
             f"Exported from the {spec.dataset} study `{spec.name}` (Optuna trial {trial.number}, "
             f"Tune trial {trial.user_attrs.get('tune_trial_id')}), at the iteration with the best "
             f"{spec.objective.metric} ({trial.user_attrs.get('best_iteration')} of "
             f"{spec.max_iterations}). No training happened at export.", "",
             "## Model", "",
             f"K = {m.K} components, latent dimension d = {m.latent_dim}, prior overlap "
             f"{m.prior_overlap:.4g}, decoder width {m.decoder_width}"
             + "".join(f", {k} = {getattr(m, k):.4g}" for k in fam.own_keys) + f". It "
             f"minimises {fam.equation}.", "",
             "Searched values: " + ", ".join(f"`{k}={v:.4g}`" if isinstance(v, float) else
                                             f"`{k}={v}`" for k, v in sorted(trial.params.items())),
             "", "## Metrics", "", "| metric | val | test |", "|---|---:|---:|"]
    for key in ("cluster_acc", "cluster_acc_greedy", "cluster_acc_many", "nmi", "ari", "ami",
                "active_components",
                "assignment_entropy", "mmd", "recon_mse"):
        v, t = metrics.get(f"val/{key}"), metrics.get(f"test/{key}")
        lines.append(f"| {key} | {'' if v is None else f'{v:.4f}'} | "
                     f"{'' if t is None else f'{t:.4f}'} |")
    lines += ["", "## Use", "", "```python", "import mlflow",
              f"model = mlflow.pyfunc.load_model('models:/{registered_model_name(spec.name, family)}"
              f"@{CHAMPION}')  # or this folder",
              "model.predict(images)  # float32 (N, 784) in [0, 1] -> cluster, q_k_*, z_*",
              "import torch",
              "weights = torch.load('weights.pt', weights_only=True)  # the plain weights", "```",
              "",
              "`gmwae evaluate THIS_FOLDER --check` recomputes the test metrics and checks them.",
              "", "## Figures (test split)", ""]
    lines += [f"![{f}](figures/{f}.png)" for f in FIGURE_NAMES]
    return "\n".join(lines) + "\n"

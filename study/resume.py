"""What a study was started with, and whether a spec may continue it.

The spec is recorded on the family's Optuna studies when a study starts (the storage is
the source of truth, see study.search); `resume`, `status`, `export` and `confirm` read it
back, and a resumed study may change only RESUMABLE_CHANGES.
"""
from __future__ import annotations

import json
from typing import Any, Optional

from .objective import DEFAULT_METRIC, Objective
from .spec import SpecError, StudySpec
from .stores import mask_url, open_optuna_storage, sqlite_file_missing

__all__ = ["RESUMABLE_CHANGES", "StudyExistsError", "recorded_spec", "recorded_objective",
           "load_recorded_spec", "spec_for_resume", "comparable"]


# Keys a resumed study may change; any other difference would mix incomparable trials.
RESUMABLE_CHANGES = ("trials", "max_concurrent", "max_failures", "resources", "data_dir",
                     "storage", "node_wait_minutes", "run_families")


class StudyExistsError(SpecError):
    """`study run` on a name whose stores already hold trials."""


def recorded_spec(storage, spec: StudySpec) -> Optional[dict]:
    """The spec a study was started with, as recorded on its Optuna studies (None: no study)."""
    import optuna

    for family in spec.families:
        try:
            study = optuna.load_study(study_name=f"{spec.name}/{family}", storage=storage)
        except KeyError:
            continue
        if "spec" in study.user_attrs:
            return study.user_attrs["spec"]
    return None


def recorded_objective(storage, spec: StudySpec) -> Objective:
    """The objective the study ran with (its recorded spec's metric and mode): a spec file
    passed to status or export may leave them out; before they existed, val/cluster_acc."""
    recorded = recorded_spec(storage, spec)
    if recorded is None:
        return spec.objective
    return Objective(recorded.get("metric") or DEFAULT_METRIC, recorded.get("mode"))


def load_recorded_spec(spec: StudySpec) -> Optional[dict]:
    """recorded_spec from the spec's Optuna storage; None (and no file made) when it is absent."""
    url = spec.store("optuna")
    if sqlite_file_missing(url):
        return None
    return recorded_spec(open_optuna_storage(url), spec)


def spec_for_resume(spec: StudySpec, recorded: Optional[dict],
                    overrides: Optional[dict] = None, compare: bool = True) -> StudySpec:
    """The recorded spec with the given one's stores (and `overrides`, e.g. trials).

    Raises SpecError naming each changed key when `spec` differs from the recorded one in
    anything but RESUMABLE_CHANGES, or when there is nothing to resume.
    """
    from .spec import spec_from_dict

    if recorded is None:
        raise SpecError(f"No study {spec.name!r} to resume in {mask_url(spec.store('optuna'))}. "
                        f"Start it with `gmwae study run SPEC`, or pass the spec file it ran "
                        f"with (its stores say where it is).")
    # a study recorded before `metric` and `mode` existed optimised val/cluster_acc, max;
    # one recorded before `points` existed had none
    recorded = {"metric": DEFAULT_METRIC, "mode": "max", "points": {}, **recorded}
    given = spec.to_dict()
    changed = [k for k in given if compare and k not in RESUMABLE_CHANGES and k != "name"
               and comparable(given[k]) != comparable(recorded.get(k))]
    if changed:
        detail = "; ".join(f"{k}: recorded {recorded.get(k)!r}, now {given[k]!r}" for k in changed)
        raise SpecError(f"Cannot resume study {spec.name!r}: its spec changed in {detail}. Trials "
                        f"with these settings would not be comparable with the recorded ones. "
                        f"Restore the spec, or run it as a new study with --name NEW.")
    merged = {**recorded, "storage": given["storage"], "data_dir": given["data_dir"],
              "max_failures": given["max_failures"],
              "resources": given["resources"], "max_concurrent": given["max_concurrent"],
              "node_wait_minutes": given["node_wait_minutes"],
              "run_families": given["run_families"],
              **(overrides or {})}
    return spec_from_dict(merged, f"study {spec.name}")


def comparable(value: Any) -> Any:
    return json.loads(json.dumps(value))  # tuples -> lists, as recorded

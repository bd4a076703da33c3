"""The study's stores: opening and checking them before any trial starts.

Optuna's storage (sqlite or PostgreSQL), MLflow's tracking store (sqlite or a server), the
data folder the trials read; passwords in store URLs are masked in every message.
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Callable

from .spec import SpecError, StudySpec
from .tracking import StudyTracker

__all__ = ["StoreError", "mask_url", "sqlite_file_missing", "ensure_sqlite_folder",
           "open_optuna_storage", "probe_http", "with_retries", "open_tracker",
           "resolve_study_data"]


class StoreError(SpecError):
    """A store named by the spec cannot be reached or opened."""


def mask_url(url: str) -> str:
    """The URL with any password replaced by ***."""
    return re.sub(r"(://[^:/@]+:)[^@]+@", r"\1***@", url)


def sqlite_file_missing(url: str) -> bool:
    """True for a sqlite:/// URL whose file does not exist (opening it would create it)."""
    return url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).expanduser().is_file()


def ensure_sqlite_folder(url: str) -> None:
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True, exist_ok=True)


def open_optuna_storage(url: str):
    import optuna
    import sqlalchemy.exc

    ensure_sqlite_folder(url)
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as e:
        raise StoreError(f"Cannot open the Optuna storage {mask_url(url)}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0]}. Check storage.optuna "
                         f"in the spec (sqlite:///FILE or postgresql://USER:PASS@HOST/DB).") from None


def probe_http(url: str, timeout: float = 5.0) -> None:
    """Fail fast on an unreachable tracking server (MLflow's client retries for minutes)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout).read()
    except (urllib.error.URLError, OSError) as e:
        raise StoreError(f"Cannot reach the MLflow tracking server {mask_url(url)}: {e}. Start it, "
                         f"forward its port, or fix storage.mlflow in the spec.") from None


def with_retries(make: Callable, attempts: int = 3, wait: float = 2.0):
    """make(), tried again on a transient database error (two processes creating the same
    sqlite schema at once: a driver and a `study status` reader)."""
    import time

    import sqlalchemy.exc

    for attempt in range(attempts):
        try:
            return make()
        except Exception as e:  # noqa: BLE001 - MLflow wraps SQLAlchemy's errors in its own
            transient = isinstance(e, sqlalchemy.exc.OperationalError) or \
                "OperationalError" in str(e)
            if not transient or attempt == attempts - 1:
                raise
            time.sleep(wait)


def open_tracker(spec: StudySpec) -> StudyTracker:
    url = spec.store("mlflow")
    ensure_sqlite_folder(url)
    if url.startswith(("http://", "https://")):
        probe_http(url)
    # The first contact fails fast (a wrong password or a broken server is reported now);
    # later calls keep MLflow's retries, which ride out a tracking server restart.
    saved = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        return with_retries(lambda: StudyTracker(url, spec.name))
    except Exception as e:  # noqa: BLE001 - any failure to reach the store means the same
        raise StoreError(f"Cannot reach the MLflow tracking store {mask_url(url)}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Check "
                         f"storage.mlflow in the spec (sqlite:///FILE or http://HOST:PORT).") from None
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
        else:
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = saved


def resolve_study_data(spec: StudySpec) -> StudySpec:
    """Check the data folder on the driver and give trials its absolute path.

    Trials run in their own working folders (and, on a cluster, on other nodes), so a
    relative --data-dir or GMWAE_DATA_DIR would not resolve there.
    """
    from gmwae_core.config import UNLABELLED_DATASETS
    from gmwae_core.data import DataError, find_idx_files, resolve_data_dir

    if spec.dataset in UNLABELLED_DATASETS:
        images = Path(spec.data_dir).expanduser()
        if not images.exists():
            raise DataError(f"`data_dir` {images} does not exist (resolved from "
                            f"{Path.cwd()}). Point it at the folder of your images or their "
                            f".npy array, absolute or relative to where the study runs.")
        return dataclasses.replace(spec, data_dir=str(images.resolve()))
    folder = resolve_data_dir(spec.run_config(spec.families[0], {}).data)
    if spec.dataset not in ("mnist", "fashion-mnist") or folder is None:
        return spec
    find_idx_files(folder)  # DataError naming the missing files, before any trial starts
    return dataclasses.replace(spec, data_dir=str(folder.resolve()))

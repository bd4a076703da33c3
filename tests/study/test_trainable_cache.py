"""The trainable's per-worker data cache (trials reuse a worker: study/trainable.py)."""
from gmwae_core import DataConfig
from study.trainable import cached_splits


def test_a_worker_loads_a_data_config_once_and_reloads_for_another():
    cached_splits.cache_clear()
    first = cached_splits(DataConfig(dataset="synthetic"))
    assert cached_splits(DataConfig(dataset="synthetic")) is first
    assert cached_splits.cache_info().hits == 1
    other = cached_splits(DataConfig(dataset="synthetic", split_seed=1))
    assert other is not first and len(other.val_x) == len(first.val_x)
    assert not (other.val_y == first.val_y).all()  # another split, really loaded
    cached_splits.cache_clear()

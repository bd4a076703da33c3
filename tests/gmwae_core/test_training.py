import copy
import json
import math

import pytest
import torch

from gmwae_core import (CheckpointError, ConfigError, NonFiniteLossError, Trainer, from_preset,
                        load_checkpoint, load_splits, save_checkpoint)
from gmwae_core.checkpoint import init_from

SMALL = {"dataset": "synthetic", "decoder_width": 8, "batch_size": 32, "pretrain_steps": 3,
         "history_every": 2, "num_samples": 2}


def small_trainer(family="gmwae", **extra):
    cfg = from_preset("cpu", {**SMALL, **extra}, family=family)
    return Trainer(cfg, load_splits(cfg.data))


@pytest.mark.parametrize("family", ["gmwae", "gmvae"])
def test_steps_report_finite_terms_and_record_step_history(family):
    t = small_trainer(family)
    out = t.train_steps(6)
    terms = {"gmwae": ["loss", "recon", "mmd"], "gmvae": ["loss", "recon", "kl_continuous",
                                                          "kl_discrete"]}[family]
    assert all(math.isfinite(out[f"train/{k}"]) for k in terms)
    assert 1 <= out["train/active_components"] <= 10
    assert [r["step"] for r in t.history] == [1, 2, 4, 6]
    assert {"assignment_entropy", "active_components", *terms} <= set(t.history[0])
    val = t.evaluate("val").metrics
    for key in ("cluster_acc", "cluster_acc_greedy", "nmi", "ari", "active_components",
                "assignment_entropy", "mean_entropy", "mmd", "recon_mse", "kl_discrete",
                "kl_continuous"):
        assert math.isfinite(val[f"val/{key}"])


def test_state_round_trip_continues_the_run_exactly(tmp_path):
    a = small_trainer()
    a.train_steps(4)
    save_checkpoint(a, tmp_path / "ckpt", a.evaluate("test").metrics)
    b = small_trainer()
    saved = load_checkpoint(tmp_path / "ckpt", b)
    assert b.evaluate("test").metrics == saved  # metrics reproduced exactly
    a.train_steps(3)
    b.train_steps(3)
    for (name, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert b.step == a.step == 7 and [r["step"] for r in b.history] == [r["step"] for r in a.history]


def test_a_state_saved_on_another_device_type_loads_and_continues_deterministically():
    """A GPU trial's state (CUDA Philox generator: 16 bytes, tagged cuda) resumed on a CPU
    node: the weights and counters load, and the new CPU stream is seeded from the saved
    state, the same way each time."""
    a = small_trainer()
    a.train_steps(2)
    state = a.state_dict()
    assert all(v.device.type == "cpu" for v in state["model"].values())
    assert int(state["generator_device"]) == 0
    cuda_like = {**state, "generator": torch.arange(16, dtype=torch.uint8),
                 "generator_device": torch.tensor(1)}
    b, c = small_trainer(), small_trainer()
    b.load_state_dict(copy.deepcopy(cuda_like))  # as if each read the file: no shared tensors
    c.load_state_dict(copy.deepcopy(cuda_like))
    assert b.step == 2
    b.train_steps(2)
    c.train_steps(2)
    for pb, pc in zip(b.model.state_dict().values(), c.model.state_dict().values()):
        assert torch.equal(pb, pc)
    d = small_trainer()  # a different saved stream gives a different continuation
    d.load_state_dict({**copy.deepcopy(cuda_like), "generator": torch.arange(1, 17, dtype=torch.uint8)})
    assert not torch.equal(d.generator.get_state(), b.generator.get_state())


def test_weights_load_with_weights_only(tmp_path):
    t = small_trainer()
    save_checkpoint(t, tmp_path / "c")
    weights = torch.load(tmp_path / "c" / "weights.pt", weights_only=True)
    assert set(weights) == set(t.model.state_dict())
    assert json.loads((tmp_path / "c" / "config.json").read_text())["family"] == "gmwae"


def test_corrupt_altered_and_missing_checkpoint_files_are_rejected(tmp_path):
    t = small_trainer()
    save_checkpoint(t, tmp_path / "c")
    raw = (tmp_path / "c" / "weights.pt").read_bytes()
    (tmp_path / "c" / "weights.pt").write_bytes(raw[:100])
    with pytest.raises(CheckpointError, match="altered or is corrupt"):
        load_checkpoint(tmp_path / "c", small_trainer())
    save_checkpoint(t, tmp_path / "c")
    (tmp_path / "c" / "metrics.json").unlink()
    with pytest.raises(CheckpointError, match="missing metrics.json"):
        load_checkpoint(tmp_path / "c", small_trainer())
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing", small_trainer())


def test_corrupt_weights_with_a_matching_manifest_are_rejected(tmp_path):
    from gmwae_core.checkpoint import _sha256

    t = small_trainer()
    save_checkpoint(t, tmp_path / "c")
    (tmp_path / "c" / "weights.pt").write_bytes(b"not a torch file")
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    manifest["files"]["weights.pt"] = _sha256(tmp_path / "c" / "weights.pt")
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="Could not read .*weights.pt"):
        load_checkpoint(tmp_path / "c", small_trainer())


def test_checkpoint_from_another_config_is_rejected(tmp_path):
    save_checkpoint(small_trainer(), tmp_path / "c")
    with pytest.raises(CheckpointError, match=r"does not fit a model with K=5"):
        init_from(tmp_path / "c", small_trainer(K=5))
    with pytest.raises(CheckpointError, match="is a gmwae run"):
        load_checkpoint(tmp_path / "c", small_trainer("gmvae"))


def test_init_from_copies_weights_across_families(tmp_path):
    wae = small_trainer()
    wae.train_steps(2)
    save_checkpoint(wae, tmp_path / "c")
    vae = small_trainer("gmvae")
    init_from(tmp_path / "c", vae)
    assert vae.pretrained and torch.equal(vae.model.q_k.net[0].weight, wae.model.q_k.net[0].weight)


def test_nan_loss_raises_with_the_step_and_terms():
    t = small_trainer()
    t.splits.train_x[:] = float("nan")
    with pytest.raises(NonFiniteLossError, match="not finite at step 1"):
        t.train_steps(2)


def test_batch_larger_than_the_data_is_a_config_error():
    with pytest.raises(ConfigError, match="batch_size"):
        small_trainer(batch_size=100000)


def test_minutes_budget_stops_training():
    t = small_trainer(minutes=0.002)  # 0.12 s
    t.train_steps(10_000)
    assert t.budget_exhausted and t.step < 10_000


def test_warmup_raises_the_learning_rate_linearly_then_holds_it():
    t = small_trainer(warmup_steps=4, lr=1e-3, lr_schedule="constant")  # the preset's decays
    lrs = []
    for _ in range(6):
        t.train_steps(1)
        lrs.append(t.optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def test_test_many_to_one_accuracy_uses_the_map_fitted_on_validation():
    from gmwae_core.metrics import cluster_acc_many, majority_labels

    trainer = small_trainer()
    trainer.train_steps(5)
    val, test = trainer.evaluate("val"), trainer.evaluate("test")
    fitted = majority_labels(val.labels, val.q_k.argmax(1), trainer.cfg.model.K)
    assert test.metrics["test/cluster_acc_many"] == pytest.approx(
        cluster_acc_many(test.labels, test.q_k.argmax(1), fitted))
    assert val.metrics["val/cluster_acc_many"] == pytest.approx(
        cluster_acc_many(val.labels, val.q_k.argmax(1)))
    for split, result in (("val", val), ("test", test)):
        assert -1 <= result.metrics[f"{split}/ami"] <= 1

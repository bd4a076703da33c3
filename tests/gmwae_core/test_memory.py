"""The step's memory estimate, and the training step at the paper's shapes on the `meta`
device: no GPU here, but a tensor made on the wrong device or a value read back to the host
inside the step fails there as it would slow or break a GPU run."""
import pytest
import torch

from gmwae_core import Trainer, from_preset, load_splits
from gmwae_core.memory import (CUDA_OVERHEAD_BYTES, DECODER_SAVED, GIB, GPU_DECODER_SAVED,
                               GPU_MMD_BLOCKS, gpu_share, step_memory)


def paper(**over):
    return from_preset("paper", {"dataset": "synthetic", "pretrain_steps": 0, **over},
                       family=over.pop("family", "gmwae"))


def test_the_estimate_grows_with_the_decoded_images_and_only_gmwae_pays_the_mmd():
    base = step_memory(paper())
    assert base.images == 128 * 10 * 5
    wider = step_memory(paper(K=20))
    assert wider.images == 2 * base.images
    assert wider.mmd_bytes == pytest.approx(4 * base.mmd_bytes)  # (B K S)^2
    assert wider.decoder_bytes == pytest.approx(2 * base.decoder_bytes)
    vae = step_memory(from_preset("paper", {"dataset": "synthetic"}, family="gmvae"))
    assert vae.mmd_bytes == 0 and vae.decoder_bytes == base.decoder_bytes
    # on a GPU: the reserve's MMD part grows as N^2, its decoder part as N, plus the context
    assert wider.gpu_reserved_bytes - base.gpu_reserved_bytes == pytest.approx(
        GPU_MMD_BLOCKS * 4 * 3 * base.images ** 2 + GPU_DECODER_SAVED * base.decoder_bytes
        / DECODER_SAVED)
    assert base.gpu_bytes == base.gpu_reserved_bytes + CUDA_OVERHEAD_BYTES
    assert 4 * GIB < base.gpu_bytes < 7 * GIB
    assert gpu_share(paper(), 80) == 0.1 and gpu_share(paper(), 24) == 0.25
    assert gpu_share(paper(K=30, batch_size=256), 80) == 0.85
    assert gpu_share(paper(K=30, batch_size=256), 48) > 1.0  # no single 48 GiB GPU holds it


@pytest.mark.parametrize("family", ["gmwae", "gmvae"])
def test_the_training_step_at_the_paper_shapes_runs_on_the_meta_device(family):
    cfg = paper(family=family)
    trainer = Trainer(cfg, load_splits(cfg.data), device=torch.device("meta"))
    x = trainer._next_batch()
    assert x.device.type == "meta" and x.shape[0] == cfg.train.batch_size
    terms, q_k_logits = trainer.optimizer_step(x)
    assert q_k_logits.shape == (128, 10) and q_k_logits.device.type == "meta"
    assert all(v.device.type == "meta" for v in terms.values())
    grads = [p.grad for p in trainer.model.parameters()]
    assert all(g is not None and g.device.type == "meta" for g in grads)
    # the guard is real: reading a value back to the host fails on this device
    with pytest.raises((RuntimeError, NotImplementedError)):
        float(terms["loss"].detach())


@pytest.mark.parametrize("family", ["gmwae", "gmvae"])
def test_train_step_and_its_statistics_never_wait_for_the_device(family):
    """train_step is what train_steps repeats: the optimiser step, the argmax counts, the
    aggregate q(k) and a history row, here with the consistency and balance terms on. On
    the meta device any read-back (a bincount sizing its output, a float() of a term, a
    .item()) raises, so this fails as soon as the step synchronises."""
    from gmwae_core.training import _StepStats

    cfg = paper(family=family, history_every=2, consistency_weight=1.0, balance_weight=1.0)
    trainer = Trainer(cfg, load_splits(cfg.data), device=torch.device("meta"))
    stats = _StepStats.on(cfg.model.K, trainer.device)
    for _ in range(4):
        trainer.train_step(trainer._next_batch(), stats)
    assert trainer.step == 4 and [step for step, _, _ in stats.rows] == [1, 2, 4]
    names = [*trainer.term_names, "assignment_entropy", "active_components"]
    assert {"consistency", "balance"} <= set(trainer.term_names)
    assert all(row.shape == (len(names),) and row.device.type == "meta"
               for _, _, row in stats.rows)
    assert stats.counts.device.type == "meta" and set(stats.sums) == set(trainer.term_names)

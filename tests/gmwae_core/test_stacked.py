"""A stack of runs stepped as one (gmwae_core.stacked) follows each run trained alone."""
import math

import pytest
import torch

from gmwae_core import ConfigError, NonFiniteLossError, Trainer, from_preset, load_splits
from gmwae_core.stacked import STACK_SHARED, StackedTrainer, stack_groups

SMALL = {"dataset": "synthetic", "decoder_width": 8, "batch_size": 32, "pretrain_steps": 3,
         "history_every": 2, "num_samples": 2, "precision": "fp32"}
# What each run of a stack may set for itself: seed, prior, objective weights, optimiser.
OWN = [{"seed": 0, "lambda_mmd": 10.0, "lr": 1e-3},
       {"seed": 1, "lambda_mmd": 3.0, "prior_overlap": 0.2, "prior_seed": 7, "lr": 2e-3,
        "beta1": 0.9},
       {"seed": 2, "recon_weight": 0.5, "lr_schedule": "linear", "warmup_steps": 2}]


def configs(family="gmwae", **extra):
    return [from_preset("cpu", {**SMALL, **own, **extra}, family=family) for own in OWN]


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.parametrize("family,extra", [
    ("gmwae", {}), ("gmvae", {}),
    ("gmwae", {"consistency_weight": 1.0, "balance_weight": 0.5, "grad_clip": 1.0})])
def test_each_run_of_a_stack_follows_the_run_trained_alone(family, extra):
    cfgs = configs(family, **extra)
    splits = load_splits(cfgs[0].data)
    stack = StackedTrainer(cfgs, splits)
    stacked = stack.train_steps(5)
    for i, cfg in enumerate(cfgs):
        alone = Trainer(cfg, splits)
        lone = alone.train_steps(5)
        assert set(stacked[i]) == set(lone)
        for key in lone:  # same batches, noise and updates: equal to float round-off
            assert relative(stacked[i][key], lone[key]) < 2e-3, (i, key, stacked[i][key], lone[key])
        run = stack.trainers[i]
        assert run.step == alone.step == 5
        assert [r["step"] for r in run.history] == [r["step"] for r in alone.history]
        assert run.optimizer.param_groups[0]["lr"] == pytest.approx(
            alone.optimizer.param_groups[0]["lr"])
        # a stacked step sees exactly the lone run's batch: the generators stayed in step
        assert torch.equal(run.generator.get_state(), alone.generator.get_state())
        val, val_alone = run.evaluate("val").metrics, alone.evaluate("val").metrics
        assert val["val/recon_mse"] == pytest.approx(val_alone["val/recon_mse"], rel=2e-2)


def test_the_stacked_adam_update_is_torch_adam_per_run():
    """Given the same gradients, the stack's update is torch.optim.Adam's for each run, with
    its own learning rate, beta1 and gradient clipping."""
    cfgs = configs("gmwae", grad_clip=0.05)
    splits = load_splits(cfgs[0].data)
    stack = StackedTrainer(cfgs, splits)
    stack.train_steps(2)  # moments and step counts that are not zero
    torch.manual_seed(5)
    grads = {name: torch.randn_like(p) for name, p in stack.params.items()}
    for name, p in stack.params.items():
        p.grad = grads[name].clone()
    lrs = torch.tensor([1e-3, 2e-3, 5e-4], dtype=torch.float64)
    stack._adam(lrs)
    for i, run in enumerate(stack.trainers):  # the run's own torch Adam, from the synced state
        own = dict(run.model.named_parameters())
        for name, p in own.items():
            p.grad = grads[name][i].clone()
        for group in run.optimizer.param_groups:
            group["lr"] = float(lrs[i])
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.train.grad_clip)
        run.optimizer.step()
        for name, p in own.items():
            assert torch.allclose(p, stack.params[name][i], atol=1e-7, rtol=1e-5), (i, name)


def test_a_stack_synced_back_goes_on_alone_like_a_run_that_never_stacked():
    cfgs = configs("gmwae")[:2]
    splits = load_splits(cfgs[0].data)
    stack = StackedTrainer(cfgs, splits)
    stack.train_steps(3)
    alone = Trainer(cfgs[1], splits)
    alone.train_steps(3)
    after_stack = stack.trainers[1].train_steps(3)  # Trainer's own step, Adam state restored
    after_alone = alone.train_steps(3)
    assert relative(after_stack["train/loss"], after_alone["train/loss"]) < 2e-3
    state = stack.trainers[1].optimizer.state_dict()["state"]
    assert all(float(s["step"]) == 6 for s in state.values())
    # the stack goes on from where each run is now: run 1 stepped alone, run 0 did not
    again = stack.train_steps(2)
    assert [t.step for t in stack.trainers] == [5, 8]
    assert [t.history[-1]["step"] for t in stack.trainers] == [4, 8]  # history_every 2
    assert relative(again[1]["train/loss"], alone.train_steps(2)["train/loss"]) < 2e-3


def test_runs_that_differ_in_shape_are_refused_and_grouped():
    cfgs = configs("gmwae")
    other = from_preset("cpu", {**SMALL, "latent_dim": 4}, family="gmwae")
    vae = from_preset("cpu", SMALL, family="gmvae")
    splits = load_splits(cfgs[0].data)
    with pytest.raises(ConfigError, match=r"must agree on .*run 3 differs from run 0 in "
                                          r"model.latent_dim\. Split them .*stack_groups"):
        StackedTrainer([*cfgs, other], splits)
    with pytest.raises(ConfigError, match="differs from run 0 in family"):
        StackedTrainer([cfgs[0], vae], splits)
    assert stack_groups([*cfgs, other, vae, cfgs[0]]) == [[0, 1, 2, 5], [3], [4]]
    assert "options on" in STACK_SHARED
    with pytest.raises(ConfigError, match="differs from run 0 in options on"):
        StackedTrainer([cfgs[0], from_preset("cpu", {**SMALL, "balance_weight": 1.0})], splits)
    with pytest.raises(ConfigError, match="at least one run config"):
        StackedTrainer([], splits)
    with pytest.raises(ConfigError, match="`train.compile` must be false.*train.compile=false"):
        StackedTrainer(configs("gmwae", compile=True), splits)


def test_a_run_whose_loss_diverges_is_named():
    cfgs = configs("gmwae")[:2]
    cfgs[1] = from_preset("cpu", {**SMALL, "seed": 1, "lr": 1e9, "lambda_mmd": 1e30},
                          family="gmwae")
    stack = StackedTrainer(cfgs, load_splits(cfgs[0].data))
    with pytest.raises(NonFiniteLossError, match=r"run 1 of the stack \(seed 1\): gmwae loss is "
                                                 r"not finite.*Lower train.lr"):
        stack.train_steps(4)
    assert math.isfinite(stack.trainers[0].history[-1]["loss"])  # run 0 was recorded

"""Several runs of one shape trained as one: the step of N models over stacked parameters.

    stack = StackedTrainer([cfg_seed0, cfg_seed1, cfg_lambda5], splits)
    per_run = stack.train_steps(500)       # one Trainer.train_steps dict per run
    stack.trainers[0].evaluate("val")      # each run is a Trainer; its weights follow the stack

A small model leaves most of a GPU idle: each of its kernels is too small to fill the chip.
N such runs stepped as one (torch.func: vmap over parameters stacked along a new first
dimension) make every layer one batched kernel over the N models (a convolution becomes
a grouped convolution) and launch each kernel once for the N runs instead of N times.

The runs share their shapes and what the step's code depends on (STACK_SHARED: the
family, K, d, the widths, S, the batch size, the precision, the device and which options
are on). Each keeps its own seed (initial weights, batches, noise), prior (overlap,
placement seed), lambda, reconstruction weight, learning rate, beta1, schedule, option
weights, gradient clipping and budget. Every run draws its batch and noise from its own
generator, in the order a lone Trainer does (training.draw_step), and its Adam update is
torch.optim.Adam's, so a stacked run follows the same trajectory as the run trained alone,
to float round-off (tests/gmwae_core/test_stacked.py).

Pretraining (the moment matching of q(z|k,x), and the warm start) runs per run before the
first stacked step; evaluation and checkpoints are each run's own Trainer's, after `sync`.
"""
from __future__ import annotations

import copy
import time
from types import SimpleNamespace
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call, stack_module_state

from .config import ConfigError, RunConfig
from .data import Splits
from .metrics import active_count, aggregate_entropy
from .networks import GMLVM
from .training import (NonFiniteLossError, StepDraws, Trainer, _StepStats, draw_step, lr_factor,
                       step_loss)

__all__ = ["StackedTrainer", "STACK_SHARED", "stack_groups"]

STACK_SHARED = ("family", "model.K", "model.latent_dim", "model.encoder_hidden",
                "model.decoder_width", "model.num_samples", "train.batch_size",
                "train.precision", "train.device", "train.compile", "options on")
"""What the runs of one stack must agree on: the step's shapes and code paths."""

ADAM_EPS = 1e-8  # torch.optim.Adam's default, which Trainer's optimiser uses


def _shared(cfg: RunConfig) -> tuple:
    """The values of STACK_SHARED, in its order."""
    t, m = cfg.train, cfg.model
    return (cfg.family, m.K, m.latent_dim, m.encoder_hidden, m.decoder_width, m.num_samples,
            t.batch_size, t.precision, t.device, t.compile,
            (t.consistency_weight > 0, t.balance_weight > 0, t.grad_clip is not None))


def stack_groups(cfgs: Sequence[RunConfig]) -> list[list[int]]:
    """The indices of `cfgs` grouped into stacks of runs that can share a step
    (equal STACK_SHARED values), in first-seen order."""
    groups: dict[tuple, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        groups.setdefault(_shared(cfg), []).append(i)
    return list(groups.values())


class _Step(nn.Module):
    """One run's step as a module, so functional_call can run it on one slice of the stack."""

    def __init__(self, model: GMLVM, trainer: Trainer):
        super().__init__()
        self.model = model
        self._trainer = (trainer,)  # not a submodule: its tensors are not the step's state

    def forward(self, x, eps_z, eps_p, x_t, means, sigma0, lambda_mmd, recon_weight,
                consistency_weight, balance_weight):
        t = self._trainer[0]
        model_hp = SimpleNamespace(lambda_mmd=lambda_mmd, recon_weight=recon_weight,
                                   num_samples=t.cfg.model.num_samples)
        train_hp = SimpleNamespace(consistency_weight=consistency_weight,
                                   balance_weight=balance_weight)
        loss, terms, q_k_logits = step_loss(
            self.model, self.model.decoder, t.cfg.family, model_hp, train_hp, t.extra_terms, x,
            StepDraws(eps_z, eps_p, x_t), means, sigma0, t._networks_cast)
        return loss, terms, q_k_logits


class StackedTrainer:
    """N runs of one shape, stepped as one; `trainers[i]` is run i (its counters, history,
    generator, data and evaluation), whose weights and Adam state `sync` writes back."""

    def __init__(self, cfgs: Sequence[RunConfig], splits: Splits,
                 device: Optional[torch.device] = None):
        if not cfgs:
            raise ConfigError("StackedTrainer needs at least one run config, got none.")
        groups = stack_groups(cfgs)
        if len(groups) > 1:
            first, other = cfgs[groups[0][0]], cfgs[groups[1][0]]
            diff = [name for name, a, b in zip(STACK_SHARED, _shared(first), _shared(other))
                    if a != b]
            raise ConfigError(
                f"the runs of a stack must agree on {', '.join(STACK_SHARED)}; run "
                f"{groups[1][0]} differs from run 0 in {', '.join(diff)}. Split them into "
                f"stacks with gmwae_core.stacked.stack_groups(cfgs).")
        if cfgs[0].train.compile:
            raise ConfigError("`train.compile` must be false for a stack of runs (vmap batches "
                              "the eager step), but it is true. Set train.compile=false.")
        self.trainers = [Trainer(cfg, splits, device) for cfg in cfgs]
        self.device = self.trainers[0].device
        self._stacked = False  # True while the stacked tensors are newer than the Trainers

    def __len__(self) -> int:
        return len(self.trainers)

    # ------------------------------------------------------------ stacking

    def _stack(self) -> None:
        """The runs' weights, BatchNorm statistics and Adam moments, stacked (N, ...), read
        from the Trainers (which hold the runs between calls: a run may have stepped,
        evaluated or loaded a checkpoint alone since the last call)."""
        models = [t.model for t in self.trainers]
        params, self.buffers = stack_module_state(models)
        self.params = {k: v.detach().requires_grad_() for k, v in params.items()}
        base = copy.deepcopy(models[0]).to("meta")
        for module in base.modules():  # an in-place ReLU on a vmapped view copies the slices back
            if isinstance(module, nn.ReLU):
                module.inplace = False
        self._base = _Step(base, self.trainers[0]).train()
        self.names = list(self.params)
        owned = [dict(t.model.named_parameters()) for t in self.trainers]
        self.exp_avg, self.exp_avg_sq = {}, {}
        steps = [float(t.optimizer.state.get(owned[i][self.names[0]], {}).get("step", 0.0))
                 for i, t in enumerate(self.trainers)]
        for name in self.names:
            avg, sq = [], []
            for i, t in enumerate(self.trainers):
                s = t.optimizer.state.get(owned[i][name], {})
                p = owned[i][name]
                avg.append(s["exp_avg"] if "exp_avg" in s else torch.zeros_like(p))
                sq.append(s["exp_avg_sq"] if "exp_avg_sq" in s else torch.zeros_like(p))
            self.exp_avg[name] = torch.stack(avg).detach().clone()
            self.exp_avg_sq[name] = torch.stack(sq).detach().clone()
        self.adam_steps = torch.tensor(steps, dtype=torch.float64)
        per_run = [(t.prior.means, t.prior.sigma0, t.cfg.model.lambda_mmd, t.cfg.model.recon_weight,
                    t.cfg.train.consistency_weight, t.cfg.train.balance_weight, t.cfg.train.beta1)
                   for t in self.trainers]
        dev = self.device
        self.means = torch.stack([r[0] for r in per_run])
        self.hyper = [torch.tensor([r[j] for r in per_run], dtype=torch.float32, device=dev)
                      for j in range(1, 6)]
        self.beta1 = torch.tensor([r[6] for r in per_run], dtype=torch.float64)
        self._stacked = True

    @torch.no_grad()
    def sync(self) -> None:
        """Write the stack's weights, BatchNorm statistics and Adam state back into each run's
        Trainer (its model and torch.optim.Adam), so that it evaluates, saves a checkpoint or
        goes on alone exactly where the stack left it."""
        if not self._stacked:
            return
        self._stacked = False
        for i, t in enumerate(self.trainers):
            own = dict(t.model.named_parameters())
            for name, value in self.params.items():
                own[name].copy_(value[i])
                t.optimizer.state[own[name]] = {
                    "step": torch.tensor(float(self.adam_steps[i])),
                    "exp_avg": self.exp_avg[name][i].clone(),
                    "exp_avg_sq": self.exp_avg_sq[name][i].clone()}
            for name, value in t.model.named_buffers():
                value.copy_(self.buffers[name][i])

    # ------------------------------------------------------------ training

    def _draws(self) -> tuple[torch.Tensor, StepDraws]:
        """Each run's batch and draws from its own generator, stacked (N, ...)."""
        xs, draws = [], []
        for t in self.trainers:
            x = t._next_batch()
            xs.append(x)
            draws.append(draw_step(t.cfg, x, t.generator))
        stack = [None if d[0] is None else torch.stack(d) for d in zip(*draws)]
        return torch.stack(xs), StepDraws(*stack)

    def _loss(self, x: torch.Tensor, draws: StepDraws):
        """The N runs' losses (N,), terms {name: (N,)} and q(k|x) logits (N, B, K)."""
        def one(params, buffers, x, eps_z, eps_p, x_t, means, *hyper):
            return functional_call(self._base, ({f"model.{k}": v for k, v in params.items()},
                                                {f"model.{k}": v for k, v in buffers.items()}),
                                   (x, eps_z, eps_p, x_t, means, *hyper))

        in_dims = (0, 0, 0, 0, None if draws.eps_p is None else 0,
                   None if draws.x_t is None else 0, 0, 0, 0, 0, 0, 0)
        return torch.vmap(one, in_dims=in_dims)(self.params, self.buffers, x, *draws, self.means,
                                                *self.hyper)

    def _lrs(self) -> torch.Tensor:
        """Each run's learning rate for its next step (its own schedule and budget)."""
        return torch.tensor([t.cfg.train.lr * lr_factor(t.cfg.train, t.step, t.steps_per_epoch,
                                                         t._seconds_so_far(), t.budget_steps)
                             for t in self.trainers], dtype=torch.float64)

    @torch.no_grad()
    def _adam(self, lrs: torch.Tensor) -> None:
        """torch.optim.Adam's update (no weight decay, no amsgrad), each run with its own
        learning rate, beta1 and step count; after each run's gradient clipping."""
        clips = [t.cfg.train.grad_clip for t in self.trainers]
        if clips[0] is not None:
            norms = torch.stack([g.grad.flatten(1).pow(2).sum(1) for g in self.params.values()]
                                ).sum(0).sqrt()
            limit = torch.tensor(clips, dtype=norms.dtype, device=norms.device)
            scale = (limit / (norms + 1e-6)).clamp(max=1.0)
        self.adam_steps += 1
        beta2 = 0.999
        bias1 = 1 - self.beta1 ** self.adam_steps
        bias2_sqrt = (1 - beta2 ** self.adam_steps).sqrt()
        step_size = (lrs / bias1).float().to(self.device)
        bias2_sqrt = bias2_sqrt.float().to(self.device)
        beta1 = self.beta1.float().to(self.device)
        for name, p in self.params.items():
            grad = p.grad
            shape = (-1,) + (1,) * (p.dim() - 1)
            if clips[0] is not None:
                grad = grad * scale.view(shape)
            m, v = self.exp_avg[name], self.exp_avg_sq[name]
            m.lerp_(grad, (1 - beta1).view(shape))
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (v.sqrt() / bias2_sqrt.view(shape)).add_(ADAM_EPS)
            p.sub_(step_size.view(shape) * m / denom)
            p.grad = None

    def train_steps(self, n: int,
                    on_step: Optional[Callable[[int], None]] = None) -> list[dict[str, float]]:
        """Up to `n` steps of every run together (fewer once the first run's `train.minutes`
        is used: the runs share the clock). Returns each run's Trainer.train_steps dict.
        Raises NonFiniteLossError naming the run whose loss stopped being finite."""
        for t in self.trainers:
            if not t.pretrained:
                t.pretrain()
            t.model.train()
        self._stack()
        N, K = len(self), self.trainers[0].cfg.model.K
        sums: dict[str, torch.Tensor] = {}
        counts = torch.zeros(N, K, device=self.device)
        q_k_sum = torch.zeros(N, K, device=self.device)
        rows: list[tuple[list[int], list[bool], float, torch.Tensor]] = []
        first = self.trainers[0]
        done, start = 0, time.monotonic()
        for t in self.trainers:
            t._segment_start = start
        try:
            while done < n and not any(t._out_of_time(start) for t in self.trainers):
                x, draws = self._draws()
                loss, terms, q_k_logits = self._loss(x, draws)
                loss.sum().backward()  # the runs share no parameter: each gets its own gradient
                last_lrs = self._lrs()
                self._adam(last_lrs)
                for t in self.trainers:
                    t.step += 1
                with torch.no_grad():
                    q_k = torch.softmax(q_k_logits.detach(), -1)  # (N, B, K)
                    batch_counts = nn.functional.one_hot(q_k.argmax(-1), K).sum(1).float()
                    counts += batch_counts
                    q_k_sum += q_k.sum(1)
                    for name, value in terms.items():
                        sums[name] = sums.get(name, 0.0) + value.detach()
                    steps = [t.step for t in self.trainers]  # a run may have stepped alone
                    due = [t.step % t.cfg.train.history_every == 0 or t.step == 1
                           for t in self.trainers]
                    if any(due):
                        rows.append((steps, due, time.time(), torch.stack(
                            [terms[k].detach().float() for k in first.term_names]
                            + [torch.vmap(aggregate_entropy)(q_k),
                               torch.vmap(active_count)(batch_counts).float()], 1)))
                done += 1
                if on_step is not None:
                    on_step(first.step)
        finally:
            elapsed = time.monotonic() - start
            for t in self.trainers:
                t._segment_start = None
                t.train_seconds += elapsed
        self.sync()
        out = []
        for i, t in enumerate(self.trainers):
            stats = _StepStats({k: v[i] for k, v in sums.items()}, counts[i], q_k_sum[i],
                               [(s[i], w, r[i]) for s, due, w, r in rows if due[i]])
            if done:
                for group in t.optimizer.param_groups:
                    group["lr"] = float(last_lrs[i])
            try:
                out.append(t.summarise_steps(stats, done))
            except NonFiniteLossError as e:
                raise NonFiniteLossError(f"run {i} of the stack (seed {t.cfg.train.seed}): {e}") from e
        return out

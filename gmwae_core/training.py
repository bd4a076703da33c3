"""Training and evaluation of one run, with an epoch/step API a scheduler can drive.

    trainer = Trainer(cfg, load_splits(cfg.data))
    trainer.pretrain()                       # fit q(z|k,x) to the prior's moments
    train_metrics = trainer.train_epoch()    # or trainer.train_steps(n)
    val = trainer.evaluate("val")            # EvalResult: .metrics {"val/cluster_acc": ...}
    state = trainer.state_dict(); trainer.load_state_dict(state)

The dataset is one tensor on the device and batches are index draws; everything outside
the step (evaluation, history) happens at its own interval.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.profiler import record_function

from .augment import random_shift_rotate
from .config import ConfigError, RunConfig, TrainConfig
from .data import Splits
from .metrics import (active_count, aggregate_entropy, augment_ari, augment_mi, cluster_acc_greedy,
                      clustering_metrics, collapse_metrics, greedy_labels, label_by_k,
                      latent_silhouette, majority_labels)
from .networks import GMLVM
from .families import FAMILY_DEFS, StepOutputs
from .objectives import (balance_kl, consistency_kl, kl_categorical_uniform, kl_diag_gaussians,
                         moment_matching_loss, weighted_mmd)
from .priors import MixturePrior

__all__ = ["Trainer", "EvalResult", "StepDraws", "DrawnPrior", "draw_step", "step_loss",
           "NonFiniteLossError", "resolve_device", "lr_factor", "budget_used",
           "resolve_precision", "PAPER_LR_DECAY"]

PAPER_LR_DECAY = ((30, 0.5), (50, 0.1))
"""The authors' schedule (train.lr_schedule=paper): (from epoch, factor of train.lr)."""
WARM_START_KMEANS_IMAGES = 10_000  # training images whose codes k-means partitions


def budget_used(train: TrainConfig, step: int, budget_steps: int,
                train_seconds: float) -> float:
    """The share of the run's budget used before optimiser step `step` (0-based): steps
    out of `budget_steps`, or training seconds (pretraining included) out of
    `train.minutes` when that is set, whichever is further along; at most 1."""
    used = step / budget_steps
    if train.minutes is not None:
        used = max(used, train_seconds / (60.0 * train.minutes))
    return min(1.0, used)


def lr_factor(train: TrainConfig, step: int, steps_per_epoch: int,
              train_seconds: float = 0.0, budget_steps: Optional[int] = None) -> float:
    """The learning rate of optimiser step `step` (0-based) as a factor of `train.lr`: the
    linear warm-up over `train.warmup_steps`, times the schedule's factor: for paper, at
    that step's epoch (step // steps_per_epoch); for linear, 1 - u, where u is the share of
    the budget used (`budget_used`: the step out of `budget_steps`, by default
    `train.epochs` epochs, and `train_seconds` out of `train.minutes`).

    The linear decay to 0 at the budget's end is the budget-aware schedule of Li, Yumer and
    Ramanan, "Budgeted training: rethinking deep neural network training under resource
    constraints" (ICLR 2020): a run that stops by a budget long before it converges gets
    the decay that a constant rate never gives it.
    """
    factor = min(1.0, (step + 1) / train.warmup_steps) if train.warmup_steps else 1.0
    if train.lr_schedule == "paper":
        epoch = step // steps_per_epoch
        factor *= min((decay for start, decay in PAPER_LR_DECAY if epoch >= start), default=1.0)
    elif train.lr_schedule == "linear":
        steps = budget_steps if budget_steps is not None else train.epochs * steps_per_epoch
        factor *= 1.0 - budget_used(train, step, steps, train_seconds)
    return factor

EVAL_BATCH = 500
MMD_EVAL_POINTS = 1000  # held-out points in the fixed `mmd` estimator
MMD_EVAL_SEED = 12345
CRITERIA_EVAL_POINTS = 2000  # held-out points of augment_ari, augment_mi and silhouette
AUGMENT_EVAL_SHIFT, AUGMENT_EVAL_DEGREES = 2, 10.0
"""T(x) of `augment_ari` and `augment_mi`: fixed (the consistency term's defaults), so that trials with
different training settings are scored against the same transformation."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the terms."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("`train.device` is cuda, but no CUDA device is visible. "
                         "Use train.device=auto or cpu.")
    return torch.device(name)


@dataclass
class EvalResult:
    """Metrics of one split (keys prefixed with the split) and the arrays behind them."""

    metrics: dict[str, float]
    q_k: np.ndarray  # (N, K) q(k|x)
    labels: np.ndarray  # (N,); -1 for images without labels
    label_by_k: np.ndarray  # (n_labels, K) E[q(k|x) | label]; (0, K) without labels


_DEVICE_CODES = {"cpu": 0, "cuda": 1, "mps": 2, "xpu": 3}
"""Device types a generator state is tagged with in a checkpoint (weights_only loads tensors only)."""


def _to_cpu(state: Any) -> Any:
    """A (nested) state dict with every tensor copied to the CPU."""
    if isinstance(state, torch.Tensor):
        return state.detach().cpu()
    if isinstance(state, dict):
        return {k: _to_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_to_cpu(v) for v in state)
    return state


@dataclass
class _StepStats:
    """What train_step accumulates on the device between two reads."""

    sums: dict[str, torch.Tensor]
    counts: torch.Tensor  # (K,) argmax assignments
    q_k_sum: torch.Tensor  # (K,) summed q(k|x)
    rows: list[tuple[int, float, torch.Tensor]]  # (step, wall clock, history values)

    @classmethod
    def on(cls, K: int, device: torch.device) -> "_StepStats":
        return cls({}, torch.zeros(K, device=device), torch.zeros(K, device=device), [])


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN runs bf16 on this CPU (AVX-512 BF16 or AMX); without it, bf16
    convolutions fall back to PyTorch's reference kernels."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: str, device: torch.device) -> str:
    """train.precision as it runs on `device`. auto is bf16 where the networks run faster
    in it: a CPU with oneDNN bf16 kernels or a CUDA GPU with bf16 (docs/results.md has
    the measured steps per second); fp32 elsewhere (on a CPU without them, bf16
    convolutions run PyTorch's reference kernels, many times slower)."""
    if precision != "auto":
        return precision
    if device.type == "cpu":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "fp32"


def use_tf32_for_convolutions_only() -> None:
    """TF32 for cuDNN's convolutions (the networks' bulk), full float32 for every matmul:
    the MMD's ||a||^2 + ||b||^2 - 2 a.b cancels where codes are close, and TF32's 10-bit
    mantissa would leave the kernel's small distances, forward and backward, as noise."""
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = False


class StepDraws(NamedTuple):
    """A training step's random draws, made before its computation (draw_step), so that the
    computation is a function of tensors alone (torch.func can stack it over runs)."""

    eps_z: torch.Tensor
    """(B, K, S, d) standard normal noise of z ~ q(z|k,x)."""
    eps_p: Optional[torch.Tensor]
    """(B, S, K, d) standard normal noise of z ~ p(z|k), for a family that samples the prior."""
    x_t: Optional[torch.Tensor]
    """T(x), the transformed batch of the consistency term, when that term is on."""


class DrawnPrior(NamedTuple):
    """The prior as a step's loss sees it: its means and sigma0, and `sample` giving the
    step's z ~ p(z|k) from the noise drawn for it (MixturePrior.sample's formula)."""

    means: torch.Tensor
    sigma0: Any  # a float, or a 0-dim tensor per run in a stack
    eps: Optional[torch.Tensor]

    def sample(self, shape: tuple[int, ...], scale: float = 1.0) -> torch.Tensor:
        if self.eps is None or tuple(self.eps.shape[:len(shape)]) != tuple(shape):
            raise ValueError(f"DrawnPrior.sample{shape}: the step drew noise of shape "
                             f"{None if self.eps is None else tuple(self.eps.shape)}; a family "
                             f"whose loss samples the prior sets Family.samples_prior.")
        return self.means + (scale * self.sigma0) * self.eps


def draw_step(cfg: RunConfig, x: torch.Tensor,
              generator: Optional[torch.Generator]) -> StepDraws:
    """The random draws of one training step on batch `x`, in the order the step has always
    made them (q(z|k,x)'s noise, the prior's, then T(x)), so a seeded run is unchanged."""
    m, t = cfg.model, cfg.train
    B, dev = x.shape[0], x.device
    eps_z = torch.randn(B, m.K, m.num_samples, m.latent_dim, generator=generator, device=dev)
    eps_p = (torch.randn(B, m.num_samples, m.K, m.latent_dim, generator=generator, device=dev)
             if FAMILY_DEFS[cfg.family].samples_prior else None)
    x_t = (random_shift_rotate(x, t.augment_shift, t.augment_degrees, generator)
           if t.consistency_weight > 0 else None)
    return StepDraws(eps_z, eps_p, x_t)


def step_loss(model: GMLVM, decode: Callable[[torch.Tensor], torch.Tensor], family: str,
              model_hp: Any, train_hp: Any, extra_terms: tuple[str, ...], x: torch.Tensor,
              draws: StepDraws, prior_means: torch.Tensor, sigma0: Any,
              networks_cast: Callable[[], Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """One training step's loss, its named terms and q(k|x)'s logits: a function of the
    networks, the batch and the step's draws. model_hp: lambda_mmd, recon_weight and
    num_samples (a ModelConfig); train_hp: consistency_weight and balance_weight (a
    TrainConfig); in a stack of runs (stacked.StackedTrainer) the weights are 0-dim tensors.
    networks_cast: the context q(k|x) and the decoder run under (bf16 autocast or none)."""
    with record_function("encoders"):
        with networks_cast():
            q_k_logits = model.q_k(x).float()
        q_z_mean, q_z_logvar = model.q_z(x)  # fp32: the heads feed the sampling
        z_q = GMLVM.reparameterise(q_z_mean, q_z_logvar, draws.eps_z)
    with record_function("decoder"):
        with networks_cast():
            x_rec_logits = decode(z_q).float()  # (B, K, S, 1, 28, 28): every code
    loss, terms = FAMILY_DEFS[family].loss(StepOutputs(
        x, x_rec_logits, q_k_logits, q_z_mean, q_z_logvar, z_q,
        DrawnPrior(prior_means, sigma0, draws.eps_p)), model_hp)
    if extra_terms:
        terms = dict(terms)
        if "consistency" in extra_terms:
            with networks_cast():
                q_k_logits_t = model.q_k(draws.x_t).float()
            terms["consistency"] = consistency_kl(q_k_logits, q_k_logits_t)
            loss = loss + train_hp.consistency_weight * terms["consistency"]
        if "balance" in extra_terms:
            terms["balance"] = balance_kl(q_k_logits)
            loss = loss + train_hp.balance_weight * terms["balance"]
        terms["loss"] = loss
    return loss, terms, q_k_logits


class Trainer:
    """One GM-WAE or GM-VAE run: model, prior, optimiser, data, counters and history."""

    def __init__(self, cfg: RunConfig, splits: Splits, device: Optional[torch.device] = None):
        self.cfg = cfg
        self.device = device or resolve_device(cfg.train.device)
        if self.device.type == "cuda":
            use_tf32_for_convolutions_only()
        torch.manual_seed(cfg.train.seed)
        m = cfg.model
        self.prior = MixturePrior.build(m.K, m.latent_dim, m.prior_overlap, m.prior_seed).to(self.device)
        self.model = GMLVM(m).to(self.device)
        # Compiled separately so that the state_dict keeps the plain module's names.
        self._decode = torch.compile(self.model.decoder) if cfg.train.compile else self.model.decoder
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.train.lr,
                                          betas=(cfg.train.beta1, 0.999))
        self.splits = splits.to(self.device)
        n_train = len(self.splits.train_x)
        if n_train < cfg.train.batch_size:
            raise ConfigError(f"`train.batch_size` must not exceed the {n_train} training images, "
                             f"but got {cfg.train.batch_size}. Lower it.")
        self.steps_per_epoch = n_train // cfg.train.batch_size
        self.budget_steps = cfg.train.epochs * self.steps_per_epoch
        """Optimiser steps the run may take, which the linear schedule decays over: by
        default `train.epochs` epochs; a caller that stops the run by its own count of
        steps sets it to that count."""
        # The meta device (shapes only: tests check the step for device mixing and host
        # synchronisation without a GPU) has no random generator; its sampling needs none.
        self.generator = (None if self.device.type == "meta" else
                          torch.Generator(self.device).manual_seed(cfg.train.seed))
        self.step = 0
        self.epoch = 0
        self.pretrained = False
        self.train_seconds = 0.0
        self._segment_start: Optional[float] = None  # monotonic start of the running train_steps
        self.history: list[dict[str, float]] = []  # every `history_every` steps
        self._perm: Optional[torch.Tensor] = None
        self._pos = 0
        t = cfg.train
        self.extra_terms = tuple(name for name, weight in (
            ("consistency", t.consistency_weight), ("balance", t.balance_weight)) if weight > 0)
        """Loss terms the options add to the family's (their weights are > 0)."""
        self.term_names = (*FAMILY_DEFS[cfg.family].terms, *self.extra_terms)
        self.precision = resolve_precision(t.precision, self.device)
        """fp32 or bf16: what train.precision (auto included) runs as on this device."""
        if t.precision == "bf16" and self.device.type == "cpu" and not cpu_has_fast_bf16():
            warnings.warn(
                "train.precision=bf16 on a CPU where oneDNN has no bf16 kernels (it needs "
                "AVX-512 BF16 or AMX): PyTorch then runs the convolutions with its reference "
                "kernels, about 13x slower per step here. Use train.precision=fp32 on this "
                "machine.", RuntimeWarning, stacklevel=2)

    def _networks_cast(self):
        """bf16 autocast for the networks when they run in bf16, else nothing."""
        if self.precision == "bf16" and self.device.type != "meta":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ---------------------------------------------------------------- training

    def _next_batch(self) -> torch.Tensor:
        if self._perm is None or self._pos + self.cfg.train.batch_size > len(self._perm):
            self._perm = torch.randperm(len(self.splits.train_x), generator=self.generator,
                                        device=self.device)
            self._pos = 0
        idx = self._perm[self._pos: self._pos + self.cfg.train.batch_size]
        self._pos += self.cfg.train.batch_size
        return self.splits.train_x[idx]

    @property
    def budget_exhausted(self) -> bool:
        """True once training (pretraining included) has used `train.minutes`."""
        minutes = self.cfg.train.minutes
        return minutes is not None and self.train_seconds >= 60.0 * minutes

    def _seconds_so_far(self) -> float:
        """Training seconds used so far, the running `train_steps` call's included."""
        if self._segment_start is None:
            return self.train_seconds
        return self.train_seconds + time.monotonic() - self._segment_start

    def _out_of_time(self, start: float) -> bool:
        minutes = self.cfg.train.minutes
        return minutes is not None and self.train_seconds + time.monotonic() - start >= 60.0 * minutes

    def _draw(self, n: int) -> torch.Tensor:
        """`n` training images drawn at random (all of them when the split is smaller)."""
        n_train = len(self.splits.train_x)
        if n >= n_train:
            return self.splits.train_x
        idx = torch.randint(0, n_train, (n,), generator=self.generator, device=self.device)
        return self.splits.train_x[idx]

    def pretrain(self) -> float:
        """The warm start of q(k|x) when `train.warm_start_steps` > 0, then the authors'
        pretraining: `pretrain_steps` steps on `pretrain_batch` images fitting the q(z|k,x)
        nets to the prior's moments (objectives.moment_matching_loss). Returns the last
        moment loss."""
        if self.pretrained:
            return float("nan")
        t = self.cfg.train
        start, loss = time.monotonic(), torch.tensor(float("nan"))
        self.model.train()
        if t.warm_start_steps > 0:
            self._warm_start(start)
        opt = torch.optim.Adam(self.model.q_z.parameters(), lr=t.lr, betas=(t.beta1, 0.999))
        for _ in range(t.pretrain_steps):
            if self._out_of_time(start):
                break
            q_z_mean, q_z_logvar = self.model.q_z(self._draw(t.pretrain_batch))
            z_q = self.model.sample_z(q_z_mean, q_z_logvar, self.cfg.model.num_samples,
                                      self.generator)
            loss = moment_matching_loss(z_q, self.prior.means, self.prior.sigma0 ** 2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        self.train_seconds += time.monotonic() - start
        self.pretrained = True
        return float(loss.detach())

    def _warm_start(self, start: float) -> None:
        """Warm start of q(k|x), in three phases of `train.warm_start_steps` steps each:

        1. an autoencoder, c(x) = the mean of q(z|k=0,x), min ||x - sigmoid(g(c(x)))||^2;
        2. k-means with K clusters on the codes c(x) of up to 10,000 training images;
        3. q(k|x) fitted to that partition, min cross-entropy(q(k|x), cluster of x).

        The moment pretraining then puts every q(z|k,x) back on its prior mode.
        """
        from sklearn.cluster import KMeans

        t, K = self.cfg.train, self.cfg.model.K
        steps = t.warm_start_steps
        ae = torch.optim.Adam([*self.model.q_z.parameters(), *self.model.decoder.parameters()],
                              lr=t.lr, betas=(t.beta1, 0.999))
        for _ in range(steps):
            if self._out_of_time(start):
                return
            x = self._next_batch()
            code = self.model.q_z(x)[0][:, 0]  # (B, d)
            loss = ((torch.sigmoid(self.model.decoder(code)) - x) ** 2).flatten(1).sum(1).mean()
            ae.zero_grad(set_to_none=True)
            loss.backward()
            ae.step()
        x_fit = self.splits.train_x[:WARM_START_KMEANS_IMAGES]
        self.model.eval()
        with torch.no_grad():
            codes = torch.cat([self.model.q_z(x_fit[i: i + EVAL_BATCH])[0][:, 0]
                               for i in range(0, len(x_fit), EVAL_BATCH)])
        self.model.train()
        km = KMeans(K, n_init=3, random_state=t.seed).fit(codes.cpu().double().numpy())
        target = torch.from_numpy(km.labels_).long().to(self.device)
        fit = torch.optim.Adam(self.model.q_k.parameters(), lr=t.lr, betas=(t.beta1, 0.999))
        for _ in range(steps):
            if self._out_of_time(start):
                return
            idx = torch.randint(0, len(x_fit), (t.batch_size,), generator=self.generator,
                                device=self.device)
            loss = F.cross_entropy(self.model.q_k(x_fit[idx]), target[idx])
            fit.zero_grad(set_to_none=True)
            loss.backward()
            fit.step()

    def _loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        return step_loss(self.model, self._decode, self.cfg.family, self.cfg.model, self.cfg.train,
                         self.extra_terms, x, draw_step(self.cfg, x, self.generator),
                         self.prior.means, self.prior.sigma0, self._networks_cast)

    def optimizer_step(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One step's computation on a batch: loss, backward, optimiser update. Nothing in
        it reads a value back to the host, so it runs on the `meta` device (tests check it
        there at the paper's shapes for device mixing and host synchronisation)."""
        loss, terms, q_k_logits = self._loss(x)
        self.optimizer.zero_grad(set_to_none=True)
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            lr = self.cfg.train.lr * lr_factor(self.cfg.train, self.step, self.steps_per_epoch,
                                               self._seconds_so_far(), self.budget_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            if self.cfg.train.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
            self.optimizer.step()
        return terms, q_k_logits

    def train_steps(self, n: int,
                    on_step: Optional[Callable[[int], None]] = None) -> dict[str, float]:
        """Run up to `n` optimiser steps (fewer once the `train.minutes` budget is used).

        Returns the means of the loss terms and the collapse statistics over those steps,
        as `train/...` keys. The steps never wait for the device: statistics and history
        rows stay on it until the call ends, which reads them back once. Raises
        NonFiniteLossError, naming the first step recorded with a NaN or infinite term,
        when any term of the steps or of their history is not finite.
        """
        if not self.pretrained:
            self.pretrain()
        self.model.train()
        stats = _StepStats.on(self.cfg.model.K, self.device)
        done, start = 0, time.monotonic()
        self._segment_start = start
        try:
            while done < n and not self._out_of_time(start):
                self.train_step(self._next_batch(), stats)
                done += 1
                if on_step is not None:
                    on_step(self.step)
        finally:
            self._segment_start = None
            self.train_seconds += time.monotonic() - start
        return self.summarise_steps(stats, done)

    def summarise_steps(self, stats: "_StepStats", done: int) -> dict[str, float]:
        """The `train/...` means of `done` steps' accumulated statistics, after writing their
        history rows; raises NonFiniteLossError when any of them is not finite."""
        self._flush_history(stats)
        if done == 0:
            return {}
        out = {f"train/{k}": float(v) / done for k, v in stats.sums.items()}
        out["train/active_components"] = float(active_count(stats.counts))
        out["train/bf16_networks"] = 1.0 if self.precision == "bf16" else 0.0  # what auto chose
        out["train/lr"] = float(self.optimizer.param_groups[0]["lr"])  # the last step's rate
        # Aggregate q(k) over the steps' images: (1, K) mean responsibilities.
        out["train/assignment_entropy"] = float(aggregate_entropy(
            (stats.q_k_sum / stats.counts.sum()).unsqueeze(0)))
        self._check_finite(out)
        return out

    def train_step(self, x: torch.Tensor, stats: "_StepStats") -> None:
        """One optimiser step and its bookkeeping, all on the device: `stats` gains the
        step's terms, argmax counts and q(k|x) sums, and every `history_every` steps a
        history row (as a tensor). Nothing here reads a value back to the host, so the
        step runs ahead of the device (the tests run it on the meta device)."""
        terms, q_k_logits = self.optimizer_step(x)
        self.step += 1
        with torch.no_grad():
            q_k = torch.softmax(q_k_logits.detach(), -1)
            batch_counts = torch.zeros_like(stats.counts).index_add_(
                0, q_k.argmax(1), torch.ones(len(q_k), device=q_k.device))
            stats.counts += batch_counts
            stats.q_k_sum += q_k.sum(0)
            for name, value in terms.items():
                stats.sums[name] = stats.sums.get(name, 0.0) + value.detach()
            if self.step % self.cfg.train.history_every == 0 or self.step == 1:
                stats.rows.append((self.step, time.time(), torch.stack(
                    [terms[k].detach().float() for k in self.term_names]
                    + [aggregate_entropy(q_k), active_count(batch_counts).float()])))

    def _flush_history(self, stats: "_StepStats") -> None:
        """The pending history rows, read back at once (wall clock: when the step ran)."""
        if not stats.rows:
            return
        values = torch.stack([row for _, _, row in stats.rows]).cpu().tolist()
        names = [*self.term_names, "assignment_entropy", "active_components"]
        for (step, wall, _), row in zip(stats.rows, values):
            record = {"step": float(step), **dict(zip(names, row)), "time": wall}
            self.history.append(record)
        stats.rows.clear()
        for record in self.history[-len(values):]:
            self._check_finite(record, step=int(record["step"]))

    def _check_finite(self, values: dict[str, float], step: Optional[int] = None) -> None:
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if bad:
            raise NonFiniteLossError(
                f"{self.cfg.family} loss is not finite at step {step or self.step}: {bad}. "
                f"Lower train.lr (now {self.cfg.train.lr}) or model.lambda_mmd, or set train.grad_clip.")

    def train_epoch(self, on_step: Optional[Callable[[int], None]] = None) -> dict[str, float]:
        """One pass over the training split (steps_per_epoch steps, fewer if the budget ends)."""
        out = self.train_steps(self.steps_per_epoch, on_step)
        self.epoch += 1
        return out

    # -------------------------------------------------------------- evaluation

    def _eval_subset(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.splits.split(split)
        n = self.cfg.data.eval_size
        if split == "val" and n is not None and n < len(x):
            idx = torch.from_numpy(np.random.default_rng(0).permutation(len(x))[:n]).to(self.device)
            x, y = x[idx], y[idx]
        return x, y

    @torch.no_grad()
    def evaluate(self, split: str = "val") -> EvalResult:
        """All DESIGN.md metrics on one split, as `{split}/...` keys. Deterministic. On
        images without labels (Splits.labelled is False) the metrics that read labels
        (metrics.LABEL_METRICS) are left out, not estimated."""
        self.model.eval()
        x_all, y_all = self._eval_subset(split)
        q_ks, sq_err, kl_d, kl_c = [], 0.0, 0.0, 0.0
        var0 = self.prior.sigma0 ** 2
        for i in range(0, len(x_all), EVAL_BATCH):
            x = x_all[i: i + EVAL_BATCH]
            q_k_logits, q_z_mean, q_z_logvar = self.model.encode(x)
            q_k = torch.softmax(q_k_logits, -1)
            x_rec = torch.sigmoid(self.model.decoder(q_z_mean))  # (B, K, 1, 28, 28) at z = mean
            err = ((x.unsqueeze(1) - x_rec) ** 2).flatten(2).mean(-1)  # (B, K) per-pixel MSE
            sq_err += float((q_k * err).sum())
            kl_d += float(kl_categorical_uniform(q_k_logits).sum())
            kl_c += float((q_k * kl_diag_gaussians(q_z_mean, q_z_logvar, self.prior.means, var0)).sum())
            q_ks.append(q_k)
        n = len(x_all)
        q_k_all = torch.cat(q_ks).cpu().double().numpy()
        labels = y_all.cpu().numpy()
        if self.splits.labelled:
            # many-to-one accuracy: the map is fitted on validation, also when scoring test
            k_to_label = None if split == "val" else self._majority_labels_on_val()
            metrics = clustering_metrics(labels, q_k_all, k_to_label)
            matrix = label_by_k(labels, q_k_all,
                                max(int(labels.max()) + 1, self.splits.num_classes))
        else:
            metrics = collapse_metrics(q_k_all)
            matrix = np.zeros((0, q_k_all.shape[1]))
        metrics.update({"mmd": self._held_out_mmd(x_all), "recon_mse": sq_err / n,
                        "kl_discrete": kl_d / n, "kl_continuous": kl_c / n,
                        **self._label_free_criteria(x_all)})
        return EvalResult({f"{split}/{k}": float(v) for k, v in metrics.items()}, q_k_all,
                          labels, matrix)

    @torch.no_grad()
    def evaluate_paper(self) -> dict[str, float]:
        """The paper's protocol (data.protocol=paper): the greedy map of each k to a label
        (metrics.greedy_labels) fitted on the training images, scored on the held-out test
        split. Keys `paper/...`: cluster_acc_greedy (the paper's 76%), cluster_acc
        (Hungarian on the held-out images), nmi, active_components, n_fit, n_held."""
        if self.cfg.data.protocol != "paper":
            raise ConfigError("`evaluate_paper` needs data.protocol=paper (the pooled split with "
                              f"the last 1,000 held out), but got {self.cfg.data.protocol!r}. "
                              "Set data.protocol=paper, or use `gmwae evaluate --protocol paper`.")
        self.model.eval()

        def q_k_of(x: torch.Tensor) -> np.ndarray:
            return torch.cat([torch.softmax(self.model.q_k(x[i: i + EVAL_BATCH]), -1)
                              for i in range(0, len(x), EVAL_BATCH)]).cpu().double().numpy()

        fit_x, fit_y = self.splits.split("train")
        held_x, held_y = self.splits.split("test")
        q_fit, q_held = q_k_of(fit_x), q_k_of(held_x)
        k_to_label = greedy_labels(fit_y.cpu().numpy(), q_fit)
        held = clustering_metrics(held_y.cpu().numpy(), q_held)
        return {"paper/cluster_acc_greedy": cluster_acc_greedy(held_y.cpu().numpy(), q_held,
                                                               k_to_label),
                **{f"paper/{k}": held[k] for k in ("cluster_acc", "nmi", "active_components")},
                "paper/n_fit": float(len(fit_x)), "paper/n_held": float(len(held_x))}

    @torch.no_grad()
    def _majority_labels_on_val(self) -> np.ndarray:
        """Each k's majority label among the validation images whose argmax q(k|x) is k."""
        x_all, y_all = self._eval_subset("val")
        clusters = torch.cat([self.model.encode(x_all[i: i + EVAL_BATCH])[0].argmax(-1)
                              for i in range(0, len(x_all), EVAL_BATCH)])
        return majority_labels(y_all.cpu().numpy(), clusters.cpu().numpy(), self.cfg.model.K)

    def _label_free_criteria(self, x_all: torch.Tensor) -> dict[str, float]:
        """`augment_ari`, `augment_mi` and `silhouette` on a fixed subset, with a fixed seed:
        q(k|x) of the images against that of one fixed random shift and rotation of each
        (AUGMENT_EVAL_SHIFT, AUGMENT_EVAL_DEGREES), and the silhouette of the codes (the
        mean of q(z|k,x) at each image's argmax k) grouped by that argmax."""
        gen = torch.Generator(self.device).manual_seed(MMD_EVAL_SEED)
        x = x_all[:CRITERIA_EVAL_POINTS]
        q_ks, q_ks_t, codes = [], [], []
        for i in range(0, len(x), EVAL_BATCH):
            batch = x[i: i + EVAL_BATCH]
            q_k_logits, q_z_mean, _ = self.model.encode(batch)
            q_ks.append(torch.softmax(q_k_logits.float(), -1))
            codes.append(q_z_mean[torch.arange(len(batch), device=self.device),
                                  q_k_logits.argmax(-1)])
            moved = random_shift_rotate(batch, AUGMENT_EVAL_SHIFT, AUGMENT_EVAL_DEGREES, gen)
            q_ks_t.append(torch.softmax(self.model.q_k(moved).float(), -1))
        q_k = torch.cat(q_ks).double().cpu().numpy()
        q_k_t = torch.cat(q_ks_t).double().cpu().numpy()
        clusters = q_k.argmax(1)
        return {"augment_ari": augment_ari(clusters, q_k_t.argmax(1)),
                "augment_mi": augment_mi(q_k, q_k_t),
                "silhouette": latent_silhouette(torch.cat(codes).float().cpu().numpy(),
                                                clusters)}

    def _held_out_mmd(self, x_all: torch.Tensor) -> float:
        """MMD(q(z) || p(z)) with one z per point: k ~ q(k|x), z ~ q(z|k,x), against as many
        prior draws, on a fixed subset with a fixed seed (same estimator as training, S=1)."""
        gen = torch.Generator(self.device).manual_seed(MMD_EVAL_SEED)
        x = x_all[:MMD_EVAL_POINTS]
        q_k_logits, q_z_mean, q_z_logvar = self.model.encode(x)
        k = torch.multinomial(torch.softmax(q_k_logits, -1), 1, generator=gen).squeeze(1)
        rows = torch.arange(len(x), device=self.device)
        mean, logvar = q_z_mean[rows, k], q_z_logvar[rows, k]  # (N, d)
        eps = torch.randn(mean.shape, generator=gen, device=self.device)
        z_q = mean + torch.exp(0.5 * logvar) * eps
        k_p = torch.randint(0, self.cfg.model.K, (len(x),), generator=gen, device=self.device)
        z_p = self.prior.means[k_p] + self.prior.sigma0 * torch.randn(
            mean.shape, generator=gen, device=self.device)
        ones = torch.ones(len(x), 1, device=self.device)
        return float(weighted_mmd(z_q.unsqueeze(1), ones, z_p.unsqueeze(1), ones))

    # ------------------------------------------------------------------- state

    def state_dict(self) -> dict:
        """Everything needed to continue this run exactly: weights, optimiser, counters, RNG.

        Device-free: every tensor is on the CPU, so a state saved on a GPU node loads on a
        CPU-only machine (`torch.load(weights_only=True)` without map_location) and the
        reverse. The generator's state is tagged with its device type (a CUDA Philox state
        and a CPU Mersenne-Twister state are not interchangeable; see load_state_dict).
        """
        return {
            "model": _to_cpu(self.model.state_dict()),
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "counters": torch.tensor([self.step, self.epoch, int(self.pretrained), self._pos]),
            "train_seconds": torch.tensor(self.train_seconds, dtype=torch.float64),
            "generator": self.generator.get_state().cpu(),
            "generator_device": torch.tensor(_DEVICE_CODES.get(self.device.type, -1)),
            "perm": (self._perm.cpu() if self._perm is not None
                     else torch.empty(0, dtype=torch.long)),
            "history": torch.tensor([[r.get(k, float("nan")) for k in self._history_keys()]
                                     for r in self.history], dtype=torch.float64),
        }

    def _history_keys(self) -> list[str]:
        # "time" last: a checkpoint written before it existed loads without it
        return ["step", *self.term_names, "assignment_entropy", "active_components", "time"]

    def _restore_generator(self, saved: torch.Tensor, device_code: Optional[torch.Tensor]) -> None:
        """The saved random stream when it comes from the same device type; otherwise (a
        GPU trial resumed on a CPU node, or the reverse) a new stream seeded from the saved
        state, so that a resumed run stays deterministic for a given checkpoint."""
        saved_type = None if device_code is None else int(device_code)
        if saved_type is None or saved_type == _DEVICE_CODES.get(self.device.type, -1):
            try:
                self.generator.set_state(saved.cpu())
                return
            except RuntimeError:  # an old checkpoint (no device tag) from another device type
                pass
        digest = hashlib.sha256(saved.cpu().numpy().tobytes()).digest()
        self.generator.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.epoch, pretrained, self._pos = (int(v) for v in state["counters"])
        self.pretrained = bool(pretrained)
        self.train_seconds = float(state["train_seconds"])
        self._restore_generator(state["generator"], state.get("generator_device"))
        perm = state["perm"]
        self._perm = perm.to(self.device) if perm.numel() else None
        keys = self._history_keys()
        self.history = [dict(zip(keys, row.tolist())) for row in state["history"]]

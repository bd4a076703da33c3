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

import hashlib
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.profiler import record_function

from .config import ConfigError, RunConfig
from .data import Splits
from .metrics import (active_from_counts, assignment_entropy, clustering_metrics, label_by_k,
                      majority_labels)
from .networks import GMLVM
from .families import FAMILY_DEFS, StepOutputs
from .objectives import (kl_categorical_uniform, kl_diag_gaussians, moment_matching_loss,
                         weighted_mmd)
from .priors import MixturePrior

__all__ = ["Trainer", "EvalResult", "NonFiniteLossError", "resolve_device"]

EVAL_BATCH = 500
MMD_EVAL_POINTS = 1000  # held-out points in the fixed `mmd` estimator
MMD_EVAL_SEED = 12345


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
    labels: np.ndarray  # (N,)
    label_by_k: np.ndarray  # (n_labels, K) E[q(k|x) | label]


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


class Trainer:
    """One GM-WAE or GM-VAE run: model, prior, optimiser, data, counters and history."""

    def __init__(self, cfg: RunConfig, splits: Splits, device: Optional[torch.device] = None):
        self.cfg = cfg
        self.device = device or resolve_device(cfg.train.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
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
        # The meta device (shapes only: tests check the step for device mixing and host
        # synchronisation without a GPU) has no random generator; its sampling needs none.
        self.generator = (None if self.device.type == "meta" else
                          torch.Generator(self.device).manual_seed(cfg.train.seed))
        self.step = 0
        self.epoch = 0
        self.pretrained = False
        self.train_seconds = 0.0
        self.history: list[dict[str, float]] = []  # every `history_every` steps
        self._perm: Optional[torch.Tensor] = None
        self._pos = 0

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

    def _out_of_time(self, start: float) -> bool:
        minutes = self.cfg.train.minutes
        return minutes is not None and self.train_seconds + time.monotonic() - start >= 60.0 * minutes

    def pretrain(self) -> float:
        """Fit the q(z|k,x) nets to the prior's per-component moments; returns the last loss."""
        if self.pretrained or self.cfg.train.pretrain_steps == 0:
            self.pretrained = True
            return float("nan")
        self.model.train()
        opt = torch.optim.Adam(self.model.q_z.parameters(), lr=self.cfg.train.lr,
                               betas=(self.cfg.train.beta1, 0.999))
        S = self.cfg.model.num_samples
        start, loss = time.monotonic(), torch.tensor(float("nan"))
        for _ in range(self.cfg.train.pretrain_steps):
            q_z_mean, q_z_logvar = self.model.q_z(self._next_batch())
            z_q = self.model.sample_z(q_z_mean, q_z_logvar, S, self.generator)
            loss = moment_matching_loss(z_q, self.prior.means, self.prior.sigma0 ** 2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if self._out_of_time(start):
                break
        self.train_seconds += time.monotonic() - start
        self.pretrained = True
        return float(loss.detach())

    def _loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        m = self.cfg.model
        with record_function("encoders"):
            q_k_logits, q_z_mean, q_z_logvar = self.model.encode(x)
            z_q = self.model.sample_z(q_z_mean, q_z_logvar, m.num_samples, self.generator)
        with record_function("decoder"):
            x_rec_logits = self._decode(z_q)  # (B, K, S, 1, 28, 28): all codes, one pass
        loss, terms = FAMILY_DEFS[self.cfg.family].loss(StepOutputs(
            x, x_rec_logits, q_k_logits, q_z_mean, q_z_logvar, z_q, self.prior, self.generator), m)
        return loss, terms, q_k_logits

    def optimizer_step(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One step's computation on a batch: loss, backward, optimiser update. Nothing in
        it reads a value back to the host, so it runs on the `meta` device (tests check it
        there at the paper's shapes for device mixing and host synchronisation)."""
        loss, terms, q_k_logits = self._loss(x)
        self.optimizer.zero_grad(set_to_none=True)
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            if self.step < self.cfg.train.warmup_steps:
                for group in self.optimizer.param_groups:
                    group["lr"] = self.cfg.train.lr * (self.step + 1) / self.cfg.train.warmup_steps
            if self.cfg.train.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
            self.optimizer.step()
        return terms, q_k_logits

    def train_steps(self, n: int,
                    on_step: Optional[Callable[[int], None]] = None) -> dict[str, float]:
        """Run up to `n` optimiser steps (fewer once the `train.minutes` budget is used).

        Returns the means of the loss terms and the collapse statistics over those steps,
        as `train/...` keys. Raises NonFiniteLossError when the loss is NaN or infinite.
        """
        if not self.pretrained:
            self.pretrain()
        self.model.train()
        K = self.cfg.model.K
        every = self.cfg.train.history_every
        sums: dict[str, torch.Tensor] = {}
        counts = torch.zeros(K, device=self.device)
        q_k_sum = torch.zeros(K, device=self.device)
        done, start = 0, time.monotonic()
        while done < n and not self._out_of_time(start):
            terms, q_k_logits = self.optimizer_step(self._next_batch())
            self.step += 1
            done += 1
            with torch.no_grad():
                q_k = torch.softmax(q_k_logits.detach(), -1)
                batch_counts = torch.bincount(q_k.argmax(1), minlength=K).float()
                counts += batch_counts
                q_k_sum += q_k.sum(0)
                for name, value in terms.items():
                    sums[name] = sums.get(name, 0.0) + value.detach()
            if self.step % every == 0 or self.step == 1:
                self._record(terms, q_k, batch_counts)
            if on_step is not None:
                on_step(self.step)
        self.train_seconds += time.monotonic() - start
        if done == 0:
            return {}
        out = {f"train/{k}": float(v) / done for k, v in sums.items()}
        out["train/active_components"] = float(active_from_counts(counts))
        # Aggregate q(k) over the steps' images: (1, K) mean responsibilities.
        out["train/assignment_entropy"] = assignment_entropy(q_k_sum.unsqueeze(0) / counts.sum())
        self._check_finite(out)
        return out

    def _record(self, terms: dict[str, torch.Tensor], q_k: torch.Tensor,
                batch_counts: torch.Tensor) -> None:
        row = {"step": float(self.step)}
        row.update({k: float(v.detach()) for k, v in terms.items()})
        row["assignment_entropy"] = assignment_entropy(q_k)
        row["active_components"] = float(active_from_counts(batch_counts))
        row["time"] = time.time()  # wall clock (s): when the step ran, for time axes
        self.history.append(row)
        self._check_finite(row)

    def _check_finite(self, values: dict[str, float]) -> None:
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if bad:
            raise NonFiniteLossError(
                f"{self.cfg.family} loss is not finite at step {self.step}: {bad}. "
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
        """All DESIGN.md metrics on one split, as `{split}/...` keys. Deterministic."""
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
        # many-to-one accuracy: the map is fitted on validation, also when scoring test
        k_to_label = None if split == "val" else self._majority_labels_on_val()
        metrics = clustering_metrics(labels, q_k_all, k_to_label)
        metrics.update({"mmd": self._held_out_mmd(x_all), "recon_mse": sq_err / n,
                        "kl_discrete": kl_d / n, "kl_continuous": kl_c / n})
        matrix = label_by_k(labels, q_k_all, max(int(labels.max()) + 1, self.splits.num_classes))
        return EvalResult({f"{split}/{k}": float(v) for k, v in metrics.items()}, q_k_all,
                          labels, matrix)

    @torch.no_grad()
    def _majority_labels_on_val(self) -> np.ndarray:
        """Each k's majority label among the validation images whose argmax q(k|x) is k."""
        x_all, y_all = self._eval_subset("val")
        clusters = torch.cat([self.model.encode(x_all[i: i + EVAL_BATCH])[0].argmax(-1)
                              for i in range(0, len(x_all), EVAL_BATCH)])
        return majority_labels(y_all.cpu().numpy(), clusters.cpu().numpy(), self.cfg.model.K)

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
        terms = list(FAMILY_DEFS[self.cfg.family].terms)
        # "time" last: a checkpoint written before it existed loads without it
        return ["step", *terms, "assignment_entropy", "active_components", "time"]

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

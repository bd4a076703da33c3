"""The networks of Section 3: q(k|x), the K nets of q(z|k,x), and the decoder g(z).

GM-WAE and GM-VAE share all of them; only the objective differs (objectives.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

__all__ = ["QKEncoder", "QZEncoder", "Decoder", "GMLVM", "ToOneChannel", "PAPER_INIT_STD",
           "init_paper_"]

IMAGE_SHAPE = (1, 28, 28)
IMAGE_PIXELS = 28 * 28


class QKEncoder(nn.Module):
    """q(k|x): 2-layer DCGAN-style conv net (16 then 32 filters, 5x5, stride 2) -> K logits."""

    def __init__(self, K: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 5, stride=2, padding=2, bias=False),  # 28 -> 14
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.Conv2d(16, 32, 5, stride=2, padding=2, bias=False),  # 14 -> 7
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, K),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, K) logits of q(k|x)


class QZEncoder(nn.Module):
    """q(z|k,x) = N(mu_k(x), diag(sigma_k(x)^2)) for all k at once.

    Each k has its own 784 -> hidden (BN, ReLU) -> (mean, log-variance) net. The K first
    layers are one (784, K*hidden) matmul; BatchNorm1d over K*hidden features is the K
    nets' own BN; the K heads are one batched einsum.
    """

    def __init__(self, K: int, latent_dim: int, hidden: int):
        super().__init__()
        self.K, self.d, self.h = K, latent_dim, hidden
        self.hidden = nn.Linear(IMAGE_PIXELS, K * hidden, bias=False)
        self.bn = nn.BatchNorm1d(K * hidden)
        self.head_w = nn.Parameter(torch.empty(K, hidden, 2 * latent_dim))
        self.head_b = nn.Parameter(torch.zeros(K, 2 * latent_dim))
        # Each head is a Linear(hidden, 2d): PyTorch's default bound 1/sqrt(fan_in), with
        # fan_in = hidden (not K * hidden, which the stacked (K*hidden, 2d) view would give).
        nn.init.uniform_(self.head_w, -hidden ** -0.5, hidden ** -0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.bn(self.hidden(x.flatten(1))))  # (B, K*h)
        h = h.view(-1, self.K, self.h)  # (B, K, h)
        out = torch.einsum("bkh,kho->bko", h, self.head_w) + self.head_b  # (B, K, 2d)
        q_z_mean, q_z_logvar = out.split(self.d, dim=-1)  # (B, K, d) each
        return q_z_mean, q_z_logvar


class _ToOneChannelFn(torch.autograd.Function):
    """Stride-1 transposed convolution to one channel, forward as depthwise conv + channel sum.

    oneDNN vectorises a convolution over its output channels, so one output channel runs
    at ~15% of the matmul peak (benchmarks/throughput.py, per-layer table). The same sum
    taken as a depthwise convolution (vectorised over the input channels) and a channel
    sum is ~4x faster forward on CPU. The backward is the transposed convolution's own.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, padding):
        ctx.param_dtype = weight.dtype
        if torch.is_autocast_enabled(x.device.type):  # run and save in autocast's dtype, so
            dtype = torch.get_autocast_dtype(x.device.type)  # the backward's dtypes agree
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        k = weight.shape[-1]
        # conv_transpose(x, w, pad=p) == conv(x, flip(w), pad=k-1-p) at stride 1; with one
        # output channel the input channels are summed, so a depthwise conv then a sum.
        y = F.conv2d(x, weight.flip(-2, -1), padding=k - 1 - padding, groups=x.shape[1])
        y = y.sum(1, keepdim=True)
        return y if bias is None else y + bias.view(1, -1, 1, 1)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        p = ctx.padding
        grad_y = grad_y.to(x.dtype)
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad_y.contiguous(memory_format=torch.channels_last), x, weight, None, [1, 1],
            [p, p], [1, 1], True, [0, 0], 1, [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                                             False])
        if grad_w is not None:
            grad_w = grad_w.to(ctx.param_dtype)
        grad_b = grad_y.sum((0, 2, 3)).to(ctx.param_dtype) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


class ToOneChannel(nn.ConvTranspose2d):
    """The decoder's last layer: ConvTranspose2d(C, 1, k, stride 1, padding p), same weights.

    On CPU the forward runs as `_ToOneChannelFn` (a depthwise convolution and a sum, 4x
    faster there); elsewhere, and under torch.func transforms (a stack of runs, whose
    batching rule makes the stack's transposed convolutions one grouped convolution), it is
    the plain transposed convolution.
    """

    def __init__(self, in_channels: int, kernel_size: int, padding: int):
        super().__init__(in_channels, 1, kernel_size, stride=1, padding=padding)
        if 2 * padding > kernel_size - 1:
            raise ValueError(f"ToOneChannel needs padding <= (kernel_size - 1) / 2, got "
                             f"padding={padding}, kernel_size={kernel_size}.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or torch._C._are_functorch_transforms_active():
            return super().forward(x)
        return _ToOneChannelFn.apply(x, self.weight, self.bias, self.padding[0])


class Decoder(nn.Module):
    """g(z): linear d -> 7*7*w, deconv to 14x14 (w/2), to 28x28 (w/4), stride-1 deconv to 1.

    Returns logits; GM-WAE applies a sigmoid (deterministic g), GM-VAE reads them as
    Bernoulli logits.
    """

    def __init__(self, latent_dim: int, width: int):
        super().__init__()
        self.width = width
        self.fc = nn.Sequential(nn.Linear(latent_dim, 7 * 7 * width, bias=False),
                                nn.BatchNorm1d(7 * 7 * width), nn.ReLU(inplace=True))
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(width, width // 2, 5, stride=2, padding=2, output_padding=1,
                               bias=False),  # 7 -> 14
            nn.BatchNorm2d(width // 2),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(width // 2, width // 4, 5, stride=2, padding=2, output_padding=1,
                               bias=False),  # 14 -> 28
            nn.BatchNorm2d(width // 4),
            nn.ReLU(inplace=True),
            ToOneChannel(width // 4, 5, padding=2),  # 28 -> 28, a ConvTranspose2d
        )
        # channels_last: measured 2.3x faster for these deconvolutions on CPU (oneDNN)
        # and the layout cuDNN prefers; see benchmarks/throughput.py.
        self.deconv.to(memory_format=torch.channels_last)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lead = z.shape[:-1]
        h = self.fc(z.reshape(-1, z.shape[-1])).view(-1, self.width, 7, 7)  # (N, w, 7, 7)
        if not torch._C._are_functorch_transforms_active():  # vmap has no layouts
            h = h.contiguous(memory_format=torch.channels_last)
        return self.deconv(h).reshape(*lead, *IMAGE_SHAPE)  # (..., 1, 28, 28) logits


PAPER_INIT_STD = 0.01
"""The authors' initial weights: N(0, 0.01^2) (ops.py, `init_std`), biases 0."""


@torch.no_grad()
def init_paper_(model: nn.Module) -> nn.Module:
    """The authors' initialisation, in place: every convolution, transposed convolution,
    linear layer and q(z|k,x) head draws its weights from N(0, PAPER_INIT_STD^2) and
    starts with zero biases; BatchNorm starts at scale 1, shift 0."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            module.weight.normal_(0.0, PAPER_INIT_STD)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, QZEncoder):
            module.head_w.normal_(0.0, PAPER_INIT_STD)
            module.head_b.zero_()
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_parameters()
    return model


class GMLVM(nn.Module):
    """The Gaussian-mixture latent-variable model: encoders q(k|x), q(z|k,x) and decoder g."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.q_k = QKEncoder(cfg.K)
        self.q_z = QZEncoder(cfg.K, cfg.latent_dim, cfg.encoder_hidden)
        self.decoder = Decoder(cfg.latent_dim, cfg.decoder_width)
        if cfg.init == "paper":
            init_paper_(self)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, 1, 28, 28) -> q_k_logits (B, K), q_z_mean (B, K, d), q_z_logvar (B, K, d)."""
        q_z_mean, q_z_logvar = self.q_z(x)
        return self.q_k(x), q_z_mean, q_z_logvar

    @staticmethod
    def sample_z(q_z_mean: torch.Tensor, q_z_logvar: torch.Tensor, S: int,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised z ~ q(z|k,x), S per (x, k): (B, K, d) -> (B, K, S, d)."""
        B, K, d = q_z_mean.shape
        eps = torch.randn(B, K, S, d, generator=generator, device=q_z_mean.device,
                          dtype=q_z_mean.dtype)
        return GMLVM.reparameterise(q_z_mean, q_z_logvar, eps)

    @staticmethod
    def reparameterise(q_z_mean: torch.Tensor, q_z_logvar: torch.Tensor,
                       eps: torch.Tensor) -> torch.Tensor:
        """z = mean + sigma * eps for S noise draws per (x, k): (B, K, d), (B, K, S, d) -> (B, K, S, d)."""
        return q_z_mean.unsqueeze(2) + torch.exp(0.5 * q_z_logvar).unsqueeze(2) * eps

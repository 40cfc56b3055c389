"""The VAE in the seed's decomposition: Encoder, Decoder, Prior, VAE.

Images enter every network as int64 grey levels x (B, D); the encoder scales them to [0, 1] itself,
so exported graphs take the same integers the data holds. All log-densities are in nats.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from training.config import TrainConfig

LOG_2PI = math.log(2.0 * math.pi)


def mlp(sizes: list[int], dropout: float) -> nn.Sequential:
    """Linear layers with LeakyReLU (and dropout) between them, none after the last."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.LeakyReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def diag_gaussian_log_prob(z: torch.Tensor, mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """log N(z | mu, diag(exp(log_var))), summed over the last axis."""
    return -0.5 * (LOG_2PI + log_var + (z - mu) ** 2 * torch.exp(-log_var)).sum(-1)


def mixture_log_prob(
    z: torch.Tensor, log_weights: torch.Tensor, means: torch.Tensor, log_vars: torch.Tensor
) -> torch.Tensor:
    """log sum_c w_c N(z | m_c, diag(exp(v_c))) for z (..., L), weights (C,), means/log_vars (C, L)."""
    comp = diag_gaussian_log_prob(z.unsqueeze(-2), means, log_vars)  # (..., C)
    return torch.logsumexp(comp + log_weights, dim=-1)


class Encoder(nn.Module):
    """q(z|x) = N(mu(x), diag(exp(log_var(x))))."""

    def __init__(self, cfg: TrainConfig, dim: int, levels: int):
        super().__init__()
        # "unit" maps grey levels onto [0, 1]; "raw" feeds the level numbers as the seed text does.
        self.max_input = 1.0 if cfg.input_scale == "unit" else float(levels - 1)
        self.levels = levels
        self.net = mlp([dim] + [cfg.hidden] * cfg.depth + [2 * cfg.latent_dim], cfg.dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.net(self.scale(x))
        mu, log_var = h.chunk(2, dim=-1)  # (B, L), (B, L)
        return mu, log_var

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32) * (self.max_input / (self.levels - 1))

    def encode_scaled(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode inputs already in [0, 1] (the VampPrior's pseudo-inputs)."""
        return self.net(u * self.max_input).chunk(2, dim=-1)


class Decoder(nn.Module):
    """p(x|z): a network from z to per-pixel distribution parameters. Subclasses fix the family."""

    out_per_pixel: int

    def __init__(self, cfg: TrainConfig, dim: int, levels: int):
        super().__init__()
        self.dim, self.levels = dim, levels
        self.net = mlp([cfg.latent_dim] + [cfg.hidden] * cfg.depth + [dim * self.out_per_pixel], cfg.dropout)

    def log_prob(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x|z) summed over pixels; x (B, D) int64, z (..., B, L) -> (..., B)."""
        raise NotImplementedError

    def probs(self, z: torch.Tensor) -> torch.Tensor:
        """Per-pixel probabilities of every grey level: z (..., L) -> (..., D, levels)."""
        raise NotImplementedError


class CategoricalDecoder(Decoder):
    """Each pixel a categorical over the grey levels."""

    def __init__(self, cfg: TrainConfig, dim: int, levels: int):
        self.out_per_pixel = levels
        super().__init__(cfg, dim, levels)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).unflatten(-1, (self.dim, self.levels))  # (..., D, levels)

    def log_prob(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(self.logits(z), dim=-1)  # (..., B, D, levels)
        # A broadcast mask rather than gather: gather needs x expanded to (..., B, D), a shape the
        # ONNX trace would freeze, and the mask lets K stay a dynamic axis.
        hit = x.unsqueeze(-1) == torch.arange(self.levels, device=x.device)  # (B, D, levels)
        return torch.where(hit, log_p, torch.zeros((), dtype=log_p.dtype)).sum((-2, -1))

    def probs(self, z: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.logits(z), dim=-1)


class BernoulliDecoder(Decoder):
    """Each pixel a Bernoulli (binary images, levels == 2)."""

    out_per_pixel = 1

    def log_prob(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        logits = self.net(z)  # (..., B, D)
        # log sigmoid(l) for x=1 and log sigmoid(-l) for x=0, i.e. x l - softplus(l), broadcast over K
        return (x.to(logits.dtype) * logits - F.softplus(logits)).sum(-1)

    def probs(self, z: torch.Tensor) -> torch.Tensor:
        p1 = torch.sigmoid(self.net(z))
        return torch.stack([1.0 - p1, p1], dim=-1)


class Prior(nn.Module):
    """p(z). Every prior here is a diagonal Gaussian mixture, which is what gets exported."""

    def mixture(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log_weights (C,), means (C, L), log_vars (C, L))."""
        raise NotImplementedError

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return mixture_log_prob(z, *self.mixture())

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        log_w, means, log_vars = self.mixture()
        comp = torch.multinomial(log_w.exp(), n, replacement=True, generator=generator)
        eps = torch.randn(n, means.shape[1], generator=generator)
        return means[comp] + torch.exp(0.5 * log_vars[comp]) * eps


class StandardGaussianPrior(Prior):
    def __init__(self, latent_dim: int):
        super().__init__()
        self.register_buffer("means", torch.zeros(1, latent_dim))

    def mixture(self):
        return torch.zeros(1), self.means, torch.zeros_like(self.means)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return -0.5 * (LOG_2PI + z**2).sum(-1)


class MixtureOfGaussiansPrior(Prior):
    """A learnable mixture of C diagonal Gaussians."""

    def __init__(self, latent_dim: int, components: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(components))
        self.means = nn.Parameter(torch.randn(components, latent_dim))
        self.log_vars = nn.Parameter(torch.zeros(components, latent_dim))

    def mixture(self):
        return F.log_softmax(self.logits, dim=0), self.means, self.log_vars


class VampPrior(Prior):
    """p(z) = 1/C sum_c q(z | u_c) with learnable pseudo-inputs u_c (Tomczak & Welling, 2018)."""

    def __init__(self, encoder: Encoder, dim: int, components: int):
        super().__init__()
        self.encoder = [encoder]  # a list, so the encoder's parameters are not registered twice
        self.pseudo = nn.Parameter(torch.rand(components, dim) * 0.1 + 0.45)  # in [0, 1], clamped on use

    def mixture(self):
        u = self.pseudo.clamp(0.0, 1.0)
        mu, log_var = self.encoder[0].encode_scaled(u)
        c = u.shape[0]
        return torch.full((c,), -math.log(c), device=u.device), mu, log_var


class FixedMixturePrior(Prior):
    """A frozen Gaussian mixture: what every prior becomes at export (and in the manifest)."""

    def __init__(self, log_weights: torch.Tensor, means: torch.Tensor, log_vars: torch.Tensor):
        super().__init__()
        self.register_buffer("log_weights", log_weights.detach().clone())
        self.register_buffer("means", means.detach().clone())
        self.register_buffer("log_vars", log_vars.detach().clone())

    def mixture(self):
        return self.log_weights, self.means, self.log_vars


class VAE(nn.Module):
    def __init__(self, cfg: TrainConfig, dim: int, levels: int):
        super().__init__()
        self.cfg, self.dim, self.levels = cfg, dim, levels
        self.encoder = Encoder(cfg, dim, levels)
        decoder_cls = CategoricalDecoder if cfg.likelihood == "categorical" else BernoulliDecoder
        if cfg.likelihood == "bernoulli" and levels != 2:
            raise ValueError(f"the bernoulli likelihood needs 2 grey levels, the data has {levels}")
        self.decoder = decoder_cls(cfg, dim, levels)
        if cfg.prior == "standard":
            self.prior: Prior = StandardGaussianPrior(cfg.latent_dim)
        elif cfg.prior == "mog":
            self.prior = MixtureOfGaussiansPrior(cfg.latent_dim, cfg.components)
        else:
            self.prior = VampPrior(self.encoder, dim, cfg.components)

    def log_weights(self, x: torch.Tensor, eps: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
        """log p(x|z) + beta (log p(z) - log q(z|x)) for z = mu + sigma * eps.

        x (B, D) int64, eps (K, B, L) standard normal -> (K, B). beta=1 gives the log importance
        weights whose log-mean-exp over K is the IWAE bound and whose mean is the ELBO.
        """
        mu, log_var = self.encoder(x)  # (B, L)
        z = mu + torch.exp(0.5 * log_var) * eps  # (K, B, L)
        log_q = diag_gaussian_log_prob(z, mu, log_var)  # (K, B)
        log_pz = self.prior.log_prob(z)  # (K, B)
        log_px = self.decoder.log_prob(x, z)  # (K, B)
        return log_px + beta * (log_pz - log_q)

    def loss(self, x: torch.Tensor, k: int, beta: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean over the batch of -log mean_k exp(log_w): the negative (beta-)ELBO for k=1, IWAE for k>1."""
        eps = torch.randn(k, x.shape[0], self.cfg.latent_dim, generator=generator)
        log_w = self.log_weights(x, eps, beta)
        return -(torch.logsumexp(log_w, dim=0) - math.log(k)).mean()

    def frozen_prior(self) -> FixedMixturePrior:
        with torch.no_grad():
            return FixedMixturePrior(*self.prior.mixture())

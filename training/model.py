"""The VAE in the seed's decomposition: Encoder, Decoder (one subclass per likelihood), Prior, VAE.

Images enter every network as int64 grey levels x (B, D); the encoder scales them itself, so exported
graphs take the same integers the data holds. All log-densities are in nats.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from training.config import TrainConfig

LOG_2PI = math.log(2.0 * math.pi)
MIN_LOG_SCALE = -7.0  # smallest log scale of a logistic component (PixelCNN++)
MAX_LOG_SCALE = 7.0  # largest: beyond it a bin's width over the scale underflows float32
#: (row, column) offsets of the pixels whose values shift a pixel's logistic means under the "rows" context:
#: the three above it and the one two rows up. Rows above only, so an image's pixels are independent given z
#: and the rows above them, and a whole row can be generated at once.
CONTEXT_TAPS: tuple[tuple[int, int], ...] = ((-1, -1), (-1, 0), (-1, 1), (-2, 0))


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
    z: torch.Tensor,
    log_weights: torch.Tensor,
    means: torch.Tensor,
    log_vars: torch.Tensor,
    as_matmul: bool = False,
) -> torch.Tensor:
    """log sum_c w_c N(z | m_c, diag(exp(v_c))) for z (..., L), weights (C,), means/log_vars (C, L).

    Written as const_c - 0.5 sum_l t_cl^2 with t = z / sd_c - m_c / sd_c: per (sample, component, dim)
    element only a multiply, a subtract and a square; the rest depends on the prior alone.

    `as_matmul` expands the square instead: const'_c - 0.5 (z^2 @ (1/v)^T - 2 z @ (m/v)^T), two matrix
    products, which both engines run several times faster than the (..., C, L) elementwise form. The
    expansion cancels in fp32 where variances are small and means large, so the exported prior uses it
    only where it is measured exact (`FixedMixturePrior.matmul_is_exact`); training never does.
    """
    if as_matmul:
        inv_var = torch.exp(-log_vars)  # (C, L)
        const = log_weights - 0.5 * (
            LOG_2PI * means.shape[-1] + log_vars.sum(-1) + (means * means * inv_var).sum(-1)
        )  # (C,)
        quad = (z * z) @ inv_var.T - 2.0 * (z @ (means * inv_var).T)  # (..., C)
        return torch.logsumexp(const - 0.5 * quad, dim=-1)
    inv_sd = torch.exp(-0.5 * log_vars)  # (C, L)
    t = z.unsqueeze(-2) * inv_sd - means * inv_sd  # (..., C, L)
    const = log_weights - 0.5 * (LOG_2PI * means.shape[-1] + log_vars.sum(-1))  # (C,)
    return torch.logsumexp(const - 0.5 * (t * t).sum(-1), dim=-1)


def softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + exp(x)), stable for any x. Exported as max(x, 0) + log(1 + exp(-|x|)): onnxruntime's own
    Softplus kernel took a sixth of a scoring call on its own, these five ops a fraction of that. In
    training, torch's fused kernel."""
    if torch.onnx.is_in_onnx_export():
        return torch.clamp(x, min=0.0) + torch.log1p(torch.exp(-torch.abs(x)))
    return F.softplus(x)


def log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """log sigmoid(x) = -softplus(-x), stable for any x (the ONNX exporter writes F.logsigmoid as
    Log(Sigmoid(x)), which underflows to -inf below x = -88 on onnxruntime). In training, torch's kernel."""
    if torch.onnx.is_in_onnx_export():
        return -softplus(-x)
    return F.logsigmoid(x)


def logsumexp_first(t: torch.Tensor) -> torch.Tensor:
    """log sum exp over the first axis (of a size fixed in the graph). Exported as a fold over its slices,
    a, b -> max(a, b) + log(1 + exp(-|a - b|)): OpenVINO fuses log(1 + exp(.)) into its vectorised
    SoftPlus kernel, while its Log kernel is a scalar reference implementation, and a ReduceLogSumExp
    (or a max + log(sum(exp))) over a leading axis ran slowly on onnxruntime. With log_bin_width's single
    logarithm, digits scored 1.17x faster on OpenVINO bf16 and 1.07x on onnxruntime (README, Performance).
    In training, torch's kernel."""
    if torch.onnx.is_in_onnx_export():
        acc = t[0]
        for i in range(1, t.shape[0]):
            acc = torch.maximum(acc, t[i]) + torch.log1p(torch.exp(-torch.abs(acc - t[i])))
        return acc
    return torch.logsumexp(t, dim=0)


def log1mexp(log_neg_d: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(d)) for d = -exp(log_neg_d) < 0, accurate near d = 0 (where 1 - exp(d) cancels).

    Near zero it is log(-d) + log(1 + d/2 + d^2/6) (the series of -expm1(d) / -d, error < d^3/24),
    with log(-d) taken directly; elsewhere log(1 - exp(d)).
    """
    d = -torch.exp(log_neg_d)
    near_zero = log_neg_d + torch.log1p(d * (0.5 + d / 6.0))
    return torch.where(d > -0.01, near_zero, torch.log(1.0 - torch.exp(torch.clamp(d, min=-80.0))))


def log_bin_width(half: float, log_scale: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(-w)) for a bin of width w = 2 half / s, s = exp(log_scale) = 1 / inv_scale.

    Exported as log(tanh(w/2) (1 + exp(-w))), the same number without a branch: tanh keeps its relative
    accuracy for tiny w, where 1 - exp(-w) cancels (within 1.3e-6 of float64 on onnxruntime and OpenVINO
    for w from 1e-7 to 100, float32's rounding of the result). Both engines then skip log1mexp's two
    sides and its select, and OpenVINO, whose Log is a scalar kernel, takes one logarithm instead of two.
    In training, log1mexp."""
    if torch.onnx.is_in_onnx_export():
        x = inv_scale * half  # w / 2
        return torch.log(torch.tanh(x) * (1.0 + torch.exp(-2.0 * x)))
    return log1mexp(math.log(2.0 * half) - log_scale)


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
    context = False  # whether a pixel's distribution also depends on the pixels above it (LogisticMixtureDecoder)

    def __init__(self, cfg: TrainConfig, dim: int, levels: int, shape: tuple[int, int] | None = None):
        super().__init__()
        self.dim, self.levels, self.shape = dim, levels, shape
        self.net = mlp([cfg.latent_dim] + [cfg.hidden] * cfg.depth + [dim * self.out_per_pixel], cfg.dropout)

    def features(self, z: torch.Tensor) -> torch.Tensor:
        """The network's output for z (..., L) -> (..., D * out_per_pixel).

        Leading axes are flattened into one batch axis first, so the exported graphs run every
        decoder layer as a 2-D Gemm on the very weight tensors torch holds (which lets the graphs
        share one weights file).
        """
        flat = self.net(z.reshape(-1, z.shape[-1]))
        return flat.reshape(z.shape[:-1] + flat.shape[-1:])

    def log_prob(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x|z) summed over pixels; x (B, D) int64, z (..., B, L) -> (..., B)."""
        raise NotImplementedError

    def probs(self, z: torch.Tensor) -> torch.Tensor:
        """Per-pixel probabilities of every grey level: z (..., L) -> (..., D, levels)."""
        raise NotImplementedError


class CategoricalDecoder(Decoder):
    """Each pixel a categorical over the grey levels: one logit per level and pixel."""

    def __init__(self, cfg: TrainConfig, dim: int, levels: int, shape: tuple[int, int] | None = None):
        self.out_per_pixel = levels
        super().__init__(cfg, dim, levels, shape)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.features(z).unflatten(-1, (self.dim, self.levels))  # (..., D, levels)

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
        logits = self.features(z)  # (..., B, D)
        # log sigmoid(l) for x=1 and log sigmoid(-l) for x=0, i.e. x l - softplus(l), broadcast over K
        return (x.to(logits.dtype) * logits - softplus(logits)).sum(-1)

    def probs(self, z: torch.Tensor) -> torch.Tensor:
        p1 = torch.sigmoid(self.features(z))
        return torch.stack([1.0 - p1, p1], dim=-1)


def shifted(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[..., r, c] = img[..., r + dy, c + dx], zero where that falls outside the image; img (N, H, W), dy <= 0."""
    h, w = img.shape[-2:]
    left = max(-dx, 0)
    padded = F.pad(img, (left, max(dx, 0), -dy, 0))
    return padded[:, :h, left + dx : left + dx + w]


class LogisticMixtureDecoder(Decoder):
    """Each pixel a mixture of M discretized logistics (PixelCNN++; Kingma et al.'s IAF-VAE).

    Grey level x of `levels` sits at v = 2x / (levels - 1) - 1 on [-1, 1], in a bin of half-width
    h = 1 / (levels - 1). Component m puts mass sigmoid((v + h - mu_m) / s_m) - sigmoid((v - h - mu_m) / s_m)
    on the bin, with the edge bins open: level 0 takes everything below its upper edge, the top level
    everything above its lower edge, so the levels' probabilities sum to exactly 1. 3 M numbers per pixel
    (mixture logit, mean, log scale) instead of one per level.

    With `context == "rows"` the model is autoregressive over rows: component m's mean at a pixel also
    adds sum_t a_mt v_t over the pixels at `CONTEXT_TAPS` (the rows above; 0 outside the image), with the
    M x T weights a learned alongside the network. The network given z draws the image's shapes; the
    context codes the texture a pixel shares with its neighbours, which no pixel-independent p(x|z) can.
    """

    def __init__(self, cfg: TrainConfig, dim: int, levels: int, shape: tuple[int, int] | None = None):
        self.components = cfg.logistic_components
        self.out_per_pixel = 3 * self.components
        super().__init__(cfg, dim, levels, shape)
        self.context = cfg.context == "rows"
        if self.context:
            if shape is None or shape[0] * shape[1] != dim:
                raise ValueError(f"the rows context needs the image's [H, W] (with H x W = {dim}), got {shape}")
            self.context_weights = nn.Parameter(torch.zeros(self.components, len(CONTEXT_TAPS)))

    def params(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log mixture weights, means before any context, log scales), each (..., D, M)."""
        p = self.features(z).unflatten(-1, (3, self.dim, self.components))  # (..., 3, D, M)
        logit, mean, log_scale = p.unbind(-3)
        return F.log_softmax(logit, dim=-1), mean, torch.clamp(log_scale, MIN_LOG_SCALE, MAX_LOG_SCALE)

    def context_shift(self, v: torch.Tensor) -> torch.Tensor:
        """What the context adds to each component's means: v (N, H, W) on [-1, 1] -> (M, N, H, W)."""
        taps = torch.stack([shifted(v, dy, dx) for dy, dx in CONTEXT_TAPS])  # (T, N, H, W)
        return (self.context_weights @ taps.flatten(1)).unflatten(1, taps.shape[1:])

    def log_prob(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.pixel_log_probs(x, z).sum(-1)

    def pixel_log_probs(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x_d | z, the rows above) of each pixel: x (B, D) int64, z (..., B, L) -> (..., B, D).

        With a = (v + h - mu) / s and b = (v - h - mu) / s, the bin's log-probability is
        log sigmoid(a) + log sigmoid(-b) + log(1 - exp(-w)), w = a - b = 2h / s: stable everywhere. The
        open edge bins put their outer edge at -/+1e30, which zeroes the second term (bottom) or the first
        (top), and the last term is masked off there. Everything that depends on x alone (the context's
        shift of the means included) is computed on (B, D) before it meets the parameters.

        The parameters are taken component-major, (M, ..., B, D): each elementwise op then runs on
        contiguous (..., B, D) slices that x's (B, D) terms broadcast onto from the right, and the
        mixture is a log-sum-exp over the leading axis. The same arithmetic on (..., B, D, M), with
        its inner axis of size M, was broadcast and reduced slowly by both engines (README, Performance).
        """
        p = self.features(z).unflatten(-1, (3, self.dim, self.components))  # (..., 3, D, M)
        p = p.permute(p.dim() - 1, *range(p.dim() - 1))  # (M, ..., 3, D); dims spelled out for the ONNX trace
        logit, mean, log_scale = p.unbind(-2)  # (M, ..., B, D) each
        log_scale = torch.clamp(log_scale, MIN_LOG_SCALE, MAX_LOG_SCALE)
        half = 1.0 / (self.levels - 1)
        v = x.to(mean.dtype) * (2.0 * half) - 1.0  # (B, D)
        if self.context:
            assert self.shape is not None
            shift = self.context_shift(v.unflatten(-1, self.shape)).flatten(-2)  # (M, B, D)
            for _ in range(mean.dim() - 3):
                shift = shift.unsqueeze(1)  # (M, 1.., B, D): the same for every sample of z
            mean = mean + shift
        top, bottom = x == self.levels - 1, x == 0
        v_hi = torch.where(top, torch.full_like(v, 1e30), v + half)
        v_lo = torch.where(bottom, torch.full_like(v, -1e30), v - half)
        interior = (~(top | bottom)).to(mean.dtype)
        inv_s = torch.exp(-log_scale)
        log_width = log_bin_width(half, log_scale, inv_s)  # log(1 - exp(-w))
        log_bin = log_sigmoid((v_hi - mean) * inv_s) + log_sigmoid((mean - v_lo) * inv_s) + interior * log_width
        # log sum_m softmax(logit)_m p_m(x), with the softmax's normaliser taken out of the sum
        return logsumexp_first(logit + log_bin) - logsumexp_first(logit)

    def bin_probs(self, log_w: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
        """Every level's probability from mixture parameters (..., P, M) -> (..., P, levels)."""
        half = 1.0 / (self.levels - 1)
        edges = torch.arange(self.levels - 1, dtype=mean.dtype) * (2.0 * half) - 1.0 + half  # (levels-1,)
        cdf_m = torch.sigmoid((edges - mean.unsqueeze(-1)) * torch.exp(-log_scale).unsqueeze(-1))  # (..., P, M, lv-1)
        cdf = (log_w.exp().unsqueeze(-1) * cdf_m).sum(-2)  # (..., P, levels-1)
        full = F.pad(F.pad(cdf, (1, 0), value=0.0), (0, 1), value=1.0)  # CDF at every edge, -inf .. +inf
        return torch.clamp(full[..., 1:] - full[..., :-1], min=0.0)

    def probs(self, z: torch.Tensor) -> torch.Tensor:
        """Per-pixel probabilities of every level given z. Under the rows context a pixel's distribution
        depends on the rows above; these are its distribution given z and the *expected* values of those
        rows, generated row by row (a mean rollout): exact for the first row, and what the mean image
        follows; per-pixel draws from them lack the texture the context would give a true sample."""
        log_w, mean, log_scale = self.params(z)  # (..., D, M)
        if not self.context:
            return self.bin_probs(log_w, mean, log_scale)
        assert self.shape is not None
        h, w = self.shape
        lead = z.shape[:-1]
        log_w, mean, log_scale = (t.reshape(-1, h, w, self.components) for t in (log_w, mean, log_scale))
        values = torch.arange(self.levels, dtype=mean.dtype) * (2.0 / (self.levels - 1)) - 1.0  # v of each level
        rows: list[torch.Tensor] = []  # per-level probabilities of each finished row, (N, W, levels)
        expected: list[torch.Tensor] = []  # E[v] of each finished row, (N, W)
        # a row not generated yet (no tap of row r reaches it); zeros_like would trace to the export's batch size
        pending = 0.0 * mean[:, 0, :, 0]
        for r in range(h):
            so_far = torch.stack(expected + [pending] * (h - r), dim=1)  # (N, H, W)
            shift = self.context_shift(so_far)[:, :, r].permute(1, 2, 0)  # row r's shift, (N, W, M)
            p_r = self.bin_probs(log_w[:, r], mean[:, r] + shift, log_scale[:, r])  # (N, W, levels)
            rows.append(p_r)
            expected.append(p_r @ values)
        return torch.stack(rows, dim=1).reshape(lead + (self.dim, self.levels))


DECODERS: dict[str, type[Decoder]] = {
    "categorical": CategoricalDecoder,
    "bernoulli": BernoulliDecoder,
    "logistic_mixture": LogisticMixtureDecoder,
}


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
        self.as_matmul = False  # set by the export, where `matmul_is_exact` holds

    def mixture(self):
        return self.log_weights, self.means, self.log_vars

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return mixture_log_prob(z, *self.mixture(), as_matmul=self.as_matmul)

    @torch.no_grad()
    def matmul_is_exact(self, tolerance_nats: float = 1e-4, n: int = 20_000, seed: int = 0) -> bool:
        """Whether the matrix-product form of log p(z) stays within `tolerance_nats` of the exact value
        (float64) in fp32, on n seeded draws from the prior, half of them with doubled spread (the tails)."""
        gen = torch.Generator().manual_seed(seed)
        z = self.sample(n, gen)
        z[: n // 2] = 2.0 * z[: n // 2] - self.means.mean(0)  # reflect half the draws outwards about the center
        exact = mixture_log_prob(z.double(), *(t.double() for t in self.mixture()))
        fast = mixture_log_prob(z, *self.mixture(), as_matmul=True).double()
        return bool(torch.isfinite(fast).all() and (fast - exact).abs().max() <= tolerance_nats)


class VAE(nn.Module):
    """Encoder, decoder and prior of one configuration; `cfg` must be resolved (no "auto" left)."""

    def __init__(self, cfg: TrainConfig, dim: int, levels: int, shape: tuple[int, int] | None = None):
        super().__init__()
        self.cfg, self.dim, self.levels = cfg, dim, levels
        if cfg.likelihood not in DECODERS or cfg.context == "auto" or cfg.dropout is None or cfg.iw_train is None:
            raise ValueError(f"likelihood {cfg.likelihood!r} is not resolved; call TrainConfig.resolve first")
        if cfg.likelihood == "bernoulli" and levels != 2:
            raise ValueError(f"the bernoulli likelihood needs 2 grey levels, the data has {levels}")
        self.encoder = Encoder(cfg, dim, levels)
        if cfg.context == "rows" and cfg.likelihood != "logistic_mixture":
            raise ValueError(f"the rows context needs the logistic_mixture likelihood, not {cfg.likelihood!r}")
        self.decoder = DECODERS[cfg.likelihood](cfg, dim, levels, shape)
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


def parameter_count(cfg: TrainConfig, dim: int, levels: int, shape: tuple[int, int] | None = None) -> int:
    """Parameters of the model a resolved config builds, counted without allocating them."""
    with torch.device("meta"):
        return sum(p.numel() for p in VAE(cfg, dim, levels, shape).parameters())

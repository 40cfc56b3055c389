"""The VAE in the seed's decomposition: Encoder, Decoder (one subclass per likelihood), Prior, VAE.

Images enter every network as int64 levels x (B, D), D = H W C flattened in H, W, C order (channel
fastest; C = 1 for grey, 3 for colour); the encoder scales them itself, so exported graphs take the same
integers the data holds. The encoder's and the decoder's networks (the trunks: fully connected or
convolutional, `TRUNKS`) are apart from the likelihood (the `Decoder` subclasses, which read the per-value
parameter tensor the decoder's network gives). All log-densities are in nats.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from training.config import TrainConfig

LOG_2PI = math.log(2.0 * math.pi)
MIN_LOG_SCALE = -7.0  # smallest log scale of a logistic component (PixelCNN++)
MAX_LOG_SCALE = 7.0  # largest: beyond it a bin's width over the scale underflows float32
FEATURE_MAPS_ALIVE = 4  # a conv decoder's largest feature maps alive at once per sample (`working_floats`)
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


ImageShape = tuple[int, int, int]  # (H, W, C): height, width, channels


def image_shape(dim: int, shape: Sequence[int] | None) -> ImageShape | None:
    """(H, W, C) from an image shape given as [H, W] (grey, C = 1) or [H, W, C]; None stays None.

    Images enter the networks flattened in H, W, C order (channel fastest, as numpy's (H, W, C) arrays
    flatten), so the shape must hold exactly the D = `dim` values of an image.
    """
    if shape is None:
        return None
    full = (*shape, 1) if len(shape) == 2 else tuple(shape)
    if len(full) != 3 or min(full) < 1 or full[0] * full[1] * full[2] != dim:
        raise ValueError(f"the image's [H, W] or [H, W, C] must hold the D = {dim} values of an image, got {shape}")
    return int(full[0]), int(full[1]), int(full[2])


def conv_padding(size: int, stages: int) -> int:
    """Rows (or columns) added after the image so that `stages - 1` halvings divide it exactly."""
    return -size % (2 ** (stages - 1))


@dataclass(frozen=True)
class LowPrecisionSpan:
    """The part of the decoder an engine may run at reduced precision, named by two parameters (state-dict
    names): from the activation after the layer owning `start` to the result of the layer owning `end`.
    Everything between depends on that activation alone, so a graph can be cut there."""

    start: str
    end: str


# Trunks: the networks of the encoder and the decoder, apart from the likelihood --------------------------
class ResidualBlock(nn.Module):
    """x + conv(act(conv(act(x)))) at one width and resolution. The second convolution starts at zero (as in
    VDVAE), so a stack of blocks starts as the identity and deep stacks train from the first step."""

    def __init__(self, width: int, dropout: float):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        with torch.no_grad():
            self.conv2.weight.zero_()
            self.conv2.bias.zero_()  # type: ignore[union-attr]  # a Conv2d built with a bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.leaky_relu(x))  # (N, width, h, w)
        return x + self.conv2(self.drop(F.leaky_relu(h)))


class Downsample(nn.Module):
    """Half the resolution: a stride-2 3x3 convolution from one stage's width to the next's."""

    def __init__(self, width_in: int, width_out: int):
        super().__init__()
        self.conv = nn.Conv2d(width_in, width_out, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.leaky_relu(x))


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour repetition, then a 3x3 convolution to the next stage's width
    (no transposed convolution, whose overlapping strides print a checkerboard on the output)."""

    def __init__(self, width_in: int, width_out: int):
        super().__init__()
        self.conv = nn.Conv2d(width_in, width_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(F.leaky_relu(x), scale_factor=2.0, mode="nearest"))


class ConvEncoderNet(nn.Module):
    """Scaled images u (B, D), D = H W C in H, W, C order -> (B, out).

    The image is padded (zeros after the last row and column) to a multiple of 2^(stages - 1), runs
    through `blocks` residual blocks per stage with a stride-2 convolution between stages, and the last
    stage's feature map meets a linear layer.
    """

    def __init__(self, shape: ImageShape, widths: Sequence[int], blocks: int, dropout: float, out: int):
        super().__init__()
        self.shape = shape
        h, w, c = shape
        n = len(widths)
        self.pad = (conv_padding(h, n), conv_padding(w, n))
        self.stem = nn.Conv2d(c, widths[0], 3, padding=1)
        stages: list[nn.Module] = []
        for s, width in enumerate(widths):
            stages += [ResidualBlock(width, dropout) for _ in range(blocks)]
            if s + 1 < n:
                stages.append(Downsample(width, widths[s + 1]))
        self.stages = nn.Sequential(*stages)
        cells = ((h + self.pad[0]) >> (n - 1)) * ((w + self.pad[1]) >> (n - 1))
        self.out = nn.Linear(widths[-1] * cells, out)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        img = u.unflatten(-1, self.shape).permute(0, 3, 1, 2)  # (B, C, H, W)
        # channels-last activations: with them torch's CPU convolutions ran a 32x32x3 training step 1.15x and
        # a scoring pass 1.4-1.7x as fast (the exported graphs do not record memory formats)
        img = F.pad(img, (0, self.pad[1], 0, self.pad[0])).contiguous(memory_format=torch.channels_last)
        h = self.stages(self.stem(img))  # (B, widths[-1], H' / 2^(n-1), W' / 2^(n-1))
        return self.out(F.leaky_relu(h).flatten(1))


class ConvDecoderNet(nn.Module):
    """z (N, L) -> per-pixel parameters (N, D, G, Q): the encoder's mirror image.

    A linear layer draws the coarsest feature map, each stage runs `blocks` residual blocks and doubles
    the resolution into the next, the padded rows and columns are cropped off, and a 1x1 convolution
    gives each pixel's C x G x Q parameters. The K importance samples of an image arrive folded into N,
    so every convolution runs on one batch axis that stays dynamic in the exported graphs.
    """

    def __init__(
        self,
        latent: int,
        shape: ImageShape,
        widths: Sequence[int],
        blocks: int,
        dropout: float,
        param_shape: tuple[int, int],
    ):
        super().__init__()
        self.shape, self.param_shape = shape, param_shape
        h, w, c = shape
        n = len(widths)
        self.coarse = (
            widths[-1],
            (h + conv_padding(h, n)) >> (n - 1),
            (w + conv_padding(w, n)) >> (n - 1),
        )
        self.inp = nn.Linear(latent, self.coarse[0] * self.coarse[1] * self.coarse[2])
        stages: list[nn.Module] = []
        for s in reversed(range(n)):
            stages += [ResidualBlock(widths[s], dropout) for _ in range(blocks)]
            if s > 0:
                stages.append(Upsample(widths[s], widths[s - 1]))
        self.stages = nn.Sequential(*stages)
        self.out = nn.Conv2d(widths[0], c * param_shape[0] * param_shape[1], 1)
        hp, wp = h + conv_padding(h, n), w + conv_padding(w, n)
        # a residual block holds its input, two convolutions' results and an activation at once
        self.activation_floats = FEATURE_MAPS_ALIVE * max(
            width * (hp >> s) * (wp >> s) for s, width in enumerate(widths)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h, w, c = self.shape
        a = F.leaky_relu(self.inp(z))  # (N, width * h0 * w0): where the low-precision span starts
        # channels-last, as in the encoder: 1.15x a training step, 1.4-1.7x a scoring pass in torch
        fmap = self.stages(a.unflatten(1, self.coarse).contiguous(memory_format=torch.channels_last))
        p = self.out(F.leaky_relu(fmap[:, :, :h, :w]))  # (N, C G Q, H, W): where the span ends
        return p.permute(0, 2, 3, 1).unflatten(-1, (c, *self.param_shape)).flatten(1, 3)  # (N, D, G, Q)

    def low_precision_span(self) -> tuple[str, str]:
        """From the activation of the linear layer that draws the coarsest map to the output convolution's
        result: every convolution, nearly all of a sample's arithmetic."""
        return "inp.weight", "out.weight"


class MLPDecoderNet(nn.Sequential):
    """z (N, L) -> per-pixel parameters (N, D, G, Q) through fully connected layers.

    The last layer's outputs are read as (G, D, Q): the layout the per-likelihood networks had before the
    trunk and the likelihood were apart, so trained models' weights keep their meaning bit for bit. A
    Sequential subclass, so the state-dict names (`net.0.weight`, ...) stay as they were too.
    """

    activation_floats = 0  # hidden layers of a few hundred floats: nothing beside the output (`Decoder.working_floats`)

    def __init__(self, latent: int, hidden: int, depth: int, dropout: float, dim: int, param_shape: tuple[int, int]):
        super().__init__(*mlp([latent] + [hidden] * depth + [dim * param_shape[0] * param_shape[1]], dropout))
        self.dim, self.param_shape = dim, param_shape

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        flat = super().forward(z)  # (N, G D Q)
        g, q = self.param_shape
        return flat.unflatten(-1, (g, self.dim, q)).transpose(-3, -2)

    def low_precision_span(self) -> tuple[str, str] | None:
        """From the first hidden layer's activation to the output layer's result: rounding z to bf16 would
        cost more accuracy than the first layer costs time (16 x 512 of ~470 k multiply-adds a sample on
        digits). None without a hidden layer."""
        linear = [i for i, layer in enumerate(self) if isinstance(layer, nn.Linear)]
        return (f"{linear[0]}.weight", f"{linear[-1]}.weight") if len(linear) >= 2 else None


def _conv_settings(cfg: TrainConfig, shape: ImageShape | None) -> tuple[ImageShape, list[int], int]:
    """(image shape, widths, blocks) of the conv networks, refused when the config or the shape lacks them."""
    if shape is None:
        raise ValueError("the conv networks need the image's [H, W] or [H, W, C]")
    if not cfg.conv_widths or cfg.conv_blocks is None:
        raise ValueError("conv_widths and conv_blocks are not resolved; call TrainConfig.resolve first")
    return shape, cfg.conv_widths, cfg.conv_blocks


def _mlp_encoder(cfg: TrainConfig, dim: int, shape: ImageShape | None, latent: int) -> nn.Module:
    return mlp([dim] + [cfg.hidden] * cfg.depth + [2 * latent], cfg.dropout or 0.0)


def _conv_encoder(cfg: TrainConfig, dim: int, shape: ImageShape | None, latent: int) -> nn.Module:
    return ConvEncoderNet(*_conv_settings(cfg, shape), cfg.dropout or 0.0, 2 * latent)


def _mlp_decoder(
    cfg: TrainConfig, dim: int, shape: ImageShape | None, latent: int, params: tuple[int, int]
) -> nn.Module:
    return MLPDecoderNet(latent, cfg.hidden, cfg.depth, cfg.dropout or 0.0, dim, params)


def _conv_decoder(
    cfg: TrainConfig, dim: int, shape: ImageShape | None, latent: int, params: tuple[int, int]
) -> nn.Module:
    return ConvDecoderNet(latent, *_conv_settings(cfg, shape), cfg.dropout or 0.0, params)


#: arch -> (encoder network builder: scaled images (B, D) -> (B, 2L); decoder network builder:
#: z (N, L) -> per-value parameters (N, D, G, Q)). Each builder passes its network the few settings it uses.
TRUNKS: dict[str, tuple[Callable[..., nn.Module], Callable[..., nn.Module]]] = {
    "mlp": (_mlp_encoder, _mlp_decoder),
    "conv": (_conv_encoder, _conv_decoder),
}


class Encoder(nn.Module):
    """q(z|x) = N(mu(x), diag(exp(log_var(x)))), through the configured network family."""

    def __init__(self, cfg: TrainConfig, dim: int, levels: int, shape: Sequence[int] | None = None):
        super().__init__()
        # "unit" maps grey levels onto [0, 1]; "raw" feeds the level numbers as the seed text does.
        self.max_input = 1.0 if cfg.input_scale == "unit" else float(levels - 1)
        self.levels = levels
        assert cfg.latent_dim is not None, "resolve the config first"
        self.layers = cfg.latent_layers
        # one (mu, log_var) pair of L values per latent layer, bottom first: with one layer, the layout it always had
        self.net = TRUNKS[cfg.arch][0](cfg, dim, image_shape(dim, shape), cfg.latent_dim * cfg.latent_layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The top latent layer's q(z|x): mu (B, L), log_var (B, L) (the encoder graph's outputs)."""
        return self.ladder(x)[-1]

    def ladder(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's bottom-up Gaussian (mu, log_var), each (B, L), bottom layer first; the top one is q(z_top|x),
        the others meet the top-down prior in `LatentLayer.posterior`."""
        return self._split(self.net(self.scale(x)))

    def _split(self, h: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        pairs = [piece.chunk(2, dim=-1) for piece in h.chunk(self.layers, dim=-1)]
        return [(mu, log_var) for mu, log_var in pairs]

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32) * (self.max_input / (self.levels - 1))

    def encode_scaled(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The top layer's q(z|u) for inputs already in [0, 1] (the VampPrior's pseudo-inputs)."""
        return self._split(self.net(u * self.max_input))[-1]


class Decoder(nn.Module):
    """p(x|z): a network (the trunk, from `TRUNKS`) from z to a parameter tensor (..., D, G, Q) of every
    (sub-)pixel, and a likelihood head, the subclass, that reads it. D counts every channel of every pixel;
    the head sees G groups of Q numbers per value (`parameter_shape`)."""

    context = False  # whether a pixel's distribution also depends on the pixels above it (LogisticMixtureDecoder)

    def __init__(self, cfg: TrainConfig, dim: int, levels: int, shape: Sequence[int] | None = None):
        super().__init__()
        self.dim, self.levels = dim, levels
        self.shape = image_shape(dim, shape)
        g, q = self.parameter_shape()
        self.out_per_pixel = g * q  # numbers the network gives each value of an image
        assert cfg.latent_dim is not None, "resolve the config first"
        self.net = TRUNKS[cfg.arch][1](cfg, dim, self.shape, cfg.latent_dim, (g, q))

    @property
    def channels(self) -> int:
        return self.shape[2] if self.shape is not None else 1

    def parameter_shape(self) -> tuple[int, int]:
        """(G, Q): the parameters of one value of an image, as G groups of Q numbers."""
        raise NotImplementedError

    def features(self, z: torch.Tensor) -> torch.Tensor:
        """The network's parameters for z (..., L) -> (..., D, G, Q).

        Leading axes are flattened into one batch axis first, so the exported graphs run every
        decoder layer on one dynamic batch axis, on the very weight tensors torch holds (which lets
        the graphs share one weights file).
        """
        flat = self.net(z.reshape(-1, z.shape[-1]))  # (N, D, G, Q)
        return flat.reshape(z.shape[:-1] + flat.shape[1:])

    def pixel_log_probs(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x_d | z, ...) of every value of the image: x (B, D) int64, z (..., B, L) -> (..., B, D);
        their sum over D is log p(x|z). Anomaly maps and bits/dim come from these same numbers."""
        raise NotImplementedError

    def log_prob(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x|z) summed over pixels; x (B, D) int64, z (..., B, L) -> (..., B)."""
        return self.pixel_log_probs(x, z).sum(-1)

    def probs(self, z: torch.Tensor) -> torch.Tensor:
        """Per-value probabilities of every level: z (..., L) -> (..., D, levels)."""
        raise NotImplementedError

    @property
    def working_floats(self) -> int:
        """Floats one sample of z holds in the network besides its output (conv feature maps; 0 for the mlp)."""
        return int(self.net.activation_floats)

    @property
    def floats_per_sample(self) -> int:
        """The output's D x out_per_pixel and the network's feature maps: what sizes a pass's rows (evaluation,
        export verification, and through the manifest the service)."""
        return self.dim * self.out_per_pixel + self.working_floats

    def low_precision_span(self) -> LowPrecisionSpan | None:
        """The span of the decoder network that may run at reduced precision (None: none)."""
        name_span = getattr(self.net, "low_precision_span", None)
        span = name_span() if name_span is not None else None
        return LowPrecisionSpan(f"net.{span[0]}", f"net.{span[1]}") if span else None


class CategoricalDecoder(Decoder):
    """Each value a categorical over the levels: one logit per level."""

    def parameter_shape(self) -> tuple[int, int]:
        return 1, self.levels

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.features(z)[..., 0, :]  # (..., D, levels)

    def _hit_log_probs(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(self.logits(z), dim=-1)  # (..., B, D, levels)
        # A broadcast mask rather than gather: gather needs x expanded to (..., B, D), a shape the
        # ONNX trace would freeze, and the mask lets K stay a dynamic axis.
        hit = x.unsqueeze(-1) == torch.arange(self.levels, device=x.device)  # (B, D, levels)
        return torch.where(hit, log_p, torch.zeros((), dtype=log_p.dtype))

    def pixel_log_probs(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self._hit_log_probs(x, z).sum(-1)

    def log_prob(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        # One reduction over (D, levels), as before the per-pixel split: the sum of `pixel_log_probs` in
        # another order of float additions, kept so that trained categorical models stay bit for bit.
        return self._hit_log_probs(x, z).sum((-2, -1))

    def probs(self, z: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.logits(z), dim=-1)


class BernoulliDecoder(Decoder):
    """Each value a Bernoulli (binary images, levels == 2)."""

    def parameter_shape(self) -> tuple[int, int]:
        return 1, 1

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.features(z)[..., 0, 0]  # (..., D)

    def pixel_log_probs(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        logits = self.logits(z)  # (..., B, D)
        # log sigmoid(l) for x=1 and log sigmoid(-l) for x=0, i.e. x l - softplus(l), broadcast over K
        return x.to(logits.dtype) * logits - softplus(logits)

    def probs(self, z: torch.Tensor) -> torch.Tensor:
        p1 = torch.sigmoid(self.logits(z))
        return torch.stack([1.0 - p1, p1], dim=-1)


def shifted(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[:, r, c] = img[:, r + dy, c + dx], zero where that falls outside the image; img (N, H, W, C), dy <= 0."""
    h, w = img.shape[1:3]
    left = max(-dx, 0)
    padded = F.pad(img, (0, 0, left, max(dx, 0), -dy, 0))
    return padded[:, :h, left + dx : left + dx + w]


class LogisticMixtureDecoder(Decoder):
    """Each pixel a mixture of M discretized logistics (PixelCNN++; Kingma et al.'s IAF-VAE).

    Level x of `levels` sits at v = 2x / (levels - 1) - 1 on [-1, 1], in a bin of half-width
    h = 1 / (levels - 1). Component m puts mass sigmoid((v + h - mu_m) / s_m) - sigmoid((v - h - mu_m) / s_m)
    on the bin, with the edge bins open: level 0 takes everything below its upper edge, the top level
    everything above its lower edge, so the levels' probabilities sum to exactly 1. 3 M numbers per grey
    pixel (mixture logit, mean, log scale) instead of one per level.

    Colour (C > 1) as in PixelCNN++: a component covers all of a pixel's channels, with one mixture weight
    per pixel (the mean of its channels' logits), and channel c's mean at component m also adds
    sum_{c' < c} tanh(a_{m,c,c'}) v_c': green follows red, blue red and green, with coefficients from the
    network (one more group of M numbers per value, C(C-1)/2 coefficients a pixel). p(pixel | z) is then
    sum_m pi_m prod_c p_cm(x_c | x_<c), and `pixel_log_probs` gives its chain-rule terms:
    log p(x_c | z, x_<c) for each channel, exact conditionals whose sum is the pixel's log-probability.

    With `context == "rows"` the model is autoregressive over rows: component m's mean of channel c at a
    pixel also adds sum_{c', t} a_{m,c,c',t} v_c'(t) over the pixels at `CONTEXT_TAPS` (the rows above, in
    every channel; 0 outside the image), with the M x (C C T) weights a learned alongside the network
    (M x T for grey). The network given z draws the image's shapes; the context codes the texture a pixel
    shares with its neighbours, which no pixel-independent p(x|z) can.
    """

    def __init__(self, cfg: TrainConfig, dim: int, levels: int, shape: Sequence[int] | None = None):
        self.components = cfg.logistic_components
        super().__init__(cfg, dim, levels, shape)
        self.context = cfg.context == "rows"
        if self.context:
            if self.shape is None:
                raise ValueError(
                    f"the rows context needs the image's [H, W] or [H, W, C] (with H x W x C = {dim}), got {shape}"
                )
            c = self.channels
            self.context_weights = nn.Parameter(torch.zeros(self.components, c * c * len(CONTEXT_TAPS)))

    @property
    def pairs(self) -> int:
        """Coupling coefficients a pixel: one per pair of channels (c' < c)."""
        return self.channels * (self.channels - 1) // 2

    def parameter_shape(self) -> tuple[int, int]:
        # logit, mean, log scale, and the pixel's coupling coefficients spread over its C values
        return 3 + -(-self.pairs // self.channels), self.components

    def _pixel_mixture(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Parameters pixel-major, p (..., D, G, M) -> mixture logits (..., P, M) of each of the P = H W
        pixels, means and clamped log scales (..., P, C, M), tanh'd coupling coefficients
        (..., P, pairs, M) (None for grey)."""
        c = self.channels
        logit, mean, log_scale, *coef = p.unflatten(-3, (-1, c)).unbind(-2)  # (..., P, C, M) each
        log_scale = torch.clamp(log_scale, MIN_LOG_SCALE, MAX_LOG_SCALE)
        if c == 1:
            return logit[..., 0, :], mean, log_scale, None
        a = torch.tanh(torch.cat(coef, dim=-2)[..., : self.pairs, :])
        return logit.mean(-2), mean, log_scale, a

    def params(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log mixture weights, means before any context or coupling, log scales), each (..., D, M); a
        colour pixel's weights repeated for each of its channels."""
        logit, mean, log_scale, _ = self._pixel_mixture(self.features(z))
        log_w = F.log_softmax(logit, dim=-1).unsqueeze(-2).expand(mean.shape)
        return log_w.flatten(-3, -2), mean.flatten(-3, -2), log_scale.flatten(-3, -2)

    def context_shift(self, v: torch.Tensor) -> torch.Tensor:
        """What the context adds to each component's means: v (N, H, W, C) on [-1, 1] -> (M, N, H, W, C);
        a grey image may come as (N, H, W), giving (M, N, H, W)."""
        grey = v.dim() == 3
        if grey:
            v = v.unsqueeze(-1)
        c = v.shape[-1]
        taps = torch.stack([shifted(v, dy, dx) for dy, dx in CONTEXT_TAPS])  # (T, N, H, W, C)
        taps = taps.permute(4, 0, 1, 2, 3).flatten(0, 1)  # (C T, N, H, W), rows (c', t)
        weights = self.context_weights.reshape(self.components * c, c * len(CONTEXT_TAPS))  # rows (m, c)
        shift = (weights @ taps.flatten(1)).unflatten(1, taps.shape[1:])  # (M C, N, H, W)
        shift = shift.unflatten(0, (self.components, c)).permute(0, 2, 3, 4, 1)  # (M, N, H, W, C)
        return shift[..., 0] if grey else shift

    def pixel_log_probs(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x_d | z, the rows above, the pixel's earlier channels) of each value: x (B, D) int64,
        z (..., B, L) -> (..., B, D).

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
        p = self.features(z)  # (..., B, D, G, M)
        n = p.dim()
        p = p.permute(n - 1, *range(n - 3), n - 2, n - 3)  # (M, ..., B, G, D); dims spelled out for the ONNX trace
        logit, mean, log_scale, *coef = p.unbind(-2)  # (M, ..., B, D) each
        log_scale = torch.clamp(log_scale, MIN_LOG_SCALE, MAX_LOG_SCALE)
        half = 1.0 / (self.levels - 1)
        v = x.to(mean.dtype) * (2.0 * half) - 1.0  # (B, D)
        if self.context:
            assert self.shape is not None
            shift = self.context_shift(v.unflatten(-1, self.shape)).flatten(-3)  # (M, B, D)
            for _ in range(mean.dim() - 3):
                shift = shift.unsqueeze(1)  # (M, 1.., B, D): the same for every sample of z
            mean = mean + shift
        if self.channels > 1:
            mean = self._coupled_means(mean, coef, v)
        top, bottom = x == self.levels - 1, x == 0
        v_hi = torch.where(top, torch.full_like(v, 1e30), v + half)
        v_lo = torch.where(bottom, torch.full_like(v, -1e30), v - half)
        interior = (~(top | bottom)).to(mean.dtype)
        inv_s = torch.exp(-log_scale)
        log_width = log_bin_width(half, log_scale, inv_s)  # log(1 - exp(-w))
        log_bin = log_sigmoid((v_hi - mean) * inv_s) + log_sigmoid((mean - v_lo) * inv_s) + interior * log_width
        if self.channels == 1:
            # log sum_m softmax(logit)_m p_m(x), with the softmax's normaliser taken out of the sum
            return logsumexp_first(logit + log_bin) - logsumexp_first(logit)
        return self._channel_chain(logit, log_bin)

    def _coupled_means(self, mean: torch.Tensor, coef: list[torch.Tensor], v: torch.Tensor) -> torch.Tensor:
        """Channel c's means plus sum_{c' < c} tanh(a_{c,c'}) v_c': mean (M, ..., B, D), coef the coefficient
        groups (M, ..., B, D) each, v (B, D) -> (M, ..., B, D)."""
        c = self.channels
        a = torch.tanh(torch.cat([t.unflatten(-1, (-1, c)) for t in coef], dim=-1))  # (M, ..., B, P, C slots)
        mu = mean.unflatten(-1, (-1, c))  # (M, ..., B, P, C)
        vc = v.unflatten(-1, (-1, c))  # (B, P, C)
        out, k = [mu[..., 0]], 0
        for ch in range(1, c):
            m = mu[..., ch]
            for prev in range(ch):
                m = m + a[..., k] * vc[..., prev]
                k += 1
            out.append(m)
        return torch.stack(out, dim=-1).flatten(-2)

    def _channel_chain(self, logit: torch.Tensor, log_bin: torch.Tensor) -> torch.Tensor:
        """Chain-rule terms of a pixel's joint mixture: logit (M, ..., B, D) (each channel's share of the
        pixel's mixture logit), log_bin (M, ..., B, D) each component's log-probability of each value ->
        log p(x_c | z, x_<c) (..., B, D)."""
        c = self.channels
        pixel_logit = logit.unflatten(-1, (-1, c)).mean(-1)  # (M, ..., B, P)
        lb = log_bin.unflatten(-1, (-1, c))  # (M, ..., B, P, C)
        prev = logsumexp_first(pixel_logit)  # log of the mixture's normaliser
        cum, terms = pixel_logit, []
        for ch in range(c):
            cum = cum + lb[..., ch]  # log pi_m + sum_{c' <= ch} log p_c'm
            joint = logsumexp_first(cum)  # log p(x_<=ch) (unnormalised alike)
            terms.append(joint - prev)
            prev = joint
        return torch.stack(terms, dim=-1).flatten(-2)

    def component_cdfs(self, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
        """Each component's CDF at the levels' inner bin edges: (..., M) -> (..., M, levels - 1)."""
        half = 1.0 / (self.levels - 1)
        edges = torch.arange(self.levels - 1, dtype=mean.dtype) * (2.0 * half) - 1.0 + half  # (levels-1,)
        return torch.sigmoid((edges - mean.unsqueeze(-1)) * torch.exp(-log_scale).unsqueeze(-1))

    @staticmethod
    def mixed_bins(log_w: torch.Tensor, cdf_m: torch.Tensor) -> torch.Tensor:
        """Every level's probability under the mixture: log weights (..., M), component CDFs
        (..., M, levels - 1) -> (..., levels)."""
        cdf = (log_w.exp().unsqueeze(-1) * cdf_m).sum(-2)  # (..., levels-1)
        full = F.pad(F.pad(cdf, (1, 0), value=0.0), (0, 1), value=1.0)  # CDF at every edge, -inf .. +inf
        return torch.clamp(full[..., 1:] - full[..., :-1], min=0.0)

    def bin_probs(self, log_w: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
        """Every level's probability from mixture parameters (..., P, M) -> (..., P, levels)."""
        return self.mixed_bins(log_w, self.component_cdfs(mean, log_scale))

    def _pixel_probs(
        self, log_w: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor, coef: torch.Tensor | None
    ) -> torch.Tensor:
        """Per-level probabilities of a pixel's channels in turn, (..., M), (..., C, M), (..., C, M),
        (..., pairs, M) -> (..., C, levels): channel c given z and, in each component, the expected values
        of the earlier channels under that component (exact for the first channel; for grey, the mixture)."""
        if coef is None:
            return self.bin_probs(log_w.unsqueeze(-2), mean, log_scale)
        step = 2.0 / (self.levels - 1)
        expected: list[torch.Tensor] = []  # E[v_c'] under each component, (..., M)
        out, k = [], 0
        for ch in range(self.channels):
            mu = mean[..., ch, :]
            for prev in range(ch):
                mu = mu + coef[..., k, :] * expected[prev]
                k += 1
            cdf_m = self.component_cdfs(mu, log_scale[..., ch, :])  # (..., M, levels-1)
            out.append(self.mixed_bins(log_w, cdf_m))
            expected.append(1.0 - step * cdf_m.sum(-1))  # sum_l v_l p_l = v_top - step sum_edges CDF
        return torch.stack(out, dim=-2)

    def probs(self, z: torch.Tensor) -> torch.Tensor:
        """Per-value probabilities of every level given z. Under the rows context a pixel's distribution
        depends on the rows above; these are its distribution given z and the *expected* values of those
        rows, generated row by row (a mean rollout): exact for the first row, and what the mean image
        follows; per-pixel draws from them lack the texture the context would give a true sample. A colour
        pixel's channels are rolled out alike (see `_pixel_probs`)."""
        logit, mean, log_scale, coef = self._pixel_mixture(self.features(z))  # (..., P, [C | pairs,] M)
        log_w = F.log_softmax(logit, dim=-1)
        lead = z.shape[:-1]
        if not self.context:
            return self._pixel_probs(log_w, mean, log_scale, coef).reshape(lead + (self.dim, self.levels))
        assert self.shape is not None
        h, w, c = self.shape
        m = self.components
        log_w = log_w.reshape(-1, h, w, m)
        mean, log_scale = (t.reshape(-1, h, w, c, m) for t in (mean, log_scale))
        coef = coef.reshape(-1, h, w, self.pairs, m) if coef is not None else None
        values = torch.arange(self.levels, dtype=mean.dtype) * (2.0 / (self.levels - 1)) - 1.0  # v of each level
        rows: list[torch.Tensor] = []  # per-level probabilities of each finished row, (N, W, C, levels)
        expected: list[torch.Tensor] = []  # E[v] of each finished row, (N, W, C)
        # a row not generated yet (no tap of row r reaches it); zeros_like would trace to the export's batch size
        pending = 0.0 * mean[:, 0, :, :, 0]
        for r in range(h):
            so_far = torch.stack(expected + [pending] * (h - r), dim=1)  # (N, H, W, C)
            shift = self.context_shift(so_far)[:, :, r].permute(1, 2, 3, 0)  # row r's shift, (N, W, C, M)
            p_r = self._pixel_probs(
                log_w[:, r], mean[:, r] + shift, log_scale[:, r], coef[:, r] if coef is not None else None
            )  # (N, W, C, levels)
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


def _sum_in_order(terms: list[torch.Tensor]) -> torch.Tensor:
    """terms[0] + terms[1] + ..., left to right: one term is itself, so a one-layer model's log weights stay bit
    for bit what they were before latent layers."""
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


class LatentLayer(nn.Module):
    """One stochastic layer below the top of a ladder VAE (Sønderby et al. 2016): the conditional prior
    p(z_l | z_l+1), a diagonal Gaussian from a small network of the layer above, and the posterior
    q(z_l | x, z_l+1), the precision-weighted product of that prior and the encoder's bottom-up Gaussian for
    the layer (no weights of its own). The network's last layer starts at zero, so the prior starts as
    N(0, I) and a deep stack starts where a one-layer model does (as VDVAE's blocks)."""

    def __init__(self, latent: int, width: int):
        super().__init__()
        self.net = mlp([latent, width, width, 2 * latent], 0.0)
        last = self.net[-1]
        assert isinstance(last, nn.Linear)
        with torch.no_grad():
            last.weight.zero_()
            last.bias.zero_()

    def prior(self, z_above: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, log_var) of p(z_l | z_above), each shaped like z_above (..., L)."""
        mu, log_var = self.net(z_above).chunk(2, dim=-1)
        return mu, log_var

    @staticmethod
    def posterior(
        bottom_up: tuple[torch.Tensor, torch.Tensor], prior: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """N(mu_h, v_h) N(mu_p, v_p) normalised: 1/v = 1/v_h + 1/v_p and mu = v (mu_h/v_h + mu_p/v_p), written as
        v = v_h sigmoid(log v_p - log v_h), mu = w mu_h + (1 - w) mu_p with w = sigmoid(log v_p - log v_h):
        no exp of a log-variance, so no overflow, and every op exports."""
        (mu_h, lv_h), (mu_p, lv_p) = bottom_up, prior
        gap = lv_p - lv_h
        w = torch.sigmoid(gap)
        return w * mu_h + (1.0 - w) * mu_p, lv_h + log_sigmoid(gap)


class VAE(nn.Module):
    """Encoder, decoder and prior of one configuration; `cfg` must be resolved (no "auto" left).

    `shape` is the image's (H, W, C) (an (H, W) means grey); the convolutional networks and the rows
    context need it, the fully connected networks of a grey model do not.
    """

    def __init__(self, cfg: TrainConfig, dim: int, levels: int, shape: Sequence[int] | None = None):
        super().__init__()
        self.cfg, self.dim, self.levels = cfg, dim, levels
        if (
            cfg.likelihood not in DECODERS
            or cfg.context == "auto"
            or cfg.dropout is None
            or cfg.iw_train is None
            or cfg.arch not in TRUNKS
            or cfg.latent_dim is None
        ):
            raise ValueError(f"likelihood {cfg.likelihood!r} is not resolved; call TrainConfig.resolve first")
        if cfg.likelihood == "bernoulli" and levels != 2:
            raise ValueError(f"the bernoulli likelihood needs 2 grey levels, the data has {levels}")
        self.shape = image_shape(dim, shape)
        self.encoder = Encoder(cfg, dim, levels, shape)
        if cfg.context == "rows" and cfg.likelihood != "logistic_mixture":
            raise ValueError(f"the rows context needs the logistic_mixture likelihood, not {cfg.likelihood!r}")
        self.decoder = DECODERS[cfg.likelihood](cfg, dim, levels, shape)
        if cfg.prior == "standard":
            self.prior: Prior = StandardGaussianPrior(cfg.latent_dim)
        elif cfg.prior == "mog":
            self.prior = MixtureOfGaussiansPrior(cfg.latent_dim, cfg.components)
        else:
            self.prior = VampPrior(self.encoder, dim, cfg.components)
        # the layers below the top, bottom first: layer i's prior reads layer i + 1's z
        width = max(64, 4 * cfg.latent_dim)
        self.layers = nn.ModuleList([LatentLayer(cfg.latent_dim, width) for _ in range(cfg.latent_layers - 1)])

    @property
    def latent_dim(self) -> int:
        """L: the size of each latent layer; the encoder and decoder graphs' z is the top layer's."""
        assert self.cfg.latent_dim is not None
        return self.cfg.latent_dim

    @property
    def noise_dim(self) -> int:
        """The importance noise's width: L per latent layer, the top layer's first (eps (K, B, layers x L))."""
        return self.latent_dim * self.cfg.latent_layers

    def log_weights(self, x: torch.Tensor, eps: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
        """log p(x|z) + beta (log p(z) - log q(z|x)) for z = mu + sigma * eps.

        x (B, D) int64, eps (K, B, layers x L) standard normal -> (K, B). beta=1 gives the log importance
        weights whose log-mean-exp over K is the IWAE bound and whose mean is the ELBO.
        """
        z, log_prior_ratio = self.latent_terms(x, eps)
        return self.decoder.log_prob(x, z) + beta * log_prior_ratio

    def latent_terms(
        self,
        x: torch.Tensor,
        eps: torch.Tensor,
        from_prior: int = 0,
        ladder: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The bottom layer's z (K, B, L), drawn top-down from the posterior of x (B, D) with noise eps
        (K, B, layers x L, the top layer's first), and log p(z) - log q(z|x) over every layer (K, B).

        `from_prior` = k draws the bottom k layers from their conditional priors instead (Havtorn et al.'s
        L>k): their log p - log q cancel exactly, so they add nothing to the ratio. A count fixed when a
        graph is traced, so each exported graph has no control flow. `ladder`: the encoder's output for x,
        when another pass already has it.
        """
        z, terms = self.top_down(x, eps, from_prior, ladder)
        return z, _sum_in_order(terms)

    def top_down(
        self,
        x: torch.Tensor,
        eps: torch.Tensor,
        from_prior: int = 0,
        ladder: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`latent_terms` before the sum: the bottom layer's z and each posterior layer's log p - log q (K, B),
        the top layer's first (the layers drawn from their priors give none)."""
        ladder = ladder if ladder is not None else self.encoder.ladder(x)
        noise = eps.chunk(len(ladder), dim=-1)  # top layer first
        mu, log_var = ladder[-1]  # (B, L)
        z = mu + torch.exp(0.5 * log_var) * noise[0]
        terms = [self.prior.log_prob(z) - diag_gaussian_log_prob(z, mu, log_var)]
        for i in reversed(range(len(self.layers))):  # layer i, from the one below the top down to the bottom (0)
            prior = self.layers[i].prior(z)
            if i < from_prior:
                z = prior[0] + torch.exp(0.5 * prior[1]) * noise[len(ladder) - 1 - i]
                continue
            mu, log_var = LatentLayer.posterior(ladder[i], prior)
            z = mu + torch.exp(0.5 * log_var) * noise[len(ladder) - 1 - i]
            terms.append(diag_gaussian_log_prob(z, *prior) - diag_gaussian_log_prob(z, mu, log_var))
        return z, terms

    def training_terms(
        self, x: torch.Tensor, eps: torch.Tensor, beta: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`log_weights`, and the free-bits correction to add to the loss (None without free bits): beta times
        the sum over latent layers of max(0, free_bits - KL_l), KL_l the batch's mean log q - log p of layer l.
        Below free_bits nats a layer's KL then has no gradient (Kingma et al. 2016's max(free_bits, KL_l))."""
        free = self.cfg.free_bits or 0.0
        if free <= 0:
            return self.log_weights(x, eps, beta), None
        z, terms = self.top_down(x, eps)
        shortfall = sum(F.relu(free + term.mean()) for term in terms)
        return self.decoder.log_prob(x, z) + beta * _sum_in_order(terms), beta * torch.as_tensor(shortfall)

    def llr_terms(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The log importance weights (K, B) of the full model and of L>k (the bottom `cfg.llr_k` layers from
        their conditional priors), with the same noise: LLR>k = log p(x) - log p>k(x) (Havtorn et al. 2021)."""
        ladder = self.encoder.ladder(x)  # the bottom-up pass, once for both top-down passes
        z, ratio = self.latent_terms(x, eps, ladder=ladder)
        z_k, ratio_k = self.latent_terms(x, eps, from_prior=self.cfg.llr_k, ladder=ladder)
        return self.decoder.log_prob(x, z) + ratio, self.decoder.log_prob(x, z_k) + ratio_k

    def top_down_mean(self, z_top: torch.Tensor) -> torch.Tensor:
        """The bottom layer's z for a top layer's z (..., L), each layer below at its conditional prior's mean."""
        z = z_top
        for layer in reversed(self.layers):
            z = layer.prior(z)[0]
        return z

    def probs(self, z_top: torch.Tensor) -> torch.Tensor:
        """Per-value probabilities of every level (..., D, levels) for a top layer's z (..., L): the decoder graph."""
        return self.decoder.probs(self.top_down_mean(z_top))

    def pixel_terms(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The log importance weights (K, B) and, per sample, each pixel's log p(x_p|z, ...) with its channels
        summed (K, B, H*W): the numbers an anomaly map is made of; the pixels sum to log p(x|z)."""
        z, log_prior_ratio = self.latent_terms(x, eps)
        per_value = self.decoder.pixel_log_probs(x, z)  # (K, B, D), channel fastest
        c = self.decoder.channels
        # unflatten, not reshape(shape[:-1] + ...): the traced graph would keep the example's K and batch
        pixels = per_value.unflatten(-1, (-1, c)).sum(-1) if c > 1 else per_value
        return pixels.sum(-1) + log_prior_ratio, pixels

    def loss(self, x: torch.Tensor, k: int, beta: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean over the batch of -log mean_k exp(log_w): the negative (beta-)ELBO for k=1, IWAE for k>1."""
        eps = torch.randn(k, x.shape[0], self.noise_dim, generator=generator)
        log_w = self.log_weights(x, eps, beta)
        return -(torch.logsumexp(log_w, dim=0) - math.log(k)).mean()

    def frozen_prior(self) -> FixedMixturePrior:
        with torch.no_grad():
            return FixedMixturePrior(*self.prior.mixture())

    def low_precision_span(self) -> LowPrecisionSpan | None:
        """The part of log_weights that may run at reduced precision (state-dict names): the decoder network
        after its first layer, nearly all of a sample's arithmetic; None when there is no such part."""
        span = self.decoder.low_precision_span()
        return LowPrecisionSpan(f"decoder.{span.start}", f"decoder.{span.end}") if span else None


def parameter_count(cfg: TrainConfig, dim: int, levels: int, shape: Sequence[int] | None = None) -> int:
    """Parameters of the model a resolved config builds, counted without allocating them."""
    with torch.device("meta"):
        return sum(p.numel() for p in VAE(cfg, dim, levels, shape).parameters())

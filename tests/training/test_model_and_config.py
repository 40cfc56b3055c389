import math

import numpy as np
import pytest
import torch
from torch.distributions import Independent, Normal

from training.config import PRESETS, ConfigError, TrainConfig, auto_batch_size, read_config_file
from training.model import (
    VAE,
    LogisticMixtureDecoder,
    diag_gaussian_log_prob,
    log1mexp,
    log_bin_width,
    logsumexp_first,
    mixture_log_prob,
)


def resolved(levels=17, n_train=1000, **kw):
    return TrainConfig(**kw).resolve(levels, n_train)


def test_config_json_round_trip(tmp_path):
    cfg = TrainConfig(prior="vamp", components=7, image_size=[4, 4], beta=0.5, max_minutes=1.5)
    cfg.save(tmp_path / "c.json")
    assert TrainConfig.load(tmp_path / "c.json") == cfg


def test_config_rejects_bad_values(tmp_path):
    with pytest.raises(ConfigError, match="prior"):
        TrainConfig(prior="flow")
    with pytest.raises(ConfigError, match="bernoulli"):
        TrainConfig(likelihood="bernoulli", levels=17)
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        TrainConfig(batch_size=0)
    with pytest.raises(ConfigError, match="latent_dim must be a positive integer"):
        TrainConfig(latent_dim=True)  # a bool is not a number of dimensions
    (tmp_path / "bad.json").write_text('{"hiden": 3}')
    with pytest.raises(ConfigError, match="unknown keys: hiden"):
        read_config_file(tmp_path / "bad.json")


def test_seed_preset_is_the_seed_setup():
    seed = TrainConfig.from_dict(PRESETS["seed"])
    assert (seed.hidden, seed.latent_dim, seed.prior, seed.likelihood) == (256, 16, "standard", "categorical")
    assert (seed.lr, seed.batch_size, seed.patience, seed.iw_train, seed.input_scale) == (1e-3, 64, 20, 1, "raw")


def test_defaults_have_no_clock_and_scale_inputs():
    cfg = TrainConfig()
    assert cfg.max_minutes is None and cfg.input_scale == "unit"


def test_auto_choices_follow_the_data():
    assert resolved(levels=2).likelihood == "bernoulli"
    assert resolved(levels=3).likelihood == "categorical"
    assert resolved(levels=4).likelihood == "logistic_mixture"  # the ordinal mixture wins from 4 levels on
    assert resolved(levels=17).likelihood == "logistic_mixture"
    assert resolved(levels=256).likelihood == "logistic_mixture"
    assert resolved(levels=256, likelihood="categorical").likelihood == "categorical"  # a flag overrides
    # the rows context: on for logistic mixtures from 64 levels (8-bit images), off below and for other families
    assert [resolved(levels=lv).context for lv in (2, 17, 63, 64, 256)] == ["none", "none", "none", "rows", "rows"]
    assert resolved(levels=256, likelihood="categorical").context == "none"
    assert resolved(levels=256, context="none").context == "none"
    assert resolved(levels=17, context="rows").context == "rows"
    with pytest.raises(ConfigError, match="logistic_mixture"):
        TrainConfig(context="rows", likelihood="categorical")
    with pytest.raises(ConfigError, match="logistic_mixture"):
        resolved(levels=2, context="rows")  # auto picks bernoulli for 2 levels
    with pytest.raises(ConfigError, match="binary"):
        resolved(levels=17, likelihood="bernoulli")
    assert [auto_batch_size(n) for n in (300, 1000, 12000, 48000, 10**6)] == [64, 64, 64, 256, 256]
    cfg = resolved(n_train=1000, max_steps=1600)  # 16 steps an epoch
    assert (cfg.batch_size, cfg.epochs) == (64, 100)
    assert resolved(n_train=1000, epochs=7).epochs == 7  # an explicit cap wins


def test_log_densities_match_torch_distributions():
    g = torch.Generator().manual_seed(0)
    z, mu, lv = (torch.randn(5, 3, generator=g) for _ in range(3))
    expected = Independent(Normal(mu, torch.exp(0.5 * lv)), 1).log_prob(z)
    torch.testing.assert_close(diag_gaussian_log_prob(z, mu, lv), expected)
    w = torch.log_softmax(torch.randn(4, generator=g), 0)
    means, lvs = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    manual = torch.logsumexp(torch.stack([w[c] + diag_gaussian_log_prob(z, means[c], lvs[c]) for c in range(4)]), 0)
    torch.testing.assert_close(mixture_log_prob(z, w, means, lvs), manual)


@pytest.mark.parametrize("prior", ["standard", "mog", "vamp"])
@pytest.mark.parametrize(
    "likelihood,levels", [("categorical", 17), ("bernoulli", 2), ("logistic_mixture", 17), ("logistic_mixture", 256)]
)
def test_vae_shapes_and_frozen_prior(prior, likelihood, levels):
    torch.manual_seed(0)
    # pixel-independent p(x|z) at every level count here (the rows context has its own tests below)
    cfg = resolved(
        levels=levels, prior=prior, likelihood=likelihood, context="none", components=5, hidden=16, latent_dim=3
    )
    vae = VAE(cfg, dim=10, levels=levels).eval()
    x = torch.randint(0, levels, (4, 10))
    x[0, :2] = torch.tensor([0, levels - 1])  # the open edge bins
    eps = torch.randn(6, 4, 3)
    log_w = vae.log_weights(x, eps)
    assert log_w.shape == (6, 4) and torch.all(torch.isfinite(log_w))
    probs = vae.decoder.probs(torch.randn(4, 3))
    assert probs.shape == (4, 10, levels)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4, 10))
    # the frozen Gaussian mixture (what the manifest and the exported graph hold) is the same prior
    z = torch.randn(7, 3)
    torch.testing.assert_close(vae.frozen_prior().log_prob(z), vae.prior.log_prob(z))
    # the decoder's log_prob is the log of its probs at x
    z1 = torch.randn(4, 3)
    via_probs = torch.log(torch.gather(vae.decoder.probs(z1), -1, x.unsqueeze(-1)).squeeze(-1)).sum(-1)
    torch.testing.assert_close(vae.decoder.log_prob(x, z1), via_probs, atol=2e-3, rtol=1e-5)


def _mixture_decoder(levels: int, seed: int = 0) -> tuple[LogisticMixtureDecoder, torch.Tensor]:
    torch.manual_seed(seed)
    cfg = resolved(
        levels=levels, likelihood="logistic_mixture", context="none", logistic_components=3, hidden=8, latent_dim=2
    )
    dec = LogisticMixtureDecoder(cfg, dim=5, levels=levels).eval()
    with torch.no_grad():  # spread the scales: sharp and wide components, means on and off [-1, 1]
        dec.net[-1].weight.mul_(3.0)
    return dec, torch.randn(3, 2)


@pytest.mark.parametrize("exporting", [False, True])
def test_the_log_bin_width_is_accurate_from_tiny_to_wide_bins(monkeypatch, exporting):
    """log(1 - exp(-w)) for w = 2 half / s from 1e-9 (a bin far narrower than the scale) to 80: training's
    log1mexp (two sides of a switch at w = 0.01) and the export's branch-free tanh form."""
    w = np.concatenate([np.logspace(-9, math.log10(80.0), 400), [0.0099, 0.01, 0.0101]])
    half = 1.0 / 16
    log_scale = torch.tensor(np.log(2 * half / w), dtype=torch.float32)
    if exporting:
        monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    got = log_bin_width(half, log_scale, torch.exp(-log_scale)).double().numpy()
    want = np.log(-np.expm1(-w))
    # float32's own rounding of the result (~1e-7 relative), nothing from a series or a cancellation
    assert np.all(np.abs(got - want) < 1e-6 * np.maximum(1.0, np.abs(want)))
    assert log1mexp(torch.tensor([-3.0])).item() == pytest.approx(math.log(-math.expm1(-math.exp(-3.0))), rel=1e-6)


@pytest.mark.parametrize("m", [1, 2, 3])
def test_exported_logsumexp_fold_matches_torch(monkeypatch, m):
    t = torch.randn(m, 5, 7) * 30
    t[0, 0, 0] = -1e30  # a component with (almost) no mass, as the open edge bins give
    want = torch.logsumexp(t, dim=0)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    assert torch.allclose(logsumexp_first(t), want, rtol=1e-6, atol=1e-5)


def test_logistic_mixture_bins_sum_to_one_over_256_levels():
    dec, z = _mixture_decoder(256)
    x_all = torch.arange(256).view(256, 1, 1).expand(256, 3, 5)  # every level at every pixel
    with torch.no_grad():
        per_pixel = torch.stack([dec.pixel_log_probs(x_all[lv], z) for lv in range(256)])  # (256, 3, 5)
    total = per_pixel.double().exp().sum(0)
    np.testing.assert_allclose(total.numpy(), 1.0, atol=1e-5)


def test_logistic_mixture_matches_numerical_integration():
    """Each bin's probability is the integral of the mixture's density over the bin (open at the edges)."""
    from scipy import integrate
    from scipy.special import expit

    levels = 256
    dec, z = _mixture_decoder(levels, seed=1)
    with torch.no_grad():
        log_w, mean, log_scale = (t.double().numpy() for t in dec.params(z[:1]))
        probs = dec.probs(z[:1]).double().numpy()[0]  # (D, levels)
    w, mu, s = np.exp(log_w[0, 0]), mean[0, 0], np.exp(log_scale[0, 0])  # pixel 0: (M,)

    def density(v: float) -> float:
        t = (v - mu) / s
        return float(np.sum(w * expit(t) * expit(-t) / s))

    half = 1.0 / (levels - 1)
    far = 60.0 * s.max() + np.abs(mu).max() + 2.0  # beyond this the mixture's tails hold < 1e-20
    rng = np.random.default_rng(0)
    for level in [0, 1, 2, 127, 128, 254, 255] + list(rng.integers(0, levels, 8)):
        v = 2 * level * half - 1
        lo = -far if level == 0 else v - half
        hi = far if level == levels - 1 else v + half
        points = [p for p in mu if lo < p < hi] or None
        expected, _ = integrate.quad(density, lo, hi, points=points, epsabs=1e-13, epsrel=1e-10, limit=500)
        assert abs(probs[0, level] - expected) < 1e-6 + 1e-4 * expected, (level, probs[0, level], expected)
        x = torch.full((1, dec.dim), int(level))
        with torch.no_grad():
            lp = dec.pixel_log_probs(x, z[:1])[0, 0].item()
        assert abs(math.exp(lp) - expected) < 1e-6 + 1e-4 * expected, (level, math.exp(lp), expected)


def test_loss_is_negative_elbo_for_k1_and_iwae_for_k():
    torch.manual_seed(0)
    vae = VAE(resolved(hidden=16, latent_dim=3), dim=10, levels=17).eval()
    x = torch.randint(0, 17, (4, 10))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    eps = torch.randn(5, 4, 3, generator=g2)
    expected = -(torch.logsumexp(vae.log_weights(x, eps), 0) - math.log(5)).mean()
    torch.testing.assert_close(vae.loss(x, 5, 1.0, g1), expected)


def test_unresolved_config_is_refused():
    with pytest.raises(ValueError, match="resolve"):
        VAE(TrainConfig(), dim=10, levels=17)


def test_the_matrix_product_prior_is_used_only_where_it_is_exact():
    """The expanded square cancels in fp32 for narrow components far from the origin: that prior keeps the
    elementwise form; a benign one gets the matrix products, equal to the elementwise form."""
    from training.model import FixedMixturePrior, mixture_log_prob

    gen = torch.Generator().manual_seed(0)
    benign = FixedMixturePrior(
        torch.log_softmax(torch.randn(8, generator=gen), 0),
        torch.randn(8, 4, generator=gen),
        0.3 * torch.randn(8, 4, generator=gen),
    )
    narrow = FixedMixturePrior(torch.zeros(2) - math.log(2), torch.full((2, 4), 30.0), torch.full((2, 4), -9.0))
    assert benign.matmul_is_exact() and not narrow.matmul_is_exact()
    z = 2.0 * torch.randn(1000, 4, generator=gen)
    exact = mixture_log_prob(z.double(), *(t.double() for t in benign.mixture()))
    fast = mixture_log_prob(z, *benign.mixture(), as_matmul=True)
    assert (fast.double() - exact).abs().max() < 1e-4


def _rows_decoder(levels: int, shape: tuple[int, int], seed: int = 0) -> tuple[LogisticMixtureDecoder, torch.Tensor]:
    """A rows-context decoder with strong context weights of both signs (an untrained one has all zeros)."""
    torch.manual_seed(seed)
    cfg = resolved(levels=levels, context="rows", logistic_components=2, hidden=8, latent_dim=2)
    dec = LogisticMixtureDecoder(cfg, dim=shape[0] * shape[1], levels=levels, shape=shape).eval()
    with torch.no_grad():
        dec.context_weights.normal_(0.0, 1.5)
    return dec, torch.randn(3, 2)


def test_rows_context_is_a_normalised_likelihood_over_whole_images():
    """Every one of the 4^6 images of a 3x2, 4-level model: their probabilities sum to 1 for each z. A context
    that looked at a pixel of its own row or below would break this (the product would not be normalised)."""
    import itertools

    dec, z = _rows_decoder(4, (3, 2))
    images = torch.tensor(list(itertools.product(range(4), repeat=6)))  # (4096, 6)
    with torch.no_grad():
        for zi in z:
            total = dec.log_prob(images, zi.expand(len(images), 2)).double().exp().sum()
            assert abs(total.item() - 1.0) < 1e-5


def test_rows_context_sums_to_one_over_256_levels_and_sees_only_the_rows_above():
    dec, z = _rows_decoder(256, (4, 5))
    x = torch.randint(0, 256, (3, 20))
    with torch.no_grad():
        # the last row's pixels condition on the rows above only: set all of them to each level in turn
        per_level = []
        for lv in range(256):
            xl = x.clone()
            xl[:, 15:] = lv
            per_level.append(dec.pixel_log_probs(xl, z)[:, 15:])
        np.testing.assert_allclose(torch.stack(per_level).double().exp().sum(0).numpy(), 1.0, atol=1e-5)
        # changing pixel (1, 2) changes its own term and those of the pixels whose taps reach it, nothing else
        x2 = x.clone()
        x2[:, 7] = (x2[:, 7] + 128) % 256
        changed = (dec.pixel_log_probs(x2, z) - dec.pixel_log_probs(x, z)).abs().amax(0) > 0  # (20,)
        expected = torch.zeros(4, 5, dtype=torch.bool)
        expected[1, 2] = True  # the pixel itself
        expected[2, 1:4] = True  # taps (-1, +1), (-1, 0), (-1, -1) of the row below
        expected[3, 2] = True  # tap (-2, 0)
        assert torch.equal(changed.view(4, 5), expected)


def test_rows_context_decoder_probs_are_the_mean_rollout():
    """probs(z): the first row as without context; each later row given z and the expected values of the
    rows above, which is what log_prob gives for an image whose rows above hold those (real) values."""
    dec, z = _rows_decoder(17, (3, 4))
    with torch.no_grad():
        probs = dec.probs(z)  # (3, 12, 17)
        torch.testing.assert_close(probs.sum(-1), torch.ones(3, 12))
        plain = dec.bin_probs(*dec.params(z))
        torch.testing.assert_close(probs[:, :4], plain[:, :4])  # row 0 has no context
        assert (probs[:, 4:] - plain[:, 4:]).abs().max() > 1e-3  # later rows do
        # the rollout's row 1 at each level: log_prob's row 1 for an image whose row 0 is at E[v] exactly
        values = torch.linspace(-1.0, 1.0, 17)
        expected_row0 = probs[:, :4] @ values  # (3, 4) on [-1, 1]
        shift = dec.context_shift(torch.cat([expected_row0.unsqueeze(1), torch.zeros(3, 2, 4)], 1))  # (M, 3, 3, 4)
        log_w, mean, log_scale = dec.params(z)
        row1 = dec.bin_probs(log_w[:, 4:8], mean[:, 4:8] + shift[:, :, 1].permute(1, 2, 0), log_scale[:, 4:8])
        torch.testing.assert_close(probs[:, 4:8], row1)


def test_rows_context_needs_the_image_shape():
    cfg = resolved(levels=256, hidden=8, latent_dim=2)
    with pytest.raises(ValueError, match="H, W"):
        VAE(cfg, dim=20, levels=256)
    with pytest.raises(ValueError, match="H, W"):
        VAE(cfg, dim=20, levels=256, shape=(4, 4))
    assert VAE(cfg, dim=20, levels=256, shape=(4, 5)).decoder.context

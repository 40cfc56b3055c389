import math

import pytest
import torch
from torch.distributions import Independent, Normal

from training.config import PRESETS, ConfigError, TrainConfig, read_config_file
from training.model import VAE, diag_gaussian_log_prob, mixture_log_prob


def test_config_json_round_trip(tmp_path):
    cfg = TrainConfig(prior="vamp", components=7, image_size=[4, 4], beta=0.5, max_minutes=1.5)
    cfg.save(tmp_path / "c.json")
    assert TrainConfig.load(tmp_path / "c.json") == cfg


def test_config_rejects_bad_values(tmp_path):
    with pytest.raises(ConfigError, match="prior"):
        TrainConfig(prior="flow")
    with pytest.raises(ConfigError, match="bernoulli"):
        TrainConfig(likelihood="bernoulli", levels=17)
    (tmp_path / "bad.json").write_text('{"hiden": 3}')
    with pytest.raises(ConfigError, match="unknown keys: hiden"):
        read_config_file(tmp_path / "bad.json")


def test_seed_preset_is_the_seed_setup():
    seed = TrainConfig.from_dict(PRESETS["seed"])
    assert (seed.hidden, seed.latent_dim, seed.prior, seed.likelihood) == (256, 16, "standard", "categorical")
    assert (seed.lr, seed.batch_size, seed.patience, seed.iw_train) == (1e-3, 64, 20, 1)


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
@pytest.mark.parametrize("likelihood,levels", [("categorical", 17), ("bernoulli", 2)])
def test_vae_shapes_and_frozen_prior(prior, likelihood, levels):
    torch.manual_seed(0)
    cfg = TrainConfig(
        prior=prior,
        likelihood=likelihood,
        components=5,
        hidden=16,
        latent_dim=3,
        levels=levels if likelihood == "bernoulli" else None,
    )
    vae = VAE(cfg, dim=10, levels=levels).eval()
    x = torch.randint(0, levels, (4, 10))
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
    torch.testing.assert_close(vae.decoder.log_prob(x, z1), via_probs, atol=1e-4, rtol=1e-5)


def test_loss_is_negative_elbo_for_k1_and_iwae_for_k():
    torch.manual_seed(0)
    vae = VAE(TrainConfig(hidden=16, latent_dim=3), dim=10, levels=17).eval()
    x = torch.randint(0, 17, (4, 10))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    eps = torch.randn(5, 4, 3, generator=g2)
    expected = -(torch.logsumexp(vae.log_weights(x, eps), 0) - math.log(5)).mean()
    torch.testing.assert_close(vae.loss(x, 5, 1.0, g1), expected)

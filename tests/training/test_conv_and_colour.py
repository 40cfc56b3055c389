"""Convolutional networks and colour likelihoods: shapes for any H x W x C, normalised colour mixtures, the
channel coupling and the rows context over channels, export parity, and grey MLP models left as they were."""

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from training.config import ConfigError, TrainConfig, auto_conv_widths
from training.model import (
    VAE,
    ConvDecoderNet,
    ConvEncoderNet,
    LogisticMixtureDecoder,
    MLPDecoderNet,
    image_shape,
    parameter_count,
)

TINY_CONV = dict(arch="conv", conv_widths=[4, 8, 8], conv_blocks=1, latent_dim=3)


def tiny(shape, levels=256, n_train=100, **kw) -> VAE:
    torch.manual_seed(0)
    cfg = TrainConfig(**{**TINY_CONV, **kw}).resolve(levels, n_train, shape)
    return VAE(cfg, math.prod(shape), levels, shape).eval()


def perturbed(vae: VAE, scale: float = 0.2, seed: int = 1) -> VAE:
    """Nonzero everywhere: an untrained model's zero-initialised convolutions and context weights would hide
    the paths they gate."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vae.decoder.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return vae


# --- shapes ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(16, 16, 1), (28, 28, 1), (32, 32, 3), (31, 17, 3)])
@pytest.mark.parametrize("likelihood", ["logistic_mixture", "categorical"])
def test_conv_networks_take_any_image_size(shape, likelihood):
    """Odd sizes are padded to the networks' multiple and cropped back; K stays a batch axis of its own."""
    levels = 256 if likelihood == "logistic_mixture" else 3
    vae = perturbed(tiny(shape, levels, likelihood=likelihood))
    h, w, c = shape
    d = h * w * c
    assert isinstance(vae.encoder.net, ConvEncoderNet) and isinstance(vae.decoder.net, ConvDecoderNet)
    x = torch.randint(0, levels, (2, d), generator=torch.Generator().manual_seed(0))
    eps = torch.randn(5, 2, 3)
    with torch.no_grad():
        mu, log_var = vae.encoder(x)
        assert mu.shape == log_var.shape == (2, 3)
        g, q = vae.decoder.parameter_shape()
        assert vae.decoder.features(eps).shape == (5, 2, d, g, q)
        log_w = vae.log_weights(x, eps)
        assert log_w.shape == (5, 2) and torch.all(torch.isfinite(log_w))
        assert vae.decoder.pixel_log_probs(x, eps).shape == (5, 2, d)
        probs = vae.decoder.probs(mu)
        assert probs.shape == (2, d, levels)
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, d))
        # the K samples folded into the convolutions' batch: each sample as if decoded alone
        alone = torch.stack([vae.decoder.log_prob(x, eps[k]) for k in range(5)])
        torch.testing.assert_close(vae.decoder.log_prob(x, eps), alone, rtol=1e-5, atol=1e-3)


def test_padding_reaches_the_networks_multiple_and_is_cropped_back():
    vae = tiny((31, 17, 3))  # three resolutions: a multiple of 4
    assert vae.encoder.net.pad == (1, 3)  # 31 x 17 -> 32 x 20 -> 16 x 10 -> 8 x 5
    assert vae.decoder.net.coarse == (8, 8, 5)
    # the decoder's parameters of pixel (r, c) depend on z only: a crop, not a reshuffle of the padded map
    with torch.no_grad():
        p = vae.decoder.net(torch.randn(2, 3))
    assert p.shape == (2, 31 * 17 * 3, *vae.decoder.parameter_shape())


def test_grey_images_may_come_as_h_w_or_h_w_1():
    assert image_shape(64, (8, 8)) == image_shape(64, (8, 8, 1)) == (8, 8, 1)
    assert image_shape(12, [2, 2, 3]) == (2, 2, 3)
    with pytest.raises(ValueError, match="H, W"):
        image_shape(64, (8, 8, 3))
    a, b = tiny((16, 16)), tiny((16, 16, 1))
    assert all(torch.equal(s, t) for s, t in zip(a.state_dict().values(), b.state_dict().values()))


def test_parameter_count_on_the_meta_device_covers_conv_models():
    for shape in [(16, 16, 1), (31, 17, 3), (64, 64, 3)]:
        cfg = TrainConfig().resolve(256, 5000, shape)
        assert cfg.arch == "conv"
        n = parameter_count(cfg, math.prod(shape), 256, shape)
        assert n == sum(p.numel() for p in VAE(cfg, math.prod(shape), 256, shape).parameters())
    from training.pipeline import check_model_size

    big = TrainConfig(conv_widths=[512, 1024, 2048]).resolve(256, 5000, (64, 64, 3))
    with pytest.raises(ConfigError, match=r"M parameters = \d+ MB"):  # refused before training, in MB
        check_model_size(big, 64 * 64 * 3, 256, (64, 64, 3))


# --- config ------------------------------------------------------------------------------------------------
def test_arch_auto_picks_conv_from_16_pixels_up():
    assert TrainConfig().resolve(17, 1000, (8, 8)).arch == "mlp"  # the 8x8 digits keep the MLP
    assert TrainConfig().resolve(17, 1000, (8, 8, 1)).arch == "mlp"
    assert TrainConfig().resolve(17, 1000).arch == "mlp"  # no shape given: the mlp, as before the conv networks
    assert TrainConfig().resolve(256, 1000, (15, 64, 3)).arch == "mlp"
    assert TrainConfig().resolve(2, 48000, (28, 28)).arch == "mlp"  # binary images keep the mlp (72.03 nats)
    assert TrainConfig(arch="conv").resolve(2, 48000, (28, 28)).arch == "conv"  # unless asked
    conv = TrainConfig().resolve(256, 1000, (16, 16))
    assert (conv.arch, conv.conv_widths, conv.conv_blocks, conv.latent_dim) == ("conv", [16, 32, 64], 1, 21)
    assert TrainConfig().resolve(256, 48000, (28, 28)).latent_dim == 64  # one latent per 12 values, at most 64
    colour = TrainConfig().resolve(256, 1000, (32, 32, 3))
    assert (colour.conv_widths, colour.latent_dim) == ([16, 32, 64, 64], 64)
    # a conv decoder runs once per importance sample: K=1 and no dropout, where a small data set's mlp gets both
    assert (colour.iw_train, colour.dropout) == (1, 0.0)
    assert (TrainConfig().resolve(17, 1000, (8, 8)).iw_train, TrainConfig().resolve(17, 1000, (8, 8)).dropout) == (
        5,
        0.2,
    )
    assert TrainConfig(iw_train=3, dropout=0.1).resolve(256, 1000, (32, 32, 3)).iw_train == 3  # flags override
    assert (colour.lr, TrainConfig().resolve(17, 1000, (8, 8)).lr) == (2e-3, 1e-3)  # conv learns faster at 2e-3
    assert TrainConfig(lr=5e-4).resolve(256, 1000, (32, 32, 3)).lr == 5e-4
    assert TrainConfig(arch="mlp").resolve(256, 1000, (32, 32, 3)).arch == "mlp"  # a flag overrides
    assert TrainConfig(arch="mlp").resolve(256, 1000, (32, 32, 3)).latent_dim == 16
    assert TrainConfig(latent_dim=8, conv_widths=[8], conv_blocks=0).resolve(256, 1000, (32, 32)).latent_dim == 8
    mlp = TrainConfig().resolve(17, 1000, (8, 8))
    assert mlp.latent_dim == 16 and mlp.conv_widths is None and mlp.conv_blocks is None
    with pytest.raises(ConfigError, match="shape"):
        TrainConfig(arch="conv").resolve(256, 1000)


def test_images_larger_than_any_measured_budget_get_a_note_naming_the_ways_out():
    """Above 64x64 the capped automatic budget gives fewer image passes than 64x64 crops needed: the run says so,
    with the steps it will take and the two flags that help. At 64x64 and below, for the mlp, or when the user
    chose the budget (--max-steps, --epochs), it says nothing."""
    from training.config import large_image_note

    def note(shape, requested=None):
        requested = requested or TrainConfig()
        return large_image_note(requested, requested.resolve(256, 2400, shape), shape)

    assert note((64, 64, 3)) is None and note((28, 28, 1)) is None and note((60, 68, 1)) is None
    big = TrainConfig().resolve(256, 2400, (128, 128, 3))
    text = note((128, 128, 3))
    assert text is not None and big.max_steps == 668
    assert "128x128" in text and "668 steps of 64" in text
    assert "--image-size 64 64" in text and "--max-steps" in text
    assert note((65, 64, 1)) is not None
    assert (
        note((128, 128, 3), TrainConfig(max_steps=5000)) is None and note((128, 128, 3), TrainConfig(epochs=9)) is None
    )
    assert note((128, 128, 3), TrainConfig(arch="mlp")) is None


def test_conv_budgets_follow_the_pixels_a_step_sees():
    """A conv step's cost follows its pixels: the step budget is CONV_PIXEL_BUDGET pixel passes whatever the image
    size (up to twice that from 24,000 training images to 48,000, or from 32x32 images to 64x64), batches stop
    doubling at 128, and the K=1000 evaluation covers 500 images; the mlp keeps its 12,000 steps of up to 256 and
    2000 / 1000 evaluated images. Flags override every one."""
    from training.config import CONV_PIXEL_BUDGET, conv_budget_scale, conv_step_budget

    mnist = TrainConfig().resolve(256, 48_000, (28, 28, 1))  # twice the pixel passes for 48,000 images
    assert (mnist.arch, mnist.batch_size, mnist.max_steps, mnist.epochs) == ("conv", 128, 6976, 19)
    assert conv_step_budget(128, (28, 28), 24_000) == conv_step_budget(128, (28, 28), 100) == 3488
    assert conv_step_budget(128, (28, 28), 36_000) == 5232 and conv_step_budget(128, (28, 28), 10**6) == 6976
    for shape in [(16, 16, 1), (28, 28, 1), (32, 32, 3), (64, 64, 3), (61, 47, 3), (200, 300, 3)]:
        cfg = TrainConfig().resolve(256, 4000, shape)
        seen = cfg.max_steps * cfg.batch_size * shape[0] * shape[1]
        budget = CONV_PIXEL_BUDGET * conv_budget_scale(shape, 4000)
        assert budget <= seen < budget + cfg.batch_size * shape[0] * shape[1]
        assert (cfg.eval_images, cfg.calibration_images) == (500, 500)
    # Large images get up to twice the pixel passes too: sqrt(H x W) / 32, or the set's scale where larger.
    assert conv_budget_scale((32, 32), 4000) == conv_budget_scale((28, 28, 1), 100) == 1.0
    assert conv_budget_scale((48, 48, 3), 100) == 1.5 and conv_budget_scale((64, 64), 4000) == 2.0
    assert conv_budget_scale((48, 48), 42_000) == 1.75 and conv_budget_scale((28, 28), 36_000) == 1.5
    assert conv_budget_scale((128, 128), 10**6) == conv_budget_scale((4096, 4096), 100) == 2.0
    crops64 = TrainConfig().resolve(256, 2400, (64, 64, 1))  # the docs' 64x64 grey crops
    assert (crops64.batch_size, crops64.max_steps, crops64.epochs) == (64, 2671, 71)
    assert conv_step_budget(64, (10**5, 10**5), 4000) == 1
    mlp = TrainConfig().resolve(256, 48_000, (8, 8, 1))
    assert (mlp.batch_size, mlp.max_steps, mlp.eval_images, mlp.calibration_images) == (256, 12_000, 2000, 1000)
    mine = TrainConfig(batch_size=32, max_steps=100, eval_images=0, calibration_images=7).resolve(
        256, 4000, (32, 32, 3)
    )
    assert (mine.batch_size, mine.max_steps, mine.epochs, mine.eval_images, mine.calibration_images) == (
        32,
        100,
        1,
        0,
        7,
    )
    for bad in (dict(max_steps=0), dict(eval_images=-1), dict(calibration_images=1.5)):
        with pytest.raises(ConfigError):
            TrainConfig(**bad)


def test_a_conv_decoder_declares_its_feature_maps_so_scoring_passes_fit_their_memory():
    """28x28 at widths [16, 32, 64]: the full-resolution map (16 x 28 x 28 floats) is the largest, 4 alive at
    once; the manifest carries it (the service sizes its passes with it) and the mlp declares none."""
    from training.export import decoder_spec
    from vae_contract.manifest import DecoderSpec

    conv = tiny((28, 28, 1), conv_widths=[16, 32, 64])
    assert conv.decoder.working_floats == 4 * 16 * 28 * 28
    spec = decoder_spec(conv)
    assert spec["working_floats_per_sample"] == 4 * 16 * 28 * 28
    assert DecoderSpec.model_validate(spec).working_floats_per_sample == 4 * 16 * 28 * 28
    odd = tiny((31, 17, 3), conv_widths=[4, 8, 8])  # padded to 32 x 20 for three resolutions
    assert odd.decoder.working_floats == 4 * max(4 * 32 * 20, 8 * 16 * 10, 8 * 8 * 5)
    mlp = tiny((8, 8, 1), arch="mlp")
    assert mlp.decoder.working_floats == 0 and "working_floats_per_sample" not in decoder_spec(mlp)


def test_auto_conv_widths_follow_the_image_size():
    assert auto_conv_widths(16, 16) == [16, 32, 64]  # 16 -> 8 -> 4
    assert auto_conv_widths(28, 28) == [16, 32, 64]  # 28 -> 14 -> 7
    assert auto_conv_widths(32, 32) == [16, 32, 64, 64]  # 32 -> 16 -> 8 -> 4
    assert auto_conv_widths(64, 64) == [16, 32, 64, 64, 64]  # 64 -> ... -> 4
    assert auto_conv_widths(256, 256) == [16, 32, 64, 64, 64]  # at most five resolutions
    assert auto_conv_widths(31, 17) == [16, 32, 64]


def test_conv_config_is_validated_and_round_trips(tmp_path):
    with pytest.raises(ConfigError, match="arch"):
        TrainConfig(arch="transformer")
    with pytest.raises(ConfigError, match="conv_widths"):
        TrainConfig(conv_widths=[])
    with pytest.raises(ConfigError, match="conv_widths"):
        TrainConfig(conv_widths=[8, 0])
    with pytest.raises(ConfigError, match="conv_blocks"):
        TrainConfig(conv_blocks=-1)
    with pytest.raises(ConfigError, match="latent_dim"):
        TrainConfig(latent_dim=0)
    cfg = TrainConfig(arch="conv", conv_widths=[8, 16], conv_blocks=2)
    cfg.save(tmp_path / "c.json")
    assert TrainConfig.load(tmp_path / "c.json") == cfg
    with pytest.raises(ValueError, match="resolve"):
        VAE(TrainConfig(likelihood="categorical", context="none", dropout=0.0, iw_train=1), 64, 3, (8, 8))


def test_the_cli_has_the_conv_flags():
    from training.cli import build_parser, resolve_config

    args = build_parser().parse_args(["--arch", "conv", "--conv-widths", "8", "16", "32", "--conv-blocks", "2"])
    cfg = resolve_config(args)
    assert (cfg.arch, cfg.conv_widths, cfg.conv_blocks) == ("conv", [8, 16, 32], 2)
    help_text = build_parser().format_help()
    assert "--arch {auto,mlp,conv}" in help_text and "--conv-widths" in help_text


# --- likelihoods -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape,levels,likelihood,context",
    [
        ((4, 3, 3), 256, "logistic_mixture", "rows"),
        ((4, 3, 3), 17, "logistic_mixture", "none"),
        ((4, 3, 1), 256, "logistic_mixture", "rows"),
        ((4, 3, 3), 3, "categorical", "none"),
        ((4, 3, 3), 2, "bernoulli", "none"),
    ],
)
def test_log_prob_is_the_sum_of_pixel_log_probs(shape, levels, likelihood, context):
    vae = perturbed(tiny(shape, levels, arch="mlp", hidden=8, likelihood=likelihood, context=context))
    x = torch.randint(0, levels, (3, math.prod(shape)), generator=torch.Generator().manual_seed(0))
    z = torch.randn(4, 3, 3)
    with torch.no_grad():
        per_value = vae.decoder.pixel_log_probs(x, z)
        assert per_value.shape == (4, 3, math.prod(shape)) and torch.all(per_value <= 1e-6)
        torch.testing.assert_close(vae.decoder.log_prob(x, z), per_value.sum(-1), rtol=1e-6, atol=1e-4)


def _colour_decoder(shape, levels=4, context="none", seed=0) -> tuple[LogisticMixtureDecoder, torch.Tensor]:
    """A colour mixture decoder with strong, signed coupling coefficients and context weights."""
    torch.manual_seed(seed)
    cfg = TrainConfig(
        arch="mlp", likelihood="logistic_mixture", context=context, logistic_components=3, hidden=8, latent_dim=2
    ).resolve(levels, 100)
    dec = LogisticMixtureDecoder(cfg, math.prod(shape), levels, shape).eval()
    with torch.no_grad():
        dec.net[-1].weight.mul_(4.0)
        if context == "rows":
            dec.context_weights.normal_(0.0, 1.5)
    return dec, torch.randn(3, 2)


def test_the_colour_mixture_has_pixelcnn_pp_parameters():
    dec, _ = _colour_decoder((2, 2, 3))
    assert dec.parameter_shape() == (4, 3)  # logit share, mean, log scale, one coupling coefficient a value
    assert dec.out_per_pixel == 12 and dec.pairs == 3
    grey, _ = _colour_decoder((2, 2, 1))
    assert grey.parameter_shape() == (3, 3) and grey.pairs == 0  # grey: exactly as before colour


@pytest.mark.parametrize("context", ["none", "rows"])
def test_a_colour_pixel_s_probabilities_sum_to_one_over_its_colours(context):
    """Every one of the 4^3 = 64 colours of a pixel, for every pixel of a 2x2 image (the other pixels fixed):
    the channel-coupled mixture is a distribution over whole colours, whatever the pixels above hold."""
    dec, z = _colour_decoder((2, 2, 3), levels=4, context=context)
    x = torch.randint(0, 4, (3, 12), generator=torch.Generator().manual_seed(1))
    colours = torch.tensor(list(itertools.product(range(4), repeat=3)))  # (64, 3)
    with torch.no_grad():
        for pixel in range(4):
            images = x.unsqueeze(0).repeat(64, 1, 1)  # (64, 3, 12)
            images[:, :, 3 * pixel : 3 * pixel + 3] = colours.unsqueeze(1)
            per_value = torch.stack([dec.pixel_log_probs(images[i], z) for i in range(64)])  # (64, 3, 12)
            joint = per_value[..., 3 * pixel : 3 * pixel + 3].sum(-1).double().exp()  # (64, 3)
            np.testing.assert_allclose(joint.sum(0).numpy(), 1.0, atol=1e-5)


@pytest.mark.parametrize("context", ["none", "rows"])
def test_the_colour_likelihood_is_normalised_over_whole_images(context):
    """All 4^6 images of a 2x1 colour image with 4 levels: p(x|z) sums to 1 for each z (with the rows context
    over channels too), and each channel's term is an exact conditional."""
    dec, z = _colour_decoder((2, 1, 3), levels=4, context=context)
    images = torch.tensor(list(itertools.product(range(4), repeat=6)))  # (4096, 6)
    with torch.no_grad():
        for zi in z:
            log_p = dec.log_prob(images, zi.expand(len(images), 2)).double()
            assert abs(log_p.exp().sum().item() - 1.0) < 1e-5
            # the red of the first pixel: its term is the marginal over everything else
            red = dec.pixel_log_probs(images, zi.expand(len(images), 2))[:, 0].double().exp()
            for level in range(4):
                hit = images[:, 0] == level
                assert abs(log_p[hit].exp().sum().item() - red[hit][0].item()) < 1e-5


def test_channels_follow_the_earlier_channels_of_their_pixel_and_the_rows_above():
    """Changing one value changes its own term, the later channels of its pixel (green follows red, blue
    red and green) and, through the rows context, every channel of the pixels whose taps reach it."""
    dec, z = _colour_decoder((4, 5, 3), levels=256, context="rows")
    x = torch.randint(0, 256, (3, 60), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = dec.pixel_log_probs(x, z)
        for channel in range(3):
            x2 = x.clone()
            index = (1 * 5 + 2) * 3 + channel  # pixel (1, 2)
            x2[:, index] = (x2[:, index] + 128) % 256
            changed = ((dec.pixel_log_probs(x2, z) - base).abs().amax(0) > 0).view(4, 5, 3)
            expected = torch.zeros(4, 5, 3, dtype=torch.bool)
            expected[1, 2, channel:] = True  # the value itself and the later channels of its pixel
            expected[2, 1:4, :] = True  # taps (-1, +1), (-1, 0), (-1, -1) of the row below, every channel
            expected[3, 2, :] = True  # tap (-2, 0)
            assert torch.equal(changed, expected), channel


def test_colour_probs_are_exact_for_a_first_red_value_and_follow_the_channel_coupling():
    dec, z = _colour_decoder((2, 1, 3), levels=4, context="rows")
    images = torch.tensor(list(itertools.product(range(4), repeat=6)))
    with torch.no_grad():
        probs = dec.probs(z).double()  # (3, 6, 4)
        np.testing.assert_allclose(probs.sum(-1).numpy(), 1.0, atol=1e-6)
        for i, zi in enumerate(z):
            p = dec.log_prob(images, zi.expand(len(images), 2)).double().exp()
            red = torch.stack([p[images[:, 0] == level].sum() for level in range(4)])
            np.testing.assert_allclose(probs[i, 0].numpy(), red.numpy(), atol=1e-6)
        # without coupling (coefficients 0) a channel's rollout is its mixture given z alone
        dec2, _ = _colour_decoder((2, 1, 3), levels=4)
        dec2.net[-1].weight.data.view(4, 6, 3, -1)[3] = 0.0  # the coefficient group: rows of the flat output
        dec2.net[-1].bias.data.view(4, 6, 3)[3] = 0.0
        logit, mean, log_scale, coef = dec2._pixel_mixture(dec2.features(z))
        assert torch.all(coef == 0)
        log_w = torch.log_softmax(logit, -1).unsqueeze(-2)
        independent = dec2.bin_probs(log_w, mean, log_scale).flatten(-3, -2)
        torch.testing.assert_close(dec2.probs(z), independent)


def test_the_grey_rows_context_keeps_its_m_by_t_weights():
    dec, _ = _colour_decoder((3, 4, 1), levels=256, context="rows")
    assert dec.context_weights.shape == (3, 4)  # M x T, as models trained before colour hold them
    colour, _ = _colour_decoder((3, 4, 3), levels=256, context="rows")
    assert colour.context_weights.shape == (3, 3 * 3 * 4)  # M x (C C T)


# --- grey MLP models: the same numbers as before the conv networks ----------------------------------------
SHIPPED = Path(__file__).resolve().parents[2] / "models" / "digits" / "1"


def test_the_shipped_grey_mlp_computes_its_export_time_scores():
    """The shipped digits model rebuilt by today's code gives the log-likelihoods onnxruntime computed when it
    was exported (K=1000, the contract's noise), within the fp32 parity tolerance."""
    from training.export import load_checkpoint
    from vae_contract.formulas import ImportanceAccumulator, fp32_parity_tolerance, importance_noise

    manifest = json.loads((SHIPPED / "manifest.json").read_text())
    model = load_checkpoint(SHIPPED)
    assert isinstance(model.decoder.net, MLPDecoderNet) and model.cfg.arch == "mlp"
    check = manifest["check"]
    x = torch.tensor(check["images"], dtype=torch.int64)
    eps = importance_noise(check["seed"], check["K"], model.latent_dim)
    acc = ImportanceAccumulator.empty(len(x))
    with torch.no_grad():
        for i in range(0, len(eps), 250):
            chunk = torch.from_numpy(eps[i : i + 250]).unsqueeze(1).expand(-1, len(x), -1)
            acc.add(model.log_weights(x, chunk).numpy())
    expected = np.asarray(check["log_likelihood_nats"])
    assert np.all(np.abs(acc.log_likelihood() - expected) <= fp32_parity_tolerance(expected))


# --- export ------------------------------------------------------------------------------------------------
def _export(frozen, out):
    from training.export import export_graphs, share_weights

    spec = export_graphs(frozen, out)
    share_weights(out, ["encoder.onnx", "decoder.onnx", "log_weights.onnx"], {})
    return spec


def test_a_conv_colour_model_exports_and_verifies(tmp_path):
    """The same graph contract as the MLP (x (B, D), eps (K, B, L), log_w (K, B), probs (B, D, levels)), torch
    and onnxruntime agree, a drift of the convolutions is caught, and the span is named from the model."""
    import onnx

    from training.export import ExportError, export_ready, verify

    shape, levels = (9, 7, 3), 256  # odd sides: padded and cropped in the graphs too
    frozen = export_ready(perturbed(tiny(shape, levels, conv_widths=[4, 8])))
    assert frozen.decoder.context  # 256 levels: the rows context, over channels
    spec = _export(frozen, tmp_path)
    d = math.prod(shape)
    assert spec["log_weights"]["inputs"] == {"x": ["batch", d, "int64"], "eps": ["K", "batch", 3, "float32"]}
    assert spec["decoder"]["outputs"] == {"probs": ["batch", d, levels, "float32"]}
    assert spec["log_weights"]["low_precision_span"] == {"input": "decoder_hidden", "output": "decoder_features"}
    graph = onnx.load(str(tmp_path / "log_weights.onnx"))
    made_by = {out: node for node in graph.graph.node for out in node.output}
    assert made_by["decoder_hidden"].op_type == "LeakyRelu"
    assert made_by["decoder_features"].op_type == "Conv"
    assert "vae.decoder.net.out.weight" in made_by["decoder_features"].input
    x = np.random.default_rng(0).integers(0, levels, (4, d))
    x[0], x[1] = 0, levels - 1  # the edge bins
    report = verify(frozen, tmp_path, x, k=16)
    assert report["max_abs_diff_log_likelihood_nats"] <= report["tolerance_nats"]
    assert report["max_abs_diff_decoder_probs"] < 1e-4
    with torch.no_grad():
        frozen.decoder.net.stages[0].conv2.weight.add_(0.05)
    with pytest.raises(ExportError, match="parity failed"):
        verify(frozen, tmp_path, x, k=16)


def test_a_sharp_colour_model_verifies_against_float64_and_a_wrong_decoder_graph_fails(tmp_path):
    """Logistics narrower than their bins (log scale -7, as 8-bit training learns) move a bin's probability
    ~1e-4 with a 1e-7 rounding of the mean, in torch's float32 as in onnxruntime's: the decoder check holds the
    graph to a float64 evaluation, no worse than torch's own float32 (2x), and a real error still fails it."""
    from training.export import DECODER_PROBS_FLOOR, decoder_probs_check, export_ready, verify

    shape, levels = (16, 16, 3), 256
    vae = perturbed(tiny(shape, levels, conv_widths=[8, 8]), scale=0.05)
    with torch.no_grad():
        vae.decoder.net.out.bias.view(3, *vae.decoder.parameter_shape())[:, 2] = -7.0
    frozen = export_ready(vae)
    _export(frozen, tmp_path)
    x = np.random.default_rng(0).integers(0, levels, (8, math.prod(shape)))
    report = verify(frozen, tmp_path, x, k=8)
    err = report["decoder_probs_error_vs_float64"]
    assert err["torch_float32"] > DECODER_PROBS_FLOOR / 10  # the sharp model is ill-conditioned in float32 ...
    assert err["onnxruntime"] <= err["bound"] == max(DECODER_PROBS_FLOOR, 2 * err["torch_float32"])  # ... and passes

    rng = np.random.default_rng(1)
    exact = rng.dirichlet(np.ones(levels), size=(2, 5))
    torch32 = (exact + rng.normal(0, 3e-4, exact.shape)).astype(np.float32)
    assert decoder_probs_check(torch32, torch32, exact)["ok"]
    assert decoder_probs_check((exact + 5e-4).astype(np.float32), torch32, exact)["ok"]
    assert not decoder_probs_check((exact + 3e-3).astype(np.float32), torch32, exact)["ok"]
    assert not decoder_probs_check(exact[:, ::-1].astype(np.float32), torch32, exact)["ok"]
    assert not decoder_probs_check(np.full_like(torch32, np.nan), torch32, exact)["ok"]
    well = exact.astype(np.float32)
    assert not decoder_probs_check((exact + 2e-4).astype(np.float32), well, exact)["ok"]  # the floor holds


def test_the_export_checks_read_a_few_images_at_a_time_and_report_as_over_all_at_once(tmp_path, monkeypatch):
    """verify's decoder check and the manifest's reference scores run a few images a call (all at once, a 64x64
    conv model's checks held 10 GB and 15 GB and the default command was killed): the numbers must not depend
    on how the images are grouped."""
    import training.export as export

    shape, levels = (16, 16, 3), 256
    frozen = export.export_ready(perturbed(tiny(shape, levels, conv_widths=[8, 8]), scale=0.05))
    _export(frozen, tmp_path)
    x = np.random.default_rng(0).integers(0, levels, (6, math.prod(shape)))
    whole = export.verify(frozen, tmp_path, x, k=8)
    monkeypatch.setattr(export, "MAX_ELEMENTS", 8 * math.prod(shape) * levels)  # one image's probabilities a part
    parts = export.verify(frozen, tmp_path, x, k=8)
    # torch's float32 convolutions round differently for other batch sizes: the same errors, not the same bits
    assert parts["max_abs_diff_decoder_probs"] == pytest.approx(whole["max_abs_diff_decoder_probs"], rel=0.25, abs=1e-8)
    for key, value in whole["decoder_probs_error_vs_float64"].items():
        assert parts["decoder_probs_error_vs_float64"][key] == pytest.approx(value, rel=0.25, abs=1e-8), key
    one_call = export.reference_scores(tmp_path, x, frozen.noise_dim, 300, 0, rows=6 * 300)
    calls: list[tuple[int, ...]] = []
    sessions = export._sessions

    class Recording:
        def __init__(self, session):
            self.session = session

        def run(self, names, feeds):
            calls.append(feeds["eps"].shape[:2])
            return self.session.run(names, feeds)

    monkeypatch.setattr(export, "_sessions", lambda out: {"log_weights": Recording(sessions(out)["log_weights"])})
    grouped = export.reference_scores(tmp_path, x, frozen.noise_dim, 300, 0, rows=20)
    assert max(k * b for k, b in calls) <= 20 and sum(k * b for k, b in calls) == 6 * 300
    np.testing.assert_allclose(grouped, one_call, rtol=0, atol=2e-6)


def test_the_conv_span_cuts_into_graphs_that_compute_the_whole(tmp_path):
    """Cut at the span (as the service's bf16 path does) and run in fp32: the three parts compute the whole,
    so the span depends on decoder_hidden alone (no shape taken from the graph's inputs)."""
    import onnxruntime as ort

    ov = pytest.importorskip("openvino")
    from service.engine import _split_at_span
    from training.export import export_ready

    frozen = export_ready(perturbed(tiny((16, 12, 3), 256, conv_widths=[4, 8])))
    _export(frozen, tmp_path)
    core = ov.Core()
    head, span, tail = (
        core.compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        for m in _split_at_span(core, tmp_path / "log_weights.onnx", "decoder_hidden", "decoder_features")
    )
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (3, 16 * 12 * 3))
    eps = rng.standard_normal((5, 3, 3)).astype(np.float32)
    whole = ort.InferenceSession(str(tmp_path / "log_weights.onnx")).run(None, {"x": x, "eps": eps})[0]
    hidden = head([x, eps])[0]
    assert hidden.shape == (15, 8 * 8 * 6)  # K x batch rows: the coarsest map, 8 channels of 8 x 6
    cut = tail([x, eps, span([hidden])[0]])[0]
    np.testing.assert_allclose(cut, whole, rtol=1e-5, atol=1e-3)


def test_a_conv_checkpoint_rebuilds_itself(tmp_path):
    """checkpoint.json with the resolved conv config and an (H, W, C) image shape rebuilds the same model; a
    2-element [H, W] (versions written before colour) still means grey."""
    from training.export import load_checkpoint, share_weights

    for shape in [(16, 16, 3), (16, 16)]:
        model = perturbed(tiny(shape, 17, conv_widths=[4, 8]))
        out = tmp_path / "x".join(map(str, shape))
        out.mkdir()
        index = share_weights(out, [], {k: v.numpy() for k, v in model.state_dict().items()})
        ckpt = {"config": model.cfg.to_dict(), "dim": model.dim, "levels": 17, "image_shape": list(shape)}
        (out / "checkpoint.json").write_text(json.dumps({**ckpt, "weights": "weights.bin", "tensors": index}))
        loaded = load_checkpoint(out)
        assert loaded.cfg.arch == "conv" and loaded.shape == image_shape(model.dim, shape)
        x = torch.randint(0, 17, (2, model.dim), generator=torch.Generator().manual_seed(0))
        eps = torch.randn(3, 2, 3)
        with torch.no_grad():
            torch.testing.assert_close(loaded.log_weights(x, eps), model.log_weights(x, eps), rtol=0, atol=0)


def test_a_conv_colour_version_is_written_verified_and_served(tmp_path):
    """write_version end to end for a conv colour model with the rows context: a valid manifest (the context's
    tap weights one row per component, channel and channel of the taps), a checkpoint that rebuilds the same
    model, and a version the service loads (its fp32 check scores reproduced)."""
    from service.repository import load_version
    from service.settings import Settings
    from training.export import load_checkpoint, read_verified, write_version

    shape = (9, 7, 3)
    model = perturbed(tiny(shape, 256, conv_widths=[4, 8]))
    x = np.random.default_rng(0).integers(0, 256, (4, math.prod(shape)))
    out = tmp_path / "photos" / "1"
    write_version(model, out, verify_images=x, metrics={}, training={}, data_info={"image_shape": list(shape)})
    manifest = read_verified(out)
    assert (manifest["image"]["channels"], manifest["image"]["dim"]) == (3, 189)
    assert np.array(manifest["decoder"]["context"]["weights"]).shape == (2 * 3 * 3, 4)  # M C C rows of T taps
    np.testing.assert_allclose(
        np.array(manifest["decoder"]["context"]["weights"]).reshape(2, -1),
        model.decoder.context_weights.detach().numpy(),
        atol=1e-6,
    )
    loaded = load_checkpoint(out)
    eps = torch.randn(3, 4, 3)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.log_weights(torch.from_numpy(x), eps), model.log_weights(torch.from_numpy(x), eps)
        )
    served = load_version(out, Settings(models_dir=tmp_path, intra_op_threads=1, engine="onnxruntime"), "photos", 1)
    assert served.channels == 3 and served.dim == 189

"""make bench's training comparison runs the default model of 8-bit images (a smoke test, not a timing)."""

from bench.training import measure


def test_bench_training_comparison_runs_on_the_8bit_default():
    out = measure(n_train=128, epochs=1, turns=2)
    assert out["model"]["likelihood"] == "logistic_mixture" and out["model"]["context"] == "rows"
    assert out["product_images_per_s"] > 0 and out["plain_loop_images_per_s"] > 0
    assert len(out["ratio_each_turn"]) == 2 and out["turns"] == 2  # both orders: product first, then plain

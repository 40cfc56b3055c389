"""The importance-sampling estimator against a closed form: probabilistic PCA.

x = W z + b + noise, z ~ N(0, I), noise ~ N(0, s^2 I) gives log p(x) = log N(x | b, W W^T + s^2 I)
exactly, and the posterior p(z|x) = N(M^-1 W^T (x - b), s^2 M^-1) with M = W^T W + s^2 I.
"""

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from training.evaluate import importance_log_likelihood

F64 = torch.float64
D, L, S2 = 6, 3, 0.3


@pytest.fixture(scope="module")
def ppca():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(D, L, generator=g, dtype=torch.float64)
    b = torch.randn(D, generator=g, dtype=torch.float64)
    x = (w @ torch.randn(L, 5, generator=g, dtype=torch.float64)).T + b
    x = x + math.sqrt(S2) * torch.randn(x.shape, generator=g, dtype=torch.float64)
    exact = MultivariateNormal(b, w @ w.T + S2 * torch.eye(D, dtype=F64)).log_prob(x)
    m = w.T @ w + S2 * torch.eye(L, dtype=F64)
    post_mean = torch.linalg.solve(m, w.T @ (x - b).T).T  # (B, L)
    post_cov = S2 * torch.linalg.inv(m)
    return w, b, x, exact, post_mean, post_cov


def make_log_weights(w, b, q_mean, q_cov):
    """log p(x|z) + log p(z) - log q(z|x) with z = q_mean + chol(q_cov) eps."""
    chol = torch.linalg.cholesky(q_cov)
    prior = MultivariateNormal(torch.zeros(L, dtype=F64), torch.eye(L, dtype=F64))

    def log_weights(x, eps):
        z = q_mean + eps @ chol.T  # (K, B, L)
        log_px = MultivariateNormal(z @ w.T + b, S2 * torch.eye(D, dtype=F64)).log_prob(x)
        log_q = MultivariateNormal(q_mean, scale_tril=chol).log_prob(z)
        return log_px + prior.log_prob(z) - log_q

    return log_weights


@pytest.mark.parametrize("k", [1, 7, 100, 1000])
def test_exact_posterior_recovers_closed_form_for_any_k(ppca, k):
    w, b, x, exact, mean, cov = ppca
    est = importance_log_likelihood(make_log_weights(w, b, mean, cov), x, L, k, chunk=33, seed=1, dtype=torch.float64)
    torch.testing.assert_close(est, exact, atol=1e-4, rtol=0)


def test_wrong_posterior_lies_below_and_converges(ppca):
    """E[log p_K(x)] <= log p(x) and the gap shrinks as K grows (Burda et al., 2016).

    The bound holds in expectation, so each K is averaged over R independent estimates (x repeated R
    times, each copy drawing its own noise).
    """
    w, b, x, exact, mean, cov = ppca
    wrong = make_log_weights(w, b, mean + 0.3, torch.diag(torch.diag(cov)) * 2.0)  # shifted, wide, uncorrelated
    reps = 100
    x_rep = x.repeat(reps, 1)
    wrong_rep = make_log_weights(w, b, (mean + 0.3).repeat(reps, 1), torch.diag(torch.diag(cov)) * 2.0)
    gaps = []
    for k in (1, 10, 100, 1000):
        est = importance_log_likelihood(
            wrong_rep, x_rep, L, k, chunk=250, seed=2, batch=len(x_rep), dtype=torch.float64
        )
        mean_est = est.reshape(reps, len(x)).mean(0)
        assert torch.all(mean_est < exact), f"K={k}: the mean estimate lies above the true log-likelihood"
        gaps.append((exact - mean_est).mean().item())
    assert gaps[0] > gaps[1] > gaps[2] > gaps[3] > 0
    assert gaps[-1] < 0.05 * gaps[0]  # the bound tightens toward log p(x) as K grows
    single = importance_log_likelihood(wrong, x, L, 1000, chunk=250, seed=3, dtype=torch.float64)
    assert (exact - single).abs().max() < 0.2  # one K=1000 estimate is already close


def test_same_seed_same_estimate(ppca):
    w, b, x, exact, mean, cov = ppca
    fn = make_log_weights(w, b, mean + 0.3, cov * 2)
    a = importance_log_likelihood(fn, x, L, 200, chunk=30, seed=5, dtype=torch.float64)
    c = importance_log_likelihood(fn, x, L, 200, chunk=30, seed=5, dtype=torch.float64)
    d = importance_log_likelihood(fn, x, L, 200, chunk=30, seed=6, dtype=torch.float64)
    assert torch.equal(a, c) and not torch.equal(a, d)

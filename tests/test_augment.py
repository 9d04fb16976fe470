"""Augmentation (mnist_sweep/augment.py) on synthetic images: shapes, labels, identity at zero, real change."""

from __future__ import annotations

import math

import pytest
import torch

from mnist_sweep.augment import Augment


def _digits(n=8):
    x = torch.full((n, 1, 28, 28), -0.4242)  # the normalised background
    x[:, :, 6:22, 12:16] = 2.8  # a bright vertical stroke
    return x


def test_zero_strength_is_the_identity():
    x = _digits()
    assert Augment(strength=0.0, elastic_alpha=30)(x) is x
    assert not Augment(strength=1.0, rotate=0, shear=0, scale=0, shift=0, elastic_alpha=0).active


@pytest.mark.parametrize("alpha", [0.0, 3.0])
def test_shape_dtype_and_order_are_kept(alpha):
    torch.manual_seed(0)
    x = _digits()
    y = Augment(strength=1.0, elastic_alpha=alpha)(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert not torch.equal(x, y)
    # Each output is still a distortion of *its own* input: closer to it than to a shifted stroke.
    other = torch.roll(x, shifts=8, dims=3)
    assert ((y - x).abs().mean(dim=(1, 2, 3)) < (y - other).abs().mean(dim=(1, 2, 3))).all()


def test_background_stays_background():
    torch.manual_seed(0)
    x = torch.full((4, 1, 28, 28), -0.4242)
    y = Augment(strength=1.0, rotate=30, shift=0.2, elastic_alpha=3)(x)
    torch.testing.assert_close(y, x)  # nothing is invented at the borders


def test_tiny_strength_barely_moves_pixels():
    torch.manual_seed(0)
    x = _digits()
    small = (Augment(strength=0.01, elastic_alpha=3)(x) - x).abs().mean()
    large = (Augment(strength=1.0, elastic_alpha=3)(x) - x).abs().mean()
    assert small < large / 5


def test_seeded_draws_repeat():
    x = _digits()
    torch.manual_seed(3)
    a = Augment(elastic_alpha=20)(x)
    torch.manual_seed(3)
    b = Augment(elastic_alpha=20)(x)
    assert torch.equal(a, b)


def test_elastic_field_has_simards_smoothness_and_peak():
    """Gaussian-blurred white noise of width sigma is correlated exp(-d^2 / 4 sigma^2) at a distance of d pixels."""
    torch.manual_seed(0)
    sigma, alpha = 4.0, 2.5
    field = Augment(strength=1.0, elastic_alpha=alpha, elastic_sigma=sigma)._elastic(3000, 28, 28, 1.0, "cpu")
    dx = field[..., 0] * 28 / 2  # grid units -> pixels
    assert torch.allclose(dx.abs().amax(dim=(1, 2)), torch.full((3000,), alpha), atol=1e-4)  # peak = alpha
    for d in (2, 4, 8):
        corr = torch.corrcoef(torch.stack([dx[:, 12, 6], dx[:, 12, 6 + d]]))[0, 1].item()
        assert abs(corr - math.exp(-(d**2) / (4 * sigma**2))) < 0.06, (d, corr)


@pytest.mark.parametrize("sigma", [4.0, 2.5, 1.0])
def test_elastic_matrix_is_the_blur_and_interpolation_it_replaces(sigma):
    """The field by one matmul equals blurring and interpolating each noise (the per-batch way) on any noise."""
    aug = Augment(elastic_alpha=2.5, elastic_sigma=sigma)
    gh, gw = aug._coarse(28, 28)
    noise = torch.rand(64, 1, gh, gw, generator=torch.Generator().manual_seed(1)) * 2 - 1
    by_matrix = noise.flatten(1) @ aug._basis(28, 28, "cpu")
    assert torch.allclose(by_matrix, aug._smooth(noise, 28, 28).flatten(1), atol=1e-5)
    assert aug._basis(28, 28, "cpu") is aug._basis(28, 28, "cpu")  # made once, then reused


def test_a_generator_of_its_own_repeats_the_distortions_and_leaves_the_global_stream_alone():
    x = _digits()
    augment = Augment(strength=1.0, elastic_alpha=3.0)
    torch.manual_seed(7)
    before = torch.rand(1)
    torch.manual_seed(7)
    augment.generator = torch.Generator().manual_seed(1)
    first = augment(x)
    assert torch.equal(torch.rand(1), before)  # the run's own random stream did not move
    augment.generator = torch.Generator().manual_seed(1)
    assert torch.equal(augment(x), first)
    augment.generator = torch.Generator().manual_seed(2)
    assert not torch.equal(augment(x), first)

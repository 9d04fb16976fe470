"""Data augmentation on the device: new variants of the book's pages, drawn fresh for every batch.

Two distortions, applied to a whole normalised batch at once (no per-image Python work), only while
training - evaluation always sees the images as they are:

* a random **affine** map per image: rotation, shear, scale and shift;
* an **elastic** distortion (Simard et al., 2003): a random displacement field per image, smoothed by a
  Gaussian of width ``elastic_sigma`` pixels and scaled to ``elastic_alpha`` pixels - the wobble of a
  different hand writing the same digit. (Drawn on a coarse grid and interpolated up: see ``_elastic``.)

Both become one sampling grid, so the image is resampled once. ``strength`` scales every magnitude:
0 switches augmentation off, 1 uses the magnitudes as given; it is the knob to sweep
(``data.augment.strength=0,0.5,1``). The model stays a pure feedforward net: nothing here is learned.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class Augment:
    def __init__(
        self,
        strength: float = 1.0,
        rotate: float = 12.0,
        shear: float = 8.0,
        scale: float = 0.1,
        shift: float = 0.1,
        elastic_alpha: float = 0.0,
        elastic_sigma: float = 4.0,
        generator: torch.Generator | None = None,
    ):
        self.strength = strength
        self.rotate, self.shear, self.scale, self.shift = rotate, shear, scale, shift
        self.alpha, self.sigma = elastic_alpha, elastic_sigma
        self._bases: dict[tuple, torch.Tensor] = {}  # the elastic field's linear map, per image size and device
        # Where the random numbers come from: torch's global generator (seeded by the run's seed) in training;
        # a generator of its own where the distortions must not disturb the run's random stream.
        self.generator = generator

    @property
    def active(self) -> bool:
        magnitudes = (self.rotate, self.shear, self.scale, self.shift, self.alpha)
        return self.strength > 0 and any(m > 0 for m in magnitudes)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """A distorted copy of the batch ``x`` [B, 1, H, W] (same shape, same order: labels still match)."""
        if not self.active:
            return x
        b, _, h, w = x.shape
        s = self.strength
        grid = F.affine_grid(self._affine(b, s, x.device), list(x.shape), align_corners=False)
        if self.alpha > 0:
            grid = grid + self._elastic(b, h, w, s, x.device)
        # "border" repeats the edge pixels - the background - instead of inventing zeros, which after
        # Normalize would not be the background colour.
        return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=False)

    def _affine(self, b: int, s: float, device) -> torch.Tensor:
        def uniform(limit: float) -> torch.Tensor:
            return (torch.rand(b, device=device, generator=self.generator) * 2 - 1) * limit * s

        angle = uniform(math.radians(self.rotate))
        shear = uniform(math.radians(self.shear))
        zoom = 1 + uniform(self.scale)
        tx, ty = uniform(2 * self.shift), uniform(2 * self.shift)  # grid coordinates span 2 units
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.zeros(b, 2, 3, device=device)
        # rotation @ shear (along x), divided by the zoom (the grid maps output pixels to input pixels)
        theta[:, 0, 0] = cos / zoom
        theta[:, 0, 1] = (cos * torch.tan(shear) - sin) / zoom
        theta[:, 1, 0] = sin / zoom
        theta[:, 1, 1] = (sin * torch.tan(shear) + cos) / zoom
        theta[:, 0, 2], theta[:, 1, 2] = tx, ty
        return theta

    def _elastic(self, b: int, h: int, w: int, s: float, device) -> torch.Tensor:
        # Simard's field is white noise blurred by a Gaussian of width sigma: it varies over ~sigma pixels, so
        # it is drawn on a coarse grid (see _smooth) and made smooth and full-size by one fixed linear map.
        basis = self._basis(h, w, device)  # [coarse points, h * w]
        noise = torch.rand(b * 2, basis.shape[0], device=device, generator=self.generator) * 2 - 1
        return self._to_grid(noise @ basis, b, h, w, s)

    def _to_grid(self, field: torch.Tensor, b: int, h: int, w: int, s: float) -> torch.Tensor:
        """Smooth fields [2B, H * W] (dx then dy of each image) -> displacements of the sampling grid."""
        field = field / field.abs().amax(dim=1, keepdim=True).clamp(min=1e-6)  # peak displacement 1
        field = field.view(b, 2, h, w).permute(0, 2, 3, 1)  # -> [B, H, W, (dx, dy)] like the grid
        pixels_to_grid = torch.tensor([2 / w, 2 / h], device=field.device)
        return field * self.alpha * s * pixels_to_grid

    def _coarse(self, h: int, w: int) -> tuple[int, int]:
        """The coarse grid the noise is drawn on: points ``sigma`` pixels apart (8x8 for 28x28 at sigma 4)."""
        stride = max(1, int(self.sigma))
        return -(-(h - 1) // stride) + 1, -(-(w - 1) // stride) + 1

    def _smooth(self, noise: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Coarse white noise [N, 1, gh, gw] -> a smooth field [N, 1, h, w].

        The noise is blurred on the coarse grid by a Gaussian of sigma / stride cells (the same correlation at
        the grid points as sigma pixels at full size) and interpolated up (bicubic): ~10x cheaper than blurring
        at full size with a 25-tap kernel.
        """
        sigma = self.sigma / max(1, int(self.sigma))
        radius = max(1, int(3 * sigma))
        t = torch.arange(-radius, radius + 1, device=noise.device, dtype=noise.dtype)
        kernel = torch.exp(-(t**2) / (2 * sigma**2))
        kernel = kernel / kernel.sum()
        # A separable Gaussian blur turns white noise into a smooth displacement field.
        field = F.conv2d(F.pad(noise, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
        field = F.conv2d(F.pad(field, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
        return F.interpolate(field, size=(h, w), mode="bicubic", align_corners=True)

    def _basis(self, h: int, w: int, device) -> torch.Tensor:
        """_smooth as a matrix [gh * gw, h * w]: padding, blur and interpolation are all linear in the noise,
        so _smooth of each coarse point alone, stacked, maps any noise to its field in one matmul (measured by
        ``python -m benchmarks.augment``, docs/BENCHMARKS.md)."""
        key = (h, w, self.sigma, str(device))
        if key not in self._bases:
            gh, gw = self._coarse(h, w)
            points = torch.eye(gh * gw, device=device).view(gh * gw, 1, gh, gw)
            self._bases[key] = self._smooth(points, h, w).view(gh * gw, h * w)
        return self._bases[key]


def from_config(a) -> Augment | None:
    """The training batches' distortion for ``data.augment`` (config.AugmentConfig), or None when it is off."""
    augment = Augment(a.strength, a.rotate, a.shear, a.scale, a.shift, a.elastic_alpha, a.elastic_sigma)
    return augment if augment.active else None

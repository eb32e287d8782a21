"""Test-time views: each test image as its original plus ``n`` augmented views (TPT, NeurIPS 2022).

TPT adapts its prompt on augmented views of one test image and then classifies the
original. :func:`test_time_views` builds the per-image transform the ``test_time`` protocol
runs in its DataLoader; it returns ``(original (C, H, W), views (n_views, C, H, W))``.

Matches ``azshue/TPT data/datautils.py`` (``AugMixAugmenter``, ``augmix``) and
``data/augmix_ops.py``:

* original: the test transform -- shorter side resized to ``image_size`` (bicubic), centre
  crop, tensor, normalise (:func:`vlprompt.datasets.images.test_transform`, bit for bit);
* each view: ``RandomResizedCrop(image_size, scale=(0.08, 1))`` of the *raw* image with
  torchvision's default **bilinear** interpolation (the reference's ``get_preaugment``), random
  horizontal flip, tensor, normalise;
* with ``augmix`` (the reference turns it on for the fine-grained cross-dataset sets, off for the
  ImageNet variants): AugMix of that crop -- 3 chains of 1-3 operations drawn uniformly from
  autocontrast, equalize, posterize, rotate, solarize, shear x/y, translate x/y at ``severity``
  1, the chains mixed with Dirichlet(1, 1, 1) weights and the mixture blended with the clean crop
  by ``m ~ Beta(1, 1)``: ``m · crop + (1 − m) · Σ w_i chain_i`` on the normalised tensors.

The AugMix operations are re-implemented here with the reference's magnitudes (level
``~ U(0.1, severity)`` on a 0-10 scale: rotate ``int(3·level)`` degrees, shear ``0.03·level``,
translate ``int(level · size / 30)`` pixels, posterize ``4 − int(0.4·level)`` bits, solarize
threshold ``256 − int(25.6·level)``, random sign for the geometric ones) rather than taken from
torchvision's ``T.AugMix``, whose severity scale, op magnitudes (binned, 0 at severity 1) and
uint8 re-quantisation of the mixture all differ.

Deliberate changes:

* every random draw comes from torch's generator (the reference's AugMix uses ``numpy.random``),
  so ``torch.manual_seed`` -- and the DataLoader's per-worker torch seed -- fix the views;
* the geometric ops use the crop's own size where the reference hard-codes 224 (equal at 224);
* ``min_scale`` and ``interpolation`` can be changed (defaults are the reference's).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image, ImageOps
from torch import Tensor
from torchvision import transforms as T

from vlprompt.datasets.images import test_transform

INTERPOLATIONS = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}

#: AugMix chains: width (number of chains) and the range of operations per chain.
AUGMIX_WIDTH = 3
AUGMIX_DEPTH = (1, 3)


# ---------------------------------------------------------------- AugMix operations (TPT's augmix_ops)
def _level(severity: int) -> float:
    """An operation's strength, uniform in ``[0.1, severity)`` on the 0-10 scale."""
    return 0.1 + (severity - 0.1) * float(torch.rand(()))


def _signed(value: float) -> float:
    """``value`` with a random sign (negated with probability 1/2)."""
    return -value if float(torch.rand(())) > 0.5 else value


def _affine(image: Image.Image, coefficients: tuple[float, ...]) -> Image.Image:
    return image.transform(
        image.size, Image.Transform.AFFINE, coefficients, resample=Image.Resampling.BILINEAR
    )


def autocontrast(image: Image.Image, severity: int) -> Image.Image:
    return ImageOps.autocontrast(image)


def equalize(image: Image.Image, severity: int) -> Image.Image:
    return ImageOps.equalize(image)


def posterize(image: Image.Image, severity: int) -> Image.Image:
    return ImageOps.posterize(image, 4 - int(_level(severity) * 4 / 10))


def rotate(image: Image.Image, severity: int) -> Image.Image:
    degrees = _signed(int(_level(severity) * 30 / 10))
    return image.rotate(degrees, resample=Image.Resampling.BILINEAR)


def solarize(image: Image.Image, severity: int) -> Image.Image:
    return ImageOps.solarize(image, 256 - int(_level(severity) * 256 / 10))


def shear_x(image: Image.Image, severity: int) -> Image.Image:
    return _affine(image, (1, _signed(_level(severity) * 0.3 / 10), 0, 0, 1, 0))


def shear_y(image: Image.Image, severity: int) -> Image.Image:
    return _affine(image, (1, 0, 0, _signed(_level(severity) * 0.3 / 10), 1, 0))


def translate_x(image: Image.Image, severity: int) -> Image.Image:
    pixels = _signed(int(_level(severity) * image.size[0] / 3 / 10))
    return _affine(image, (1, 0, pixels, 0, 1, 0))


def translate_y(image: Image.Image, severity: int) -> Image.Image:
    pixels = _signed(int(_level(severity) * image.size[1] / 3 / 10))
    return _affine(image, (1, 0, 0, 0, 1, pixels))


#: The reference's ``augmentations`` list (no colour/contrast/brightness/sharpness: those
#: overlap ImageNet-C's corruptions).
AUGMIX_OPS: tuple[Callable[[Image.Image, int], Image.Image], ...] = (
    autocontrast,
    equalize,
    posterize,
    rotate,
    solarize,
    shear_x,
    shear_y,
    translate_x,
    translate_y,
)


def augmix(
    crop: Image.Image, clean: Tensor, preprocess: Callable[[Image.Image], Tensor], severity: int
) -> Tensor:
    """AugMix of ``crop`` (whose preprocessed tensor is ``clean``), mixed on preprocessed tensors.

    Normalisation is affine and the weights sum to one, so mixing after it equals mixing the
    pixels (the reference mixes after it too).
    """
    weights = torch.distributions.Dirichlet(torch.ones(AUGMIX_WIDTH)).sample()
    keep = torch.distributions.Beta(1.0, 1.0).sample()
    mix = torch.zeros_like(clean)
    for weight in weights:
        image = crop
        for _ in range(int(torch.randint(AUGMIX_DEPTH[0], AUGMIX_DEPTH[1] + 1, ()))):
            image = AUGMIX_OPS[int(torch.randint(len(AUGMIX_OPS), ()))](image, severity)
        mix += weight * preprocess(image)
    return keep * clean + (1 - keep) * mix


# ---------------------------------------------------------------- the per-image transform
class AugmentedViews:
    """``PIL image -> (original (C, H, W), views (n_views, C, H, W))``: the test-transformed
    image and ``n_views`` random views (TPT).

    ``image_size``, ``mean`` and ``std`` are the backbone's (as for the other transforms); the
    defaults of the keyword options are the reference's. A plain class of picklable parts, so
    it can run inside DataLoader worker processes.
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        n_views: int,
        *,
        augmix: bool = False,
        min_scale: float = 0.08,
        severity: int = 1,
        interpolation: str = "bilinear",
    ) -> None:
        if isinstance(n_views, bool) or not isinstance(n_views, int) or n_views < 1:
            raise ValueError(f"n_views must be an integer >= 1, got {n_views!r}")
        if not isinstance(augmix, bool):
            raise ValueError(f"augmix must be true or false, got {augmix!r}")
        if not 0.0 < min_scale <= 1.0:
            raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
        if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= 10:
            raise ValueError(f"severity must be an integer in 1..10 (AugMix level scale), got {severity!r}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}")
        self.n_views = n_views
        self.augmix = augmix
        self.severity = severity
        self.original = test_transform(image_size, mean, std)
        self.crop = T.Compose(
            [
                T.RandomResizedCrop(
                    image_size, scale=(min_scale, 1.0), interpolation=INTERPOLATIONS[interpolation]
                ),
                T.RandomHorizontalFlip(),
            ]
        )
        self.preprocess = T.Compose([T.ToTensor(), T.Normalize(mean=list(mean), std=list(std))])

    def view(self, image: Image.Image) -> Tensor:
        """One augmented view ``(C, H, W)``."""
        crop = self.crop(image)
        clean = self.preprocess(crop)
        return augmix(crop, clean, self.preprocess, self.severity) if self.augmix else clean

    def __call__(self, image: Image.Image) -> tuple[Tensor, Tensor]:
        return self.original(image), torch.stack([self.view(image) for _ in range(self.n_views)])

    def __repr__(self) -> str:
        mixing = (
            f" -> AugMix(severity={self.severity}, width={AUGMIX_WIDTH}, depth={AUGMIX_DEPTH[0]}-"
            f"{AUGMIX_DEPTH[1]}, ops=[{', '.join(op.__name__ for op in AUGMIX_OPS)}], "
            "weights=Dirichlet(1), blend=Beta(1, 1))"
            if self.augmix
            else ""
        )
        return (
            f"{type(self).__name__}(original={self.original!r}, "
            f"views={self.n_views} x [{self.crop!r} -> {self.preprocess!r}{mixing}])"
        )


test_time_views = AugmentedViews
"""The name the rest of vlprompt uses for the TPT view transform (``views.test_time_views``)."""


# The name starts with "test_": stop pytest from collecting it wherever a test module imports it.
AugmentedViews.__test__ = False  # type: ignore[attr-defined]

"""Changes of an aerial image's colours, as another sensor, season or processing would make them.

The maps pairs are one source's imagery (Google's, around New York), and a model trained on them
alone reads other colours as other things: recoloured as another white balance (red x1.1, blue
x0.88), the held-out pairs score RMSE 41 instead of 22 (``evaluate --recolour warm``, model card,
session 53). Matching colours to the training imagery's at translate time is no remedy: matched
image by image, it erases each image's own mix of water and parks (model card, session 44); over
a whole scene, it undoes a white balance on New York ground but paints the NAIP sample's farmland
as water (session 54), since a scene's colours are its land cover as much as its sensor. So the
change is made in training instead: each input is recoloured at random (``train
--colour-jitter``), its map left as it is, for the model to learn that a street is a street in any
white balance, tone, saturation or tint within the ranges below.

The changes are those that commonly tell sources apart: a gain per band (white balance), a gamma
(the tone curve), then, in YIQ (luma and two chroma axes, linear in RGB), the luma's brightness
and contrast about its mean, and the chroma's saturation and hue (a turn of the chroma plane). The
result is rounded to 8-bit levels, as every scene translate reads is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: RGB to YIQ (NTSC); its inverse below. Luma and chroma apart, brightness and tint are separate knobs.
_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_FROM_YIQ = torch.linalg.inv(_TO_YIQ)

#: The largest change each way at strength 1: natural logarithms of the factors (0.1: x0.90-1.11),
#: and the hue turn in radians (0.15: 8.6 degrees).
LOG_GAIN, LOG_GAMMA, LOG_BRIGHTNESS, LOG_CONTRAST, LOG_SATURATION, HUE = 0.1, 0.3, 0.25, 0.3, 0.5, 0.15


@dataclass(frozen=True)
class Recolouring:
    """One image's colour change: identity at the defaults."""

    gains: tuple[float, float, float] = (1.0, 1.0, 1.0)
    gamma: float = 1.0
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0

    @classmethod
    def draw(cls, strength: float, gen: torch.Generator) -> Recolouring:
        """A random change, each factor log-uniform (as likely halved as doubled) within the
        ranges above times ``strength`` (0: none, 1: the full ranges)."""
        u = (torch.rand(8, generator=gen, dtype=torch.float64) * 2 - 1) * strength
        gains = tuple(math.exp(LOG_GAIN * float(v)) for v in u[:3])
        scales = (LOG_GAMMA, LOG_BRIGHTNESS, LOG_CONTRAST, LOG_SATURATION)
        gamma, brightness, contrast, saturation = (math.exp(s * float(v)) for s, v in zip(scales, u[3:7]))
        return cls(gains, gamma, brightness, contrast, saturation, HUE * float(u[7]))

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """``image`` (3, H, W) in the model's range [-1, 1], on any device, recoloured, in that range,
        on 8-bit levels."""
        gains = torch.tensor(self.gains, device=image.device).view(3, 1, 1)
        x = ((image.float() + 1) / 2 * gains).clamp(0, 1) ** self.gamma
        y, i, q = torch.einsum("ck,khw->chw", _TO_YIQ.to(image.device), x)
        mean = y.mean()
        y = self.brightness * (mean + self.contrast * (y - mean))
        cos, sin = math.cos(self.hue) * self.saturation, math.sin(self.hue) * self.saturation
        i, q = cos * i - sin * q, sin * i + cos * q
        rgb = torch.einsum("ck,khw->chw", _FROM_YIQ.to(image.device), torch.stack([y, i, q])).clamp(0, 1)
        return (rgb * 255).round() / 127.5 - 1


#: Fixed colour changes by name, for ``evaluate --recolour``: how a model copes with imagery whose
#: colours are not the training imagery's. Each goes beyond ``--colour-jitter``'s ranges on one knob
#: at least, so that a model trained with it is not scored on changes it drew.
SHIFTS = {
    "pale": Recolouring(brightness=1.15, contrast=0.7, saturation=0.6),  # haze, a desert's light
    "warm": Recolouring(gains=(1.1, 1.0, 0.88)),  # another white balance
    "dark": Recolouring(gamma=1.4, brightness=0.85),  # another tone curve
}


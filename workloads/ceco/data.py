"""Offline imbalanced segmentation: generated greyscale scenes of shapes on a textured ground.

K = 6 classes: background and five shapes, drawn with numpy masks (no download, no
skimage needed). Confusable pairs share a texture, so only the outline tells them apart:

| class | shape | texture |
| --- | --- | --- |
| 0 background | smooth noise, its level set by the scene type | |
| 1 disk | filled circle | fine noise (shared with the ellipse) |
| 2 square | axis-aligned square | stripes (shared with the diamond) |
| 3 ellipse | an ellipse, long axis horizontal or vertical | fine noise |
| 4 diamond | a square turned 45 degrees | stripes |
| 5 ring | an annulus | flat |

Every shape has the same mean intensity, then Gaussian pixel noise covers all.

**Imbalance.** An image holds class k with a probability that falls with k (``PRESENCE``;
``severe``: 0.8 / 0.4 / 0.15 / 0.06 / 0.03 over the whole federation, the spec's; ``mild``:
0.8 / 0.6 / 0.45 / 0.3 / 0.2), and under ``severe`` the rare shapes are also smaller
(``RADII``), about 100:1 in pixels between the disk and the ring. Shapes are drawn in class
order, so a rarer shape lies on top. The two rarest classes (diamond and ring) are the
*tail*.

**Scene types (the hidden groups).** With ``scene_groups = 2`` client c holds scenes of type
c mod 2, each with its own class mix (``GROUP_PRESENCE``: type 0 is mostly round shapes and
rings, type 1 square shapes and diamonds; their mean is the federation's mix), its own
ground level; with ``inverted_type1`` type 1 is also seen in inverted contrast (dark shapes on
a light ground, as night scenes against day scenes), so that a model of one type does not
fit the other (with the class mix alone, clients pick models by loss without finding the
types: ARI 0 in a pilot). A client's images are drawn from (seed, client id); the server's test set is
class-balanced (every shape present with probability 1/2) in each scene type.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from workloads import streams

CLASSES = ("background", "disk", "square", "ellipse", "diamond", "ring")
K = len(CLASSES)
TAIL = (4, 5)  # the two rarest classes
IMBALANCES = ("severe", "mild")
PRESENCE = {  # P(an image holds shape k), k = 1..5, over the whole federation
    "severe": np.array([0.8, 0.4, 0.15, 0.06, 0.03]),
    "mild": np.array([0.8, 0.6, 0.45, 0.3, 0.2]),
}
GROUP_PRESENCE = {  # per scene type; the mean over the two types is PRESENCE
    "severe": np.array([[1.0, 0.2, 0.25, 0.01, 0.05], [0.6, 0.6, 0.05, 0.11, 0.01]]),
    "mild": np.array([[1.0, 0.4, 0.6, 0.15, 0.3], [0.6, 0.8, 0.3, 0.45, 0.1]]),
}
RADII = {  # (low, high) radius of shape k in pixels at 32 x 32 (scaled with the image size)
    "severe": np.array([[5, 9], [4, 8], [4, 7], [3, 5], [3, 5]], np.float64),
    "mild": np.array([[4, 8], [4, 8], [4, 8], [4, 8], [4, 8]], np.float64),
}
GROUND = (0.25, 0.45)  # the background's mean level in scene types 0 and 1
SHAPE_LEVEL = 0.65


def presence(imbalance: str, scene_groups: int) -> np.ndarray:
    """(groups, 5): P(an image of scene type g holds shape k)."""
    return PRESENCE[imbalance][None] if scene_groups == 1 else GROUP_PRESENCE[imbalance]


def _smooth_noise(rng: np.random.Generator, n: int, size: int, coarse: int = 5) -> np.ndarray:
    low = torch.from_numpy(rng.standard_normal((n, 1, coarse, coarse)).astype(np.float32))
    return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)[:, 0].numpy()


def _mask(k: int, yy: np.ndarray, xx: np.ndarray, r: float, vertical: bool) -> np.ndarray:
    if k == 1:
        return yy ** 2 + xx ** 2 <= r ** 2
    if k == 2:
        return np.maximum(np.abs(yy), np.abs(xx)) <= 0.85 * r
    if k == 3:
        a, b = (1.3 * r, 0.6 * r) if vertical else (0.6 * r, 1.3 * r)
        return (yy / a) ** 2 + (xx / b) ** 2 <= 1
    if k == 4:
        return np.abs(yy) + np.abs(xx) <= 1.2 * r
    d2 = yy ** 2 + xx ** 2
    return (d2 <= r ** 2) & (d2 >= (0.55 * r) ** 2)


def _texture(k: int, rng: np.random.Generator, size: int) -> np.ndarray:
    if k in (1, 3):
        return SHAPE_LEVEL + 0.12 * rng.standard_normal((size, size))
    if k in (2, 4):
        stripes = np.where((np.arange(size) // 2) % 2 == 0, 0.12, -0.12)
        return SHAPE_LEVEL + np.broadcast_to(stripes[:, None], (size, size))
    return np.full((size, size), SHAPE_LEVEL)


def scenes(rng: np.random.Generator, n: int, probs: np.ndarray, group: int, imbalance: str, size: int,
           noise: float, inverted: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """n scenes of one type: images (n, 1, size, size) float32, masks (n, size, size) int64.
    ``probs``: P(shape k present), k = 1..5."""
    images = GROUND[group] + 0.08 * _smooth_noise(rng, n, size)
    masks = np.zeros((n, size, size), np.int64)
    radii = RADII[imbalance] * size / 32
    grid = np.arange(size, dtype=np.float64)
    for i in range(n):
        present = rng.random(5) < probs
        for k in np.flatnonzero(present) + 1:
            r = rng.uniform(*radii[k - 1])
            cy, cx = rng.uniform(r * 0.6, size - r * 0.6, 2)
            m = _mask(int(k), grid[:, None] - cy, grid[None, :] - cx, r, bool(rng.random() < 0.5))
            images[i][m] = _texture(int(k), rng, size)[m]
            masks[i][m] = k
    if inverted:  # dark shapes on a light ground
        images = 1.0 - images
    images = images + noise * rng.standard_normal(images.shape)
    return images[:, None].astype(np.float32), masks


@dataclass(frozen=True, kw_only=True)
class SceneSettings:
    """What the generator reads from the ``ceco`` table (built by keyword from it)."""

    imbalance: str = "severe"
    scene_groups: int = 2
    image_size: int = 32
    noise: float = 0.08
    images_per_client: int = 200
    test_per_group: int = 150
    inverted_type1: bool = False

    @classmethod
    def from_options(cls, options: dict) -> "SceneSettings":
        return cls(**{f: options[f] for f in cls.__dataclass_fields__})

    def group_of(self, client_id: int) -> int:
        return int(client_id) % self.scene_groups


def client_scenes(settings: SceneSettings, seed: int, client_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Client ``client_id``'s images and masks (its scene type's class mix)."""
    g = settings.group_of(client_id)
    rng = np.random.default_rng(np.random.SeedSequence([seed, streams.CECO_DATA, int(client_id)]))
    probs = presence(settings.imbalance, settings.scene_groups)[g]
    return scenes(rng, settings.images_per_client, probs, g, settings.imbalance, settings.image_size, settings.noise,
                  settings.inverted_type1 and g == 1)


def held_out_scenes(settings: SceneSettings, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per scene type, ``test_per_group`` class-balanced scenes (each shape present with
    probability 1/2) on that type's ground."""
    out = []
    for g in range(settings.scene_groups):
        rng = np.random.default_rng(np.random.SeedSequence([seed, streams.CECO_TEST, g]))
        out.append(scenes(rng, settings.test_per_group, np.full(5, 0.5), g, settings.imbalance,
                          settings.image_size, settings.noise, settings.inverted_type1 and g == 1))
    return out


def pixel_frequencies(masks: np.ndarray) -> np.ndarray:
    """(K,) share of the pixels of each class."""
    counts = np.bincount(np.asarray(masks).ravel(), minlength=K).astype(np.float64)
    return counts / max(counts.sum(), 1.0)

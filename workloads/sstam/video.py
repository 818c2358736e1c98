"""Real compressed video, made offline: generated scenes, encoded and decoded by PyAV.

- **Contents** (``Content``): a *kind* of scene over a bundled colour photo (scikit-image,
  scikit-learn) or a procedural texture, each drawn from its own seed:
  ``pan`` (a window moving across the photo: everything moves), ``static-disc`` (a still
  photo with one small disc moving across it: mostly static), ``shapes`` (textured shapes
  moving over a still procedural background), ``zoom`` (a slow zoom into the photo) and
  ``grain`` (a still photo under fresh film grain every frame: static but never still).
- **Ladders** (``LADDERS``): H.264 (libx264, veryfast) at CRF 18..43 with the deblocking
  filter on, the same with it off, and MPEG-2 at fixed quantisers 3..31. MPEG-2's rate
  control does not work at this frame size (the spec's feasibility run: two bit rates gave
  byte-identical streams), so its quantiser is pinned with ``qmin = qmax``. Every ladder's
  level rises with compression. The hidden group of a ladder is its codec (``CODECS``).
- **Proxy** ground truth: the mean luma SSIM of the decoded frames against the source's
  luma (scikit-image), and the luma PSNR; a full reference, which a no-reference metric
  must predict from the decoded video alone.

Everything is a pure function of the content, the ladder and the level: the same bytes on
every machine that has the pinned PyAV (its wheel bundles FFmpeg and x264), whatever its core
count, since the encoders run on one thread and x264 without its macroblock tree.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from workloads import streams

HEIGHT, WIDTH = 128, 160  # multiples of 16 (macroblocks) and of 32 (the temporal model's patches)
FRAMES = 24
GOP = 12  # an I-frame every 12 frames: where H.264 and MPEG-2 refresh, flicker shows

KINDS = ("pan", "static-disc", "shapes", "zoom", "grain")
# the colour photos both packages ship (no download)
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "retina", "immunohistochemistry", "china", "flower")

# ladder -> (codec, levels), each level more compressed than the one before
LADDERS: dict[str, tuple[str, tuple[int, ...]]] = {
    "h264": ("libx264", (18, 23, 28, 33, 38, 43)),
    "h264-nodeblock": ("libx264", (18, 23, 28, 33, 38, 43)),
    "mpeg2": ("mpeg2video", (3, 8, 16, 31)),
}
CODECS = ("h264", "mpeg2")  # the hidden groups: a ladder's codec
CODEC_OF = {"h264": 0, "h264-nodeblock": 0, "mpeg2": 1}


@dataclass(frozen=True)
class Content:
    """One source video: its kind, its photo (unused by ``shapes``) and its seed."""

    kind: str
    photo: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.photo}" if self.kind != "shapes" else f"shapes:{self.seed}"


def contents(count: int, seed: int) -> tuple[Content, ...]:
    """``count`` contents cycling through the kinds and photos so that every kind appears
    with several photos; seeds derive from ``seed`` (the detector-training set uses another)."""
    out = []
    for i in range(count):
        kind = KINDS[i % len(KINDS)]
        photo = PHOTOS[(5 * i + i // len(KINDS)) % len(PHOTOS)]  # 5 and 8 coprime: each kind meets several photos
        out.append(Content(kind, photo, int(np.random.SeedSequence([seed, streams.SSTAM_CONTENT, i])
                                            .generate_state(1)[0])))
    return tuple(out)


@lru_cache(maxsize=None)
def photo(name: str) -> np.ndarray:
    """A bundled colour photo as floats in [0, 1], scaled down towards half size (detail at the
    scale of a 160 x 128 frame) but no shorter than 224 pixels (room for pans and zooms)."""
    from skimage import data
    from skimage.transform import rescale

    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        image = load_sample_image(f"{name}.jpg")
    else:
        image = getattr(data, name)()
    image = np.asarray(image, np.float64)[..., :3] / 255.0
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    scale = min(1.0, max(0.5, 224 / min(image.shape[:2])))
    return rescale(image, scale, channel_axis=-1, anti_aliasing=True)


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A still procedural colour texture: a few oriented sinusoids plus smoothed noise."""
    from scipy.ndimage import gaussian_filter

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    out = np.zeros((h, w, 3))
    for _ in range(4):
        angle, freq, phase = rng.uniform(0, np.pi), rng.uniform(0.05, 0.4), rng.uniform(0, 2 * np.pi)
        wave = np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
        out += wave[..., None] * rng.uniform(0.02, 0.12, 3)
    noise = gaussian_filter(rng.standard_normal((h, w, 3)), (1.5, 1.5, 0))
    return np.clip(0.5 + out + 0.08 * noise / noise.std(), 0, 1)


def render(content: Content, frames: int = FRAMES) -> np.ndarray:
    """The source video: (frames, HEIGHT, WIDTH, 3) uint8 RGB."""
    from skimage.transform import resize

    rng = np.random.default_rng(content.seed)
    h, w = HEIGHT, WIDTH
    out = np.empty((frames, h, w, 3))
    if content.kind == "shapes":
        background = _texture(rng, h, w)
        shapes = [(rng.uniform(8, 18), rng.uniform(0, w), rng.uniform(0, h), rng.uniform(-3, 3), rng.uniform(-2, 2),
                   rng.uniform(0, 1, 3), _texture(rng, h, w)) for _ in range(3)]
        yy, xx = np.mgrid[0:h, 0:w]
        for t in range(frames):
            frame = background.copy()
            for radius, x0, y0, vx, vy, colour, texture in shapes:
                inside = (xx - (x0 + vx * t)) ** 2 + (yy - (y0 + vy * t)) ** 2 < radius ** 2
                frame[inside] = 0.6 * colour + 0.4 * texture[inside]
            out[t] = frame
    else:
        image = photo(content.photo)
        ph, pw, _ = image.shape
        vy, vx = int(rng.integers(-1, 2)), int(rng.choice([-2, -1, 1, 2]))
        span_y, span_x = (frames - 1) * vy, (frames - 1) * vx  # how far a pan travels
        y0 = int(rng.integers(max(0, -span_y), ph - h - max(0, span_y, 2 * frames) + 1))
        x0 = int(rng.integers(max(0, -span_x), pw - w - max(0, span_x, 2 * frames) + 1))
        for t in range(frames):
            if content.kind == "pan":
                ty, tx = y0 + vy * t, x0 + vx * t
                out[t] = image[ty:ty + h, tx:tx + w]
            elif content.kind == "zoom":
                grow = int(round(t * 1.5))
                window = image[y0:y0 + h + grow, x0:x0 + w + int(round(grow * w / h))]
                out[t] = resize(window, (h, w, 3), anti_aliasing=True)
            else:
                out[t] = image[y0:y0 + h, x0:x0 + w]
        if content.kind == "static-disc":
            yy, xx = np.mgrid[0:h, 0:w]
            cy, colour = rng.uniform(0.3 * h, 0.7 * h), rng.uniform(0, 1, 3)
            for t in range(frames):
                out[t][(xx - (w * t / frames)) ** 2 + (yy - cy) ** 2 < 10 ** 2] = colour
        elif content.kind == "grain":
            out += 0.03 * rng.standard_normal(out.shape[:3])[..., None]
    return np.round(np.clip(out, 0, 1) * 255).astype(np.uint8)


def _planes(frames: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """yuv420p arrays (as PyAV gives them) to Y (T, H, W) and U, V (T, H/2, W/2), floats in [0, 1]."""
    yuv = np.stack(frames).astype(np.float32) / 255.0
    h, w = HEIGHT, WIDTH
    y = yuv[:, :h]
    chroma = yuv[:, h:].reshape(len(frames), 2, h // 2, w // 2)
    return np.ascontiguousarray(y), np.ascontiguousarray(chroma[:, 0]), np.ascontiguousarray(chroma[:, 1])


def _yuv420p(video: np.ndarray) -> list[np.ndarray]:
    """Each RGB frame as a yuv420p array (H * 3/2, W), converted by FFmpeg's swscale."""
    import av

    return [av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuv420p").to_ndarray() for f in video]


def to_yuv(video: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The source's planes through the same RGB -> yuv420p conversion the encoder is fed."""
    return _planes(_yuv420p(video))


def encode(video: np.ndarray, ladder: str, level: int) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], int]:
    """Encode ``video`` (uint8 RGB) in memory and decode it back: the decoded (Y, U, V) and
    the stream's size in bytes."""
    import av

    if ladder not in LADDERS:
        raise ValueError(f"unknown ladder {ladder!r}; expected one of {list(LADDERS)}")
    codec, _ = LADDERS[ladder]
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4" if codec == "libx264" else "mpeg") as container:
        stream = container.add_stream(codec, rate=24)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        # Reproducible streams (measured, PyAV 18.1's x264): its thread pool follows the CPUs a
        # process may use and the bitstream follows the pool (another stream under taskset -c 0);
        # and its macroblock-tree rate control gave a different stream on every call for grainy
        # content even on one thread. One thread, no mbtree: the same bytes in every process.
        stream.codec_context.thread_count = 1
        if codec == "libx264":
            params = f"keyint={GOP}:min-keyint={GOP}:scenecut=0:threads=1:no-mbtree=1"
            if ladder.endswith("nodeblock"):
                params += ":no-deblock=1"
            stream.options = {"crf": str(level), "preset": "veryfast", "x264-params": params}
        else:
            stream.gop_size = GOP
            stream.codec_context.qmin = stream.codec_context.qmax = int(level)
        for t, frame in enumerate(_yuv420p(video)):
            picture = av.VideoFrame.from_ndarray(frame, format="yuv420p")
            picture.pts = t  # timestamps in 1/24 s, as the stream's rate says
            container.mux(stream.encode(picture))
        container.mux(stream.encode())
    data = buffer.getvalue()
    with av.open(io.BytesIO(data)) as container:
        decoded = [f.to_ndarray(format="yuv420p") for f in container.decode(video=0)]
    if len(decoded) != len(video):
        raise RuntimeError(f"{ladder} at {level}: decoded {len(decoded)} of {len(video)} frames")
    return _planes(decoded), len(data)


def proxy(reference_y: np.ndarray, decoded_y: np.ndarray) -> tuple[float, float]:
    """(mean luma SSIM, mean luma PSNR in dB) of a decoded video against its source."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    ssim = [structural_similarity(r, d, data_range=1.0) for r, d in zip(reference_y, decoded_y)]
    psnr = [peak_signal_noise_ratio(r, d, data_range=1.0) for r, d in zip(reference_y, decoded_y)]
    return float(np.mean(ssim)), float(np.mean(np.minimum(psnr, 100.0)))

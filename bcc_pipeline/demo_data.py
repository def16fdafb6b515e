"""SYNTHETIC H&E-like demo tiles, so the demo runs offline without a dataset download.

Nothing here is real histology. The images are drawn by a small procedural model that
only imitates the look of haematoxylin & eosin (H&E) stained breast tissue at low power:

* pink, fibrous eosin stroma with some lighter gaps, and
* purple haematoxylin nuclei with soft edges and chromatin texture.

"Malignant" tiles have larger, darker, more irregular (jagged) and more crowded nuclei
with more size variation (pleomorphism); "benign" tiles have small, round, regular,
evenly spaced, lighter nuclei.

The two classes deliberately OVERLAP, so that a classifier cannot reach a trivial 100 %:
every image gets a latent malignancy score ``z`` (benign ``z ~ N(0, 1)``, malignant
``z ~ N(separation, 1)``) and every nuclear property is derived from ``z`` plus independent
per-image noise. The label only reaches the pixels through ``z``, so no classifier can beat
the Bayes accuracy ``Phi(separation / 2)`` (about 0.955 for the default 3.4 with balanced
classes). On top of that each tile gets nuisance variation that carries no label
information at all: stain intensity and hue, brightness, slight blur, pixel noise,
amount of empty space, fibre direction, rotation and flips.

With ``groups > 0`` the images are spread over synthetic "patients" (one label each); the
images of one patient share part of their latent score and their stain batch, like slides
of one patient do, so a split that ignores patients is optimistic - as with real data.

Everything is deterministic given the seed. Generation uses numpy and OpenCV only and takes
about 35 ms per 224 px tile, PNG writing included (the default 239 tiles in under 10 s on
one core).
"""

from __future__ import annotations

import hashlib
import math
import operator
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .files import atomic_write
from .model import CLASS_NAMES

__all__ = [
    "DEFAULT_SEPARATION",
    "HOLDOUT_SEED_OFFSET",
    "LABELS",
    "MIN_PATIENTS",
    "TILES_PER_PATIENT",
    "bayes_accuracy",
    "generate",
    "patients_for",
    "render_tile",
]

LABELS = CLASS_NAMES  # one label tuple, the model's class order

#: Distance between the class means of the latent malignancy score, in units of its
#: within-class standard deviation. Bayes accuracy for balanced classes is Phi(d / 2):
#: 3.4 -> 0.955.
DEFAULT_SEPARATION: float = 3.4

# Latent score -> appearance: m = z / _Z_SCALE is 0 for a typical benign and 1 for a typical
# malignant tile at the default separation. Fixed (not tied to ``separation``) so that a
# larger separation really gives more visibly different classes.
_Z_SCALE = 3.4
# Independent per-image noise (in z units) added to z before it drives each property.
_PROPERTY_NOISE = 0.45
_M_RANGE = (-0.8, 1.8)

# Macenko's reference H&E stain vectors (optical density per unit concentration, R, G, B).
_H_VEC = np.array([0.5626, 0.7201, 0.4062], dtype=np.float32)
_E_VEC = np.array([0.2159, 0.8012, 0.5581], dtype=np.float32)

_FORMATS = {"png": ".png", "jpg": ".jpg", "jpeg": ".jpg"}
_MAX_SIZE = 4096
_PATIENT_SHARE = 0.5  # share of the latent-score variance common to one patient's images
#: Tiles per synthetic patient that ``bcc demo-data`` aims at: several, so that a split by image would
#: put tiles of one patient on both sides and only the group path keeps them together.
TILES_PER_PATIENT = 5
#: Fewest patients per label ``bcc demo-data`` spreads a label over (holdout, calibration, validation and
#: training each take whole patients: 10 leaves each role one or more).
MIN_PATIENTS = 10
#: Added to the seed for a holdout set, so that its tiles and patients are new draws.
HOLDOUT_SEED_OFFSET = 100_003


def bayes_accuracy(separation: float = DEFAULT_SEPARATION) -> float:
    """Best possible accuracy for balanced classes at ``separation``: ``Phi(separation / 2)``."""
    return 0.5 * (1.0 + math.erf(separation / 2.0 / math.sqrt(2.0)))


# --------------------------------------------------------------------------- rendering


def _noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Gaussian-blurred white noise normalised to zero mean, unit standard deviation."""
    n = rng.standard_normal((size, size), dtype=np.float32)
    if sigma > 0.3:
        n = cv2.GaussianBlur(n, (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT)
    n -= n.mean()
    sd = float(n.std())
    return n / sd if sd > 1e-8 else n


def _line_kernel(length: int, angle: float) -> np.ndarray:
    """A normalised 1-px line of ``length`` at ``angle`` (radians), for fibre-like motion blur."""
    k = np.zeros((length, length), dtype=np.float32)
    c = (length - 1) / 2.0
    dx, dy = math.cos(angle) * c, math.sin(angle) * c
    cv2.line(
        k,
        (round((c - dx) * 16), round((c - dy) * 16)),
        (round((c + dx) * 16), round((c + dy) * 16)),
        1.0,
        1,
        cv2.LINE_8,
        4,
    )
    return k / max(float(k.sum()), 1e-6)


def _stroma(rng: np.random.Generator, size: int, s: float) -> tuple[np.ndarray, np.ndarray]:
    """Eosin concentration of the stroma (fibres, slow variation) and a soft 'gap' mask."""
    length = max(5, int(round(25 * s)) | 1)
    theta = rng.uniform(0, math.pi)
    fibres = np.zeros((size, size), dtype=np.float32)
    for angle, weight in ((theta, 1.0), (theta + rng.normal(0, 0.5), 0.6)):
        layer = cv2.filter2D(
            _noise(rng, size, 0.9 * s), -1, _line_kernel(length, angle), borderType=cv2.BORDER_REFLECT
        )
        fibres += weight * layer
    fibres /= max(float(fibres.std()), 1e-6)
    slow = _noise(rng, size, 18 * s)

    # Lighter gaps (loose connective tissue, small lumina): a thresholded smooth field.
    gap_field = _noise(rng, size, 9 * s) + 0.5 * _noise(rng, size, 3 * s)
    gap_frac = rng.uniform(0.02, 0.25)
    thr = float(np.quantile(gap_field, 1.0 - gap_frac))
    gaps = np.clip((gap_field - thr) / 0.35 + 0.5, 0.0, 1.0)
    gaps = cv2.GaussianBlur(gaps, (0, 0), sigmaX=1.2 * s + 0.3)

    base = rng.uniform(0.40, 0.70)
    eosin = base * (1.0 + 0.16 * fibres + 0.12 * slow)
    eosin *= 1.0 - 0.85 * gaps
    return np.clip(eosin, 0.0, None), gaps


def _properties(z: float, rng: np.random.Generator, s: float) -> dict[str, float]:
    """Nuclear properties of one tile, each from ``z`` plus its own independent noise."""

    def m() -> float:
        v = (z + _PROPERTY_NOISE * rng.standard_normal()) / _Z_SCALE
        return float(np.clip(v, *_M_RANGE))

    return {
        "radius": s * 6.0 * (10.5 / 6.0) ** m(),  # median nuclear radius, px
        "irregularity": max(0.02, 0.04 + 0.17 * m()),  # amplitude of outline distortion
        "cover": float(np.clip(0.10 + 0.16 * m(), 0.04, 0.5)),  # nuclear area fraction of tissue
        "darkness": max(0.35, 0.75 + 0.55 * m()),  # haematoxylin concentration
        "pleomorphism": max(0.03, 0.08 + 0.22 * m()),  # sd of log radius within the tile
        "regularity": float(np.clip(1.0 - m(), 0.0, 1.0)),  # 1 = even spacing, 0 = clustered
        "chromatin": max(0.08, 0.18 + 0.22 * m()),  # chromatin texture amplitude
    }


def _nuclei(
    rng: np.random.Generator, size: int, s: float, p: dict[str, float], gaps: np.ndarray
) -> np.ndarray:
    """Haematoxylin concentration map of the nuclei."""
    r_med, pleo = p["radius"], p["pleomorphism"]
    aspect_sd = 0.12 + 0.5 * p["irregularity"]
    mean_area = math.pi * r_med**2 * math.exp(2 * pleo**2) * (1 + aspect_sd)
    n_target = p["cover"] * size * size / mean_area

    # Positions: a jittered hexagonal grid (even spacing) partly pulled into clusters.
    sp = size / math.sqrt(max(n_target, 1.0))
    ox, oy = rng.uniform(0, sp, 2)
    rows = np.arange(-1, int(size / (sp * 0.866)) + 2)
    cols = np.arange(-1, int(size / sp) + 2)
    gx, gy = np.meshgrid(cols * sp, rows * sp * 0.866)
    gx = gx + (rows[:, None] % 2) * sp / 2
    pts = np.stack([gx.ravel() + ox, gy.ravel() + oy], axis=1) - sp / 2
    irr = 1.0 - p["regularity"]
    pts += rng.normal(0, sp * (0.12 + 0.30 * irr), pts.shape)
    n_clusters = rng.integers(3, 7)
    centres = rng.uniform(0, size, (n_clusters, 2))
    nearest = centres[np.argmin(((pts[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)]
    pts += (0.35 * irr) * (nearest - pts)
    pts = pts[(pts > -r_med).all(1) & (pts < size + r_med).all(1)]
    # No nuclei in the empty gaps.
    ij = np.clip(pts.round().astype(int), 0, size - 1)
    pts = pts[gaps[ij[:, 1], ij[:, 0]] < 0.5]
    rng.shuffle(pts)
    n = len(pts)

    hmap = np.zeros((size, size), dtype=np.float32)
    if n == 0:
        return hmap
    # Shapes: polygon outlines = ellipse x (smooth harmonics + jagged per-vertex noise).
    k = 20
    ang = np.linspace(0, 2 * math.pi, k, endpoint=False)
    radii = r_med * np.exp(rng.normal(0, pleo, n))
    harm = np.zeros((n, k))
    for h in (2, 3, 4, 5):
        amp = rng.normal(0, p["irregularity"] / h**0.5, n)
        harm += amp[:, None] * np.cos(h * ang[None] + rng.uniform(0, 2 * math.pi, n)[:, None])
    jag = rng.normal(0, 0.35 * p["irregularity"], (n, k))
    rad = radii[:, None] * np.clip(1.0 + harm + jag, 0.35, 2.0)
    aspect = 1.0 + np.abs(rng.normal(0, aspect_sd, n))
    rot = rng.uniform(0, math.pi, n)
    x = rad * np.cos(ang)[None] * np.sqrt(aspect)[:, None]
    y = rad * np.sin(ang)[None] / np.sqrt(aspect)[:, None]
    cr, sr = np.cos(rot)[:, None], np.sin(rot)[:, None]
    poly = np.stack([pts[:, :1] + x * cr - y * sr, pts[:, 1:] + x * sr + y * cr], axis=-1)
    poly = np.round(poly * 16).astype(np.int32)  # 4 fractional bits (shift=4)
    level = p["darkness"] * np.exp(rng.normal(0, 0.10 + 0.4 * pleo, n))
    for i in range(n):
        cv2.fillPoly(hmap, [poly[i]], float(level[i]), cv2.LINE_8, 4)

    # Chromatin texture: fine granules plus coarser clumps, stronger in malignant nuclei.
    tex = 0.6 * _noise(rng, size, 0.5 * s + 0.2) + 0.4 * _noise(rng, size, 1.3 * s)
    hmap *= np.clip(1.0 + p["chromatin"] * tex, 0.3, 2.0)
    # Nucleoli: small dark dots, more frequent when the nuclei are atypical.
    p_nucleolus = float(np.clip(0.6 * (p["irregularity"] - 0.08) / 0.25, 0.0, 0.8))
    has = rng.random(n) < p_nucleolus
    for (cx, cy), r, lv in zip(pts[has], radii[has], level[has], strict=True):
        cv2.circle(
            hmap,
            (round(cx * 16), round(cy * 16)),
            max(1, round(0.22 * r * 16)),
            float(1.5 * lv),
            -1,
            cv2.LINE_8,
            4,
        )
    # Soft edges.
    return cv2.GaussianBlur(hmap, (0, 0), sigmaX=0.45 * s + 0.25)


def _stain(rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """A random stain batch as 9 offsets: H and E stain vector (hue) shifts, log gains, log brightness.

    Offsets add up, so a patient's batch plus a smaller per-slide deviation is just a sum.
    """
    sd = np.array([0.04] * 3 + [0.05] * 3 + [0.18, 0.22, 0.06])
    return rng.normal(0.0, 1.0, 9) * sd * scale


def _render(z: float, rng: np.random.Generator, size: int, stain: np.ndarray | None) -> np.ndarray:
    s = size / 224.0
    props = _properties(z, rng, s)
    eosin, gaps = _stroma(rng, size, s)
    haem = _nuclei(rng, size, s, props, gaps)
    # A faint haematoxylin counterstain everywhere in the tissue.
    haem += (0.06 + 0.04 * _noise(rng, size, 2.0 * s)).clip(0, None) * (1.0 - gaps)
    # Cells displace stroma: less eosin where the nuclei are.
    eosin *= 1.0 - 0.4 * np.clip(haem / max(props["darkness"], 1e-3), 0.0, 1.0)

    # Nuisance (no label information): stain batch, hue, brightness, blur, noise, orientation.
    st = _stain(rng) if stain is None else stain + _stain(rng, 0.5)
    h_vec = np.abs(_H_VEC + st[0:3])
    e_vec = np.abs(_E_VEC + st[3:6])
    h_vec = (h_vec / np.linalg.norm(h_vec) * math.exp(st[6])).astype(np.float32)
    e_vec = (e_vec / np.linalg.norm(e_vec) * math.exp(st[7])).astype(np.float32)
    od = haem[..., None] * h_vec + eosin[..., None] * e_vec
    rgb = (255.0 * math.exp(st[8])) * np.exp(-od)
    sigma = rng.uniform(0.0, 0.9) * s
    if sigma > 0.25:
        rgb = cv2.GaussianBlur(rgb, (0, 0), sigmaX=sigma)
    rgb += rng.normal(0, rng.uniform(1.0, 4.0), rgb.shape).astype(np.float32)
    out = np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    out = np.rot90(out, int(rng.integers(4)))
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def _check_size(size: Any) -> int:
    size = _count("size", size)
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    if size > _MAX_SIZE:
        raise ValueError(f"size must be <= {_MAX_SIZE}, got {size}")
    return size


def render_tile(z: float, rng: np.random.Generator, *, size: int = 224) -> np.ndarray:
    """Render one SYNTHETIC H&E-like tile for latent malignancy score ``z``.

    ``z`` around 0 looks benign, around :data:`DEFAULT_SEPARATION` malignant; ``rng``
    supplies all remaining randomness (per-image property noise and nuisance variation).
    Returns an RGB ``uint8`` array of shape ``(size, size, 3)``.
    """
    size = _check_size(size)
    z = float(z)
    if not math.isfinite(z):
        raise ValueError(f"z must be finite, got {z}")
    return _render(z, rng, size, None)


# --------------------------------------------------------------------------- writing


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    return v


def _encode(rgb: np.ndarray, ext: str) -> bytes:
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    params = [cv2.IMWRITE_PNG_COMPRESSION, 3] if ext == ".png" else [cv2.IMWRITE_JPEG_QUALITY, 92]
    ok, buf = cv2.imencode(ext, bgr, params)
    if not ok:  # pragma: no cover - cv2 always encodes a plain uint8 image
        raise RuntimeError(f"cv2 could not encode a {ext} image")
    return buf.tobytes()


def _write_unique(folder: Path, stem: str, ext: str, data: bytes) -> Path:
    """Write ``data`` atomically as ``folder/stem<ext>``; never replace a different file.

    An identical existing file is reused (re-running ``generate`` is idempotent); a
    different one makes us pick ``stem_1``, ``stem_2``, ...
    """
    for attempt in range(1000):
        path = folder / (f"{stem}{ext}" if attempt == 0 else f"{stem}_{attempt}{ext}")
        try:
            return atomic_write(path, data, exclusive=True, fsync=False)
        except FileExistsError:
            try:
                if path.is_file() and path.read_bytes() == data:
                    return path
            except OSError:
                pass
    raise FileExistsError(f"no free file name for {stem}{ext} in {folder}")  # pragma: no cover


def _patients(counts: dict[str, int], groups: int, first: int = 1) -> dict[str, list[int]]:
    """Patient ids per label: ``groups`` per label (fewer if a label has fewer images).

    Ids are numbered across labels (benign first) from ``first``, so a patient id never holds two labels.
    """
    out: dict[str, list[int]] = {}
    next_id = first
    for lab in LABELS:
        k = min(groups, counts[lab])
        out[lab] = list(range(next_id, next_id + k))
        next_id += k
    return out


def generate(
    out_dir: str | os.PathLike[str],
    *,
    benign: int = 112,
    malignant: int = 127,
    size: int = 224,
    seed: int = 42,
    separation: float = DEFAULT_SEPARATION,
    groups: int = 0,
    fmt: str = "png",
    first_patient: int = 1,
) -> dict[str, Any]:
    """Write a SYNTHETIC two-class H&E-like demo data set and return what was written.

    Layout: ``out_dir/benign/benign_0001_<6 hex>.png`` and ``out_dir/malignant/...``; with
    ``groups > 0`` the images of each label are spread over ``groups`` patient folders
    ``out_dir/<label>/patient_XX/`` (fewer if the label has fewer images; each patient has one label,
    numbered across labels from ``first_patient``: give a second set of patients, such as a holdout,
    ids after the first set's). The hex part is a content hash. Files are written atomically
    and an existing different file is never overwritten.

    Returns ``{"out_dir", "benign", "malignant", "files", "seed", "patients"}`` (``patients``: how many
    patient ids were used).
    """
    n = {"benign": _count("benign", benign), "malignant": _count("malignant", malignant)}
    size = _check_size(size)
    seed = _count("seed", seed)
    groups = _count("groups", groups)
    try:
        separation = float(separation)
    except (TypeError, ValueError):
        raise ValueError(f"separation must be a number, got {separation!r}") from None
    if not math.isfinite(separation) or separation < 0:
        raise ValueError(f"separation must be finite and >= 0, got {separation}")
    if not isinstance(fmt, str) or fmt.lower() not in _FORMATS:
        raise ValueError(f"fmt must be one of {sorted(_FORMATS)}, got {fmt!r}")
    ext = _FORMATS[fmt.lower()]
    first_patient = _count("first_patient", first_patient)
    patients = _patients(n, groups, max(1, first_patient)) if groups > 0 else None

    root = Path(out_dir)
    files: list[str] = []
    width = max(4, len(str(max(n.values(), default=0))))
    pwidth = max(2, len(str(max(1, first_patient) + 2 * groups)))
    for label_idx, label in enumerate(LABELS):
        count = n[label]
        mean = separation * label_idx
        owners: list[int | None] = [None] * count
        if patients is not None and count > 0:
            blocks = np.array_split(np.arange(count), len(patients[label]))
            owners = [pid for pid, block in zip(patients[label], blocks, strict=True) for _ in block]
        patient: dict[int, tuple[float, np.ndarray]] = {}
        for i in range(count):
            rng = np.random.default_rng([seed, label_idx, i])
            pid = owners[i]
            if pid is None:
                z = mean + float(rng.standard_normal())
                folder = root / label
                stain = None
            else:
                if pid not in patient:
                    prng = np.random.default_rng([seed, 1000 + pid])
                    patient[pid] = (float(prng.standard_normal()), _stain(prng))
                pz, stain = patient[pid]
                # Same marginal N(mean, 1) as without groups; part of it shared by the patient.
                z = (
                    mean
                    + math.sqrt(_PATIENT_SHARE) * pz
                    + math.sqrt(1 - _PATIENT_SHARE) * float(rng.standard_normal())
                )
                folder = root / label / f"patient_{pid:0{pwidth}d}"
            img = _render(z, rng, size, stain)
            data = _encode(img, ext)
            folder.mkdir(parents=True, exist_ok=True)
            stem = f"{label}_{i + 1:0{width}d}_{hashlib.sha256(data).hexdigest()[:6]}"
            files.append(str(_write_unique(folder, stem, ext, data)))
    return {
        "out_dir": str(root),
        "benign": n["benign"],
        "malignant": n["malignant"],
        "files": files,
        "seed": seed,
        "patients": sum(len(p) for p in patients.values()) if patients else 0,
    }


def patients_for(count: int) -> int:
    """Patient folders per label for ``count`` tiles of a label: about :data:`TILES_PER_PATIENT` each, but
    at least :data:`MIN_PATIENTS` (fewer only when there are fewer tiles), so that each data role can
    get whole patients of each label even from a small set."""
    return max(1, min(count, MIN_PATIENTS), math.ceil(count / TILES_PER_PATIENT))

"""Reference statistics for FID: the mean and covariance of a feature network over real images.

FID only ever needs (mu, sigma) of the reference side, so every kind of reference reduces to them:

- a statistics file written by the usual tools, which is what users of real models have (ImageNet
  validation statistics are distributed this way and take seconds to load, not hours to compute):
  * `.npz` with arrays `mu` (F,) and `sigma` (F, F): pytorch-fid (`--save-stats`), clean-fid
    (`make_custom_stats`), and the reference batches of the guided-diffusion evaluation suite,
    which carry `mu` and `sigma` beside their images;
  * `.npz` with `feats` (n, F) only: clean-fid's KID statistics (the features themselves);
  * `.pt`: torch-fidelity's cached statistics (`<input>-<extractor>-stat-fid-<layer>.pt`, a
    pickled dict of numpy `mu` and `sigma`) or this project's own cache of the embedded default
    (torchmetrics' FID states: `real_features_sum`, `real_features_cov_sum`,
    `real_features_num_samples`);
- a folder of reference images (any depth; bmp, jpg, jpeg, pgm, png, ppm, tif, tiff, webp, read
  as RGB), whose statistics are computed once and cached as a pytorch-fid `.npz`;
- the embedded default's Fashion-MNIST test split (evaluation/setup.py).

Statistics are float64 and computed as torchmetrics computes them (sums of features and of their
outer products, covariance with the n - 1 denominator), so a reference built here from images
gives the same FID as torchmetrics' own real-image accumulation.

Reference facts this relies on: mseitzer/pytorch-fid src/pytorch_fid/fid_score.py (save_fid_stats:
np.savez_compressed(path, mu=m1, sigma=s1); loading reads f['mu'], f['sigma']); GaParmar/clean-fid
@01ff748 cleanfid/fid.py make_custom_stats (np.savez_compressed(outf, mu=mu, sigma=sigma); KID
file: np.savez_compressed(outf, feats=np_feats)); toshas/torch-fidelity torch_fidelity/
metric_fid.py fid_features_to_statistics ({'mu': ..., 'sigma': ...}) saved by utils.py
cache_lookup_one_recompute_on_miss as `cached_name + '.pt'` with torch.save; openai/guided-diffusion
evaluations/evaluator.py read_statistics (reference batches: obj['mu'], obj['sigma'], beside
mu_s/sigma_s and the images).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from migm.files import CheckpointError, atomic_write_bytes

IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")
_TORCHMETRICS_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")
HOW_TO_GET = ("write one with pytorch-fid (`python -m pytorch_fid --save-stats IMAGES OUT.npz`) or "
              "clean-fid (make_custom_stats), or give a folder of reference images")


@dataclass
class ReferenceStats:
    """Gaussian statistics of the reference images in one feature space."""

    mu: torch.Tensor              # (F,) float64
    sigma: torch.Tensor           # (F, F) float64
    count: int | None = None      # images behind them, when the source says
    source: str = ""              # where they came from, for messages and reports
    preprocess: str | None = None  # the FID preprocessing they were computed under (quality.py
                                   # fid_preprocess); None: unknown (another tool's file)

    def __post_init__(self) -> None:
        self.mu = torch.as_tensor(np.asarray(self.mu), dtype=torch.float64).reshape(-1)
        self.sigma = torch.as_tensor(np.asarray(self.sigma), dtype=torch.float64)
        F = self.mu.numel()
        if self.sigma.shape != (F, F):
            raise CheckpointError(f"{self.source or 'reference statistics'}: sigma has shape "
                                  f"{tuple(self.sigma.shape)}, expected ({F}, {F}) for a {F}-d mu")

    @property
    def dim(self) -> int:
        return self.mu.numel()

    def save_npz(self, path: str | Path) -> Path:
        """pytorch-fid's layout (mu, sigma), plus the image count and the preprocessing: other
        tools can read it too (they ignore the extra arrays)."""
        path = Path(path)
        arrays = {"mu": self.mu.numpy(), "sigma": self.sigma.numpy()}
        if self.count is not None:
            arrays["count"] = np.asarray(self.count)
        if self.preprocess is not None:
            arrays["fid_preprocess"] = np.asarray(self.preprocess)
        def write(tmp: Path) -> None:
            with tmp.open("wb") as f:                 # a file object: savez adds no suffix
                np.savez(f, **arrays)
        atomic_write_bytes(path, write)
        return path


class StatsAccumulator:
    """Running float64 sums of features and of their outer products (torchmetrics' arithmetic)."""

    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None       # (F,)
        self.outer: torch.Tensor | None = None     # (F, F)
        self.count = 0

    def update(self, features: torch.Tensor) -> None:
        f = features.detach().double().flatten(1).cpu()       # (B, F)
        if self.sum is None:
            self.sum, self.outer = f.new_zeros(f.shape[1]), f.new_zeros(f.shape[1], f.shape[1])
        self.sum += f.sum(0)
        self.outer += f.t() @ f
        self.count += len(f)

    def stats(self, source: str = "") -> ReferenceStats:
        if self.count < 2:
            raise ValueError(f"{source or 'reference'}: FID statistics need at least 2 images, got {self.count}")
        return _from_sums(self.sum, self.outer, self.count, source)


def _from_sums(total: torch.Tensor, outer: torch.Tensor, n: int, source: str) -> ReferenceStats:
    mean = (total / n).unsqueeze(0)                                          # (1, F)
    sigma = (outer - n * mean.t().mm(mean)) / (n - 1)
    return ReferenceStats(mean.squeeze(0), sigma, int(n), source)


@torch.no_grad()
def stats_from_images(feature: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[torch.Tensor],
                      source: str = "", device: torch.device | str | None = None) -> ReferenceStats:
    """Statistics of `feature` over image batches (float (B, C, H, W) in [-1, 1])."""
    acc = StatsAccumulator()
    for images in batches:
        acc.update(feature(images.to(device) if device is not None else images))
    return acc.stats(source)


# --- statistics files -----------------------------------------------------------------------------
def read_stats(path: str | Path) -> ReferenceStats:
    """Reference statistics from a file written by pytorch-fid, clean-fid, torch-fidelity or migm."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"FID reference statistics {path} not found: {HOW_TO_GET}")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        f = _open_npz(path)
        keys = set(f)
        if {"mu", "sigma"} <= keys:
            count = int(f["count"]) if "count" in keys else None
            preprocess = str(f["fid_preprocess"]) if "fid_preprocess" in keys else None
            return ReferenceStats(f["mu"], f["sigma"], count, str(path), preprocess)
        if "feats" in keys:                                       # clean-fid's KID file
            acc = StatsAccumulator()
            acc.update(torch.from_numpy(np.asarray(f["feats"])))
            return acc.stats(str(path))
        raise CheckpointError(f"{path}: no FID statistics in it (arrays {sorted(keys)}; expected mu "
                              "and sigma as pytorch-fid and clean-fid write them, or feats)")
    if suffix == ".pt":
        state = _load_pickled_stats(path)
        if isinstance(state, dict) and {"mu", "sigma"} <= set(state):
            return ReferenceStats(state["mu"], state["sigma"], None, str(path))
        if isinstance(state, dict) and set(_TORCHMETRICS_STATES) <= set(state):
            s = {k: torch.as_tensor(state[k]) for k in _TORCHMETRICS_STATES}
            stats = _from_sums(s["real_features_sum"].double(), s["real_features_cov_sum"].double(),
                               int(s["real_features_num_samples"]), str(path))
            stats.preprocess = state.get("fid_preprocess")        # migm's own caches record it
            return stats
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: no FID statistics in it (found {keys}; expected torch-fidelity's "
                              f"mu and sigma, or torchmetrics' {', '.join(_TORCHMETRICS_STATES)})")
    raise CheckpointError(f"{path}: unknown statistics format {suffix!r}: expected .npz (pytorch-fid, "
                          "clean-fid) or .pt (torch-fidelity), or a folder of images")


def _open_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a statistics .npz, which holds plain arrays only: anything else (a truncated
    download, another file renamed, pickled objects) is one line naming the file, never numpy's
    advice to set allow_pickle."""
    import zipfile
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a numpy .npz archive (corrupt, truncated or another "
                              f"kind of file); {HOW_TO_GET}")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        reason = "it holds pickled objects" if "pickle" in str(err) else str(err)
        raise CheckpointError(f"{path}: not readable as FID statistics ({reason}); {HOW_TO_GET}") from None


def _load_pickled_stats(path: Path):
    """torch.load without arbitrary code: only tensors, and numpy arrays as torch-fidelity pickles them."""
    core = getattr(np, "_core", None) or np.core
    reconstruct = core.multiarray._reconstruct
    allowed = [(reconstruct, "numpy.core.multiarray._reconstruct"),
               (reconstruct, "numpy._core.multiarray._reconstruct"), np.ndarray, np.dtype,
               *(type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int64))]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:                 # not a torch file, or objects we will not unpickle
        raise CheckpointError(f"{path}: cannot read FID statistics from it ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200]})") from None


# --- image folders --------------------------------------------------------------------------------
def image_files(folder: str | Path, limit: int | None = None) -> list[Path]:
    """The images under `folder` (any depth), sorted by path; the first `limit` if given."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"FID reference image folder {folder} not found: give a folder of "
                              f"reference images (e.g. the ImageNet validation set) or {HOW_TO_GET}")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower()[1:] in IMAGE_EXTENSIONS)
    if not files:
        raise CheckpointError(f"FID reference image folder {folder} holds no image "
                              f"({', '.join(IMAGE_EXTENSIONS)})")
    return files[:limit] if limit else files


def load_image(path: Path) -> torch.Tensor:
    """One image file as float (3, H, W) in [-1, 1] (RGB, as pytorch-fid reads it)."""
    from PIL import Image
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"), dtype=np.uint8)              # (H, W, 3)
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def folder_batches(files: list[Path], batch_size: int = 50) -> Iterator[torch.Tensor]:
    """Images in file order, batched; a batch ends early where the image size changes."""
    batch: list[torch.Tensor] = []
    for path in files:
        image = load_image(path)
        if batch and (len(batch) == batch_size or image.shape != batch[0].shape):
            yield torch.stack(batch)
            batch = []
        batch.append(image)
    if batch:
        yield torch.stack(batch)


def folder_cache_name(feature_name: str, folder: Path, files: list[Path]) -> str:
    """A cache key that changes when any file of the reference set is added, removed or rewritten."""
    digest = hashlib.sha256()
    for p in files:
        st = p.stat()
        digest.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return f"{feature_name}_{Path(folder).resolve().name}_{len(files)}_{digest.hexdigest()[:12]}.npz"


def folder_stats(feature, folder: str | Path, limit: int | None = None, cache_dir: Path | None = None,
                 device: torch.device | str | None = None, batch_size: int = 50) -> ReferenceStats:
    """Statistics of `feature` over a folder of images, cached under `cache_dir` as a .npz. The
    images go through `feature` exactly as generated ones do, its FID preprocessing included
    (quality.PreprocessedFeatures), and the cache is keyed by and records that preprocessing."""
    files = image_files(folder, limit)
    key = getattr(feature, "cache_name", None) or getattr(feature, "name", "features")
    name = folder_cache_name(key, Path(folder), files)
    cache = Path(cache_dir) / name if cache_dir else None
    if cache is not None and cache.exists():
        return read_stats(cache)
    stats = stats_from_images(feature, folder_batches(files, batch_size), str(folder), device)
    stats.preprocess = getattr(feature, "preprocess", "standard")
    if cache is not None:
        stats.save_npz(cache)
    return stats

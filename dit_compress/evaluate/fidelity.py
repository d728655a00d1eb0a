"""``ditc eval``: class-balanced, sharded, resumable sampling and torch-fidelity metrics.

Determinism: shard ``i`` always holds the same sample indices and draws its noise from a
generator seeded by (seed, i), so the images do not depend on how many processes ran or
whether the run was interrupted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import statistics
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..assets import EVALS_DIR
from ..data.batches import calibration_set
from ..data.datasets import bundled_digits, check_fits, digits_arrays, load_data, shards_identity
from ..data.vae import decode, load_vae, vae_identity
from .. import checks
from ..diffusion import generation_loop, objective_for
from ..diffusion.caching import run_policy
from ..diffusion.calibration import calibration_losses
from ..diffusion.measure import FlopsMeter
from ..diffusion.sampling import (
    eval_sampler,
    resolve_spacing,
    sample,
)
from ..errors import DitcError, UsageError
from ..model.build import fingerprint
from ..model.family import family_of, require
from ..outputs import atomic_dir, resumable_work, work_dir_for
from ..hashing import file_digest, seal, seal_problem, tree_digest
from ..progress import make_progress, note
from ..report import write_report
from .clip import check_clip, clip_score  # noqa: F401 - check_clip is the commands' too
from .features import class_accuracy, register

METRICS = ("fid", "isc", "kid", "prc")


# ---------------------------------------------------------------------------- images
def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] images [B, C, H, W] -> uint8 [B, H, W, 3]."""
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return x.permute(0, 2, 3, 1).cpu().numpy()


class ArrayImages(torch.utils.data.Dataset):
    """uint8 [N, H, W, 3] array as torch-fidelity's input (uint8 [3, H, W] tensors)."""

    def __init__(self, arr: np.ndarray):
        self.arr = arr

    def __len__(self):
        return len(self.arr)

    def __getitem__(self, i):
        return torch.from_numpy(np.ascontiguousarray(self.arr[i])).permute(2, 0, 1)


def digits_reference(split: str = "train") -> np.ndarray:
    x, _ = digits_arrays(split)
    return to_uint8(torch.from_numpy(x))


def load_image_folder(path: Path) -> np.ndarray:
    files = sorted(p for p in Path(path).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise DitcError(f"reference folder {path} holds no images (.png, .jpg)")
    arrs = []
    size = None
    for f in files:
        a = np.asarray(Image.open(f).convert("RGB"))
        if size is None:
            size = a.shape
        elif a.shape != size:
            raise DitcError(f"reference folder {path}: {f.name} is {a.shape[1]}x{a.shape[0]}, others are {size[1]}x{size[0]}")
        arrs.append(a)
    return np.stack(arrs)


# ---------------------------------------------------------------------------- sampling


def sample_batch(model, cond, g: torch.Generator, negative=None, **sampling) -> torch.Tensor:
    """One batch of an eval: noise drawn from the shard's CPU generator (the same images on any
    device and any process split), sampled on the model's device. ``cond``: class labels, or
    the family's condition of the batch (``negative``: its guidance null)."""
    cfg = model.config
    if isinstance(cond, (list, tuple, np.ndarray)):
        cond = torch.from_numpy(np.asarray(cond)).long()
    noise = torch.randn(len(cond), cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    extra = {"negative": negative} if negative is not None else {}
    return sample(model, noise, cond, generator=g, **sampling, **extra)


def sample_shards(model, out_dir: Path, num_samples: int, sampler: str = "ddim", steps: int = 50,
                  cfg_scale: float = 1.0, cfg_channels: int | None = None, seed: int = 0, shard_size: int = 250,
                  batch_size: int = 125, vae=None, rank: int = 0, world: int = 1,
                  timestep_spacing: str | None = None, guidance_interval=None, compile: bool = False,
                  batch_seconds: list | None = None, conds=None, feature_cache=None) -> list[int]:
    """Write the shards this process owns (shard i -> process i % world); skip finished
    ones. Returns the shard ids written now; ``batch_seconds`` collects (images, seconds)
    of each sampled batch. ``conds``: the family's eval conditions (default: its own, e.g.
    class-balanced labels). ``feature_cache``: the caching policy (a ``BlockCache``), run
    afresh for every batch (its counts add up over them)."""

    cfg = model.config
    conds = conds or family_of(model).eval_conditions(cfg, num_samples)
    labels = conds.labels
    gen = generation_loop(model)  # a family with its own loop (MAR) samples by it
    n_shards = (num_samples + shard_size - 1) // shard_size
    sdir = Path(out_dir) / "samples"
    sdir.mkdir(parents=True, exist_ok=True)
    mine = [i for i in range(n_shards) if i % world == rank]
    todo = []
    for i in mine:
        problem = shard_problem(sdir, i, min(num_samples, (i + 1) * shard_size) - i * shard_size)
        if problem is not None:
            if (sdir / f"shard-{i:05d}.npz").exists() or (sdir / f"shard-{i:05d}.sha256").exists():
                note(f"work shard {sdir / f'shard-{i:05d}.npz'} {problem}: it is sampled again")
            for f in (sdir / f"shard-{i:05d}.npz", sdir / f"shard-{i:05d}.sha256", sdir / f"shard-{i:05d}"):
                _remove(f)
            todo.append(i)
    written = []
    with make_progress(f"sampling ({sampler} {steps})", len(mine) * shard_size, completed=(len(mine) - len(todo)) * shard_size) as bar:
        for i in todo:
            lo, hi = i * shard_size, min(num_samples, (i + 1) * shard_size)
            g = torch.Generator().manual_seed(seed * 1_000_003 + i)
            imgs = []
            for b in range(lo, hi, batch_size):
                e = min(hi, b + batch_size)
                tb = time.perf_counter()
                x = gen.sample_batch(conds.batch(b, e), g, steps, cfg_scale) if gen is not None else \
                    sample_batch(model, conds.batch(b, e), g, conds.negative, sampler=sampler, steps=steps,
                                 cfg_scale=cfg_scale,
                                 cfg_channels=cfg_channels, timestep_spacing=timestep_spacing,
                                 guidance_interval=guidance_interval, compile=compile,
                                 # resolved already: None runs uncached, not the model's learned schedule
                                 feature_cache=feature_cache if feature_cache is not None else "none")
                if batch_seconds is not None:
                    batch_seconds.append((e - b, time.perf_counter() - tb))
                imgs.append(to_uint8(decode(model, x, vae)))
                bar.advance(e - b)
            arr = np.concatenate(imgs)
            write_pngs(sdir / f"shard-{i:05d}", arr, lo)
            tmp = sdir / f".shard-{i:05d}.npz.tmp"
            with open(tmp, "wb") as f:
                np.savez(f, images=arr, labels=labels[lo:hi])
            os.replace(tmp, sdir / f"shard-{i:05d}.npz")
            digest = sdir / f".shard-{i:05d}.sha256.tmp"
            digest.write_text(json.dumps({"sha256": file_digest(sdir / f"shard-{i:05d}.npz"), "images": hi - lo}))
            os.replace(digest, sdir / f"shard-{i:05d}.sha256")  # the shard counts as done only now
            written.append(i)
    return written


def _remove(path: Path) -> None:
    """Remove a file, link or folder at ``path`` (whatever a damaged work dir holds there)."""
    if path.is_symlink() or path.is_file() or (path.exists() and not path.is_dir()):
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def write_pngs(png_dir: Path, arr: np.ndarray, lo: int) -> None:
    """One PNG per image of a shard (``lo`` the first sample's index), replacing what was there."""
    _remove(png_dir)
    png_dir.mkdir()
    for j, a in enumerate(arr):
        Image.fromarray(a).save(png_dir / f"{lo + j:06d}.png")


def shard_problem(sdir: Path, i: int, n: int) -> str | None:
    """Why work shard ``i`` (``n`` images) is not done (None when it is): missing, its digest
    record missing or not matching the file, or the file not holding its ``n`` images."""
    f, rec = sdir / f"shard-{i:05d}.npz", sdir / f"shard-{i:05d}.sha256"
    if not f.exists():
        return "is missing"
    try:
        r = json.loads(rec.read_bytes()[:4096])
        if not isinstance(r, dict) or r.get("images") != n or r.get("sha256") != file_digest(f):
            return "does not match its digest record"
    except FileNotFoundError:
        return "has no digest record (unfinished, or from an older version)"
    except (OSError, ValueError):
        return "has an unreadable digest record"
    return None


def gather_samples(out_dir: Path, num_samples: int, shard_size: int, fresh=()) -> tuple[np.ndarray, np.ndarray]:
    """Every shard's images and labels, each shard verified; the per-image PNGs of the shards not
    written by this very process (``fresh``) are written again from the verified shard."""
    sdir = Path(out_dir) / "samples"
    n_shards = (num_samples + shard_size - 1) // shard_size
    imgs, labels = [], []
    for i in range(n_shards):
        f = sdir / f"shard-{i:05d}.npz"
        n = min(num_samples, (i + 1) * shard_size) - i * shard_size
        problem = shard_problem(sdir, i, n)
        if problem is not None:
            raise DitcError(f"work shard {f} {problem}; rerun to sample it again")
        try:
            with np.load(f) as d:
                a, lab = d["images"], d["labels"]
        except Exception as e:  # noqa: BLE001 - a sealed shard that still cannot be read
            raise DitcError(f"work shard {f} cannot be read ({type(e).__name__}); delete it and rerun") from None
        if len(a) != n or len(lab) != n:
            raise DitcError(f"work shard {f} holds {len(a)} images where {n} belong; delete it and rerun")
        if i not in fresh:  # resumed or another process's: the per-image files from the verified shard
            write_pngs(sdir / f"shard-{i:05d}", a, i * shard_size)
        imgs.append(a)
        labels.append(lab)
    return np.concatenate(imgs), np.concatenate(labels)


# ---------------------------------------------------------------------------- metrics
def resolve_reference(ref: str | None, model_cfg) -> tuple[str, object]:
    """(kind, value): ('array', uint8 array) | ('stats', {'mu','sigma'})."""
    if ref is None:
        if model_cfg.latent_scale is None and model_cfg.input_size == 8:
            ref = "digits"
        else:
            raise UsageError("`ref` is required: an image folder, an ADM .npz (mu/sigma) or 'digits'")
    split = bundled_digits(ref)
    if split is not None:
        return "array", digits_reference(split)
    p = Path(ref)
    if not p.exists():
        raise DitcError(f"reference {ref} does not exist")
    if p.is_dir():
        return "array", load_image_folder(p)
    if p.suffix == ".npz":
        try:
            with np.load(p, allow_pickle=False) as d:
                if "mu" in d and "sigma" in d:
                    return "stats", {"mu": d["mu"], "sigma": d["sigma"]}
                if "arr_0" in d:
                    return "array", d["arr_0"]
        except Exception as e:  # noqa: BLE001 - not an npz archive (a text file so named), truncated, pickled
            raise DitcError(f"reference {ref} is not a readable .npz archive ({type(e).__name__})") from None
        raise DitcError(f"reference {ref} holds neither mu/sigma statistics nor an arr_0 image batch")
    raise DitcError(f"reference {ref}: expected an image folder, a .npz or 'digits'")


def choose_extractor(model_cfg, inception_weights: str | None, extractor: str | None) -> dict:
    if extractor is None:
        extractor = "digits-cnn" if (model_cfg.latent_scale is None and model_cfg.input_size == 8) else "inception-v3-compat"
    kw = {"feature_extractor": extractor}
    if extractor == "digits-cnn":
        register()
    elif extractor.startswith("inception"):
        if inception_weights is None:
            raise UsageError("Inception features need local weights here: pass `inception_weights` PATH (a .pth file)")
    if inception_weights is not None:
        p = Path(inception_weights)
        if not p.exists():
            raise DitcError(f"Inception weights {p} do not exist")
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise DitcError(f"Inception weights {p} do not load: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        if not isinstance(state, dict) or not state:
            raise DitcError(f"Inception weights {p} do not hold a state dict")
        kw["feature_extractor_weights_path"] = str(p)
    return kw


def compute_metrics(samples: np.ndarray, ref_kind: str, ref, metrics: list[str], extractor_kw: dict,
                    kid_subset_size: int | None = None) -> dict:
    import torch_fidelity

    check_metrics(metrics, len(samples), kid_subset_size)
    n = len(samples)
    if "kid" in metrics:
        kss = kid_subset_size or min(1000, n, len(ref) if ref_kind == "array" else n)
        if kss > n or (ref_kind == "array" and kss > len(ref)):
            raise UsageError(f"KID subset size {kss} is larger than the number of samples ({n}) or reference images")
    if ref_kind == "array" and ref.shape[1:3] != samples.shape[1:3]:
        raise DitcError(f"reference images are {ref.shape[2]}x{ref.shape[1]} but samples are {samples.shape[2]}x{samples.shape[1]}")
    out = {}
    common = dict(cuda=torch.cuda.is_available(), verbose=False, cache=False, batch_size=256, save_cpu_ram=True,
                  **extractor_kw)
    if ref_kind == "stats":
        if metrics != ["fid"] and set(metrics) - {"fid", "isc"}:
            raise UsageError("reference statistics (mu/sigma) support fid and isc only")
        from torch_fidelity.metric_fid import (
            fid_features_to_statistics,
            fid_statistics_to_metric,
        )
        from torch_fidelity.utils import (
            create_feature_extractor,
            get_featuresdict_from_dataset,
        )

        fe = create_feature_extractor(extractor_kw["feature_extractor"], ["2048" if "inception" in extractor_kw["feature_extractor"] else "128"],
                                      cuda=common["cuda"], **{k: v for k, v in extractor_kw.items() if k != "feature_extractor"})
        feats = get_featuresdict_from_dataset(ArrayImages(samples), fe, 256, common["cuda"], True, False)
        stat = fid_features_to_statistics(next(iter(feats.values())))
        if ref["mu"].shape != stat["mu"].shape:
            raise DitcError(f"reference statistics have {ref['mu'].shape[0]} features, the extractor gives {stat['mu'].shape[0]}")
        ref = {k: np.asarray(v, dtype=stat[k].dtype) for k, v in ref.items()}
        out.update({k: float(v) for k, v in fid_statistics_to_metric(stat, ref, False).items()})
        metrics = [m for m in metrics if m != "fid"]
        if not metrics:
            return out
    kw = dict(common, fid="fid" in metrics and ref_kind == "array", isc="isc" in metrics, kid="kid" in metrics,
              prc="prc" in metrics)
    if "kid" in metrics:
        kw["kid_subset_size"] = kid_subset_size or min(1000, n, len(ref))
    res = torch_fidelity.calculate_metrics(input1=ArrayImages(samples), input2=ArrayImages(ref) if ref_kind == "array" else None, **kw)
    out.update({k: float(v) for k, v in res.items()})
    return out


def _batch_timing(batch_seconds: list) -> dict:
    """The first sampled batch (with ``compile``: the compile time is in it) apart from the
    steady state (median seconds per image over the later batches)."""
    if not batch_seconds:
        return {}
    out = {"first_batch_seconds": batch_seconds[0][1]}
    rest = [sec / n for n, sec in batch_seconds[1:]]
    if rest:
        out["steady_seconds_per_image"] = statistics.median(rest)
    return out


def check_metrics(metrics: list[str], num_samples: int, kid_subset_size: int | None) -> None:
    """Metric names and their sample needs, checked before anything is sampled."""
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise UsageError(f"unknown metric {bad[0]!r} in `metrics`; choose from {', '.join(METRICS)}")
    if not metrics:
        raise UsageError(f"`metrics` lists nothing; choose from {', '.join(METRICS)}")
    if "kid" in metrics and kid_subset_size is not None and kid_subset_size > num_samples:
        raise UsageError(f"`num_samples` {num_samples} is smaller than the KID subset size {kid_subset_size}")


EVAL_CACHE_VERSION = 1  # bump when sampling or metrics numerics change: older entries stop matching
CACHED = ("report.json", "samples.npz", "samples.png")


def path_identity(value) -> str | None:
    """A named file or folder as what it holds (every byte of every file, with the files'
    relative names: hashing.tree_digest), so a reference that changed under the same path,
    whatever its sizes and times, is another input."""
    if value is None or not isinstance(value, str) or not Path(value).exists():
        return value
    try:
        return f"{value}#{tree_digest(value)[:32]}"
    except OSError as e:
        raise UsageError(f"{value}: {e.strerror or e} (an input must be a regular file or a folder of them)") from None


def data_identity(value) -> str | None:
    """Data an eval reads (prompts, held-out data): shards made by ``prepare-data`` by what
    they hold (``shards_identity``), so the same captions prepared in another folder are the
    same input; anything else as ``path_identity``."""
    return shards_identity(value) or path_identity(value)


def cache_key(recipe: dict, metrics: list[str], ref, extractor: dict, kid_subset_size, loss_data) -> str:
    """What an eval's result depends on: the model's identity and every sampling setting
    (``recipe``), the metrics, their reference (its contents, when it is a path) and feature
    network, and the held-out data."""
    extractor = {k: path_identity(v) if k.endswith("_path") else v for k, v in extractor.items()}
    body = {"recipe": recipe, "metrics": sorted(metrics), "ref": path_identity(ref), "extractor": extractor,
            "kid_subset_size": kid_subset_size, "loss_data": data_identity(loss_data), "version": EVAL_CACHE_VERSION}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cache_dirs() -> list[Path]:
    """Where finished evals are looked up: the ones shipped with the package (the quickstart's
    base-model evals, computed once), then, when ``DITC_CACHE_DIR`` names one, the user's
    cache, where every finished eval is also stored."""
    user = os.environ.get("DITC_CACHE_DIR")
    return [EVALS_DIR] + ([Path(user) / "evals"] if user else [])


SAME_NOISE = ("seed", "num_samples", "shard_size", "batch_size")  # what fixes every sample's noise and condition


def fidelity_reference(path, recipe: dict, labels) -> np.ndarray:
    """The samples of an earlier eval output ``path`` made from the same noise as ``recipe``
    (the settings ``SAME_NOISE`` and the same conditions), checked; anything else is one line."""
    p = Path(checks.path("fidelity_ref", path))
    try:
        rep = json.loads((p / "report.json").read_bytes()[: 16 << 20])
        with np.load(p / "samples.npz") as d:
            imgs, ref_labels = d["arr_0"], d["labels"]
    except Exception as e:  # noqa: BLE001 - not an eval output, or a damaged one
        raise UsageError(f"`fidelity_ref` {path} is not a readable eval output (report.json and samples.npz): "
                         f"{type(e).__name__}") from None
    made = rep.get("producer") if isinstance(rep, dict) else None
    if not isinstance(made, dict):
        raise UsageError(f"`fidelity_ref` {path}: its report does not say how its samples were made")
    for k in SAME_NOISE:
        if made.get(k) != recipe.get(k):
            raise UsageError(f"`fidelity_ref` {path} was sampled with {k} {made.get(k)} and this eval with "
                             f"{recipe.get(k)}: not the same noise")
    if len(ref_labels) != len(labels) or not np.array_equal(ref_labels, labels):
        raise UsageError(f"`fidelity_ref` {path} holds samples of other conditions than this eval")
    return imgs


def fidelity_to(imgs: np.ndarray, ref: np.ndarray) -> dict:
    """Per-pixel mean squared error (images in [0, 1]) of ``imgs`` against ``ref`` (the same noise
    through another model or sampler), and the PSNR in dB (None for identical samples: infinite)."""
    if imgs.shape != ref.shape:
        raise UsageError(f"the fidelity reference's samples are {list(ref.shape)}, these {list(imgs.shape)}")
    mse = float(((imgs.astype(np.float64) - ref.astype(np.float64)) / 255.0).__pow__(2).mean())
    return {"fidelity_mse": mse, "fidelity_psnr": None if mse == 0 else float(10 * np.log10(1.0 / mse))}


def entry_problem(entry: Path) -> tuple[str | None, dict | None]:
    """(why the cache entry cannot be served, None when it can; its report): sealed files only
    (the seal, written last, holds each file's digest), a report that is an eval report, samples
    that load."""
    problem = seal_problem(entry, CACHED[:2], key=entry.name)
    if problem is not None:
        return problem, None
    try:
        report = json.loads((entry / "report.json").read_bytes()[: 16 << 20])
    except (OSError, ValueError):
        return "its report cannot be read", None
    if not isinstance(report, dict) or not isinstance(report.get("metrics"), dict) or not report["metrics"]:
        return "its report holds no metrics", None
    try:
        rows = npz_rows(entry / "samples.npz")
    except Exception:  # noqa: BLE001 - any unreadable samples file
        return "its samples cannot be read", None
    if rows.get("arr_0") != report.get("num_samples") or rows.get("labels") != report.get("num_samples"):
        return "its samples do not match its report", None
    return None, report


def npz_rows(path: Path) -> dict:
    """{array name: its length} of an .npz archive, read from the arrays' headers only (not
    their data: an eval's samples can be gigabytes)."""
    out = {}
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            with z.open(name) as f:
                major, _ = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape = read(f)[0]
            out[name[:-4] if name.endswith(".npy") else name] = shape[0] if shape else None
    return out


def _from_cache(key: str) -> tuple[Path, dict] | None:
    """The first sound entry for ``key``; an entry that is not sound is skipped with a note
    (and replaced when this eval stores its own result)."""
    for d in cache_dirs():
        entry = d / key
        if not entry.exists():
            continue
        problem, report = entry_problem(entry)
        if problem is None:
            return entry, report
        note(f"eval cache entry {entry} skipped: {problem}; the eval is computed")
    return None


def _to_cache(key: str, out_dir: Path) -> None:
    """Store a finished eval (its report, samples and grid, then the seal of their digests) in
    the user cache (when ``DITC_CACHE_DIR`` names one), replacing an entry that is not sound; a
    cache that cannot be written is skipped, never an error."""
    if not os.environ.get("DITC_CACHE_DIR"):
        return
    target = cache_dirs()[-1] / key
    if target.exists() and entry_problem(target)[0] is None:
        return
    tmp = target.parent / f".{key}.{os.getpid()}.tmp"
    old = target.parent / f".{key}.{os.getpid()}.old"
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        for f in CACHED:
            if (out_dir / f).exists():
                shutil.copy2(out_dir / f, tmp / f)
        seal(tmp, CACHED, key=key)
        if target.exists() or target.is_symlink():
            os.replace(target, old)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    finally:
        with contextlib.suppress(OSError):
            _remove(old)


def evaluate(model, out_dir: Path, num_samples: int = 1000, sampler: str | None = None, steps: int | None = None,
             cfg_scale: float = 1.0, cfg_channels: int | None = None, seed: int = 0, ref: str | None = None,
             metrics: list[str] | None = None, inception_weights: str | None = None, extractor: str | None = None,
             vae_name: str | None = None, shard_size: int = 250, batch_size: int = 125, kid_subset_size: int | None = None,
             rank: int = 0, world: int = 1, barrier=None, loss_data: str | None = None,
             timestep_spacing: str | None = None, guidance_interval=None, source: str | None = None,
             grid: bool = True, compile: bool = False, force: bool = False, producer: dict | None = None,
             cache: bool = True, prompts=None, clip: str | None = None, feature_cache: str | None = None,
             fidelity_ref: str | None = None) -> dict | None:
    """Sample, score and write ``out_dir`` (report.json/.md, samples.npz, samples/ and, with
    ``grid``, samples.png) atomically: returns the report on process 0, None elsewhere.
    Shards are sampled into ``out_dir``'s work dir, recorded with what produced them
    (``producer``), so an interrupted run resumes and a run with other settings never reuses them.
    ``cache``: an eval whose every input (model identity, settings, metrics, reference) matches
    a finished one (``cache_dirs``) is copied from it instead of recomputed, and says so.
    ``prompts`` (text-to-image models: a ``PromptSet``) are sampled in turn; ``clip`` (a local
    CLIP model dir) adds the CLIP score of each image with its prompt. ``feature_cache``: a caching
    policy for every sampling run (its skip rate and the FLOPs of what ran are reported);
    ``fidelity_ref``: an earlier eval's output made from the same noise (same seed, samples,
    shard and batch sizes), e.g. of the uncompressed model: the per-pixel MSE and PSNR of these
    samples against its samples are reported (sensitive where FID at a small N is not)."""

    require(model, "eval")
    conds = family_of(model).eval_conditions(model.config, num_samples, prompts)
    if generation_loop(model) is not None:
        diffusion_only = [n for n, v in (("cfg_channels", cfg_channels), ("guidance_interval", guidance_interval),
                                         ("timestep_spacing", timestep_spacing), ("feature_cache", feature_cache),
                                         ("compile", compile)) if v]
        if diffusion_only:
            raise UsageError(f"`{diffusion_only[0]}` acts on a diffusion sampler; {model.config.name or 'this MAR'} samples by its "
                             "masked autoregressive loop (`steps` = num_iter, `cfg_scale`)")
    if clip is not None:
        check_clip(clip, conds.texts)
    metrics = metrics or ["fid", "prc"]
    sampler, steps = eval_sampler(model.config, sampler, steps)
    spacing = resolve_spacing(sampler, timestep_spacing)
    if num_samples < 1:
        raise UsageError("`num_samples` must be at least 1")
    check_metrics(metrics, num_samples, kid_subset_size)
    ref_kind, ref_val = resolve_reference(ref, model.config)
    ex_kw = choose_extractor(model.config, inception_weights, extractor)
    asks = np.asarray(conds.asks) if ex_kw["feature_extractor"] == "digits-cnn" and conds.asks is not None else None
    unscored = None  # the digits classifier reads digits 0-9 only: other classes are not scored
    if asks is not None and not ((asks >= 0) & (asks < 10)).all():
        unscored = (f"{conds.asks_metric} not scored: the conditions ask for class "
                    f"{asks[(asks < 0) | (asks >= 10)][0]}, which the digits classifier does not have (0-9)")
        asks = None
    vae = load_vae(vae_name or (model.config.vae if model.config.latent_scale is not None else None))
    if vae is not None:
        vae = vae.to(next(model.parameters()).device)
    if loss_data:
        check_fits(load_data(loss_data, cfg=model.config), model.config)
    recipe = {"sampler": sampler, "steps": steps, "timestep_spacing": spacing, "cfg_scale": cfg_scale,
              "cfg_channels": cfg_channels, "guidance_interval": guidance_interval, "seed": seed,
              "num_samples": num_samples, "shard_size": shard_size, "batch_size": batch_size, "compile": compile,
              "vae": vae_name or model.config.vae if model.config.latent_scale is not None else None,
              **(vae_identity(vae_name or model.config.vae) if model.config.latent_scale is not None else {}),
              **(producer or {})}
    policy = run_policy(model.config, feature_cache, sampler, steps, spacing)
    if policy is not None:
        recipe["feature_cache"] = policy.spec
    ref_samples = fidelity_reference(fidelity_ref, recipe, conds.labels) if fidelity_ref is not None and rank == 0 else None
    key = hit = None
    if rank == 0:  # what identifies the eval (every byte of the model and of the files it reads): the main process
        recipe["model"] = fingerprint(model)  # whatever the caller passed: the weights sampled are the key
        if fidelity_ref is not None:
            recipe["fidelity_ref"] = path_identity(str(fidelity_ref))
        if prompts is not None:  # caption shards by their files; a prompt file by the very texts that were read
            data = (shards_identity(prompts.source) or
                    ("texts#" + hashlib.sha256(json.dumps(prompts.texts).encode()).hexdigest()[:32]
                     if prompts.encoded_by is not None and prompts.texts is not None else data_identity(prompts.source)))
            recipe["prompts"] = {"data": data, "encoded_by": prompts.encoded_by}
        if clip is not None:
            recipe["clip"] = path_identity(clip)
        key = cache_key(recipe, metrics, ref, ex_kw, kid_subset_size, loss_data)
        hit = _from_cache(key) if cache and world == 1 and not compile else None
    if hit is not None:
        return _cached_eval(hit, Path(out_dir), force, {"source": source, **_prompts_said(prompts)}, key)
    work = work_dir_for(out_dir)
    if rank == 0:
        work, _ = resumable_work(out_dir, recipe, force, what="eval")
    if barrier is not None:
        barrier()
    t0 = time.time()
    batch_seconds: list = []
    try:
        measured = model.config.is_dynamic or policy is not None
        with FlopsMeter(model) if measured else contextlib.nullcontext() as meter:
            written = sample_shards(model, work, num_samples, sampler, steps, cfg_scale, cfg_channels, seed,
                                    shard_size, batch_size, vae, rank, world, spacing, guidance_interval, compile,
                                    batch_seconds, conds, policy)
    except DitcError:  # a failed (not interrupted) run with nothing finished leaves nothing behind
        if rank == 0 and not list((work / "samples").glob("shard-*.npz")):
            shutil.rmtree(work, ignore_errors=True)
        raise
    if barrier is not None:
        barrier()
    if rank != 0:
        return None
    imgs, labels = gather_samples(work, num_samples, shard_size, set(written))
    report = {
        "num_samples": num_samples, "sampler": sampler, "steps": steps, "timestep_spacing": spacing, "cfg_scale": cfg_scale,
        "guidance_interval": guidance_interval,
        "cfg_channels": "all latent channels" if cfg_channels is None else f"first {cfg_channels}",
        "seed": seed, "reference": ref or "digits", "extractor": ex_kw["feature_extractor"],
        "shards_written_now": len(written), "sampling_seconds": time.time() - t0, "processes": world,
        "compiled": compile, **_batch_timing(batch_seconds),
    }
    if meter is not None and meter.calls:  # what the routers ran over this very sampling (process 0's shards)
        r = meter.result()
        report["inference_flops_ratio"], report["inference_block_flops_ratio"] = r["flops_ratio"], r["block_flops_ratio"]
        report["token_keep_ratio"] = r["token_keep_ratio"]
        report["target_block_flops"] = model.config.flops_target
    if policy is not None:
        report["feature_cache"] = policy.stats()
    if num_samples < 50_000 and "fid" in metrics:
        report["warning"] = f"FID from {num_samples} samples (< 50,000) is biased upward: compare only with figures at the same N"
    report["metrics"] = compute_metrics(imgs, ref_kind, ref_val, metrics, ex_kw, kid_subset_size)
    if loss_data:
        report["metrics"].update(heldout_loss(model, loss_data, seed))
    if ref_samples is not None:
        report["metrics"].update(fidelity_to(imgs, ref_samples))
        report["fidelity_ref"] = str(fidelity_ref)
    if clip is not None:
        report["metrics"]["clip_score"] = clip_score(imgs, [conds.texts[k] for k in labels], clip)
        report["clip_model"] = clip
    if prompts is not None:
        report.update(_prompts_said(prompts))
        if prompts.note:
            report["warning"] = "; ".join(w for w in (report.get("warning"), prompts.note) if w)
    if unscored:
        report["warning"] = "; ".join(w for w in (report.get("warning"), unscored) if w)
    if asks is not None:  # the testbeds' held-out classifier
        x = torch.from_numpy(imgs).float().mean(-1, keepdim=True).permute(0, 3, 1, 2) / 127.5 - 1
        asked = asks[np.asarray(labels)]  # the class each sample's condition asks for
        report["metrics"][conds.asks_metric] = class_accuracy(x, torch.from_numpy(asked).long())
    report["source"] = source
    report["producer"] = recipe
    with atomic_dir(Path(out_dir), force) as tmp:
        os.replace(work / "samples", tmp / "samples")
        np.savez(tmp / "samples.npz", arr_0=imgs, labels=labels)
        if grid:
            sample_grid_png(tmp / "samples.png", imgs, labels, conds.groups, row_labels=conds.texts)
        write_report(tmp, report, f"ditc eval: {source}")
    shutil.rmtree(work, ignore_errors=True)
    if cache:
        _to_cache(key, Path(out_dir))
    return report


def _prompts_said(prompts) -> dict:
    """What a report says of the prompts an eval read (none: nothing)."""
    if prompts is None:
        return {}
    return {"prompts": prompts.source + (f" (encoded by {prompts.encoded_by})" if prompts.encoded_by else "")}


def _cached_eval(hit: tuple[Path, dict], out_dir: Path, force: bool, here: dict, key: str) -> dict:
    """A finished eval with the same inputs, written as this one's output: its report (with
    where it came from, and ``here``: the names this run gave its inputs), samples and grid; the
    per-image PNG shards are not kept in the cache."""
    entry, report = hit
    report = {**report, **here, "cached": f"{entry} (an eval with every input the same; key {key})",
              "shards_written_now": 0}
    with atomic_dir(out_dir, force) as tmp:
        for f in CACHED[1:]:
            if (entry / f).exists():
                shutil.copy2(entry / f, tmp / f)
        write_report(tmp, report, f"ditc eval: {here['source']}")
    return report


def sample_grid_png(path: Path, imgs: np.ndarray, labels: np.ndarray, num_classes: int, per_class: int = 10,
                    scale: int = 4, row_labels: list | None = None) -> None:
    """The first samples of each class (or prompt), one row per class (at most 10 rows);
    ``row_labels`` (the prompts' texts) are written left of their rows."""
    rows = min(num_classes, 10)
    H, W = imgs.shape[1:3]
    grid = np.zeros((rows * H, per_class * W, 3), dtype=np.uint8)
    for c in range(rows):
        for j, a in enumerate(imgs[labels == c][:per_class]):
            grid[c * H:(c + 1) * H, j * W:(j + 1) * W] = a
    img = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    if row_labels:
        texts = [str(t) if len(str(t)) <= 80 else str(t)[:77] + "..." for t in row_labels[:rows]]
        margin = 6 * max(len(t) for t in texts) + 8  # PIL's default bitmap font: about 6 px a character
        framed = Image.new("RGB", (img.width + margin, img.height), "white")
        framed.paste(img, (margin, 0))
        draw = ImageDraw.Draw(framed)
        for c, t in enumerate(texts):
            draw.text((4, c * H * scale + (H * scale - 11) // 2), t, fill="black")
        img = framed
    img.save(path)


def heldout_loss(model, spec: str, seed: int = 0, repeats: int = 4) -> dict:
    """Mean DiT hybrid loss and eps-MSE on held-out data, every sample at ``repeats`` fixed
    random timesteps/noises (a sensitive, sampling-free quality measure)."""

    data = load_data(spec, cfg=model.config)
    check_fits(data, model.config)
    calib = calibration_set(data, len(data) * repeats, seed=seed + 777,
                            draws=getattr(objective_for(model.config), "draws", None))
    r = calibration_losses(model, calib, batch=256)
    return {"heldout_loss": r["loss"], "heldout_mse": r["mse"]}

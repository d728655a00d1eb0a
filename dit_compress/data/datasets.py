"""Training data: the built-in digits set, pre-extracted VAE latents (DiT/TinyFusion
``*_features/*.npy`` + ``*_labels/*.npy`` layout, or the project's safetensors shards) and
image folders encoded on the fly."""

from __future__ import annotations

import gzip
import hashlib
import json
import importlib.util
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file

from ..errors import DitcError, UsageError
from ..hashing import file_digest, save_memo
from ..model.family import family_of
from ..model.pixart import Captions
from .images import ImageFolderData

DIGITS_HELDOUT = 297  # the last 297 of a fixed permutation are never trained on


_DIGITS = None


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images [1797, 8, 8], labels) from the file scikit-learn ships (``digits.csv.gz``), read
    as ``sklearn.datasets.load_digits`` reads it but without importing scikit-learn (seconds)."""
    global _DIGITS
    if _DIGITS is None:
        spec = importlib.util.find_spec("sklearn")
        if spec is None or not spec.submodule_search_locations:
            raise DitcError("the digits testbed needs scikit-learn's bundled digits (pip install scikit-learn)")
        f = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
        with gzip.open(f, "rt") as fh:
            data = np.loadtxt(fh, delimiter=",")
        _DIGITS = data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)
    return _DIGITS


def bundled_digits(spec) -> str | None:
    """The split a spec names when it names the bundled digits (``digits`` or ``digits:SPLIT``),
    else None: ``digits-latents/`` or ``digits_ref`` are paths like any other (``./digits``
    names a local folder called digits)."""
    if not isinstance(spec, str) or not (spec == "digits" or spec.startswith("digits:")):
        return None
    return spec.split(":", 1)[1] if ":" in spec else "train"


def digits_split(split: str, n: int) -> np.ndarray:
    """Indices of a digits split into the full set of ``n``."""
    perm = np.random.RandomState(0).permutation(n)
    idx = {"train": perm[:-DIGITS_HELDOUT], "test": perm[-DIGITS_HELDOUT:], "all": perm}.get(split)
    if idx is None:
        raise UsageError(f"unknown digits split {split!r} (train, test, all)")
    return idx


def digits_arrays(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 real 8x8 digits as float images in [-1, 1], shape [N, 1, 8, 8]."""
    images, target = _sklearn_digits()
    x = (images.astype(np.float32) / 16.0) * 2 - 1
    y = target.astype(np.int64)
    idx = digits_split(split, len(x))
    return x[idx, None], y[idx]


class TensorData:
    """An indexable set of (x, y). ``get(indices)`` returns a batch."""

    def __init__(self, x, y, name: str = "data", flip_pairs: bool = False):
        self.x = x
        self.y = torch.as_tensor(y, dtype=torch.long)
        self.name = name
        self.flip_pairs = flip_pairs  # x[i] is (2, C, H, W): image and its horizontal flip

    def __len__(self):
        return len(self.y)

    @property
    def sample_shape(self) -> tuple:
        s = tuple(self.x.shape[1:])
        return s[1:] if self.flip_pairs else s

    def get(self, idx: torch.Tensor, generator: torch.Generator | None = None):
        x = torch.as_tensor(np.asarray(self.x[idx.numpy()]) if not torch.is_tensor(self.x) else self.x[idx]).float()
        if self.flip_pairs:
            pick = torch.randint(0, 2, (len(idx),), generator=generator)
            x = x[torch.arange(len(idx)), pick]
        return x, self.y[idx]


class CaptionData(TensorData):
    """Latents with their captions' features (text-to-image training data): ``y`` is a
    ``Captions`` (emb [N, L, C], mask [N, L]); ``null`` the encoding of "" [1, L, C] that
    guidance dropout puts in place of a caption."""

    def __init__(self, x, captions: Captions, null: Captions, name: str = "data", flip_pairs: bool = False,
                 classes: np.ndarray | None = None, texts: list[str] | None = None):
        self.x, self.y, self.null, self.name, self.flip_pairs = x, captions, null, name, flip_pairs
        self.classes = classes  # the class each caption asks for, when the data states it (the digits captions)
        self.texts = texts  # the captions' texts, when the shards' manifest lists them


class NpyDirData(TensorData):
    """DiT/TinyFusion extraction layout: ``<root>/*_features/N.npy`` and ``*_labels/N.npy``."""

    def __init__(self, feat_dir: Path, label_dir: Path):
        files = sorted(feat_dir.glob("*.npy"), key=lambda p: (len(p.stem), p.stem))
        if not files:
            raise DitcError(f"no .npy latents in {feat_dir}")
        self.files = files
        self.label_dir = label_dir
        ys = []
        for f in files:
            lf = label_dir / f.name
            if not lf.exists():
                raise DitcError(f"latent {f.name} has no label file in {label_dir}")
            try:
                lab = np.asarray(np.load(lf, allow_pickle=False))
            except (OSError, ValueError) as e:
                raise DitcError(f"cannot read label file {lf}: {str(e)[:160]}") from None
            if lab.size != 1 or not np.issubdtype(lab.dtype, np.integer):
                raise DitcError(f"label file {lf} must hold one integer class label, found {lab.size} value(s) of {lab.dtype}")
            ys.append(int(lab.reshape(-1)[0]))
        first = np.load(files[0])
        shape = first.shape[1:] if first.shape[0] == 1 else first.shape
        self.flip_pairs = len(shape) == 4 and shape[0] == 2
        self._shape = shape
        self.y = torch.tensor(ys, dtype=torch.long)
        self.name = str(feat_dir.parent)
        self.x = None

    @property
    def sample_shape(self) -> tuple:
        return tuple(self._shape[1:]) if self.flip_pairs else tuple(self._shape)

    def get(self, idx, generator=None):
        arrs = []
        for i in idx.tolist():
            try:
                a = np.load(self.files[i], allow_pickle=False)
            except (OSError, ValueError) as e:
                raise DitcError(f"cannot read latent {self.files[i]}: {str(e)[:160]}") from None
            if a.shape[0] == 1:
                a = a[0]
            if tuple(a.shape) != tuple(self._shape) or not np.issubdtype(a.dtype, np.floating):
                raise DitcError(f"latent {self.files[i]} has shape {tuple(a.shape)} ({a.dtype}); the first latent "
                                f"{self.files[0].name} has {tuple(self._shape)}: every latent must have one float shape")
            arrs.append(a)
        x = torch.from_numpy(np.stack(arrs)).float()
        if self.flip_pairs:
            pick = torch.randint(0, 2, (len(idx),), generator=generator)
            x = x[torch.arange(len(idx)), pick]
        return x, self.y[idx]


def load_shards(root: Path) -> TensorData:
    """The project's own layout: ``shard-*.safetensors`` with ``latents`` and ``labels``."""

    shards = sorted(root.glob("shard-*.safetensors"))
    xs, ys, caps, null = [], [], [], None
    for s in shards:
        try:
            d = load_file(str(s))
        except Exception as e:  # noqa: BLE001 - any decode failure is a bad shard
            raise DitcError(f"cannot read shard {s}: {str(e)[:160]}") from None
        captioned = "caption_emb" in d
        if (captioned and xs and not caps) or (caps and not captioned):
            raise DitcError(f"shard {s}: some shards hold captions and others class labels")
        if captioned:
            lat = d.get("latents")
            if lat is None:
                raise DitcError(f"shard {s} lacks 'latents'")
            cap, null = _shard_captions(s, d, len(lat), null)
            caps.append(cap)
            lab = d.get("labels", np.full(len(lat), -1, dtype=np.int64))  # the class a caption asks for, if stated
        elif "latents" not in d or "labels" not in d:
            raise DitcError(f"shard {s} lacks 'latents' or 'labels'")
        else:
            lat, lab = d["latents"], d["labels"]
        if lab.ndim != 1 or not np.issubdtype(lab.dtype, np.integer):
            raise DitcError(f"shard {s}: labels must be a 1-D array of integer classes, found shape "
                            f"{tuple(lab.shape)} of {lab.dtype}")
        if not np.issubdtype(lat.dtype, np.floating) or lat.ndim not in (4, 5):
            raise DitcError(f"shard {s}: latents must be float [N, C, H, W] or [N, 2, C, H, W] (image + flip), "
                            f"found shape {tuple(lat.shape)} of {lat.dtype}")
        if len(lat) != len(lab):
            raise DitcError(f"shard {s} holds {len(lat)} latents but {len(lab)} labels")
        if xs and lat.shape[1:] != xs[0].shape[1:]:
            raise DitcError(f"shard {s} holds latents of shape {tuple(lat.shape[1:])}, {shards[0].name} "
                            f"{tuple(xs[0].shape[1:])}: every shard must have one shape")
        xs.append(lat)
        ys.append(lab)
    x = np.concatenate(xs)
    if caps:
        if len({c.emb.shape[1:] for c in caps}) > 1:
            raise DitcError(f"the caption shards in {root} hold caption features of different shapes")
        captions = Captions(torch.cat([c.emb for c in caps]), torch.cat([c.mask for c in caps]))
        classes = np.concatenate(ys)
        return CaptionData(x, captions, null, name=str(root), flip_pairs=x.ndim == 5,
                           classes=classes if (classes >= 0).all() else None, texts=_manifest_texts(root, len(x)))
    return TensorData(x, np.concatenate(ys), name=str(root), flip_pairs=x.ndim == 5)


CONTENT_ID = "sha256:"  # a text encoder identity of its files' contents (earlier ones held only their sizes)


def shards_identity(root) -> str | None:
    """Shards made by ``prepare-data`` by what they hold, wherever they lie: every byte of every
    array of every shard (images or latents, labels, caption features and masks), the texts and
    the text encoder's content identity, so two caption rows swapped are another input. None when
    ``root`` is not such a folder, its manifest predates content identities, or a shard cannot be
    read (such folders are identified by their files' contents, ``hashing.tree_digest``)."""
    p = Path(root) if isinstance(root, (str, Path)) else None
    manifest = p / "manifest.json" if p is not None else None
    if manifest is None or not manifest.is_file():
        return None
    try:
        m = json.loads(manifest.read_bytes()[: 64 << 20])
    except (OSError, ValueError):
        return None
    files = sorted(p.glob("shard-*.safetensors"))
    producer = m.get("producer") if isinstance(m, dict) else None
    encoder = producer.get("text_encoder") if isinstance(producer, dict) else None
    old_encoder_id = encoder is not None and not str(encoder).startswith(CONTENT_ID)
    if not files or not isinstance(producer, dict) or old_encoder_id:
        return None
    head = json.dumps({"texts": m.get("texts"), "text_encoder": encoder}, sort_keys=True)
    h = hashlib.sha256(head.encode())
    try:  # every byte of every shard file (safetensors written without metadata: its arrays, nothing else)
        for f in files:
            h.update(f"{f.name}:{file_digest(f, save=False)}\n".encode())
    except OSError:
        return None
    finally:
        save_memo()
    return "shards#" + h.hexdigest()[:32]


def _manifest_texts(root: Path, n: int) -> list[str] | None:
    """The caption texts a caption-shard manifest lists (one per sample, in shard order)."""
    try:
        texts = json.loads((root / "manifest.json").read_text()).get("texts")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(texts, list) and len(texts) == n and all(isinstance(t, str) for t in texts):
        return texts
    return None


def _shard_captions(s: Path, d: dict, n: int, null: Captions | None) -> tuple[Captions, Captions]:
    """A caption shard's (captions, null caption), checked: float features [n, L, C], a 0/1 mask
    [n, L], the null caption [1, L, C] the same in every shard."""
    need = ("caption_emb", "caption_mask", "null_caption_emb", "null_caption_mask")
    missing = [k for k in need if k not in d]
    if missing:
        raise DitcError(f"caption shard {s} lacks {missing[0]!r}")
    emb, mask, nemb, nmask = (d[k] for k in need)
    if not np.issubdtype(emb.dtype, np.floating) or emb.ndim != 3 or len(emb) != n:
        raise DitcError(f"caption shard {s}: caption_emb must be float [{n}, L, C], found {tuple(emb.shape)} of {emb.dtype}")
    if mask.shape != emb.shape[:2] or nemb.shape != (1, *emb.shape[1:]) or nmask.shape != (1, emb.shape[1]):
        raise DitcError(f"caption shard {s}: the caption mask or the null caption does not match caption_emb "
                        f"{tuple(emb.shape)}")
    if not (np.isin(mask, (0, 1)).all() and np.isin(nmask, (0, 1)).all()):
        raise DitcError(f"caption shard {s}: caption masks must hold 0 and 1 only")
    if not (np.isfinite(emb).all() and np.isfinite(nemb).all()):
        raise DitcError(f"caption shard {s} holds NaN or inf caption features")
    this_null = Captions(torch.from_numpy(nemb).float(), torch.from_numpy(nmask).float())
    if null is not None and not (torch.equal(null.emb, this_null.emb) and torch.equal(null.mask, this_null.mask)):
        raise DitcError(f"caption shard {s} holds another null caption than the first shard (another text encoder?)")
    return Captions(torch.from_numpy(emb).float(), torch.from_numpy(mask).float()), this_null


def load_data(spec: str, num_classes: int | None = None, cfg=None) -> TensorData:
    """``digits`` / ``digits:test`` / a latents dir / a shards dir (class labels, or captions)
    / an image folder, checked against the model's condition when ``cfg`` is given (else
    labels against ``num_classes``)."""
    if hasattr(spec, "__fspath__"):
        spec = str(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(f"`data` must be digits, digits:test or a directory, got {spec!r}"[:200])
    split = bundled_digits(spec)
    if split is not None:
        x, y = digits_arrays(split)
        data = TensorData(torch.from_numpy(x), y, name=f"digits:{split}")
    else:
        root = Path(spec)
        if not root.exists():
            raise DitcError(f"data path {spec} does not exist")
        if not root.is_dir():
            raise DitcError(f"data path {spec} is not a directory")
        feats = sorted(root.glob("*_features"))
        if list(root.glob("shard-*.safetensors")):
            data = load_shards(root)
            if cfg is not None:
                check_scale(root, cfg, spec)
        elif feats:
            labels = root / feats[0].name.replace("_features", "_labels")
            if not labels.is_dir():
                raise DitcError(f"{feats[0]} has no matching labels directory {labels.name}")
            data = NpyDirData(feats[0], labels)
        elif any(p.is_dir() for p in root.iterdir()):
            data = ImageFolderData(root, cfg)
        else:
            raise DitcError(f"{spec} is empty or holds no known data layout (latents, shards or class folders)")
    if len(data) == 0:
        raise DitcError(f"data {spec} holds no samples")
    facts = cfg if cfg is not None else (_Classes(num_classes) if num_classes is not None else None)
    if facts is not None:
        family_of(facts).check_data(facts, data, spec)
    return data


class _Classes:
    """The fact a label check needs when the caller has a class count and no config (a
    class-conditional model's)."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes


def check_scale(root: Path, cfg, spec: str) -> None:
    """Latent shards are scaled by their VAE's factor (``prepare-data``'s manifest says which); a
    model trained on latents of another scale learns the wrong data without any error."""
    try:
        scale = json.loads((root / "manifest.json").read_bytes()[: 64 << 20]).get("scale")
    except (OSError, ValueError, AttributeError):
        return
    want = getattr(cfg, "latent_scale", None)
    if isinstance(scale, (int, float)) and want is not None and abs(scale - want) > 1e-6 * abs(want):
        raise UsageError(f"data {spec} holds latents scaled by {scale:g} but this model's are scaled by {want:g}: "
                         "encode the images with the model's own VAE (`ditc prepare-data --vae ...`)")


def check_fits(data: TensorData, cfg) -> None:
    want = (cfg.in_channels, cfg.input_size, cfg.input_size)
    if tuple(data.sample_shape) != want:
        raise DitcError(
            f"data {data.name} has samples of shape {tuple(data.sample_shape)} but the model takes {want}"
        )


"""Hugging Face hub resolution: aliases, repo ids, only the files needed, offline mode."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..assets import EMBEDDED
from ..errors import DitcError, UsageError

ALIASES = {
    "DiT-XL-2": "facebook/DiT-XL-2-256",
    "DiT-XL-2-256": "facebook/DiT-XL-2-256",
    "DiT-XL-2-512": "facebook/DiT-XL-2-512",
    "DiT-XL/2": "facebook/DiT-XL-2-256",
    "PixArt-XL-2-512": "PixArt-alpha/PixArt-XL-2-512x512",
    "PixArt-XL-2-1024": "PixArt-alpha/PixArt-XL-2-1024-MS",
    "PixArt-Sigma-XL-2-1024": "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",
}

REPO_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def is_repo_id(source: str) -> bool:
    return bool(REPO_RE.match(source))


def resolve_alias(source: str) -> str | None:
    return ALIASES.get(source)


def download(repo_id: str, revision: str | None = None) -> Path:
    """snapshot_download of the transformer only (``model_index.json`` + ``transformer/*``)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    offline = os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE")
    try:
        path = snapshot_download(
            repo_id, revision=revision,
            allow_patterns=["model_index.json", "transformer/config.json",
                            "transformer/diffusion_pytorch_model.safetensors",
                            "transformer/diffusion_pytorch_model.bin"],
        )
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE=1 and it is not in the cache" if offline else "the hub is unreachable and it is not in the cache"
        raise DitcError(f"cannot fetch {repo_id}: {why}") from None
    except RepositoryNotFoundError:
        raise DitcError(f"no repository {repo_id} on the Hugging Face hub (or it is private)") from None
    except (HfHubHTTPError, OSError) as e:
        raise DitcError(f"cannot fetch {repo_id}: {str(e).splitlines()[0]}") from None
    p = Path(path)
    if not (p / "transformer").is_dir():
        raise DitcError(f"{repo_id} has no transformer/ folder: not a DiT or PixArt pipeline repository")
    return p


def unknown_source(source: str) -> UsageError:
    names = ", ".join(sorted(set(ALIASES)) + sorted(EMBEDDED))
    return UsageError(f"unknown model {source!r}: not a path, a known alias ({names}) or a hub repo id (org/name)")

"""Reading PyTorch pickles (``.pt``/``.pth``/``.ckpt``) a user hands us: tensors only, nothing in
the file is executed, and a file that is not one is refused in one line."""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import torch

from .errors import FormatError


def safe_torch_load(file: Path):
    """``torch.load(weights_only=True)`` allowing only argparse.Namespace besides tensors."""
    file = Path(file)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        detail = next((line for line in first if "GLOBAL" in line or "Unsupported" in line), first[0] if first else "")
        raise FormatError(f"{file}: refused to unpickle a non-tensor object, nothing was executed ({detail.strip()})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FormatError(f"{file} is not a readable PyTorch checkpoint (truncated or corrupt?): {msg}") from None

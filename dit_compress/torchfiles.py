"""Reading PyTorch pickles (``.pt``/``.pth``/``.ckpt``) a user hands us: tensors only, nothing in
the file is executed, and a file that is not one is refused in one line."""

from __future__ import annotations

import argparse
import contextlib
import pickle
import warnings
from pathlib import Path

import torch

from .errors import FormatError


def safe_torch_load(file: Path):
    """``torch.load(weights_only=True)`` allowing only argparse.Namespace besides tensors."""
    file = Path(file)
    ser = torch.serialization
    if hasattr(ser, "safe_globals"):  # torch >= 2.5
        allow = ser.safe_globals([argparse.Namespace])
    else:  # older torch: a process-wide allow-list of the one class
        getattr(ser, "add_safe_globals", lambda _: None)([argparse.Namespace])
        allow = contextlib.nullcontext()
    try:
        with allow, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on legacy pickles: the outcome is said in one line
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        detail = next((line for line in first if "GLOBAL" in line or "Unsupported" in line), first[0] if first else "")
        detail = detail.strip().split(". ")[0][:160]
        raise FormatError(f"{file}: refused to unpickle a non-tensor object, nothing was executed ({detail})") from None
    except Exception as e:  # noqa: BLE001 - garbage bytes raise KeyError, IndexError, ... from deep in the unpickler
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        msg = msg.split(". ")[0][:160]
        if not isinstance(e, (RuntimeError, EOFError, OSError, ValueError)):
            msg = f"unreadable pickle data ({type(e).__name__} {msg})"
        raise FormatError(f"{file} is not a readable PyTorch checkpoint (truncated or corrupt?): {msg}") from None

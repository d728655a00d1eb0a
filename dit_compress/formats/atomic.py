"""Atomic outputs: write into a temporary sibling, rename into place on success only."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import DitcError, UsageError


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def check_output(path: Path, force: bool) -> None:
    path = Path(path)
    if path.exists() and not force:
        raise UsageError(f"output {path} already exists (use `force` to replace it)")
    parent = path.resolve().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise DitcError(f"output {path} is not writable (no write permission on {probe})")


def work_dir_for(output: Path) -> Path:
    """Where resumable state of a command writing ``output`` lives while it runs (removed on success)."""
    output = Path(output)
    return output.parent / f".{output.name}.ditc-work"


@contextlib.contextmanager
def atomic_dir(path: Path, force: bool = False):
    """Yield a temporary directory that becomes ``path`` only if the block succeeds."""
    path = Path(path)
    check_output(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; outputs get the usual permissions
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for f in tmp.rglob("*"):  # some writers (safetensors) create 0600 files
        if f.is_file():
            os.chmod(f, 0o666 & ~_umask())
    if path.exists():
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_file(path: Path, force: bool = False):
    """Yield a temporary file path that becomes ``path`` only if the block succeeds."""
    path = Path(path)
    check_output(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    tmp = Path(tmp)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if path.is_dir():
        shutil.rmtree(path)
    os.replace(tmp, path)

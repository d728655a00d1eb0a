"""Content identities of files and folders: a SHA-256 of every byte, never a summary (names,
sizes or times) that an edit can keep.

A file's digest is remembered for as long as its device, inode, size, modification time and
status-change time stay the same (the status-change time cannot be set back by a user: any
write or ``touch`` moves it), in this process and in ``file-hashes.json`` under
``DITC_CACHE_DIR`` (default ``~/.cache/dit_compress``), written by the main process once per
identity asked for, so a large file (a text encoder, a reference folder) is read once per change,
not once per command.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

CHUNK = 1 << 24
_MEMO: dict[str, list] = {}
_LOADED = {"from": None}


def _stamp(st: os.stat_result) -> list:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _memo_file() -> Path | None:
    d = os.environ.get("DITC_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "dit_compress")
    return Path(d) / "file-hashes.json"


def _load_memo() -> None:
    f = _memo_file()
    if f is None or _LOADED["from"] == str(f):
        return
    _LOADED["from"] = str(f)
    try:
        data = json.loads(f.read_bytes()[: 64 << 20])
    except (OSError, ValueError):
        return
    if isinstance(data, dict):
        for k, v in data.items():
            if isinstance(v, list) and len(v) == 2 and isinstance(v[1], str):
                _MEMO.setdefault(k, v)


_DIRTY = {"n": 0}


def save_memo() -> None:
    """Write the memo (merged with what another process wrote meanwhile); main process only."""
    f = _memo_file()
    if f is None or not _DIRTY["n"] or os.environ.get("RANK", "0") not in ("", "0"):
        return
    _DIRTY["n"] = 0
    try:
        f.parent.mkdir(parents=True, exist_ok=True)
        try:
            disk = json.loads(f.read_bytes()[: 64 << 20])
        except (OSError, ValueError):
            disk = {}
        merged = {**(disk if isinstance(disk, dict) else {}), **_MEMO}
        tmp = f.with_name(f".{f.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(merged))
        os.replace(tmp, f)
    except OSError:  # a cache that cannot be written is skipped
        pass


def file_digest(path, save: bool = True) -> str:
    """SHA-256 of every byte of the file ``path`` (remembered while the file is unchanged;
    ``save=False`` leaves the writing of the memo to the caller, e.g. once per folder)."""
    p = Path(path)
    real = os.path.realpath(p)
    st = os.stat(real)
    if not stat.S_ISREG(st.st_mode):  # a pipe, a device (/dev/zero) or a folder has no content to vouch for
        raise OSError(f"{path} is not a regular file")
    _load_memo()
    hit = _MEMO.get(real)
    if hit is not None and hit[0] == _stamp(st):
        return hit[1]
    h = hashlib.sha256()
    with open(real, "rb") as f:
        while True:
            b = f.read(CHUNK)
            if not b:
                break
            h.update(b)
    digest = h.hexdigest()
    if os.stat(real).st_ctime_ns == st.st_ctime_ns:  # not written while it was read
        _MEMO[real] = [_stamp(st), digest]
        _DIRTY["n"] += 1
        if save:
            save_memo()
    return digest


def tree_digest(path, skip=()) -> str:
    """SHA-256 of a file, or of a folder: every file's relative name and content digest, in
    order (names in ``skip`` left out, e.g. a manifest of hashes written beside them)."""
    p = Path(path)
    if not p.is_dir():
        return file_digest(p)  # a regular file, or an OSError naming what it is not
    h = hashlib.sha256()
    for f in sorted(x for x in p.rglob("*") if x.is_file() and x.name not in skip):
        h.update(f"{f.relative_to(p).as_posix()}\n{file_digest(f, save=False)}\n".encode())
    save_memo()
    return h.hexdigest()


def bytes_digest(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


SEAL = "contents.sha256.json"


def seal(folder, names, key: str | None = None) -> None:
    """Write the digests of ``names`` (those present) in ``folder``, and the ``key`` it is filed
    under, to its seal, last: a folder whose seal is written is complete."""
    folder = Path(folder)
    digests = {n: file_digest(folder / n) for n in names if (folder / n).is_file()}
    tmp = folder / f".{SEAL}.tmp"
    tmp.write_text(json.dumps({"key": key, "files": digests}, indent=1, sort_keys=True))
    os.replace(tmp, folder / SEAL)


def seal_problem(folder, required, key: str | None = None) -> str | None:
    """Why ``folder`` is not as sealed (None when its seal names ``key`` and every sealed file
    is there with its digest, the ``required`` ones among them): no seal, another key (an entry
    copied or renamed), a file missing, changed or unreadable."""
    folder = Path(folder)
    try:
        sealed = json.loads((folder / SEAL).read_bytes()[: 1 << 20])
    except FileNotFoundError:
        return "it has no seal (an unfinished or foreign entry)"
    except (OSError, ValueError):
        return "its seal cannot be read"
    digests = sealed.get("files") if isinstance(sealed, dict) else None
    if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
        return "its seal is malformed"
    if key is not None and sealed.get("key") != key:
        return "its seal was made for another key (a copied or renamed entry)"
    for n in required:
        if n not in digests:
            return f"{n} is not sealed"
    for n, d in digests.items():
        f = folder / n
        if not isinstance(n, str) or "/" in n or n.startswith("."):
            return "its seal names a file outside it"
        try:
            if file_digest(f) != d:
                return f"{n} changed after it was sealed"
        except OSError:
            return f"{n} is missing or unreadable"
    return None

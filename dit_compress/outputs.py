"""The one output writer: every command's output is checked, claimed and written here.

- ``check_output`` refuses what would lose data before anything runs: an empty path, ``.``,
  the current directory or one of its parents, the home directory, a source the command
  reads (or a directory holding it), a symbolic link, a path under a file, and an existing
  output unless ``force``.
- ``claim_output`` also takes an exclusive lock on the output (``flock`` on a lock file in
  the system's temporary directory, keyed by the resolved path), held until the command
  ends, so a second process writing the same output fails at start instead of at the end.
- ``atomic_dir`` / ``atomic_file`` write into a temporary sibling and swap it into place only
  when complete; an output being replaced (``force``) is moved aside first and removed only
  after the new one is in place, so a failure at any moment keeps one of the two whole.

Only the main process of a multi-process run (``RANK`` 0) claims outputs: the others write
nothing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import DitcError, UsageError

_HELD: dict[str, int] = {}  # resolved output -> lock fd, claims held by this process


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def is_main_process() -> bool:
    """False on the processes other than the first of an ``accelerate launch`` / torchrun run."""
    return os.environ.get("RANK", "0") in ("", "0")


def _resolved(path: Path) -> Path:
    """``path`` with its parent resolved (symlinks, ``..``), its last component kept as given."""
    path = Path(os.path.abspath(path))
    return Path(os.path.realpath(path.parent)) / path.name


def _is_within(inner: Path, outer: Path) -> bool:
    try:
        inner.relative_to(outer)
        return True
    except ValueError:
        return False


def _local_paths(sources) -> list[Path]:
    out = []
    for s in sources or ():
        if s is None or not isinstance(s, (str, os.PathLike)):
            continue
        p = Path(s)
        if str(s).strip() and (p.exists() or p.is_symlink()):
            out.append(Path(os.path.realpath(p)))
    return out


def check_output(path, force: bool, sources=()) -> Path:
    """Refuse an output that would lose data or cannot be written; returns it resolved."""
    if path is None or (isinstance(path, str) and not path.strip()):
        raise UsageError("output path is empty: give `output` a directory name (an unset shell variable?)")
    if not isinstance(path, (str, os.PathLike)):
        raise UsageError(f"`output` must be a path, got {path!r}"[:200])
    given = Path(path)
    for up in [given, *given.parents]:
        if up.is_symlink() and not up.exists():
            raise UsageError(f"output {path}: {up} is a dangling symbolic link")
    if str(path).strip() in (".", "./") or given.name in ("", ".", ".."):
        raise UsageError(f"output {str(path)!r} names a directory by '.' or '..': give the output its own name")
    res = _resolved(given)
    cwd = Path(os.path.realpath(os.getcwd()))
    if res == cwd or _is_within(cwd, res):
        raise UsageError(f"output {path} is the current directory or holds it: give the output its own name")
    home = Path(os.path.realpath(os.path.expanduser("~")))
    if res in (home, Path(res.anchor)):
        raise UsageError(f"output {path} is {'the home directory' if res == home else 'the filesystem root'}; "
                         "give the output its own name")
    for src in _local_paths(sources):
        if res == src or _is_within(src, res):
            raise UsageError(f"output {path} is the source {src} or holds it: writing there would replace what is read")
    if given.is_symlink() or res.is_symlink():
        raise UsageError(f"output {path} is a symbolic link (to {os.readlink(res)}); give the real path")
    if res.exists() and not force:
        raise UsageError(f"output {path} already exists (use `force` to replace it)")
    probe = res.parent
    while not probe.exists():
        if probe.is_symlink():
            raise UsageError(f"output {path}: {probe} is a dangling symbolic link")
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"output {path} cannot be created: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK):
        raise DitcError(f"output {path} is not writable (no write permission on {probe})")
    return res


def _lock_file(res: Path) -> Path:
    key = hashlib.sha256(str(res).encode()).hexdigest()[:24]
    d = Path(tempfile.gettempdir()) / f"ditc-locks-{os.getuid()}"
    d.mkdir(mode=0o700, exist_ok=True)
    return d / f"{key}.lock"


def _flock(lock_file: Path, busy: str) -> int:
    """An open, exclusively locked descriptor of ``lock_file``, taken at once; ``busy`` is the
    one line when another process holds it."""
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise UsageError(busy) from None
        raise
    return fd


@contextlib.contextmanager
def claim_output(path, force: bool = False, sources=()):
    """``with claim_output(out, force, sources=[src]):`` the whole command: ``check_output``
    plus an exclusive lock on ``out`` held until the block ends (re-entrant in one process).
    A second process claiming the same output fails at once, naming it."""
    if not is_main_process():
        yield Path(path)
        return
    res = check_output(path, force, sources)
    key = str(res)
    if key in _HELD:
        yield res
        return
    fd = _flock(_lock_file(res), f"output {path} is being written by another ditc process; wait for it or choose "
                                 "another output")
    _HELD[key] = fd
    try:
        # checked again under the lock: a writer that held it before us may have finished the output
        res = check_output(path, force, sources)
        yield res
    finally:
        _HELD.pop(key, None)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextlib.contextmanager
def exclusive(path, what: str):
    """An exclusive lock on ``path`` (a run directory, say) for this process, taken at once or
    refused in one line naming ``what``; nothing is written to ``path`` itself. The lock is on
    the real path: a symbolic link to the same directory takes the same lock."""
    res = Path(os.path.realpath(path))
    key = "lock:" + str(res)
    if key in _HELD:
        yield res
        return
    fd = _flock(_lock_file(Path(key)), f"{what} {path} is in use by another ditc process; wait for it or choose another")
    _HELD[key] = fd
    try:
        yield res
    finally:
        _HELD.pop(key, None)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def work_dir_for(output: Path) -> Path:
    """Where resumable state of a command writing ``output`` lives while it runs (removed on success)."""
    output = _resolved(Path(output))
    return output.parent / f".{output.name}.ditc-work"


def _make_parents(parent: Path) -> list[Path]:
    """Create ``parent`` and the missing directories above it; returns those created (deepest last)."""
    made = []
    probe = parent
    while not probe.exists():
        made.append(probe)
        probe = probe.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DitcError(f"cannot create {parent}: {e.strerror or e}") from None
    return list(reversed(made))


def _remove_made(made: list[Path]) -> None:
    for d in reversed(made):
        with contextlib.suppress(OSError):
            d.rmdir()


def _swap_in(tmp: Path, path: Path, force: bool) -> None:
    """Put ``tmp`` at ``path``; an existing ``path`` (only with ``force``) is moved aside first
    and removed last."""
    old = None
    if (path.exists() or path.is_symlink()) and not force:
        raise UsageError(f"output {path} appeared while this command ran (another program wrote it); nothing replaced")
    if path.exists() or path.is_symlink():
        old = path.parent / f".{path.name}.{os.getpid()}.old"
        if old.exists():
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: Path, force: bool = False, sources=()):
    """Yield a temporary directory that becomes ``path`` only if the block succeeds. On a
    process other than the main one, a scratch directory that is thrown away (only the main
    process writes)."""
    path = Path(path)
    if not is_main_process():
        scratch = Path(tempfile.mkdtemp(prefix="ditc-rank-scratch-"))
        try:
            yield scratch
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return
    with claim_output(path, force, sources) as res:
        made = _make_parents(res.parent)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{res.name}.", suffix=".tmp", dir=res.parent))
        except OSError as e:
            _remove_made(made)
            raise DitcError(f"cannot write into {res.parent}: {e.strerror or e}") from None
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; outputs get the usual permissions
        try:
            yield tmp
            for f in tmp.rglob("*"):  # some writers (safetensors) create 0600 files
                if f.is_file():
                    os.chmod(f, 0o666 & ~_umask())
            _swap_in(tmp, res, force)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            _remove_made(made)
            raise


@contextlib.contextmanager
def atomic_file(path: Path, force: bool = False, sources=()):
    """Yield a temporary file path that becomes ``path`` only if the block succeeds (on a
    process other than the main one, a scratch file that is thrown away)."""
    path = Path(path)
    if not is_main_process():
        fd, scratch = tempfile.mkstemp(prefix="ditc-rank-scratch-")
        os.close(fd)
        try:
            yield Path(scratch)
        finally:
            Path(scratch).unlink(missing_ok=True)
        return
    with claim_output(path, force, sources) as res:
        made = _make_parents(res.parent)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{res.name}.", suffix=".tmp", dir=res.parent)
        except OSError as e:
            _remove_made(made)
            raise DitcError(f"cannot write into {res.parent}: {e.strerror or e}") from None
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())
        tmp = Path(tmp)
        try:
            yield tmp
            _swap_in(tmp, res, force)
        except BaseException:
            tmp.unlink(missing_ok=True)
            _remove_made(made)
            raise


PRODUCER = "producer.json"


def _first_difference(old: dict, new: dict) -> str:
    for k in sorted(set(old) | set(new), key=str):
        if old.get(k) != new.get(k):
            return f"{k}: {old.get(k)!r} then, {new.get(k)!r} now"[:240]
    return "unknown"


def resumable_work(output, producer: dict, force: bool = False, what: str = "run") -> tuple[Path, bool]:
    """The work dir of a resumable command writing ``output``, recorded with what produced
    it (``producer``: model identity and every option that changes the result). A rerun
    with the same producer resumes (returns True); a different one is refused in one line
    naming the first difference, or with ``force`` starts over. Never mixes the two."""
    work = work_dir_for(output)
    record = work / PRODUCER
    new = json.loads(json.dumps(producer, sort_keys=True, default=str))
    if work.exists():
        try:
            old = json.loads(record.read_bytes()[: 16 << 20])
            why = _first_difference(old, new) if isinstance(old, dict) else f"its record {record.name} holds no settings"
        except FileNotFoundError:
            old, why = None, f"it has no record of what made it ({record.name})"
        except (OSError, ValueError):
            old, why = None, f"its record of what made it, {record.name}, cannot be read"
        if old == new:
            return work, True
        if not force:
            raise UsageError(f"{work} holds an unfinished {what} made with other settings ({why}); "
                             f"rerun with the same settings to resume, or pass `force` to start over")
        shutil.rmtree(work)
    _make_parents(work.parent)
    tmp = work.parent / f".{work.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    (tmp / PRODUCER).write_text(json.dumps(new, indent=2, sort_keys=True))
    os.replace(tmp, work)
    return work, False

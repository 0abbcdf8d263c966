"""The cache directory and atomic writes.

Everything irc downloads or derives (dequantised models, the wiki corpus,
tokenised chunks) lives under ``~/.cache/irc``, or ``$IRC_CACHE`` when set.
Every entry is written to a temporary sibling and renamed into place, so a
killed or concurrent run never leaves a half-written entry behind: readers see
either nothing or the complete thing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from irc.errors import UserError

# a temporary entry older than this belongs to a run that was killed (dequantising takes ~15 s)
STALE_SECONDS = 6 * 3600


def cache_dir(*parts: str) -> Path:
    """The cache root (``$IRC_CACHE`` or ``~/.cache/irc``), joined with ``parts`` and created."""
    root = os.environ.get("IRC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "irc")
    path = Path(root).joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sweep_stale(directory: Path, older_than: float = STALE_SECONDS) -> list[Path]:
    """Remove the ``.NAME.tmp-*`` entries of killed runs (those older than ``older_than`` seconds)."""
    removed = []
    now = time.time()
    for entry in Path(directory).glob(".*.tmp-*"):
        try:
            if now - entry.lstat().st_mtime < older_than:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink()
            removed.append(entry)
        except OSError:
            continue  # another run swept it first, or it is not ours to remove
    return removed


def check_output(path: str | Path, *, flag: str = "-o") -> Path:
    """Refuse, before any work, an output path whose directory cannot be written."""
    path = Path(path)
    parent = path.absolute().parent
    existing = parent
    while not existing.exists():  # the nearest ancestor that exists is where directories get created
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {path}: {existing} is a file, not a directory; choose another output path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {existing} is not writable; choose another output path")
    return path


def respect_umask(path: str | Path) -> None:
    """Give a written file the mode an ordinary ``open`` would (mkstemp and safetensors make 0600):
    a model must be readable by whoever may read its directory."""
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    try:  # Linux: read without setting it (os.umask sets it for every thread for a moment)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``final`` when the block succeeds.

    If ``final`` already exists when the block ends (a concurrent run finished
    first), the temporary directory is discarded and the existing one is kept:
    both runs built the same thing. On an exception the temporary directory is
    removed and ``final`` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(final: Path, mode: str = "wb") -> Iterator:
    """Open a temporary sibling of ``final`` for writing; rename it into place on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    try:
        respect_umask(tmp)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: Path, obj) -> None:
    with atomic_file(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def sha256_files(paths: list[Path], chunk: int = 1 << 22) -> str:
    """sha256 over the files in the given order (name and bytes of each)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).name.encode() + b"\0")
        with open(p, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()


def cached_sha256(paths: list[Path]) -> str:
    """``sha256_files`` memoised on (real path, size, mtime) of every file.

    Hashing 500 MB of weights costs about a second; loading a cached model
    must not pay it every time.
    """
    key_src = json.dumps(
        [(os.path.realpath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths]
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:32]
    memo = cache_dir("hashes") / f"{key}.txt"
    if memo.is_file():
        digest = memo.read_text().strip()
        if len(digest) == 64:
            return digest
    digest = sha256_files(paths)
    with atomic_file(memo, "w") as f:
        f.write(digest + "\n")
    return digest

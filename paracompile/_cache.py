"""A content-addressed cache of generated modules.

The key (`key`, the one function that makes them) hashes exactly what changes the generated
text or the compiled code: the cell's source (or, for traced functions, its IR), target,
dtype, the paracompile version and the sources of the compiler, the templates and the runtime
helpers kernels import (the driver's fingerprints).
Files are written atomically (`os.replace`) and imported as real modules registered in
`sys.modules`, so numba's `cache=True` can reuse compiled kernels across processes.

A damaged entry (a truncated module, a corrupted numba index or data file; see
`_driver` for the metadata) is discarded and rebuilt with a `CacheWarning`, never left to fail
every later load: generated modules end with a checksum line, and numba's cache of their
kernels is read through `_recover_numba_cache`.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import functools
import glob
import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from types import ModuleType

from ._version import __version__

# Bumped when the layout or format of cache files changes, so old entries are not misread
# (2: modules end with a checksum line).
_FORMAT = "2"
_CHECKSUM = "# paracompile-sha256: "


class CacheWarning(UserWarning):
    """The compile cache was damaged or unusable; paracompile worked around it."""


def cache_dir() -> Path:
    """`$PARACOMPILE_CACHE_DIR`, else `$XDG_CACHE_HOME/paracompile`, else ~/.cache/paracompile;
    a private temporary directory (with a `CacheWarning`) when that one cannot be written."""
    env = os.environ.get("PARACOMPILE_CACHE_DIR")
    try:
        if env:
            path = Path(env).expanduser()
        else:
            base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
            path = Path(base) / "paracompile"
    except RuntimeError as err:  # no HOME and no password-database entry
        return _fallback("the default cache directory", str(err))
    if str(path) in _FALLBACKS:
        return _FALLBACKS[str(path)]
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    except OSError as err:
        return _fallback(str(path), err.strerror or str(err))
    return path


# unusable cache directory -> the temporary one used instead, for the rest of the process
_FALLBACKS: dict[str, Path] = {}


def _fallback(wanted: str, reason: str) -> Path:
    if wanted not in _FALLBACKS:
        # private (0700) and per process: a shared, predictable name in /tmp could be
        # planted with modules that we would import
        tmp = Path(tempfile.mkdtemp(prefix="paracompile-cache-"))
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        _FALLBACKS[wanted] = tmp
        warnings.warn(CacheWarning(
            f"cannot use the compile cache {wanted} ({reason}); compiling into "
            f"{tmp} for this process only. Set PARACOMPILE_CACHE_DIR to a writable directory "
            "to keep compiled kernels between runs"), stacklevel=3)
    return _FALLBACKS[wanted]


# What each kind of entry is keyed by, besides paracompile's version and the cache format
# (the fingerprints are `_driver.analysis_fingerprint` and `_driver.target_fingerprint`).
KEY_PARTS = {
    "cell-text": ("the .cell text", "the analysis fingerprint"),  # a cell's metadata
    "cell-ir": ("the traced IR", "the analysis fingerprint"),  # a traced cell's metadata
    "module": ("the cell's key", "target", "dtype", "the target fingerprint"),  # generated
    "built": ("the module's source",),  # a module embedded in a `paracompile build` file
}


def key(kind: str, *parts: str) -> str:
    """The cache key of an entry: the one function every key goes through.

    `parts` are what `KEY_PARTS[kind]` lists, in order; a key changes with each of them, with
    the kind, with paracompile's version and with the layout of the cache files."""
    expected = KEY_PARTS[kind]
    if len(parts) != len(expected):
        raise TypeError(f"a {kind!r} cache key takes {len(expected)} parts "
                        f"({', '.join(expected)}), got {len(parts)}")
    h = hashlib.sha256()
    for part in (__version__, _FORMAT, kind, *parts):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def fingerprint(*texts: str) -> str:
    """A hash of source texts (a part of keys, not a key: see `key`)."""
    h = hashlib.sha256()
    for text in texts:
        h.update(hashlib.sha256(text.encode()).digest())
    return h.hexdigest()


def package_fingerprint() -> str:
    """A hash of every source file of the installed paracompile package (Python, grammar,
    templates). A built module records it: its kernels were rendered for the launchers of
    exactly this package, and a launcher of another one may lay out its grid or arguments
    differently (see `_runtime.cell_from_sources`). Reads files only: no compiler needed."""
    return _package_fingerprint()


@functools.cache
def _package_fingerprint() -> str:
    root = resources.files("paracompile")
    files = sorted((f"{d.name}/{f.name}" if d is not root else f.name, f)
                   for d in (root, root.joinpath("templates"))
                   for f in d.iterdir() if f.name.endswith((".py", ".lark", ".jinja")))
    return fingerprint(*(f"{name}\n{f.read_text(encoding='utf-8')}" for name, f in files))


def write_atomic(path: Path, text: str, *, overwrite: bool = True) -> None:
    """Write `text` to `path` so that readers see the old file or the new one, never half.

    With `overwrite=False`, raise FileExistsError instead of replacing an existing file (no
    window in which a file created meanwhile could be clobbered)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".paracompile-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a written module is shareable
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _link_new(tmp: str, path: Path) -> None:
    """Give `tmp`'s content the name `path` only if `path` does not exist."""
    try:
        os.link(tmp, path)  # atomic, and fails with FileExistsError
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path)) from None
    except OSError:  # a file system without hard links: check, then rename
        if path.exists():
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path)) from None
        os.replace(tmp, path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def module_path(key: str, stem: str) -> Path:
    return cache_dir() / key[:2] / f"{stem}_{key[:20]}.py"


def with_checksum(source: str) -> str:
    """`source` followed by a line holding its hash: see `checked_source`."""
    if not source.endswith("\n"):
        source += "\n"
    return f"{source}{_CHECKSUM}{hashlib.sha256(source.encode()).hexdigest()}\n"


def checked_source(text: str) -> str | None:
    """The source of a file written with `with_checksum`, or None when it is damaged
    (truncated, edited, or without its checksum line)."""
    source, sep, rest = text.rpartition(_CHECKSUM)
    if not sep or rest != hashlib.sha256(source.encode()).hexdigest() + "\n":
        return None
    return source


def discard(path: Path, what: str) -> None:
    """Delete a damaged cache file, with a `CacheWarning` naming it."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    warnings.warn(CacheWarning(f"discarded {what} {path}; rebuilding it"),
                  stacklevel=3)


def _read_module(path: Path) -> str | None:
    """The checked source of the cached module at `path`; None when it is missing, or
    damaged (then deleted, with a warning)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        text = ""
    source = checked_source(text)
    if source is None:
        discard(path, "the damaged generated module")
    return source


def import_source(path: Path, name: str, source: str) -> ModuleType:
    """Run `source` (the text of `path`) as module `name`, registered in sys.modules first
    (numba's cache finds the module there and the kernels' source file at `path`).

    Compiled here rather than by the import system: no `.pyc` is written, so there is no
    bytecode cache that could be damaged apart from the checked source."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        exec(compile(source, str(path), "exec"), module.__dict__)  # noqa: S102
    except BaseException:
        del sys.modules[name]
        raise
    _recover_numba_cache(module)
    return module


def load_module(key: str, stem: str, render: Callable[[], str]) -> tuple[ModuleType, bool]:
    """The module for `key`, rendering it with `render()` only when it is not on disk (or
    its file is damaged).

    Returns (module, whether it was generated now)."""
    path = module_path(key, stem)
    name = f"_paracompile_{stem}_{key[:20]}"
    if name in sys.modules:
        return sys.modules[name], False
    source = _read_module(path)
    generated = source is None
    if source is None:
        source = render()
        text = with_checksum(source)
        write_atomic(path, text)
        dump = os.environ.get("PARACOMPILE_DUMP_DIR")
        if dump:
            write_atomic(Path(dump) / path.name, text)
    return import_source(path, name, source), generated


def _recover_numba_cache(module: ModuleType) -> None:
    """Make the kernels of `module` treat a damaged numba cache entry as a miss.

    numba raises from the kernel's first call, in every process, when its index (`.nbi`) or
    data (`.nbc`) file is truncated or garbled (pickle or LLVM errors): a damaged entry would
    never heal. Wrapped here, the entry's files are deleted with a `CacheWarning` and the
    kernel is compiled again (and saved afresh)."""
    if "numba" not in sys.modules:  # the torch module has no kernels
        return
    from numba.core.caching import Cache
    from numba.core.dispatcher import Dispatcher

    for obj in list(vars(module).values()):
        cache = obj._cache if isinstance(obj, Dispatcher) else None
        if isinstance(cache, Cache) and "load_overload" not in vars(cache):
            cache.load_overload = _recovering(cache, cache.load_overload)


def _recovering(cache, load: Callable) -> Callable:
    def load_overload(sig, target_context):  # noqa: ANN001, ANN202
        try:
            return load(sig, target_context)
        except Exception as err:  # noqa: BLE001 - any failure to read the entry
            index = Path(cache._cache_file._index_path)  # numba's IndexDataCacheFile
            for path in (index, *index.parent.glob(glob.escape(index.name[:-4]) + ".*.nbc")):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            warnings.warn(CacheWarning(
                f"discarded numba's damaged cache {index} "
                f"({type(err).__name__}: {err}); recompiling"), stacklevel=2)
            return None

    return load_overload

"""A content-addressed cache of generated modules.

The key hashes exactly what changes the generated text or the compiled code: the cell's
source (or, for traced functions, its IR), target, dtype, options, the paracompile version
and the sources of the code generator, the templates and the runtime helpers kernels import.
Files are written atomically (`os.replace`) and imported as real modules registered in
`sys.modules`, so numba's `cache=True` can reuse compiled kernels across processes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

from ._version import __version__


def cache_dir() -> Path:
    """`$PARACOMPILE_CACHE_DIR`, else `$XDG_CACHE_HOME/paracompile`, else ~/.cache/paracompile."""
    env = os.environ.get("PARACOMPILE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "paracompile"


def digest(*parts: str) -> str:
    h = hashlib.sha256()
    for part in (__version__, *parts):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a written module is shareable
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def module_path(key: str, stem: str) -> Path:
    return cache_dir() / key[:2] / f"{stem}_{key[:20]}.py"


def import_file(path: Path, name: str) -> ModuleType:
    """Import `path` as module `name` (registered in sys.modules first, for numba's cache)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def load_module(key: str, stem: str, render: callable) -> tuple[ModuleType, bool]:
    """The module for `key`, rendering it with `render()` only when it is not on disk.

    Returns (module, whether it was generated now)."""
    path = module_path(key, stem)
    generated = False
    if not path.exists():
        source = render()
        write_atomic(path, source)
        generated = True
        dump = os.environ.get("PARACOMPILE_DUMP_DIR")
        if dump:
            write_atomic(Path(dump) / path.name, source)
    return import_file(path, f"_paracompile_{stem}_{key[:20]}"), generated

"""Resource report of the generated CUDA kernels without a GPU.

``numba.cuda.compile_ptx`` (NVVM) turns each kernel of a rendered module into PTX for a
given compute capability, with explicit signatures; ``ptxas -arch=sm_XX -v`` then assembles
it and reports registers, spill stores/loads, stack frame and shared memory per kernel.

Toolchain (measured, see docs/cuda.md): compile_ptx needs libnvvm (the CUDA toolkit's, at
$CUDA_HOME/nvvm or /usr/local/cuda) and libnvrtc (numba-cuda asks NVRTC for the supported
compute capabilities); the toolkit here has no libnvrtc, so install the pip wheel
``nvidia-cuda-nvrtc`` of the toolkit's release (13.0.x for ptxas 13.0).  The PTX that NVVM
writes carries the toolkit release that made it; ptxas must be at least that release.

The module must be imported with numba.cuda in GPU mode (not the simulator) and rendered
with ``simulator=False``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence

DEFAULT_ARCHS = ("sm_80", "sm_90")

_NVRTC_HINT = ("pip install 'nvidia-cuda-nvrtc==13.0.*' (the release of your ptxas/toolkit; "
               "it is the 'ptx' extra of paracompile)")


class PTXToolchainError(RuntimeError):
    """compile_ptx/ptxas cannot run here (missing or mismatched NVVM, NVRTC or ptxas)."""


def find_ptxas() -> str | None:
    """Path of ptxas: $PTXAS, then PATH, then $CUDA_HOME/bin, /usr/local/cuda/bin."""
    cand = os.environ.get("PTXAS")
    if cand and os.path.isfile(cand):
        return cand
    found = shutil.which("ptxas")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            path = os.path.join(home, "bin", "ptxas")
            if os.path.isfile(path):
                return path
    return None


def ptxas_version(ptxas: str) -> tuple[int, int]:
    out = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+)\.(\d+)", out)
    if not m:
        raise PTXToolchainError(f"cannot read the version of {ptxas}: {out!r}")
    return int(m.group(1)), int(m.group(2))


def nvrtc_available() -> bool:
    """True when libnvrtc can be loaded (what compile_ptx needs besides libnvvm)."""
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib

        load_nvidia_dynamic_lib("nvrtc")
        return True
    except Exception:
        return False


def nvvm_available() -> bool:
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib

        load_nvidia_dynamic_lib("nvvm")
        return True
    except Exception:
        return False


def missing_toolchain() -> str | None:
    """A sentence saying what is missing for ptx_report, or None when all is there."""
    if find_ptxas() is None:
        return "ptxas not found (set $PTXAS or $CUDA_HOME, or put the CUDA toolkit's bin on PATH)"
    if not nvvm_available():
        return "libnvvm not found (CUDA toolkit's nvvm/lib64; set $CUDA_HOME)"
    if not nvrtc_available():
        return f"libnvrtc not found: {_NVRTC_HINT}"
    return None


def check_toolchain() -> str:
    """Raise PTXToolchainError naming what is missing; return the ptxas path."""
    why = missing_toolchain()
    if why:
        raise PTXToolchainError(f"cannot compile PTX reports: {why}")
    from numba import cuda

    if cuda.config.ENABLE_CUDASIM:
        raise PTXToolchainError("compile_ptx is not available with NUMBA_ENABLE_CUDASIM=1")
    return find_ptxas()


def kernel_signatures(module) -> dict[str, tuple]:
    """Explicit numba signatures of the module's kernels, as the launcher calls them."""
    from numba.cuda import types

    ft = {"float32": types.float32, "float64": types.float64}[module.CUDA_DTYPE]
    k, m, q, o = module.CUDA_K, module.CUDA_M, module.CUDA_Q, module.CUDA_O
    a1 = types.Array(ft, 1, "C")
    i1 = types.Array(types.int32, 1, "C")
    i64 = types.int64
    fwd = [a1] * (k + m + q + k + o)
    bwd = [a1] * (k + o + k + m + q + k + k + m + q)
    return {
        "newton_kernel": tuple(fwd + [i1, a1, i64, i64, i64, i64, i64, types.float64]),
        "sequential_kernel": tuple([i1] + fwd + [i64, i64, i64]),
        "backward_kernel": tuple(bwd + [i64, i64, i64, i64]),
        "backward_sequential_kernel": tuple(bwd + [i64, i64, i64]),
    }


_RE_FUNC = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
_RE_FRAME = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_RE_USED = re.compile(r"Used (\d+) registers")
_RE_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(text: str) -> dict[str, dict]:
    """Parse ``ptxas -v`` output into {mangled entry name: resources}."""
    out: dict[str, dict] = {}
    cur = None
    for line in text.splitlines():
        m = _RE_FUNC.search(line)
        if m:
            cur = out.setdefault(m.group(1), {"registers": 0, "spill_stores": 0,
                                              "spill_loads": 0, "stack": 0, "smem": 0})
            continue
        if cur is None:
            continue
        m = _RE_FRAME.search(line)
        if m:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
        m = _RE_USED.search(line)
        if m:
            cur["registers"] = int(m.group(1))
            s = _RE_SMEM.search(line)
            cur["smem"] = int(s.group(1)) if s else 0
    return out


def _ptx_release(ptx: str) -> tuple[int, int] | None:
    m = re.search(r"Cuda compilation tools, release (\d+)\.(\d+)", ptx)
    return (int(m.group(1)), int(m.group(2))) if m else None


def ptx_report(module, *, archs: Sequence[str] = DEFAULT_ARCHS,
               kernels: Iterable[str] | None = None, label: str | None = None) -> list[dict]:
    """Compile the kernels of ``module`` for each arch and return one row per (kernel, arch):
    {cell, dtype, kernel, arch, registers, spill_stores, spill_loads, stack, smem}.

    Raises PTXToolchainError when ptxas, libnvvm or libnvrtc is missing, when the PTX is newer
    than ptxas, or when ptxas rejects it.
    """
    ptxas = check_toolchain()
    from numba import cuda

    if getattr(module, "CUDA_SIMULATOR", False):
        raise PTXToolchainError("module was rendered with simulator=True; render it for a GPU")
    sigs = kernel_signatures(module)
    names = list(kernels) if kernels is not None else list(module.CUDA_KERNELS)
    ptxas_rel = ptxas_version(ptxas)
    rows = []
    with tempfile.TemporaryDirectory(prefix="paracompile-ptx-") as tmp:
        for arch in archs:
            cc = tuple(int(c) for c in arch.removeprefix("sm_"))
            if len(cc) != 2:
                raise ValueError(f"arch must look like 'sm_80', got {arch!r}")
            for name in names:
                fn = getattr(module, name).py_func
                try:
                    ptx, _ = cuda.compile_ptx(fn, sigs[name], cc=cc)
                except Exception as exc:  # missing libs surface here as loader errors
                    if "nvrtc" in repr(exc).lower():
                        raise PTXToolchainError(f"compile_ptx failed: {exc}; {_NVRTC_HINT}") \
                            from exc
                    raise
                rel = _ptx_release(ptx)
                if rel is not None and rel > ptxas_rel:
                    raise PTXToolchainError(
                        f"NVVM wrote PTX of CUDA {rel[0]}.{rel[1]} but ptxas is "
                        f"{ptxas_rel[0]}.{ptxas_rel[1]}: keep NVVM and ptxas of one release")
                path = os.path.join(tmp, f"{name}_{arch}.ptx")
                with open(path, "w") as fh:
                    fh.write(ptx)
                # the register cap the driver's linker applies to this kernel, if any
                cap = getattr(module, "CUDA_MAX_REGISTERS", {}).get(name)
                proc = subprocess.run(
                    [ptxas, f"-arch={arch}", "-v", *([f"-maxrregcount={cap}"] if cap else []),
                     "-o", path[:-4] + ".cubin", path],
                    capture_output=True, text=True)
                if proc.returncode != 0:
                    raise PTXToolchainError(f"ptxas -arch={arch} failed on {name}:\n"
                                            f"{proc.stderr.strip()}")
                parsed = parse_ptxas(proc.stdout + proc.stderr)
                if len(parsed) != 1:
                    raise PTXToolchainError(f"expected one entry in ptxas output for {name}, "
                                            f"got {sorted(parsed)}")
                res = next(iter(parsed.values()))
                rows.append({"cell": label or getattr(module, "__name__", "?"),
                             "dtype": module.CUDA_DTYPE, "kernel": name, "arch": arch, **res})
    return rows


_COLUMNS = [("cell", "cell"), ("dtype", "dtype"), ("kernel", "kernel"), ("arch", "arch"),
            ("registers", "registers"), ("spill_stores", "spill stores (B)"),
            ("spill_loads", "spill loads (B)"), ("stack", "stack (B)"),
            ("smem", "shared (B)")]


def format_table(rows: Sequence[dict]) -> str:
    """Markdown table of ptx_report rows."""
    head = "| " + " | ".join(t for _, t in _COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in _COLUMNS) + "|"
    body = ["| " + " | ".join(str(r.get(key, "")) for key, _ in _COLUMNS) + " |" for r in rows]
    return "\n".join([head, sep, *body])

"""PTX of the generated CUDA kernels: compile_ptx (NVVM) + ptxas, without a GPU."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from paracompile import _ptx

SAMPLE = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_80'
ptxas info    : Function properties for _Z6kernelPf
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 47 registers, used 1 barriers, 520 bytes smem, 468 bytes cmem[0]
"""


def test_parse_ptxas_and_table():
    parsed = _ptx.parse_ptxas(SAMPLE)
    assert parsed == {"_Z6kernelPf": {"registers": 47, "spill_stores": 4, "spill_loads": 12,
                                      "stack": 8, "smem": 520}}
    row = {"cell": "C", "dtype": "float32", "kernel": "k", "arch": "sm_80",
           **parsed["_Z6kernelPf"]}
    table = _ptx.format_table([row])
    lines = table.splitlines()
    assert lines[0].startswith("| cell | dtype | kernel | arch | registers")
    assert lines[2] == "| C | float32 | k | sm_80 | 47 | 4 | 12 | 8 | 520 |"


def _skip_reason() -> str | None:
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return "NUMBA_ENABLE_CUDASIM=1: compile_ptx is not available in the simulator"
    return _ptx.missing_toolchain()


@pytest.mark.parametrize("cell", ["ParaGRU", "ParaLSTM"])
def test_ptx_both_archs_no_spills(cell):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _cuda_fixtures import build_module

    module = build_module(cell, "float32", simulator=False)
    rows = _ptx.ptx_report(module, label=cell)
    assert {(r["kernel"], r["arch"]) for r in rows} == {
        (k, a) for k in module.CUDA_KERNELS for a in ("sm_80", "sm_90")}
    for r in rows:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, _ptx.format_table(rows)
        assert 0 < r["registers"] <= 128, _ptx.format_table(rows)
    # the fused kernels use shared memory for the warps' chunk maps, sized at render time
    # to <= 40 KB (under the 48 KB static limit); the sequential ones none
    smem = {r["kernel"]: r["smem"] for r in rows}
    assert 0 < smem["newton_kernel"] <= 40960 and 0 < smem["backward_kernel"] <= 40960
    assert smem["sequential_kernel"] == 0 and smem["backward_sequential_kernel"] == 0


def test_ptx_rejects_simulator_module():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)

    class Fake:
        CUDA_SIMULATOR = True

    with pytest.raises(_ptx.PTXToolchainError, match="simulator"):
        _ptx.ptx_report(Fake())

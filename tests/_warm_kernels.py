"""Compile CPU kernels into the numba cache, for the test session (see conftest.warm_kernels).

    python tests/_warm_kernels.py JOBS_JSON

JOBS_JSON is a list of [cell (a path or .cell text), dtype]. For each job the cell is loaded
and every CPU kernel it has is run once on tiny data (sequential and Newton forward, which
compiles the Newton reduction kernels: T = 8 from a zero guess needs iterations), and the
backward, so
numba compiles them and saves them to its cache under $PARACOMPILE_CACHE_DIR. Several workers
run in parallel (numba compiles on one core); the test process then only loads from the cache.
Failures are reported on stderr and skipped: the tests themselves report them properly.
"""

from __future__ import annotations

import json
import sys
import traceback


def warm(cell_source: str, dtype_name: str) -> None:
    import torch

    import paracompile

    cell = paracompile.load(cell_source)
    dtype = getattr(torch, dtype_name)
    B, T, D = 2, 8, 2
    g = torch.Generator().manual_seed(0)
    xs = {n: (torch.randn(B, T, D, generator=g) + 0.5).to(dtype).requires_grad_()
          for n in cell.inputs}  # mostly positive: relu cells are not trivially at the guess
    shapes = {"vector": (D,), "scalar": (), "matrix": (D, D)}
    ps = {n: (0.3 + 0.1 * torch.rand(shapes[k], generator=g)).to(dtype).requires_grad_()
          for n, k in cell.params.items()}
    h0 = {n: (0.1 + 0.5 * torch.rand(B, D, generator=g)).to(dtype) for n in cell.states}
    for method in ("sequential", "newton"):
        out = cell.apply(xs, ps, h0, method=method, backend="cpu", iterations=2)
        sum(v.sum() for v in out.values()).backward()


def main() -> int:
    failed = 0
    for cell_source, dtype_name in json.loads(sys.argv[1]):
        try:
            warm(cell_source, dtype_name)
        except Exception:  # noqa: BLE001 - reported, and the tests will fail on it
            failed += 1
            print(f"warming {cell_source[:60]!r} {dtype_name} failed:", file=sys.stderr)
            traceback.print_exc()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

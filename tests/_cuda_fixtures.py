"""Test helper for the CUDA backend: hand-written scalar functions of a few cells, a tiny
local renderer (header + scalar functions + ``paracompile/templates/cuda.py.jinja``) that
writes the module to a file and imports it with importlib, and plain-torch sequential references.

The real renderer (``_codegen.py``) will replace :func:`build_module`; the scalar functions
follow the interface of ``docs/internal-interfaces.md``.

This module must not import ``numba.cuda`` at import time: the simulator tests import it in
a subprocess with ``NUMBA_ENABLE_CUDASIM=1`` set first.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import torch

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / "paracompile" / "templates"

# The decoration that compiles with compile_ptx without a driver (inline="always") and that
# the simulator accepts (it ignores `inline`).
DEVICE_DECORATOR = '@cuda.jit(device=True, inline="always")'

HEADER = """\
import math
import numpy as np
from numba import cuda

float_t = np.{dtype}
"""

_SIG = """
@cuda.jit(device=True, inline="always")
def _sig(x):
    return float_t(1.0) / (float_t(1.0) + math.exp(-x))
"""

# ---------------------------------------------------------------------------------------
# ParaGRU (k=1): z = σ(a_z h + x_z), r = σ(a_r h + x_r), hc = tanh(a_h (r h) + x_h),
# h' = (1 - z) h + z hc.  With ``out=True`` (test variant "GRUOut") a scalar param s is
# added to hc's pre-activation and an output y = z * hc is declared.
# ---------------------------------------------------------------------------------------

_GRU = """
@cuda.jit(device=True, inline="always")
def _gru_fwd(h, x_z, x_r, x_h, a_z, a_r, a_h{S}):
    z = _sig(a_z * h + x_z)
    r = _sig(a_r * h + x_r)
    hc = math.tanh(a_h * (r * h) + x_h{PS})
    hn = (float_t(1.0) - z) * h + z * hc
    return z, r, hc, hn


@cuda.jit(device=True, inline="always")
def step(h, x_z, x_r, x_h, a_z, a_r, a_h{S}):
    z, r, hc, hn = _gru_fwd(h, x_z, x_r, x_h, a_z, a_r, a_h{S})
    return (hn,{Y})


@cuda.jit(device=True, inline="always")
def step_jac(h, x_z, x_r, x_h, a_z, a_r, a_h{S}):
    z, r, hc, hn = _gru_fwd(h, x_z, x_r, x_h, a_z, a_r, a_h{S})
    one = float_t(1.0)
    j = (one - z) + (hc - h) * z * (one - z) * a_z + z * (one - hc * hc) * a_h * (
        r + h * r * (one - r) * a_r
    )
    return (hn, j)


@cuda.jit(device=True, inline="always")
def step_vjp(h, x_z, x_r, x_h, a_z, a_r, a_h{S}, a{AY}):
    z, r, hc, hn = _gru_fwd(h, x_z, x_r, x_h, a_z, a_r, a_h{S})
    one = float_t(1.0)
    dz = a * (hc - h){DZ}
    dhc = a * z{DHC}
    dpz = dz * z * (one - z)
    dph = dhc * (one - hc * hc)
    dpr = dph * a_h * h * r * (one - r)
    gh = a * (one - z) + dpz * a_z + dph * a_h * r + dpr * a_r
    return (gh, dpz, dpr, dph, dpz * h, dpr * h, dph * (r * h){GS})
"""


def _gru_source(out: bool) -> str:
    if out:
        rep = dict(S=", s", PS=" + s", Y=" z * hc", AY=", ay", DZ=" + ay * hc",
                   DHC=" + ay * z", GS=", dph")
    else:
        rep = dict(S="", PS="", Y="", AY="", DZ="", DHC="", GS="")
    return _SIG + _GRU.format(**rep)


def _gru_torch(out: bool):
    def step(states, inputs, params):
        (h,) = states
        x_z, x_r, x_h = inputs
        a_z, a_r, a_h = params[:3]
        z = torch.sigmoid(a_z * h + x_z)
        r = torch.sigmoid(a_r * h + x_r)
        pre = a_h * (r * h) + x_h
        if out:
            pre = pre + params[3]
        hc = torch.tanh(pre)
        hn = (1 - z) * h + z * hc
        return (hn,), ((z * hc,) if out else ())

    return step


# ---------------------------------------------------------------------------------------
# ParaLSTM (k=2, states (c, h)): f = σ(A_f h + C_f c + x_f), cn = tanh(A_c h + x_c),
# c' = f c + (1 - f) cn, o = σ(A_o h + C_o c' + x_o), h' = o tanh(c').
# ---------------------------------------------------------------------------------------

_LSTM = """
@cuda.jit(device=True, inline="always")
def _lstm_fwd(c, h, x_f, x_c, x_o, A_f, C_f, A_c, A_o, C_o):
    f = _sig(A_f * h + C_f * c + x_f)
    cn = math.tanh(A_c * h + x_c)
    cp = f * c + (float_t(1.0) - f) * cn
    o = _sig(A_o * h + C_o * cp + x_o)
    tc = math.tanh(cp)
    return f, cn, cp, o, tc


@cuda.jit(device=True, inline="always")
def step(c, h, x_f, x_c, x_o, A_f, C_f, A_c, A_o, C_o):
    f, cn, cp, o, tc = _lstm_fwd(c, h, x_f, x_c, x_o, A_f, C_f, A_c, A_o, C_o)
    return (cp, o * tc)


@cuda.jit(device=True, inline="always")
def step_jac(c, h, x_f, x_c, x_o, A_f, C_f, A_c, A_o, C_o):
    f, cn, cp, o, tc = _lstm_fwd(c, h, x_f, x_c, x_o, A_f, C_f, A_c, A_o, C_o)
    one = float_t(1.0)
    df = f * (one - f)
    do = o * (one - o)
    dcp_dc = f + (c - cn) * df * C_f
    dcp_dh = (c - cn) * df * A_f + (one - f) * (one - cn * cn) * A_c
    dt = one - tc * tc
    dhp_dc = do * C_o * dcp_dc * tc + o * dt * dcp_dc
    dhp_dh = do * (A_o + C_o * dcp_dh) * tc + o * dt * dcp_dh
    return (cp, o * tc, dcp_dc, dcp_dh, dhp_dc, dhp_dh)


@cuda.jit(device=True, inline="always")
def step_vjp(c, h, x_f, x_c, x_o, A_f, C_f, A_c, A_o, C_o, a_c, a_h):
    f, cn, cp, o, tc = _lstm_fwd(c, h, x_f, x_c, x_o, A_f, C_f, A_c, A_o, C_o)
    one = float_t(1.0)
    dpo = a_h * tc * o * (one - o)
    dcp = a_c + a_h * o * (one - tc * tc) + dpo * C_o
    dpf = dcp * (c - cn) * f * (one - f)
    dpc = dcp * (one - f) * (one - cn * cn)
    gc = dcp * f + dpf * C_f
    gh = dpf * A_f + dpc * A_c + dpo * A_o
    return (gc, gh, dpf, dpc, dpo, dpf * h, dpf * c, dpc * h, dpo * h, dpo * cp)
"""


def _lstm_torch():
    def step(states, inputs, params):
        c, h = states
        x_f, x_c, x_o = inputs
        A_f, C_f, A_c, A_o, C_o = params
        f = torch.sigmoid(A_f * h + C_f * c + x_f)
        cn = torch.tanh(A_c * h + x_c)
        cp = f * c + (1 - f) * cn
        o = torch.sigmoid(A_o * h + C_o * cp + x_o)
        return (cp, o * torch.tanh(cp)), ()

    return step


@dataclass
class CellSpec:
    name: str
    k: int
    m: int
    o: int
    param_kinds: list[str]
    jac_entries: list[list[int]]
    source: str
    torch_step: object = field(repr=False)
    # init ranges for random tests: params ~ U(-pr, pr), inputs ~ N(0, xs)
    param_range: float = 1.0
    input_scale: float = 1.0

    @property
    def q(self) -> int:
        return len(self.param_kinds)


CELLS = {
    "ParaGRU": CellSpec("ParaGRU", 1, 3, 0, ["vector"] * 3, [[0, 0]], _gru_source(False),
                        _gru_torch(False)),
    "GRUOut": CellSpec("GRUOut", 1, 3, 1, ["vector"] * 3 + ["scalar"], [[0, 0]],
                       _gru_source(True), _gru_torch(True)),
    "ParaLSTM": CellSpec("ParaLSTM", 2, 3, 0, ["vector"] * 5,
                         [[0, 0], [0, 1], [1, 0], [1, 1]], _SIG + _LSTM, _lstm_torch()),
}


def render(spec: CellSpec, dtype: str, simulator: bool) -> str:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    from paracompile._codegen import kernel_context  # the real context, hand-written functions

    ctx = kernel_context("cudasim" if simulator else "cuda", dtype, k=spec.k, m=spec.m,
                         o=spec.o, param_kinds=tuple(spec.param_kinds),
                         jac_entries=tuple(tuple(e) for e in spec.jac_entries), functions=())
    body = env.get_template("cuda.py.jinja").render(ctx=ctx)
    return HEADER.format(dtype=dtype) + spec.source + "\n" + body


def build_module(name: str, dtype: str, simulator: bool, directory: str | None = None):
    """Render, write to ``directory`` (default: a per-user temp dir) and import."""
    spec = CELLS[name]
    text = render(spec, dtype, simulator)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    modname = f"_pc_cuda_{name.lower()}_{dtype}_{'sim' if simulator else 'gpu'}_{digest}"
    if modname in sys.modules:
        return sys.modules[modname]
    directory = directory or os.path.join(tempfile.gettempdir(), f"paracompile-cuda-{os.getuid()}")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, modname + ".py")
    if not os.path.exists(path):
        tmp = path + f".{os.getpid()}.tmp"
        with open(tmp, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    mod_spec = importlib.util.spec_from_file_location(modname, path)
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[modname] = module
    mod_spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------
# Torch reference: a plain sequential loop with autograd.
# ---------------------------------------------------------------------------------------


def make_data(spec: CellSpec, B: int, T: int, D: int, dtype: torch.dtype, seed: int = 0,
              param_range: float | None = None, input_scale: float | None = None):
    g = torch.Generator().manual_seed(seed)
    pr = spec.param_range if param_range is None else param_range
    xsc = spec.input_scale if input_scale is None else input_scale
    h0s = [0.5 * torch.randn(B, D, generator=g, dtype=torch.float64) for _ in range(spec.k)]
    xs = [xsc * torch.randn(B, T, D, generator=g, dtype=torch.float64) for _ in range(spec.m)]
    ps = []
    for kind in spec.param_kinds:
        shape = (D,) if kind == "vector" else ()
        ps.append((torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * pr)
    cast = [t.to(dtype).contiguous() for t in (h0s + xs + ps)]
    return cast[: spec.k], cast[spec.k: spec.k + spec.m], cast[spec.k + spec.m:]


def torch_forward(spec: CellSpec, h0s, xs, ps):
    T = xs[0].shape[1]
    states = list(h0s)
    s_out = [[] for _ in range(spec.k)]
    y_out = [[] for _ in range(spec.o)]
    for t in range(T):
        states, ys = spec.torch_step(tuple(states), tuple(x[:, t] for x in xs), tuple(ps))
        states = list(states)
        for i in range(spec.k):
            s_out[i].append(states[i])
        for j in range(spec.o):
            y_out[j].append(ys[j])
    return [torch.stack(v, 1) for v in s_out], [torch.stack(v, 1) for v in y_out]


def torch_grads(spec: CellSpec, h0s, xs, ps, g_states, g_outputs):
    leaves = [t.detach().clone().requires_grad_(True) for t in (list(h0s) + list(xs) + list(ps))]
    h0l = leaves[: spec.k]
    xl = leaves[spec.k: spec.k + spec.m]
    pl = leaves[spec.k + spec.m:]
    s, y = torch_forward(spec, h0l, xl, pl)
    loss = sum((a * g).sum() for a, g in zip(s + y, list(g_states) + list(g_outputs), strict=True))
    grads = torch.autograd.grad(loss, leaves)
    return list(grads[: spec.k]), list(grads[spec.k: spec.k + spec.m]), list(
        grads[spec.k + spec.m:])


# ---------------------------------------------------------------------------------------
# Case runner for the simulator tests.  Runs in a subprocess with NUMBA_ENABLE_CUDASIM=1:
#   python tests/_cuda_fixtures.py < cases.json > results.json
# ---------------------------------------------------------------------------------------


def _maxdiff(a_list, b_list) -> float:
    err = 0.0
    for a, b in zip(a_list, b_list, strict=True):
        a = a.detach().to(torch.float64)
        b = b.detach().to(torch.float64)
        scale = 1.0 + float(b.abs().max()) if b.numel() else 1.0
        err = max(err, float((a - b).abs().max()) / scale if a.numel() else 0.0)
    return err


def run_case(case: dict) -> dict:
    import dataclasses
    import time

    from paracompile import _cuda

    spec = CELLS[case["cell"]]
    dtype = {"float32": torch.float32, "float64": torch.float64}[case["dtype"]]
    if case.get("gpu_text"):
        # the text rendered for a real GPU (kernels with cache=True, which the simulator
        # ignores): the kernels a GPU compiles run here too
        module = build_module(case["cell"], case["dtype"], simulator=False)
        module.CUDA_SIMULATOR = True  # let the launcher accept it in simulator mode
    else:
        module = build_module(case["cell"], case["dtype"], simulator=True)
    B, T, D = case["B"], case["T"], case["D"]
    h0s, xs, ps = make_data(spec, B, T, D, dtype, seed=case.get("seed", 0),
                            param_range=case.get("param_range"),
                            input_scale=case.get("input_scale"))
    for c in case.get("zero_channels", ()):
        # all vector params zero on channel c: a recurrence linear in h (for the GRU
        # cells), which Newton solves in one update, so that lane converges early
        for p, kind in zip(ps, spec.param_kinds, strict=True):
            if kind == "vector":
                p[c] = 0
    t0 = time.perf_counter()
    states, outputs, info = _cuda.forward(
        module, h0s, xs, ps, method=case.get("method", "newton"),
        iterations=case.get("iterations", 3), tol=case.get("tol"),
        chunk=case.get("chunk"), threads=case.get("threads"))
    t_fwd = time.perf_counter() - t0
    # reference in float64 on the same (rounded) data
    h64, x64, p64 = ([t.to(torch.float64) for t in v] for v in (h0s, xs, ps))
    ref_s, ref_y = torch_forward(spec, h64, x64, p64)
    res = {"name": case["name"], "info": dataclasses.asdict(info), "t_fwd": t_fwd,
           "err_states": _maxdiff(states, ref_s), "err_outputs": _maxdiff(outputs, ref_y),
           "states_finite": all(bool(torch.isfinite(s).all()) for s in states)}
    if case.get("backward", True):
        g = torch.Generator().manual_seed(123)
        gs = [torch.randn(B, T, D, generator=g, dtype=torch.float64) for _ in range(spec.k)]
        gy = [torch.randn(B, T, D, generator=g, dtype=torch.float64) for _ in range(spec.o)]
        ref_gh0, ref_gx, ref_gp = torch_grads(spec, h64, x64, p64, gs, gy)
        t0 = time.perf_counter()
        gh0, gx, gp = _cuda.backward(
            module, [t.to(dtype) for t in gs], [t.to(dtype) for t in gy], h0s, xs, ps,
            [s.to(dtype) for s in ref_s], method=case.get("bwd_method", "parallel"),
            chunk=case.get("chunk"), threads=case.get("threads"))
        res["t_bwd"] = time.perf_counter() - t0
        res["err_gh0"] = _maxdiff(gh0, ref_gh0)
        res["err_gx"] = _maxdiff(gx, ref_gx)
        res["err_gp"] = _maxdiff(gp, ref_gp)
        res["gp_shapes_ok"] = all(a.shape == b.shape for a, b in zip(gp, ps, strict=True))
    return res


def _main() -> None:
    import json
    import warnings

    warnings.simplefilter("error")  # mirror pytest's filterwarnings = error
    torch.set_num_threads(1)
    sys.setswitchinterval(5e-4)  # the simulator's block manager polls threads: switch fast
    cases = json.load(sys.stdin)
    out = []
    for case in cases:
        try:
            out.append(run_case(case))
        except Exception as exc:  # reported per case by the parent test
            import traceback

            out.append({"name": case["name"], "error": f"{exc!r}\n{traceback.format_exc()}"})
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _main()

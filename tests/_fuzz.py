"""A seeded mutation fuzzer for `.cell` files (driven by tests/test_fuzz_cells.py).

    NUMBA_DISABLE_JIT=1 python tests/_fuzz.py SEED COUNT FULL_PER_CELL < KNOWN_JSON

Mutates the shipped cells (cells/*.cell) token by token and checks each distinct mutant:

* every mutant is parsed (`parse_cell`, the front end's every check): it must give a
  `CellError` or a cell, never another exception and never a hang (a per-mutant time bound);
* the first FULL_PER_CELL distinct parsable mutants of each shipped cell are also loaded
  (SymPy analysis, code generation) and run at B=2, T=3, D=3 in float64 on the `cpu` backend
  (the generated kernels), the `torch` reference and `cell.step`, which must agree on every
  state and output, and on the gradients; Newton must agree with the sequential loop.

Only a sample is loaded because analysing and rendering one cell costs 0.1-0.5 s of SymPy, far
more than parsing it (about a millisecond); parsing is where nearly every mistake is caught.

Run with NUMBA_DISABLE_JIT=1, the generated CPU kernels execute as plain Python: the same
generated code (prange is range), without a numba compile per mutant. Plain Python's `math`
raises where numba returns inf or NaN (`math.exp(1000)`, `math.log(-1)`), so the generated
modules get a `math` with numba's IEEE semantics (numpy's functions) instead.

KNOWN_JSON (on stdin) is a list of mutant texts that hit known bugs: they are counted, not run
(each has its own xfail test). Prints one JSON object: counts, failures (each with the mutant's
text) and the texts of the valid mutants that agreed.
"""

from __future__ import annotations

import json
import math
import random
import re
import signal
import sys
import types
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
B, T, D = 2, 3, 3
PARSE_BOUND_S = 10.0  # generous: the machine may be busy; a hang is far longer
LOAD_BOUND_S = 20.0  # a normal mutant loads and runs in under 1 s
RTOL = 1e-9  # cpu vs torch vs step: the same formulas, rounded differently
NEWTON_RTOL = 1e-6  # Newton stops at a residual of 16 eps; T = 3 steps amplify it a little

KEYWORDS = ("cell", "state", "input", "param", "const", "output")
UNARY = ("sigmoid", "tanh", "exp", "log", "log1p", "softplus", "relu", "abs", "sqrt", "sin",
         "cos", "silu", "logsigmoid")
BINARY = ("min", "max")
FUNCTIONS = UNARY + BINARY + ("clamp", "where")
OPERATORS = ("+", "-", "*", "/", "**", "@", "<", ">", "==", "<=", ">=", "!=")
NUMBERS = ("0", "1", "-1", "2", "0.5", ".5", "2.", "1e-3", "3", "1e400", "1e-400", "1e308",
           "1e-308", "1e30", "1e99999999", "9" * 120, "0.0", "1E+2")
JUNK = ("\x00", "\x07", "\t", "\r", "\x0c", "\x1b", "é", "λ", "\u200b", "\ufeff", "😀", "\\",
        "\\\n", "#", ";", "$", "`", "\u00a0", "１", "\n", "'", "(", ")", ",", "~", ":", "=")

TOKEN = re.compile(r"""(?P<ws>[ \t]+)|(?P<nl>\n)|(?P<num>(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)
                       |(?P<name>[A-Za-z_]\w*)|(?P<op>\*\*|<=|>=|==|!=|[-+*/@<>=(),'~:\\])
                       |(?P<other>.)""", re.VERBOSE)


def base_cells() -> dict[str, str]:
    """name -> the shipped cell's text without comments and blank lines."""
    out = {}
    for path in sorted((ROOT / "cells").glob("*.cell")):
        lines = [re.sub(r"\s*#.*", "", line) for line in path.read_text().splitlines()]
        out[path.stem] = "\n".join(line for line in lines if line.strip()) + "\n"
    return out


def tokens(text: str) -> list[list[str]]:
    """[kind, text] pairs; joining the texts gives `text` back."""
    return [[m.lastgroup, m.group()] for m in TOKEN.finditer(text)]


def declared(text: str) -> dict[str, list[str]]:
    """The names a cell declares or defines, by kind (a rough scan, good enough to mutate)."""
    names: dict[str, list[str]] = {k: [] for k in ("state", "input", "param", "const", "value")}
    for line in text.splitlines():
        words = re.findall(r"[A-Za-z_]\w*", line.split("~")[0].split(":")[0])
        if not words or words[0] == "cell":
            continue
        if words[0] in ("state", "input", "param"):
            names[words[0]] += words[1:]
        elif words[0] in ("const", "output"):
            names["const" if words[0] == "const" else "value"].append(words[1])
        elif "'" not in line.split("=")[0]:
            names["value"].append(words[0])
    return names


class Mutator:
    """Token- and line-level mutations of one cell's text. About half keep the cell valid
    (renaming to declared names, swapping + - *, wrapping in functions, new outputs...), the
    rest break it in every way we could think of."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.names = declared(text)
        self.all_names = [n for ns in self.names.values() for n in ns]

    def mutate(self, rng: random.Random) -> str:
        text = self.text
        for _ in range(rng.choice((1, 1, 1, 1, 1, 2, 2, 3))):
            name, _ = rng.choices(MUTATIONS, weights=[w for _, w in MUTATIONS])[0]
            text = getattr(self, name)(rng, text)
        return text

    # -- helpers
    @staticmethod
    def _pick(rng: random.Random, toks: list[list[str]], kinds: tuple[str, ...],
              rhs: bool = False) -> int | None:
        """A random token of one of `kinds` (on the right of a line's `=` if `rhs`)."""
        spots, after_eq = [], False
        for i, (kind, tok) in enumerate(toks):
            if kind == "nl":
                after_eq = False
            if kind in kinds and (after_eq or not rhs) and tok not in KEYWORDS:
                spots.append(i)
            after_eq = after_eq or tok == "="
        return rng.choice(spots) if spots else None

    def _expr(self, rng: random.Random, depth: int = 0) -> str:
        """A small random expression of the cell's names (valid when they are defined)."""
        usable = self.names["state"] + self.names["input"] + self.names["const"]
        usable = usable or ["1"]
        roll = rng.random()
        if depth > 1 or roll < 0.4:
            return rng.choice(usable + ["0.5", "2"])
        if roll < 0.7:
            a, b = self._expr(rng, depth + 1), self._expr(rng, depth + 1)
            return f"({a} {rng.choice('+-*')} {b})"
        return f"{rng.choice(UNARY)}({self._expr(rng, depth + 1)})"

    # -- mostly valid
    def rename_declared(self, rng: random.Random, text: str) -> str:
        toks = tokens(text)
        i = self._pick(rng, toks, ("name",), rhs=True)
        if i is not None and toks[i][1] not in FUNCTIONS:
            toks[i][1] = rng.choice(self.all_names)
        return "".join(t for _, t in toks)

    def swap_operator(self, rng: random.Random, text: str) -> str:
        toks = tokens(text)
        spots = [i for i, (k, t) in enumerate(toks) if t in OPERATORS]
        if spots:
            i = rng.choice(spots)
            toks[i][1] = rng.choice("+-*" * 3 + "/") if rng.random() < 0.7 else \
                rng.choice(OPERATORS)
        return "".join(t for _, t in toks)

    def change_number(self, rng: random.Random, text: str) -> str:
        toks = tokens(text)
        i = self._pick(rng, toks, ("num",))
        if i is not None:
            toks[i][1] = rng.choice(NUMBERS)
        else:  # no number: scale a name
            i = self._pick(rng, toks, ("name",), rhs=True)
            if i is not None:
                toks[i][1] = f"{rng.choice(NUMBERS)} * {toks[i][1]}"
        return "".join(t for _, t in toks)

    def wrap_function(self, rng: random.Random, text: str) -> str:
        toks = tokens(text)
        i = self._pick(rng, toks, ("name", "num"), rhs=True)
        if i is None or toks[i][1] in FUNCTIONS:
            return text
        x, other = toks[i][1], self._expr(rng)
        toks[i][1] = rng.choice((
            f"{rng.choice(UNARY)}({x})", f"{rng.choice(BINARY)}({x}, {other})",
            f"clamp({x}, -1, 1)", f"where({x} > 0, {x}, {other})", f"({x} > {other})",
            f"{x} ** {rng.choice(('2', '3', '-1', '0.5', '-0.5', '64', '65', '1e400', '0'))}"))
        return "".join(t for _, t in toks)

    def add_parentheses(self, rng: random.Random, text: str) -> str:
        toks = tokens(text)
        lines = _line_spans(toks)
        start, end = rng.choice(lines)
        inner = [i for i in range(start, end) if toks[i][0] not in ("ws", "nl")]
        eq = next((i for i in inner if toks[i][1] == "="), None)
        if eq is not None and rng.random() < 0.8:
            inner = [i for i in inner if i > eq]
        if len(inner) >= 1:
            a, b = sorted(rng.sample(inner, 2)) if len(inner) > 1 else (inner[0], inner[0])
            toks[a][1] = "(" + toks[a][1]
            toks[b][1] = toks[b][1] + ")"
        return "".join(t for _, t in toks)

    def new_line(self, rng: random.Random, text: str) -> str:
        lines = text.splitlines()
        k = rng.randrange(1, len(lines) + 1)
        tmp = f"t{rng.randrange(3)}"
        new = rng.choice((f"output y{rng.randrange(2)} = {self._expr(rng)}",
                          f"{tmp} = {self._expr(rng)}",
                          f"const k{rng.randrange(2)} = {rng.choice(NUMBERS)}",
                          f"param q{rng.randrange(2)} : {rng.choice(('scalar', 'vector'))}",
                          f"input u{rng.randrange(2)}"))
        return "\n".join(lines[:k] + [new] + lines[k:]) + "\n"

    def change_param_kind(self, rng: random.Random, text: str) -> str:
        lines = text.splitlines()
        spots = [i for i, line in enumerate(lines) if line.startswith("param")]
        if not spots:
            return text
        i = rng.choice(spots)
        head, _, init = lines[i].partition("~")
        head = head.split(":")[0].rstrip()
        kind = rng.choice(("scalar", "scalar", "vector", "matrix", "vectr", "", "1"))
        lines[i] = head + (f" : {kind}" if kind else "") + (f" ~{init}" if init else "")
        return "\n".join(lines) + "\n"

    # -- mostly invalid
    def delete_token(self, rng: random.Random, text: str) -> str:
        toks = tokens(text)
        i = self._pick(rng, toks, ("num", "name", "op", "other", "nl"))
        if i is not None:
            toks[i][1] = ""
        return "".join(t for _, t in toks)

    def duplicate_token(self, rng: random.Random, text: str) -> str:
        toks = tokens(text)
        i = self._pick(rng, toks, ("num", "name", "op", "other", "nl"))
        if i is not None:
            toks[i][1] = toks[i][1] + rng.choice(("", " ")) + toks[i][1]
        return "".join(t for _, t in toks)

    def swap_tokens(self, rng: random.Random, text: str) -> str:
        toks = tokens(text)
        solid = [i for i, (k, _) in enumerate(toks) if k not in ("ws", "nl")]
        if len(solid) > 2:
            j = rng.randrange(len(solid) - 1)
            a, b = solid[j], solid[j + 1] if rng.random() < 0.7 else rng.choice(solid)
            toks[a][1], toks[b][1] = toks[b][1], toks[a][1]
        return "".join(t for _, t in toks)

    def rename_wrong(self, rng: random.Random, text: str) -> str:
        toks = tokens(text)
        i = self._pick(rng, toks, ("name",), rhs=rng.random() < 0.7)
        if i is not None:
            toks[i][1] = rng.choice((
                "undeclared", toks[i][1] + "x", toks[i][1][:-1] or "_", *KEYWORDS, *FUNCTIONS,
                "W", "lam", "dt", "_", "tahn", "a" * 120, "pi", "E", "I", "oo", "nan", "inf",
                "zoo", "Symbol", "__import__", "lambda", "None", "True", "sum"))
        return "".join(t for _, t in toks)

    def prime(self, rng: random.Random, text: str) -> str:
        toks = tokens(text)
        primes = [i for i, (_, t) in enumerate(toks) if t == "'"]
        if primes and rng.random() < 0.4:
            toks[rng.choice(primes)][1] = ""
        else:
            i = self._pick(rng, toks, ("name",))
            if i is not None:
                toks[i][1] += "'"
        return "".join(t for _, t in toks)

    def change_call(self, rng: random.Random, text: str) -> str:
        toks = tokens(text)
        calls = [i for i, (_, t) in enumerate(toks) if t in FUNCTIONS or t in ("uniform",
                 "normal", "constant")]
        if not calls:
            return self.wrap_function(rng, text)
        i = rng.choice(calls)
        roll = rng.random()
        if roll < 0.5:
            toks[i][1] = rng.choice((*FUNCTIONS, "tahn", "sigmod", "uniform", "normal",
                                     "constant", "pow", "exp2", "Sigmoid"))
        else:  # arity: add or drop an argument before the call's closing parenthesis
            depth = 0
            for j in range(i + 1, len(toks)):
                depth += {"(": 1, ")": -1}.get(toks[j][1], 0)
                if depth == 0 and toks[j][1] == ")":
                    if roll < 0.8:
                        toks[j][1] = f", {self._expr(rng)})"
                    else:
                        commas = [k for k in range(i, j) if toks[k][1] == ","]
                        if commas:
                            for k in range(rng.choice(commas), j):
                                toks[k][1] = ""
                        else:
                            for k in range(i + 2, j):
                                toks[k][1] = ""
                    break
        return "".join(t for _, t in toks)

    def delete_line(self, rng: random.Random, text: str) -> str:
        lines = text.splitlines()
        del lines[rng.randrange(len(lines))]
        return "\n".join(lines) + "\n"

    def duplicate_line(self, rng: random.Random, text: str) -> str:
        lines = text.splitlines()
        i = rng.randrange(len(lines))
        lines.insert(rng.randrange(len(lines) + 1), lines[i])
        return "\n".join(lines) + "\n"

    def swap_lines(self, rng: random.Random, text: str) -> str:
        lines = text.splitlines()
        i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
        lines[i], lines[j] = lines[j], lines[i]
        return "\n".join(lines) + "\n"

    def insert_junk(self, rng: random.Random, text: str) -> str:
        i = rng.randrange(len(text) + 1)
        return text[:i] + rng.choice(JUNK) + text[i:]


MUTATIONS = (  # (method, weight): about half of these keep a cell valid
    ("rename_declared", 8), ("swap_operator", 8), ("change_number", 6), ("wrap_function", 10),
    ("add_parentheses", 4), ("new_line", 5), ("change_param_kind", 3),
    ("delete_token", 4), ("duplicate_token", 3), ("swap_tokens", 3), ("rename_wrong", 3),
    ("prime", 3), ("change_call", 4), ("delete_line", 3), ("duplicate_line", 2),
    ("swap_lines", 2), ("insert_junk", 4),
)


def _line_spans(toks: list[list[str]]) -> list[tuple[int, int]]:
    spans, start = [], 0
    for i, (kind, _) in enumerate(toks):
        if kind == "nl":
            spans.append((start, i))
            start = i + 1
    return spans or [(0, len(toks))]


def mutants(seed: int, count: int) -> list[tuple[str, str]]:
    """`count` (base cell name, mutant text) pairs, round-robin over the shipped cells."""
    bases = base_cells()
    mutators = {name: Mutator(text) for name, text in bases.items()}
    names = sorted(bases)
    out = []
    for i in range(count):
        name = names[i % len(names)]
        out.append((name, mutators[name].mutate(random.Random(seed * 1_000_003 + i))))
    return out


# -- running a mutant --------------------------------------------------------------------------

class Hang(BaseException):
    """A mutant ran past its time bound (a BaseException: no `except Exception` eats it)."""


def _alarm(signum, frame):  # noqa: ANN001, ARG001
    raise Hang


def bounded(seconds: float, fn, *args):  # noqa: ANN001, ANN201
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn(*args)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


class _IEEEMath(types.ModuleType):
    """`math` with numba's semantics: inf and NaN instead of OverflowError/ValueError."""

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(np, name, None) or getattr(math, name)


_IEEE_MATH = _IEEEMath("math")
for _f in ("exp", "log", "log1p", "tanh", "sqrt", "sin", "cos"):
    setattr(_IEEE_MATH, _f, getattr(np, _f))
_IEEE_MATH.inf, _IEEE_MATH.isfinite = math.inf, np.isfinite


def _patch_generated_math() -> None:
    from paracompile import _cache

    original = _cache.import_source

    def import_source(path, name, source):  # noqa: ANN001, ANN202
        module = original(path, name, source)
        if "_cpu_" in name:
            module.math = _IEEE_MATH
        return module

    _cache.import_source = import_source


def _data(cell, seed: int):  # noqa: ANN001, ANN202
    import torch

    g = torch.Generator().manual_seed(seed)
    shapes = {"vector": (D,), "scalar": (), "matrix": (D, D)}
    xs = {n: torch.randn(B, T, D, dtype=torch.float64, generator=g) for n in cell.inputs}
    ps = {n: (0.3 / math.sqrt(D) if k == "matrix" else 0.5)
          * torch.randn(shapes[k], dtype=torch.float64, generator=g)
          for n, k in cell.params.items()}
    h0 = {n: 0.5 * torch.randn(B, D, dtype=torch.float64, generator=g) for n in cell.states}
    return xs, ps, h0


def disagreement(a, b, rtol: float) -> str | None:  # noqa: ANN001
    """Why tensors `a` and `b` differ: where they are finite, or by more than
    rtol * (1 + max |b|) where finite; None when they agree.

    Which non-finite value a position holds is not compared: the kernels evaluate SymPy's
    rewritten expressions (``dt * (v + dt * g)`` distributed to ``dt*v + dt**2*g``), the torch
    backend the equations as written, and past the float range one order gives inf where the
    other gives inf - inf = NaN. Both are overflowed; neither is more right."""
    import torch

    if a.shape != b.shape:
        return f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    if not torch.equal(torch.isfinite(a), torch.isfinite(b)):
        return f"non-finite at different places: {a.tolist()} vs {b.tolist()}"
    fin = torch.isfinite(b)
    if fin.any():
        err = (a[fin] - b[fin]).abs().max().item()
        if not err <= rtol * (1 + b[fin].abs().max().item()):
            return f"values differ by {err:.3g}: {a.tolist()} vs {b.tolist()}"
    return None


def compare(cell, seed: int, newton: bool = True) -> tuple[str, str | None]:  # noqa: ANN001
    """Run one loaded cell every way (Newton too if `newton`); (category, failure message or
    None)."""
    import torch

    if not cell.inputs:  # nothing gives T: a documented ValueError
        xs, ps, h0 = _data(cell, seed)
        try:
            cell.apply(xs, ps, h0, backend="torch")
        except ValueError:
            return "no-inputs", None
        return "no-inputs", "apply without inputs did not raise ValueError"
    xs, ps, h0 = _data(cell, seed)
    leaves = [*xs.values(), *ps.values(), *h0.values()]
    leaf_names = [*xs, *ps, *(f"h0[{n}]" for n in h0)]
    for t in leaves:
        t.requires_grad_()
    names = (*cell.states, *cell.outputs)
    runs, grads = {}, {}
    ways = [("torch", "torch", "sequential"), ("cpu", "cpu", "sequential")]
    ways += [("cpu-newton", "cpu", "newton")] if newton else []
    for label, backend, method in ways:
        out = cell.apply(xs, ps, h0, backend=backend, method=method)
        if tuple(out) != names:
            return "fail", f"{label}: result names {tuple(out)} != {names}"
        runs[label] = out
        cot = torch.Generator().manual_seed(seed + 1)
        loss = sum((v * torch.randn(v.shape, dtype=v.dtype, generator=cot)).sum()
                   for v in out.values())
        if isinstance(loss, torch.Tensor) and loss.requires_grad:  # else: constant in all
            grads[label] = [torch.zeros_like(t) if g is None else g  # None: an unused leaf
                            for t, g in zip(leaves, torch.autograd.grad(
                                loss, leaves, allow_unused=True), strict=True)]
        else:
            grads[label] = [torch.zeros_like(t) for t in leaves]
    with torch.no_grad():  # cell.step, one step at a time
        state, stepped = dict(h0), {n: [] for n in names}
        for t in range(T):
            state, outs = cell.step({n: x[:, t] for n, x in xs.items()}, ps, state)
            for n in names:
                stepped[n].append({**state, **outs}[n])
        runs["step"] = {n: torch.stack(v, 1) for n, v in stepped.items()}
    ref = runs["torch"]
    finite = all(bool(torch.isfinite(v).all()) for v in ref.values())
    for label in ("cpu", "step") + (("cpu-newton",) if finite and newton else ()):
        base = runs["cpu"] if label == "cpu-newton" else ref
        rtol = NEWTON_RTOL if label == "cpu-newton" else RTOL
        for n in names:
            why = disagreement(runs[label][n].detach(), base[n].detach(), rtol)
            if why:
                against = "cpu" if label == "cpu-newton" else "torch"
                return "fail", f"{label} vs {against}, {n}: {why}"
    if not finite:
        return "nonfinite", None  # values agree (NaN/inf at the same places); gradients skipped
    for label in ("cpu", "cpu-newton") if newton else ("cpu",):
        rtol = NEWTON_RTOL if label == "cpu-newton" else RTOL
        for name, g, r in zip(leaf_names, grads[label], grads["torch"], strict=True):
            why = disagreement(g, r, rtol)
            if why:
                return "fail", f"gradient of {name}, {label} vs torch: {why}"
    return "agree", None


def run(seed: int, count: int, full_per_cell: int, known: set[str]) -> dict:
    import torch

    import paracompile
    from paracompile._errors import CellError
    from paracompile._parse import parse_cell

    _patch_generated_math()
    np.seterr(all="ignore")  # the plain-Python kernels meet inf/NaN like numba does: silently
    warnings.simplefilter("ignore")  # unused-name CellWarnings, numpy's overflow warnings
    torch.set_num_threads(1)
    signal.signal(signal.SIGALRM, _alarm)
    counts = {"mutants": count, "distinct": 0, "parse-error": 0, "parsed": 0, "loaded": 0,
              "load-error": 0, "agree": 0, "nonfinite": 0, "no-inputs": 0, "known": 0}
    failures, valid, full = [], [], dict.fromkeys(base_cells(), 0)
    seen = set(base_cells().values())  # a mutation may give the shipped cell back: not a mutant
    for i, (base, text) in enumerate(mutants(seed, count)):
        if text in seen:
            continue
        seen.add(text)
        counts["distinct"] += 1

        def fail(stage: str, message: str, base=base, text=text, i=i) -> None:  # noqa: ANN001
            failures.append({"index": i, "base": base, "stage": stage, "message": message,
                             "text": text})
        try:
            bounded(PARSE_BOUND_S, parse_cell, text)
        except CellError:
            counts["parse-error"] += 1
            continue
        except Hang:
            fail("parse", f"no answer within {PARSE_BOUND_S} s")
            continue
        except Exception as err:  # noqa: BLE001 - the point: anything but CellError is a bug
            fail("parse", f"{type(err).__name__}: {err}")
            continue
        counts["parsed"] += 1
        if full[base] >= full_per_cell:
            continue
        full[base] += 1
        if text in known:
            counts["known"] += 1
            continue
        try:
            cell = bounded(LOAD_BOUND_S, paracompile.load, text)
            counts["loaded"] += 1
            category, why = bounded(LOAD_BOUND_S, compare, cell, seed + i)
        except CellError:
            counts["load-error"] += 1
            continue
        except Hang:
            fail("load/run", f"no answer within {LOAD_BOUND_S} s")
            continue
        except Exception as err:  # noqa: BLE001
            fail("load/run", f"{type(err).__name__}: {err}")
            continue
        if why:
            fail(category, why)
        else:
            counts[category] += 1
            if category == "agree":
                valid.append(text)
    return {"counts": counts, "failures": failures, "valid": valid}


if __name__ == "__main__":
    print(json.dumps(run(*map(int, sys.argv[1:4]), set(json.load(sys.stdin)))))

"""Parse `.cell` text (Lark, LALR, positions kept) and check it into a `CellIR`.

Every mistake becomes a `CellError` at the offending token; unused declarations warn.
"""

from __future__ import annotations

import difflib
import math
import re
import warnings
from functools import cache
from importlib import resources

import lark
import sympy as sp
from lark import Token, Tree

from ._errors import CellError, CellWarning
from ._ir import CellIR, Equation, Init, MatVec, Param, Pos, primed, symbol
from .functions import KNOWN_FUNCTIONS

PARAM_KINDS = ("vector", "scalar", "matrix")
KEYWORDS = ("cell", "state", "input", "param", "const", "output")
INIT_ARITY = {"uniform": 2, "normal": 2, "constant": 1}


@cache
def _parser() -> lark.Lark:
    grammar = resources.files("paracompile").joinpath("cell.lark").read_text()
    return lark.Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=True)


def parse_cell(text: str, filename: str = "<cell>") -> CellIR:
    """Parse and check the text of a `.cell` file."""
    try:
        tree = _parser().parse(text)
    except lark.UnexpectedInput as err:
        raise _syntax_error(err, text, filename) from None
    return _Checker(text, filename).build(tree)


def _describe(token: Token) -> str:
    if token.type == "$END":
        return "end of file"
    if token.type == "_NL":
        return "end of line"
    return repr(str(token))


_TERMINAL_TEXT = {
    "NAME": "a name", "NUMBER": "a number", "_NL": "end of line", "MINUS": "'-'",
    "PRIME": "'", "MATMUL": "'@'", "POW": "'**'", "LPAR": "'('", "RPAR": "')'",
    "COMMA": "','", "EQUAL": "'='", "PLUS": "'+'", "STAR": "'*'", "SLASH": "'/'",
    "COLON": "':'", "TILDE": "'~'", "$END": "end of file",
}


def _syntax_error(err: lark.UnexpectedInput, text: str, filename: str) -> CellError:
    line, column = err.line, err.column
    if line is None or line < 1:  # unexpected end of input
        lines = text.splitlines() or [""]
        line, column = len(lines), len(lines[-1]) + 1
    if isinstance(err, lark.UnexpectedCharacters):
        char = text[err.pos_in_stream] if err.pos_in_stream < len(text) else "?"
        return CellError(line, column, f"unexpected character {char!r}", filename)
    if isinstance(err, lark.UnexpectedToken):
        expected = sorted({_TERMINAL_TEXT.get(t, t.lower().strip("_")) for t in err.expected})
        if err.token.type == "$END":
            lines = text.splitlines() or [""]
            line, column = len(lines), len(lines[-1]) + 1
        hint = ""
        if len(expected) <= 6:
            hint = "; expected " + ", ".join(expected)
        return CellError(line, column, f"unexpected {_describe(err.token)}{hint}", filename)
    return CellError(line, column, "syntax error", filename)


def _pos(node: Tree | Token) -> Pos:
    if isinstance(node, Token):
        return Pos(node.line or 1, node.column or 1)
    return Pos(node.meta.line, node.meta.column)


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


class _Checker:
    """Walks the parse tree once, in order: builds the IR, checking docs/language.md's rules."""

    def __init__(self, text: str, filename: str) -> None:
        self.text = text
        self.filename = filename
        self.kinds: dict[str, str] = {}  # name -> state/input/param/const/intermediate/output
        self.positions: dict[str, Pos] = {}
        self.states: list[str] = []
        self.inputs: list[str] = []
        self.params: list[Param] = []
        self.param_kind: dict[str, str] = {}
        self.consts: dict[str, float] = {}
        self.equations: list[Equation] = []
        self.updated: dict[str, Pos] = {}
        self.used: set[str] = set()

    def error(self, at: Tree | Token | Pos, message: str) -> CellError:
        pos = at if isinstance(at, Pos) else _pos(at)
        return CellError(pos.line, pos.column, message, self.filename)

    # -- statements --------------------------------------------------------------------------
    def build(self, tree: Tree) -> CellIR:
        statements = [s for s in tree.children if isinstance(s, Tree)]
        if not statements or statements[0].data != "cell_decl":
            at = statements[0] if statements else Pos(1, 1)
            raise self.error(at, "a cell file must start with 'cell NAME'")
        name_token = statements[0].children[0]
        for stmt in statements[1:]:
            if stmt.data == "cell_decl":
                raise self.error(stmt, "only one 'cell' statement is allowed per file")
            getattr(self, "_" + stmt.data)(stmt)
        if not self.states:
            raise self.error(name_token, f"cell {name_token} declares no state; add 'state h'")
        for state in self.states:
            if state not in self.updated:
                raise self.error(
                    self.positions[state],
                    f"state {state!r} has no update; add a line \"{state}' = ...\"",
                )
        self._warn_unused()
        return CellIR(
            name=str(name_token),
            states=tuple(self.states),
            inputs=tuple(self.inputs),
            params=tuple(self.params),
            consts=dict(self.consts),
            equations=tuple(self.equations),
            source=self.text,
            filename=self.filename,
            positions=dict(self.positions),
        )

    def _declare(self, token: Token, kind: str) -> str:
        name = str(token)
        if name in self.kinds:
            previous = self.positions[name]
            raise self.error(
                token,
                f"{name!r} is already declared as {self._a(self.kinds[name])} "
                f"at line {previous.line}; each name is declared once",
            )
        if name in KNOWN_FUNCTIONS:
            raise self.error(token, f"{name!r} is a built-in function; choose another name")
        if name in KEYWORDS:
            raise self.error(token, f"{name!r} is a keyword of the cell language; "
                             "choose another name")
        self.kinds[name] = kind
        self.positions[name] = _pos(token)
        return name

    @staticmethod
    def _a(kind: str) -> str:
        return ("an " if kind[0] in "aeiou" else "a ") + kind

    def _state_decl(self, stmt: Tree) -> None:
        self.states += [self._declare(t, "state") for t in stmt.children[0].children]

    def _input_decl(self, stmt: Tree) -> None:
        self.inputs += [self._declare(t, "input") for t in stmt.children[0].children]

    def _param_decl(self, stmt: Tree) -> None:
        names, kind_token, init_tree = stmt.children
        kind = "vector" if kind_token is None else str(kind_token)
        if kind not in PARAM_KINDS:
            raise self.error(
                kind_token,
                f"unknown parameter kind {kind!r}; expected one of {', '.join(PARAM_KINDS)}"
                + _suggest(kind, list(PARAM_KINDS)),
            )
        init = None if init_tree is None else self._init(init_tree)
        for token in names.children:
            name = self._declare(token, "param")
            self.param_kind[name] = kind
            self.params.append(Param(name, kind, init, _pos(token)))  # type: ignore[arg-type]

    def _init(self, tree: Tree) -> Init:
        dist_token, *args = tree.children
        dist = str(dist_token)
        if dist not in INIT_ARITY:
            raise self.error(
                dist_token,
                f"unknown initialisation {dist!r}; expected uniform(lo, hi), normal(mean, std) "
                "or constant(value)",
            )
        values = tuple(self._number(a) for a in args if a is not None)
        if len(values) != INIT_ARITY[dist]:
            raise self.error(
                dist_token, f"{dist}(...) takes {INIT_ARITY[dist]} numbers, got {len(values)}"
            )
        if dist == "uniform" and not values[0] < values[1]:
            raise self.error(dist_token, "uniform(lo, hi) needs lo < hi")
        if dist == "normal" and values[1] < 0:
            raise self.error(dist_token, "normal(mean, std) needs std >= 0")
        return Init(dist, values)  # type: ignore[arg-type]

    def _number(self, tree: Tree) -> float:
        tokens = tree.children
        value = float(tokens[-1])
        if not math.isfinite(value):
            raise self.error(tokens[-1], f"number {tokens[-1]} is too large for a float")
        return -value if len(tokens) == 2 else value

    def _const_decl(self, stmt: Tree) -> None:
        token, value = stmt.children
        self.consts[self._declare(token, "const")] = self._number(value)

    def _output_decl(self, stmt: Tree) -> None:
        token, expr = stmt.children
        sym_expr = self._expr(expr)
        self._declare(token, "output")
        self.equations.append(Equation(str(token), "output", sym_expr, _pos(token)))

    def _assignment(self, stmt: Tree) -> None:
        token, prime, expr = stmt.children
        name = str(token)
        if prime is not None:
            if self.kinds.get(name) != "state":
                what = self.kinds.get(name)
                raise self.error(
                    token,
                    f"{name}' updates a state, but {name!r} is "
                    + (f"{self._a(what)}" if what else "not declared")
                    + (f"; declare it with 'state {name}'" if what is None else ""),
                )
            if name in self.updated:
                first = self.updated[name]
                raise self.error(
                    token,
                    f"state {name!r} is updated twice (first at line {first.line}); "
                    "each state gets exactly one update",
                )
            sym_expr = self._expr(expr)
            self.updated[name] = _pos(token)
            self.equations.append(Equation(name, "update", sym_expr, _pos(token)))
            return
        kind = self.kinds.get(name)
        if kind in ("input", "param", "const"):
            raise self.error(token, f"cannot assign to {kind} {name!r}; {kind}s are read-only")
        if kind == "state":
            raise self.error(
                token, f"cannot assign to state {name!r}; write its update as \"{name}' = ...\""
            )
        if kind is not None:
            raise self.error(
                token,
                f"{name!r} is already defined at line {self.positions[name].line}; "
                "each name is assigned once",
            )
        sym_expr = self._expr(expr)
        self._declare(token, "intermediate")
        self.equations.append(Equation(name, "intermediate", sym_expr, _pos(token)))

    # -- expressions -------------------------------------------------------------------------
    def _expr(self, node: Tree | Token) -> sp.Expr:
        """Convert an expression tree to SymPy, checking names, calls and matrix use."""
        if isinstance(node, Token):  # a bare NUMBER never reaches here (aliased 'number')
            raise self.error(node, f"unexpected {node!r}")
        rule = node.data
        kids = node.children
        if rule == "number":
            return sp.Rational(str(kids[0]))
        if rule == "name":
            return self._name(kids[0])
        if rule == "primed":
            return self._primed(kids[0])
        if rule == "matmul":
            left, _, right = kids
            if not (left.data == "name" and self.param_kind.get(str(left.children[0])) == "matrix"):
                raise self.error(left, self._matmul_left_message(left))
            matrix = str(left.children[0])
            self.used.add(matrix)
            operand = self._expr(right)
            if operand.has(MatVec):
                raise self.error(
                    right, "nested matrix products (M @ (... N @ x ...)) are not supported yet"
                )
            return MatVec(symbol(matrix), operand)
        if rule == "call":
            return self._call(node)
        if rule == "neg":
            return -self._expr(kids[1])
        left = self._expr(kids[0])
        right = self._expr(kids[-1])
        if rule == "add":
            return left + right
        if rule == "sub":
            return left - right
        if rule == "mul":
            return left * right
        if rule == "div":
            return left / right
        if rule == "pow":
            if not right.is_number:
                raise self.error(
                    kids[-1], f"the exponent of '**' must be a number (or a const), not "
                    f"{self._text(kids[-1])!r}; write exp(y * log(x)) for a variable exponent"
                )
            return left**right
        raise self.error(node, f"unsupported expression {rule!r}")  # pragma: no cover

    def _text(self, node: Tree | Token) -> str:
        """The source text of a node (for messages)."""
        if isinstance(node, Token):
            return str(node)
        if getattr(node.meta, "empty", True):  # pragma: no cover - positions always kept
            return node.data
        return " ".join(self.text[node.meta.start_pos:node.meta.end_pos].split())

    def _matmul_left_message(self, left: Tree) -> str:
        if left.data == "name":
            name = str(left.children[0])
            kind = self.kinds.get(name)
            if kind == "param":
                what = self._a(f"{self.param_kind[name]} param")
            else:
                what = "not declared" if kind is None else self._a(kind)
            return (f"the left side of '@' must be a matrix parameter, but {name!r} is {what}; "
                    f"declare it with 'param {name} : matrix'")
        return (f"the left side of '@' must be a matrix parameter, not {self._text(left)!r}; "
                "'@' binds like '*' from the left, so write e.g. 'a * (W @ h)' or '-(W @ h)'")

    def _name(self, token: Token) -> sp.Expr:
        name = str(token)
        kind = self.kinds.get(name)
        if kind is None:
            later = self._defined_later(name)
            if later:
                raise self.error(token, f"{name!r} is used before it is defined (line {later})")
            known = list(self.kinds)
            raise self.error(token, f"unknown name {name!r}" + _suggest(name, known))
        if kind == "param" and self.param_kind[name] == "matrix":
            raise self.error(
                token, f"matrix {name!r} cannot be used elementwise; only as '{name} @ expr'"
            )
        if kind == "output":
            raise self.error(token, f"output {name!r} cannot be used in an expression")
        self.used.add(name)
        if kind == "const":
            return sp.Rational(repr(self.consts[name]))
        return symbol(name)

    def _primed(self, token: Token) -> sp.Expr:
        name = str(token)
        if self.kinds.get(name) != "state":
            raise self.error(token, f"{name}' is not a state's new value; only states have one")
        if name not in self.updated:
            raise self.error(
                token, f"{name}' is used before its update \"{name}' = ...\" is written"
            )
        self.used.add(name)
        return symbol(primed(name))

    def _call(self, node: Tree) -> sp.Expr:
        name_token, *arg_trees = node.children
        name = str(name_token)
        args = [a for a in arg_trees if a is not None]
        if name not in KNOWN_FUNCTIONS:
            if name in self.kinds:
                raise self.error(name_token, f"{name!r} is {self._a(self.kinds[name])}, "
                                 "not a function")
            raise self.error(
                name_token,
                f"unknown function {name!r}" + _suggest(name, list(KNOWN_FUNCTIONS))
                + f" (known: {', '.join(sorted(KNOWN_FUNCTIONS))})",
            )
        fn, arity = KNOWN_FUNCTIONS[name]
        if len(args) != arity:
            raise self.error(
                name_token, f"{name}() takes {arity} argument{'s' * (arity > 1)}, got {len(args)}"
            )
        return fn(*(self._expr(a) for a in args))  # type: ignore[operator]

    def _defined_later(self, name: str) -> int | None:
        """The line where `name` is declared or assigned, if anywhere (for a better error)."""
        assign = re.compile(rf"^\s*(output\s+)?{re.escape(name)}\s*'?\s*=")
        declare = re.compile(rf"^\s*(state|input|param|const)\b[^:~=]*\b{re.escape(name)}\b")
        for lineno, line in enumerate(self.text.splitlines(), start=1):
            code = line.split("#", 1)[0]
            if assign.match(code) or declare.match(code):
                return lineno
        return None

    def _warn_unused(self) -> None:
        for name, kind in self.kinds.items():
            if kind in ("input", "param", "const", "intermediate") and name not in self.used:
                pos = self.positions[name]
                warnings.warn(
                    CellWarning(
                        f"{self.filename}:{pos.line}:{pos.column}: warning: "
                        f"{kind} {name!r} is never used"
                    ),
                    stacklevel=4,
                )

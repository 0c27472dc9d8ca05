"""Parse `.cell` text (Lark, LALR, positions kept) and check it into a `CellIR`.

Every mistake becomes a `CellError` at the offending token; unused declarations warn.
"""

from __future__ import annotations

import difflib
import math
import re
import warnings
from fractions import Fraction
from functools import cache
from importlib import resources

import lark
import sympy as sp
from lark import Token, Tree

from ._errors import CellError, CellWarning
from ._ir import CellIR, Equation, Init, MatVec, Param, Pos, primed, symbol
from .functions import cell_functions, greater, ties

PARAM_KINDS = ("vector", "scalar", "matrix")
KEYWORDS = ("cell", "state", "input", "param", "const", "output")
INIT_ARITY = {"uniform": 2, "normal": 2, "constant": 1}

# Limits that keep every later stage (SymPy differentiation, simplification, cse, printing,
# Python's own compiler on the generated kernels) well inside Python's recursion limit and
# fast. Depth and size count an expression as the analysis sees it: with the intermediates
# and new states it uses substituted; a chain of '+'/'-' (or of '*'/'/') is one level.
MAX_DEPTH = 48  # nesting of operators and calls
MAX_PARENS = 200  # nesting of parentheses (as in Python)
MAX_OPS = 2000  # operators and calls in one expression
MAX_CELL_OPS = 5000  # operators and calls in all the updates and outputs of a cell
MAX_EXPONENT = 64  # |n| in `x ** n` when x is not a number
MAX_NUMBER_CHARS = 100  # characters of one number literal
MAX_EXACT_BITS = 4096  # size of an exact power of numbers SymPy may compute
_FLOAT_MAX = Fraction(2) ** 1024  # beyond this a number is inf as a float

_COMPARISONS = {
    ">": lambda a, b: greater(a, b), "<": lambda a, b: greater(b, a),
    ">=": lambda a, b: 1 - greater(b, a), "<=": lambda a, b: 1 - greater(a, b),
    "==": lambda a, b: ties(a, b), "!=": lambda a, b: 1 - ties(a, b),
}
_CHAINS = {"add": "sum", "sub": "sum", "mul": "product", "div": "product"}
_NOT_FINITE = (sp.zoo, sp.oo, -sp.oo, sp.nan)


@cache
def _parser() -> lark.Lark:
    grammar = resources.files("paracompile").joinpath("cell.lark").read_text()
    return lark.Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=True)


def parse_cell(text: str, filename: str = "<cell>", *, warn: bool = True) -> CellIR:
    """Parse and check the text of a `.cell` file; `warn`: whether to warn (CellWarning) about
    unused declarations (a flag, not a warnings filter: those are process-wide)."""
    _check_parentheses(text, filename)
    try:
        tree = _parser().parse(text)
    except lark.UnexpectedInput as err:
        raise _syntax_error(err, text, filename) from None
    return _Checker(text, filename).build(tree, warn=warn)


def _check_parentheses(text: str, filename: str) -> None:
    """Refuse parentheses nested beyond `MAX_PARENS` before parsing: a quick scan, so a huge
    nesting fails at once (redundant parentheses do not count towards `MAX_DEPTH`)."""
    depth = 0
    for match in re.finditer(r"#[^\n]*|[()]", text):
        if match.group() == "(":
            depth += 1
            if depth > MAX_PARENS:
                line = text.count("\n", 0, match.start()) + 1
                column = match.start() - text.rfind("\n", 0, match.start())
                raise CellError(line, column, f"parentheses nested too deeply: depth {depth}, "
                                f"limit {MAX_PARENS}", filename)
        elif match.group() == ")":
            depth = max(depth - 1, 0)


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
    "COLON": "':'", "TILDE": "'~'", "COMPARE": "a comparison", "$END": "end of file",
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
        if err.token.type == "COMPARE" and "NAME" not in err.expected:
            return CellError(
                line, column,
                f"comparisons do not chain: add parentheses, e.g. '(a < b) {err.token} c', or "
                "write 'a < b < c' as '(a < b) * (b < c)'", filename)
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
        self.const_values: dict[str, sp.Expr] = {}  # exact
        self.const_context: str | None = None  # the const whose value is being read
        self.sizes: dict[str, tuple[int, int]] = {}  # defined value -> (depth, operations)
        self.cell_ops = 0
        self.equations: list[Equation] = []
        self.updated: dict[str, Pos] = {}
        self.used: set[str] = set()

    def error(self, at: Tree | Token | Pos, message: str) -> CellError:
        pos = at if isinstance(at, Pos) else _pos(at)
        return CellError(pos.line, pos.column, message, self.filename)

    # -- statements --------------------------------------------------------------------------
    def build(self, tree: Tree, warn: bool = True) -> CellIR:
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
        if warn:
            self._warn_unused()
        return CellIR(
            name=str(name_token),
            states=tuple(self.states),
            inputs=tuple(self.inputs),
            params=tuple(self.params),
            consts=dict(self.consts),
            const_values=dict(self.const_values),
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
        if name in cell_functions():
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
        token, expr = stmt.children
        self.const_context = str(token)
        value = self._expr(expr)
        self.const_context = None
        name = self._declare(token, "const")
        self.consts[name] = self._float(expr, value)
        self.const_values[name] = value

    def _output_decl(self, stmt: Tree) -> None:
        token, expr = stmt.children
        sym_expr = self._expr(expr, total=True)
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
            sym_expr = self._expr(expr, primed(name), total=True)
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
        sym_expr = self._expr(expr, name)
        self._declare(token, "intermediate")
        self.equations.append(Equation(name, "intermediate", sym_expr, _pos(token)))

    # -- expressions -------------------------------------------------------------------------
    def _expr(self, node: Tree | Token, target: str | None = None, total: bool = False
              ) -> sp.Expr:
        """Convert an expression tree to SymPy, checking names, calls, matrix use, the size
        limits and that every number in it is a finite real. `target` names the value the
        expression defines (an intermediate or a primed state), whose size later uses count;
        `total`: an update or output, counted in the cell's total (`MAX_CELL_OPS`)."""
        depth, ops = self._measure(node)
        if total:
            self.cell_ops += ops
            if self.cell_ops > MAX_CELL_OPS:
                raise self.error(node, f"cell too large: its updates and outputs have more "
                                 f"than {MAX_CELL_OPS} operations (counting the intermediates "
                                 "they use)")
        if target is not None:
            self.sizes[target] = (depth, ops)
        return self._convert(node)

    def _measure(self, root: Tree | Token) -> tuple[int, int]:
        """(depth, operations) of an expression as the analysis sees it (intermediates
        substituted), refusing one over `MAX_DEPTH` or `MAX_OPS` at the node that crosses the
        limit. Iterative: the tree may be arbitrarily deep."""
        sizes: dict[int, tuple[int, int]] = {}
        stack: list[tuple[Tree | Token, bool]] = [(root, False)]
        while stack:
            node, ready = stack.pop()
            kids = [k for k in node.children if isinstance(k, Tree)] if isinstance(
                node, Tree) else []
            if not ready and kids:
                stack.append((node, True))
                stack += [(k, False) for k in kids]
                continue
            if not isinstance(node, Tree) or node.data == "number":
                sizes[id(node)] = (1, 0)
                continue
            if node.data in ("name", "primed"):
                name = str(node.children[0])
                sizes[id(node)] = self.sizes.get(primed(name) if node.data == "primed" else name,
                                                 (1, 0))
                continue
            # an operand of the same chain merges into this level; the right side of '-' or
            # '/' is one level deeper in SymPy (-1 * b, b ** -1)
            chain = _CHAINS.get(node.data)
            inverse = kids[-1] if node.data in ("sub", "div") else None
            depth = 1 + max((sizes[id(k)][0] + (k is inverse)
                             - (chain is not None and _CHAINS.get(k.data) == chain)
                             for k in kids), default=0)
            ops = 1 + sum(sizes[id(k)][1] for k in kids)
            if depth > MAX_DEPTH:
                raise self.error(node, f"expression nested too deeply: depth {depth}, limit "
                                 f"{MAX_DEPTH} (counting the intermediates it uses)")
            if ops > MAX_OPS:
                raise self.error(node, f"expression too long: more than {MAX_OPS} operations "
                                 "(counting the intermediates it uses)")
            sizes[id(node)] = (depth, ops)
        return sizes[id(root)]

    def _convert(self, node: Tree | Token) -> sp.Expr:
        """The SymPy expression of a (size-checked) tree; recursion only per nesting level."""
        if isinstance(node, Token):  # a bare NUMBER never reaches here (aliased 'number')
            raise self.error(node, f"unexpected {node!r}")
        rule = node.data
        kids = node.children
        if rule == "number":
            return self._literal(kids[0])
        if rule == "name":
            return self._name(kids[0])
        if rule == "primed":
            return self._primed(kids[0])
        if rule == "matmul":
            return self._matmul(node)
        if rule == "call":
            return self._checked(node, self._call(node))
        if rule == "neg":
            return self._checked(node, -self._convert(kids[1]))
        if rule in ("add", "sub"):
            terms = [sign * self._convert(t) for sign, _, t in self._chain(node, "sum")]
            return self._checked(node, sp.Add(*terms))
        if rule in ("mul", "div"):
            factors = []
            for power, divisor, f in self._chain(node, "product"):
                value = self._convert(f)
                if divisor and value.is_zero:
                    raise self.error(f, f"division by zero: {self._text(f)!r} is 0")
                factors.append(value if power == 1 else sp.Pow(value, -1))
            return self._checked(node, sp.Mul(*factors))
        if rule == "compare":
            left, op, right = kids
            return self._checked(node, _COMPARISONS[str(op)](self._convert(left),
                                                             self._convert(right)))
        if rule == "pow":
            return self._checked(node, self._power(node))
        raise self.error(node, f"unsupported expression {rule!r}")  # pragma: no cover

    @staticmethod
    def _chain(node: Tree, chain: str) -> list[tuple[int, bool, Tree]]:
        """The operands of a '+'/'-' (or '*'/'/') chain, left to right, each with its sign (or
        power) +-1 and whether it is part of a divisor (where 0 is a division by zero).
        Collected without recursion, parenthesised sub-chains included, so a long sum is
        fine."""
        out: list[tuple[int, bool, Tree]] = []
        stack = [(1, False, node)]
        while stack:
            sign, divisor, item = stack.pop()
            if _CHAINS.get(item.data) != chain:
                out.append((sign, divisor, item))
                continue
            left, right = item.children[0], item.children[-1]
            if item.data in ("sub", "div"):
                stack.append((-sign, divisor or item.data == "div", right))
            else:
                stack.append((sign, divisor, right))
            stack.append((sign, divisor, left))
        return out

    def _literal(self, token: Token) -> sp.Expr:
        text = str(token)
        if len(text) > MAX_NUMBER_CHARS:
            raise self.error(token, f"number too long: {len(text)} characters, limit "
                             f"{MAX_NUMBER_CHARS}")
        value = float(text)
        if not math.isfinite(value):
            raise self.error(token, f"number {text} is too large for a float")
        if value == 0 and re.search(r"[1-9]", text.split("e")[0].split("E")[0]):
            raise self.error(token, f"number {text} is too small for a float (it would be 0)")
        return sp.Integer(0) if value == 0 else sp.Rational(text)

    def _power(self, node: Tree) -> sp.Expr:
        base_tree, _, exp_tree = node.children
        base, exponent = self._convert(base_tree), self._convert(exp_tree)
        if not exponent.is_number:
            raise self.error(
                exp_tree, f"the exponent of '**' must be a number (or a const), not "
                f"{self._text(exp_tree)!r}; write exp(y * log(x)) for a variable exponent"
            )
        if not base.is_number:
            if abs(exponent) > MAX_EXPONENT:
                raise self.error(exp_tree, f"exponent too large: |{self._text(exp_tree)}| > "
                                 f"{MAX_EXPONENT}; the limit for a power of a variable")
            return base**exponent
        # both numbers: SymPy would compute the exact value, however large: check its size
        b, e = self._float(base_tree, base), self._float(exp_tree, exponent)
        if b == 0:
            if e < 0:
                raise self.error(node, f"division by zero: {self._text(node)!r} is 0 to a "
                                 "negative power")
            return base**exponent
        if b < 0 and not exponent.is_integer:
            raise self.error(node, f"{self._text(node)!r} is complex: a negative number to a "
                             "fractional power")
        magnitude = e * math.log2(math.fabs(b))
        if magnitude > 1024 or magnitude < -1075:
            raise self.error(node, f"number too {'large' if magnitude > 0 else 'small'}: "
                             f"{self._text(node)!r} is about 2**{magnitude:.4g}, beyond a float")
        if base.is_Rational and exponent.is_Rational:
            bits = math.fabs(e) * max(base.p.bit_length(), base.q.bit_length())
            if bits > MAX_EXACT_BITS:
                raise self.error(node, f"number too large to compute exactly: "
                                 f"{self._text(node)!r} has about {bits:.4g} bits, limit "
                                 f"{MAX_EXACT_BITS}")
        return base**exponent

    def _float(self, node: Tree | Token, value: sp.Expr) -> float:
        """A number's value as a float, refusing what has none (not finite, complex, out of
        the float range). Numbers are checked as they are built, so each stays in range."""
        if value.has(*_NOT_FINITE):
            raise self.error(node, f"{self._text(node)!r} is not a finite number")
        if value.is_Rational:
            exact = Fraction(int(value.p), int(value.q))
            if abs(exact) >= _FLOAT_MAX:
                raise self.error(node, f"number too large: {self._text(node)!r} is beyond the "
                                 "range of a float")
            return float(exact)
        approx = value.evalf(17)
        if approx.has(sp.I):
            raise self.error(node, f"{self._text(node)!r} is complex, not a real number")
        if not approx.is_Number:  # pragma: no cover - every cell function evaluates
            raise self.error(node, f"{self._text(node)!r} has no numeric value")
        result = float(approx)
        if not math.isfinite(result):
            raise self.error(node, f"number too large: {self._text(node)!r} is beyond the "
                             "range of a float")
        return result

    def _checked(self, node: Tree, value: sp.Expr) -> sp.Expr:
        """`value`, refused at `node` when building it made something that is not a finite
        real number (``log(0)``, ``sqrt(-1)``, ``x / 0`` through a const, ...) or a power of a
        variable beyond `MAX_EXPONENT` (``(x**40)**2``). Only the top level is new: the
        operands were checked when they were built."""
        if value.is_number:
            self._float(node, value)
            return value
        for part in (value, *value.args):
            if part in _NOT_FINITE or part.has(sp.I) and part.is_number:
                raise self.error(node, f"{self._text(node)!r} is not a finite real number")
            if (part.is_Pow and not part.base.is_number and part.exp.is_number
                    and abs(part.exp) > MAX_EXPONENT):
                raise self.error(node, f"exponent too large: {self._text(node)!r} is a power "
                                 f"{part.exp} of a variable; the limit is {MAX_EXPONENT}")
        return value

    def _matmul(self, node: Tree) -> sp.Expr:
        left, _, right = node.children
        if self.const_context is not None:
            raise self._not_constant(node, "a matrix product")
        if not (left.data == "name" and self.param_kind.get(str(left.children[0])) == "matrix"):
            raise self.error(left, self._matmul_left_message(left))
        matrix = str(left.children[0])
        self.used.add(matrix)
        operand = self._convert(right)
        if operand.has(MatVec):
            raise self.error(
                right, "nested matrix products (M @ (... N @ x ...)) are not supported yet"
            )
        return MatVec(symbol(matrix), operand)

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
        if self.const_context is not None and kind != "const":
            raise self._not_constant(token, f"{self._a(kind)} {name!r}")
        self.used.add(name)
        if kind == "const":
            return self.const_values[name]
        return symbol(name)

    def _not_constant(self, at: Token | Tree, what: str) -> CellError:
        return self.error(at, f"const {self.const_context!r} can only use numbers and earlier "
                          f"consts, not {what}")

    def _primed(self, token: Token) -> sp.Expr:
        name = str(token)
        if self.const_context is not None:
            raise self._not_constant(token, f"{name}'")
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
        known = cell_functions()
        if name not in known:
            if name in self.kinds:
                raise self.error(name_token, f"{name!r} is {self._a(self.kinds[name])}, "
                                 "not a function")
            raise self.error(
                name_token,
                f"unknown function {name!r}" + _suggest(name, list(known))
                + f" (known: {', '.join(sorted(known))})",
            )
        arity = known[name].arity
        if len(args) != arity:
            raise self.error(
                name_token, f"{name}() takes {arity} argument{'s' * (arity > 1)}, got {len(args)}"
            )
        return known[name].build(*(self._convert(a) for a in args))

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

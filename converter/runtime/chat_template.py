"""Render Hugging Face chat templates with a small Jinja subset, in pure Python (no jinja2: it is not in Pyodide).

The output matches what transformers' `apply_chat_template` renders, i.e. jinja2's ImmutableSandboxedEnvironment
with trim_blocks=True, lstrip_blocks=True, the loopcontrols extension, HF's `tojson` (no HTML escaping,
ensure_ascii=False) and the globals `raise_exception` and `strftime_now`. Context variables are the ones HF passes:
messages, tools (None), documents (None), add_generation_prompt, the special tokens and any extra keyword.

    source ──► lexer (whitespace control applied: -/+ markers, trim_blocks, lstrip_blocks, trailing newline)
           ──► items: data text | {{ tokens }} | {% tokens %}
           ──► parser: statement tree of tuples; expressions as tuples ("op", ...)
           ──► renderer: walks the tree with a scope chain (each for-loop iteration gets a fresh scope)

Supported:
    statements   if/elif/else, for (tuple targets, `if` filter, else, loop.*), set (incl. ns.attr, block set),
                 break/continue, generation (HF's assistant-mask tag, rendered as its body), comments
    expressions  literals (str, int, float, true/false/none, list, tuple, dict), names, .attr, [item], [a:b:c],
                 calls (positional + keyword), filters, tests (is / is not), + - * / // % ** ~, comparisons
                 (chained), in / not in, and/or/not, `a if b else c`
    filters      trim length count tojson upper lower capitalize title default/d first last join replace string
                 int float list items safe escape/e abs round reverse sort unique max min sum indent format map
                 select reject selectattr rejectattr wordcount
    tests        defined undefined none string number integer float boolean true false mapping iterable sequence
                 callable odd even divisibleby eq/equalto/== ne/!= lt/< le/<= gt/> ge/>= in sameas lower upper
Anything else (macros, includes, raw blocks, recursive loops, …) raises TemplateError with line and column.
"""
from __future__ import annotations

import json
import math
import numbers
import re
from datetime import datetime
from typing import Any

__all__ = ["TemplateError", "render_chat", "render"]


class TemplateError(Exception):
    """Bad or unsupported template syntax, or an error while rendering; `line`/`column` locate it (1-based)."""

    def __init__(self, message: str, pos: int | None = None, source: str | None = None,
                 from_template: bool = False):
        self.message, self.pos, self.line, self.column = message, pos, None, None
        self.from_template = from_template        # raised by the template's own raise_exception(): message as is
        if pos is not None and source is not None:
            self.line = source.count("\n", 0, pos) + 1
            self.column = pos - (source.rfind("\n", 0, pos) + 1) + 1
            message = f"{message} (line {self.line}, column {self.column})"
        super().__init__(message)


# ---------------------------------------------------------------------------------------------------------------
# Lexer: source -> items ("data", text, pos) / ("var", tokens, pos) / ("block", tokens, pos).
# A token is (type, value, pos) with type in name | string | int | float | op.
# ---------------------------------------------------------------------------------------------------------------

_TAG_START = re.compile(r"\{([{%#])([-+]?)")
_TOKEN = re.compile(r"""
    (?P<float>(?<!\.)\d+(?:_\d+)*(?:\.\d+(?:_\d+)*(?:[eE][+-]?\d+(?:_\d+)*)?|[eE][+-]?\d+(?:_\d+)*))
  | (?P<int>\d+(?:_\d+)*)
  | (?P<name>[^\W\d]\w*)
  | (?P<string>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
  | (?P<op>//|\*\*|==|!=|>=|<=|[-+*/%~\[\](){}<>=.,:|])
""", re.S | re.X)
_OPEN = {"(": ")", "[": "]", "{": "}"}
_END_MARKERS = {"%": ("-%}", "+%}", "%}"), "{": ("-}}", "}}")}


def _normalize_source(source: str) -> str:
    """Jinja's defaults: every newline becomes \\n and one trailing newline is dropped (keep_trailing_newline=False)."""
    lines = re.split(r"\r\n|\r|\n", source)
    if lines[-1] == "":
        del lines[-1]
    return "\n".join(lines)


def _skip_space(src: str, p: int) -> int:
    while p < len(src) and src[p].isspace():
        p += 1
    return p


def _lex(src: str) -> list[tuple]:
    items: list[tuple] = []
    pos, n = 0, len(src)
    line_starting = True                        # the previous token ended a line (or this is the start)
    while pos < n:
        m = _TAG_START.search(src, pos)
        if m is None:
            items.append(("data", src[pos:], pos))
            break
        text, kind, sign = src[pos:m.start()], m.group(1), m.group(2)
        if sign == "-":                           # {%- strips all white space before the tag
            text = text.rstrip()
        elif sign != "+" and kind != "{":         # lstrip_blocks: spaces/tabs from line start to a block/comment
            line_start = text.rfind("\n") + 1
            if (line_start > 0 or line_starting) and text[line_start:].strip(" \t") == "":
                text = text[:line_start]
        if text:
            items.append(("data", text, pos))
        if kind == "#":
            close = src.find("#}", m.end())
            if close < 0:
                raise TemplateError("unclosed comment", m.start(), src)
            end_sign = src[close - 1] if close - 1 >= m.end() and src[close - 1] in "-+" else ""
            end = close + 2
        else:
            tokens, end, end_sign = _lex_tag(src, m.end(), kind, m.start())
            items.append(("var" if kind == "{" else "block", tokens, m.start()))
        if end_sign == "-":                       # -%} / -}} / -#} strip all white space after the tag
            end = _skip_space(src, end)
        elif end_sign == "" and kind != "{" and src.startswith("\n", end):
            end += 1                              # trim_blocks: drop the newline after a block or comment
        line_starting = src[end - 1] == "\n"
        pos = end
    return items


def _lex_tag(src: str, p: int, kind: str, tag_pos: int) -> tuple[list[tuple], int, str]:
    """Tokens of one {{ }} or {% %} tag from p; returns (tokens, position after the end marker, end sign)."""
    tokens: list[tuple] = []
    stack: list[str] = []                         # open brackets: an end marker only counts outside them
    while True:
        p = _skip_space(src, p)
        if p >= len(src):
            raise TemplateError("unclosed tag", tag_pos, src)
        if not stack:
            for marker in _END_MARKERS[kind]:
                if src.startswith(marker, p):
                    return tokens, p + len(marker), marker[0] if marker[0] in "-+" else ""
        m = _TOKEN.match(src, p)
        if m is None:
            raise TemplateError(f"unexpected character {src[p]!r}", p, src)
        typ, value = m.lastgroup, m.group()
        if typ == "string":
            value = value[1:-1].encode("ascii", "backslashreplace").decode("unicode-escape")
        elif typ == "int":
            value = int(value.replace("_", ""))
        elif typ == "float":
            value = float(value.replace("_", ""))
        elif typ == "op":
            if value in _OPEN:
                stack.append(_OPEN[value])
            elif value in ")]}":
                if not stack or stack.pop() != value:
                    raise TemplateError(f"unbalanced {value!r}", p, src)
        tokens.append((typ, value, p))
        p = m.end()


# ---------------------------------------------------------------------------------------------------------------
# Parser. Statement nodes:
#   ("text", s) ("output", expr, pos) ("if", [(cond, body), ...], else_body, pos)
#   ("for", target, iterable, filter_or_None, body, else_body, pos) ("set", target, expr, pos)
#   ("setblock", target, body, pos) ("break",) ("continue",) ("body", nodes)
# Targets: ("name", n) ("nsattr", n, attr) ("tuple", [targets]). Expressions: see _Renderer.eval.
# ---------------------------------------------------------------------------------------------------------------

_UNSUPPORTED_TAGS = ("macro", "call", "filter", "include", "import", "from", "extends", "block", "with", "raw",
                     "autoescape", "do", "trans")


class _ExprParser:
    """Recursive descent over one tag's tokens, following Jinja's precedence:
    condexpr < or < and < not < compare < + - < ~ < * / // % < ** < unary - + < primary.postfix|filter is test"""

    def __init__(self, tokens: list[tuple], src: str, tag_pos: int):
        self.tokens, self.src, self.i, self.tag_pos = tokens, src, 0, tag_pos

    # ---- token helpers ----
    def peek(self, ahead: int = 0) -> tuple | None:
        j = self.i + ahead
        return self.tokens[j] if j < len(self.tokens) else None

    def at(self, typ: str, value: Any = None, ahead: int = 0) -> bool:
        t = self.peek(ahead)
        return t is not None and t[0] == typ and (value is None or t[1] == value)

    def at_name(self, value: str, ahead: int = 0) -> bool:
        return self.at("name", value, ahead)

    def take(self, typ: str | None = None, value: Any = None) -> tuple:
        t = self.peek()
        if t is None or (typ is not None and t[0] != typ) or (value is not None and t[1] != value):
            want = repr(value) if value is not None else typ or "a token"
            self.fail(f"expected {want}, got {'end of tag' if t is None else repr(t[1])}")
        self.i += 1
        return t

    def skip(self, typ: str, value: Any) -> bool:
        if self.at(typ, value):
            self.i += 1
            return True
        return False

    def fail(self, message: str) -> None:
        t = self.peek() or (self.tokens[-1] if self.tokens else None)   # at the end: point at the last token
        raise TemplateError(message, t[2] if t is not None else self.tag_pos, self.src)

    def done(self) -> None:
        if self.peek() is not None:
            self.fail(f"unexpected {self.peek()[1]!r}")

    # ---- expressions ----
    def tuple_expr(self, with_condexpr: bool = True, end_names: tuple[str, ...] = ()) -> tuple:
        """expr or `a, b, ...` (an unparenthesized tuple), as Jinja's parse_tuple."""
        parse = self.expression if with_condexpr else self.or_expr
        items, trailing_comma = [], False
        while True:
            if items:
                if not self.skip("op", ","):
                    break
                trailing_comma = True
            if self.peek() is None or (self.peek()[0] == "name" and self.peek()[1] in end_names) \
                    or self.at("op", ")"):
                break
            items.append(parse())
            trailing_comma = False
        if not items:
            self.fail("expected an expression")
        if len(items) == 1 and not trailing_comma:
            return items[0]
        return ("tuple", items)

    def expression(self) -> tuple:
        node = self.or_expr()
        while self.skip("name", "if"):
            cond = self.or_expr()
            other = self.expression() if self.skip("name", "else") else None
            node = ("cond", cond, node, other)
        return node

    def or_expr(self) -> tuple:
        node = self.and_expr()
        while self.skip("name", "or"):
            node = ("or", node, self.and_expr())
        return node

    def and_expr(self) -> tuple:
        node = self.not_expr()
        while self.skip("name", "and"):
            node = ("and", node, self.not_expr())
        return node

    def not_expr(self) -> tuple:
        if self.skip("name", "not"):
            return ("not", self.not_expr())
        return self.compare()

    def compare(self) -> tuple:
        first = self.math1()
        ops = []
        while True:
            t = self.peek()
            if t is not None and t[0] == "op" and t[1] in ("==", "!=", "<", ">", "<=", ">="):
                self.i += 1
                ops.append((t[1], self.math1()))
            elif self.skip("name", "in"):
                ops.append(("in", self.math1()))
            elif self.at_name("not") and self.at_name("in", 1):
                self.i += 2
                ops.append(("not in", self.math1()))
            else:
                break
        return ("compare", first, ops) if ops else first

    def math1(self) -> tuple:
        node = self.concat()
        while self.at("op", "+") or self.at("op", "-"):
            op = self.take()[1]
            node = ("binop", op, node, self.concat())
        return node

    def concat(self) -> tuple:
        parts = [self.math2()]
        while self.skip("op", "~"):
            parts.append(self.math2())
        return ("concat", parts) if len(parts) > 1 else parts[0]

    def math2(self) -> tuple:
        node = self.power()
        while any(self.at("op", o) for o in ("*", "/", "//", "%")):
            op = self.take()[1]
            node = ("binop", op, node, self.power())
        return node

    def power(self) -> tuple:
        node = self.unary()
        while self.skip("op", "**"):
            node = ("binop", "**", node, self.unary())
        return node

    def unary(self, with_filter: bool = True) -> tuple:
        if self.at("op", "-") or self.at("op", "+"):
            op = self.take()[1]
            node = ("neg" if op == "-" else "pos", self.unary(with_filter=False))
        else:
            node = self.primary()
        node = self.postfix(node)
        if with_filter:
            node = self.filters_and_tests(node)
        return node

    def primary(self) -> tuple:
        t = self.peek()
        if t is None:
            self.fail("expected an expression")
        typ, value, _ = t
        if typ == "name":
            self.i += 1
            if value in ("true", "True"):
                return ("const", True)
            if value in ("false", "False"):
                return ("const", False)
            if value in ("none", "None"):
                return ("const", None)
            return ("var", value)
        if typ == "string":
            parts = []
            while self.at("string"):                       # adjacent literals concatenate: "a" "b" == "ab"
                parts.append(self.take()[1])
            return ("const", "".join(parts))
        if typ in ("int", "float"):
            self.i += 1
            return ("const", value)
        if value == "(":
            self.i += 1
            if self.skip("op", ")"):
                return ("tuple", [])
            node = self.tuple_expr()
            self.take("op", ")")
            return node
        if value == "[":
            self.i += 1
            items = []
            while not self.at("op", "]"):
                if items:
                    self.take("op", ",")
                    if self.at("op", "]"):
                        break
                items.append(self.expression())
            self.take("op", "]")
            return ("list", items)
        if value == "{":
            self.i += 1
            pairs = []
            while not self.at("op", "}"):
                if pairs:
                    self.take("op", ",")
                    if self.at("op", "}"):
                        break
                key = self.expression()
                self.take("op", ":")
                pairs.append((key, self.expression()))
            self.take("op", "}")
            return ("dict", pairs)
        self.fail(f"unexpected {value!r}")

    def postfix(self, node: tuple) -> tuple:
        while True:
            if self.skip("op", "."):
                t = self.peek()
                if t is not None and t[0] == "name":
                    node = ("getattr", node, self.take()[1])
                elif t is not None and t[0] == "int":
                    node = ("getitem", node, ("const", self.take()[1]))
                else:
                    self.fail("expected an attribute name after '.'")
            elif self.skip("op", "["):
                node = self.subscript(node)
            elif self.at("op", "("):
                node = self.call(node)
            else:
                return node

    def subscript(self, node: tuple) -> tuple:
        """After '[': x[i] or x[a:b:c] (any part may be empty)."""
        parts: list[tuple | None] = [None]
        colons = 0
        while not self.at("op", "]"):
            if self.skip("op", ":"):
                colons += 1
                if colons > 2:
                    self.fail("too many ':' in a slice")
                parts.append(None)
            else:
                if parts[-1] is not None:
                    self.fail("expected ':' or ']'")
                parts[-1] = self.expression()
        self.take("op", "]")
        if colons == 0:
            if parts[0] is None:
                self.fail("empty subscript")
            return ("getitem", node, parts[0])
        parts += [None] * (3 - len(parts))
        return ("slice", node, parts[0], parts[1], parts[2])

    def call_args(self) -> tuple[list, list]:
        self.take("op", "(")
        args, kwargs = [], []
        while not self.at("op", ")"):
            if args or kwargs:
                self.take("op", ",")
                if self.at("op", ")"):
                    break
            if self.at("op", "*") or self.at("op", "**"):
                self.fail("*args / **kwargs in calls are not supported")
            if self.at("name") and self.at("op", "=", 1):
                name = self.take()[1]
                self.i += 1
                kwargs.append((name, self.expression()))
            else:
                if kwargs:
                    self.fail("positional argument after keyword argument")
                args.append(self.expression())
        self.take("op", ")")
        return args, kwargs

    def call(self, node: tuple) -> tuple:
        args, kwargs = self.call_args()
        return ("call", node, args, kwargs)

    def dotted_name(self) -> str:
        name = self.take("name")[1]
        while self.at("op", ".") and self.at("name", None, 1):
            self.i += 1
            name += "." + self.take()[1]
        return name

    def filters_and_tests(self, node: tuple) -> tuple:
        while True:
            if self.skip("op", "|"):
                pos = self.peek()[2] if self.peek() else self.tag_pos
                name = self.dotted_name()
                if name not in FILTERS:
                    raise TemplateError(f"unsupported filter {name!r}", pos, self.src)
                args, kwargs = self.call_args() if self.at("op", "(") else ([], [])
                node = ("filter", name, node, args, kwargs)
            elif self.skip("name", "is"):
                negate = self.skip("name", "not")
                pos = self.peek()[2] if self.peek() else self.tag_pos
                name = self.dotted_name()
                if name not in TESTS:
                    raise TemplateError(f"unsupported test {name!r}", pos, self.src)
                args: list = []
                t = self.peek()
                if self.at("op", "("):
                    args, kwargs = self.call_args()
                    if kwargs:
                        self.fail("keyword arguments to tests are not supported")
                elif t is not None and (t[0] in ("name", "string", "int", "float") or t[1] in ("[", "{")) \
                        and not (t[0] == "name" and t[1] in ("else", "or", "and")):
                    if t[0] == "name" and t[1] == "is":
                        self.fail("tests cannot be chained with 'is'")
                    args = [self.postfix(self.primary())]   # `x is divisibleby 3`: one bare argument
                node = ("test", name, node, args)
                if negate:
                    node = ("not", node)
            elif self.at("op", "("):
                node = self.call(node)
            else:
                return node

    # ---- assignment targets ----
    def target(self, allow_namespace: bool) -> tuple:
        def one() -> tuple:
            if self.skip("op", "("):
                t = self.target(False)
                self.take("op", ")")
                return t
            name = self.take("name")[1]
            if allow_namespace and self.skip("op", "."):
                return ("nsattr", name, self.take("name")[1])
            return ("name", name)
        targets = [one()]
        while self.skip("op", ","):
            if not self.at("name") and not self.at("op", "("):
                break
            targets.append(one())
        return targets[0] if len(targets) == 1 else ("tuple", targets)


class _Parser:
    """Items -> statement tree."""

    def __init__(self, items: list[tuple], src: str):
        self.items, self.src, self.i, self.loop_depth = items, src, 0, 0

    def parse(self) -> list[tuple]:
        body, _, _ = self.nodes(())
        return body

    def nodes(self, stop: tuple[str, ...]) -> tuple[list[tuple], str | None, _ExprParser | None]:
        """Statements until a block tag named in `stop`; returns (nodes, tag name, parser positioned after the
        name) with the tag consumed."""
        body: list[tuple] = []
        while self.i < len(self.items):
            kind, payload, pos = self.items[self.i]
            self.i += 1
            if kind == "data":
                body.append(("text", payload))
                continue
            p = _ExprParser(payload, self.src, pos)
            if kind == "var":
                expr = p.tuple_expr()
                p.done()
                body.append(("output", expr, pos))
                continue
            if not p.at("name"):
                p.fail("expected a statement name")
            name = p.peek()[1]
            if name in stop:
                p.i += 1
                return body, name, p
            body.append(self.statement(name, p, pos))
        if stop:
            raise TemplateError(f"missing {{% {stop[-1]} %}}", len(self.src), self.src)
        return body, None, None

    def statement(self, name: str, p: _ExprParser, pos: int) -> tuple:
        p.i += 1
        if name == "if":
            cond = p.tuple_expr(with_condexpr=False)
            p.done()
            branches, else_body = [], []
            while True:
                body, tag, end = self.nodes(("elif", "else", "endif"))
                branches.append((cond, body))
                if tag != "elif":
                    break
                cond = end.tuple_expr(with_condexpr=False)
                end.done()
            end.done()
            if tag == "else":
                else_body, _, end = self.nodes(("endif",))
                end.done()
            return ("if", branches, else_body, pos)
        if name == "for":
            target = p.target(allow_namespace=False)
            p.take("name", "in")
            iterable = p.tuple_expr(with_condexpr=False, end_names=("if", "recursive"))
            cond = p.expression() if p.skip("name", "if") else None
            if p.at_name("recursive"):
                p.fail("recursive loops are not supported")
            p.done()
            self.loop_depth += 1
            body, tag, end = self.nodes(("else", "endfor"))
            self.loop_depth -= 1
            end.done()
            else_body = []
            if tag == "else":
                else_body, _, end = self.nodes(("endfor",))
                end.done()
            return ("for", target, iterable, cond, body, else_body, pos)
        if name == "set":
            target = p.target(allow_namespace=True)
            if p.skip("op", "="):
                expr = p.tuple_expr()
                p.done()
                return ("set", target, expr, pos)
            p.done()
            body, _, end = self.nodes(("endset",))
            end.done()
            return ("setblock", target, body, pos)
        if name in ("break", "continue"):
            if not self.loop_depth:
                raise TemplateError(f"{{% {name} %}} outside a loop", pos, self.src)
            p.done()
            return (name,)
        if name == "generation":
            p.done()
            body, _, end = self.nodes(("endgeneration",))
            end.done()
            return ("body", body)
        if name in _UNSUPPORTED_TAGS:
            raise TemplateError(f"unsupported tag {{% {name} %}}", pos, self.src)
        raise TemplateError(f"unknown or misplaced tag {{% {name} %}}", pos, self.src)


# ---------------------------------------------------------------------------------------------------------------
# Runtime values.
# ---------------------------------------------------------------------------------------------------------------

class Undefined:
    """A missing variable, attribute or item: renders as '', is falsy, iterates as empty; using it further (its
    attributes, arithmetic, calling it) is an error, as with jinja2's default Undefined."""

    __slots__ = ("message",)

    def __init__(self, message: str):
        self.message = message                    # what using it further reports

    def fail(self):
        raise TemplateError(self.message)

    def __str__(self) -> str:
        return ""

    def __bool__(self) -> bool:
        return False

    def __iter__(self):
        return iter(())

    def __len__(self) -> int:
        return 0

    def __eq__(self, other) -> bool:
        return type(other) is Undefined

    def __ne__(self, other) -> bool:
        return not self.__eq__(other)

    def __hash__(self) -> int:
        return id(Undefined)

    def __repr__(self) -> str:
        return "Undefined"


class Namespace:
    """namespace(...): the one mutable object templates may assign attributes on."""

    def __init__(self, *args, **kwargs):
        self.attrs = dict(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<Namespace {self.attrs!r}>"


class LoopContext:
    """The `loop` variable inside a for loop."""

    def __init__(self, items: list, index0: int):
        self._items, self.index0 = items, index0
        self.length = len(items)
        self.index = index0 + 1
        self.revindex = self.length - index0
        self.revindex0 = self.length - index0 - 1
        self.first = index0 == 0
        self.last = index0 == self.length - 1
        self.depth, self.depth0 = 1, 0
        self.previtem = items[index0 - 1] if index0 > 0 else Undefined("loop.previtem is undefined at the start")
        self.nextitem = items[index0 + 1] if index0 + 1 < self.length else Undefined("loop.nextitem is undefined "
                                                                                      "at the end")

    def cycle(self, *values):
        if not values:
            raise TemplateError("loop.cycle() needs at least one value")
        return values[self.index0 % len(values)]


# Python methods a template may call (read-only ones; the sandbox refuses mutation). str.format is left out: it
# can reach attributes of its arguments.
_SAFE_METHODS = {
    str: frozenset("capitalize casefold center count endswith find index isalnum isalpha isdigit islower isspace "
                   "isupper join ljust lower lstrip partition removeprefix removesuffix replace rfind rindex rjust "
                   "rpartition rsplit rstrip split splitlines startswith strip swapcase title upper zfill".split()),
    dict: frozenset(("get", "items", "keys", "values")),
    list: frozenset(("count", "index")),
    tuple: frozenset(("count", "index")),
}


def _own_attr(obj, name: str):
    """(True, value) if `name` is an attribute the sandbox exposes on obj, else (False, None)."""
    if name.startswith("_"):
        return False, None
    if isinstance(obj, Namespace):
        return (True, obj.attrs[name]) if name in obj.attrs else (False, None)
    if isinstance(obj, LoopContext):
        return (True, getattr(obj, name)) if hasattr(obj, name) else (False, None)
    for typ, names in _SAFE_METHODS.items():
        if isinstance(obj, typ) and name in names:
            return True, getattr(obj, name)
    return False, None


def get_attr(obj, name: str):
    """obj.name: an exposed attribute first, then obj[name] (jinja2's order for dotted access)."""
    if isinstance(obj, Undefined):
        obj.fail()
    found, value = _own_attr(obj, name)
    if found:
        return value
    try:
        return obj[name]
    except (TypeError, LookupError, AttributeError):
        return Undefined(f"{_describe(obj)} has no attribute {name!r}")


def get_item(obj, key):
    """obj[key]: the item first, then an exposed attribute of that name (jinja2's order for subscripts)."""
    if isinstance(obj, Undefined):
        obj.fail()
    try:
        return obj[key]
    except (TypeError, LookupError, AttributeError):
        if isinstance(key, str):
            found, value = _own_attr(obj, key)
            if found:
                return value
        return Undefined(f"{_describe(obj)} has no item {key!r}")


def _describe(obj) -> str:
    return f"'{type(obj).__name__} object'"


def to_str(value) -> str:
    """How {{ value }} prints: str(), with undefined as ''."""
    return value if isinstance(value, str) else str(value)


# ---------------------------------------------------------------------------------------------------------------
# Filters and tests (value first, as in jinja2).
# ---------------------------------------------------------------------------------------------------------------

def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers replaces jinja2's tojson (which HTML-escapes) with plain json.dumps and these options.
    try:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)
    except TypeError as e:
        raise TemplateError(f"tojson: {e}") from None


def _default(value, default_value="", boolean=False):
    return default_value if isinstance(value, Undefined) or (boolean and not value) else value


def _first(seq):
    for x in seq:
        return x
    return Undefined("first of an empty sequence is undefined")


def _last(seq):
    items = list(seq)
    return items[-1] if items else Undefined("last of an empty sequence is undefined")


def _join(seq, d="", attribute=None):
    if attribute is not None:
        seq = [get_item(x, attribute) for x in seq]
    return to_str(d).join(to_str(x) for x in seq)


def _int(value, default=0, base=10):
    try:
        return int(value, base) if isinstance(value, str) else int(value)
    except (TypeError, ValueError, OverflowError):
        try:
            return int(float(value))
        except (TypeError, ValueError, OverflowError):
            return default


def _float(value, default=0.0):
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _title(s):
    words = re.split(r"([-\s({\[<]+)", to_str(s))
    return "".join(w[0].upper() + w[1:].lower() for w in words if w)


def _escape(s):
    return (to_str(s).replace("&", "&amp;").replace(">", "&gt;").replace("<", "&lt;")
            .replace("'", "&#39;").replace('"', "&#34;"))


def _reverse(value):
    return value[::-1] if isinstance(value, str) else list(reversed(list(value)))


def _sort_key(attribute, case_sensitive):
    def key(x):
        v = get_item(x, attribute) if attribute is not None else x
        return v.lower() if isinstance(v, str) and not case_sensitive else v
    return key


def _sort(value, reverse=False, case_sensitive=False, attribute=None):
    return sorted(value, key=_sort_key(attribute, case_sensitive), reverse=reverse)


def _unique(value, case_sensitive=False, attribute=None):
    seen, out = set(), []
    key = _sort_key(attribute, case_sensitive)
    for x in value:
        k = key(x)
        if k not in seen:
            seen.add(k)
            out.append(x)
    return out


def _max(value, case_sensitive=False, attribute=None):
    items = list(value)
    if not items:
        return Undefined("max of an empty sequence is undefined")
    return max(items, key=_sort_key(attribute, case_sensitive))


def _min(value, case_sensitive=False, attribute=None):
    items = list(value)
    if not items:
        return Undefined("min of an empty sequence is undefined")
    return min(items, key=_sort_key(attribute, case_sensitive))


def _sum(value, attribute=None, start=0):
    if attribute is not None:
        value = [get_item(x, attribute) for x in value]
    return sum(value, start)


def _indent(s, width=4, first=False, blank=False):
    indentation = width if isinstance(width, str) else " " * width
    s = to_str(s) + "\n"                          # jinja2's trick so splitlines keeps a trailing empty line
    if blank:
        rv = ("\n" + indentation).join(s.splitlines())
    else:
        lines = s.splitlines()
        rv = lines.pop(0)
        if lines:
            rv += "\n" + "\n".join(indentation + line if line else line for line in lines)
    return indentation + rv if first else rv


def _format(value, *args, **kwargs):
    if args and kwargs:
        raise TemplateError("format: use positional or keyword arguments, not both")
    return to_str(value) % (kwargs or args)


def _items(value):
    return [] if isinstance(value, Undefined) else list(value.items())


def _round(value, precision=0, method="common"):
    if method == "common":
        return round(value, precision)
    if method not in ("ceil", "floor"):
        raise TemplateError("round: method must be 'common', 'ceil' or 'floor'")
    scale = 10 ** precision
    return (math.ceil if method == "ceil" else math.floor)(value * scale) / scale


def _map(seq, *args, **kwargs):
    if "attribute" in kwargs:
        attribute = kwargs.pop("attribute")
        default = kwargs.pop("default", None)
        out = []
        for x in seq:
            v = get_item(x, attribute)
            out.append(default if isinstance(v, Undefined) and default is not None else v)
        return out
    if not args:
        raise TemplateError("map needs a filter name or attribute=")
    name, rest = args[0], args[1:]
    if name not in FILTERS:
        raise TemplateError(f"map: unsupported filter {name!r}")
    return [FILTERS[name](x, *rest, **kwargs) for x in seq]


def _select_with(seq, args, keep: bool, attribute=None):
    """select / reject / selectattr / rejectattr: keep items whose test result (truthiness without a test) is `keep`."""
    if args and args[0] not in TESTS:
        raise TemplateError(f"unsupported test {args[0]!r}")
    out = []
    for x in seq:
        v = get_item(x, attribute) if attribute is not None else x
        passed = TESTS[args[0]](v, *args[1:]) if args else v
        if bool(passed) == keep:
            out.append(x)
    return out


FILTERS = {
    "trim": lambda s, chars=None: to_str(s).strip(chars),
    "length": lambda v: len(v),
    "count": lambda v: len(v),
    "tojson": _tojson,
    "upper": lambda s: to_str(s).upper(),
    "lower": lambda s: to_str(s).lower(),
    "capitalize": lambda s: to_str(s).capitalize(),
    "title": _title,
    "default": _default,
    "d": _default,
    "first": _first,
    "last": _last,
    "join": _join,
    "replace": lambda s, old, new, count=None: to_str(s).replace(old, new, -1 if count is None else count),
    "string": to_str,
    "int": _int,
    "float": _float,
    "list": lambda v: list(v),
    "items": _items,
    "safe": lambda v: v,
    "escape": _escape,
    "e": _escape,
    "abs": abs,
    "round": _round,
    "reverse": _reverse,
    "sort": _sort,
    "unique": _unique,
    "max": _max,
    "min": _min,
    "sum": _sum,
    "indent": _indent,
    "format": _format,
    "map": _map,
    "select": lambda seq, *args: _select_with(seq, args, True),
    "reject": lambda seq, *args: _select_with(seq, args, False),
    "selectattr": lambda seq, attr, *args: _select_with(seq, args, True, attr),
    "rejectattr": lambda seq, attr, *args: _select_with(seq, args, False, attr),
    "wordcount": lambda s: len(re.findall(r"\w+", to_str(s))),
}


def _is_iterable(v) -> bool:
    try:
        iter(v)
    except TypeError:
        return False
    return True


TESTS = {
    "defined": lambda v: not isinstance(v, Undefined),
    "undefined": lambda v: isinstance(v, Undefined),
    "none": lambda v: v is None,
    "string": lambda v: isinstance(v, str),
    "number": lambda v: isinstance(v, numbers.Number),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, float),
    "boolean": lambda v: v is True or v is False,
    "true": lambda v: v is True,
    "false": lambda v: v is False,
    "mapping": lambda v: isinstance(v, dict),
    "iterable": _is_iterable,
    "sequence": lambda v: hasattr(v, "__len__") and hasattr(v, "__getitem__"),
    "callable": callable,
    "odd": lambda v: v % 2 == 1,
    "even": lambda v: v % 2 == 0,
    "divisibleby": lambda v, n: v % n == 0,
    "eq": lambda a, b: a == b, "equalto": lambda a, b: a == b, "==": lambda a, b: a == b,
    "ne": lambda a, b: a != b, "!=": lambda a, b: a != b,
    "lt": lambda a, b: a < b, "lessthan": lambda a, b: a < b, "<": lambda a, b: a < b,
    "le": lambda a, b: a <= b, "<=": lambda a, b: a <= b,
    "gt": lambda a, b: a > b, "greaterthan": lambda a, b: a > b, ">": lambda a, b: a > b,
    "ge": lambda a, b: a >= b, ">=": lambda a, b: a >= b,
    "in": lambda a, b: a in b,
    "sameas": lambda a, b: a is b,
    "lower": lambda v: to_str(v).islower(),
    "upper": lambda v: to_str(v).isupper(),
}


# ---------------------------------------------------------------------------------------------------------------
# Globals (jinja2's defaults that chat templates use, plus the two transformers adds).
# ---------------------------------------------------------------------------------------------------------------

_MAX_RANGE = 100_000                              # jinja2's sandbox limit


def _range(*args):
    r = range(*args)
    if len(r) > _MAX_RANGE:
        raise TemplateError(f"range too big ({len(r)} items; the limit is {_MAX_RANGE})")
    return r


def _raise_exception(message):
    raise TemplateError(to_str(message), from_template=True)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


GLOBALS = {"range": _range, "dict": lambda *args, **kwargs: dict(*args, **kwargs), "namespace": Namespace,
           "raise_exception": _raise_exception, "strftime_now": _strftime_now}


# ---------------------------------------------------------------------------------------------------------------
# Renderer.
# ---------------------------------------------------------------------------------------------------------------

class _Break(Exception):
    pass


class _Continue(Exception):
    pass


class _Scope:
    def __init__(self, parent: "_Scope | None", values: dict | None = None):
        self.parent, self.values = parent, values if values is not None else {}

    def lookup(self, name: str):
        s = self
        while s is not None:
            if name in s.values:
                return s.values[name]
            s = s.parent
        return Undefined(f"{name!r} is undefined")


_BINOPS = {
    "+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b,
    "//": lambda a, b: a // b, "%": lambda a, b: a % b, "**": lambda a, b: a ** b,
}
_COMPARE = {
    "==": lambda a, b: a == b, "!=": lambda a, b: a != b, "<": lambda a, b: a < b, ">": lambda a, b: a > b,
    "<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b, "in": lambda a, b: a in b,
    "not in": lambda a, b: a not in b,
}


class _Renderer:
    def __init__(self, src: str):
        self.src = src
        self.out: list[str] = []

    # ---- statements ----
    def run(self, nodes: list[tuple], scope: _Scope) -> None:
        for node in nodes:
            kind = node[0]
            if kind == "text":
                self.out.append(node[1])
            elif kind == "output":
                self.out.append(to_str(self.guarded(node[1], scope, node[2])))
            elif kind == "if":
                for cond, body in node[1]:
                    if self.guarded(cond, scope, node[3]):
                        self.run(body, scope)
                        break
                else:
                    self.run(node[2], scope)
            elif kind == "for":
                self.run_for(node, scope)
            elif kind == "set":
                self.assign(node[1], self.guarded(node[2], scope, node[3]), scope, node[3])
            elif kind == "setblock":
                inner = _Renderer(self.src)
                inner.run(node[2], scope)
                self.assign(node[1], "".join(inner.out), scope, node[3])
            elif kind == "body":
                self.run(node[1], scope)
            elif kind == "break":
                raise _Break()
            elif kind == "continue":
                raise _Continue()
            else:  # pragma: no cover - the parser builds only the kinds above
                raise TemplateError(f"internal: unknown node {kind!r}")

    def run_for(self, node: tuple, scope: _Scope) -> None:
        _, target, iterable, cond, body, else_body, pos = node
        seq = self.guarded(iterable, scope, pos)
        try:
            items = list(seq)                       # a dict iterates over its keys, as in Python
        except TypeError:
            raise TemplateError(f"{_describe(seq)} is not iterable", pos, self.src) from None
        if cond is not None:
            kept = []
            for x in items:
                probe = _Scope(scope)
                self.assign(target, x, probe, pos)
                if self.guarded(cond, probe, pos):
                    kept.append(x)
            items = kept
        for index0, x in enumerate(items):
            inner = _Scope(scope, {"loop": LoopContext(items, index0)})
            self.assign(target, x, inner, pos)
            try:
                self.run(body, inner)
            except _Break:
                break
            except _Continue:
                continue
        if not items:
            self.run(else_body, scope)

    def assign(self, target: tuple, value, scope: _Scope, pos: int) -> None:
        kind = target[0]
        if kind == "name":
            scope.values[target[1]] = value
        elif kind == "nsattr":
            ns = scope.lookup(target[1])
            if not isinstance(ns, Namespace):
                raise TemplateError(f"cannot assign attribute on non-namespace object {target[1]!r}", pos, self.src)
            ns.attrs[target[2]] = value
        else:
            try:
                values = list(value)
            except TypeError:
                raise TemplateError(f"cannot unpack {_describe(value)}", pos, self.src) from None
            if len(values) != len(target[1]):
                raise TemplateError(f"cannot unpack {len(values)} values into {len(target[1])} names", pos,
                                    self.src)
            for t, v in zip(target[1], values):
                self.assign(t, v, scope, pos)

    # ---- expressions ----
    def guarded(self, expr: tuple, scope: _Scope, pos: int):
        """Evaluate, turning Python errors into TemplateError at the tag's position."""
        try:
            return self.eval(expr, scope)
        except (_Break, _Continue):
            raise
        except TemplateError as e:
            if e.pos is None and not e.from_template:
                raise TemplateError(e.message, pos, self.src) from None
            raise
        except (TypeError, ValueError, ArithmeticError, LookupError, AttributeError, RecursionError) as e:
            raise TemplateError(f"{type(e).__name__}: {e}", pos, self.src) from None

    def eval(self, e: tuple, scope: _Scope):
        kind = e[0]
        if kind == "const":
            return e[1]
        if kind == "var":
            v = scope.lookup(e[1])
            if isinstance(v, Undefined) and e[1] in GLOBALS:
                return GLOBALS[e[1]]
            return v
        if kind == "getattr":
            return get_attr(self.eval(e[1], scope), e[2])
        if kind == "getitem":
            return get_item(self.eval(e[1], scope), self.eval(e[2], scope))
        if kind == "slice":
            obj = self.eval(e[1], scope)
            if isinstance(obj, Undefined):
                obj.fail()
            bounds = [None if b is None else self.eval(b, scope) for b in e[2:]]
            return obj[slice(*bounds)]
        if kind == "call":
            fn = self.eval(e[1], scope)
            if isinstance(fn, Undefined):
                fn.fail()
            if not callable(fn):
                raise TemplateError(f"{_describe(fn)} is not callable")
            args = [self.eval(a, scope) for a in e[2]]
            kwargs = {k: self.eval(v, scope) for k, v in e[3]}
            return fn(*args, **kwargs)
        if kind == "filter":
            value = self.eval(e[2], scope)
            args = [self.eval(a, scope) for a in e[3]]
            kwargs = {k: self.eval(v, scope) for k, v in e[4]}
            if e[1] not in ("default", "d", "trim", "length", "count", "string", "upper", "lower", "items",
                            "list", "join", "first", "last") and isinstance(value, Undefined):
                value.fail()
            return FILTERS[e[1]](value, *args, **kwargs)
        if kind == "test":
            value = self.eval(e[2], scope)
            args = [self.eval(a, scope) for a in e[3]]
            return TESTS[e[1]](value, *args)
        if kind == "binop":
            a, b = self.eval(e[2], scope), self.eval(e[3], scope)
            for v in (a, b):
                if isinstance(v, Undefined):
                    v.fail()
            return _BINOPS[e[1]](a, b)
        if kind == "concat":
            return "".join(to_str(self.eval(x, scope)) for x in e[1])
        if kind == "compare":
            left = self.eval(e[1], scope)
            for op, rhs in e[2]:
                right = self.eval(rhs, scope)
                if not _COMPARE[op](left, right):
                    return False
                left = right
            return True
        if kind == "and":
            left = self.eval(e[1], scope)
            return self.eval(e[2], scope) if left else left
        if kind == "or":
            left = self.eval(e[1], scope)
            return left if left else self.eval(e[2], scope)
        if kind == "not":
            return not self.eval(e[1], scope)
        if kind in ("neg", "pos"):
            v = self.eval(e[1], scope)
            if isinstance(v, Undefined):
                v.fail()
            return -v if kind == "neg" else +v
        if kind == "cond":
            if self.eval(e[1], scope):
                return self.eval(e[2], scope)
            return self.eval(e[3], scope) if e[3] is not None else Undefined("the missing else branch is undefined")
        if kind == "list":
            return [self.eval(x, scope) for x in e[1]]
        if kind == "tuple":
            return tuple(self.eval(x, scope) for x in e[1])
        if kind == "dict":
            return {self.eval(k, scope): self.eval(v, scope) for k, v in e[1]}
        raise TemplateError(f"internal: unknown expression {kind!r}")  # pragma: no cover


# ---------------------------------------------------------------------------------------------------------------
# API.
# ---------------------------------------------------------------------------------------------------------------

_COMPILED: dict[str, tuple[str, list[tuple]]] = {}


def compile_template(template: str) -> tuple[str, list[tuple]]:
    """(normalized source, statement tree); cached per template text."""
    hit = _COMPILED.get(template)
    if hit is None:
        src = _normalize_source(template)
        hit = (src, _Parser(_lex(src), src).parse())
        if len(_COMPILED) < 64:
            _COMPILED[template] = hit
    return hit


def render(template: str, **context) -> str:
    """Render `template` with `context` (jinja2 semantics for the supported subset)."""
    src, tree = compile_template(template)
    r = _Renderer(src)
    try:
        r.run(tree, _Scope(None, dict(context)))
    except (_Break, _Continue):  # pragma: no cover - the parser refuses break/continue outside loops
        raise TemplateError("break/continue outside a loop") from None
    return "".join(r.out)


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True, bos_token: str = "",
                eos_token: str = "", **extra) -> str:
    """The prompt text for `messages`, as transformers' apply_chat_template(tokenize=False) renders it."""
    context = {"tools": None, "documents": None}
    context.update(extra)
    context.update(messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token,
                   eos_token=eos_token)
    return render(template, **context)

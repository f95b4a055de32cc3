"""CESQL v1 syntax: text to a tree of nodes, or a :class:`CESQLParseError` naming where and why.

Precedence follows the CESQL grammar (``CESQLParser.g4``), tightest first:

1. ``NOT x``, ``-x`` (prefix; so ``NOT a = b`` is ``(NOT a) = b``)
2. ``x [NOT] LIKE 'pattern'``, ``x [NOT] IN (a, b, ...)``
3. ``*`` ``/`` ``%``, then ``+`` ``-`` (left to right)
4. ``=`` ``!=`` ``<>`` ``<`` ``<=`` ``>`` ``>=`` (left to right)
5. ``AND`` ``OR`` ``XOR``: **one level, grouped from the right**, as the grammar has it:
   ``a AND b OR c`` is ``a AND (b OR c)``, not SQL's ``(a AND b) OR c``. Parenthesise.

A sign written against digits is part of the integer literal, as in the grammar's lexer
(``-2147483648`` is a literal, not the negation of an out-of-range one); after an operand
``-`` is subtraction, so ``5-3`` is ``2`` (where the reference lexer would reject it).
Keywords, function names and attribute names are case-insensitive; attribute names are
read in lower case, which is how CloudEvents spells them.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal as TypingLiteral

INT_MIN = -(2**31)
INT_MAX = 2**31 - 1

MAX_DEPTH = 200
"""The deepest an expression's tree may be: operators applied to operators (a chain of
``+``s included), function calls, ``NOT`` and ``-``; a chain of ``AND``, ``OR`` and ``XOR``
counts as one level, as it is compiled to a loop. Compiling and evaluating recurse once or
twice per level; past this an expression is refused as a :class:`CESQLParseError` instead
of exhausting Python's stack (a ``RecursionError``)."""

MAX_NESTING = 32
"""The most parentheses, function calls and ``IN`` lists an expression may open inside one
another: the parser recurses through every precedence level for each (about 8 frames)."""

Value = bool | int | str
"""A CESQL value: Boolean, Integer (32-bit) or String."""

KEYWORDS = frozenset({"AND", "OR", "XOR", "NOT", "LIKE", "EXISTS", "IN", "TRUE", "FALSE"})
_LOGIC = frozenset({"AND", "OR", "XOR"})
_COMPARISON = frozenset({"=", "!=", "<>", "<", "<=", ">", ">="})
_ATTRIBUTE_NAME = re.compile(r"[A-Za-z0-9]+")
_FUNCTION_NAME = re.compile(r"[A-Za-z][A-Za-z_]*")
_TOKEN = re.compile(
    r"(?P<space>[ \t\r\n]+)|(?P<word>[A-Za-z0-9_]+)|(?P<quote>['\"])|(?P<op><>|!=|<=|>=|[-+*/%=<>(),])"
)


class CESQLParseError(ValueError):
    """A CESQL expression that cannot be compiled: ``reason`` at 0-based ``position``.

    >>> compile("ABC(")                                   # doctest: +SKIP
    CESQLParseError: expected an expression or ')', found the end of the expression, at column 5
        ABC(
            ^
    """

    def __init__(self, expression: str, position: int, reason: str) -> None:
        self.expression = expression
        self.position = position
        self.reason = reason
        line = expression.count("\n", 0, position) + 1
        column = position - (expression.rfind("\n", 0, position) + 1) + 1
        where = f"line {line}, column {column}" if "\n" in expression else f"column {column}"
        message = f"{reason}, at {where}"
        if "\n" not in expression:
            message += f"\n    {expression}\n    {' ' * position}^"
        super().__init__(message)


# -- the tree --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Literal:
    value: Value
    pos: int


@dataclasses.dataclass(frozen=True, slots=True)
class Attribute:
    name: str  # lower case
    pos: int


@dataclasses.dataclass(frozen=True, slots=True)
class Exists:
    name: str
    pos: int


@dataclasses.dataclass(frozen=True, slots=True)
class Unary:
    op: TypingLiteral["NOT", "-"]
    operand: Node
    pos: int


@dataclasses.dataclass(frozen=True, slots=True)
class Binary:
    op: str  # AND OR XOR = != <> < <= > >= + - * / %  ('<>' is kept: same meaning as '!=')
    left: Node
    right: Node
    pos: int  # of the operator


@dataclasses.dataclass(frozen=True, slots=True)
class Like:
    operand: Node
    pattern: str
    negated: bool
    pos: int


@dataclasses.dataclass(frozen=True, slots=True)
class In:
    operand: Node
    items: tuple[Node, ...]
    negated: bool
    pos: int


@dataclasses.dataclass(frozen=True, slots=True)
class Call:
    name: str  # upper case
    args: tuple[Node, ...]
    pos: int


Node = Literal | Attribute | Exists | Unary | Binary | Like | In | Call


# -- tokens ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Token:
    kind: TypingLiteral["word", "keyword", "int", "string", "op", "end"]
    text: str  # keywords upper-cased; strings unescaped
    pos: int
    end: int

    def describe(self) -> str:
        if self.kind == "end":
            return "the end of the expression"
        if self.kind == "keyword":
            return f"the keyword {self.text}"
        if self.kind == "string":
            return f"the string {self.text!r}"
        if self.kind == "int":
            return f"the integer {self.text}"
        if self.kind == "word":
            return f"the name {self.text!r}"
        return f"'{self.text}'"


def _tokens(text: str) -> list[_Token]:
    out: list[_Token] = []
    pos, n = 0, len(text)
    while pos < n:
        match = _TOKEN.match(text, pos)
        if match is None:
            raise CESQLParseError(text, pos, f"unexpected character {text[pos]!r}")
        group = match.lastgroup
        if group == "quote":
            out.append(_string(text, pos))
            pos = out[-1].end
            continue
        end = match.end()
        if group == "word":
            word = match.group()
            if word.isascii() and word.isdigit():
                out.append(_Token("int", word, pos, end))
            elif word.upper() in KEYWORDS:
                out.append(_Token("keyword", word.upper(), pos, end))
            else:
                out.append(_Token("word", word, pos, end))
        elif group == "op":
            out.append(_Token("op", match.group(), pos, end))
        pos = end
    out.append(_Token("end", "", n, n))
    return out


def _string(text: str, start: int) -> _Token:
    """A quoted literal from ``start``: ``\\'`` (or ``''``) in '...' and ``\\"`` (or ``""``) in "..."
    stand for the quote; any other backslash is kept as written (LIKE reads ``\\%`` and ``\\_``)."""
    quote = text[start]
    chars: list[str] = []
    i, n = start + 1, len(text)
    while i < n:
        ch = text[i]
        if ch == "\\" and i + 1 < n:
            nxt = text[i + 1]
            chars.append(nxt if nxt == quote else ch + nxt)
            i += 2
        elif ch == quote:
            if i + 1 < n and text[i + 1] == quote:  # doubled quote, as in SQL
                chars.append(quote)
                i += 2
            else:
                return _Token("string", "".join(chars), start, i + 1)
        else:
            chars.append(ch)
            i += 1
    raise CESQLParseError(text, start, "unterminated string literal")


# -- the parser ------------------------------------------------------------------------


def parse(text: str) -> Node:
    """The tree of ``text``, or :class:`CESQLParseError`."""
    node = _Parser(text).parse()
    _check_depth(text, node)
    return node


def _too_deep(text: str, pos: int) -> CESQLParseError:
    return CESQLParseError(
        text, pos, f"expression nested too deeply (more than {MAX_DEPTH} levels of operators, or more than "
        f"{MAX_NESTING} parentheses, calls and IN lists inside one another)"
    )


def _children(node: Node) -> tuple[Node, ...]:
    if isinstance(node, Unary | Like):
        return (node.operand,)
    if isinstance(node, Binary):
        return (node.left, node.right)
    if isinstance(node, In):
        return (node.operand, *node.items)
    if isinstance(node, Call):
        return node.args
    return ()


def _check_depth(text: str, root: Node) -> None:
    """:class:`CESQLParseError` if the tree is deeper than :data:`MAX_DEPTH` (walked without recursion:
    a chain such as ``a + b + c ...`` is parsed by a loop, yet nests the tree one level per operator;
    the right operand of a logic operator that is one too continues its chain, at the same level)."""
    stack = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _too_deep(text, node.pos)
        if isinstance(node, Binary) and node.op in _LOGIC:
            right = node.right
            chained = isinstance(right, Binary) and right.op in _LOGIC
            stack += [(node.left, depth + 1), (right, depth if chained else depth + 1)]
        else:
            stack.extend((child, depth + 1) for child in _children(node))


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokens(text)
        self.i = 0
        self.depth = 0  # NOT and - inside one another (the parser recurses once for each)
        self.nesting = 0  # parentheses, calls and IN lists inside one another

    def enter(self, token: _Token) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _too_deep(self.text, token.pos)

    def error(self, token: _Token, reason: str) -> CESQLParseError:
        return CESQLParseError(self.text, token.pos, reason)

    @property
    def token(self) -> _Token:
        return self.tokens[self.i]

    def take(self) -> _Token:
        token = self.tokens[self.i]
        self.i += 1
        return token

    def at(self, kind: str, text: str) -> bool:
        token = self.tokens[self.i]
        return token.kind == kind and token.text == text

    def expect_op(self, text: str, why: str) -> _Token:
        if not self.at("op", text):
            raise self.error(self.token, f"expected '{text}' {why}, found {self.token.describe()}")
        return self.take()

    def parse(self) -> Node:
        if self.tokens[0].kind == "end":
            raise self.error(self.tokens[0], "empty expression")
        node = self.logic()
        rest = self.token
        if rest.kind != "end":
            raise self.error(rest, f"unexpected {rest.describe()} after a complete expression")
        return node

    def logic(self) -> Node:
        operands = [self.comparison()]
        operators: list[_Token] = []
        while self.token.kind == "keyword" and self.token.text in _LOGIC:
            operators.append(self.take())
            operands.append(self.comparison())
        node = operands.pop()
        while operators:  # right-associative: a AND (b OR c)
            token = operators.pop()
            node = Binary(token.text, operands.pop(), node, token.pos)
        return node

    def nested(self, token: _Token) -> Node:
        """A whole expression inside ``token`` (a parenthesis, a call, an IN list)."""
        self.nesting += 1
        if self.nesting > MAX_NESTING:
            raise _too_deep(self.text, token.pos)
        node = self.logic()
        self.nesting -= 1
        return node

    def comparison(self) -> Node:
        node = self.additive()
        while self.token.kind == "op" and self.token.text in _COMPARISON:
            op = self.take()
            node = Binary(op.text, node, self.additive(), op.pos)
        return node

    def additive(self) -> Node:
        node = self.multiplicative()
        while self.token.kind == "op" and self.token.text in ("+", "-"):
            op = self.take()
            node = Binary(op.text, node, self.multiplicative(), op.pos)
        return node

    def multiplicative(self) -> Node:
        node = self.postfix()
        while self.token.kind == "op" and self.token.text in ("*", "/", "%"):
            op = self.take()
            node = Binary(op.text, node, self.postfix(), op.pos)
        return node

    def postfix(self) -> Node:
        node = self.unary()
        while True:
            start = self.token
            negated = self.at("keyword", "NOT")
            after = self.tokens[self.i + 1] if negated else start
            if after.kind != "keyword" or after.text not in ("LIKE", "IN"):
                return node
            self.i += 2 if negated else 1
            if after.text == "LIKE":
                pattern = self.take()
                if pattern.kind != "string":
                    raise self.error(pattern, f"LIKE needs a string literal as its pattern, found {pattern.describe()}")
                node = Like(node, pattern.text, negated, start.pos)
            else:
                opening = self.expect_op("(", "after IN (a list of values in parentheses)")
                items = [self.nested(opening)]
                while self.at("op", ","):
                    self.take()
                    items.append(self.nested(opening))
                self.expect_op(")", "to close the IN list")
                node = In(node, tuple(items), negated, start.pos)

    def unary(self) -> Node:
        token = self.token
        if token.kind == "keyword" and token.text == "NOT":
            self.take()
            self.enter(token)
            operand = self.unary()
            self.depth -= 1
            return Unary("NOT", operand, token.pos)
        if token.kind == "op" and token.text in ("-", "+"):
            digits = self.tokens[self.i + 1]
            if digits.kind == "int" and digits.pos == token.end:  # a signed literal: '-5', '+5'
                self.i += 2
                return self.integer(token.text + digits.text, token)
            if token.text == "-":
                self.take()
                self.enter(token)
                operand = self.unary()
                self.depth -= 1
                return Unary("-", operand, token.pos)
        return self.primary()

    def integer(self, text: str, token: _Token) -> Literal:
        # A 32-bit integer has at most 10 digits past its sign and leading zeros; only those go to
        # int(), which refuses over 4,300 digits with a ValueError (not a CESQLParseError).
        digits = text.lstrip("+-").lstrip("0") or "0"
        value = int(digits) * (-1 if text[0] == "-" else 1) if len(digits) <= 10 else None
        if value is None or not INT_MIN <= value <= INT_MAX:
            shown = text if len(text) <= 24 else f"{text[:12]}... ({len(text)} characters)"
            raise self.error(token, f"integer literal {shown} is outside the 32-bit range [{INT_MIN}, {INT_MAX}]")
        return Literal(value, token.pos)

    def primary(self) -> Node:
        token = self.take()
        if token.kind == "int":
            return self.integer(token.text, token)
        if token.kind == "string":
            return Literal(token.text, token.pos)
        if token.kind == "keyword":
            if token.text in ("TRUE", "FALSE"):
                return Literal(token.text == "TRUE", token.pos)
            if token.text == "EXISTS":
                name = self.take()
                if name.kind != "word" or not _ATTRIBUTE_NAME.fullmatch(name.text):
                    raise self.error(name, f"EXISTS needs an attribute name, found {name.describe()}")
                return Exists(name.text.lower(), token.pos)
        if token.kind == "word":
            if self.at("op", "("):
                return self.call(token)
            if not _ATTRIBUTE_NAME.fullmatch(token.text):
                raise self.error(token, f"{token.text!r} is not an attribute name (letters and digits only)")
            return Attribute(token.text.lower(), token.pos)
        if token.kind == "op" and token.text == "(":
            node = self.nested(token)
            if not self.at("op", ")"):
                raise self.error(
                    self.token,
                    f"expected ')' to close the '(' at column {token.pos + 1}, found {self.token.describe()}",
                )
            self.take()
            return node
        raise self.error(token, f"expected an expression, found {token.describe()}")

    def call(self, name: _Token) -> Call:
        if not _FUNCTION_NAME.fullmatch(name.text):
            raise self.error(name, f"{name.text!r} is not a function name (letters and '_', starting with a letter)")
        self.take()  # '('
        args: list[Node] = []
        if not self.at("op", ")"):
            if self.token.kind == "end":
                raise self.error(self.token, f"expected an expression or ')', found {self.token.describe()}")
            args.append(self.nested(name))
            while self.at("op", ","):
                self.take()
                args.append(self.nested(name))
        if not self.at("op", ")"):
            raise self.error(
                self.token, f"expected ',' or ')' in the arguments of {name.text.upper()}, found {self.token.describe()}"
            )
        self.take()
        return Call(name.text.upper(), tuple(args), name.pos)

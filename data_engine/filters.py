"""Strict parsing of `--where` filters: exactly one boolean SQL expression over known columns.

Lance hands a filter to DataFusion's expression parser, which stops after the first complete
expression and silently ignores what follows: `motion_score > 2; anything at all` returned the
rows of `motion_score > 2`, and a snapshot would have stored the whole text. This module parses
the filter itself (the subset of SQL that Lance filters use: AND/OR/NOT, comparisons, BETWEEN,
[NOT] IN, [NOT] LIKE, IS [NOT] NULL/TRUE/FALSE, arithmetic, function calls, CAST, literals) and
rejects anything else with one line naming the bad token or column. Lance still plans the
filter afterwards, so type errors (comparing a string with a number) come from Lance itself.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection
from dataclasses import dataclass

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<comment>--|/\*)
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<string>'(?:[^']|'')*')
  | (?P<quoted>`[^`]+`|"[^"]+")
  | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op><=|>=|<>|!=|==|=|<|>|\+|-|\*|/|%|\(|\)|,|\.|\[|\])
    """,
    re.VERBOSE,
)
_COMPARISONS = {"=", "==", "!=", "<>", "<", "<=", ">", ">="}
# Words that cannot be a bare column name (quote a column with backticks if it is one).
_KEYWORDS = {
    "AND", "OR", "NOT", "BETWEEN", "IN", "IS", "NULL", "TRUE", "FALSE", "LIKE", "ILIKE",
    "ESCAPE", "CAST", "AS", "TIMESTAMP", "DATE", "SELECT", "FROM", "WHERE", "UNION", "LIMIT",
    "ORDER", "GROUP", "BY",
}  # fmt: skip
_TYPED_LITERALS = {"TIMESTAMP", "DATE"}


class FilterError(ValueError):
    """A filter that is not exactly one boolean expression over the table's columns."""


@dataclass(frozen=True)
class _Token:
    kind: str  # "number" | "string" | "quoted" | "word" | "op" | "end"
    text: str
    pos: int  # character offset in the filter, 0-based

    @property
    def upper(self) -> str:
        return self.text.upper() if self.kind == "word" else self.text


def _tokens(where: str) -> list[_Token]:
    out: list[_Token] = []
    pos = 0
    while pos < len(where):
        match = _TOKEN.match(where, pos)
        if match is None:
            raise FilterError(
                f"unexpected {where[pos]!r} at character {pos + 1}: a filter is one boolean "
                "expression (no ';', combine conditions with AND / OR)"
            )
        kind = match.lastgroup or ""
        if kind == "comment":
            raise FilterError(f"comments ({match.group()!r}) are not allowed in a filter")
        if kind != "ws":
            out.append(_Token(kind, match.group(), pos))
        pos = match.end()
    out.append(_Token("end", "", len(where)))
    return out


class _Parser:
    """Recursive descent over the token list; each `_rule` returns whether its value is boolean
    (True), not boolean (False) or unknown until Lance types it (None: columns, functions)."""

    def __init__(self, where: str) -> None:
        self.tokens = _tokens(where)
        self.i = 0
        self.columns: list[_Token] = []

    # -- token helpers ---------------------------------------------------------------------
    @property
    def tok(self) -> _Token:
        return self.tokens[self.i]

    def _at(self, *texts: str) -> bool:
        return self.tok.kind in ("word", "op") and self.tok.upper in texts

    def _take(self, *texts: str) -> bool:
        if self._at(*texts):
            self.i += 1
            return True
        return False

    def _expect(self, text: str, context: str) -> None:
        if not self._take(text):
            raise self._unexpected(f"expected {text!r} {context}")

    def _unexpected(self, why: str) -> FilterError:
        tok = self.tok
        if tok.kind == "end":
            return FilterError(f"the filter ends too early: {why}")
        return FilterError(f"unexpected {tok.text!r} at character {tok.pos + 1}: {why}")

    # -- grammar ---------------------------------------------------------------------------
    def parse(self) -> bool | None:
        if self.tok.kind == "end":
            raise FilterError("the filter is empty")
        value = self._or()
        if self.tok.kind != "end":
            raise self._unexpected(
                "a filter is one boolean expression (combine conditions with AND / OR)"
            )
        return value

    def _or(self) -> bool | None:
        value = self._and()
        while self._take("OR"):
            self._operand(value, "OR")
            self._operand(self._and(), "OR")
            value = True
        return value

    def _and(self) -> bool | None:
        value = self._not()
        while self._take("AND"):
            self._operand(value, "AND")
            self._operand(self._not(), "AND")
            value = True
        return value

    def _not(self) -> bool | None:
        if self._take("NOT"):
            self._operand(self._not(), "NOT")
            return True
        return self._predicate()

    def _operand(self, value: bool | None, op: str) -> None:
        if value is False:
            raise FilterError(f"{op} needs boolean operands (a comparison such as `x > 1`)")

    def _predicate(self) -> bool | None:
        value = self._additive()
        if self.tok.kind == "op" and self.tok.text in _COMPARISONS:
            self.i += 1
            self._additive()
            return True
        negated = self._take("NOT")
        if self._take("BETWEEN"):
            self._additive()
            self._expect("AND", "in BETWEEN low AND high")
            self._additive()
            return True
        if self._take("IN"):
            self._expect("(", "after IN")
            self._list(")")
            return True
        if self._take("LIKE", "ILIKE"):
            self._additive()
            if self._take("ESCAPE"):
                if self.tok.kind != "string":
                    raise self._unexpected("ESCAPE takes a quoted character")
                self.i += 1
            return True
        if negated:
            raise self._unexpected("NOT here must be followed by BETWEEN, IN or LIKE")
        if self._take("IS"):
            self._take("NOT")
            if not self._take("NULL", "TRUE", "FALSE"):
                raise self._unexpected("IS [NOT] takes NULL, TRUE or FALSE")
            return True
        return value

    def _list(self, close: str) -> None:
        if self._take(close):
            raise FilterError("an IN list or function call has no items between the brackets")
        while True:
            self._or()
            if self._take(close):
                return
            self._expect(",", f"or {close!r} in a list")

    def _additive(self) -> bool | None:
        value = self._multiplicative()
        while self._take("+", "-"):
            self._multiplicative()
            value = False
        return value

    def _multiplicative(self) -> bool | None:
        value = self._unary()
        while self._take("*", "/", "%"):
            self._unary()
            value = False
        return value

    def _unary(self) -> bool | None:
        if self._take("-", "+"):
            self._unary()
            return False
        return self._primary()

    def _primary(self) -> bool | None:
        tok = self.tok
        if tok.kind in ("number", "string"):
            self.i += 1
            return False
        if self._take("("):
            value = self._or()
            self._expect(")", "to close '('")
            return value
        if self._take("TRUE", "FALSE"):
            return True
        if self._take("NULL"):
            return None
        if tok.kind == "word" and tok.upper in _TYPED_LITERALS:
            self.i += 1
            if self.tok.kind != "string":
                raise self._unexpected(
                    f"{tok.upper} takes a quoted literal, e.g. {tok.upper} '...'"
                )
            self.i += 1
            return False
        if self._take("CAST"):
            self._expect("(", "after CAST")
            self._or()
            self._expect("AS", "in CAST(value AS type)")
            if self.tok.kind != "word":
                raise self._unexpected("CAST needs a type name")
            self.i += 1
            if self._take("("):  # DECIMAL(10, 2), VARCHAR(8)
                self._list(")")
            self._expect(")", "to close CAST(")
            return None
        if tok.kind == "word" and tok.upper in _KEYWORDS:
            raise self._unexpected("expected a column, a value or '('")
        if tok.kind in ("word", "quoted"):
            self.i += 1
            if tok.kind == "word" and self._at("("):
                self.i += 1
                if not self._take(")"):
                    self._list(")")
                return None
            self.columns.append(tok)
            while self._take("."):  # struct field: meta.source
                if self.tok.kind not in ("word", "quoted"):
                    raise self._unexpected("expected a field name after '.'")
                self.i += 1
            while self._take("["):  # list element: tags[1]
                self._additive()
                self._expect("]", "to close '['")
            return None
        raise self._unexpected("expected a column, a value or '('")


def column_name(tok_text: str) -> str:
    """The column a (possibly backtick- or double-quoted) identifier names."""
    if tok_text[:1] in ("`", '"'):
        return tok_text[1:-1]
    return tok_text


def check_filter(where: str, columns: Collection[str], boolean_columns: Collection[str]) -> None:
    """Raise `FilterError` unless `where` is exactly one boolean expression whose column
    references all name one of `columns` (a top-level bare column must be in
    `boolean_columns`). The message is one line naming the bad token or column."""
    parser = _Parser(where)
    value = parser.parse()
    known = set(columns)
    for tok in parser.columns:
        name = column_name(tok.text)
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise FilterError(f"unknown column {name!r} at character {tok.pos + 1}{hint}")
    if value is False:
        raise FilterError("not a boolean expression (write a condition such as `x > 1`)")
    if value is None and len(parser.tokens) == 2 and parser.columns:
        name = column_name(parser.columns[0].text)
        if name not in set(boolean_columns):
            raise FilterError(f"column {name!r} is not boolean: compare it, e.g. `{name} > 1`")

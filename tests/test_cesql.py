"""CESQL: every case of the official CloudEvents TCK, then the messages a user reads.

The TCK files are read from the shared conformance copy (cloudevents/spec, ``cesql/cesql_tck``).
Each case checks the value *and* the set of error kinds, which is stricter than the
reference SDKs' harnesses (they check only that some error occurred).
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from choreograph.cesql import CESQLParseError, ErrorKind, compile

TCK = Path("/work/shared/conformance/cloudevents-spec/cesql/cesql_tck")

#: "Any valid event" for cases that give only ``eventOverrides``: the required attributes.
BASE_EVENT = {"specversion": "1.0", "id": "tck-id", "source": "/tck/source", "type": "tck.type"}


def _attribute(value: Any) -> Any:
    """YAML reads an unquoted timestamp as a datetime; on an event it is an RFC 3339 string."""
    return value.isoformat() if isinstance(value, datetime.datetime) else value


def _cases() -> list[Any]:
    if not TCK.is_dir():
        return [pytest.param(None, id="tck-missing")]
    cases = []
    for path in sorted(TCK.glob("*.yaml")):
        text = path.read_text()
        # An expression is text even where YAML would read a scalar (`expression: TRUE`, `0`):
        # take names and expressions from the untyped load, values from the typed one.
        raw = yaml.load(text, Loader=yaml.BaseLoader)["tests"]
        for index, case in enumerate(yaml.safe_load(text)["tests"]):
            case.update(name=raw[index]["name"], expression=raw[index]["expression"])
            cases.append(pytest.param(case, id=f"{path.stem}[{index}] {case['name']}"))
    return cases


CASES = _cases()


def test_the_tck_has_all_its_cases() -> None:
    """18 files, 275 cases in the copied commit: a shrinking copy must not pass silently."""
    if not TCK.is_dir():
        pytest.fail(f"CESQL TCK missing at {TCK}") if os.environ.get("CI", "").lower() == "true" else pytest.skip(
            f"CESQL TCK missing at {TCK}"
        )
    assert len(list(TCK.glob("*.yaml"))) == 18
    assert len(CASES) == 275


@pytest.mark.parametrize("case", CASES)
def test_tck(case: dict[str, Any] | None) -> None:
    if case is None:
        message = f"CESQL TCK missing at {TCK}"
        pytest.fail(message) if os.environ.get("CI", "").lower() == "true" else pytest.skip(message)
    expected_error = case.get("error")
    if expected_error == "parse":
        with pytest.raises(CESQLParseError):
            compile(case["expression"])
        return
    event = dict(case["event"]) if "event" in case else dict(BASE_EVENT)
    event.update(case.get("eventOverrides") or {})
    attributes = {name: _attribute(value) for name, value in event.items()}

    value, errors = compile(case["expression"]).evaluate(attributes)

    assert {error.kind for error in errors} == ({ErrorKind(expected_error)} if expected_error else set())
    if "result" in case:
        expected = _attribute(case["result"])
        assert (type(value), value) == (type(expected), expected)


# -- messages a user reads ---------------------------------------------------------------


def test_a_parse_error_names_the_column_and_the_reason_and_points_at_it() -> None:
    with pytest.raises(CESQLParseError) as caught:
        compile("subject = 'a' AND (hops > 2")
    error = caught.value
    assert error.position == len("subject = 'a' AND (hops > 2")
    assert error.reason == "expected ')' to close the '(' at column 19, found the end of the expression"
    assert str(error) == (
        "expected ')' to close the '(' at column 19, found the end of the expression, at column 28\n"
        "    subject = 'a' AND (hops > 2\n"
        "                               ^"
    )


@pytest.mark.parametrize(
    ("expression", "column", "reason"),
    [
        ("", 1, "empty expression"),
        ("x LIKE 123", 8, "LIKE needs a string literal as its pattern, found the integer 123"),
        ("subject = 'eu", 11, "unterminated string literal"),
        ("2147483648 > 1", 1, "integer literal 2147483648 is outside the 32-bit range [-2147483648, 2147483647]"),
        ("my_ext = 1", 1, "'my_ext' is not an attribute name (letters and digits only)"),
        ("EXISTS 'id'", 8, "EXISTS needs an attribute name, found the string 'id'"),
        ("type IN ()", 10, "expected an expression, found ')'"),
        ("id = 1 2", 8, "unexpected the integer 2 after a complete expression"),
        ("id # 1", 4, "unexpected character '#'"),
    ],
)
def test_parse_errors_say_what_was_expected_where(expression: str, column: int, reason: str) -> None:
    with pytest.raises(CESQLParseError) as caught:
        compile(expression)
    assert (caught.value.position + 1, caught.value.reason) == (column, reason)


def test_a_multi_line_expression_reports_line_and_column() -> None:
    with pytest.raises(CESQLParseError, match=r"at line 2, column 5$"):
        compile("id = 'a'\nAND = 3")


def test_strict_compilation_refuses_an_unknown_function_or_arity() -> None:
    assert compile("FOO(1)").evaluate({})[1][0].kind == ErrorKind.MISSING_FUNCTION
    with pytest.raises(CESQLParseError, match=r"^unknown function FOO \(built-ins: ABS, BOOL, "):
        compile("FOO(1)", strict=True)
    with pytest.raises(CESQLParseError, match=r"^SUBSTRING takes 2 or 3 arguments, not 1, at column 6"):
        compile("id = SUBSTRING('x')", strict=True)


def test_evaluation_errors_name_the_kind_the_cause_and_the_column() -> None:
    _, [error] = compile("subject = 'x' AND INT(region) = 3").evaluate({"subject": "x", "region": "eu"})
    assert str(error) == "cast: cannot cast 'eu' to Integer (column 19)"
    _, [missing] = compile("region = 'eu'").evaluate({})
    assert str(missing) == "missingAttribute: the event has no attribute 'region' (column 1)"


# -- semantics the TCK leaves open -------------------------------------------------------


def test_a_filter_passes_only_on_true_without_errors() -> None:
    assert compile("hops < 3").matches({"hops": 2})
    assert not compile("hops").matches({"hops": 2})  # an Integer is not a match
    assert not compile("tier = 'gold' OR true").matches({})  # the missing attribute is an error


def test_and_or_xor_share_one_precedence_and_group_from_the_right() -> None:
    assert compile("FALSE AND FALSE OR TRUE").evaluate({}) == (False, [])  # FALSE AND (FALSE OR TRUE)
    assert compile("(FALSE AND FALSE) OR TRUE").evaluate({}) == (True, [])


def test_unary_operators_bind_tightest() -> None:
    assert compile("NOT FALSE = FALSE").evaluate({}) == (False, [])  # (NOT FALSE) = FALSE
    assert compile("-2 * 3").evaluate({}) == (-6, [])


def test_integer_arithmetic_is_32_bit_truncated_and_clamped() -> None:
    assert compile("-7 / 2").evaluate({}) == (-3, [])
    assert compile("-7 % 2").evaluate({}) == (-1, [])
    value, [error] = compile("2147483647 + 1").evaluate({})
    assert (value, error.kind) == (2147483647, ErrorKind.MATH)


def test_string_to_integer_casts_accept_only_ascii_digits_in_range() -> None:
    for text in ("1_000", " 5", "٣", "2147483648", "0x10"):
        assert compile("INT(x)").evaluate({"x": text})[1][0].kind == ErrorKind.CAST, text
    assert compile("INT(x)").evaluate({"x": "+007"}) == (7, [])


def test_like_patterns_match_across_newlines_and_escape_only_wildcards() -> None:
    assert compile(r"x LIKE 'a%c'").matches({"x": "a\nb\nc"})
    assert compile(r"x LIKE 'a\%'").matches({"x": "a%"})
    assert not compile(r"x LIKE 'a\%'").matches({"x": "ab"})
    assert compile(r"x LIKE 'a\d'").matches({"x": "a\\d"})  # a backslash before other characters is itself


def test_in_with_literal_items_casts_them_to_the_left_type() -> None:
    assert compile("hops IN ('1', '2')").matches({"hops": 2})
    assert compile("source NOT IN ('/a', '/b')").matches({"source": "/c"})


def test_attributes_out_of_the_cesql_types_are_read_as_strings() -> None:
    assert compile("big = '4294967296'").matches({"big": 4294967296})
    assert compile("ratio = '0.5'").matches({"ratio": 0.5})


def test_identifiers_and_keywords_are_case_insensitive_and_the_references_are_known() -> None:
    expression = compile("EXISTS Subject and LOWER(SOURCE) like '/shop%'")
    assert expression.references == frozenset({"subject", "source"})
    assert expression.type == "Boolean"
    assert expression.matches({"subject": "s", "source": "/SHOP/orders"})


def test_a_digit_string_too_long_for_any_integer_is_a_cast_error_not_an_exception() -> None:
    # int() refuses strings over 4,300 digits; an attribute value must never make a filter raise
    # (the worker would fail to settle that event, forever).
    value, errors = compile("INT(subject)").evaluate({"subject": "9" * 5000})
    assert value == 0 and [e.kind for e in errors] == [ErrorKind.CAST]
    assert not compile("subject = 5").matches({"subject": "9" * 5000})
    assert compile("INT(subject) = 1").matches({"subject": "0" * 5000 + "1"})  # leading zeros are fine


def test_a_bare_attribute_filter_matches_the_string_true_as_cesql_casts_it() -> None:
    # Extensions that arrive as HTTP headers are strings: where="urgent" must read "true".
    urgent = compile("urgent")
    assert urgent.matches({"urgent": True})
    assert urgent.matches({"urgent": "true"}) and urgent.matches({"urgent": "TRUE"})
    assert not urgent.matches({"urgent": "false"}) and not urgent.matches({"urgent": "yes"})
    assert not urgent.matches({})


@pytest.mark.parametrize(
    "expression",
    [
        "(" * 1000 + "TRUE" + ")" * 1000,
        "NOT " * 1000 + "TRUE",
        "- " * 1000 + "1 = 1",
        "ABS(" * 1000 + "1" + ")" * 1000 + " = 1",
        " + ".join(["1"] * 1000) + " > 0",
        "x IN (" * 1000 + "1" + ")" * 1000,
    ],
    ids=["parentheses", "not", "minus", "calls", "plus-chain", "in"],
)
def test_an_expression_nested_too_deeply_is_a_parse_error_not_a_recursion_error(expression: str) -> None:
    # A filter from a config file or a subscription is outside input: compile() must refuse it as
    # CESQLParseError (a ValueError, what where= and the push filters turn into a configuration error),
    # never let Python's RecursionError escape from the parser or the compiler.
    with pytest.raises(CESQLParseError, match="nested too deeply"):
        compile(expression)


def test_an_expression_at_the_nesting_limit_compiles_and_evaluates_with_stack_to_spare() -> None:
    import sys

    from choreograph._cesql_parser import MAX_DEPTH, MAX_NESTING

    # each as deep as allowed: MAX_DEPTH levels from the root to the deepest leaf (or parentheses)
    pluses = " + ".join(["x"] * (MAX_DEPTH - 1)) + " > 0"
    parens = "(" * MAX_NESTING + "x = 'b'" + ")" * MAX_NESTING
    calls = "LENGTH(" + "LOWER(" * (MAX_NESTING - 1) + "x" + ")" * (MAX_NESTING - 1) + ") = 1"
    nots = "NOT " * (MAX_DEPTH - 2) + "(x != 'a')"
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(limit - 200)  # the caller may be deep in its own stack
    try:
        for text in (pluses, parens, calls, nots):
            assert compile(text).evaluate({"x": "b"} if text is not pluses else {"x": 1}) == (True, []), text[:40]
            with pytest.raises(CESQLParseError, match="nested too deeply"):
                compile(f"LENGTH({text})" if text in (parens, calls) else f"NOT ({text})")
    finally:
        sys.setrecursionlimit(limit)


def test_a_chain_of_and_or_xor_of_any_length_compiles_to_a_loop_with_the_nested_semantics() -> None:
    # A generated filter may list thousands of alternatives: the chain is one level, not thousands.
    import sys

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(limit - 200)  # the caller may be deep in its own stack
    try:
        ors = compile(" OR ".join(f"subject = 's{i}'" for i in range(5000)))
        assert ors.matches({"subject": "s4999"}) and not ors.matches({"subject": "t"})
        # a AND (b OR (c XOR d)) behind 3,000 levels of "TRUE AND": short-circuits, casts and
        # errors as the nested operators have them (each level reads its right operand on)
        long = "TRUE AND " * 3000

        def run(text: str) -> tuple[object, list[ErrorKind]]:
            value, errors = compile(long + text).evaluate({})
            return value, [error.kind for error in errors]

        assert run("FALSE AND missing OR TRUE") == (False, [])  # AND stops: missing is not read
        assert run("TRUE OR missing AND FALSE") == (True, [])  # OR stops
        assert run("TRUE AND FALSE OR 'yes' XOR TRUE") == (False, [ErrorKind.CAST])
        assert run("10 OR TRUE AND TRUE") == (False, [ErrorKind.CAST])  # true, but an error: the AND above says false
        assert compile("10 OR TRUE AND TRUE").evaluate({})[0] is True  # at the top, the OR's own value
        assert run("TRUE XOR TRUE XOR TRUE") == (True, [])
        assert run("missing XOR TRUE AND TRUE") == (False, [ErrorKind.MISSING_ATTRIBUTE])
        assert run(" XOR ".join(["TRUE"] * 999) + " AND missing") == (False, [ErrorKind.MISSING_ATTRIBUTE])
    finally:
        sys.setrecursionlimit(limit)


def test_in_casts_every_item_so_the_order_of_the_set_does_not_decide() -> None:
    # IN tests membership of a set: casting stopped at the first equal item, so the cast error of
    # an item after it went unrecorded and `ext IN (1, 'high')` matched ext=1 while
    # `ext IN ('high', 1)` did not (complete evaluation: every item is cast, both record it).
    for text in ("ext IN (1, 'high')", "ext IN ('high', 1)"):
        value, errors = compile(text).evaluate({"ext": 1})
        assert (value, [e.kind for e in errors]) == (True, [ErrorKind.CAST]), text
        assert not compile(text).matches({"ext": 1}), text
    assert compile("ext IN (1, '2')").evaluate({"ext": 1}) == (True, [])


def test_like_takes_time_linear_in_the_value_whatever_the_wildcards() -> None:
    # The pattern was one regular expression, '%a%a%a%b' being .*a.*a.*a.*b: on a value that
    # does not match, the backtracking took O(n^4) steps (a 400-character subject took about 1 s,
    # 800 about 16 s), stalling the worker's event loop on one event. Counted in steps of the
    # matcher, not timed: a linear matcher touches each character a bounded number of times.
    from choreograph import cesql

    calls = 0
    real_search = cesql._Segment.search

    def counting(self: Any, value: str, start: int, end: int) -> int:
        nonlocal calls
        calls += 1
        return real_search(self, value, start, end)

    cesql._Segment.search = counting  # type: ignore[method-assign]
    try:
        for pattern in ("%a%a%a%b", "%a_a%_b%", "x%a%a%"):
            expression = compile(f"subject LIKE '{pattern}'")
            calls = 0
            assert not expression.matches({"subject": "a" * 100_000})
            assert calls <= 4, pattern  # one search per segment, not one per backtrack
    finally:
        cesql._Segment.search = real_search  # type: ignore[method-assign]
    # and the same answers as the regular expression (checked against it on 200,000 random pairs)
    for pattern, value, expected in [
        ("%a%b%", "xxaxxbxx", True), ("%a%b%", "xxbxxaxx", False), ("a%a%a", "aa", False), ("a%a%a", "aaa", True),
        ("%ab_d%", "abxabcd", True), ("_%_%_", "ab", False), ("%\\%%%", "50%", True), ("a\\_%_%", "a_", False),
        ("a\\_%_%", "a_bc", True), ("%_%_%", "a", False), ("%bc%bd", "abcbcbd", True), ("%b_b%b", "babab", True),
        ("%b_b%b", "bbbab", True), ("%b_b%b", "bbba", False), ("%\n%_", "a\nb", True), ("%😀%_", "x😀y", True), ("%😀%_", "x😀", False),
    ]:
        assert compile(f"x LIKE '{pattern}'").matches({"x": value}) is expected, (pattern, value)


def test_an_integer_literal_of_thousands_of_digits_is_read_or_refused_as_a_parse_error() -> None:
    # int() refuses over 4,300 digits with a plain ValueError, which escaped from compile() past
    # where='s and the push filters' handling of CESQLParseError.
    assert compile("0" * 5000 + "1 = 1").evaluate({}) == (True, [])  # leading zeros: still 1
    assert compile("-" + "0" * 5000 + "1 = -1").evaluate({}) == (True, [])
    for text in ("9" * 5000 + " = 1", "-" + "9" * 5000 + " = 1"):
        with pytest.raises(CESQLParseError, match=r"outside the 32-bit range"):
            compile(text)

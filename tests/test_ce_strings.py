"""CloudEvents 1.0.2 Strings: what choreograph itself puts in an envelope attribute holds no
control character, surrogate or Unicode noncharacter; each place that makes one refuses such
a value, naming the attribute and why. (Decoding stays lenient: see tests/test_envelope.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from choreograph import Event, Publisher, Service
from choreograph._envelope import Envelope, decode, string_problem
from choreograph.errors import ConfigurationError
from choreograph.gateway import Gateway, Route
from choreograph.journal import Journal
from choreograph.runtime.records import to_message
from choreograph.testing import MemoryTransport


class Noted(Event, type="test.cestrings.noted"):
    note: str = ""


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("a\nb", "a control character (U+000A at index 1)"),
        ("\x00", "a control character (U+0000 at index 0)"),
        ("tab\there", "a control character (U+0009 at index 3)"),
        ("del\x7f", "a control character (U+007F at index 3)"),
        ("c1\x9f", "a control character (U+009F at index 2)"),
        ("\ud800", "a surrogate code point (U+D800 at index 0)"),
        ("x\udfff", "a surrogate code point (U+DFFF at index 1)"),
        ("\ufdd0", "a Unicode noncharacter (U+FDD0 at index 0)"),
        ("\ufdef", "a Unicode noncharacter (U+FDEF at index 0)"),
        ("\ufffe", "a Unicode noncharacter (U+FFFE at index 0)"),
        ("\U0001ffff", "a Unicode noncharacter (U+1FFFF at index 0)"),
        ("\U0010fffe", "a Unicode noncharacter (U+10FFFE at index 0)"),
    ],
)
def test_string_problem_names_the_character_a_cloudevents_string_must_not_hold(value: str, says: str) -> None:
    assert string_problem(value) == f"contains {says}, which a CloudEvents String must not"


@pytest.mark.parametrize("value", ["/orders", "caf\u00e9 \u4e2d \U0001f600", "\xa0\ufdcf\ufdf0\ufffd", "\U0010fffd"])
def test_string_problem_takes_every_other_character(value: str) -> None:
    assert string_problem(value) is None


def test_a_service_source_a_cloudevents_string_cannot_hold_is_refused_at_definition() -> None:
    with pytest.raises(ConfigurationError, match=r"Service 'src': source: '/a\\nb' contains a control character"):
        Service("src", source="/a\nb")
    with pytest.raises(ConfigurationError, match=r"source: .* contains a Unicode noncharacter \(U\+FFFF"):
        Service("src", source="/a\uffff")


def test_an_event_type_a_cloudevents_string_cannot_hold_is_refused_at_definition() -> None:
    with pytest.raises(ConfigurationError, match=r"type 'test.cestrings.bad\\x01' contains a control character"):
        class Bad(Event, type="test.cestrings.bad\x01"):
            pass


def test_a_publisher_source_a_cloudevents_string_cannot_hold_is_refused_when_it_is_made() -> None:
    with pytest.raises(ValueError, match=r"^source: '/p\\x85' contains a control character \(U\+0085"):
        Publisher(MemoryTransport(), source="/p\x85")


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"correlation_id": "order\n42"}, r"^correlation_id: 'order\\n42' contains a control character"),
        ({"subject": "s\ufdd0"}, r"^subject: 's\\ufdd0' contains a Unicode noncharacter \(U\+FDD0"),
        ({"subject": "s\udc00"}, r"^subject: 's\\udc00' contains a surrogate code point \(U\+DC00"),
        ({"ids": ["fine", "id\x1b"]}, r"^id: 'id\\x1b' contains a control character \(U\+001B at index 2\)"),
        ({"correlation_id": ""}, r"^correlation_id: '' is empty; pass None to start a new transaction"),
        ({"subject": ""}, r"^subject: '' is empty; a CloudEvents subject must be non-empty"),
    ],
)
async def test_publisher_arguments_a_cloudevents_string_cannot_hold_are_refused_before_anything_is_published(
    kwargs: dict[str, object], says: str
) -> None:
    bus = MemoryTransport()
    sub = await bus.subscribe("tap", None)
    events = [Noted(), Noted()] if "ids" in kwargs else [Noted()]
    with pytest.raises(ValueError, match=says):
        await Publisher(bus).publish(*events, **kwargs)  # type: ignore[arg-type]
    assert await sub.fetch(10, timeout=0.05) == []
    await bus.close()


async def test_an_empty_correlation_id_or_subject_of_a_transaction_outside_a_handler_is_refused(
    tmp_path: Path,
) -> None:
    """``transaction(correlation_id="")`` put each event in a transaction of its own, and
    ``tx.publish(subject="")`` wrote an empty subject, which a CloudEvents subject must not be."""
    from choreograph import transaction

    svc = Service("noter", database=f"sqlite:///{tmp_path / 'noter.db'}")
    with pytest.raises(ValueError, match=r"^correlation_id: '' is empty"):
        async with transaction(svc, correlation_id=""):
            pass
    with pytest.raises(ValueError, match=r"^subject: '' is empty"):
        async with transaction(svc) as tx:
            tx.publish(Noted(), subject="")


def test_a_gateway_source_a_cloudevents_string_cannot_hold_is_refused_at_construction() -> None:
    with pytest.raises(ConfigurationError, match=r"^Gateway: source: '/gw\\r' contains a control character"):
        Gateway([Route("POST", "/notes", Noted)], broker=MemoryTransport(), source="/gw\r")


def test_a_journal_source_a_cloudevents_string_cannot_hold_is_refused_at_construction() -> None:
    with pytest.raises(ConfigurationError, match=r"^Journal: source: '/j\\x00' contains a control character"):
        Journal("memory://", source="/j\x00")


def test_decoding_still_takes_such_characters_from_other_producers() -> None:
    # The other side of the rule: robustness. Not stricter on decode (unchanged behaviour).
    env = Envelope(id="i\x01", source="/s\ufffe", type="t", subject="a\nb", correlationid="\x7f", data={"n": 1})
    assert decode(to_message(env).body) == env

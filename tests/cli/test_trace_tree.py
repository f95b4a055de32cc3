"""``choreograph trace``'s causation tree, drawn from a timeline without a journal or a terminal."""

from __future__ import annotations

import io

from rich.console import Console

from choreograph._journal_model import JournalEntry, Transaction, TransactionSummary
from choreograph.cli._trace import causation_tree


def transaction(causes: list[tuple[str, str | None]]) -> Transaction:
    """A transaction of events ``(event id, causation id)`` in recording order, one second apart."""
    entries = [
        JournalEntry(event_id=eid, correlation_id="tx", type=f"test.{eid}", source="/s", service="s", kind="event",
                     at=1000.0 + i, recorded_at=1000.0 + i, causation_id=cause)
        for i, (eid, cause) in enumerate(causes)
    ]
    summary = TransactionSummary.first(entries[0], 60.0)
    for entry in entries[1:]:
        summary.fold(entry)
    return Transaction(summary=summary, status="running", timeline=entries)


def drawn(tx: Transaction) -> str:
    out = io.StringIO()
    Console(file=out, width=200, color_system=None).print(causation_tree(tx))
    return out.getvalue()


def depth(tree: object) -> int:
    deepest, level = 0, [tree]
    while level:
        deepest += 1
        level = [child for node in level for child in node.children]  # type: ignore[attr-defined]
    return deepest - 1


def test_a_causation_chain_thousands_of_hops_deep_is_drawn() -> None:
    """A loop of events (each caused by the last, the workers' max_hops raised) 3,000 hops long:
    the tree was built by recursion, one Python frame per hop, and trace ended in a RecursionError."""
    chain = [("e0", None), *((f"e{i}", f"e{i - 1}") for i in range(1, 3000))]
    assert depth(causation_tree(transaction(chain))) == 3000


def test_events_in_a_causation_cycle_are_shown_not_left_out() -> None:
    """Causation ids come from whoever published: two events naming each other as cause were
    nobody's descendant and missing from the tree, whose title still counted them."""
    out = drawn(transaction([("root", None), ("a", "b"), ("b", "a"), ("c", "root")]))
    assert "4 events" in out
    for type_ in ("test.root", "test.a", "test.b", "test.c"):
        assert out.count(type_) == 1, out

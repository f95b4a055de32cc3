"""bench/_stages: the step medians of a hop process's stamps (the bench's own arithmetic)."""

from __future__ import annotations

import json
from pathlib import Path

from bench._stages.sitecustomize import stage_medians


def _write(folder: Path, pid: int, stamps: list[tuple[str, int]]) -> None:
    (folder / f"stages-{pid}.json").write_text(json.dumps(stamps))


def test_medians_per_step_from_the_first_stamp_of_each_event(tmp_path: Path) -> None:
    # two events: 10 us and 30 us from fetch to seen, the seen lookups 5 and 7 us; an empty
    # fetch's stamps never appear (fetch stamps only what it returned)
    _write(tmp_path, 1, [
        ("fetched", 0), ("seen0", 10_000), ("seen1", 15_000), ("pub0", 20_000),
        ("fetched", 100_000), ("seen0", 130_000), ("seen1", 137_000), ("seen0", 140_000), ("pub0", 150_000),
    ])  # fmt: skip
    _write(tmp_path, 2, [("fetched", 0), ("seen0", 1_000), ("seen1", 2_000)])  # the last hop: no publish
    assert stage_medians(str(tmp_path)) == [
        {"fetched->seen0": 20.0, "seen0->seen1": 6.0, "seen1->pub0": 9.0, "fetched->pub0": 35.0}
    ]


def test_nats_events_start_at_the_parser(tmp_path: Path) -> None:
    _write(tmp_path, 1, [("recv", 0), ("fetched", 4_000), ("seen0", 5_000), ("pub0", 9_000)])
    assert stage_medians(str(tmp_path)) == [
        {"recv->fetched": 4.0, "fetched->seen0": 1.0, "seen0->pub0": 4.0, "recv->pub0": 9.0}
    ]

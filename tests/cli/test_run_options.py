"""Options of ``choreograph run`` that reach the worker."""

from __future__ import annotations

import pytest

from tests.runtime.test_gc_tuning import ENV, _run_worker


def test_choreograph_run_passes_ack_delay_to_the_worker_from_the_option_or_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert "ack delay 0.25 s" in (log := _run_worker("--ack-delay", "0.25")), log
    assert "ack delay 0.005 s" in (log := _run_worker()), log
    monkeypatch.setitem(ENV, "CHOREOGRAPH_ACK_DELAY", "0")  # the environment of the worker process
    assert "ack delay 0 s" in (log := _run_worker()), log


def test_the_metrics_address_puts_an_ipv6_host_in_brackets_as_a_url_needs() -> None:
    from choreograph.cli._common import address  # shared with the gateway's and dev's lines

    assert address("::1", 9464) == "[::1]:9464"
    assert address("fe80::1%eth0", 9464) == "[fe80::1%25eth0]:9464"  # RFC 6874: the zone's % escaped
    assert address("127.0.0.1", 9464) == "127.0.0.1:9464"
    assert address("metrics.internal", 9464) == "metrics.internal:9464"

"""The embedded broker of `make run` (Tansu, memory storage) keeps working: the smoke set beside the
broker-facing suites, which run on Apache Kafka.  The end-to-end path and a SIGKILL recovery run here
unchanged; `gpusentry up` (tests/test_streams_up.py) starts this broker itself."""

from __future__ import annotations

import pytest

from tests import test_streams_recovery, test_streams_worker

pytestmark = [pytest.mark.broker, pytest.mark.tansu]


def test_end_to_end_on_the_embedded_broker(embedded_broker, tmp_path):
    test_streams_worker.test_agent_to_alerts_end_to_end_with_dead_letters_and_suppression(
        embedded_broker.bootstrap_servers, tmp_path)


@pytest.mark.slow
def test_sigkill_recovery_on_the_embedded_broker(embedded_broker):
    test_streams_recovery.test_sigkill_and_restart_loses_no_alert_and_doubles_none(embedded_broker.bootstrap_servers,
                                                                                   exact_high_watermark=False)

"""Which status code each failure of a ``Generate`` leaves as."""

import grpc
import pytest

from cache_service.page_pool import PoolExhausted
from cache_service.types import TooManySequences
from worker.scheduler import DeadlineExceeded, QueueFull, SchedulerStopped
from worker.serving.errors import Draining, TooBusy, status_of

S = grpc.StatusCode


@pytest.mark.parametrize(
    ("err", "code"),
    [
        (QueueFull("full"), S.RESOURCE_EXHAUSTED),
        (PoolExhausted("no pages"), S.RESOURCE_EXHAUSTED),
        (TooManySequences("many"), S.RESOURCE_EXHAUSTED),
        (TooBusy(3), S.RESOURCE_EXHAUSTED),
        (DeadlineExceeded("late"), S.DEADLINE_EXCEEDED),
        (SchedulerStopped("stopped"), S.UNAVAILABLE),
        (ConnectionError("down"), S.UNAVAILABLE),
        (Draining(), S.UNAVAILABLE),
        (PermissionError("token"), S.UNAVAILABLE),
        (ValueError("bad"), S.INVALID_ARGUMENT),
        (RuntimeError("bug"), S.INTERNAL),
        (KeyError("bug"), S.INTERNAL),
    ],
)
def test_each_failure_has_one_status_code(err, code):
    assert status_of(err) == code


def test_refusals_say_what_to_do():
    assert "retry later with backoff, or add workers" in str(TooBusy(48))
    assert "its --max-requests" in str(TooBusy(48))
    assert "send the request to another worker" in str(Draining())

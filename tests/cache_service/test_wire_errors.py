"""Domain exceptions leave as a status code and come back as the same exception."""

import grpc
import pytest

from cache_service import wire_errors
from cache_service.page_pool import PoolExhausted
from cache_service.types import (
    OutOfOrder,
    SequenceExists,
    SequenceFailed,
    TooManySequences,
    TooManyStreams,
    UnknownSequence,
)

S = grpc.StatusCode


@pytest.mark.parametrize(
    ("err", "code"),
    [
        (SequenceExists("seq-1 exists"), S.ALREADY_EXISTS),
        (OutOfOrder("positions must continue at 16"), S.FAILED_PRECONDITION),
        (SequenceFailed("re-prefill"), S.FAILED_PRECONDITION),
        (ValueError("bad shape"), S.INVALID_ARGUMENT),
        (PoolExhausted("no free pages"), S.RESOURCE_EXHAUSTED),
        (TooManySequences("limit 4"), S.RESOURCE_EXHAUSTED),
        (TooManyStreams("limit 2"), S.RESOURCE_EXHAUSTED),
    ],
)
def test_a_domain_error_comes_back_as_itself(err, code):
    assert wire_errors.error_status(err) == code
    meta = {wire_errors.ERROR_KEY: wire_errors.error_name(err)}
    back = wire_errors.error_from_parts(code, str(err), meta, "cache:1")
    assert (type(back), str(back)) == (type(err), str(err))


def test_an_unknown_sequence_is_not_found_and_names_it():
    err = UnknownSequence("seq-7")
    assert wire_errors.error_status(err) == S.NOT_FOUND
    meta = {wire_errors.SEQ_ID_KEY: "seq-7"}
    back = wire_errors.error_from_parts(S.NOT_FOUND, str(err), meta, "cache:1")
    assert isinstance(back, UnknownSequence) and back.args == ("seq-7",)


@pytest.mark.parametrize(
    ("code", "kind", "says"),
    [
        (S.UNAUTHENTICATED, PermissionError, "ICECACHE_AUTH_TOKEN"),
        (S.UNAVAILABLE, ConnectionError, "check that it is running"),
        (S.DEADLINE_EXCEEDED, ConnectionError, "did not answer (DEADLINE_EXCEEDED"),
        (S.CANCELLED, ConnectionError, "did not answer (CANCELLED"),
        (S.INVALID_ARGUMENT, ValueError, "details"),
        (S.RESOURCE_EXHAUSTED, PoolExhausted, "details"),
        (S.INTERNAL, RuntimeError, "cache service at cache:1 failed (INTERNAL): details"),
    ],
)
def test_a_status_without_a_domain_name_maps_by_code(code, kind, says):
    back = wire_errors.error_from_parts(code, "details", {}, "cache:1")
    assert type(back) is kind and says in str(back)


def test_an_unexpected_error_is_internal_and_unnamed():
    assert wire_errors.error_status(KeyError("x")) == S.INTERNAL
    assert wire_errors.error_name(KeyError("x")) == ""

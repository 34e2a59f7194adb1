"""Conversions to the wire that hand-roll what protobuf helpers do."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given
from hypothesis import strategies as st

from hitl_service.api.convert import from_timestamp, timestamp

ZONES = st.sampled_from(
    [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8))]
)


@given(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)), ZONES)
def test_timestamp_matches_protobufs_own_conversion(naive: datetime, zone: timezone) -> None:
    value = naive.replace(tzinfo=zone)
    expected = Timestamp()
    expected.FromDatetime(value.astimezone(UTC))
    got = timestamp(value)
    assert got == expected
    assert got is not None
    assert from_timestamp(got) == value


def test_a_naive_datetime_is_local_time_as_protobuf_reads_it() -> None:
    value = datetime(2026, 11, 27, 12, 30, 15, 123456)
    expected = Timestamp()
    expected.FromDatetime(value.astimezone(UTC))
    assert timestamp(value) == expected


def test_none_stays_none() -> None:
    assert timestamp(None) is None

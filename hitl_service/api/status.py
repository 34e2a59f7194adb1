"""Domain errors → gRPC status with ``google.rpc`` rich details."""

from __future__ import annotations

from collections.abc import Callable

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from hitl_service.errors import Code, HitlError

DOMAIN = "hitl.v1"

_CODES = {
    Code.INVALID_ARGUMENT: code_pb2.INVALID_ARGUMENT,
    Code.NOT_FOUND: code_pb2.NOT_FOUND,
    Code.FAILED_PRECONDITION: code_pb2.FAILED_PRECONDITION,
    Code.UNAVAILABLE: code_pb2.UNAVAILABLE,
    Code.UNAUTHENTICATED: code_pb2.UNAUTHENTICATED,
    Code.INTERNAL: code_pb2.INTERNAL,
}


# UTF-8 bytes of a status message. It goes out twice, percent-encoded in
# ``grpc-message`` (non-ASCII: 3 bytes each) and in the status details
# (base64), and gRPC clients refuse trailers over 8 KiB: they would get
# RESOURCE_EXHAUSTED without the reason. A provider's error text, which
# messages quote, has no bound of its own.
_MESSAGE_BYTES = 1024


_METADATA_BYTES = 256  # an ErrorInfo value: ids, a setting's name; a provider may pass more


def _bounded(message: str, limit: int = _MESSAGE_BYTES) -> str:
    data = message.encode()
    if len(data) <= limit:
        return message
    return data[:limit].decode(errors="ignore") + " … (cut)"


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]  # every google.rpc detail is a Message
    return packed


def unchanged(text: str) -> str:
    """No scrubbing: ``to_status``'s default."""
    return text


def to_status(error: HitlError, scrub: Callable[[str], str] = unchanged) -> grpc.Status:
    """A ``grpc.Status`` carrying ErrorInfo and, for bad input, BadRequest.

    ``scrub`` masks secrets in the texts (before they are cut short, so no
    piece of one is left): a provider's error, which messages quote, may
    carry what it was sent.
    """
    details = [
        _pack(
            error_details_pb2.ErrorInfo(
                reason=error.reason,
                domain=DOMAIN,
                metadata={
                    k: _bounded(scrub(v), _METADATA_BYTES) for k, v in error.metadata.items()
                },
            )
        )
    ]
    if error.violations:
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=v.field, description=scrub(v.description)
                        )
                        for v in error.violations
                    ]
                )
            )
        )
    status = status_pb2.Status(
        code=_CODES[error.code], message=_bounded(scrub(error.message)), details=details
    )
    return rpc_status.to_status(status)


def internal_error(error_id: str) -> grpc.Status:
    """The status for our own bugs: no traceback, an id to find the log line."""
    return to_status(
        HitlError(
            Code.INTERNAL,
            "INTERNAL_ERROR",
            f"internal error; quote error_id {error_id} when reporting it",
            metadata={"error_id": error_id},
        )
    )

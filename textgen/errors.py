"""Domain errors. Each carries the gRPC status it maps to, by name, so this module needs no grpc import;
the service maps ``status`` to ``grpc.StatusCode`` in one place and the CLI prints the message on one line.
``HTTP_STATUS`` maps the same names to the HTTP API's status codes (service/http_api.py)."""

from __future__ import annotations

# A domain status (gRPC's name) as an HTTP status code: the one table the HTTP API answers by. CANCELLED is
# nginx's 499 (client closed request): never seen by that client, but logged and counted.
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "NOT_FOUND": 404,
    "FAILED_PRECONDITION": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}


class TextgenError(Exception):
    """Base of every error textgen raises on purpose; anything else is a bug."""

    status = "INTERNAL"
    reason = "internal"


class InvalidInputError(TextgenError):
    """The caller's input (a file, a flag, a request field) is wrong."""

    status = "INVALID_ARGUMENT"
    reason = "validation"


class NotFoundError(TextgenError):
    """A named thing (file, checkpoint, model, session) does not exist."""

    status = "NOT_FOUND"
    reason = "not_found"


class DataError(InvalidInputError):
    """A corpus cannot be used: missing, empty, too small, or not UTF-8."""


class ConfigError(InvalidInputError):
    """A configuration value is out of range or contradicts another one."""


class CheckpointError(InvalidInputError):
    """A checkpoint is unreadable, of an unknown format, or does not match what was asked for."""


class BundleError(InvalidInputError):
    """A model bundle is incomplete, corrupted, of an unknown format, or inconsistent with its manifest."""


class FailedPreconditionError(TextgenError):
    """The request is valid but the thing it names is not in a state to take it (a session already generating)."""

    status = "FAILED_PRECONDITION"
    reason = "validation"


class OverloadedError(TextgenError):
    """A bounded resource is full (the request queue, the session table): retry later or elsewhere."""

    status = "RESOURCE_EXHAUSTED"
    reason = "overloaded"


class UnavailableError(TextgenError):
    """The server is draining for shutdown and takes no new work."""

    status = "UNAVAILABLE"
    reason = "unavailable"


class DeadlineExceededError(TextgenError):
    """The caller's deadline passed before the work finished."""

    status = "DEADLINE_EXCEEDED"
    reason = "deadline"


class CancelledError(TextgenError):
    """The caller went away (cancelled or disconnected) or the server cancelled the work while shutting down."""

    status = "CANCELLED"
    reason = "cancelled"


class SlowReaderError(CancelledError):
    """A stream's client read nothing for longer than the server allows: the call is ended to free what it holds."""

    reason = "slow_reader"

"""Domain errors. Each carries the gRPC status it maps to, by name, so this module needs no grpc import;
the service maps ``status`` to ``grpc.StatusCode`` in one place and the CLI prints the message on one line."""

from __future__ import annotations


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

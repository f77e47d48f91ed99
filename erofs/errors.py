"""One exception hierarchy for the project's libraries; each also subclasses the matching builtin.

The CLIs print ``str(error)`` as one line and exit non-zero (see :mod:`erofs.cli`).
"""

from __future__ import annotations


class NydusErofsError(Exception):
    """Base of every error the project reports to users."""

    exit_code = 1


class SourceError(NydusErofsError, ValueError):
    """The input to a build (directory, tar, OCI layout) is unusable."""

    exit_code = 2


class ImageError(NydusErofsError, ValueError):
    """A bootstrap or blob is malformed or fails verification."""

    exit_code = 3


class UnsupportedImageError(ImageError):
    """A well-formed image of a kind this project does not read (compressed EROFS): unusable input, not damage."""

    exit_code = 2


class DigestMismatchError(ImageError):
    """A chunk's data does not match its recorded digest."""


class BackendError(NydusErofsError, OSError):
    """A blob could not be fetched from its backend."""

    exit_code = 4


class UsageError(NydusErofsError, ValueError):
    """Bad options or environment (e.g. unsupported filesystem for a cache dir)."""

    exit_code = 2

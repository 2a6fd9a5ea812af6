"""One error taxonomy for all of pynydus.

Each class names who is at fault and maps one-to-one to a gRPC status code at the
snapshotter's service edge (containerd turns those codes back into its errdefs),
to an errno inside FUSE handlers and to an exit code in the CLIs. Messages say
what failed and with what, e.g. ``prepare snapshot "k1": parent "p0" not found``.
"""

from __future__ import annotations

import errno as _errno
import json


class NydusError(Exception):
    """Base of every error pynydus raises on purpose."""

    # Name of the grpc.StatusCode member (a string, so that importing errors does not
    # import grpc: the FUSE daemon never needs it).
    grpc_code: str = "UNKNOWN"
    errno: int = _errno.EIO
    exit_code: int = 1


class NotFound(NydusError):
    """The named object (snapshot, parent, blob, file) does not exist."""

    grpc_code = "NOT_FOUND"
    errno = _errno.ENOENT


class AlreadyExists(NydusError):
    """An object with that key or name exists already."""

    grpc_code = "ALREADY_EXISTS"
    errno = _errno.EEXIST


class FailedPrecondition(NydusError):
    """The object is in a state that does not allow the operation."""

    grpc_code = "FAILED_PRECONDITION"
    errno = _errno.EBUSY


class InvalidArgument(NydusError):
    """The caller passed something malformed: a filter, a label, a config value."""

    grpc_code = "INVALID_ARGUMENT"
    errno = _errno.EINVAL
    exit_code = 2


class Unavailable(NydusError):
    """A dependency (daemon, registry) cannot be reached right now; retrying may help."""

    grpc_code = "UNAVAILABLE"
    errno = _errno.EIO


class PermissionDenied(NydusError):
    """Credentials were refused (a registry's 401/403 after authenticating)."""

    grpc_code = "PERMISSION_DENIED"
    errno = _errno.EACCES
    exit_code = 3


class NotImplementedFeature(NydusError):
    """A recognised feature that this build does not implement."""

    grpc_code = "UNIMPLEMENTED"
    errno = _errno.ENOSYS


class ConfigError(InvalidArgument):
    """A configuration file or flag is wrong; the message names the key."""


class FormatError(NydusError):
    """Malformed on-disk or on-wire data (bootstrap, blob, manifest, layer).

    The data is at fault, not the caller: gRPC DATA_LOSS ("unrecoverable data loss or
    corruption"), which containerd's errdefs reads as ErrDataLoss (errdefs v0.3+) or
    ErrUnknown (containerd 1.6), never as the caller's invalid argument. EIO in FUSE.
    The message names the field and the byte offset where the problem was found.
    """

    grpc_code = "DATA_LOSS"
    errno = _errno.EIO
    exit_code = 2  # for a CLI the data is its input (a file or image it was pointed at)


class HostCheckError(FailedPrecondition):
    """The host lacks something pynydus needs (d_type, overlayfs, /dev/fuse)."""


def q(value: str) -> str:
    """Quote a name for an error message the way containerd's Go code does (%q)."""
    return json.dumps(value, ensure_ascii=False)

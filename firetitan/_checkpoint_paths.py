"""Names and checkpoint paths: the one grammar that the client and the local trainer share.

A *name* (checkpoint, snapshot or job id) is one path segment: letters, digits, ``-``,
``_`` and ``.``, starting with a letter or digit, at most 128 characters, never ``..``.
That admits every name the documentation uses (``step-4``, ``train_state_step_100``,
``step-100-a1b2c3d4``) and refuses anything that could leave the checkpoint root:
separators, ``..``, NUL, absolute paths, drive letters, URL schemes.

A *checkpoint path*, as `load_state` takes it, is either a bare name (this job's
checkpoint) or ``cross_job://<job_id>/<name>`` (another job's checkpoint under the same
checkpoint root). The peers' forms of the latter are accepted too and mean the same:
tinker's ``tinker://<job_id>/weights/<name>`` (or ``sampler_weights``) and Fireworks'
``<account>/<job_id>/<name>`` (e.g. ``acme/run-1a2b/step-4``).
"""

from __future__ import annotations

import re

import attrs

__all__ = [
    "CROSS_JOB_SCHEME",
    "CheckpointRef",
    "cross_job_path",
    "parse_checkpoint_path",
    "validate_name",
]

CROSS_JOB_SCHEME = "cross_job://"
TINKER_SCHEME = "tinker://"
_TINKER_SEGMENTS = ("weights", "sampler_weights")
MAX_NAME_LENGTH = 128
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def validate_name(name: object, what: str = "checkpoint name") -> str:
    """Check that ``name`` is a single safe path segment and return it.

    Args:
        name: The candidate name.
        what: What the name is, for the error message (``"job id"``, ...).

    Returns:
        The name, unchanged.

    Raises:
        ValueError: The name is not a string, is empty or too long, or holds a
            separator, ``..``, NUL or any other character outside the grammar.
    """
    if not isinstance(name, str):
        raise ValueError(f"{what} must be a string, got {type(name).__name__}")
    if not name:
        raise ValueError(f"{what} must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"{what} is {len(name)} characters long; the limit is {MAX_NAME_LENGTH}")
    if ".." in name or not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"{what} {name!r} is not allowed: use letters, digits, '-', '_' and '.', "
            "starting with a letter or digit, with no path separators and no '..'"
        )
    return name


@attrs.frozen
class CheckpointRef:
    """A parsed checkpoint path.

    Attributes:
        name: The checkpoint name.
        job_id: The job that owns it, or None for the current job.
    """

    name: str
    job_id: str | None = None

    def __str__(self) -> str:
        return self.name if self.job_id is None else cross_job_path(self.job_id, self.name)


def cross_job_path(job_id: str, name: str) -> str:
    """Build ``cross_job://<job_id>/<name>`` after validating both parts.

    Raises:
        ValueError: Either part is not a valid name.
    """
    return f"{CROSS_JOB_SCHEME}{validate_name(job_id, 'job id')}/{validate_name(name)}"


def parse_checkpoint_path(path: object) -> CheckpointRef:
    """Parse a checkpoint path as `load_state` takes it.

    Args:
        path: A bare checkpoint name, ``cross_job://<job_id>/<name>``,
            ``tinker://<job_id>/<weights|sampler_weights>/<name>`` or
            ``<account>/<job_id>/<name>``.

    Returns:
        The parsed reference.

    Raises:
        ValueError: The path has another form or an invalid part; the message says which.
    """
    if not isinstance(path, str):
        raise ValueError(f"checkpoint path must be a string, got {type(path).__name__}")
    path = path.strip()
    if path.startswith(CROSS_JOB_SCHEME):
        rest = path[len(CROSS_JOB_SCHEME) :]
        job_id, sep, name = rest.partition("/")
        if not sep:
            raise ValueError(f"checkpoint path {path!r} must look like cross_job://<job_id>/<name>")
        return CheckpointRef(name=validate_name(name), job_id=validate_name(job_id, "job id"))
    if path.startswith(TINKER_SCHEME):
        parts = path[len(TINKER_SCHEME) :].split("/")
        if len(parts) != 3 or parts[1] not in _TINKER_SEGMENTS:
            raise ValueError(
                f"checkpoint path {path!r} must look like tinker://<job_id>/weights/<name>"
            )
        return CheckpointRef(name=validate_name(parts[2]), job_id=validate_name(parts[0], "job id"))
    if "://" in path:
        raise ValueError(
            f"checkpoint path {path!r} has an unsupported scheme; use a bare name, "
            "cross_job://<job_id>/<name>, tinker://<job_id>/weights/<name> or "
            "<account>/<job_id>/<name>"
        )
    if path.count("/") == 2:  # Fireworks: <account>/<job_id>/<checkpoint>
        account, job_id, name = path.split("/")
        validate_name(account, "account")
        return CheckpointRef(name=validate_name(name), job_id=validate_name(job_id, "job id"))
    return CheckpointRef(name=validate_name(path))

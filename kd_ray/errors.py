"""Errors that mean "the input or config is wrong", as opposed to bugs."""

from __future__ import annotations


class KdRayUserError(ValueError):
    """Bad input: the message names the file, row or field and what is allowed."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # Ray appends retry advice to str(); the user needs only this
        return self.message

    def __reduce__(self):
        return (type(self), (self.message,))


class CorpusError(KdRayUserError):
    """A corpus file or row that cannot be labeled."""


class ModelError(KdRayUserError):
    """A teacher or student model that cannot be loaded or used."""


class SoftLabelError(KdRayUserError):
    """A soft-label folder whose schema, metadata or values do not match what is asked."""


def unwrap_user_error(exc: BaseException) -> KdRayUserError | None:
    """Find the KdRayUserError behind an exception, through Ray's task-error wrappers."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException):  # RayTaskError(CorpusError) is a CorpusError too; .cause is the original
            exc = cause
            continue
        if isinstance(exc, KdRayUserError):
            return exc
        for failure in (getattr(exc, "worker_failures", None) or {}).values():  # Ray Train's WorkerGroupError
            found = unwrap_user_error(failure)
            if found is not None:
                return found
        exc = exc.__cause__ or exc.__context__
    return None

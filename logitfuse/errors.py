"""Every exception type of logitfuse, in one module that every layer may import (it imports nothing).

Each names what the HTTP service turns it into: InvalidRequest a 400 naming `param`, UnknownName a 404,
Overloaded a 429, Unavailable (and its kinds) a 503. MissingExtra says which optional extra to install.
"""

from __future__ import annotations


class InvalidRequest(ValueError):
    """Bad input from a client: becomes a 400 naming `param`."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class UnknownName(LookupError):
    """A model, ensemble, expert or reward name that the registry does not know: becomes a 404."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class Overloaded(RuntimeError):
    """The queue of waiting sequences is full: becomes a 429 with Retry-After."""


class Unavailable(RuntimeError):
    """A model that cannot serve now (a remote endpoint down, or refusing what serving needs): becomes a 503."""


class ModelUnavailable(Unavailable):
    """A model that failed to load: a 503 naming the model and the file, until its files change."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RemoteError(Unavailable):
    """The remote endpoint failed or answered something this backend cannot use (status: its HTTP status,
    None when it could not be reached or answered no HTTP error)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class AdapterError(InvalidRequest):
    """An adapter that cannot serve (missing, corrupt, or not fitting its untuned model): a 400 naming it."""

    def __init__(self, expert: str, message: str) -> None:
        super().__init__(f"expert {expert!r}: {message}", "model")
        self.expert = expert


class VocabMismatchError(ValueError):
    """Two models of one ensemble do not share their token ids."""


class JobMismatch(ValueError):
    """The output file belongs to another job (or to none that this command knows)."""


class MissingExtra(ImportError):
    """An optional package that a feature needs is not installed: names the extra that brings it."""

    def __init__(self, package: str, extra: str, feature: str) -> None:
        super().__init__(f"{feature} needs the optional package {package!r}, which is not installed: "
                         f"pip install 'logitfuse[{extra}]'", name=package)
        self.extra = extra


def require(extra: str, feature: str, *packages: str) -> None:
    """Raise MissingExtra unless every package is importable (a feature of an extra checks before it imports)."""
    import importlib.util

    for package in packages:
        if importlib.util.find_spec(package) is None:
            raise MissingExtra(package, extra, feature)

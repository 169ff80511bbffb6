"""Client-side exceptions; every broker error carries its wire ErrorCode."""

from __future__ import annotations

from rustmq.protocol.api import ErrorCode


class ClientError(Exception):
    """Base class of the client's exceptions."""


class BrokerError(ClientError):
    """The broker answered a request with an error code."""

    def __init__(self, code: ErrorCode | int, message: str) -> None:
        try:
            self.code: ErrorCode | int = ErrorCode(code)
            name = self.code.name
        except ValueError:
            self.code, name = code, str(code)
        super().__init__(f"{name}: {message}")
        self.message = message


class ConnectionClosedError(ClientError):
    """The connection closed while requests were waiting for their responses."""


class ProduceError(ClientError):
    """One or more batches could not be delivered; ``errors`` holds the causes."""

    def __init__(self, errors: list[BaseException]) -> None:
        super().__init__(f"{len(errors)} batch(es) failed; first: {errors[0]}")
        self.errors = errors

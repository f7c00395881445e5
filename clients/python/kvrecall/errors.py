"""The client's typed error: a server's error answer (HTTP or a stream frame's)."""

from __future__ import annotations

from typing import Any

__all__ = ["KvrecallError", "STATUS_OF_CODE"]


class KvrecallError(Exception):
    """An error answer from the server: HTTP status, error code and message.

    Codes (DESIGN.md): malformed (400), unauthorized (401), not_found (404),
    conflict (409), precondition_failed (412: a delete naming another
    createdAt), too_large (413), invalid (422), over_budget (503),
    unavailable (503: the server's document store cannot be reached).
    """

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message

    @classmethod
    def from_wire(cls, error: Any) -> "KvrecallError":
        """From an `{code, message}` error object (a batch step's, a stream
        frame's): the status is the one the HTTP route answers with."""
        e = error if isinstance(error, dict) else {}
        code = str(e.get("code", "unknown"))
        return cls(STATUS_OF_CODE.get(code, 500), code, str(e.get("message", "")))


STATUS_OF_CODE = {
    "malformed": 400,
    "unauthorized": 401,
    "not_found": 404,
    "conflict": 409,
    "too_large": 413,
    "invalid": 422,
    "over_budget": 503,
    "unavailable": 503,
}

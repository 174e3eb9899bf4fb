"""ApiError: a request the server refuses or could not finish, answered as an OpenAI-style error object."""

from __future__ import annotations

from ..errors import MTPRuntimeError

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}
"""The error `type` of each status (the names of the exceptions the openai client raises for them)."""


class ApiError(MTPRuntimeError):
    """One refused or failed request: an HTTP status and the one-line message naming the problem and the fix."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    @property
    def type(self) -> str:
        return ERROR_TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")

    def body(self) -> dict:
        """{"error": {"message", "type", "param", "code"}}, as OpenAI's API answers."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

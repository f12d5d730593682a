"""One reading of what went wrong in an AWS call, for every module that makes one.

botocore reports a service's answer as an exception carrying the parsed response
(`Error.Code`, `Error.Message`, the HTTP status); a transport failure is an exception
of botocore, aiobotocore or aiohttp, or an OSError. Only the code, the service's message
and the type are ever logged: other exception texts can quote what was sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_TRANSPORT_MODULES = ("botocore", "aiobotocore", "aiohttp")


@dataclass(frozen=True)
class AwsError:
    code: str | None  # the service's error code ("NoSuchKey"); None when it did not answer
    message: str  # the service's message, "" when none
    status: int | None  # the HTTP status of the answer
    response: dict[str, Any]  # the parsed answer (a DynamoDB condition returns the item here)
    type_name: str  # the exception's type

    @property
    def name(self) -> str:
        """What to log: the code, else the exception's type (never its text)."""
        return self.code or self.type_name

    def describe(self, limit: int = 300) -> str:
        """The code and message, or the exception type: safe for logs and record errors."""
        if self.code:
            message = self.message[:limit]
            return f"{self.code}: {message}" if message else self.code
        return self.type_name


def aws_error(exc: BaseException) -> AwsError:
    response = getattr(exc, "response", None)
    response = response if isinstance(response, dict) else {}
    error = response.get("Error")
    error = error if isinstance(error, dict) else {}
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = error.get("Code")
    return AwsError(
        code=str(code) if code else None,
        message=str(error.get("Message") or ""),
        status=status if isinstance(status, int) else None,
        response=response,
        type_name=type(exc).__name__,
    )


def is_aws_failure(exc: BaseException) -> bool:
    """An answer or a transport failure of an AWS call, as opposed to a bug."""
    return (
        isinstance(getattr(exc, "response", None), dict)
        or isinstance(exc, OSError | TimeoutError)
        or type(exc).__module__.startswith(_TRANSPORT_MODULES)
    )

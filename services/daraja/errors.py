"""The one error type of the Daraja client, classified by what the caller should do next."""
from __future__ import annotations

import enum


class ErrorKind(enum.Enum):
    # Daraja did not act on the request: back off and send it again.
    RETRYABLE = "retryable"
    # Sending it again unchanged will fail again: fix the input or the credentials.
    PERMANENT = "permanent"
    # The request may have reached Daraja and been acted on. For a push this means a prompt may
    # be on the phone: reconcile (query, callback), never push again blindly (docs/design.md).
    OUTCOME_UNKNOWN = "outcome_unknown"


# Daraja codes meaning "this bearer token is not (or no longer) valid" (docs/daraja.md §2 table).
INVALID_TOKEN_CODES = frozenset({"404.001.03", "400.003.01"})


class DarajaError(Exception):
    """A Daraja call that produced no usable answer.

    The message is built only from the operation, the classification, Daraja's error code and
    its (redacted, shortened) message: never from credentials, tokens, payloads or URLs.
    """

    def __init__(self, kind: ErrorKind, operation: str, reason: str, *, error_code: str | None = None,
                 http_status: int | None = None, request_id: str | None = None,
                 retry_after_s: float | None = None):
        self.kind = kind
        self.operation = operation
        self.reason = reason
        self.error_code = error_code
        self.http_status = http_status
        self.request_id = request_id
        self.retry_after_s = retry_after_s
        super().__init__(self._text())

    def _text(self) -> str:
        code = f" {self.error_code}" if self.error_code else ""
        status = f" (HTTP {self.http_status})" if self.http_status is not None else ""
        return f"daraja {self.operation} {self.kind.value}{code}: {self.reason}{status}"

    @property
    def is_invalid_token(self) -> bool:
        return self.error_code in INVALID_TOKEN_CODES

    def copy(self, reason: str | None = None) -> DarajaError:
        return DarajaError(self.kind, self.operation, self.reason if reason is None else reason,
                           error_code=self.error_code, http_status=self.http_status,
                           request_id=self.request_id, retry_after_s=self.retry_after_s)

    def redacted(self, secrets: tuple[str, ...]) -> DarajaError:
        """The same error with every occurrence of the given secrets masked in its reason.

        Daraja has been seen echoing the bearer token inside errorMessage
        ("Error Occurred - Invalid Access Token - <token>").
        """
        reason = shorten(redact(self.reason, secrets))  # mask first: a cut could split a secret
        return self if reason == self.reason else self.copy(reason)


REASON_SHOWN_CHARS_MAX = 160


def shorten(text: str) -> str:
    return text if len(text) <= REASON_SHOWN_CHARS_MAX else text[:REASON_SHOWN_CHARS_MAX] + "…"


def redact(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        if secret and len(secret) >= 4 and secret in text:
            text = text.replace(secret, "****")
    return text

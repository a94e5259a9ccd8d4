"""A small client of a schema registry's Confluent-compatible REST API (Confluent Schema Registry, or
Apicurio's /apis/ccompat/v7): the four calls the codec needs, each bounded in time and size.

Why not confluent-kafka's own SchemaRegistryClient: its `schemaregistry` extra (2.16.1) pulls in
httpx2, authlib, attrs, cachetools and certifi, five packages for four HTTP calls, while aiohttp is
already ours. What a registry answers is foreign input: bodies are capped, JSON is checked for the
shape we need, and errors say what failed without quoting the body at length.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import quote

import aiohttp

from services.common.text import untrusted

# A schema of ours is a few kB; Confluent's own registry caps a schema at 1 MiB of JSON only by its
# HTTP server. A larger answer is refused rather than buffered.
RESPONSE_BYTES_MAX = 1024 * 1024
REQUEST_TIMEOUT_S = 5.0
CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"
# BACKWARD or stricter: a consumer on the new schema reads every message already written.
STRICT_ENOUGH = frozenset({"BACKWARD", "BACKWARD_TRANSITIVE", "FULL", "FULL_TRANSITIVE"})
# Answers that say "not now" rather than "no": a request timeout, too many requests, and credentials
# the registry (or a proxy in front of it) refuses, which is our configuration's fault, not a
# message's. Taking them for a refusal would make every message naming the id unreadable.
TRY_LATER = frozenset({401, 403, 408, 429})
# A 409 is a refusal of the schema (Confluent: incompatible), but Apicurio also answers 409 "artifact
# already exists" to the loser of two first registrations of one subject at once (every service of
# `make run` registers the dead-letter topic's subject as it starts). Asked again, the loser finds the
# winner's version; an incompatible schema is refused again, and that refusal stands.
REGISTER_ATTEMPTS = 3
REGISTER_RETRY_PAUSE_S = 0.2


class RegistryError(Exception):
    """The registry refused a request (its reason in the message); retrying will not help."""


class RegistryConflict(RegistryError):
    """HTTP 409: the schema is incompatible, or (Apicurio) another client created the subject just now."""


class RegistryUnavailable(Exception):
    """The registry could not be reached or answered 5xx; a later try may work."""


class SchemaRegistry:
    """Register, look up and fetch Avro schemas; set a subject's compatibility level.

    Opens its HTTP session on first use, on the running loop; `close()` ends it."""

    def __init__(self, url: str, *, timeout_s: float = REQUEST_TIMEOUT_S):
        self.url = url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def register(self, subject: str, schema: str) -> int:
        """The id of `schema` under `subject`, registering it as the subject's next version if new.
        RegistryError if the subject's compatibility rule refuses it (409, with the registry's reason)."""
        for attempt in range(1, REGISTER_ATTEMPTS + 1):
            try:
                body = await self._call("POST", f"/subjects/{quote(subject, safe='')}/versions",
                                        {"schemaType": "AVRO", "schema": schema})
                return _schema_id(body)
            except RegistryConflict:
                if attempt == REGISTER_ATTEMPTS:
                    raise
                await asyncio.sleep(REGISTER_RETRY_PAUSE_S * attempt)
        raise AssertionError("unreachable")

    async def schema(self, schema_id: int) -> str | None:
        """The schema text registered under `schema_id`, or None if the registry knows no such id."""
        # The message chose only the id, and only a 404 or a schema says something about it: any other
        # refusal (a redirect, a 400, a proxy's page that is not JSON) is the registry's or the way to
        # it, so it is taken as "not now" rather than making every message of the id unreadable.
        body = await self._call("GET", f"/schemas/ids/{int(schema_id)}", missing_ok=True, refusal_is_transient=True)
        if body is None:
            return None
        if not isinstance(body, dict) or not isinstance(body.get("schema"), str):
            raise RegistryError(f"schema {schema_id}: answer has no schema text")
        if body.get("schemaType", "AVRO") != "AVRO":
            raise RegistryError(f"schema {schema_id} is not Avro")
        return body["schema"]

    async def compatibility(self, subject: str) -> str | None:
        """The subject's own compatibility level, or None if it has none set (the global one applies)."""
        body = await self._call("GET", f"/config/{quote(subject, safe='')}", missing_ok=True)
        if body is None:
            return None
        level = body.get("compatibilityLevel", body.get("compatibility")) if isinstance(body, dict) else None
        return level if isinstance(level, str) else None

    async def set_compatibility(self, subject: str, level: str) -> None:
        await self._call("PUT", f"/config/{quote(subject, safe='')}", {"compatibility": level})

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _call(self, method: str, path: str, payload: dict | None = None, *, missing_ok: bool = False,
                    refusal_is_transient: bool = False) -> Any:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers={"Accept": CONTENT_TYPE})
        data = None if payload is None else json.dumps(payload)
        headers = {} if payload is None else {"Content-Type": CONTENT_TYPE}
        try:
            async with self._session.request(method, self.url + path, data=data, headers=headers,
                                             allow_redirects=False) as resp:
                text = await _read_capped(resp)
                status = resp.status
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise RegistryUnavailable(f"schema registry {method} {path}: {type(exc).__name__}") from exc
        if status == 404 and missing_ok:
            return None
        refused = RegistryUnavailable if refusal_is_transient else RegistryError
        if status >= 500 or status in TRY_LATER:
            raise RegistryUnavailable(f"schema registry {method} {path}: HTTP {status}")
        if status == 409 and not refusal_is_transient:
            raise RegistryConflict(f"schema registry {method} {path}: HTTP 409: {_reason(text)}")
        if status >= 300:
            raise refused(f"schema registry {method} {path}: HTTP {status}: {_reason(text)}")
        try:
            return json.loads(text)
        except ValueError as exc:
            raise refused(f"schema registry {method} {path}: answer is not JSON") from exc


async def _read_capped(resp: aiohttp.ClientResponse) -> str:
    if resp.content_length is not None and resp.content_length > RESPONSE_BYTES_MAX:
        raise RegistryError(f"schema registry answer of {resp.content_length} bytes is larger than "
                            f"{RESPONSE_BYTES_MAX}")
    chunks, size = [], 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > RESPONSE_BYTES_MAX:
            raise RegistryError(f"schema registry answer is larger than {RESPONSE_BYTES_MAX} bytes")
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")


def _schema_id(body: Any) -> int:
    schema_id = body.get("id") if isinstance(body, dict) else None
    if not isinstance(schema_id, int) or isinstance(schema_id, bool) or not 0 <= schema_id < 2**31:
        raise RegistryError("registry answer has no schema id that fits the wire format's 4 bytes")
    return schema_id


def _reason(text: str) -> str:
    """The registry's own message ({"error_code": ..., "message": ...}) if it sent one."""
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    message = body.get("message") if isinstance(body, dict) else None
    return untrusted(message if isinstance(message, str) else text, 500)

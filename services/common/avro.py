"""Avro codec: every message names its own writer schema, in one of two framings.

With a schema registry (SCHEMA_REGISTRY_URL), messages are written in the Confluent wire format: a
0x00 byte, the 4-byte big-endian id the registry gave the writer schema, then the Avro binary body
(https://docs.confluent.io/platform/current/schema-registry/fundamentals/serdes-develop/index.html#wire-format).
The subject of a topic's schema is `<topic>-value` (Confluent's TopicNameStrategy). Without a registry
they are written in Avro single-object encoding (Avro 1.11, "Single object encoding"): marker C3 01,
the 8-byte little-endian CRC-64-AVRO fingerprint of the writer schema's parsing canonical form, then
the body; fastavro's fingerprint() returns those 8 bytes in that order (verified against the spec's
value for "int": 8f5c393f1ad57572). Both framings are always read, so topics written before the
registry stay readable. schemas/README.md ("Wire format") says why.

A registry id's writer schema is fetched by `await learn(values)` before a batch is decoded, checked
as a local schema file is (load_schema), and resolved to this code's current schema of the same
record full name, so `decode` stays synchronous and does no I/O.

Whatever a producer sends, `decode` returns a record or raises DecodeError, and what it returns is
exactly what `encode` would have written for that record. fastavro's `schemaless_reader` alone
does not promise that (fastavro 1.13, fastavro/_read.pyx and the reader docs,
https://fastavro.readthedocs.io/en/latest/reader.html#fastavro._read_py.schemaless_reader):
- it reads one record and stops, leaving any trailing bytes unread and unreported;
- it raises whatever the failing step raises (EOFError, IndexError, StopIteration from the Cython
  read_long at end of input, UnicodeDecodeError, KeyError/IndexError for an enum or union index out
  of range, OverflowError for a timestamp out of range...);
- it accepts encodings no Avro writer produces: a varint padded with 0x80 bytes, a boolean byte other
  than 0 or 1, a map split into several blocks or with a negative count and byte size;
- it believes a block count: it loops `count` times, reading one item each time.
So `decode` caps the message size first, maps every failure to DecodeError, and re-encodes the record
and compares: trailing bytes and non-canonical encodings are refused. The loop on a block count is
bounded because no item type of our schemas can be encoded in zero bytes (checked when a schema is
loaded): each item consumes at least one byte, so a message of MESSAGE_BYTES_MAX bytes yields at most
that many items, and a count of 2**62 ends at the end of the message with an error.
"""
from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form

from services.common.config import mask_url
from services.common.ratelimit import RateLimiter
from services.common.runtime import StartupRefused
from services.common.schema_registry import STRICT_ENOUGH, RegistryError, RegistryUnavailable, SchemaRegistry
from services.common.text import untrusted
from services.common.topics import Topic

log = logging.getLogger(__name__)

# Package data (services/schemas links to the repository's schemas/), so an installed wheel carries it.
SCHEMA_DIR = Path(__file__).resolve().parents[1] / "schemas"
SINGLE_OBJECT_MARKER = b"\xc3\x01"
CONFLUENT_MAGIC = b"\x00"
# Kafka's default message.max.bytes (1048588) rounded down: a larger message was not sent through a
# default broker, so it is refused before any parsing.
MESSAGE_BYTES_MAX = 1024 * 1024
# Bounds on what messages naming registry ids can make a consumer do. A registry holds a handful of
# schemas per record; ids it does not know (or whose schema we cannot use) are remembered too, so a
# message repeating one costs no request. A stream of distinct made-up ids is slowed to
# LOOKUPS_PER_S requests rather than dropped, so a real new id among them is still learned.
KNOWN_IDS_MAX = 1024
# Each remembered id keeps its parsed schema, about twice its text in memory: with 1 MiB schemas (the
# answer's cap) the ids above held some 2 GB. Ours are 1.5 to 3.5 kB; a registry schema far beyond
# that is not a version of ours, and is refused.
SCHEMA_TEXT_MAX = 64 * 1024
UNUSABLE_IDS_MAX = 4096
# ...but not for good: a registry replica that has not caught up with a registration yet answers 404
# for an id that exists, and every message naming it would be dead-lettered until a restart.
UNUSABLE_FOR_S = 300.0
LOOKUPS_PER_S, LOOKUPS_BURST = 20.0, 50
# How long a service waits at start for its registry (a registry started with it may be slower).
REGISTRY_WAIT_S = 60.0


class DecodeError(ValueError):
    """The bytes are not a record this codec can read."""


@dataclass(frozen=True)
class Schema:
    name: str  # file stem of the current version, e.g. "payment_requested"
    parsed: dict[str, Any]
    fingerprint: bytes
    text: str = ""  # the schema as written (with defaults and docs), what a registry is given


def load_schema(path: Path) -> Schema:
    return _checked(path.name.split(".")[0], path.read_text(), path.name)


def _checked(name: str, text: str, where: str) -> Schema:
    parsed = parse_schema(json.loads(text))
    if not isinstance(parsed, dict) or parsed.get("type") != "record":
        raise ValueError(f"{where}: every event is a record, this schema is not one")
    _refuse_zero_width_items(parsed, where)
    canonical = to_parsing_canonical_form(parsed)
    return Schema(name, parsed, bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO")), json.dumps(json.loads(text)))


class Codec:
    """Writes the current version of each schema; reads the current and every historic one, and with
    a registry any version the registry holds of a record this code knows."""

    def __init__(self, schema_dir: Path = SCHEMA_DIR, registry: SchemaRegistry | None = None):
        self.current = {s.name: s for s in map(load_schema, sorted(schema_dir.glob("*.avsc")))}
        historic = [load_schema(p) for p in sorted((schema_dir / "history").glob("*.avsc"))]
        self._writers = {s.fingerprint: s for s in [*historic, *self.current.values()]}
        self._by_full_name = {s.parsed["name"]: s for s in self.current.values()}
        self.registry = registry
        self._headers: dict[str, bytes] = {}  # topic name -> Confluent header, once prepared
        self._by_id: dict[int, Schema] = {}  # registry id -> writer schema (name: its current version's)
        self._unusable: dict[int, tuple[str, float]] = {}  # registry id -> why it cannot be read, since when
        self._lookups = RateLimiter(LOOKUPS_PER_S, LOOKUPS_BURST, sources_max=1)

    async def prepare(self, topics: Iterable[Topic], wait_s: float = REGISTRY_WAIT_S) -> None:
        """Registers (or finds) each topic's current schema under `<topic>-value`, after making the
        subject's compatibility BACKWARD unless it is already that strict, so `encode` can frame.
        Waits up to `wait_s` for a registry that is not up yet, then raises RegistryUnavailable;
        RegistryError (at once) if the registry refuses a schema, with its reason."""
        if self.registry is None:
            return
        deadline, delay = time.monotonic() + wait_s, 0.2
        for topic in dict.fromkeys(topics):
            while True:
                try:
                    await self._register(topic)
                    break
                except RegistryUnavailable as exc:
                    if time.monotonic() + delay > deadline:
                        raise RegistryUnavailable(f"schema registry {mask_url(self.registry.url)} not reachable after "
                                                  f"{wait_s:.0f}s: {exc}") from exc
                    log.warning("schema registry not reachable, retrying in %.1fs: %s", delay, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)

    async def _register(self, topic: Topic) -> None:
        assert self.registry is not None
        schema, subject = self.current[topic.schema], subject_of(topic)
        if await self.registry.compatibility(subject) not in STRICT_ENOUGH:
            await self.registry.set_compatibility(subject, "BACKWARD")
        schema_id = await self.registry.register(subject, schema.text)
        self._headers[topic.name] = CONFLUENT_MAGIC + schema_id.to_bytes(4, "big")
        self._remember(schema_id, schema)

    async def learn(self, values: Iterable[bytes | bytearray | memoryview | None]) -> None:
        """Fetches the writer schema of every registry id among `values` not seen yet, so that `decode`
        can read them. RegistryUnavailable if the registry cannot answer now (retry later); an id it
        does not know, or whose schema this code cannot use, is remembered as such and `decode` refuses
        its messages."""
        if self.registry is None:
            return
        wanted = {int.from_bytes(v[1:5], "big") for v in map(_as_bytes, values)
                  if v is not None and len(v) >= 5 and v[:1] == CONFLUENT_MAGIC}
        for schema_id in sorted(wanted - self._by_id.keys()):
            refused = self._unusable.get(schema_id)
            if refused is not None and time.monotonic() - refused[1] < UNUSABLE_FOR_S:
                continue
            while (wait := self._lookups.take("registry")) > 0:
                await asyncio.sleep(wait)
            try:
                text = await self.registry.schema(schema_id)
            except RegistryError as exc:
                self._refuse(schema_id, str(exc))
                continue
            if text is None:
                self._refuse(schema_id, "is not known to the schema registry")
                continue
            try:
                self._remember(schema_id, self._writer_from(text, schema_id))
            except Exception as exc:  # a registry's text is foreign: parse_schema raises many types
                self._refuse(schema_id, f"has a schema this code cannot read: {type(exc).__name__}: {exc}")

    def _writer_from(self, text: str, schema_id: int) -> Schema:
        if len(text) > SCHEMA_TEXT_MAX:
            raise ValueError(f"schema text is too long (over {SCHEMA_TEXT_MAX} characters)")
        full_name = _full_name(json.loads(text))
        reader = self._by_full_name.get(full_name)
        if reader is None:
            raise ValueError(f"record {full_name!r} is none of this code's schemas")
        writer = _checked(reader.name, text, f"registry schema {schema_id}")
        return self._writers.get(writer.fingerprint, writer)  # the same schema object: no resolution step

    def _remember(self, schema_id: int, schema: Schema) -> None:
        self._by_id[schema_id] = schema
        if len(self._by_id) > KNOWN_IDS_MAX:
            del self._by_id[next(iter(self._by_id))]  # the oldest; fetched again if it comes back

    def _refuse(self, schema_id: int, reason: str) -> None:
        self._unusable.pop(schema_id, None)  # re-inserted: the oldest refusal goes first
        self._unusable[schema_id] = (untrusted(reason, 300), time.monotonic())
        if len(self._unusable) > UNUSABLE_IDS_MAX:
            del self._unusable[next(iter(self._unusable))]

    async def close(self) -> None:
        if self.registry is not None:
            await self.registry.close()

    def encode(self, topic: Topic, record: dict[str, Any]) -> bytes:
        schema = self.current[topic.schema]
        header = self._headers.get(topic.name)
        if header is None:
            if self.registry is not None:
                raise RuntimeError(f"{topic.name}: await codec.prepare() with this topic at start")
            header = SINGLE_OBJECT_MARKER + schema.fingerprint
        out = io.BytesIO()
        out.write(header)
        schemaless_writer(out, schema.parsed, record)
        return out.getvalue()

    def decode(self, data: bytes | None) -> tuple[str, dict[str, Any]]:
        """Returns (schema name, record) read with the current version of the writer's schema.

        Raises DecodeError, and only DecodeError, for anything that is not exactly the encoding of
        one record of a known schema."""
        data = _as_bytes(data)
        if data is None or len(data) < 6:
            raise DecodeError("message too short to be an Avro record")
        if len(data) > MESSAGE_BYTES_MAX:
            raise DecodeError(f"message of {len(data)} bytes is larger than {MESSAGE_BYTES_MAX}")
        if data[:1] == CONFLUENT_MAGIC:
            writer, body = self._registry_writer(int.from_bytes(data[1:5], "big")), data[5:]
        elif data[:2] == SINGLE_OBJECT_MARKER and len(data) >= 10:
            writer, body = self._local_writer(data[2:10]), data[10:]
        else:
            raise DecodeError("message starts with neither the Confluent nor the Avro single-object header")
        reader = self.current[writer.name]
        try:
            record = schemaless_reader(io.BytesIO(body), writer.parsed, None)
            canonical = _body(writer, record)
            if canonical == body and reader is not writer:  # an older version: resolve to the current one
                record = schemaless_reader(io.BytesIO(body), writer.parsed, reader.parsed)
        except Exception as exc:  # fastavro raises many types on corrupt bodies (module docstring)
            raise DecodeError(f"corrupt {writer.name} body: {type(exc).__name__}") from exc
        assert isinstance(record, dict), "every schema is a record (load_schema)"
        if canonical != body:
            extra = len(body) - len(canonical)
            raise DecodeError(f"{writer.name} body has {extra} bytes after the record" if body.startswith(canonical)
                              else f"{writer.name} body is not in the canonical Avro encoding")
        return writer.name, record

    def _local_writer(self, fingerprint_bytes: bytes) -> Schema:
        writer = self._writers.get(fingerprint_bytes)
        if writer is None:
            raise DecodeError(f"unknown schema fingerprint {fingerprint_bytes.hex()}")
        return writer

    def _registry_writer(self, schema_id: int) -> Schema:
        writer = self._by_id.get(schema_id)
        if writer is not None:
            return writer
        if self.registry is None:
            raise DecodeError(f"schema id {schema_id}: Confluent wire format needs a schema registry, "
                              "none is configured")
        raise DecodeError(f"schema id {schema_id} {self._unusable.get(schema_id, ('was not learned',))[0]}")


async def open_codec(registry_url: str, writes: Iterable[Topic], wait_s: float = REGISTRY_WAIT_S) -> Codec:
    """A service's codec at start. With a registry (SCHEMA_REGISTRY_URL), the schemas of the topics it
    writes are registered first; StartupRefused, one line saying why, if the registry stays out of
    reach for `wait_s` or refuses a schema."""
    codec = Codec(registry=SchemaRegistry(registry_url) if registry_url else None)
    try:
        await codec.prepare(writes, wait_s)
    except (RegistryUnavailable, RegistryError) as exc:
        await codec.close()
        raise StartupRefused(f"schema registry: {exc} (SCHEMA_REGISTRY_URL)") from None
    return codec


def _as_bytes(data: object) -> bytes | None:
    if isinstance(data, (bytearray, memoryview)):  # e.g. a bytea column read back
        return bytes(data)
    return data if isinstance(data, bytes) else None


def subject_of(topic: Topic) -> str:
    """Confluent's TopicNameStrategy for message values."""
    return f"{topic.name}-value"


def _full_name(schema: Any) -> str:
    if not isinstance(schema, dict) or not isinstance(schema.get("name"), str):
        raise ValueError("not a named schema")
    name, namespace = schema["name"], schema.get("namespace")
    return name if "." in name or not isinstance(namespace, str) or not namespace else f"{namespace}.{name}"


def _body(schema: Schema, record: object) -> bytes:
    out = io.BytesIO()
    schemaless_writer(out, schema.parsed, record)
    return out.getvalue()


def _refuse_zero_width_items(schema: dict[str, Any], where: str) -> None:
    """Raises ValueError if an array's items can be encoded in zero bytes (null, an empty record, a
    fixed of size 0): a hostile block count would then make the reader loop without consuming input.
    A map's entries cannot: each has a key, whose length takes at least one byte."""
    named = schema.get("__named_schemas", {})  # fastavro's parse_schema: name -> definition
    for items in _array_items(schema, named, set()):
        if _can_be_empty(items, named, set()):
            raise ValueError(f"{where}: an array of items that take zero bytes cannot be read safely")


def _array_items(schema: Any, named: dict, seen: set[str]):
    if isinstance(schema, str):
        if schema in named and schema not in seen:
            seen.add(schema)
            yield from _array_items(named[schema], named, seen)
    elif isinstance(schema, list):
        for branch in schema:
            yield from _array_items(branch, named, seen)
    elif schema["type"] == "array":
        yield schema["items"]
        yield from _array_items(schema["items"], named, seen)
    elif schema["type"] == "map":
        yield from _array_items(schema["values"], named, seen)
    elif schema["type"] in ("record", "error"):
        for f in schema["fields"]:
            yield from _array_items(f["type"], named, seen)


def _can_be_empty(schema: Any, named: dict, seen: set[str]) -> bool:
    if isinstance(schema, str):
        if schema in named and schema not in seen:
            return _can_be_empty(named[schema], named, seen | {schema})
        return schema == "null"
    if isinstance(schema, list):  # a union writes its branch index: at least one byte
        return False
    if schema["type"] in ("record", "error"):
        return all(_can_be_empty(f["type"], named, seen) for f in schema["fields"])
    if schema["type"] == "fixed":
        return schema["size"] == 0
    return schema["type"] == "null"

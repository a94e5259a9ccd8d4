"""Where a payer's number still is: every text, json and bytea column of every table in the public
schema searched for each given form of it (tests of erasure; reusable by any test that must show a
number gone). Read as the schema's owner, who can read every table."""
from __future__ import annotations

from collections.abc import Sequence

_SCANNED_TYPES = ("text", "character varying", "character", "json", "jsonb", "bytea", "ARRAY")


async def columns(conn) -> list[tuple[str, str, str]]:
    """(table, column, data type) of every scanned column of every base table in public."""
    return await (await conn.execute(
        "SELECT c.table_name, c.column_name, c.data_type FROM information_schema.columns c"
        " JOIN information_schema.tables t USING (table_schema, table_name)"
        " WHERE c.table_schema = 'public' AND t.table_type = 'BASE TABLE' AND c.data_type = ANY(%s)"
        " ORDER BY 1, 2", (list(_SCANNED_TYPES),))).fetchall()


async def places_holding(conn, needles: Sequence[str]) -> list[tuple[str, str, str]]:
    """(table, column, needle) for each column where a row contains a needle (a substring, in any
    text form of the value: bytea is searched as bytes, json as its text)."""
    found = []
    for table, column, data_type in await columns(conn):
        for needle in needles:
            if data_type == "bytea":
                condition = f'position(%s::bytea in "{column}") > 0'
                value: object = needle.encode()
            else:
                condition = f'strpos("{column}"::text, %s) > 0'
                value = needle
            row = await (await conn.execute(f'SELECT 1 FROM "{table}" WHERE {condition} LIMIT 1', (value,))).fetchone()
            if row is not None:
                found.append((table, column, needle))
    return found

"""The served OpenAPI document matches what the API really answers.

Every documented (operation, status) pair except 500 is provoked on a real ingress, and each actual
answer is checked against the document: the status is documented for the operation, the media type
is the documented one, the body validates against the documented schema (JSON Schema 2020-12, as
OpenAPI 3.1 specifies) and the documented headers are present.
"""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
import pytest
from jsonschema import Draft202012Validator, FormatChecker
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from tests.ingress.conftest import ingress_config, make_api_key, make_channel, new_key, payment_body, start_ingress
from tests.openapi_refs import refs_in

DOCUMENT_PATH = Path(__file__).resolve().parents[2] / "services" / "ingress" / "openapi.json"
DOCUMENT_URI = "urn:ingress-openapi"


@pytest.fixture(scope="module")
def document() -> dict:
    return json.loads(DOCUMENT_PATH.read_text())


class Contract:
    """Checks answers against the document and remembers which documented answers were seen."""

    def __init__(self, document: dict):
        self.document = document
        self.registry = Registry().with_resource(DOCUMENT_URI, DRAFT202012.create_resource(document))
        self.seen: set[tuple[str, str, str]] = set()

    def check(self, method: str, path: str, response: httpx.Response) -> None:
        operation = self.document["paths"][path][method]
        status = str(response.status_code)
        assert status in operation["responses"], f"{method.upper()} {path} answered undocumented {status}"
        pointer = "/" + "/".join(_escape(p) for p in ("paths", path, method, "responses", status))
        documented, pointer = self._resolve(operation["responses"][status], pointer)
        [media_type] = documented["content"]
        assert response.headers["content-type"].split(";")[0] == media_type
        # Validate against the schema where it sits in the document, so its "#/..." refs resolve.
        schema = {"$ref": f"{DOCUMENT_URI}#{pointer}/content/{_escape(media_type)}/schema"}
        validator = Draft202012Validator(schema, registry=self.registry, format_checker=FormatChecker())
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(response.json())]
        assert not errors, f"{method.upper()} {path} {status}: {errors}"
        for header in documented.get("headers", {}):
            assert header in response.headers, f"{method.upper()} {path} {status} lacks header {header}"
        self.seen.add((method, path, status))

    def documented(self) -> set[tuple[str, str, str]]:
        return {(method, path, status) for path, item in self.document["paths"].items()
                for method, operation in item.items() for status in operation["responses"]}

    def _resolve(self, node: dict, pointer: str) -> tuple[dict, str]:
        while "$ref" in node:
            pointer = self._pointer(node)
            node = self._at(pointer)
        return node, pointer

    @staticmethod
    def _pointer(node: dict) -> str:
        assert node["$ref"].startswith("#/"), node["$ref"]
        return node["$ref"][1:]

    def _at(self, pointer: str) -> dict:
        node = self.document
        for part in pointer.strip("/").split("/"):
            node = node[part]
        return node


def _escape(part: str) -> str:
    return part.replace("~", "~0").replace("/", "~1")


def test_the_document_is_served_as_is_and_is_well_formed(document):
    assert document["openapi"].startswith("3.1.")
    for schema in document["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)
    registry = Registry().with_resource(DOCUMENT_URI, DRAFT202012.create_resource(document))
    refs = refs_in(document)
    assert refs
    resolver = registry.resolver(DOCUMENT_URI)
    for ref in refs:
        assert resolver.lookup(ref).contents, ref  # every $ref points somewhere


async def test_the_served_document_is_the_file(ingress, document):
    async with ingress.client() as http:
        response = await http.get("/api/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == document


def test_the_documented_request_schema_agrees_with_the_validator(document):
    """The request schema is documentation, not the validator; spot-check that they agree."""
    from services.common.payment import parse_payment_request
    schema = {"$ref": f"{DOCUMENT_URI}#/components/schemas/PaymentRequest"}
    registry = Registry().with_resource(DOCUMENT_URI, DRAFT202012.create_resource(document))
    validator = Draft202012Validator(schema, registry=registry)
    good = payment_body("shop-1")
    for body in [good, {**good, "description": None, "metadata": None}, {k: good[k] for k in
                                                                          ("channelId", "amount", "phone",
                                                                           "accountReference")}]:
        assert validator.is_valid(body) and parse_payment_request(body)[1] == {}
    changes: list[dict[str, object]] = [
        {"amount": 0}, {"amount": "1"}, {"accountReference": "X" * 13}, {"description": "D" * 14},
        {"extra": 1}, {"metadata": {"k": 1}}, {"channelId": "Bad"}, {"accountReference": "A#1"},
        {"orderReference": "o-1\n"}, {"metadata": {"k\n": "v"}}, {"metadata": {"k": "\u0000"}}]
    for change in changes:
        body = {**good, **change}
        assert not validator.is_valid(body) and parse_payment_request(body)[1], change


async def test_every_documented_answer_matches_the_document(infra, ingress, pool, unique, document):
    # Set up: an active, a suspended and an absent channel, and keys scoped to them.
    contract = Contract(document)
    active, suspended, absent = f"oa-{unique}", f"oas-{unique}", f"oax-{unique}"
    await make_channel(pool, active)
    await make_channel(pool, suspended, status="suspended")
    api_key = await make_api_key(pool, active, suspended, absent)
    stranger_key = await make_api_key(pool, suspended)
    payments, payment = "/api/payments", "/api/payments/{paymentId}"

    async with ingress.client(api_key) as http:
        key, body = new_key(), payment_body(active)
        accepted = await http.post(payments, json=body, headers={"Idempotency-Key": key})
        contract.check("post", payments, accepted)
        contract.check("post", payments, await http.post(payments, json=body, headers={"Idempotency-Key": key}))
        contract.check("post", payments, await http.post(payments, json={**body, "amount": 9},
                                                         headers={"Idempotency-Key": key}))  # 409
        contract.check("post", payments, await http.post(payments, json={**body, "amount": 1.5},
                                                         headers={"Idempotency-Key": new_key()}))  # 400
        contract.check("post", payments, await http.post(payments, json=body))  # 400, no key
        contract.check("post", payments, await http.post(payments, content=b"{", headers={
            "Idempotency-Key": new_key(), "Content-Type": "application/json"}))  # 400 malformed
        contract.check("post", payments, await http.post(payments, content=b"x", headers={
            "Idempotency-Key": new_key(), "Content-Type": "text/plain"}))  # 415
        contract.check("post", payments, await http.post(payments, json={**body, "metadata": {"p": "x" * 20000}},
                                                         headers={"Idempotency-Key": new_key()}))  # 413
        contract.check("post", payments, await http.post(payments, json=payment_body(suspended),
                                                         headers={"Idempotency-Key": new_key()}))  # 403
        contract.check("post", payments, await http.post(payments, json=payment_body(absent),
                                                         headers={"Idempotency-Key": new_key()}))  # 422
        payment_id = accepted.json()["paymentId"]
        contract.check("get", payment, await http.get(f"/api/payments/{payment_id}"))  # 200
        contract.check("get", payment, await http.get(f"/api/payments/{uuid.uuid4()}"))  # 404
        contract.check("get", "/api/openapi.json", await http.get("/api/openapi.json"))
    async with ingress.client(stranger_key) as http:
        contract.check("post", payments, await http.post(payments, json=body,
                                                         headers={"Idempotency-Key": new_key()}))  # 403 scope
        contract.check("get", payment, await http.get(f"/api/payments/{payment_id}"))  # 404 scope
    async with ingress.client() as http:
        contract.check("post", payments, await http.post(payments, json=body, headers={"Idempotency-Key": key}))
        contract.check("get", payment, await http.get(f"/api/payments/{payment_id}"))  # 401

    broken = await start_ingress(ingress_config(infra, kafka_bootstrap_servers="127.0.0.1:9",
                                                ingress_kafka_timeout_ms=500))
    try:
        async with broken.client(api_key) as http:
            contract.check("post", payments, await http.post(payments, json=payment_body(active),
                                                             headers={"Idempotency-Key": new_key()}))  # 503
        await broken.deps.pool.close()  # the database gone too: reads answer 503 as well
        async with broken.client(api_key) as http:
            contract.check("get", payment, await http.get(f"/api/payments/{payment_id}"))
    finally:
        await broken.runner.cleanup()
        await broken.deps.intake.close()
        broken.deps.producer.close()
        await broken.deps.marks_pool.close()

    missing = contract.documented() - contract.seen - {(m, p, "500") for m, p, _ in contract.documented()}
    assert not missing, f"documented but never provoked: {sorted(missing)}"

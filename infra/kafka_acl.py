"""Kafka principals of the pipeline and exactly what each may do (docs/kafka-security.md).

    python infra/kafka_acl.py principals   # the service and upstream principals, one a line
    python infra/kafka_acl.py apply        # as the admin principal (KAFKA_CLIENT_* variables):
                                           # SCRAM users from $KAFKA_SECRETS_DIR/kafka-<principal>.password,
                                           # then the ACLs below; ACLs of these principals not below are removed

Upstream producers (UPSTREAM_PRODUCERS, `principal:channel,...;...`) get a user and Write on their
own topic only (services.common.topics.upstream_requested_topic); the ingress re-authorises them.
infra/kafka.sh runs `apply` on every start; compose.yaml runs it in its kafka-setup service.
Idempotent: the users' passwords are written again (the files are the truth), ACLs converge.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.common.topics import ACCESS, Access, parse_upstream_producers, upstream_requested_topic  # noqa: E402


def grants(environ=os.environ) -> dict[str, Access]:
    """Who may do what, declared once beside the topics (services.common.topics.ACCESS), plus one
    write-only grant per upstream producer. Every topic a service touches it may also describe and
    create: services create missing topics at start, and a topic that exists cannot be created
    twice, so Create gives nothing more. They may read its settings (DescribeConfigs) to report one
    that differs from theirs, never alter them. Upstream producers do not create: the ingress does."""
    upstream = parse_upstream_producers(environ.get("UPSTREAM_PRODUCERS", ""))
    return {**ACCESS, **{p: upstream_access(p) for p in upstream}}


def upstream_access(principal: str) -> Access:
    return Access(writes=(upstream_requested_topic(principal),))


def bindings(principal: str, grants: Access) -> set:
    from confluent_kafka.admin import AclBinding, AclOperation, AclPermissionType, ResourcePatternType, ResourceType

    def allow(rtype, name, operation, pattern=ResourcePatternType.LITERAL):
        return AclBinding(rtype, name, pattern, f"User:{principal}", "*", operation, AclPermissionType.ALLOW)

    service = principal in ACCESS
    wanted = set()
    for topic in grants.topics:
        wanted.add(allow(ResourceType.TOPIC, topic.name, AclOperation.DESCRIBE))
        if service:  # DescribeConfigs: it compares an existing topic's settings with its own (read only)
            wanted |= {allow(ResourceType.TOPIC, topic.name, op)
                       for op in (AclOperation.CREATE, AclOperation.DESCRIBE_CONFIGS)}
    if grants.read_prefix:
        wanted |= {allow(ResourceType.TOPIC, grants.read_prefix, op, ResourcePatternType.PREFIXED)
                   for op in (AclOperation.DESCRIBE, AclOperation.CREATE, AclOperation.READ,
                              AclOperation.DESCRIBE_CONFIGS)}
    wanted |= {allow(ResourceType.TOPIC, t.name, AclOperation.READ) for t in grants.reads}
    wanted |= {allow(ResourceType.TOPIC, t.name, AclOperation.WRITE) for t in grants.writes}
    if grants.group_prefix:
        wanted.add(allow(ResourceType.GROUP, grants.group_prefix, AclOperation.READ, ResourcePatternType.PREFIXED))
    return wanted


def apply(secrets_dir: Path) -> None:
    from confluent_kafka.admin import AdminClient

    from services.common.config import kafka_client_config

    admin = AdminClient({**kafka_client_config(), "bootstrap.servers": os.environ["KAFKA_BOOTSTRAP_SERVERS"],
                         "log_level": 4})  # librdkafka notices on closing are noise here
    wanted = grants()
    added, removed, total = converge(admin, wanted, {p: (secrets_dir / f"kafka-{p}.password").read_text().strip()
                                                     for p in wanted})
    print(f"kafka: {len(wanted)} principals, {total} ACLs ({added} added, {removed} removed)", file=sys.stderr)


def converge(admin, wanted_grants: dict[str, Access], passwords: dict[str, str]) -> tuple[int, int, int]:
    """Sets each principal's SCRAM password and makes its ACLs exactly `wanted_grants` (ACLs of
    other principals are left alone). Returns (added, removed, total) ACL counts."""
    from confluent_kafka.admin import (
        AclBindingFilter,
        AclOperation,
        AclPermissionType,
        ResourcePatternType,
        ResourceType,
        ScramCredentialInfo,
        ScramMechanism,
        UserScramCredentialUpsertion,
    )
    upserts = [UserScramCredentialUpsertion(p, ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 8192),
                                            passwords[p].encode()) for p in wanted_grants]
    for future in admin.alter_user_scram_credentials(upserts, request_timeout=30).values():
        future.result()

    wanted = set().union(*(bindings(p, g) for p, g in wanted_grants.items()))
    everything = AclBindingFilter(ResourceType.ANY, None, ResourcePatternType.ANY, None, None,
                                  AclOperation.ANY, AclPermissionType.ANY)
    present = set(admin.describe_acls(everything, request_timeout=30).result())
    ours = {f"User:{p}" for p in wanted_grants}
    stale = [b for b in present - wanted if b.principal in ours]
    missing = list(wanted - present)
    if stale:  # a grant taken out of the code is taken away from the broker too
        for future in admin.delete_acls([_as_filter(b) for b in stale], request_timeout=30).values():
            future.result()
    if missing:
        for future in admin.create_acls(missing, request_timeout=30).values():
            future.result()
    return len(missing), len(stale), len(wanted)


def _as_filter(binding):
    from confluent_kafka.admin import AclBindingFilter
    return AclBindingFilter(binding.restype, binding.name, binding.resource_pattern_type, binding.principal,
                            binding.host, binding.operation, binding.permission_type)


def main(argv: list[str]) -> int:
    if argv[1:] == ["principals"]:
        print("\n".join(grants()))
        return 0
    if argv[1:] == ["apply"]:
        apply(Path(os.environ.get("KAFKA_SECRETS_DIR", ".local/secrets")))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""Kafka principals of the pipeline and exactly what each may do (docs/kafka-security.md).

    python infra/kafka_acl.py principals   # the service principals, one a line
    python infra/kafka_acl.py apply        # as the admin principal (KAFKA_CLIENT_* variables):
                                           # SCRAM users from $KAFKA_SECRETS_DIR/kafka-<principal>.password,
                                           # then the ACLs below; ACLs of these principals not below are removed

infra/kafka.sh runs `apply` on every start; compose.yaml runs it in its kafka-setup service.
Idempotent: the users' passwords are written again (the files are the truth), ACLs converge.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.common.topics import ACCESS, Access  # noqa: E402

# Who may do what is declared once, beside the topics (services.common.topics.ACCESS). Every topic a
# principal touches it may also describe and create: services create missing topics at start, and
# a topic that exists cannot be created twice, so Create gives nothing more.
GRANTS: dict[str, Access] = ACCESS


def bindings(principal: str, grants: Access) -> set:
    from confluent_kafka.admin import AclBinding, AclOperation, AclPermissionType, ResourcePatternType, ResourceType

    def allow(rtype, name, operation, pattern=ResourcePatternType.LITERAL):
        return AclBinding(rtype, name, pattern, f"User:{principal}", "*", operation, AclPermissionType.ALLOW)

    wanted = set()
    for topic in grants.topics:
        wanted |= {allow(ResourceType.TOPIC, topic.name, AclOperation.DESCRIBE),
                   allow(ResourceType.TOPIC, topic.name, AclOperation.CREATE)}
    wanted |= {allow(ResourceType.TOPIC, t.name, AclOperation.READ) for t in grants.reads}
    wanted |= {allow(ResourceType.TOPIC, t.name, AclOperation.WRITE) for t in grants.writes}
    if grants.group_prefix:
        wanted.add(allow(ResourceType.GROUP, grants.group_prefix, AclOperation.READ, ResourcePatternType.PREFIXED))
    return wanted


def apply(secrets_dir: Path) -> None:
    from confluent_kafka.admin import (AclBindingFilter, AclOperation, AclPermissionType, AdminClient,
                                       ResourcePatternType, ResourceType, ScramCredentialInfo, ScramMechanism,
                                       UserScramCredentialUpsertion)
    from services.common.config import kafka_client_config

    admin = AdminClient({**kafka_client_config(), "bootstrap.servers": os.environ["KAFKA_BOOTSTRAP_SERVERS"]})
    upserts = [UserScramCredentialUpsertion(p, ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 8192),
                                            (secrets_dir / f"kafka-{p}.password").read_text().strip().encode())
               for p in GRANTS]
    for future in admin.alter_user_scram_credentials(upserts, request_timeout=30).values():
        future.result()

    wanted = set().union(*(bindings(p, g) for p, g in GRANTS.items()))
    everything = AclBindingFilter(ResourceType.ANY, None, ResourcePatternType.ANY, None, None,
                                  AclOperation.ANY, AclPermissionType.ANY)
    present = set(admin.describe_acls(everything, request_timeout=30).result())
    ours = {f"User:{p}" for p in GRANTS}
    stale = [b for b in present - wanted if b.principal in ours]
    missing = list(wanted - present)
    if stale:  # a grant taken out of GRANTS is taken away from the broker too
        for future in admin.delete_acls([_as_filter(b) for b in stale], request_timeout=30).values():
            future.result()
    if missing:
        for future in admin.create_acls(missing, request_timeout=30).values():
            future.result()
    print(f"kafka: {len(GRANTS)} service principals, {len(wanted)} ACLs ({len(missing)} added, {len(stale)} removed)",
          file=sys.stderr)


def _as_filter(binding):
    from confluent_kafka.admin import AclBindingFilter
    return AclBindingFilter(binding.restype, binding.name, binding.resource_pattern_type, binding.principal,
                            binding.host, binding.operation, binding.permission_type)


def main(argv: list[str]) -> int:
    if argv[1:] == ["principals"]:
        print("\n".join(GRANTS))
        return 0
    if argv[1:] == ["apply"]:
        apply(Path(os.environ.get("KAFKA_SECRETS_DIR", ".local/secrets")))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""compose.yaml's kafka-init: the TLS material and Kafka passwords, made once, in Docker volumes.

    python infra/kafka_compose_init.py /secrets /logins

/secrets (volume kafka-secrets: the broker and kafka-setup only): ca.crt, broker.p12 and its
password, cluster.id, and kafka-<principal>.password for the broker, admin and every service.
/logins/<principal> (one volume per service, mounted by that service only): ca.crt and password.
The same as infra/kafka.sh makes with openssl for a local run (docs/kafka-security.md); here in
Python (cryptography is a dependency already) because the project's image has no openssl tool.
Files are world-readable inside their volume: the volume, mounted by one service, is the boundary
(the containers run as different users).
"""
from __future__ import annotations

import base64
import datetime
import ipaddress
import os
import secrets
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.common.topics import ACCESS, parse_upstream_producers  # noqa: E402

BROKER_NAMES = ["kafka", "localhost"]  # the compose service name clients use, and loopback for the controller


def write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o444)
    tmp.replace(path)


def secret(path: Path) -> str:
    if not path.exists():
        write(path, secrets.token_hex(24).encode())
    return path.read_text().strip()


def make_tls(out: Path, keystore_password: str) -> None:
    if (out / "broker.p12").exists() and (out / "ca.crt").exists():
        return
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mpesa-pipeline compose Kafka CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now)
          .not_valid_after(now + datetime.timedelta(days=3650))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName(n) for n in BROKER_NAMES] + [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mpesa-kafka-broker")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=825))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    keystore = pkcs12.serialize_key_and_certificates(
        b"broker", key, cert, [ca], serialization.BestAvailableEncryption(keystore_password.encode()))
    write(out / "ca.crt", ca.public_bytes(serialization.Encoding.PEM))
    write(out / "broker.p12", keystore)  # the CA's key is not kept: nothing else is ever signed


def main(secrets_dir: Path, logins_dir: Path) -> None:
    make_tls(secrets_dir, secret(secrets_dir / "kafka-keystore.password"))
    cluster_id = secrets_dir / "cluster.id"
    if not cluster_id.exists():  # what kafka-storage random-uuid prints: 16 random bytes, base64url
        write(cluster_id, base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=") + b"\n")
    for principal in ("broker", "admin", *ACCESS):
        password = secret(secrets_dir / f"kafka-{principal}.password")
        if principal in ACCESS:
            login = logins_dir / principal
            login.mkdir(parents=True, exist_ok=True)
            write(login / "password", password.encode())
            write(login / "ca.crt", (secrets_dir / "ca.crt").read_bytes())
    upstream = parse_upstream_producers(os.environ.get("UPSTREAM_PRODUCERS", ""))
    for principal in upstream:  # handed to each upstream service by the operator, from the volume
        secret(secrets_dir / f"kafka-{principal}.password")
    print(f"kafka-init: TLS material and {len(ACCESS) + len(upstream) + 2} passwords ready", file=sys.stderr)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))

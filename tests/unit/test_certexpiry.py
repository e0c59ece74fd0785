"""A certificate file's expiry, read from its DER: the times openssl printed for these
certificates (``openssl x509 -noout -enddate``) when they were made."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import pytest

from bridge.certexpiry import describe, not_after_der, not_after_pem, read
from bridge.configload import parse_settings
from tests.harness.tls import make_client_cert, make_tls, not_after, openssl_time

# v3, EC, notAfter as UTCTime: "Jan  4 15:08:08 2027 GMT".
UTC_TIME = b"""-----BEGIN CERTIFICATE-----
MIIBcjCCARegAwIBAgIUeGUWWniK3zYpF6UlmnOEBrtq5YYwCgYIKoZIzj0EAwIw
DjEMMAoGA1UEAwwDdXRjMB4XDTI2MTIwNTE1MDgwOFoXDTI3MDEwNDE1MDgwOFow
DjEMMAoGA1UEAwwDdXRjMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE0CethHoI
Fq0a+9U1hJOAvyeXmu/5NjBdkjvDJfRK5RHSNBrA+Cqlo77sS6nSdMDnDPMxAyOr
RLZGNoSq1B9XvqNTMFEwHQYDVR0OBBYEFLsrEVobnmliR7IT4bfvq60hhazOMB8G
A1UdIwQYMBaAFLsrEVobnmliR7IT4bfvq60hhazOMA8GA1UdEwEB/wQFMAMBAf8w
CgYIKoZIzj0EAwIDSQAwRgIhALRRhKQj1fM+pLdsGmeNFxO+/Zq0QhiY/UeXpNjS
cVYiAiEAoccR1f3SORBPPN+Wr5/ZG+QNfOMur+1Od0J1oXrVbH8=
-----END CERTIFICATE-----
"""
# v3, notAfter past 2049, so a GeneralizedTime: "Apr 22 15:08:08 2054 GMT".
GENERALIZED_TIME = b"""-----BEGIN CERTIFICATE-----
MIIBczCCARmgAwIBAgIUcXOW/duANvgxjrGxJdgjLuU0bAswCgYIKoZIzj0EAwIw
DjEMMAoGA1UEAwwDZ2VuMCAXDTI2MTIwNTE1MDgwOFoYDzIwNTQwNDIyMTUwODA4
WjAOMQwwCgYDVQQDDANnZW4wWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAAQU0Hw/
TEK+mxzugmCJrcb9MYULTRiCr396UWl1WUJxseiQWRg9F8RwicE33wwmc5XEARsf
sZ2yn3zp/7lGz6rLo1MwUTAdBgNVHQ4EFgQUPkLMNPXt0LNsu33gCwZelFM+O7kw
HwYDVR0jBBgwFoAUPkLMNPXt0LNsu33gCwZelFM+O7kwDwYDVR0TAQH/BAUwAwEB
/zAKBggqhkjOPQQDAgNIADBFAiEAwB7qb3wfxAmIPoDwVLTuU/3mykDMxDaK31zu
8ZxmrtUCIGBcNFaZXWDNpA9MasONhixBQdFC0pTpDkznInxx6MI6
-----END CERTIFICATE-----
"""
# v1 (no version field), a one-byte long-form length: "Dec  8 15:08:22 2026 GMT".
VERSION_1 = b"""-----BEGIN CERTIFICATE-----
MIIBFDCBuwIUIDILjnVo5pn7wY7xrzkKr9QYqGAwCgYIKoZIzj0EAwIwDTELMAkG
A1UEAwwCdjEwHhcNMjYxMjA1MTUwODIyWhcNMjYxMjA4MTUwODIyWjANMQswCQYD
VQQDDAJ2MTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABNAnrYR6CBatGvvVNYST
gL8nl5rv+TYwXZI7wyX0SuUR0jQawPgqpaO+7Eup0nTA5wzzMQMjq0S2RjaEqtQf
V74wCgYIKoZIzj0EAwIDSAAwRQIgShGZv8SDyxpo7OYgXk4Vb8eFTW+jQ4+QajEk
9coerVMCIQDHRFlKiIrDCnQ4ySIIB+aUwgFMm8MLTwwuF6t9+A3t5Q==
-----END CERTIFICATE-----
"""


@pytest.mark.parametrize(("pem", "expected"), [
    (UTC_TIME, "Jan  4 15:08:08 2027 GMT"),
    (GENERALIZED_TIME, "Apr 22 15:08:08 2054 GMT"),
    (VERSION_1, "Dec  8 15:08:22 2026 GMT"),
])
def test_not_after(pem: bytes, expected: str) -> None:
    assert not_after_pem(pem) == openssl_time(expected)


def test_a_chain_expires_with_its_first_certificate_to_expire() -> None:
    # Any order, with text around the blocks (openssl's "subject=" lines, comments).
    chain = b"subject=CN = gen\n" + GENERALIZED_TIME + b"# next\n" + UTC_TIME + VERSION_1
    assert not_after_pem(chain) == openssl_time("Dec  8 15:08:22 2026 GMT")


def test_files_made_by_openssl_agree_with_its_own_reading(tmp_path: Path) -> None:
    files = make_tls(tmp_path)
    cert, _ = make_client_cert(files, days=400)
    for path in (cert, files.ca_cert, files.server_cert):  # RSA: two-byte lengths
        assert not_after_pem(path.read_bytes()) == not_after(path)


@pytest.mark.parametrize("text", [
    b"",
    b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",  # truncated
    b"-----BEGIN CERTIFICATE-----\nBAMBAgM=\n-----END CERTIFICATE-----\n",  # no SEQUENCE
    b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",  # not base64
])
def test_what_is_no_certificate_is_a_value_error(text: bytes) -> None:
    with pytest.raises(ValueError):
        not_after_pem(text)


def test_every_truncation_is_a_value_error_until_not_after_is_whole() -> None:
    der = base64.b64decode(b"".join(UTC_TIME.split(b"-----")[2].split()))
    for cut in range(len(der)):
        try:
            not_after_der(der[:cut])
        except ValueError:
            continue
        raise AssertionError(f"read a time from the first {cut} of {len(der)} bytes")


def test_the_configured_certificates_and_cas_are_read_and_a_changed_file_is_named(
    tmp_path: Path,
) -> None:
    files = make_tls(tmp_path)
    zk_cert, zk_key = make_client_cert(files, "zk", days=3)
    kafka_cert, kafka_key = make_client_cert(files, "kafka", days=300)
    doc = {
        "region": "us-east", "peers": ["eu-west"],
        "subtrees": [{"name": "critical", "path": "/critical"}],
        # Relative to the configuration file's directory, as an operator may write them.
        "zookeeper": {"hosts": "127.0.0.1:2281",
                      "tls": {"cafile": files.ca_cert.name, "certfile": zk_cert.name,
                              "keyfile": zk_key.name}},
        "kafka": {"bootstrap_servers": "127.0.0.1:9093", "security_protocol": "SSL",
                  "ssl": {"cafile": files.ca_cert.name, "certfile": kafka_cert.name,
                          "keyfile": kafka_key.name}},
    }
    # Kafka's CA file a bundle: the old CA (expiring first) kept beside its successor.
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(files.other_ca_cert.read_bytes() + UTC_TIME)
    doc["kafka"]["ssl"]["cafile"] = bundle.name
    settings = parse_settings(doc, tmp_path, {})
    found, problems = read(settings)
    assert problems == []
    assert not_after_pem(UTC_TIME) < not_after(files.other_ca_cert)
    assert {(e.key, e.path, e.not_after) for e in found} == {
        ("zookeeper.tls.certfile", str(zk_cert), not_after(zk_cert)),
        ("zookeeper.tls.cafile", str(files.ca_cert), not_after(files.ca_cert)),
        ("kafka.ssl.certfile", str(kafka_cert), not_after(kafka_cert)),
        # A bundle is of use until its last CA expires: the latest counts.
        ("kafka.ssl.cafile", str(bundle), not_after(files.other_ca_cert)),
    }
    # Replaced by something else after the configuration was checked: named, not a crash.
    kafka_cert.write_text("not a certificate\n")
    found, problems = read(settings)
    assert [e.key for e in found] == ["zookeeper.tls.certfile", "zookeeper.tls.cafile",
                                      "kafka.ssl.cafile"]
    assert problems == [f"kafka.ssl.certfile: cannot read its expiry from {kafka_cert}: "
                        "no PEM certificate"]
    # Without client certificates there is nothing to read.
    plain = parse_settings({**doc, "zookeeper": {"hosts": "127.0.0.1:2181"},
                            "kafka": {"bootstrap_servers": "127.0.0.1:9092"}}, tmp_path, {})
    assert read(plain) == ((), [])


def test_check_config_lists_each_certificate_and_says_which_expired(tmp_path: Path) -> None:
    files = make_tls(tmp_path)
    cert, key = make_client_cert(files, days=3)
    settings = parse_settings({
        "region": "us-east", "peers": ["eu-west"],
        "subtrees": [{"name": "critical", "path": "/critical"}],
        "zookeeper": {"hosts": "127.0.0.1:2281",
                      "tls": {"certfile": str(cert), "keyfile": str(key)}},
        "kafka": {"bootstrap_servers": "127.0.0.1:9092"}}, tmp_path, {})
    end = not_after(cert)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(end))
    assert describe(settings, end - 2.5 * 86400) == [
        f"zookeeper.tls.certfile {cert} expires {stamp} (in 2.5 days)"]
    assert describe(settings, end + 1) == [
        f"zookeeper.tls.certfile {cert} expires {stamp} "
        "(EXPIRED: refused at the next connection, renew it)"]

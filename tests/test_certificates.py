"""common.certificates: real keys and certificates, checked with real crypto and a real TLS handshake."""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedpriv.common.certificates import (
    CertPaths,
    check_key_pair,
    load_openssh_private_key,
    make_certificates,
    verify_server_certificate,
)
from fedpriv.common.errors import UserInputError


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _snapshot(paths: CertPaths) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in paths.all_files()}


@pytest.fixture
def certs(tmp_path) -> CertPaths:
    return make_certificates(tmp_path / "certs")


@pytest.fixture
def other_certs(tmp_path) -> CertPaths:
    """A second, independent set: another CA, another server key."""
    return make_certificates(tmp_path / "other")


# ----------------------------------------------------------------------------- files and modes


def test_layout_and_modes(tmp_path):
    out = tmp_path / "deep" / "certs"  # parents are created
    paths = make_certificates(out, num_clients=3)
    assert paths.ca_cert == out / "ca.crt" and paths.ca_key == out / "ca.key"
    assert paths.server_cert == out / "server.pem" and paths.server_key == out / "server.key"
    assert paths.client_private_keys == [out / "clients" / f"client-{i}" for i in range(3)]
    assert paths.client_public_keys == [out / "clients" / f"client-{i}.pub" for i in range(3)]
    for private in [paths.ca_key, paths.server_key, *paths.client_private_keys]:
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    for public in [paths.ca_cert, paths.server_cert, *paths.client_public_keys]:
        assert stat.S_IMODE(public.stat().st_mode) == 0o644, public
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "ca.key", "clients", "server.key", "server.pem"]
    assert len(list((out / "clients").iterdir())) == 6  # no temp files left behind


def test_private_keys_are_0600_even_with_a_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        paths = make_certificates(tmp_path / "c", num_clients=1)
    finally:
        os.umask(old)
    for private in [paths.ca_key, paths.server_key, *paths.client_private_keys]:
        assert stat.S_IMODE(private.stat().st_mode) == 0o600


def test_pem_formats(certs):
    assert certs.ca_cert.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    assert certs.server_cert.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    for key_path in (certs.ca_key, certs.server_key):
        assert key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # unencrypted PKCS8
        assert serialization.load_pem_private_key(key_path.read_bytes(), password=None)


# ----------------------------------------------------------------------------- certificate contents


def test_ca_extensions(certs):
    ca = _cert(certs.ca_cert)
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.value.ca is True and bc.critical
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    assert ca.subject == ca.issuer
    ca.verify_directly_issued_by(ca)  # self-signed


def test_server_cert_sans_and_extensions(tmp_path):
    hosts = ["localhost", "127.0.0.1", "SuperLink.Example.org", "::1", "10.0.0.7"]
    paths = make_certificates(tmp_path / "c", hosts=hosts, num_clients=1)
    cert = _cert(paths.server_cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "superlink.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"), ipaddress.ip_address("10.0.0.7")]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski.digest == x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca = _cert(paths.ca_cert)
    assert aki.key_identifier == ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest


def test_default_hosts_are_localhost_and_loopback(certs):
    san = _cert(certs.server_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


def test_server_cert_is_signed_by_the_ca(certs, other_certs):
    ca, cert = _cert(certs.ca_cert), _cert(certs.server_cert)
    cert.verify_directly_issued_by(ca)
    assert cert.issuer == ca.subject
    # and explicitly with the CA public key
    ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    with pytest.raises((InvalidSignature, ValueError)):
        cert.verify_directly_issued_by(_cert(other_certs.ca_cert))


def test_validity_period(tmp_path):
    paths = make_certificates(tmp_path / "c", num_clients=1, valid_days=30)
    cert = _cert(paths.server_cert)
    span = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 30 * 86400 <= span.total_seconds() <= 30 * 86400 + 3600  # 30 days plus the clock-skew margin


# ----------------------------------------------------------------------------- SuperNode keys


def test_client_keys_are_openssh_secp384r1_pairs(certs):
    assert len(certs.client_private_keys) == 2
    seen = set()
    for private_path, public_path in zip(certs.client_private_keys, certs.client_public_keys):
        private_bytes, public_bytes = private_path.read_bytes(), public_path.read_bytes()
        assert private_bytes.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
        assert public_bytes.startswith(b"ecdsa-sha2-nistp384 AAAA") and public_bytes.count(b"\n") == 1
        private = serialization.load_ssh_private_key(private_bytes, password=None)
        public = serialization.load_ssh_public_key(public_bytes)
        assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP384R1)
        assert isinstance(public, ec.EllipticCurvePublicKey) and isinstance(public.curve, ec.SECP384R1)
        assert private.public_key().public_numbers() == public.public_numbers()
        seen.add(public_bytes)
        check_key_pair(private_path, public_path)
        assert load_openssh_private_key(private_path).private_numbers() == private.private_numbers()
    assert len(seen) == 2  # every client gets its own key


def test_check_key_pair_detects_mismatch(certs):
    with pytest.raises(UserInputError, match="does not match"):
        check_key_pair(certs.client_private_keys[0], certs.client_public_keys[1])


def test_garbage_or_missing_key_files(certs, tmp_path):
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"-----BEGIN OPENSSH PRIVATE KEY-----\nnot a key\n-----END OPENSSH PRIVATE KEY-----\n")
    with pytest.raises(UserInputError, match=str(garbage)):
        load_openssh_private_key(garbage)
    with pytest.raises(UserInputError, match=str(garbage)):
        check_key_pair(garbage, certs.client_public_keys[0])
    with pytest.raises(UserInputError, match=str(garbage)):
        check_key_pair(certs.client_private_keys[0], garbage)
    with pytest.raises(UserInputError, match="does not exist"):
        load_openssh_private_key(tmp_path / "missing")
    with pytest.raises(UserInputError, match="not an unencrypted OpenSSH"):
        load_openssh_private_key(certs.server_key)  # a PEM key is not an OpenSSH key


# ----------------------------------------------------------------------------- verify_server_certificate


def test_verify_server_certificate_accepts_a_good_set(certs):
    verify_server_certificate(certs.ca_cert, certs.server_cert, certs.server_key)


def test_verify_server_certificate_detects_other_ca(certs, other_certs):
    with pytest.raises(UserInputError, match="not signed by the CA"):
        verify_server_certificate(other_certs.ca_cert, certs.server_cert, certs.server_key)


def test_verify_server_certificate_detects_key_mismatch(certs, other_certs):
    with pytest.raises(UserInputError, match="does not match"):
        verify_server_certificate(certs.ca_cert, certs.server_cert, other_certs.server_key)


def test_verify_server_certificate_missing_or_garbage(certs, tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        verify_server_certificate(tmp_path / "nope.crt", certs.server_cert, certs.server_key)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello")
    with pytest.raises(UserInputError, match="not a PEM"):
        verify_server_certificate(certs.ca_cert, garbage, certs.server_key)
    with pytest.raises(UserInputError, match="not a PEM private key"):
        verify_server_certificate(certs.ca_cert, certs.server_cert, garbage)
    with pytest.raises(UserInputError, match="not a CA certificate"):
        verify_server_certificate(certs.server_cert, certs.server_cert, certs.server_key)


# ----------------------------------------------------------------------------- overwrite protection


def test_second_call_without_force_refuses_and_changes_nothing(certs):
    out = certs.ca_cert.parent
    before = _snapshot(certs)
    with pytest.raises(UserInputError, match="already exists; pass --force") as err:
        make_certificates(out)
    assert "\n" not in str(err.value) and str(out) in str(err.value)
    assert _snapshot(certs) == before


def test_any_single_existing_file_blocks_everything(tmp_path):
    out = tmp_path / "c"
    (out / "clients").mkdir(parents=True)
    (out / "clients" / "client-1.pub").write_text("mine")
    with pytest.raises(UserInputError, match="client-1.pub already exists"):
        make_certificates(out)
    assert sorted(p.name for p in out.rglob("*")) == ["client-1.pub", "clients"]  # nothing was written
    assert (out / "clients" / "client-1.pub").read_text() == "mine"


def test_force_replaces_everything(certs):
    out = certs.ca_cert.parent
    before = _snapshot(certs)
    again = make_certificates(out, force=True)
    assert again == certs
    after = _snapshot(again)
    assert all(after[p] != before[p] for p in before)
    for private in [again.ca_key, again.server_key, *again.client_private_keys]:
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    verify_server_certificate(again.ca_cert, again.server_cert, again.server_key)
    assert not [p for p in out.rglob("*.tmp")]


def test_force_tightens_a_loose_private_key(certs):
    os.chmod(certs.server_key, 0o644)
    make_certificates(certs.ca_cert.parent, force=True)
    assert stat.S_IMODE(certs.server_key.stat().st_mode) == 0o600


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("host", ["bad host", "-leading.example", "a..b", "under_score.example", "1.2.3",
                                  "300.1.1.1", "[::1]", "", "x" * 64 + ".example", "exämple.org"])
def test_bad_host(tmp_path, host):
    with pytest.raises(UserInputError, match="--host") as err:
        make_certificates(tmp_path / "c", hosts=[host])
    assert "\n" not in str(err.value)
    assert not (tmp_path / "c").exists()


def test_no_hosts(tmp_path):
    with pytest.raises(UserInputError, match="--host"):
        make_certificates(tmp_path / "c", hosts=[])


@pytest.mark.parametrize("n", [0, -1])
def test_zero_clients(tmp_path, n):
    with pytest.raises(UserInputError, match="--clients"):
        make_certificates(tmp_path / "c", num_clients=n)
    assert not (tmp_path / "c").exists()


def test_bad_valid_days(tmp_path):
    with pytest.raises(UserInputError, match="--valid-days"):
        make_certificates(tmp_path / "c", valid_days=0)


def test_unwritable_out_dir(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(UserInputError, match="--out .* is not writable"):
        make_certificates(blocker / "certs")
    with pytest.raises(UserInputError, match="--out .* is not writable"):
        make_certificates(blocker)  # the out dir itself is a regular file
    assert blocker.read_text() == "x"


# ----------------------------------------------------------------------------- real TLS handshake


class _TlsServer:
    """A one-thread TLS server on 127.0.0.1 that answers b"ok" after each handshake."""

    def __init__(self, cert: Path, key: Path):
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(certfile=str(cert), keyfile=str(key))
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            conn.settimeout(5)
            try:
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError):  # the client refused our certificate: expected in some tests
                conn.close()

    def __enter__(self) -> "_TlsServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()


def _handshake(port: int, cafile: Path, server_hostname: str) -> bytes:
    context = ssl.create_default_context(cafile=str(cafile))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=server_hostname) as tls:
            assert tls.getpeercert() is not None
            return tls.recv(2)


def test_real_tls_handshake(certs, other_certs):
    with _TlsServer(certs.server_cert, certs.server_key) as server:
        assert _handshake(server.port, certs.ca_cert, "localhost") == b"ok"
        assert _handshake(server.port, certs.ca_cert, "127.0.0.1") == b"ok"
        with pytest.raises(ssl.SSLCertVerificationError):  # a CA that did not sign the server cert
            _handshake(server.port, other_certs.ca_cert, "localhost")
        with pytest.raises(ssl.SSLCertVerificationError):  # a host name not in the SANs
            _handshake(server.port, certs.ca_cert, "superlink.example.org")


def test_real_grpc_tls_round_trip(certs, other_certs):
    """The transport Flower actually uses: a gRPC server with these files, reached by name and by IP."""
    grpc = pytest.importorskip("grpc")
    from concurrent import futures

    creds = grpc.ssl_server_credentials([(certs.server_key.read_bytes(), certs.server_cert.read_bytes())])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.method_handlers_generic_handler(
        "test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(lambda request, context: request)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        for host in ("localhost", "127.0.0.1"):
            with grpc.secure_channel(f"{host}:{port}",
                                     grpc.ssl_channel_credentials(certs.ca_cert.read_bytes())) as channel:
                assert channel.unary_unary("/test.Echo/Echo")(b"hi", timeout=5) == b"hi"
        with grpc.secure_channel(f"localhost:{port}",
                                 grpc.ssl_channel_credentials(other_certs.ca_cert.read_bytes())) as channel:
            with pytest.raises(grpc.RpcError) as err:
                channel.unary_unary("/test.Echo/Echo")(b"hi", timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(grace=None)

"""TLS certificates and SuperNode authentication keys for a Flower 1.42 deployment.

Why this module exists: a real (non-simulated) Flower deployment needs

* a private CA plus a server certificate for the SuperLink, passed as
  ``flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key``
  (SuperNodes get ``--root-certificates ca.crt``). gRPC checks the host name a SuperNode dials
  against the certificate's subjectAltName, so every host clients use must be listed there;
* one EC SECP384R1 key pair per SuperNode for node authentication, in OpenSSH format
  (``--auth-supernode-private-key clients/client-<i>``; the ``.pub`` line is what gets
  registered with the SuperLink).

Everything is made with the ``cryptography`` package: no ``openssl`` binary, no hand-rolled crypto.
Private keys are created with mode 0600 from the first byte on (never world-readable, not even
briefly), and nothing is overwritten unless the caller explicitly asks for it with ``force=True``.
Every problem a user can cause is reported as a one-line :class:`~common.errors.UserInputError`.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedpriv.common.errors import UserInputError

__all__ = [
    "CertPaths",
    "make_certificates",
    "check_key_pair",
    "load_certificate",
    "load_openssh_private_key",
    "verify_server_certificate",
]

DEFAULT_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1")
MAX_VALID_DAYS = 100 * 365  # far beyond any sane use; keeps datetime arithmetic in range

# Clocks of the machines in a federation are rarely in perfect sync: back-date a little so that a
# certificate made on one machine is not "not yet valid" on another.
_CLOCK_SKEW = _dt.timedelta(minutes=5)
_CURVE = ec.SECP384R1  # CA, server and SuperNode keys (Flower requires a NIST curve for node auth)
_HASH = hashes.SHA384  # matches the strength of P-384

# RFC 1123 host name label: letters, digits, hyphens; not starting or ending with a hyphen.
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


@dataclass(frozen=True)
class CertPaths:
    """Where everything lives inside the output folder (so callers never rebuild file names)."""

    ca_cert: Path  # ca.crt: trust anchor, given to SuperLink and every SuperNode
    ca_key: Path  # ca.key (0600): only needed to issue more certificates; keep it offline
    server_cert: Path  # server.pem: SuperLink certificate, signed by the CA
    server_key: Path  # server.key (0600): SuperLink private key
    client_private_keys: list[Path]  # clients/client-<i> (OpenSSH private key, 0600)
    client_public_keys: list[Path]  # clients/client-<i>.pub (OpenSSH public key line)

    @classmethod
    def in_dir(cls, out_dir: Path, num_clients: int) -> "CertPaths":
        """The layout :func:`make_certificates` writes (clients numbered from 0, like ``client-0``)."""
        out_dir = Path(out_dir)
        clients = out_dir / "clients"
        return cls(
            ca_cert=out_dir / "ca.crt",
            ca_key=out_dir / "ca.key",
            server_cert=out_dir / "server.pem",
            server_key=out_dir / "server.key",
            client_private_keys=[clients / f"client-{i}" for i in range(num_clients)],
            client_public_keys=[clients / f"client-{i}.pub" for i in range(num_clients)],
        )

    def all_files(self) -> list[Path]:
        """Every file of the set, in the order they are written."""
        files = [self.ca_cert, self.ca_key, self.server_cert, self.server_key]
        for private, public in zip(self.client_private_keys, self.client_public_keys):
            files += [private, public]
        return files


# ----------------------------------------------------------------------------- validation


def _parse_host(host: object) -> Union[str, IPAddress]:
    """An IP address object or a validated DNS name; UserInputError naming ``--host`` otherwise."""
    if not isinstance(host, str) or not host.strip():
        raise UserInputError(f"--host must be a DNS name or an IP address (got {host!r})")
    text = host.strip()
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    if text.startswith("[") and text.endswith("]"):
        raise UserInputError(f"--host {text} is not valid: write IPv6 addresses without brackets, "
                             f"e.g. --host {text[1:-1]}")
    labels = text.split(".")
    if (len(text) > 253 or not all(_LABEL.match(label) for label in labels)
            or labels[-1].isdigit()):  # "1.2.3" / "300.1.1.1": a mistyped IP, not a name
        raise UserInputError(
            f"--host {text!r} is neither an IP address nor a valid DNS name "
            "(letters, digits and hyphens in dot-separated labels, e.g. --host superlink.example.org)")
    return text.lower()  # DNS names are case-insensitive; certificates conventionally use lower case


def _validate_hosts(hosts: Union[str, Sequence[str]]) -> list[Union[str, IPAddress]]:
    """Parsed, de-duplicated hosts in the order given."""
    if isinstance(hosts, str):  # a single host passed as a string, not a list of its characters
        hosts = [hosts]
    parsed: list[Union[str, IPAddress]] = []
    for host in hosts or []:
        value = _parse_host(host)
        if value not in parsed:
            parsed.append(value)
    if not parsed:
        raise UserInputError("--host needs at least one host name or IP address that SuperNodes "
                             "use to reach the SuperLink, e.g. --host localhost --host 127.0.0.1")
    return parsed


def _check_writable(out_dir: Path) -> None:
    """Fail early (before any key is made) if ``out_dir`` cannot hold the files."""
    probe = out_dir
    while not probe.exists() and not probe.is_symlink() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        what = "is not a directory" if probe == out_dir else f"cannot be created: {probe} is not a directory"
        raise UserInputError(f"--out {out_dir} is not writable: it {what}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserInputError(f"--out {out_dir} is not writable: no write permission on {probe}")
    clients = out_dir / "clients"
    if (clients.exists() or clients.is_symlink()) and not clients.is_dir():
        raise UserInputError(f"--out {out_dir} is not writable: {clients} exists and is not a directory")


# ----------------------------------------------------------------------------- generation


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedpriv"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _pem_private_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Unencrypted PKCS8 PEM: what gRPC / Flower's --ssl-keyfile reads without a passphrase."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _make_ca(now: _dt.datetime, not_after: _dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(_CURVE())
    # A random suffix tells different CAs apart in error messages and trust stores.
    name = _name(f"fedpriv CA {secrets.token_hex(4)}")
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, _HASH())
    )
    return key, cert


def _make_server(hosts: list[Union[str, IPAddress]], ca_key: ec.EllipticCurvePrivateKey,
                 ca_cert: x509.Certificate, now: _dt.datetime,
                 not_after: _dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(_CURVE())
    sans: list[x509.GeneralName] = [
        x509.DNSName(h) if isinstance(h, str) else x509.IPAddress(h) for h in hosts
    ]
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedpriv SuperLink"))  # clients check the SANs below, not the CN
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, _HASH())
    )
    return key, cert


def _make_client_key() -> tuple[bytes, bytes]:
    """(OpenSSH private key, OpenSSH public key line): the formats flower-supernode and the
    SuperLink's node registration read."""
    key = ec.generate_private_key(_CURVE())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


# ----------------------------------------------------------------------------- writing


def _write_fd(fd: int, data: bytes, mode: int) -> None:
    """Set the exact mode (independent of umask), write everything, fsync, close."""
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    """Best effort: make the renames durable (not supported everywhere, hence no error)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_new(files: list[tuple[Path, bytes, int]], out_dir: Path) -> None:
    """Create files that must not exist yet (O_EXCL); on any failure remove what this call made."""
    created: list[Path] = []
    try:
        for path, data, mode in files:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            except FileExistsError:
                raise UserInputError(f"{path} already exists; pass --force to replace the certificates "
                                     f"in {out_dir}") from None
            created.append(path)
            _write_fd(fd, data, mode)
    except BaseException:
        for path in created:
            try:
                path.unlink()
            except OSError:
                pass
        raise


def _replace_all(files: list[tuple[Path, bytes, int]]) -> None:
    """Stage every file as a temp file next to its target (created 0600, then given its final
    mode), and only when all are written, rename each over its target (atomic per file)."""
    staged: list[tuple[str, Path]] = []
    try:
        for path, data, mode in files:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # 0600
            staged.append((tmp, path))
            _write_fd(fd, data, mode)
        while staged:
            tmp, path = staged[0]
            os.replace(tmp, path)
            staged.pop(0)
    finally:
        for tmp, _ in staged:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def make_certificates(out_dir: Path, hosts: Sequence[str] = DEFAULT_HOSTS, num_clients: int = 2,
                      force: bool = False, valid_days: int = 365) -> CertPaths:
    """Create a CA, a SuperLink server certificate for ``hosts`` and ``num_clients`` SuperNode key
    pairs in ``out_dir`` (layout: :class:`CertPaths`).

    Why the checks: overwriting a CA silently would lock out every SuperNode that trusts the old
    one, so existing files are only replaced with ``force=True`` (then atomically, file by file);
    all inputs are validated before any file is touched, so a bad option leaves no half-written set.
    """
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise UserInputError(f"--clients must be an integer >= 1 (got {num_clients!r}): "
                             "one authentication key pair is made per SuperNode")
    if isinstance(valid_days, bool) or not isinstance(valid_days, int) or not 1 <= valid_days <= MAX_VALID_DAYS:
        raise UserInputError(f"--valid-days must be an integer between 1 and {MAX_VALID_DAYS} (got {valid_days!r})")
    parsed_hosts = _validate_hosts(hosts)
    out_dir = Path(out_dir).expanduser()
    _check_writable(out_dir)
    paths = CertPaths.in_dir(out_dir, num_clients)

    if not force:
        for path in paths.all_files():
            if path.exists() or path.is_symlink():
                raise UserInputError(f"{path} already exists; pass --force to replace the certificates "
                                     f"in {out_dir}")

    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)
    not_after = now + _dt.timedelta(days=valid_days)
    ca_key, ca_cert = _make_ca(now, not_after)
    server_key, server_cert = _make_server(parsed_hosts, ca_key, ca_cert, now, not_after)
    files: list[tuple[Path, bytes, int]] = [
        (paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644),
        (paths.ca_key, _pem_private_key(ca_key), 0o600),
        (paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), 0o644),
        (paths.server_key, _pem_private_key(server_key), 0o600),
    ]
    for private_path, public_path in zip(paths.client_private_keys, paths.client_public_keys):
        private, public = _make_client_key()
        files += [(private_path, private, 0o600), (public_path, public, 0o644)]

    try:
        (out_dir / "clients").mkdir(parents=True, exist_ok=True)
        if force:
            _replace_all(files)
        else:
            _write_new(files, out_dir)
    except OSError as err:
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        raise UserInputError(f"--out {out_dir} is not writable: {err.strerror or err}{where}") from err
    _fsync_dir(out_dir)
    _fsync_dir(out_dir / "clients")
    return paths


# ----------------------------------------------------------------------------- loading and checks


def _read(path: Path, what: str) -> bytes:
    path = Path(path).expanduser()
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UserInputError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise UserInputError(f"{what} {path} is a directory, not a file") from None
    except OSError as err:
        raise UserInputError(f"{what} {path} cannot be read: {err.strerror or err}") from None


def load_openssh_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load a SuperNode authentication key the way flower-supernode will, but fail with a message
    naming the file (Flower only says "Unable to parse the private key file")."""
    data = _read(path, "SuperNode private key")
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        hint = "; it is passphrase-protected" if "password" in str(err).lower() else ""
        raise UserInputError(f"SuperNode private key {path} is not an unencrypted OpenSSH private key{hint}; "
                             "regenerate it with make_certificates") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, _CURVE):
        kind = f"EC {key.curve.name}" if isinstance(key, ec.EllipticCurvePrivateKey) else type(key).__name__
        raise UserInputError(f"SuperNode private key {path} is a {kind} key; Flower SuperNode authentication "
                             "here uses EC secp384r1 keys")
    return key


def _load_openssh_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    data = _read(path, "SuperNode public key")
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise UserInputError(f"SuperNode public key {path} is not an OpenSSH public key line "
                             "(ecdsa-sha2-nistp384 AAAA...)") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, _CURVE):
        raise UserInputError(f"SuperNode public key {path} is not an EC secp384r1 key")
    return key


def _raw_public(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def check_key_pair(private_key_path: Path, public_key_path: Path) -> None:
    """Check that a SuperNode's private key belongs to the public key registered for it: a
    mismatch makes the SuperLink reject the node with an unhelpful authentication error."""
    private = load_openssh_private_key(private_key_path)
    public = _load_openssh_public_key(public_key_path)
    if _raw_public(private.public_key()) != _raw_public(public):
        raise UserInputError(f"key {private_key_path} does not match public key {public_key_path}; "
                             "register the .pub file made together with this private key")


def load_certificate(path: Path, what: str) -> x509.Certificate:
    """A PEM or DER certificate; a one-line error naming ``what`` and the path otherwise."""
    data = _read(path, what)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        try:
            return x509.load_der_x509_certificate(data)
        except ValueError:
            raise UserInputError(f"{what} {path} is not a PEM or DER X.509 certificate") from None


def verify_server_certificate(ca_cert: Path, server_cert: Path, server_key: Path) -> None:
    """Check the SuperLink TLS files before starting it: gRPC reports a wrong CA or a cert/key
    mismatch only as a vague handshake failure on the SuperNode side."""
    ca = load_certificate(ca_cert, "CA certificate")
    cert = load_certificate(server_cert, "server certificate")
    key_data = _read(server_key, "server key")
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except TypeError:  # encrypted: gRPC cannot use a passphrase-protected key
        raise UserInputError(f"server key {server_key} is passphrase-protected; the SuperLink needs an "
                             "unencrypted PEM key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise UserInputError(f"server key {server_key} is not a PEM private key") from None

    try:
        constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = constraints.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise UserInputError(f"CA certificate {ca_cert} is not a CA certificate (BasicConstraints ca=True missing)")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, InvalidSignature, TypeError):
        raise UserInputError(f"server certificate {server_cert} is not signed by the CA in {ca_cert}; "
                             "use the ca.crt made together with it, or regenerate both") from None

    if cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != \
            key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise UserInputError(f"server key {server_key} does not match server certificate {server_cert}")

    now = _dt.datetime.now(_dt.timezone.utc)
    for path, c in ((ca_cert, ca), (server_cert, cert)):
        if now < c.not_valid_before_utc:
            raise UserInputError(f"certificate {path} is not valid before {c.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; "
                                 "check this machine's clock")
        if now > c.not_valid_after_utc:
            raise UserInputError(f"certificate {path} expired on {c.not_valid_after_utc:%Y-%m-%d}; "
                                 "regenerate the certificates with --force")

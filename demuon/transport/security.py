"""CURVE keys and the ZAP allow-list for :class:`~demuon.transport.zeromq.ZmqTransport` (layer 3).

Keys are Z85-encoded CURVE keypairs (40 ASCII bytes each), stored as ZeroMQ certificate files
(``zmq.auth.create_certificates``): ``peer-<id>.key`` holds the public key (safe to share, every
peer needs all of them), ``peer-<id>.key_secret`` holds both keys (mode 0600, only peer ``id``
needs it).

How a transport uses them: its ROUTER is a CURVE server with the peer's own keys; each DEALER is a
CURVE client that knows its server's public key; a :class:`ZapAllowList` bound in the transport's
ZeroMQ context admits a connecting client only if its public key is on the allow-list (peer id →
public key), and reports the matching peer id as the connection's ZAP User-Id so the receiver can
check that the routing identity a client claims is the one its key belongs to.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.asyncio
from zmq.auth.base import Authenticator
from zmq.auth.certs import create_certificates, load_certificate
from zmq.utils import z85

from demuon.errors import TransportError

#: Length of a Z85-encoded 32-byte CURVE key.
Z85_KEY_LEN = 40
#: ZAP domain every demuon ROUTER declares.
ZAP_DOMAIN = "demuon"

_PUBLIC_FILE = re.compile(r"^peer-(\d+)\.key$")

log = logging.getLogger(__name__)


def as_key(key: bytes | str, what: str = "key") -> bytes:
    """A Z85 key as bytes, checked for length and alphabet."""
    raw = key.encode("ascii") if isinstance(key, str) else bytes(key)
    try:
        if len(raw) != Z85_KEY_LEN:
            raise ValueError(f"length {len(raw)}")
        z85.decode(raw)
    except (ValueError, KeyError, UnicodeError) as exc:
        raise TransportError(f"{what} is not a {Z85_KEY_LEN}-character Z85 CURVE key ({exc})") from exc
    return raw


@dataclass(frozen=True)
class CurveKeys:
    """One peer's CURVE keypair, Z85-encoded."""

    public: bytes
    secret: bytes

    def __post_init__(self) -> None:
        object.__setattr__(self, "public", as_key(self.public, "public key"))
        object.__setattr__(self, "secret", as_key(self.secret, "secret key"))

    def __repr__(self) -> str:  # never print a secret key
        return f"CurveKeys(public={self.public.decode()!r}, secret=<hidden>)"

    @classmethod
    def generate(cls) -> CurveKeys:
        public, secret = zmq.curve_keypair()
        return cls(public, secret)


def generate_keys(directory: str | os.PathLike[str], peer_ids: Iterable[int]) -> dict[int, Path]:
    """Write ``peer-<id>.key`` / ``peer-<id>.key_secret`` for each id; return id → secret file."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    out: dict[int, Path] = {}
    for pid in peer_ids:
        if pid < 0:
            raise TransportError(f"peer id must be >= 0, got {pid}", peer=pid)
        _, secret_file = create_certificates(d, f"peer-{pid}")
        os.chmod(secret_file, 0o600)
        out[pid] = Path(secret_file)
    return out


def ensure_keys(directory: str | os.PathLike[str], n_peers: int) -> Path:
    """Keys for peers ``0 … n_peers − 1`` in ``directory``: the ones already there are kept (a
    restarted or resumed peer finds its key again), the missing ones generated. Returns the folder."""
    d = Path(directory)
    missing = [i for i in range(n_peers) if not (d / f"peer-{i}.key_secret").is_file()]
    if missing:
        generate_keys(d, missing)
    return d


def load_keys(directory: str | os.PathLike[str], peer_id: int) -> CurveKeys:
    """Peer ``peer_id``'s own keypair from ``peer-<id>.key_secret``."""
    path = Path(directory) / f"peer-{peer_id}.key_secret"
    try:
        public, secret = load_certificate(path)
    except (OSError, ValueError) as exc:
        raise TransportError(f"cannot read CURVE keys of peer {peer_id}: {exc}", peer=peer_id) from exc
    if secret is None:
        raise TransportError(f"{path} holds no secret key", peer=peer_id)
    return CurveKeys(public, secret)


def load_public_keys(directory: str | os.PathLike[str]) -> dict[int, bytes]:
    """Every ``peer-<id>.key`` in ``directory``: peer id → Z85 public key (sorted by id)."""
    d = Path(directory)
    if not d.is_dir():
        raise TransportError(f"no key directory {d}")
    keys: dict[int, bytes] = {}
    for path in d.iterdir():
        m = _PUBLIC_FILE.match(path.name)
        if m:
            public, _ = load_certificate(path)
            keys[int(m.group(1))] = as_key(public, f"public key in {path}")
    return dict(sorted(keys.items()))


class ZapAllowList(Authenticator):
    """ZAP handler admitting CURVE clients whose public key is on an allow-list.

    A copy of ``zmq.auth.asyncio.AsyncioAuthenticator``'s loop, except that the loop is a
    coroutine (:meth:`serve`) run by a task its owner creates and awaits, instead of a task the
    authenticator starts and forgets. There is one ZAP endpoint per ZeroMQ context, so one
    ``ZapAllowList`` per context; it must be started before the server socket binds.
    """

    def __init__(self, context: zmq.asyncio.Context, allowed: Mapping[int, bytes | str]) -> None:
        super().__init__(context, log=log)
        self._peer_of: dict[bytes, int] = {}
        self.update(allowed)
        self.configure_curve_callback(ZAP_DOMAIN, self)

    def update(self, allowed: Mapping[int, bytes | str]) -> None:
        """Replace the allow-list (peer id → Z85 public key)."""
        peer_of: dict[bytes, int] = {}
        for pid, key in allowed.items():
            k = as_key(key, f"public key of peer {pid}")
            if k in peer_of:
                raise TransportError(f"peers {peer_of[k]} and {pid} share a public key", peer=pid)
            peer_of[k] = pid
        self._peer_of = peer_of

    def callback(self, domain: str, key: bytes) -> bool:
        """Called by ``Authenticator`` with the client's Z85 public key."""
        return key in self._peer_of

    def curve_user_id(self, client_public_key: bytes) -> str:
        """The ZAP User-Id of an admitted client: its peer id, in decimal."""
        return str(self._peer_of[z85.encode(client_public_key)])

    def start(self) -> None:
        try:
            super().start()
        except zmq.ZMQError as exc:
            raise TransportError(f"cannot bind the ZAP handler (one per ZeroMQ context): {exc}") from exc

    async def serve(self) -> None:
        """Answer ZAP requests until cancelled."""
        poller = zmq.asyncio.Poller()
        poller.register(self.zap_socket, zmq.POLLIN)
        try:
            while True:
                events = dict(await poller.poll())
                if self.zap_socket in events:
                    await self.handle_zap_message(self.zap_socket.recv_multipart())
        finally:
            poller.unregister(self.zap_socket)


def is_loopback(endpoint: str) -> bool:
    """Whether a ZeroMQ endpoint stays on this machine: ``ipc://`` and ``inproc://``, or
    ``tcp://`` to a loopback address (127.0.0.0/8, ::1) or ``localhost``. A wildcard or any other
    host is not (it can be reached, or reach out, beyond this machine)."""
    scheme, _, address = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = address.rpartition(":")[0].removeprefix("[").removesuffix("]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

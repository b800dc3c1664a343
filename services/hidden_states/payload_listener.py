"""The service's payload port: accepts side-channel connections and binds each to its Extract call.

    listener = PayloadListener("127.0.0.1", 0).start()      # listener.port: what GetInfo advertises
    binding = listener.expect(token)                          # an Extract call announced this token
    ... binding.socket ...                                    # None until the client's connection arrives
    listener.release(binding)                                 # the call ended: forget it, close it

A connection is kept only if it presents, within `handshake_timeout_s`, the token of a call that
is waiting for one (dflash_core/wire/payload_channel.py). Anything else (garbage, another version,
a token no call announced, a second connection for an already bound call) is logged and closed;
the calls and connections already bound are not touched. Handshakes in progress are bounded, so a
flood of idle connections costs a bounded number of threads.
"""

from __future__ import annotations

import logging
import socket
import threading

from dflash_core.wire.payload_channel import PayloadChannelError, close, read_handshake, send_ack, tune

logger = logging.getLogger(__name__)


class PayloadBinding:
    """One Extract call's end of the side channel: empty until its client's connection arrives."""

    def __init__(self, token: bytes) -> None:
        self.token = token
        self._socket: socket.socket | None = None
        self._closed = False
        self._lock = threading.Lock()

    @property
    def socket(self) -> socket.socket | None:
        # Under the lock: a client that got its acknowledgement finds the socket set here.
        with self._lock:
            return self._socket

    def attach(self, sock: socket.socket) -> bool:
        """Bind `sock` and acknowledge it; False (sock untouched) when already bound or closed."""
        with self._lock:
            if self._closed or self._socket is not None:
                return False
            send_ack(sock)  # before publishing: the call's thread may write samples at once
            self._socket = sock
            return True

    def close(self) -> None:
        """Close the connection; also wakes a `sendall` blocked on a client that stopped reading.

        `socket` stays set: the call's next send fails and ends the call, instead of the call
        carrying on in-band while its client sees the connection break."""
        with self._lock:
            self._closed = True
            sock = self._socket
        if sock is not None:
            close(sock)


class PayloadListener:
    def __init__(
        self, host: str, port: int = 0, *, handshake_timeout_s: float = 5.0, max_handshakes: int = 64
    ) -> None:
        # The gRPC host may be written "[::1]"; sockets want the bare address.
        self._server = socket.create_server(
            (host.strip("[]"), port), family=_family(host), backlog=128, reuse_port=False
        )
        self._server.settimeout(0.5)  # the accept loop looks at `_stopping` this often
        self.host = host
        self.port: int = self._server.getsockname()[1]
        self.handshake_timeout_s = handshake_timeout_s
        self._handshakes = threading.BoundedSemaphore(max_handshakes)
        self._waiting: dict[bytes, PayloadBinding] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="payload-accept", daemon=True)
        self.refused = 0  # connections closed without a binding (tests and logs read it)

    def start(self) -> PayloadListener:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        self._server.close()
        with self._lock:
            bindings, self._waiting = list(self._waiting.values()), {}
        for binding in bindings:
            binding.close()

    # ------------------------------------------------------------------ called by Extract calls
    def expect(self, token: bytes) -> PayloadBinding | None:
        """Wait for a connection presenting `token`; None when another call already announced it."""
        with self._lock:
            if token in self._waiting:
                return None
            binding = PayloadBinding(token)
            self._waiting[token] = binding
            return binding

    @property
    def bound(self) -> int:
        """Calls whose connection is bound now."""
        with self._lock:
            return sum(1 for b in self._waiting.values() if b.socket is not None)

    def drop_connections(self) -> int:
        """Close every bound connection (their calls fail with UNAVAILABLE and clients reconnect,
        as after a network fault); the port stays open. How many were closed."""
        with self._lock:
            bound = [b for b in self._waiting.values() if b.socket is not None]
        for binding in bound:
            binding.close()
        return len(bound)

    def release(self, binding: PayloadBinding) -> None:
        with self._lock:
            if self._waiting.get(binding.token) is binding:
                del self._waiting[binding.token]
        binding.close()

    # ------------------------------------------------------------------ accept and handshake
    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, peer = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                logger.exception("payload port %d: accept failed", self.port)
                self._stopping.wait(0.1)  # out of file descriptors, say: do not spin
                continue
            if not self._handshakes.acquire(blocking=False):
                self._refuse(sock, peer, "too many handshakes in progress")
                continue
            threading.Thread(
                target=self._handshake, args=(sock, peer), name="payload-handshake", daemon=True
            ).start()

    def _handshake(self, sock: socket.socket, peer: object) -> None:
        try:
            sock.settimeout(self.handshake_timeout_s)
            try:
                token = read_handshake(sock)
            except (PayloadChannelError, OSError) as exc:
                self._refuse(sock, peer, str(exc) or type(exc).__name__)
                return
            with self._lock:
                binding = self._waiting.get(token)
            if binding is None:
                self._refuse(sock, peer, "its token matches no Extract call")
                return
            try:
                sock.settimeout(None)
                tune(sock)
                bound = binding.attach(sock)
            except OSError as exc:
                self._refuse(sock, peer, f"the acknowledgement failed: {exc}")
                return
            if not bound:
                self._refuse(sock, peer, "its Extract call is already bound or over")
        finally:
            self._handshakes.release()

    def _refuse(self, sock: socket.socket, peer: object, reason: str) -> None:
        with self._lock:
            self.refused += 1
        logger.warning("payload port %d: closed a connection from %s: %s", self.port, peer, reason)
        close(sock)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET

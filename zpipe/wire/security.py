"""CurveZMQ on every link: encryption, and only holders of the pipeline's keys may connect.

`zpipe keys DIR` writes two key pairs: ``server`` for every socket that binds
(each replica's input, the supervisor) and ``client`` for every socket that
connects. A binding socket accepts only clients whose public key is in DIR,
so a peer without the keys can neither send items in nor receive any.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import zmq

from ..errors import ConfigError


def create_keys(folder: str | Path) -> list[Path]:
    """Write the server and client key pairs into ``folder``; returns the files."""
    import zmq.auth
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for name in ("server", "client"):
        public, secret = zmq.auth.create_certificates(folder, name)
        Path(secret).chmod(0o600)
        files += [Path(public), Path(secret)]
    return files


class Curve:
    """The keys of one pipeline, applied to sockets of one process."""

    def __init__(self, folder: str | Path):
        import zmq.auth
        self.folder = Path(folder)
        try:
            self.server_public, self.server_secret = zmq.auth.load_certificate(
                self.folder / "server.key_secret")
            self.client_public, self.client_secret = zmq.auth.load_certificate(
                self.folder / "client.key_secret")
        except (OSError, ValueError) as exc:
            raise ConfigError(f"keys in {self.folder}: {exc} (make them with `zpipe keys "
                              f"{self.folder}`)") from None

    def server(self, ctx: zmq.Context, sock: zmq.Socket) -> None:
        """Before bind: encrypt, and admit only clients whose key is in the folder."""
        if ctx not in _authenticators:
            # One ZAP handler per context (threads of one process share one).
            from zmq.auth.thread import ThreadAuthenticator
            authenticator = ThreadAuthenticator(ctx)
            authenticator.start()
            authenticator.configure_curve(domain="*", location=str(self.folder))
            _authenticators[ctx] = authenticator
        sock.curve_secretkey = self.server_secret
        sock.curve_publickey = self.server_public
        sock.curve_server = True

    def client(self, sock: zmq.Socket) -> None:
        """Before connect: encrypt, and prove this side holds the client key."""
        sock.curve_secretkey = self.client_secret
        sock.curve_publickey = self.client_public
        sock.curve_serverkey = self.server_public



_authenticators: dict[zmq.Context, Any] = {}


def stop_authenticator(ctx: zmq.Context) -> None:
    """Before ctx.term(): the ZAP handler's thread holds sockets of the context."""
    authenticator = _authenticators.pop(ctx, None)
    if authenticator is not None:
        authenticator.stop()

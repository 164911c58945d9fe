"""Running the app under uvicorn: bind, serve until SIGTERM / SIGINT (or ``should_exit``),
stop within a bounded time, exit cleanly.

On SIGTERM uvicorn stops accepting connections and waits up to ``shutdown_timeout`` seconds
for the requests in flight (the scheduler keeps generating for them meanwhile); whatever is
still running then is cancelled, the scheduler aborts what remains, and :func:`serve` returns.
"""

from __future__ import annotations

import signal
import socket
import threading
from typing import Callable

import uvicorn

from .app import create_app
from .service import ChatService


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (``port`` 0: any free port; read it back with ``getsockname``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def make_server(service: ChatService, *, shutdown_timeout: float = 10.0, access_log: bool = False) -> uvicorn.Server:
    config = uvicorn.Config(create_app(service), lifespan="off", log_level="warning", access_log=access_log,
                            timeout_graceful_shutdown=shutdown_timeout)
    return uvicorn.Server(config)


def serve(service: ChatService, sock: socket.socket, *, shutdown_timeout: float = 10.0,
          log: Callable[[str], None] | None = None, server: uvicorn.Server | None = None) -> None:
    """Serve on ``sock`` until a signal (main thread) or ``server.should_exit``; then shut the
    scheduler down. Returns normally after SIGTERM: the caller exits 0."""
    server = server or make_server(service, shutdown_timeout=shutdown_timeout)
    main = threading.current_thread() is threading.main_thread()
    previous = {}
    if main:
        # uvicorn re-raises the signal it caught once it has shut down; with these no-op handlers
        # in place that ends in a normal return (exit 0), not a kill by SIGTERM.
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        service.scheduler.shutdown(timeout=1.0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if log:
            log(f"stopped after {service.scheduler.finished} requests")

"""The plain-socket I/O that both of the client's connections use
(kvrecall._http, kvrecall.websocket): the kernel's timeouts in place of
Python's, and the rest of a gather write the kernel took only part of."""

from __future__ import annotations

import socket
import ssl
import struct
import sys
from typing import List, Optional

__all__ = ["IOV_MAX", "kernel_timeouts", "send_rest", "timed_out"]

IOV_MAX = 512  # at most this many buffers to one sendmsg (Linux takes up to 1024, UIO_MAXIOV)


def kernel_timeouts(sock: socket.socket, timeout: Optional[float]) -> bool:
    """Leaves a plain TCP socket's timeout to the kernel (SO_RCVTIMEO and
    SO_SNDTIMEO, per call) and puts it in blocking mode; False (nothing
    changed) where that is not done (not Linux, TLS, a timeout <= 0).
    Python polls a socket with a timeout before every send and receive: a
    syscall more each way, 5-7 us a send on the 2-core VM. A timed-out call
    then raises BlockingIOError (EAGAIN), which the callers here report as
    Python's timeout would be: TimeoutError from the HTTP connection; from a
    WebSocket, ConnectionClosed(1006, "timed out") (caused by a
    TimeoutError), the connection closed, since a frame may be cut."""
    if not sys.platform.startswith("linux") or isinstance(sock, ssl.SSLSocket) or (timeout is not None and timeout <= 0):
        return False
    if timeout is not None:
        sec = int(timeout)
        # At least 1 us: a zero timeval is no timeout at all (a timeout under 1 us blocked forever).
        tv = struct.pack("@ll", sec, max(int((timeout - sec) * 1e6), 0 if sec else 1))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
    sock.settimeout(None)
    return True


def send_rest(sock: socket.socket, views: List[memoryview], sent: int) -> None:
    """After a gather write that sent `sent` bytes of the views: the rest (no copy of them)."""
    while True:
        while views and sent >= views[0].nbytes:
            sent -= views.pop(0).nbytes
        if not views:
            return
        if sent:
            views[0] = views[0][sent:]
        sent = sock.sendmsg(views[:IOV_MAX])


def timed_out(e: OSError) -> OSError:
    """A kernel timeout (kernel_timeouts) as the TimeoutError Python's would be."""
    return TimeoutError("timed out") if isinstance(e, BlockingIOError) else e

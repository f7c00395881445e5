"""Socket plumbing the tests' scripted servers and proxies on 127.0.0.1
share: an accept loop on a thread of its own, a proxy's two-way relay that
ends both sockets when either end does, and a URL's (host, port)."""

import socket
import threading


def accept_each(listener, handle):
    """Runs handle(conn) on a thread of its own for each connection `listener` accepts, until it is closed."""

    def loop():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # the listener was closed
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()


def pipe(down, up, send_down=None):
    """A proxy's connection: down's bytes go to up, up's come back to down (through send_down(data);
    down.sendall unless given), until either end closes or fails; then both are closed. Returns then."""
    other = threading.Thread(target=_relay, args=(down, up, up.sendall), daemon=True)
    other.start()
    _relay(up, down, send_down or down.sendall)
    other.join()
    down.close()
    up.close()


def _relay(src, dst, send):
    try:
        while data := src.recv(1 << 16):
            send(data)
    except OSError:
        pass
    shut_down(src, dst)  # the other direction's recv sees the end too


def shut_down(*socks):
    """Shuts both directions of each socket down; one already closed or reset is skipped."""
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def host_port(url):
    """The (host, port) a URL such as http://127.0.0.1:8080/x names."""
    host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    return host, int(port)

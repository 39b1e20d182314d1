#!/usr/bin/env python3
"""TCP backend for `bench/run.py --tcp`: listens on 127.0.0.1:0 (prints
`listening on ADDR`), and per connection reads one command byte: `B` sends
BYTES (argv[1]) bytes and closes, `C` sends `ok` and closes."""
import socket
import sys
import threading

CHUNK = memoryview(b"\0" * (1 << 20))


def serve(conn, total):
    try:
        cmd = conn.recv(1)
        if cmd == b"B":
            left = total
            while left > 0:
                n = min(left, len(CHUNK))
                conn.sendall(CHUNK[:n])
                left -= n
        elif cmd == b"C":
            conn.sendall(b"ok")
    except OSError:
        pass
    finally:
        conn.close()


def main():
    total = int(sys.argv[1])
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(4096)
    print(f"listening on {s.getsockname()[0]}:{s.getsockname()[1]}", flush=True)
    while True:
        conn, _ = s.accept()
        threading.Thread(target=serve, args=(conn, total), daemon=True).start()


if __name__ == "__main__":
    main()

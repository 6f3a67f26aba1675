# SPIKE: move one file over the shaped link as a plain TCP stream (no framing needed here).
#   xfer.py recv HOST PORT OUT   (run inside the link namespace; prints LISTENING, then bytes)
#   xfer.py send HOST PORT FILE
import socket, sys
if sys.argv[1] == "recv":
    host, port, out = sys.argv[2], int(sys.argv[3]), sys.argv[4]
    with socket.create_server((host, port)) as srv:
        srv.settimeout(120)
        print("LISTENING", flush=True)
        conn, _ = srv.accept()
    n = 0
    with conn, open(out, "wb") as f:
        while chunk := conn.recv(1 << 20):
            f.write(chunk)
            n += len(chunk)
        conn.sendall(b"OK")
    print(n, flush=True)
else:
    host, port, path = sys.argv[2], int(sys.argv[3]), sys.argv[4]
    with socket.create_connection((host, port), timeout=120) as s, open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            s.sendall(chunk)
        s.shutdown(socket.SHUT_WR)
        assert s.recv(2) == b"OK"

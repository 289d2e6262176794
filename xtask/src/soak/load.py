# `cargo xtask soak`: a well-behaved client's load, run in its namespace.
# bench: downloads GET /bytes/N from HOST:PORT in a loop; prints "P bytes"
# about every 0.2 s while a download runs (what arrived since the last line,
# so that throughput can be cut into short windows) and "B total seconds"
# when it is whole;
# latency: GET / every 0.1 s, prints "L milliseconds". A failure prints
# "E what" (a download stalled for 5 s, a request for 2 s).
# usage: load.py bench|latency HOST PORT [BYTES]
import socket
import sys
import time

mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
count = int(sys.argv[4]) if len(sys.argv) > 4 else 0
timeout = 5 if mode == "bench" else 2
buf = bytearray(1 << 18)
while True:
    start = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            path = "/bytes/%d" % count if mode == "bench" else "/"
            s.sendall(("GET %s HTTP/1.0\r\nHost: %s\r\n\r\n" % (path, host)).encode())
            total = unreported = 0
            reported = start
            while True:
                n = s.recv_into(buf)
                if n == 0:
                    break
                total += n
                unreported += n
                if mode == "bench" and time.monotonic() - reported >= 0.2:
                    print("P", unreported, flush=True)
                    unreported, reported = 0, time.monotonic()
        seconds = time.monotonic() - start
        if mode == "bench":
            print("P", unreported, flush=True)
            print("B", total, seconds, flush=True)
        else:
            print("L", seconds * 1000.0, flush=True)
    except OSError as e:
        print("E", str(e).replace("\n", " "), flush=True)
        time.sleep(0.2)
    if mode == "latency":
        time.sleep(max(0.0, 0.1 - (time.monotonic() - start)))

# `cargo xtask soak`: the sink in sys-net. Counts frames arriving in the
# namespace that carry the marker QSOAKDENY (a packet the firewall should
# have denied) and writes "LEAKED SEEN FIRST_LEAK_HEX CANARIES" to OUT every
# 0.2 s (CANARIES: frames with QSOAKCANARY, allowed ones that prove the sink
# sees what passes).
# A classic BPF filter keeps bulk TCP (large frames, non-SYN segments)
# away from this process, so it does not slow the well-behaved load.
# usage: sink.py OUT
import ctypes
import os
import socket
import struct
import sys
import time

out = sys.argv[1]
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
program = [
    (0x80, 0, 0, 0),        # 0: A = frame length
    (0x35, 10, 0, 400),     # 1: >= 400 bytes: drop
    (0x28, 0, 0, 12),       # 2: EtherType
    (0x15, 0, 7, 0x0800),   # 3: not IPv4: accept
    (0x28, 0, 0, 20),       # 4: flags/fragment offset
    (0x45, 5, 0, 0x3FFF),   # 5: a fragment: accept
    (0x30, 0, 0, 23),       # 6: protocol
    (0x15, 0, 3, 6),        # 7: not TCP: accept
    (0xB1, 0, 0, 14),       # 8: X = IPv4 header length
    (0x50, 0, 0, 27),       # 9: TCP flags
    (0x45, 0, 1, 0x02),     # 10: SYN: accept, else drop
    (0x06, 0, 0, 0xFFFF),   # 11: accept
    (0x06, 0, 0, 0),        # 12: drop
]
code = b"".join(struct.pack("HBBI", *i) for i in program)
buf = ctypes.create_string_buffer(code)
sock.setsockopt(socket.SOL_SOCKET, 26, struct.pack("HL", len(program), ctypes.addressof(buf)))
sock.settimeout(0.2)
leaked = seen = canaries = 0
first = ""
last = 0.0
while True:
    try:
        frame, address = sock.recvfrom(65535)
        if address[2] != socket.PACKET_OUTGOING:
            seen += 1
            if b"QSOAKDENY" in frame:
                leaked += 1
                first = first or frame[:96].hex()
            elif b"QSOAKCANARY" in frame:
                canaries += 1
    except socket.timeout:
        pass
    except OSError:
        break
    now = time.monotonic()
    if now - last > 0.2:
        last = now
        with open(out + ".tmp", "w") as f:
            f.write("%d %d %s %d\n" % (leaked, seen, first or "-", canaries))
        os.replace(out + ".tmp", out)

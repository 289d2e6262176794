# `cargo xtask soak`: one attacking client qube. Run inside the client's
# namespace: sends hand-built Ethernet frames on eth0 to the firewall
# (Qubes' gateway MAC fe:ff:ff:ff:ff:ff) for DURATION seconds at most RATE
# frames a second, then prints "sent N". Every frame the client's rules
# must deny carries the marker QSOAKDENY, which the sink in sys-net counts.
# usage: attack.py KIND CLIENT_IP CLIENT_IP6 DURATION RATE
# KIND: syn, udp, fragments, icmp-spoof, canary (allowed, marked QSOAKCANARY:
# proves the sink sees what passes)
import random
import socket
import struct
import sys
import time

kind, src, src6 = sys.argv[1], sys.argv[2], sys.argv[3]
duration, rate = float(sys.argv[4]), int(sys.argv[5])
MARK = b"QSOAKDENY"
SERVER, SERVER6, DNS = "192.0.2.80", "2001:db8::80", "10.139.1.1"
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
sock.bind(("eth0", 0))
with open("/sys/class/net/eth0/address") as f:
    mac = bytes.fromhex(f.read().strip().replace(":", ""))
gw = b"\xfe\xff\xff\xff\xff\xff"


def csum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def a4(ip):
    return socket.inet_aton(ip)


def a6(ip):
    return socket.inet_pton(socket.AF_INET6, ip)


def ip4(s, d, proto, payload, ident=None, frag=0x4000):
    ident = random.getrandbits(16) if ident is None else ident
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, frag, 64, proto, 0, a4(s), a4(d))
    return h[:10] + struct.pack("!H", csum(h)) + h[12:] + payload


def ip6(s, d, nh, payload):
    flow = 0x60000000 | random.getrandbits(20)
    return struct.pack("!IHBB16s16s", flow, len(payload), nh, 64, a6(s), a6(d)) + payload


def l4(seg, at, pseudo):
    c = csum(pseudo + seg) or 0xFFFF
    return seg[:at] + struct.pack("!H", c) + seg[at + 2:]


def ph4(s, d, proto, n):
    return a4(s) + a4(d) + struct.pack("!BBH", 0, proto, n)


def ph6(s, d, nh, n):
    return a6(s) + a6(d) + struct.pack("!I3xB", n, nh)


def tcp(s, d, sport, dport, payload=b"", v6=False):
    seg = struct.pack("!HHIIBBHHH", sport, dport, random.getrandbits(32), 0, 5 << 4, 0x02, 65535, 0, 0) + payload
    return l4(seg, 16, (ph6 if v6 else ph4)(s, d, 6, len(seg)))


def udp(s, d, sport, dport, payload, v6=False):
    seg = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    return l4(seg, 6, (ph6 if v6 else ph4)(s, d, 17, len(seg)))


def icmp(kind, code, body, v6=False, s=None, d=None):
    msg = struct.pack("!BBHI", kind, code, 0, 0) + body
    if v6:
        return l4(msg, 2, ph6(s, d, 58, len(msg)))
    return l4(msg, 2, b"")


def e4(p):
    return gw + mac + b"\x08\x00" + p


def e6(p):
    return gw + mac + b"\x86\xdd" + p


def port():
    return random.randint(1024, 65535)


def denied():
    p = random.randint(1, 65535)
    return 9 if p in (53, 80) else p


def rand4():
    return socket.inet_ntoa(struct.pack("!I", random.getrandbits(32)))


def rand6():
    return socket.inet_ntop(socket.AF_INET6, random.getrandbits(128).to_bytes(16, "big"))


def frag6(s, d, ident, offset, more, payload, nh=17):
    fh = struct.pack("!BBHI", nh, 0, (offset << 3) | more, ident)
    return ip6(s, d, 44, fh + payload)


def frames():
    """One burst of frames of this attack."""
    if kind == "syn":
        # Allowed (TCP 80: a NAT entry each, the client's share fills up)
        # and denied (random ports).
        return [e4(ip4(src, SERVER, 6, tcp(src, SERVER, port(), 80))),
                e4(ip4(src, SERVER, 6, tcp(src, SERVER, port(), denied(), MARK)))]
    if kind == "udp":
        return [e4(ip4(src, DNS, 17, udp(src, DNS, port(), 53, b"\0" * 12))),
                e4(ip4(src, SERVER, 17, udp(src, SERVER, port(), denied(), MARK)))]
    if kind == "fragments":
        ident = random.getrandbits(16)
        body = udp(src, SERVER, port(), 9, MARK * 4)
        out = [
            # A first fragment whose rest never comes.
            e4(ip4(src, SERVER, 17, body[:24], ident, 0x2000)),
            # Overlapping: an allowed TCP 80 header, then a fragment at
            # offset 0 again rewriting it to a denied port, then the end.
            e4(ip4(src, SERVER, 6, tcp(src, SERVER, port(), 80)[:16], ident ^ 1, 0x2000)),
            e4(ip4(src, SERVER, 6, tcp(src, SERVER, port(), 9, MARK)[:24], ident ^ 1, 0x2000)),
            e4(ip4(src, SERVER, 6, MARK + b"\0" * 7, ident ^ 1, 3)),
        ]
        ident6 = random.getrandbits(32)
        body6 = udp(src6, SERVER6, port(), 9, MARK * 4, v6=True)
        out += [
            e6(frag6(src6, SERVER6, ident6, 0, 1, body6[:24])),
            e6(frag6(src6, SERVER6, ident6 ^ 1, 0, 1, body6[:24])),
            e6(frag6(src6, SERVER6, ident6 ^ 1, 1, 0, body6[8:])),
        ]
        return out
    if kind == "icmp-spoof":
        # ICMP errors about flows that do not exist, quoting a marked packet.
        inner = ip4(SERVER, src, 17, udp(SERVER, src, port(), port(), MARK))
        inner6 = ip6(SERVER6, src6, 17, udp(SERVER6, src6, port(), port(), MARK, v6=True))
        return [
            e4(ip4(src, SERVER, 1, icmp(3, 3, inner))),
            e4(ip4(src, SERVER, 1, icmp(11, 0, inner))),
            e6(ip6(src6, SERVER6, 58, icmp(1, 4, inner6, True, src6, SERVER6))),
            # Spoofed sources to allowed destinations.
            e4(ip4(rand4(), SERVER, 6, tcp(rand4(), SERVER, port(), 80, MARK))),
            e4(ip4(rand4(), DNS, 17, udp(rand4(), DNS, port(), 53, MARK))),
            e6(ip6(rand6(), SERVER6, 6, tcp(rand6(), SERVER6, port(), 80, MARK, True))),
        ]
    if kind == "canary":
        # Allowed (TCP 80 from the client's own address) but marked: the
        # sink must count it, or it cannot see leaks either.
        return [e4(ip4(src, SERVER, 6, tcp(src, SERVER, port(), 80, b"QSOAKCANARY")))]
    sys.exit("unknown attack " + kind)


sent = 0
start = time.monotonic()
while True:
    elapsed = time.monotonic() - start
    if elapsed >= duration:
        break
    if sent > rate * elapsed:
        time.sleep(0.002)
        continue
    for frame in frames():
        try:
            sock.send(frame)
            sent += 1
        except OSError:
            pass
print("sent", sent, flush=True)

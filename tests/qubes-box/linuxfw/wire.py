#!/usr/bin/env python3
"""Raw Ethernet frames in and out of one interface, for the box's
differential test (tests/linux_differential.rs; Python only because the
test crate forbids unsafe code and has no socket crate).

  wire.py capture IFACE   prints `ready`, then every frame received on IFACE
                          (not the ones it sends) that holds the probes'
                          marker `QDIF` or is ICMP/ICMPv6, as a hex line
  wire.py send IFACE      reads hex frames from stdin, one per line, sends
                          each on IFACE; an empty line is answered `sent`
"""
import socket
import sys
import time

ETH_P_ALL = 3


def is_icmp(frame):
    if len(frame) < 34:
        return False
    ethertype = frame[12:14]
    if ethertype == b'\x08\x00':
        return frame[23] == 1
    if ethertype == b'\x86\xdd' and len(frame) >= 54:
        return frame[20] == 58
    return False


def main():
    mode, iface = sys.argv[1], sys.argv[2]
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((iface, 0))
    if mode == 'capture':
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        print('ready', flush=True)
        while True:
            frame, address = sock.recvfrom(65535)
            if address[2] == socket.PACKET_OUTGOING:
                continue
            if b'QDIF' in frame or is_icmp(frame):
                sys.stdout.write(frame.hex() + '\n')
                sys.stdout.flush()
    elif mode == 'send':
        print('ready', flush=True)
        for line in sys.stdin:
            line = line.strip()
            if not line:
                print('sent', flush=True)
                continue
            sock.send(bytes.fromhex(line))
            time.sleep(0.0005)  # no burst beyond a TAP's queue
    else:
        sys.exit('wire.py: unknown mode ' + mode)


if __name__ == '__main__':
    main()

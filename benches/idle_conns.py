#!/usr/bin/env python3
"""Memory with idle keep-alive connections (issue 9).

    benches/idle_conns.py [--tls | --h2] HOST PORT N PID [PID...]

Opens N keep-alive connections (over TLS with --tls: HTTP/1.1; with --h2: HTTP/2
over TLS, one stream each; the server's certificate not checked, loopback only) to HOST:PORT, sends one GET on each and reads its
answer, so every connection has served a request and sits idle, then prints the
RSS of each PID (the server's processes) and closes everything. Loopback only.
"""
import asyncio
import os
import resource
import ssl
import sys

TLS = None
H2 = False
if len(sys.argv) > 1 and sys.argv[1] in ("--tls", "--h2"):
    H2 = sys.argv.pop(1) == "--h2"
    TLS = ssl.create_default_context()
    TLS.check_hostname = False
    TLS.verify_mode = ssl.CERT_NONE
    TLS.set_alpn_protocols(["h2" if H2 else "http/1.1"])


def frame(kind, flags, stream, payload=b""):
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


async def get_h2(r, w, host):
    """One GET on stream 1, read until its end; the server's SETTINGS acknowledged."""
    # HPACK: :method GET, :scheme https, :path / (static table), :authority literal.
    block = b"\x82\x87\x84\x41" + bytes([len(host)]) + host.encode()
    w.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0) + frame(1, 0x5, 1, block))
    await w.drain()
    while True:
        head = await asyncio.wait_for(r.readexactly(9), 10)
        length, kind, flags = int.from_bytes(head[:3], "big"), head[3], head[4]
        stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
        await asyncio.wait_for(r.readexactly(length), 10)
        if kind == 4 and not flags & 1:
            w.write(frame(4, 1, 0))
            await w.drain()
        if kind == 7:
            raise RuntimeError("GOAWAY")
        if stream == 1 and kind in (0, 1) and flags & 1:
            return


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def one(host, port, sem, conns):
    async with sem:
        r, w = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=TLS), 10)
        if H2:
            await get_h2(r, w, host)
            conns.append((r, w))
            return
        w.write(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        await w.drain()
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await asyncio.wait_for(r.readexactly(length), 10)
        conns.append((r, w))


async def main():
    host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    pids = sys.argv[4:]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, n + 1000)), hard))
    before = sum(rss_kib(p) for p in pids)
    conns = []
    sem = asyncio.Semaphore(500)
    await asyncio.wait_for(asyncio.gather(*(one(host, port, sem, conns) for _ in range(n))), 120)
    # Measured 1 s after the last answer and again after WAIT seconds (default 8): a
    # server may release an idle connection's buffers some time after its last request
    # (launchday parks idle keep-alive connections after 1 s).
    for wait in (1, float(os.environ.get("WAIT", "8")) - 1):
        await asyncio.sleep(wait)
        after = sum(rss_kib(p) for p in pids)
        print(f"{len(conns)} idle connections: RSS {before / 1024:.1f} MiB before, {after / 1024:.1f} MiB with them "
              f"({(after - before) / len(conns):.2f} KiB per connection)")
    for _, w in conns:
        w.close()


asyncio.run(main())

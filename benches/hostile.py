#!/usr/bin/env python3
"""Hostile-input probe for the gateway's HTTP front (docs/benchmarks.md#hostile-input).

Run by benches/hostile.sh, which starts the release gateway in front of the simulator;
each subcommand attacks one limit and prints what it costs the gateway (CPU, RSS) and a
normal caller (latency). Load-sensitive figures live here, not in `cargo test`.

    hostile.py partial --data HOST:PORT --pid PID [--conns 2000] [--secs 10]
        connections holding a partial first line (`P`, part of the h2 preface, `GET / HT`):
        the gateway's CPU over a fixed interval, and a normal caller's latency beside them
    heads --data HOST:PORT --pid PID [--conns 1000] [--bytes 400000]
        connections stuck mid-head after BYTES of headers: the gateway's RSS, and what
        each connection was answered
    h2idle --data HOST:PORT [--cap 120]
        an h2 connection that opens no stream but answers PINGs: how long it lives
    evict --data HOST:PORT [--silent 400]
        silent connections past max_connections, then a normal caller: answered, and how fast
"""

import argparse
import asyncio
import os
import resource
import statistics
import struct
import time

PATH = "/v4/group_open_http_svc/get_group_msg_receipt?sdkappid=1400000000"
BODY = b'{"GroupId":"g-hostile","MsgSeqList":[{"MsgSeq":1},{"MsgSeq":2},{"MsgSeq":3}]}'
REQUEST = (
    f"POST {PATH} HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\n"
    f"content-length: {len(BODY)}\r\n\r\n"
).encode() + BODY
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
PARTIALS = [b"P", PREFACE[:10], b"GET / HT"]
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def split(addr):
    host, port = addr.rsplit(":", 1)
    return host, int(port)


async def read_response(reader):
    """One HTTP/1.1 response with a content-length body; its outcome: the status of the
    gateway's error table, which X-Gateway-Status carries on every gateway-made error (sent
    as HTTP 200 by default, docs/design.md#errors), else the status sent."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = 0
    status = int(lines[0].split()[1])
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
        elif name.strip().lower() == "x-gateway-status":
            status = int(value)
    await reader.readexactly(length)
    return status


async def caller(addr, n, fresh):
    """A normal caller: n cached requests one after another, on one keep-alive connection
    (fresh=False) or a new connection each (fresh=True); the latencies in ms."""
    host, port = split(addr)
    latencies = []
    reader = writer = None
    for _ in range(n):
        started = time.perf_counter()
        if fresh or writer is None:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
        writer.write(REQUEST)
        status = await asyncio.wait_for(read_response(reader), 10)
        latencies.append((time.perf_counter() - started) * 1000)
        assert status == 200, status
        if fresh:
            writer.close()
    if writer is not None:
        writer.close()
    return latencies


def summary(latencies):
    q = statistics.quantiles(latencies, n=100)
    return f"median {statistics.median(latencies):.3f} ms, p90 {q[89]:.3f} ms, p99 {q[98]:.3f} ms"


async def open_many(addr, n, first):
    """n connections, each having sent first(i); their writers (kept open)."""
    host, port = split(addr)
    held = []
    for i in range(n):
        _, writer = await asyncio.open_connection(host, port)
        writer.write(first(i))
        held.append(writer)
    await asyncio.sleep(0.5)
    return held


async def partial(args):
    await caller(args.data, 200, False)  # warm the cache and the connection paths
    calm = await caller(args.data, args.requests, False)
    calm_fresh = await caller(args.data, args.requests // 4, True)
    c0 = cpu_seconds(args.pid)
    await asyncio.sleep(args.secs)
    idle_cpu = (cpu_seconds(args.pid) - c0) / args.secs * 100
    held = await open_many(args.data, args.conns, lambda i: PARTIALS[i % len(PARTIALS)])
    c0 = cpu_seconds(args.pid)
    await asyncio.sleep(args.secs)
    cpu = (cpu_seconds(args.pid) - c0) / args.secs * 100
    beside = await caller(args.data, args.requests, False)
    beside_fresh = await caller(args.data, args.requests // 4, True)
    print(f"gateway CPU idle: {idle_cpu:.1f} % of a core")
    print(f"gateway CPU with {args.conns} partial first lines held: {cpu:.1f} % of a core (over {args.secs} s)")
    print(f"normal caller, keep-alive, alone:        {summary(calm)}")
    print(f"normal caller, keep-alive, beside them:  {summary(beside)}")
    print(f"normal caller, new connection, alone:    {summary(calm_fresh)}")
    print(f"normal caller, new connection, beside:   {summary(beside_fresh)}")
    for writer in held:
        writer.close()


async def heads(args):
    host, port = split(args.data)
    before = rss_mib(args.pid)
    header = b"x-filler: " + b"a" * 990 + b"\r\n"
    block = b"POST / HTTP/1.1\r\nhost: gateway\r\n" + header * (args.bytes // len(header))
    conns = []
    for _ in range(args.conns):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(block)  # no blank line: the head never completes
        conns.append((reader, writer))
    await asyncio.sleep(args.settle)
    answered = {}
    for reader, _ in conns:
        try:
            data = await asyncio.wait_for(reader.read(64), 0.01)
            key = data.split(b"\r\n", 1)[0].decode("latin-1") if data else "closed"
        except asyncio.TimeoutError:
            key = "still open, no answer"
        except ConnectionError:
            key = "reset"
        answered[key] = answered.get(key, 0) + 1
    after = rss_mib(args.pid)
    print(f"{args.conns} heads of {len(block)} bytes each, never completed: RSS {before:.0f} -> {after:.0f} MiB "
          f"(+{after - before:.0f} MiB); answered: {answered}")
    for _, writer in conns:
        writer.close()


def frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


async def h2idle(args):
    host, port = split(args.data)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(PREFACE + frame(4, 0, 0))  # the preface and empty SETTINGS
    started = time.monotonic()
    goaway = None
    try:
        while time.monotonic() - started < args.cap:
            head = await asyncio.wait_for(reader.readexactly(9), args.cap)
            length = int.from_bytes(head[:3], "big")
            kind, flags = head[3], head[4]
            payload = await reader.readexactly(length)
            if kind == 4 and not flags & 1:
                writer.write(frame(4, 1, 0))  # SETTINGS ack
            elif kind == 6 and not flags & 1:
                writer.write(frame(6, 1, 0, payload))  # PING ack: a live, well-behaved peer
            elif kind == 7 and goaway is None:
                goaway = time.monotonic() - started
    except (asyncio.IncompleteReadError, ConnectionError):
        lived = time.monotonic() - started
        print(f"idle h2 connection: GOAWAY after {goaway if goaway is None else round(goaway, 2)} s, "
              f"closed after {lived:.2f} s")
        return
    except asyncio.TimeoutError:
        pass
    print(f"idle h2 connection: still open after {args.cap} s (GOAWAY: {goaway})")
    writer.close()


async def evict(args):
    host, port = split(args.data)
    await caller(args.data, 1, True)  # the answer is cached
    silent = []
    for _ in range(args.silent):
        _, writer = await asyncio.open_connection(host, port)
        silent.append(writer)
    await asyncio.sleep(1)
    latencies, failures = [], 0
    for _ in range(args.requests):
        try:
            latencies += await caller(args.data, 1, True)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError, AssertionError):
            failures += 1
        # Keep the flood at its size: the connection it evicted is replaced.
        _, writer = await asyncio.open_connection(host, port)
        silent.append(writer)
    answered = f"{summary(latencies)}" if len(latencies) >= 2 else f"{latencies}"
    print(f"{args.silent} silent connections, then {args.requests} new callers one by one: "
          f"{len(latencies)} answered ({answered}), {failures} failed")
    for writer in silent:
        writer.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("partial")
    p.add_argument("--conns", type=int, default=2000)
    p.add_argument("--secs", type=float, default=10)
    p.add_argument("--requests", type=int, default=2000)
    h = sub.add_parser("heads")
    h.add_argument("--conns", type=int, default=1000)
    h.add_argument("--bytes", type=int, default=400_000)
    h.add_argument("--settle", type=float, default=3)
    i = sub.add_parser("h2idle")
    i.add_argument("--cap", type=float, default=120)
    e = sub.add_parser("evict")
    e.add_argument("--silent", type=int, default=400)
    e.add_argument("--requests", type=int, default=50)
    for s in (p, h, i, e):
        s.add_argument("--data", required=True)
        s.add_argument("--pid", type=int, default=0)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(globals()[args.command](args))


if __name__ == "__main__":
    main()

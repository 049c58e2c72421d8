#!/usr/bin/env python3
"""What CURVE costs a ZeroMQ round trip: a DEALER pings a ROUTER in another process over
loopback, with and without CURVE (the cluster's key pair, as the nodes use it), and prints
p50/p99 of each.

    .venv/bin/python tools/bench_transport.py [--count 3000] [--sizes 200,20000]
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
import time

import zmq

from clusterfs.credentials import Credentials
from clusterfs.txn.transport import curve_client, new_keypair

WARMUP_PINGS = 200
STOP = b"stop"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def echo_server(port: int, credentials: Credentials | None) -> None:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    router = context.socket(zmq.ROUTER)
    if credentials is not None:
        router.setsockopt(zmq.CURVE_SERVER, 1)
        router.setsockopt(zmq.CURVE_SECRETKEY, credentials.secret_key)
    router.bind(f"tcp://127.0.0.1:{port}")
    while (frames := router.recv_multipart())[1] != STOP:
        router.send_multipart(frames)
    router.close()
    context.term()


def round_trips_us(count: int, size: int, credentials: Credentials | None) -> list[float]:
    port = free_port()
    server = multiprocessing.get_context("fork").Process(target=echo_server,
                                                         args=(port, credentials))
    server.start()
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    if credentials is not None:
        curve_client(dealer, credentials)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    message = b"x" * size
    times_us = []
    try:
        for i in range(WARMUP_PINGS + count):
            start_ns = time.perf_counter_ns()
            dealer.send(message)
            dealer.recv()
            if i >= WARMUP_PINGS:
                times_us.append((time.perf_counter_ns() - start_ns) / 1000)
        dealer.send(STOP)
    finally:
        server.join(10)
        if server.is_alive():
            server.kill()
        dealer.close()
        context.term()
    return sorted(times_us)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=3000, help="timed pings per variant")
    parser.add_argument("--sizes", default="200,20000", help="message sizes in bytes")
    args = parser.parse_args()
    credentials = Credentials(*new_keypair())
    print(f"{'message':>10}  {'variant':<14} {'p50 us':>8} {'p99 us':>8}")
    for size in (int(s) for s in args.sizes.split(",")):
        for name, creds in (("without CURVE", None), ("with CURVE", credentials)):
            times = round_trips_us(args.count, size, creds)
            print(f"{size:>8} B  {name:<14} {times[len(times) // 2]:8.0f} "
                  f"{times[len(times) * 99 // 100]:8.0f}")


if __name__ == "__main__":
    main()

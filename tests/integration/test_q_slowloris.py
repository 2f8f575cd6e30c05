#!/usr/bin/env python3
"""q) Slowloris and slow-body attacks while an agent delivers (issue 5, "Ingest hardening").

A receiver with the default limits (limits.max_connections 256, limits.connection_timeout 30s)
but limits.request_timeout 10s (default 60s), so that the attack outlasts it and the receiver
cuts attacking connections while the agent delivers; and a real agent (batch max_delay 100ms)
fed by a LineProducer.
slowhttptest runs against the receiver's HTTPS ingest port, one attack after the other:
  -H (slowloris: headers one line every -i seconds) and
  -B (slow body: a POST whose body comes one field every -i seconds),
each with -c 1000 connections for ATTACK_S seconds. slowhttptest has no client certificate:
the receiver only asks for one, so the TLS handshake completes and the attack reaches HTTP.
A slow-header connection holds a slot until limits.request_timeout cuts it (the idle timeout
never fires: a line comes every 5 s); the attack fills limits.max_connections, and the agent
goes on over the keep-alive connections it already has. A slow-body POST is answered 401 as
soon as its headers are in (no certificate): it never gets to send its body slowly. (The
authenticated slow body, a gateway's, is test_p_limits' request_timeout case.)

Checks: for the records the receiver stored while an attack ran, received_ms - ts_ms (store
time minus the agent's input time, one clock) has p99 < 2000 ms (the issue's figure; the one
timing assertion), printed with p50; records keep arriving during each attack; every
acknowledged record is stored exactly once. Skipped (77) without slowhttptest."""
import csv
import glob
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cistern_harness as ch

AGENT_ID = "gw-slowloris"
ATTACK_S = int(os.environ.get("CISTERN_SLOWLORIS_SECONDS", "40"))
CONNECTIONS = 1000


def percentile(sorted_vals, p):
    if not sorted_vals:
        return None
    k = min(len(sorted_vals) - 1, max(0, int(round(p / 100.0 * len(sorted_vals) + 0.5)) - 1))
    return sorted_vals[k]


def attack(h, recv, mode):
    """Run slowhttptest MODE (-H or -B) for ATTACK_S seconds, again each time it ends early
    (it opens its connections once and ends when none is left: the receiver cut them all).
    Returns (t0_ms, t1_ms, most connections held at once, rounds)."""
    t0 = int(time.time() * 1000)
    deadline = time.monotonic() + ATTACK_S
    most = rounds = 0
    while time.monotonic() < deadline - 2:
        rounds += 1
        prefix = h.path("slow%s-%d" % (mode.strip("-"), rounds))
        left = int(deadline - time.monotonic())
        argv = ["slowhttptest", mode, "-c", str(CONNECTIONS), "-r", "200", "-i", "5",
                "-l", str(left), "-u", "https://127.0.0.1:%d/v1/batches" % recv.port,
                "-t", "POST" if mode == "-B" else "GET", "-s", "8192", "-x", "24", "-p", "3",
                "-f", ch.SIGNED_CT, "-g", "-o", prefix]
        if rounds == 1:
            ch.log("attack: %s" % " ".join(argv))
        with open(prefix + ".log", "w") as out:
            p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
            h.popens.append(p)
            try:
                p.wait(timeout=left + 60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        with open(prefix + ".csv") as fh:
            for row in csv.DictReader(fh):
                try:
                    most = max(most, int(row.get("Connected") or 0))
                except ValueError:
                    pass
        h.check_alive()
    t1 = int(time.time() * 1000)
    ch.log("slowhttptest %s: %d rounds of %d connections in %.0f s, most held at once: %d"
           % (mode, rounds, CONNECTIONS, (t1 - t0) / 1000.0, most))
    return t0, t1, most, rounds


def latencies(recv, t0, t1):
    con = recv.db()
    try:
        rows = con.execute("SELECT received_ms - ts_ms FROM records WHERE agent_id=? AND "
                           "received_ms BETWEEN ? AND ?", (AGENT_ID, t0, t1)).fetchall()
    finally:
        con.close()
    return sorted(int(r[0]) for r in rows)


def main(h):
    if shutil.which("slowhttptest") is None:
        ch.log("slowhttptest not installed (apt-get install slowhttptest): skipped")
        sys.exit(77)
    # Only the harness's own limits are set: every limit this test is about is the default.
    recv = h.receiver(limits={"max_connections": 256, "request_timeout": "10s"}).start()
    agent = h.agent("agent", AGENT_ID, recv, extra={
        "forward": {"batch": {"max_delay": "100ms"}}}).start()
    prod = ch.LineProducer(agent, "slow", chunk=20, interval=0.05)
    prod.start()
    h.wait(lambda: recv.count(AGENT_ID) >= 500, timeout=60, what="records before the attack")

    results = []
    for mode in ("-H", "-B"):
        t0, t1, most, rounds = attack(h, recv, mode)
        lat = latencies(recv, t0, t1)
        ch.check(len(lat) > 0, "no record was stored during the %s attack" % mode)
        p50, p99 = percentile(lat, 50), percentile(lat, 99)
        ch.log("during %s (%.0f s, %d rounds, up to %d attacking connections at once): %d "
               "records stored, batch latency p50 %d ms, p99 %d ms, max %d ms"
               % (mode, (t1 - t0) / 1000.0, rounds, most, len(lat), p50, p99, lat[-1]))
        results.append((mode, most, len(lat), p50, p99))

    log = open(recv.proc.log_path, errors="replace").read()
    ch.check("limits.request_timeout" in log, "the receiver never cut a slow connection")
    acked, sent = prod.stop()
    h.wait(lambda: agent.segment_count() == 0, timeout=90, what="the spool to drain")
    ch.assert_stored_exactly_once(recv, agent, acked, sent=sent)
    ch.log("%d records acknowledged, all stored exactly once" % len(acked))
    for mode, most, n, p50, p99 in results:
        ch.check(p99 < 2000, "%s: batch latency p99 %d ms, the issue asks for < 2000 ms"
                 % (mode, p99))
    ch.check(agent.stop() == 0, "agent did not exit 0 on SIGTERM")
    ch.check(recv.stop() == 0, "receiver did not exit 0 on SIGTERM")


if __name__ == "__main__":
    ch.run(main, "q_slowloris")

#!/usr/bin/env python3
"""Chaos 4 (issue 7): the link is lossy, and cut; then a long backlog drains.

The agent runs in its own network namespace (chaos.NetNS: a veth pair on a private /30,
packets of one MTU); the receiver listens on the host's end of the veth, with a server
certificate for that address from the harness's CA. The test feeds the agent through its
socket input's Unix socket (a path works across namespaces), with lines like a sensor's
JSON readings (about 150 bytes, varied values). The agent forwards over HTTPS with the
product's request timeout (forward.timeout 30s).

Phase A, lossy and cut: nftables in the namespace drops 30% of the packets at random, each
way (`numgen random mod 100 < 30 drop`), while a feeder writes 200 records/s; the
link also goes fully down (`ip link set DEV down`) for several periods, at random moments,
alternately at the namespace's end (the agent's route goes: connects fail at once) and at
the host's end (no carrier: packets vanish, requests hang until their timeouts). Then the
loss stops and what phase A accepted drains (recovery_s, for information).

Phase B, the backlog: the link is cut at the host's end and a second feeder writes 1,000
records/s for BACKLOG seconds; then the link comes back (no loss) while that feeder keeps
writing live records at the same rate, and drain_s is measured: from the link's return to
the moment the spool holds no segment with a record accepted before it (all of the backlog
acknowledged by the receiver after its commit).

Parameters: short (CI): phase A 30 s with 2 cuts of 3-6 s; backlog 40 s at 1,000 records/s
(40,000 records). Full (CISTERN_CHAOS_FULL=1): phase A 120 s with 6 cuts of 5-15 s; backlog
600 s at 1,000 records/s (10 minutes' worth, 600,000 records); about 13 minutes in all,
within ctest's 900 s. Random moments from CISTERN_CHAOS_SEED (printed).

Checks: after the feeders stop and the spool drained, the verdict over the three sets: lost,
duplicated and unexpected all 0 (chaos.py); at the end the agent exits 0 on SIGTERM and its
spool passes PRAGMA integrity_check. The one bound: the issue requires a 10-minute backlog
to drain in under 5 minutes; drain_s is reported in the CHAOS-RESULT line always, and the
test fails on it only in the full form, when drain_s > 300 s.

Skipped (77) when not root, or when ip netns / veth / nft do not work here."""
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import chaos  # noqa: E402
from chaos import ch  # noqa: E402

AGENT_ID = "gw-chaos-c4"
LOSS_PCT = 30
DRAIN_BOUND_S = 300  # the bound for a 10-minute backlog (full form only)


class TelemetryFeeder(chaos.Feeder):
    """A chaos.Feeder whose lines look like a sensor's readings, about 150 bytes of JSON with
    varied values (they compress as telemetry does, not as one repeated string), instead of
    the bare "<prefix>-<n>": the backlog's drain time depends on its bytes, not only on its
    record count. The id "<prefix>-<n>" keeps each line unique. One connection: the agent is not restarted in
    this scenario, so a broken connection fails the test (stop() raises the error)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.rnd = random.Random(self.prefix)

    def line(self, n):
        r = self.rnd
        return json.dumps({
            "id": "%s-%d" % (self.prefix, n), "ts": int(time.time() * 1000),
            "site": "plant-%d" % r.randrange(8), "sensor": "th-%04x" % r.randrange(1 << 16),
            "temp_c": round(r.uniform(-10, 40), 2), "rh_pct": round(r.uniform(10, 95), 1),
            "vbat": round(r.uniform(3.1, 4.2), 3), "rssi": -r.randrange(40, 110),
            "fw": "2.4.%d" % r.randrange(20), "flags": r.randrange(1 << 16),
        }, separators=(",", ":")).encode()

    def run(self):
        try:
            interval = self.chunk / float(self.rate)
            next_at = time.monotonic()
            c = self.client = self._connect()
            while c is not None and not self.stop_flag.is_set():
                if c.eof:
                    raise ch.TestFailure("the agent closed the socket input's connection")
                c.send_many([self.line(self.n + i) for i in range(self.chunk)])
                self.n += self.chunk
                while (not c.eof and not self.stop_flag.is_set()
                       and len(c.sent) - len(c.answers) > self.max_unanswered):
                    time.sleep(0.005)
                next_at += interval
                time.sleep(max(0.0, next_at - time.monotonic()))
        except Exception as e:  # surfaced by stop()
            self.error = e


def max_ok_seq(feeder):
    """The highest seq the feeder's live connection was told was accepted so far."""
    c = feeder.client
    if c is None:
        return 0
    with c.cond:
        seqs = [a[1] for a in c.answers if a[0] == "OK"]
    return max(seqs) if seqs else 0


def oldest_pending_seq(agent):
    """The first seq of the oldest segment still in the spool, or None when it is empty."""
    return agent._q("SELECT min(first_seq) FROM segments")[0][0]


def caught_up(agent, seq):
    """True once every segment holding a seq <= SEQ left the spool (acknowledged)."""
    first = oldest_pending_seq(agent)
    return first is None or first > seq


def main(h):
    why = chaos.NetNS.unavailable()
    if why:
        ch.log("SKIP: %s" % why)
        sys.exit(77)
    try:
        ns = chaos.NetNS("c4")
    except ch.TestFailure as e:
        ch.log("SKIP: network namespaces do not work here: %s" % e)
        sys.exit(77)
    rnd = chaos.rng()
    phase_a_s = chaos.param(30, 120)
    cuts = chaos.param(2, 6)
    cut_len = chaos.param((3.0, 6.0), (5.0, 15.0))
    live_rate = chaos.param(200, 200)
    backlog_s = chaos.param(40, 600)
    backlog_rate = chaos.param(1000, 1000)
    params = {"loss_pct": LOSS_PCT, "phase_a_s": phase_a_s, "cuts": cuts,
              "cut_s": list(cut_len), "live_rate": live_rate, "backlog_s": backlog_s,
              "backlog_rate": backlog_rate}
    agent = None
    try:
        cert, key = chaos.server_cert_for_ip(h, ns.host_ip)
        port = ch.free_port()
        recv = h.receiver(extra={"listen": {"http": "%s:%d" % (ns.host_ip, port),
                                            "tls": {"cert_file": cert, "key_file": key}}})
        recv.start()
        url = "https://%s:%d/v1/batches" % (ns.host_ip, port)
        agent = h.agent("agent", AGENT_ID, recv, url=url, tcp=False, wrapper=ns.wrapper(),
                        extra={"forward": {"timeout": "30s"}})
        agent.start()
        ch.log("agent in namespace %s (%s) -> receiver %s" % (ns.name, ns.ns_ip, url))
        tally = chaos.Tally()

        # -- phase A: 30% loss each way, and cuts -------------------------------------
        feed_a = TelemetryFeeder(agent, tally, "c4a", rate=live_rate, chunk=20)
        feed_a.start()
        h.wait(lambda: recv.count(AGENT_ID) > 0, timeout=60, what="the first records stored")
        ns.loss(LOSS_PCT)
        ch.log("phase A: %d%% packet loss each way for %d s, %d cuts" % (LOSS_PCT, phase_a_s,
                                                                         cuts))
        t0 = time.monotonic()
        stored_before = recv.count(AGENT_ID)
        slot = phase_a_s / float(cuts)
        cut_total = 0.0
        for k in range(cuts):
            length = min(rnd.uniform(*cut_len), slot * 0.8)
            start = t0 + k * slot + rnd.uniform(0, slot - length)
            time.sleep(max(0.0, start - time.monotonic()))
            agent.proc.check_alive()
            side = "ns" if k % 2 == 0 else "host"
            ns.cut(side)
            ch.log("cut #%d at the %s end for %.1f s (stored so far %d, spool segments %d)"
                   % (k + 1, side, length, recv.count(AGENT_ID), agent.segment_count()))
            time.sleep(length)
            ns.restore()
            cut_total += length
        time.sleep(max(0.0, t0 + phase_a_s - time.monotonic()))
        agent.proc.check_alive()
        lossy_stored = recv.count(AGENT_ID) - stored_before
        ns.loss(0)
        t_clear = time.monotonic()
        feed_a.stop()
        seq_a = max_ok_seq(feed_a)
        ch.log("phase A over: %d records stored while lossy; loss off, waiting for seq <= %d"
               % (lossy_stored, seq_a))
        h.wait(lambda: caught_up(agent, seq_a), timeout=chaos.param(300, 600),
               what="phase A's records to drain once the loss stopped", interval=0.5)
        recovery_s = time.monotonic() - t_clear
        ch.log("phase A drained %.1f s after the loss stopped" % recovery_s)

        # -- phase B: a backlog behind a cut link, then its drain ----------------------
        ns.cut("host")
        feed_b = TelemetryFeeder(agent, tally, "c4b", rate=backlog_rate, chunk=100)
        feed_b.start()
        ch.log("phase B: link cut; feeding %d records/s for %d s" % (backlog_rate, backlog_s))
        tb = time.monotonic()
        while time.monotonic() - tb < backlog_s:
            time.sleep(min(10.0, max(0.0, backlog_s - (time.monotonic() - tb))))
            agent.proc.check_alive()
            ch.check(feed_b.is_alive() and feed_b.error is None,
                     "feeder c4b failed: %r" % (feed_b.error,))
        seq_b = max_ok_seq(feed_b)
        backlog = agent.pending_records()
        backlog_bytes = agent.spool_files_bytes()
        with feed_b.client.cond:
            some = feed_b.client.sent[:1000]
        payload_bytes = sum(len(p) for p in some) / float(max(1, len(some)))
        ns.restore()
        t_up = time.monotonic()
        ch.log("link back: %d records (about %.0f bytes each) pending in the spool (%.1f MB on "
               "disk), backlog up to seq %d" % (backlog, payload_bytes, backlog_bytes / 1e6,
                                                seq_b))
        # Live records keep coming at the same rate while the backlog drains.
        last_log = t_up
        while not caught_up(agent, seq_b):
            agent.proc.check_alive()
            now = time.monotonic()
            ch.check(now - t_up < chaos.param(600, 1200),
                     "the backlog did not drain within %d s" % chaos.param(600, 1200))
            if now - last_log >= 30:
                ch.log("draining: %.0f s, oldest pending seq %s, stored %d"
                       % (now - t_up, oldest_pending_seq(agent), recv.count(AGENT_ID)))
                last_log = now
            time.sleep(0.25)
        drain_s = time.monotonic() - t_up
        ch.log("backlog of %d records drained in %.1f s (live data kept flowing)"
               % (backlog, drain_s))
        feed_b.stop()
        chaos.wait_drained(h, [agent], timeout=chaos.param(180, 600))

        v = chaos.verdict(recv, [AGENT_ID], tally)
        chaos.report("c4", params, v, cut_total_s=round(cut_total, 1),
                     lossy_stored=lossy_stored, recovery_s=round(recovery_s, 1),
                     backlog_records=backlog, backlog_spool_mb=round(backlog_bytes / 1e6, 1),
                     payload_bytes=round(payload_bytes), drain_s=round(drain_s, 1),
                     feeder_connections=feed_a.connections + feed_b.connections)
        chaos.assert_verdict(v)
        if chaos.FULL:
            ch.check(drain_s <= DRAIN_BOUND_S,
                     "a %d s backlog took %.0f s to drain (the bound is %d s)"
                     % (backlog_s, drain_s, DRAIN_BOUND_S))
        ch.check(agent.stop() == 0, "agent did not exit 0 on SIGTERM")
        chaos.integrity_check(agent.spool_path)
        ch.check(recv.stop() == 0, "receiver did not exit 0 on SIGTERM")
    finally:
        # The agent first: a namespace lives on while a process is in it.
        if agent is not None:
            agent.kill9()
        ns.close()


if __name__ == "__main__":
    ch.run(main, "chaos_c4_lossy_link")

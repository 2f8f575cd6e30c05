#!/usr/bin/env python3
"""h) TTL and priorities, end to end.

TTL: two inputs, "perishable" (ttl 2s) and "durable" (no ttl); the receiver is down. After
the TTL passes, the spool's ledger holds expired_ttl ranges covering exactly the perishable
seqs; when the receiver starts, every durable record is stored once, no perishable record is,
the receiver has the expired_ttl entries, and its gap API classifies those seqs as "dropped at
the edge: expired_ttl". `status --json` counts them in its ledger totals.

Priority: the receiver is down; 300 low-priority records are committed, then 300 high ones.
The receiver starts and the agent sends one batch of at most 50 records at a time: every high
record reaches the receiver no later than any low record (received_ms in the records API)."""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cistern_harness as ch


def send(h, path, tag, n):
    c = ch.SocketClient(unix_path=path)
    c.send_many([json.dumps({"t": tag, "i": i}).encode() for i in range(n)])
    ans = c.wait_answers(timeout=60, alive=h.check_alive)
    ch.check(all(a[0] == "OK" for a in ans), "%s: refused %r" % (tag, [a for a in ans if a[0] != "OK"][:3]))
    acked = c.acked()
    c.close()
    return acked


def ttl(h):
    recv = h.receiver()
    inputs = [
        {"name": "perishable", "type": "socket", "priority": "normal", "ttl": "2s",
         "path": h.path("perishable.sock")},
        {"name": "durable", "type": "socket", "priority": "normal", "path": h.path("durable.sock")},
    ]
    agent = h.agent("agent", "gw-ttl", recv, inputs=inputs, unix_socket=False, tcp=False).start()
    h.wait(lambda: os.path.exists(h.path("durable.sock")), what="durable socket")
    per = send(h, h.path("perishable.sock"), "per", 100)
    dur = send(h, h.path("durable.sock"), "dur", 100)
    per_seqs = sorted(s for _p, s in per)

    def expired():
        return sum(l["count"] for l in agent.ledger() if l["reason"] == "expired_ttl")
    h.wait(lambda: expired() == 100, timeout=30, what="100 perishable records to expire")
    covered = set()
    for l in agent.ledger():
        if l["reason"] == "expired_ttl":
            covered.update(range(l["first_seq"], l["last_seq"] + 1))
    ch.check(covered == set(per_seqs), "expired_ttl ranges %r do not cover exactly the perishable "
             "seqs" % [(l["first_seq"], l["last_seq"]) for l in agent.ledger()])
    ch.check(agent.pending_records() == 100, "pending %d, expected the 100 durable records"
             % agent.pending_records())
    st = agent.status()
    ch.check(st["ledger"]["expired_ttl"]["records"] == 100, "status ledger: %r" % st["ledger"])

    recv.start()
    h.wait(lambda: agent.segment_count() == 0, timeout=60, what="spool to drain")
    h.wait(lambda: sum(l["count"] for l in recv.losses("gw-ttl")
                       if l["reason"] == "expired_ttl") == 100, what="expired_ttl at the receiver")
    rows = recv.rows("gw-ttl")
    stored = {s for _e, s, _p, _st in rows}
    ch.check(stored == {s for _p, s in dur}, "stored seqs are not exactly the durable ones")
    ch.assert_stored_exactly_once(recv, agent, dur)
    gaps = recv.gaps("gw-ttl", epoch=agent.epoch())["epochs"][0]["gaps"]
    gap_seqs = set()
    for g in gaps:
        ch.check(g["status"] == "dropped at the edge: expired_ttl", "gap %r" % g)
        gap_seqs.update(range(int(g["first_seq"]), int(g["last_seq"]) + 1))
    ch.check(gap_seqs == set(per_seqs), "gap API seqs %d..%d (%d) differ from the expired ones"
             % (min(gap_seqs or [0]), max(gap_seqs or [0]), len(gap_seqs)))
    ch.check(agent.stop() == 0, "agent did not exit 0")
    ch.check(recv.stop() == 0, "receiver did not exit 0")


def priority(h):
    recv = h.receiver("receiver2")
    inputs = [
        {"name": "low", "type": "socket", "priority": "low", "path": h.path("low.sock")},
        {"name": "high", "type": "socket", "priority": "high", "path": h.path("high.sock")},
    ]
    agent = h.agent("agent2", "gw-prio", recv, inputs=inputs, unix_socket=False, tcp=False,
                    extra={"forward": {"in_flight": 1, "batch": {"max_records": 50}}}).start()
    h.wait(lambda: os.path.exists(h.path("high.sock")), what="high socket")
    low = []
    for k in range(3):
        low += send(h, h.path("low.sock"), "low%d" % k, 100)
    high = send(h, h.path("high.sock"), "high", 300)
    time.sleep(2.5)   # past one retry cycle (retry.max 1s): no claim from before the high commit
    recv.start()
    h.wait(lambda: agent.segment_count() == 0, timeout=60, what="spool to drain")
    recs = recv.api_records("gw-prio")
    ch.check(len(recs) == 600, "%d records stored, expected 600" % len(recs))
    by_stream = {}
    for r in recs:
        by_stream.setdefault(r["stream"], []).append(int(r["received_ms"]))
    last_high, first_low = max(by_stream["high"]), min(by_stream["low"])
    ch.log("high arrived %d..%d, low from %d" % (min(by_stream["high"]), last_high, first_low))
    ch.check(last_high <= first_low, "a low-priority record arrived (%d) before the last "
             "high-priority one (%d)" % (first_low, last_high))
    ch.assert_stored_exactly_once(recv, agent, low + high)
    ch.check(agent.stop() == 0, "agent did not exit 0")
    ch.check(recv.stop() == 0, "receiver did not exit 0")


def main(h):
    ttl(h)
    priority(h)


if __name__ == "__main__":
    ch.run(main, "h_ttl_priority")

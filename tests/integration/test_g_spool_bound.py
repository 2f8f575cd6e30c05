#!/usr/bin/env python3
"""g) spool.max_size holds with the uplink down, under both spool.when_full policies.

drop_oldest: a high-priority input and a low-priority one; 4 MiB spool; the test writes far
more incompressible data than fits while the receiver is down, sampling the spool's files
(database + WAL) after every chunk: never above max_size + 5%, and at the end within 5% of
it. Eviction takes the low class: every high record is still pending. Then the receiver
starts: every acknowledged record is stored exactly once or lies in an evicted_full range of
the loss ledger the receiver got, and the gap API says "dropped at the edge: evicted_full" for
the missing seqs and "not yet received" for none.

reject_new: a 2 MiB spool; lines are answered OK until it is full, then "ERR full ..."; the
agent keeps running; once the receiver drains it, new lines are OK again, and every line
ever answered OK is stored exactly once (nothing acknowledged is dropped)."""
import base64
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cistern_harness as ch

MIB = 1024 * 1024


def rand_line(tag, i):
    # base64 of random bytes: zstd cannot shrink it, so stored bytes track payload bytes
    return json.dumps({"t": tag, "i": i, "r": base64.b64encode(os.urandom(900)).decode()}).encode()


def send_chunk(client, tag, start, n, h):
    client.send_many([rand_line(tag, start + i) for i in range(n)])
    return client.wait_answers(timeout=120, alive=h.check_alive)


def drop_oldest(h):
    max_size = 4 * MIB
    recv = h.receiver()
    inputs = [
        {"name": "alerts", "type": "socket", "priority": "high", "path": h.path("alerts.sock")},
        {"name": "bulk", "type": "socket", "priority": "low", "path": h.path("bulk.sock")},
    ]
    agent = h.agent("agent", "gw-bound", recv, inputs=inputs, unix_socket=False, tcp=False,
                    extra={"spool": {"max_size": "4MiB", "when_full": "drop_oldest"}}).start()
    h.wait(lambda: os.path.exists(h.path("bulk.sock")), what="bulk socket")
    alerts = ch.SocketClient(unix_path=h.path("alerts.sock"))
    bulk = ch.SocketClient(unix_path=h.path("bulk.sock"))

    ans = send_chunk(alerts, "alert", 0, 200, h)
    ch.check(all(a[0] == "OK" for a in ans), "alerts refused: %r" % [a for a in ans if a[0] != "OK"][:3])
    peak = 0
    total = 0
    for chunk in range(30):          # ~30 x 500 x 1.2 KiB ~ 18 MiB into a 4 MiB spool
        ans = send_chunk(bulk, "bulk", total, 500, h)
        total += 500
        bad = [a for a in ans if a[0] != "OK"]
        ch.check(not bad, "drop_oldest must keep answering OK, got %r" % bad[:3])
        size = agent.spool_files_bytes()
        peak = max(peak, size)
        ch.check(size <= max_size * 1.05, "spool files are %d bytes after chunk %d: over "
                 "max_size %d + 5%%" % (size, chunk, max_size))
    time.sleep(1.5)
    size = agent.spool_files_bytes()
    ch.log("drop_oldest: %d bulk records sent, spool files %d bytes (peak %d, max_size %d)"
           % (total, size, peak, max_size))
    ch.check(size >= max_size * 0.95, "spool files %d bytes: not held near max_size %d (-5%%)"
             % (size, max_size))
    ledger = agent.ledger()
    evicted = sum(l["count"] for l in ledger if l["reason"] == "evicted_full")
    ch.check(evicted > 0, "nothing evicted: ledger %r" % ledger[:3])
    ch.check(len(ledger) < 50, "%d ledger rows for one outage: adjacent evictions are not "
             "coalesced" % len(ledger))
    alert_seqs = [seq for _p, seq in alerts.acked()]
    con = agent.spool()
    try:
        stored_hi = con.execute("SELECT coalesce(sum(record_count),0) FROM segments "
                                "WHERE priority = 0").fetchone()[0]
    finally:
        con.close()
    ch.check(stored_hi == 200, "eviction took high-priority records: %d of 200 left" % stored_hi)
    for l in ledger:
        ch.check(not any(l["first_seq"] <= s <= l["last_seq"] for s in alert_seqs),
                 "a ledger range %r covers a high-priority seq" % l)

    recv.start()
    h.wait(lambda: agent.segment_count() == 0, timeout=120, what="spool to drain")
    h.wait(lambda: sum(l["count"] for l in recv.losses("gw-bound")
                       if l["reason"] == "evicted_full") == evicted,
           what="the evicted_full ledger rows to reach the receiver")
    acked = alerts.acked() + bulk.acked()
    stored, dropped = ch.assert_accounted(recv, agent, acked, ["evicted_full"])
    ch.check(dropped == evicted, "%d acknowledged records missing, ledger says %d evicted"
             % (dropped, evicted))
    ch.log("drained: %d stored, %d dropped as evicted_full" % (stored, dropped))

    gaps = recv.gaps("gw-bound")
    ep = [e for e in gaps["epochs"] if ch.u64(e["epoch"]) == agent.epoch()]
    ch.check(len(ep) == 1, "gap API has no epoch %d: %r" % (agent.epoch(), gaps))
    g = ep[0]["gaps"]
    ch.check(all(x["status"] == "dropped at the edge: evicted_full" for x in g),
             "gaps not all classified evicted_full: %r" % [x for x in g if x["reason"] != "evicted_full"][:3])
    ch.check(sum(int(x["count"]) for x in g) == evicted,
             "gap API counts %d missing, ledger %d" % (sum(int(x["count"]) for x in g), evicted))
    alerts.close()
    bulk.close()
    ch.check(agent.stop() == 0, "agent did not exit 0")
    ch.check(recv.stop() == 0, "receiver did not exit 0")


def reject_new(h):
    recv = h.receiver("receiver2")
    agent = h.agent("agent2", "gw-reject", recv,
                    extra={"spool": {"max_size": "2MiB", "when_full": "reject_new"}}).start()
    c = agent.client("unix")
    total = 0
    errs = []
    for chunk in range(20):         # up to ~12 MiB into a 2 MiB spool
        ans = send_chunk(c, "rj", total, 500, h)
        total += 500
        errs = [a for a in ans if a[0] == "ERR"]
        if errs:
            break
        ch.check(agent.spool_files_bytes() <= 2 * MIB * 1.05, "spool over max_size")
    ch.check(errs, "reject_new never answered ERR with %d records in a 2 MiB spool" % total)
    ch.check(all(e[1].startswith("full") for e in errs), "ERR reasons: %r" % errs[:3])
    ch.check(agent.spool_files_bytes() <= 2 * MIB * 1.05, "spool over max_size")
    ch.check(agent.proc.log_text().count("spool.max_size") <= 2,
             "the full state is logged more than once per change")
    ch.check(not [l for l in agent.ledger() if l["reason"] == "evicted_full"],
             "reject_new evicted records")
    acked = c.acked()
    ch.log("reject_new: %d OK, then ERR full" % len(acked))
    recv.start()
    h.wait(lambda: agent.segment_count() == 0, timeout=120, what="spool to drain")
    ans = send_chunk(c, "after", 10 ** 6, 50, h)
    ch.check(all(a[0] == "OK" for a in ans[-50:]), "after draining, lines are still refused: %r"
             % ans[-3:])
    h.wait(lambda: agent.segment_count() == 0, timeout=60, what="spool to drain again")
    ch.assert_stored_exactly_once(recv, agent, c.acked())
    c.close()
    ch.check(agent.stop() == 0, "agent did not exit 0")
    ch.check(recv.stop() == 0, "receiver did not exit 0")


def main(h):
    drop_oldest(h)
    reject_new(h)


if __name__ == "__main__":
    ch.run(main, "g_spool_bound")

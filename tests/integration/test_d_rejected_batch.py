#!/usr/bin/env python3
"""d) A batch the receiver rejects with a 4xx is ledgered as 'rejected', and later batches
still arrive.

The receiver's limits.max_decompressed is 64KiB; one incompressible ~100KiB line (random
base64; the agent's max_line is 1MiB) is sent alone, between two groups of small records.
The first group is stored before the big line is sent; the second is sent only after the
ledger shows the rejection, so no batch mixes them. Checks: one ledger row with reason
'rejected', count 1, the big line's seq, a non-empty detail; the big line is not stored;
all small records stored exactly once; the spool ends empty."""
import base64
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cistern_harness as ch

AGENT_ID = "gw-poison"


def send_small(agent, tag, n):
    c = agent.client("unix")
    c.send_many([json.dumps({"g": tag, "n": i}).encode() for i in range(n)])
    answers = c.wait_answers(n, timeout=60, alive=agent.h.check_alive)
    ch.check(all(a[0] == "OK" for a in answers), "%s: not all OK: %r" % (tag, answers[:5]))
    acked, sent = c.acked(), list(c.sent)
    c.close()
    return acked, sent


def main(h):
    recv = h.receiver(limits={"max_decompressed": "64KiB"}).start()
    agent = h.agent("agent", AGENT_ID, recv, max_line="1MiB").start()

    acked1, sent1 = send_small(agent, "before", 200)
    h.wait(lambda: agent.segment_count() == 0 and recv.count(AGENT_ID) == 200, timeout=60,
           what="the first 200 small records to be stored")

    big = base64.b64encode(os.urandom(75 * 1024))   # 100 KiB of base64, ~75 KiB after zstd
    ch.check(len(big) > 64 * 1024, "test line too small")
    c = agent.client("unix")
    c.send(big)
    ans = c.wait_answers(1, timeout=60, alive=h.check_alive)
    c.close()
    ch.check(ans[0][0] == "OK", "big line not accepted by the agent: %r" % (ans[0],))
    big_seq = ans[0][1]
    ch.log("big line (%d bytes) is seq %d; waiting for the rejection" % (len(big), big_seq))

    rej = h.wait(lambda: [r for r in agent.ledger() if r["reason"] == "rejected"], timeout=90,
                 what="a 'rejected' row in the agent's ledger")
    h.wait(lambda: agent.segment_count() == 0, timeout=60,
           what="the rejected segment to leave the spool")

    acked2, sent2 = send_small(agent, "after", 200)
    h.wait(lambda: agent.segment_count() == 0 and recv.count(AGENT_ID) >= 400, timeout=60,
           what="the last 200 small records to be stored")

    rej = [r for r in agent.ledger() if r["reason"] == "rejected"]
    ch.check(len(rej) == 1, "expected one 'rejected' ledger row, got %r" % rej)
    r = rej[0]
    ch.log("ledger row: %r" % r)
    ch.check(int(r["count"]) == 1, "ledger count %r, expected 1" % r["count"])
    ch.check(int(r["first_seq"]) == big_seq and int(r["last_seq"]) == big_seq,
             "ledger seq range %r..%r, expected %d" % (r["first_seq"], r["last_seq"], big_seq))
    ch.check(ch.u64(r["epoch"]) == agent.epoch(), "ledger epoch differs from the spool's")
    ch.check(r["detail"] is not None and str(r["detail"]).strip() != "",
             "ledger detail is empty")

    # the ledger is forwarded like data: once the row is marked sent, the receiver has it
    h.wait(lambda: all(int(x["sent"] or 0) for x in agent.ledger()), timeout=60,
           what="the ledger row to be forwarded (sent=1)")
    con = recv.db()
    try:
        nloss = con.execute("SELECT count(*) FROM losses").fetchone()[0]
    finally:
        con.close()
    ch.check(nloss >= 1, "the receiver's losses table is empty after the ledger row was sent")

    rows = ch.assert_stored_exactly_once(recv, agent, acked1 + acked2, sent=sent1 + sent2)
    ch.check(len(rows) == 400, "%d rows stored, expected 400 (big line must not be stored)"
             % len(rows))
    ch.check(all(s != big_seq for _, s, _, _ in rows), "the rejected record was stored")

    ch.check(agent.stop() == 0, "agent did not exit 0 on SIGTERM")
    ch.check(recv.stop() == 0, "receiver did not exit 0 on SIGTERM")


if __name__ == "__main__":
    ch.run(main, "d_rejected_batch_ledgered")

#!/usr/bin/env python3
"""t) Live data gets a share of the link while a backlog drains (DESIGN.md §2, "Backlog").

The receiver is down; 20,000 records wait in the spool (segments of at most about 5,000:
one per batch, as max_records is 500 and a batch holds at least one segment). The receiver
starts; the agent sends one batch at a time (forward.in_flight 1). Batches go oldest first,
except that during a backlog every other batch is claimed from the newest end. So the newest
record is stored before most of the backlog, while the oldest still goes first, and
everything is stored exactly once. Without the share the newest record would be in the last
batch stored (received_ms is the receiver's clock when it stores a batch)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cistern_harness as ch

AGENT_ID = "gw-share"
N = 20000


def received_ms(recv, seq):
    con = recv.db()
    try:
        row = con.execute("SELECT received_ms FROM records WHERE agent_id = ? AND seq = ?",
                          (AGENT_ID, seq)).fetchone()
    finally:
        con.close()
    ch.check(row is not None, "seq %d not stored" % seq)
    return row[0]


def main(h):
    recv = h.receiver()  # configured (port chosen) but not started
    agent = h.agent("agent", AGENT_ID, recv,
                    extra={"forward": {"in_flight": 1, "batch": {"max_records": 500}}}).start()
    c = agent.client("unix")
    pad = b"x" * 180  # ~200-byte records
    c.send_many([b'{"n":%d,"pad":"%s"}' % (i, pad) for i in range(N)])
    answers = c.wait_answers(N, timeout=120, alive=h.check_alive)
    ch.check(all(a[0] == "OK" for a in answers), "not every line was answered OK")
    acked, sent = c.acked(), list(c.sent)
    c.close()
    h.wait(lambda: agent.pending_records() == N, timeout=60, what="%d records pending" % N)

    recv.start()
    h.wait(lambda: agent.segment_count() == 0, timeout=120, what="the backlog to drain")
    h.wait(lambda: recv.count(AGENT_ID) == N, timeout=30, what="%d rows stored" % N)
    ch.assert_stored_exactly_once(recv, agent, acked, sent=sent)

    seqs = sorted(int(seq) for _, seq in acked)
    oldest, newest = seqs[0], seqs[-1]
    t_old, t_new = received_ms(recv, oldest), received_ms(recv, newest)
    con = recv.db()
    try:
        later = con.execute("SELECT count(*) FROM records WHERE agent_id = ? AND received_ms > ?",
                            (AGENT_ID, t_new)).fetchone()[0]
    finally:
        con.close()
    ch.log("oldest seq %d stored at %d, newest seq %d at %d; %d records stored after the newest"
           % (oldest, t_old, newest, t_new, later))
    ch.check(t_old <= t_new, "the oldest record was not among the first stored")
    # Oldest first only, the newest record would be in the last batch: nothing after it. With
    # the share it is in the second, and all but the first and last segments come later.
    ch.check(later >= N // 4, "only %d records were stored after the newest one: live data "
             "waited for the backlog" % later)
    ch.check(agent.stop() == 0, "agent did not exit 0 on SIGTERM")
    ch.check(recv.stop() == 0, "receiver did not exit 0 on SIGTERM")


if __name__ == "__main__":
    ch.run(main, "t_backlog_share")

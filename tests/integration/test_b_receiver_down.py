#!/usr/bin/env python3
"""b) The receiver is down: the agent keeps answering OK and its spool grows; when the
receiver comes up the spool drains and every record is stored exactly once.

Phase 1: agent started with no receiver listening; 3,000 records -> all OK, spool segments
> 0, nothing stored. forward.batch.max_records is 500, spool.commit_max_records 3000 and
commit_interval 2s, so a commit holds up to 3,000 records: each stored segment must still hold
at most 500 (a batch carries whole segments).
Receiver started -> segments table empty, all stored exactly once.
Phase 2: receiver stopped with SIGTERM (must exit 0); 2,000 more records -> all OK, spool
grows again; receiver restarted on the same store -> drained, all 5,000 exactly once."""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cistern_harness as ch

AGENT_ID = "gw-offline"


def send_batch(agent, tag, n):
    c = agent.client("unix")
    c.send_many([json.dumps({"phase": tag, "n": i}).encode() for i in range(n)])
    answers = c.wait_answers(n, timeout=120, alive=agent.h.check_alive)
    bad = [a for a in answers if a[0] != "OK"]
    ch.check(not bad, "%s: %d lines not answered OK while the receiver is down, e.g. %r"
             % (tag, len(bad), bad[:3]))
    acked, sent = c.acked(), list(c.sent)
    c.close()
    return acked, sent


def main(h):
    recv = h.receiver()          # configured (port chosen) but not started
    agent = h.agent("agent", AGENT_ID, recv,
                    extra={"spool": {"commit_max_records": 3000, "commit_interval": "2s"},
                           "forward": {"batch": {"max_records": 500}}}).start()

    acked, sent = send_batch(agent, "offline-1", 3000)
    h.wait(lambda: agent.pending_records() == 3000, timeout=60,
           what="3000 records pending in the spool")
    time.sleep(2)                # let the forwarder fail and retry a few times
    ch.check(agent.segment_count() > 0, "spool has no pending segments")
    ch.check(agent.pending_records() == 3000,
             "pending records changed to %d with no receiver" % agent.pending_records())
    ch.log("receiver down: %d segments / %d records pending" % (agent.segment_count(),
                                                                agent.pending_records()))
    biggest = agent._q("SELECT max(record_count) FROM segments")[0][0]
    ch.check(biggest <= 500, "a stored segment holds %d records, more than "
             "forward.batch.max_records (500)" % biggest)

    recv.start()
    h.wait(lambda: agent.segment_count() == 0, timeout=120,
           what="spool to drain after the receiver started")
    h.wait(lambda: recv.count(AGENT_ID) == 3000, timeout=30, what="3000 rows stored")
    ch.assert_stored_exactly_once(recv, agent, acked, sent=sent)
    ch.log("phase 1 drained exactly once")

    ch.check(recv.stop() == 0, "receiver did not exit 0 on SIGTERM")
    acked2, sent2 = send_batch(agent, "offline-2", 2000)
    h.wait(lambda: agent.pending_records() == 2000, timeout=60,
           what="2000 records pending in the spool after the receiver stopped")
    ch.check(agent.segment_count() > 0, "spool has no pending segments")
    time.sleep(1)
    recv.start()
    h.wait(lambda: agent.segment_count() == 0, timeout=120,
           what="spool to drain after the receiver restarted")
    h.wait(lambda: recv.count(AGENT_ID) == 5000, timeout=30, what="5000 rows stored")
    rows = ch.assert_stored_exactly_once(recv, agent, acked + acked2, sent=sent + sent2)
    ch.check(len(rows) == 5000, "%d rows, expected 5000" % len(rows))

    ch.check(agent.stop() == 0, "agent did not exit 0 on SIGTERM")
    ch.check(recv.stop() == 0, "receiver did not exit 0 on SIGTERM")


if __name__ == "__main__":
    ch.run(main, "b_receiver_down")

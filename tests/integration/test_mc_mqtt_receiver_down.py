#!/usr/bin/env python3
"""MQTT c) The receiver is down while the agent publishes: the broker takes the batches
(PUBACK) and keeps them in the receiver's persistent session, but a PUBACK is not the
receiver's acknowledgement, so the agent keeps its segments until the receiver is back,
has stored them and has answered.

Phase 1: receiver up (its persistent session exists), 500 records -> stored, spool empty.
Phase 2: receiver stopped (SIGTERM, exit 0); 3,000 records -> all answered OK; for several
forward.timeout periods (the agent re-sends unacknowledged batches meanwhile) the spool
keeps segments > 0 holding all 3,000 records, nothing new is stored, and no record is
ledgered. Receiver restarted on the same store -> the spool drains, and all 3,500 records
are stored exactly once (the re-sends and the broker's queued copies are absorbed)."""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cistern_harness as ch

AGENT_ID = "gw-mqtt-offline"


def main(h):
    missing = ch.mosquitto_missing()
    ch.check(missing is None, "not installed: %s (scripts/deps.sh installs them)" % missing)
    broker = h.mosquitto().start()
    recv = h.receiver(mqtt=broker).start()
    recv.wait_subscribed()
    agent = h.agent("agent", AGENT_ID, None, mqtt=broker,
                    extra={"forward": {"timeout": "2s",
                                       "batch": {"max_records": 500}}}).start()

    acked1, sent1 = ch.send_lines(agent, [b"online-%d" % i for i in range(500)])
    h.wait(lambda: agent.segment_count() == 0 and recv.count(AGENT_ID) == 500, timeout=60,
           what="the first 500 records stored and the spool empty")
    ch.assert_stored_exactly_once(recv, agent, acked1, sent=sent1)

    ch.check(recv.stop() == 0, "receiver did not exit 0 on SIGTERM")
    mark = broker.mark()
    acked2, sent2 = ch.send_lines(agent, [b"offline-%d" % i for i in range(3000)])
    h.wait(lambda: agent.pending_records() == 3000, timeout=60,
           what="3000 records pending in the spool")
    # The broker takes the batches: the agent is connected and publishing...
    broker.wait_log(r"Received PUBLISH from %s \(d\d, q1, r\d, m\d+, 'cistern/v1/%s/batch'"
                    % (agent.mqtt_client_id, AGENT_ID), mark, timeout=60,
                    what="the agent to publish while the receiver is down")
    # ...and must still keep every segment, through several re-send timeouts.
    for _ in range(8):
        time.sleep(1)
        h.check_alive()
        ch.check(agent.segment_count() > 0,
                 "the agent deleted its segments while the receiver was down (on PUBACK?)")
        ch.check(agent.pending_records() == 3000, "pending records changed to %d with the "
                 "receiver down" % agent.pending_records())
    ch.check(recv.count(AGENT_ID) == 500, "records stored while the receiver was down?")
    ch.check(agent.ledger() == [], "records were ledgered while the receiver was down: %r"
             % agent.ledger()[:3])
    ch.log("receiver down: %d segments / %d records kept" % (agent.segment_count(),
                                                             agent.pending_records()))

    recv.start()
    h.wait(lambda: agent.segment_count() == 0, timeout=120,
           what="the spool to drain after the receiver came back")
    h.wait(lambda: recv.count(AGENT_ID) >= 3500, timeout=30, what="3500 rows stored")
    rows = ch.assert_stored_exactly_once(recv, agent, acked1 + acked2, sent=sent1 + sent2)
    ch.check(len(rows) == 3500, "%d rows, expected 3500" % len(rows))
    ch.check(agent.ledger() == [], "records were ledgered: %r" % agent.ledger()[:3])

    ch.check(agent.stop() == 0, "agent did not exit 0 on SIGTERM")
    ch.check(recv.stop() == 0, "receiver did not exit 0 on SIGTERM")


if __name__ == "__main__":
    ch.run(main, "mqtt_c_receiver_down")

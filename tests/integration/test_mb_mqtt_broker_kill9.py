#!/usr/bin/env python3
"""MQTT b) The broker is kill -9'd and restarted (same port, same persistence directory)
5 times while a producer keeps feeding the agent and the agent keeps forwarding over MQTT
to the receiver.

The broker saves its persistence every second (autosave_interval 1), so each restart
comes back with a slightly stale state: sessions, subscriptions and queued messages
(batches and acks) as of up to a second before the kill, including some the clients have
long since handled. The agent must ignore acks it no longer waits for, re-send what was
not acknowledged, and the receiver must resubscribe when its session is gone.

Checks: 0 lost (every line answered OK is stored, under the spool's epoch and its OK seq),
0 duplicated (no key and no payload stored twice; the unique key absorbs the re-sends),
every stored payload was sent; the spool ends empty; both processes still exit 0 on
SIGTERM. Each restart must have been seen by both clients (the broker logs a new
connection from each)."""
import os
import random
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cistern_harness as ch

AGENT_ID = "gw-broker-crash"
KILLS = 5


def main(h):
    missing = ch.mosquitto_missing()
    ch.check(missing is None, "not installed: %s (scripts/deps.sh installs them)" % missing)
    broker = h.mosquitto(autosave_interval=1).start()
    recv = h.receiver(mqtt=broker).start()
    recv.wait_subscribed()
    agent = h.agent("agent", AGENT_ID, None, mqtt=broker,
                    extra={"forward": {"batch": {"max_records": 300, "max_delay": "100ms"},
                                       "timeout": "5s"}}).start()
    epoch = agent.epoch()
    prod = ch.LineProducer(agent, "b", chunk=40, interval=0.02)
    prod.start()
    rnd = random.Random(int(os.environ.get("CISTERN_SEED", str(int(time.time())))))
    h.wait(lambda: recv.count(AGENT_ID) > 0, timeout=60, what="the first records stored")
    for k in range(KILLS):
        time.sleep(rnd.uniform(0.5, 3.0))
        broker.kill9()
        mark = broker.mark()  # only what the new broker logs
        ch.log("broker kill -9 #%d (stored so far: %d, spool segments: %d)"
               % (k + 1, recv.count(AGENT_ID), agent.segment_count()))
        time.sleep(rnd.uniform(0, 2.0))
        broker.start()
        # both clients come back on their own (the log is the broker's, not theirs)
        for cid in (agent.mqtt_client_id, recv.mqtt_client_id):
            broker.wait_log(r"New client connected from \S+ as %s " % re.escape(cid), mark,
                            timeout=60, what="%s to reconnect after restart #%d" % (cid, k + 1))
    time.sleep(2)
    acked, sent = prod.stop()
    ch.log("sent %d lines, %d answered OK" % (len(sent), len(acked)))
    ch.check(len(acked) == len(sent), "only %d of %d lines answered OK" % (len(acked), len(sent)))

    h.wait(lambda: agent.segment_count() == 0, timeout=180,
           what="the spool to drain after the restarts")
    h.wait(lambda: recv.count(AGENT_ID) >= len(acked), timeout=60,
           what="all %d acknowledged records stored" % len(acked))
    rows = ch.assert_stored_exactly_once(recv, agent, acked, sent=sent, epoch=epoch)
    ch.check(len(rows) == len(acked), "%d rows stored, %d lines sent" % (len(rows), len(acked)))
    ch.log("%d records, %d broker kills: 0 lost, 0 duplicated" % (len(rows), KILLS))

    ch.check(agent.stop() == 0, "agent did not exit 0 on SIGTERM")
    ch.check(recv.stop() == 0, "receiver did not exit 0 on SIGTERM")


if __name__ == "__main__":
    ch.run(main, "mqtt_b_broker_kill9")

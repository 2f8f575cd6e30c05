#!/usr/bin/env python3
"""MQTT d) Two receivers on one shared subscription ($share/cistern/cistern/v1/+/batch):
same group, different client ids and certificates (receiver-1, receiver-2), one SQLite
store file (two processes, busy_timeout). Two agents forward 6,000 records each in small
batches.

Checks: each agent's records are stored exactly once overall (keys and payloads); both
spools drain; the broker's log shows both receivers subscribed to
$share/cistern/cistern/v1/+/batch, each was sent batches and published acks, and each batch
the agents published was delivered to one receiver only (split, not copied)."""
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cistern_harness as ch

AGENTS = ("gw-shared-1", "gw-shared-2")
N = 6000


def main(h):
    missing = ch.mosquitto_missing()
    ch.check(missing is None, "not installed: %s (scripts/deps.sh installs them)" % missing)
    broker = h.mosquitto().start()
    store = h.path("shared-store.db")
    r1 = h.receiver("recv1", mqtt=broker, mqtt_cn="receiver-1", db_path=store).start()
    r1.wait_subscribed()
    r2 = h.receiver("recv2", mqtt=broker, mqtt_cn="receiver-2", db_path=store).start()
    r2.wait_subscribed()

    agents = [h.agent("agent-%d" % i, aid, None, mqtt=broker,
                      extra={"forward": {"batch": {"max_records": 100, "max_delay": "50ms"}}})
              .start() for i, aid in enumerate(AGENTS)]
    results = {}
    for a in agents:
        acked, sent = [], []
        for k in range(0, N, 500):  # in chunks, so the agent cuts many batches
            ak, st = ch.send_lines(a, [b"%s-%d" % (a.agent_id.encode(), i)
                                       for i in range(k, k + 500)])
            acked += ak
            sent += st
        results[a.agent_id] = (acked, sent)

    for a in agents:
        h.wait(lambda: a.segment_count() == 0, timeout=180, what="%s's spool to drain" % a.name)
        h.wait(lambda: r1.count(a.agent_id) >= N, timeout=60,
               what="%d records of %s stored" % (N, a.agent_id))
    for a in agents:
        acked, sent = results[a.agent_id]
        rows = ch.assert_stored_exactly_once(r1, a, acked, sent=sent)
        ch.check(len(rows) == N, "%s: %d rows stored, expected %d" % (a.agent_id, len(rows), N))

    batch_topics = "|".join(re.escape("cistern/v1/%s/batch" % a) for a in AGENTS)
    ack_topics = "|".join(re.escape("cistern/v1/%s/ack" % a) for a in AGENTS)
    log = broker.log_text()
    split = {}
    for r in (r1, r2):
        got = broker.publishes_to(r.mqtt_client_id, batch_topics)
        answered = len(re.findall(r"Received PUBLISH from %s \(d\d, q1, r\d, m\d+, '(?:%s)'"
                                  % (re.escape(r.mqtt_client_id), ack_topics), log))
        split[r.name] = (got, answered)
    ch.log("batches sent to / acks published by each receiver: %r" % split)
    for name, (got, answered) in split.items():
        ch.check(got > 0, "the broker sent no batch to %s: the load was not split (%r)"
                 % (name, split))
        ch.check(answered > 0, "%s published no ack at QoS 1 (%r)" % (name, split))
    # Split, not copied: each batch the agents published went to one receiver of the group.
    for r in (r1, r2):
        ch.check(re.search(r"%s 1 \$share/cistern/cistern/v1/\+/batch" % re.escape(r.mqtt_client_id),
                           log), "%s did not subscribe to $share/cistern/cistern/v1/+/batch "
                 "at QoS 1" % r.name)
    published = len(re.findall(r"Received PUBLISH from \S+ \(d\d, q1, r\d, m\d+, '(?:%s)'"
                               % batch_topics, log))
    delivered = sum(got for got, _ in split.values())
    ch.check(delivered == published, "the agents published %d batches, the broker delivered %d "
             "to the receivers (a shared subscription delivers each once)" % (published, delivered))

    for a in agents:
        ch.check(a.stop() == 0, "%s did not exit 0 on SIGTERM" % a.name)
    for r in (r1, r2):
        ch.check(r.stop() == 0, "%s did not exit 0 on SIGTERM" % r.name)


if __name__ == "__main__":
    ch.run(main, "mqtt_d_shared_subscription")

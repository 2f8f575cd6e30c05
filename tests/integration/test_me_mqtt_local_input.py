#!/usr/bin/env python3
"""MQTT e) The agent's mqtt input: devices publish to the gateway's local mosquitto (a plain
listener on loopback, anonymous), the agent subscribes (topics ["sensors/#"], QoS 1,
persistent session) and forwards to the receiver over HTTPS.

Phase 1: the stock mosquitto_pub client publishes 5,000 messages at QoS 1 (two processes,
-l, one line per message: 2,500 on sensors/a and 2,500 on sensors/b; the broker's log must
show it received all 5,000). All 5,000 are stored at the receiver exactly once, each with
stream = the topic it was published on, under the spool's epoch with distinct seqs.
Phase 2 (the persistent session): the agent is stopped (SIGTERM, exit 0); 1,000 more
messages are published on sensors/c while it is away; the agent is started again and they
arrive: all 6,000 stored exactly once."""
import os
import re
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cistern_harness as ch

AGENT_ID = "gw-local-mqtt"
INPUT_CLIENT = "gw-local-mqtt-in"


def publish(broker, topic, lines, client_id):
    """mosquitto_pub -q 1 -l: one QoS 1 message per line fed on stdin. It must exit 0 and
    the broker's log must show every message received from it."""
    mark = broker.mark()
    rc, out = broker.pub(topic, ["-q", "1", "-l", "-i", client_id],
                         stdin=b"".join(l + b"\n" for l in lines))
    ch.check(rc == 0, "mosquitto_pub %s exited %d: %s" % (client_id, rc, out))
    got = len(re.findall(r"Received PUBLISH from %s \(d\d, q1," % re.escape(client_id),
                         broker.log_text()[mark:]))
    ch.check(got == len(lines), "the broker received %d of %d QoS 1 messages from %s"
             % (got, len(lines), client_id))


def check_rows(recv, agent, expected):
    """expected: {payload: topic}. Each stored exactly once, stream = topic, nothing else."""
    rows = recv.rows(AGENT_ID)
    epoch = agent.epoch()
    by_payload = {}
    for e, s, p, st in rows:
        by_payload.setdefault(p, []).append((e, s, st))
    dups = {p: v for p, v in by_payload.items() if len(v) > 1}
    ch.check(not dups, "%d messages stored more than once, e.g. %r"
             % (len(dups), list(dups.items())[:3]))
    keys = [(e, s) for e, s, _, _ in rows]
    ch.check(len(set(keys)) == len(keys), "two rows under one key")
    missing = [p for p in expected if p not in by_payload]
    ch.check(not missing, "%d published messages not stored, e.g. %r" % (len(missing), missing[:5]))
    extra = [p for p in by_payload if p not in expected]
    ch.check(not extra, "%d stored payloads were never published, e.g. %r" % (len(extra), extra[:3]))
    wrong = [(p, v[0][2], expected[p]) for p, v in by_payload.items() if v[0][2] != expected[p]]
    ch.check(not wrong, "%d records with a stream other than their topic, e.g. %r"
             % (len(wrong), wrong[:3]))
    ch.check(all(e == epoch for e, _ in keys), "records stored under another epoch")
    return rows


def main(h):
    missing = ch.mosquitto_missing()
    ch.check(missing is None, "not installed: %s (scripts/deps.sh installs them)" % missing)
    local = h.mosquitto("local-broker", tls=False).start()
    recv = h.receiver().start()
    inp = {"name": "sensors", "type": "mqtt", "url": local.url, "topics": ["sensors/#"],
           "qos": 1, "client_id": INPUT_CLIENT}
    agent = h.agent("agent", AGENT_ID, recv, inputs=[inp], unix_socket=False, tcp=False).start()
    local.wait_subscribed(INPUT_CLIENT, timeout=60)

    expected = {}
    jobs = []
    for topic, tag in (("sensors/a", b"a"), ("sensors/b", b"b")):
        lines = [b"%s-%05d {\"t\":%d}" % (tag, i, i) for i in range(2500)]
        for l in lines:
            expected[l] = topic
        jobs.append((topic, lines, "pub-" + tag.decode()))
    errors = []

    def run(job):
        try:
            publish(local, *job)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ch.check(not errors, "publishing failed: %s" % errors)
    ch.log("mosquitto_pub published 5000 messages at QoS 1")

    h.wait(lambda: recv.count(AGENT_ID) >= 5000, timeout=180,
           what="5000 messages stored at the receiver")
    h.wait(lambda: agent.segment_count() == 0, timeout=60, what="the spool to drain")
    rows = check_rows(recv, agent, expected)
    ch.check(len(rows) == 5000, "%d rows stored, expected 5000" % len(rows))
    ch.log("phase 1: 5000 messages stored exactly once, stream = topic")

    # Phase 2: messages published while the agent is away wait in its persistent session.
    ch.check(agent.stop() == 0, "agent did not exit 0 on SIGTERM")
    lines = [b"c-%05d" % i for i in range(1000)]
    for l in lines:
        expected[l] = "sensors/c"
    publish(local, "sensors/c", lines, "pub-c")
    agent.start()
    h.wait(lambda: recv.count(AGENT_ID) >= 6000, timeout=180,
           what="the 1000 messages published while the agent was down to be stored")
    h.wait(lambda: agent.segment_count() == 0, timeout=60, what="the spool to drain")
    rows = check_rows(recv, agent, expected)
    ch.check(len(rows) == 6000, "%d rows stored, expected 6000" % len(rows))

    ch.check(agent.stop() == 0, "agent did not exit 0 on SIGTERM")
    ch.check(recv.stop() == 0, "receiver did not exit 0 on SIGTERM")
    ch.check(local.stop() == 0, "the local broker did not exit 0 on SIGTERM")


if __name__ == "__main__":
    ch.run(main, "mqtt_e_local_input")

#!/usr/bin/env python3
"""MQTT a) 20,000 records end to end over MQTT: agent (socket input, forward.transport
mqtt, ssl:// to a mosquitto TLS listener with its client certificate) -> broker (ACL: each
agent only under its own CN) -> receiver (MQTT ingest on the shared subscription) -> store.

Checks, against the receiver's store DB: 20,000 rows for the agent, no key and no payload
stored twice, the stored payloads are exactly those sent, each under the spool's epoch and
the seq its OK line gave; the spool ends empty (segments deleted only on acks).
And the wire, as a bystander (an admin identity's mosquitto_sub) and the broker's log see it:
batches are QoS 1 PUBLISHes to cistern/v1/<id>/batch with Content Type
application/vnd.cistern.signed-batch.v1+protobuf, Response Topic cistern/v1/<id>/ack and 16
bytes of Correlation Data; the receiver answers on that topic, QoS 1, with the correlation data
copied (same 8-byte run id) and a JSON {"status":"ok",...} payload."""
import json
import os
import re
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cistern_harness as ch

N_PER_CLIENT = 10000
AGENT_ID = "gw-mqtt-once"
BATCH_TOPIC = "cistern/v1/%s/batch" % AGENT_ID
ACK_TOPIC = "cistern/v1/%s/ack" % AGENT_ID
CONTENT_TYPE = ch.SIGNED_CT.encode()


def main(h):
    missing = ch.mosquitto_missing()
    ch.check(missing is None, "not installed: %s (scripts/deps.sh installs them)" % missing)
    broker = h.mosquitto().start()
    recv = h.receiver(mqtt=broker).start()
    recv.wait_subscribed()
    agent = h.agent("agent", AGENT_ID, None, mqtt=broker).start()

    # Bystanders: one batch and one ack, with their properties. -F puts the correlation
    # data (raw bytes) where its length is known: last for the batch, before the payload
    # for the ack.
    spy_batch = broker.sub(BATCH_TOPIC, ["-C", "1", "-N", "-q", "1", "-i", "spy-batch",
                                         "-F", "%t %q %R %C %D"])
    spy_ack = broker.sub(ACK_TOPIC, ["-C", "1", "-N", "-q", "1", "-i", "spy-ack",
                                     "-F", "%t %q %D %p"])
    broker.wait_subscribed("spy-batch")
    broker.wait_subscribed("spy-ack")

    clients = {"unix": agent.client("unix"), "tcp": agent.client("tcp")}
    errors = []

    def produce(via, c):
        try:
            for k in range(0, N_PER_CLIENT, 500):
                c.send_many([json.dumps({"via": via, "n": i}).encode()
                             for i in range(k, min(k + 500, N_PER_CLIENT))])
        except Exception as e:  # surfaced below
            errors.append((via, e))

    threads = [threading.Thread(target=produce, args=(v, c)) for v, c in clients.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ch.check(not errors, "producer failed: %r" % errors)

    acked, sent = [], []
    for via, c in clients.items():
        answers = c.wait_answers(N_PER_CLIENT, timeout=180, alive=h.check_alive)
        bad = [a for a in answers if a[0] != "OK"]
        ch.check(not bad, "%s: %d lines not answered OK, e.g. %r" % (via, len(bad), bad[:5]))
        acked.extend(c.acked())
        sent.extend(c.sent)
        c.close()
    total = 2 * N_PER_CLIENT
    ch.check(len(acked) == total, "acked %d of %d" % (len(acked), total))
    ch.log("all %d lines answered OK; waiting for the receiver to store them" % total)

    h.wait(lambda: recv.count(AGENT_ID) >= total, timeout=240,
           what="receiver to store %d records over MQTT" % total)
    h.wait(lambda: agent.segment_count() == 0, timeout=120,
           what="the agent's spool to drain (segments deleted on the receiver's acks)")
    n = recv.count(AGENT_ID)
    ch.check(n == total, "receiver holds %d rows for %s, expected %d" % (n, AGENT_ID, total))
    rows = ch.assert_stored_exactly_once(recv, agent, acked, sent=sent)
    ch.check({p for _, _, p, _ in rows} == set(sent), "stored payload set != sent payload set")
    streams = {st for _, _, _, st in rows}
    ch.check(streams == {"apps"}, "stream should be the input name 'apps', got %r" % streams)

    # -- the wire --------------------------------------------------------------------
    out, err = spy_batch.communicate(timeout=30 * ch.SCALE)
    ch.check(spy_batch.returncode == 0, "spy on %s failed: %r" % (BATCH_TOPIC, err))
    parts = out.split(b" ", 4)
    ch.check(len(parts) == 5, "cannot parse the spied batch: %r" % out[:200])
    topic, qos, resp_topic, ctype, corr_b = parts
    ch.check(topic.decode() == BATCH_TOPIC, "batch topic %r" % topic)
    ch.check(qos == b"1", "batch published at QoS %r, expected 1" % qos)
    ch.check(resp_topic.decode() == ACK_TOPIC,
             "batch Response Topic %r, expected %r" % (resp_topic, ACK_TOPIC))
    ch.check(ctype == CONTENT_TYPE, "batch Content Type %r, expected %r" % (ctype, CONTENT_TYPE))
    ch.check(len(corr_b) == 16, "batch Correlation Data is %d bytes, expected 16: %r"
             % (len(corr_b), corr_b))

    out, err = spy_ack.communicate(timeout=30 * ch.SCALE)
    ch.check(spy_ack.returncode == 0, "spy on %s failed: %r" % (ACK_TOPIC, err))
    m = re.match(rb"(\S+) (\d) ", out)
    ch.check(m is not None, "cannot parse the spied ack: %r" % out[:200])
    ch.check(m.group(1).decode() == ACK_TOPIC, "ack topic %r" % m.group(1))
    ch.check(m.group(2) == b"1", "ack published at QoS %r, expected 1" % m.group(2))
    rest = out[m.end():]
    corr_a, sep, payload = rest[:16], rest[16:17], rest[17:]
    ch.check(sep == b" ", "ack Correlation Data is not 16 bytes: %r" % rest[:40])
    ch.check(corr_a[:8] == corr_b[:8],
             "ack correlation run id %r differs from the batch's %r" % (corr_a[:8], corr_b[:8]))
    ack = json.loads(payload.decode())
    ch.check(ack.get("status") == "ok", "ack payload status is not ok: %r" % ack)
    ch.check(isinstance(ack.get("acked"), list) and ack["acked"],
             "ack payload has no acked ranges: %r" % ack)
    ch.check(all(isinstance(r[0], str) and int(r[0]) == agent.epoch() for r in ack["acked"]),
             "ack ranges must carry the spool's epoch as a decimal string: %r" % ack["acked"])

    log = broker.log_text()
    ch.check(not re.search(r"Denied PUBLISH", log), "the broker denied a PUBLISH: %s"
             % re.findall(r".*Denied PUBLISH.*", log)[:3])
    qos = set(re.findall(r"Received PUBLISH from \S+ \(d\d, q(\d), r\d, m\d+, '%s'"
                         % re.escape(BATCH_TOPIC), log))
    ch.check(qos == {"1"}, "batches were published at QoS %r, expected only 1" % qos)
    ch.check(broker.publishes_to(recv.mqtt_client_id, re.escape(BATCH_TOPIC)) > 0,
             "the broker never sent a batch to the receiver")

    ch.check(agent.stop() == 0, "agent did not exit 0 on SIGTERM")
    ch.check(recv.stop() == 0, "receiver did not exit 0 on SIGTERM")
    ch.log("%d records stored exactly once over MQTT" % total)


if __name__ == "__main__":
    ch.run(main, "mqtt_a_20k_exactly_once")

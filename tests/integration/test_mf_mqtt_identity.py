#!/usr/bin/env python3
"""MQTT f) Identity, twice over.

Part 1, the broker's ACL: an agent configured with agent.id gw-impostor but holding the
certificate of CN gw-honest publishes to cistern/v1/gw-impostor/batch, which the ACL
(pattern write cistern/v1/%u/batch, %u = the CN) forbids. Next to it a correctly configured
agent (gw-good) shows the path works. Checks: the broker denied the impostor's PUBLISH
(its log); the impostor's log says the broker refused; its spool still holds all its
records and it ledgered none; the receiver stores nothing for gw-impostor or gw-honest,
and gw-good's records exactly once.

Part 2 (run first), the receiver's own check: a real (signed) batch of agent gw-a is captured with
mosquitto_sub (admin identity) before any receiver has subscribed (so nothing stores it), and gw-a is killed (its
records stay in its spool). With the receiver up, the captured bytes are republished under
gw-b's topic with a Response Topic and 16 bytes of Correlation Data. Checks: the receiver
answers {"status":"rejected",...} on that response topic with the correlation data copied,
and stores nothing from it (no row for gw-b, none for gw-a). Then gw-a is restarted and its
own records arrive normally, exactly once (the captured batch was a good one)."""
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cistern_harness as ch

IMPOSTOR_ID = "gw-impostor"
IMPOSTOR_CN = "gw-honest"
# the broker's refusal as the agent reports it (not e.g. "connection refused": the broker is up)
REFUSED = re.compile(r"(?i)^.*(not authori[sz]ed|reason code 135|0x87|"
                     r"(broker|publish)\S*( \S+){0,3} (refused|denied)).*$", re.M)
CORR = b"0123456789abcdef"


def part1(h, broker, recv):
    bad = h.agent("impostor", IMPOSTOR_ID, None, mqtt=broker, cn=IMPOSTOR_CN,
                  extra={"forward": {"timeout": "2s"}}).start()
    good = h.agent("good", "gw-good", None, mqtt=broker).start()
    mark = broker.mark()
    _, _ = ch.send_lines(bad, [b"impostor-%d" % i for i in range(50)])
    acked, sent = ch.send_lines(good, [b"good-%d" % i for i in range(50)])

    broker.wait_log(r"Denied PUBLISH from %s \(d\d, q\d, r\d, m\d+, 'cistern/v1/%s/batch'"
                    % (re.escape(bad.mqtt_client_id), IMPOSTOR_ID), mark, timeout=60,
                    what="the broker to deny the impostor's PUBLISH")
    h.wait(lambda: REFUSED.search(bad.proc.log_text()), timeout=60,
           what="the impostor's log to say the broker refused its batch")
    h.wait(lambda: good.segment_count() == 0 and recv.count("gw-good") == 50, timeout=60,
           what="gw-good's 50 records stored")
    ch.assert_stored_exactly_once(recv, good, acked, sent=sent)
    time.sleep(3)  # a re-send timeout or so more: still nothing may get through
    ch.check(bad.pending_records() == 50,
             "the impostor's spool holds %d records, expected all 50" % bad.pending_records())
    ch.check(bad.ledger() == [], "the impostor ledgered records: %r" % bad.ledger()[:3])
    for aid in (IMPOSTOR_ID, IMPOSTOR_CN):
        ch.check(recv.count(aid) == 0, "the receiver stored records for %s" % aid)
    ch.log("impostor refused by the ACL; its log: %s" % REFUSED.search(bad.proc.log_text()).group(0))
    ch.check(bad.stop() == 0, "the impostor did not exit 0 on SIGTERM")
    ch.check(good.stop() == 0, "gw-good did not exit 0 on SIGTERM")


def part2(h, broker, recv):
    # recv is configured but not running: only the spy sees gw-a's batches
    a = h.agent("agent-a", "gw-a", None, mqtt=broker).start()
    spy = broker.sub("cistern/v1/gw-a/batch", ["-C", "1", "-N", "-q", "1", "-i", "spy-a",
                                               "-F", "%p"])
    broker.wait_subscribed("spy-a")
    acked, sent = ch.send_lines(a, [b"a-%d" % i for i in range(20)])
    out, err = spy.communicate(timeout=60 * ch.SCALE)
    ch.check(spy.returncode == 0 and out, "could not capture a batch of gw-a: %r" % err)
    a.kill9()
    ch.check(a.pending_records() == 20, "gw-a's spool holds %d records, expected 20"
             % a.pending_records())
    ch.log("captured a %d-byte batch of gw-a" % len(out))
    batch = h.path("gw-a-batch.bin")
    with open(batch, "wb") as f:
        f.write(out)

    recv.start()
    recv.wait_subscribed()
    reply = broker.sub("cistern/v1/gw-b/ack", ["-C", "1", "-N", "-q", "1", "-i", "spy-b",
                                               "-F", "%D %p"])
    broker.wait_subscribed("spy-b")
    rc, msg = broker.pub("cistern/v1/gw-b/batch", [
        "-q", "1", "-f", batch,
        "-D", "publish", "response-topic", "cistern/v1/gw-b/ack",
        "-D", "publish", "correlation-data", CORR.decode(),
        "-D", "publish", "content-type", ch.SIGNED_CT])
    ch.check(rc == 0, "mosquitto_pub of the forged batch failed: %s" % msg)
    out, err = reply.communicate(timeout=60 * ch.SCALE)
    ch.check(reply.returncode == 0, "no answer on the response topic: %r" % err)
    ch.check(out[:17] == CORR + b" ", "the answer's correlation data is not ours: %r" % out[:40])
    ans = json.loads(out[17:].decode())
    ch.log("receiver answered: %r" % ans)
    ch.check(ans.get("status") == "rejected", "forged batch not rejected: %r" % ans)
    ch.check(str(ans.get("error") or "").strip() != "", "rejection without an error: %r" % ans)
    time.sleep(1)
    for aid in ("gw-a", "gw-b"):
        ch.check(recv.count(aid) == 0, "the receiver stored %d records for %s from the "
                 "forged batch" % (recv.count(aid), aid))

    # gw-a's own (re-)sends still get through: the captured batch was a good one
    a.start()
    h.wait(lambda: a.segment_count() == 0 and recv.count("gw-a") == 20, timeout=90,
           what="gw-a's 20 records stored after its restart")
    ch.assert_stored_exactly_once(recv, a, acked, sent=sent)
    ch.check(recv.count("gw-b") == 0, "records stored for gw-b")
    ch.check(a.stop() == 0, "gw-a did not exit 0 on SIGTERM")


def main(h):
    missing = ch.mosquitto_missing()
    ch.check(missing is None, "not installed: %s (scripts/deps.sh installs them)" % missing)
    broker = h.mosquitto().start()
    # Part 2 first: before any receiver has a session on the broker, so that nothing
    # queues gw-a's captured batch for a receiver.
    recv = h.receiver(mqtt=broker)
    part2(h, broker, recv)
    part1(h, broker, recv)
    ch.check(recv.stop() == 0, "receiver did not exit 0 on SIGTERM")


if __name__ == "__main__":
    ch.run(main, "mqtt_f_identity")

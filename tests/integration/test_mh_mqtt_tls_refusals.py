#!/usr/bin/env python3
"""MQTT h) The broker's bad certificates are refused by the agent's MQTT transport in words a
technician can act on, as the HTTPS transport words the receiver's (test_o_tls_refusals).

Paho says no more than OpenSSL's "certificate verify failed", or its own "connect failure" for
a certificate that does not name the host. The agent then asks the broker again with libcurl
(edge-agent/tls_diag.c, on a worker thread) which check failed.

One agent (forward.transport mqtt, log level debug), no receiver. A real mosquitto presents, in
turn: an expired certificate, one not valid yet, a self-signed one, one from another CA, one
for another host name (certificates made with the openssl CLI, as test_o makes them). Before
each, the broker is stopped and the agent has logged that it cannot connect, so each
certificate is a new failure. For each: the agent's log says the matching words in one line
(not one per retry: more attempts follow), `cistern-agent status --json` shows them as the
link's last error, the records stay in the spool and nothing goes to the loss ledger. Paho's
"certificate verify failed" is diagnosed once: no new diagnosis once the words are known. (Its
"connect failure" is diagnosed at each attempt, since Paho says the same of a broker that is
down; the words are still logged once.) Then the broker's good certificate is back, a receiver
subscribes, and every record is stored exactly once.

Skipped (exit 77) when mosquitto is not installed."""
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cistern_harness as ch
from test_o_tls_refusals import BadPki, broker_cert

AGENT_ID = "gw-mqtt-tls"
N_RECORDS = 30
ATTEMPTS_AFTER = 4  # connection attempts to sit through after the words, to see them once


def cases(pki):
    """(label, (cert, key), the words: a regex). All but the last are OpenSSL's "certificate
    verify failed" for Paho; the last is Paho's own check, a "connect failure"."""
    return [
        ("expired", pki.expired("mq-expired", "localhost", "server"),
         r"the broker's certificate expired on Jan\s+2 00:00:00 2020 GMT: renew it on the "
         r"broker \(or check this gateway's clock\) \(OpenSSL: certificate verify failed\)"),
        ("not yet valid", pki.not_yet_valid("mq-future", "localhost", "server"),
         r"the broker's certificate is not valid before Jan\s+1 00:00:00 2099 GMT: check this "
         r"gateway's clock, or the certificate's start date \(OpenSSL: certificate verify "
         r"failed\)"),
        ("self-signed", pki.self_signed("mq-self", "localhost", "server_selfsigned"),
         r"the broker's certificate \(CN\s?=\s?localhost\) is self-signed: give the broker one "
         r"signed by the CA in forward.tls.ca_file \(OpenSSL: certificate verify failed\)"),
        ("other CA", pki.other_ca_signed("mq-otherca", "localhost", "server"),
         r"the broker's certificate is not signed by forward.tls.ca_file \(its issuer is "
         r"CN\s?=\s?some-other-ca\): set forward.tls.ca_file to the CA that signed it "
         r"\(OpenSSL: certificate verify failed\)"),
        ("wrong host", pki.signed("mq-otherhost", "wrong.example.net", "server_otherhost"),
         r"the broker's certificate is for DNS:wrong.example.net, not 127.0.0.1: use a name it "
         r"holds in forward.url, or reissue it"),
    ]


def since(proc, mark):
    return proc.log_text()[mark:]


def connections(broker, mark):
    """TCP connections the broker accepted since mark (Paho's attempts and the diagnoses)."""
    return len(re.findall(r"New connection from 127\.0\.0\.1", broker.log_text()[mark:]))


def main(h):
    missing = ch.mosquitto_missing()
    if missing:
        ch.log("SKIP: not installed: %s (scripts/deps.sh installs them)" % missing)
        sys.exit(77)
    pki = BadPki(h)
    broker = h.mosquitto()
    agent = h.agent("agent", AGENT_ID, None, mqtt=broker, log_level="debug").start()
    acked, sent = ch.send_lines(agent, [json.dumps({"n": n}).encode()
                                        for n in range(N_RECORDS)])
    connect_line = r"\[mqtt\] cannot connect to %s: " % re.escape(broker.url)
    down_mark = 0

    for label, (cert, key), words in cases(pki):
        # The broker is down (first not started, then stopped): the agent says so first, so
        # that this certificate is a new failure for it.
        h.wait(lambda: re.search(connect_line + r".*connect failure", since(agent.proc,
                                                                             down_mark)),
               timeout=60, what="the agent to find the broker down before the %s case" % label)
        broker_cert(broker, cert, key)
        bmark = broker.mark()
        mark = len(agent.proc.log_text())
        broker.start()

        rx = re.compile(connect_line + words + r"; retrying with backoff")
        line = h.wait(lambda: rx.search(since(agent.proc, mark)), timeout=60,
                      what="the agent's log to say, for the %s certificate: %s" % (label, words))
        ch.log("%s: agent says: %s" % (label, line.group(0)))
        words_at = mark + line.end()

        # More attempts against the same certificate: still one line, and no new diagnosis
        # (the worker's handshakes are the broker's connections too).
        seen = connections(broker, bmark)
        h.wait(lambda: connections(broker, bmark) >= seen + ATTEMPTS_AFTER, timeout=60,
               what="%d more connection attempts to the %s broker" % (ATTEMPTS_AFTER, label))
        n_lines = len(rx.findall(since(agent.proc, mark)))
        ch.check(n_lines == 1, "%s: the agent logged the words %d times, expected once"
                 % (label, n_lines))
        asked = re.findall(r"\[mqtt\] asking \S+ which check of its certificate fails",
                           since(agent.proc, words_at))
        if label != "wrong host":
            ch.check(not asked, "%s: the certificate was diagnosed again on a later attempt: %r"
                     % (label, asked))
        other = [l for l in re.findall(connect_line + r".*", since(agent.proc, mark))
                 if not re.search(words, l)]
        ch.check(not other, "%s: other connect failures logged against this certificate: %r"
                 % (label, other))

        # What `cistern-agent status` shows: the forwarder's next failed attempt takes the words.
        def shown():
            link = agent.status()["agent"].get("link", {})
            return link.get("state") == "down" and re.search(words, link.get("last_error") or "")
        h.wait(shown, timeout=60, what="`cistern-agent status --json` to show the words for "
               "the %s certificate as the link's last error" % label)

        # Nothing left the spool, nothing was written off.
        ch.check(agent.pending_records() == N_RECORDS,
                 "%s: %d records pending, expected all %d to stay in the spool"
                 % (label, agent.pending_records(), N_RECORDS))
        ch.check(agent.ledger() == [], "%s: the loss ledger holds %r" % (label, agent.ledger()))
        down_mark = len(agent.proc.log_text())
        ch.check(broker.stop() == 0, "mosquitto did not exit 0 on SIGTERM")
        ch.log("%s: refused in words, once; records kept" % label)

    # The good certificate back: every record is delivered, once.
    broker_cert(broker, h.server_cert, h.server_key)
    recv = h.receiver("receiver", mqtt=broker)
    broker.start()
    recv.start()
    h.wait(lambda: agent.pending_records() == 0, timeout=120,
           what="the records to drain once the broker's certificate is good")
    ch.assert_stored_exactly_once(recv, agent, acked, sent=sent)
    ch.check(agent.ledger() == [], "the loss ledger holds %r" % agent.ledger())
    ch.check(agent.stop() == 0, "agent did not exit 0 on SIGTERM")
    ch.check(recv.stop() == 0, "receiver did not exit 0 on SIGTERM")
    ch.check(broker.stop() == 0, "mosquitto did not exit 0 on SIGTERM")


if __name__ == "__main__":
    ch.run(main, "mqtt_h_tls_refusals")

#!/usr/bin/env python3
"""MQTT g) No leak across reconnects: the agent (socket input -> MQTT transport) and the
receiver (MQTT ingest) run under valgrind (--leak-check=full
--errors-for-leak-kinds=definite --error-exitcode=99) while the broker is restarted 50
times (alternately kill -9 and SIGTERM) with traffic flowing. In each round the broker's
log must show both clients reconnect, the agent publish a batch and the receiver publish
an ack, so every round goes through a full reconnect and publish/ack cycle; the broker then
stays up until the connections are 2.5 s old (a client rightly backs off further after
connections that die right away, which would only make the test slower).

Then: every line answered OK is stored exactly once; both processes stop on SIGTERM
with exit status 0 (valgrind's 99 means an error or a definite leak) and valgrind's
summaries say 0 errors and nothing definitely lost; and neither process set more than one
Paho client aside per 5 restarts. A client set aside is memory Paho 1.3.12 keeps for good
after a failed PUBLISH write, about 7 KiB, still reachable and so invisible to valgrind: the
processes log each one, and the test prints the counts. Why the bound is what it is: see the
comment above it.

CISTERN_MQTT_RESTARTS sets the number of restarts (default 50; scripts/soak.sh runs 200).

With binaries built with -DCISTERN_SANITIZE=ON (valgrind cannot run those) the processes
run bare and LeakSanitizer does the checking: it makes the exit status non-zero on a leak.
Without valgrind (and without a sanitizer build) the test is skipped (exit 77)."""
import os
import re
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cistern_harness as ch

AGENT_ID = "gw-mqtt-leaks"
RESTARTS = int(os.environ.get("CISTERN_MQTT_RESTARTS", "50"))
STABLE_S = 2.5
def main(h):
    missing = ch.mosquitto_missing()
    ch.check(missing is None, "not installed: %s (scripts/deps.sh installs them)" % missing)
    asan = ch.sanitized(h.agent_bin) or ch.sanitized(h.receiver_bin)
    if asan:
        wrapper = []
        ch.log("sanitizer build: no valgrind; LeakSanitizer checks at exit")
    else:
        vg = shutil.which("valgrind")
        if not vg:
            ch.log("SKIP: valgrind is not installed (apt-get install valgrind)")
            sys.exit(77)
        wrapper = [vg] + ch.VALGRIND_ARGS
    broker = h.mosquitto().start()
    recv = h.receiver(mqtt=broker, wrapper=wrapper).start(wait=False)
    recv.wait_ready(timeout=120)
    recv.wait_subscribed(timeout=120)
    agent = h.agent("agent", AGENT_ID, None, mqtt=broker, wrapper=wrapper,
                    extra={"forward": {"timeout": "3s",
                                       "batch": {"max_records": 200, "max_delay": "100ms"}}})
    agent.start(wait=False)
    agent.wait_ready(timeout=120)
    prod = ch.LineProducer(agent, "g", chunk=20, interval=0.05)
    prod.start()
    h.wait(lambda: recv.count(AGENT_ID) > 0, timeout=120, what="the first records stored")

    batch = re.escape("cistern/v1/%s/batch" % AGENT_ID)
    ack = re.escape("cistern/v1/%s/ack" % AGENT_ID)
    t0 = time.monotonic()
    for k in range(RESTARTS):
        if k % 2 == 0:
            broker.kill9()
        else:
            broker.stop()
        mark = broker.mark()  # only what the new broker logs
        broker.start()
        for cid in (agent.mqtt_client_id, recv.mqtt_client_id):
            broker.wait_log(r"New client connected from \S+ as %s " % re.escape(cid), mark,
                            timeout=90, what="%s to reconnect after restart #%d" % (cid, k + 1))
        up = time.monotonic()
        broker.wait_log(r"Received PUBLISH from %s \(d\d, q1, r\d, m\d+, '%s'"
                        % (re.escape(agent.mqtt_client_id), batch), mark, timeout=90,
                        what="a batch published after restart #%d" % (k + 1))
        broker.wait_log(r"Received PUBLISH from %s \(d\d, q1, r\d, m\d+, '%s'"
                        % (re.escape(recv.mqtt_client_id), ack), mark, timeout=90,
                        what="an ack published after restart #%d" % (k + 1))
        # Keep the connections a little longer than a flap: clients rightly back off further
        # after connections that the broker drops right away, which would only slow us down.
        time.sleep(max(0.0, up + STABLE_S - time.monotonic()))
        if (k + 1) % 10 == 0:
            ch.log("%d broker restarts in %.0fs; %d records stored"
                   % (k + 1, time.monotonic() - t0, recv.count(AGENT_ID)))

    acked, sent = prod.stop(timeout=120)
    ch.log("sent %d lines, %d answered OK" % (len(sent), len(acked)))
    h.wait(lambda: agent.segment_count() == 0, timeout=240, what="the spool to drain")
    h.wait(lambda: recv.count(AGENT_ID) >= len(acked), timeout=60,
           what="all %d acknowledged records stored" % len(acked))
    ch.assert_stored_exactly_once(recv, agent, acked, sent=sent)

    codes = {}
    for name, p in (("agent", agent.proc), ("receiver", recv.proc)):
        codes[name] = p.stop(timeout=180)
    failures = []
    for name, p in (("agent", agent.proc), ("receiver", recv.proc)):
        if asan:
            if codes[name] != 0:
                failures.append("%s exited %s (LeakSanitizer/ASan report in %s)"
                                % (name, codes[name], p.log_path))
            continue
        errors, lost, records = ch.valgrind_report(p)
        ch.log("%s: exit %s, valgrind errors %s, definitely lost %d bytes"
               % (name, codes[name], errors, lost))
        if codes[name] != 0 or errors != 0 or lost != 0:
            failures.append("%s: exit %s, valgrind ERROR SUMMARY %s errors, definitely lost "
                            "%d bytes:\n%s" % (name, codes[name], errors, lost,
                                               "\n".join(records[:3])))
    # A client set aside after Paho failed to write a PUBLISH is memory kept for good (Paho
    # 1.3.12; about 7 KiB each; see docs/protocol.md): reachable, so valgrind does not call it
    # lost. It happens when the broker is killed with bytes of ours still unread in its socket
    # (say the PUBACK of the batch it just delivered): its kernel answers with a reset at once,
    # and a PUBLISH written before Paho's reader has seen that reset fails. So it is a race
    # against Paho's reader, and on this machine's loaded CI (two valgrind processes per test,
    # two tests at once, 2 cores) its rate is noisy. Measured in 50 restarts, for the receiver:
    # 0, 0, 1 and 3 as the code is, and 1 to 5 with its one-ack-at-a-time rule removed; the
    # agent 0 or 1. The bound is set far above those and far below what a regression that sets
    # clients aside on ordinary reconnects would show (about one per restart): one per 5.
    allowed = max(1, RESTARTS // 5)
    for name, p in (("agent", agent.proc), ("receiver", recv.proc)):
        aside = [l for l in p.log_text().splitlines() if "is set aside" in l]
        ch.log("%s: %d Paho client(s) set aside (allowed: %d)" % (name, len(aside), allowed))
        if len(aside) > allowed:
            failures.append("%s set %d Paho client(s) aside (memory kept; at most %d allowed):"
                            "\n%s" % (name, len(aside), allowed, "\n".join(aside[:3])))
    ch.check(not failures, "\n".join(failures))


if __name__ == "__main__":
    ch.run(main, "mqtt_g_leaks_50_broker_restarts")

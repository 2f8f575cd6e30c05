#!/usr/bin/env python3
"""Chaos 2 (issue 7): the MQTT broker is killed (kill -9) and stopped (SIGTERM), alternating,
under load.

One agent forwards with forward.transport mqtt through a real mosquitto (TLS, the
per-gateway ACL, persistence on, autosaved every second) to one receiver that ingests from
the broker (shared subscription, persistent session). A chaos.Feeder writes unique lines to
the agent's socket input at about 3,000 records/s all along. At random moments the broker
goes down: kill -9 (odd faults: it restarts from its last autosave, up to a second stale,
with batches and acks the clients have long since handled) and SIGTERM (even faults: it
saves and exits cleanly), alternating; after a random 0-2 s it is restarted on the same
port with the same persistence file, and the next fault waits until both clients have
reconnected to it (so every fault hits live sessions).

forward.timeout is 5 s (default 30 s): mosquitto does not bring the receiver's shared
subscription back from its persistence, so a batch the agent publishes after a restart and
before the receiver has subscribed again is dropped by the broker ("no matching
subscribers" in its PUBACK, which Paho 1.3 does not pass on to the agent); the agent sends
it again when forward.timeout expires.

Parameters: short (CI) 6 faults (3 kill -9, 3 SIGTERM); full (CISTERN_CHAOS_FULL=1) 20
faults (10 + 10); 3,000 records/s. Random moments from CISTERN_CHAOS_SEED (printed).
Skipped (77) without mosquitto.

Checks: after the last restart the feeding stops and the agent's spool drains (a segment
leaves the spool only on the receiver's ack, sent after its store committed); then the
verdict over the three sets: lost, duplicated and unexpected all 0 (chaos.py). Reported:
kills (kill -9), sigterms, sent, accepted, stored, lost, duplicated, unexpected,
stored_unacked, drain_s (seconds from the last restart to an empty spool: for information,
no bound). Agent and receiver exit 0 on SIGTERM at the end, and the agent's spool passes
integrity_check."""
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import chaos  # noqa: E402
from chaos import ch  # noqa: E402

AGENT_ID = "gw-chaos-c2"


def main(h):
    missing = ch.mosquitto_missing()
    if missing:
        ch.log("skipped: not installed: %s (scripts/deps.sh installs them)" % missing)
        sys.exit(77)
    faults = chaos.param(6, 20)
    rate = chaos.param(3000, 3000)
    rnd = chaos.rng()
    broker = h.mosquitto(autosave_interval=1).start()
    recv = h.receiver(mqtt=broker).start()
    recv.wait_subscribed()
    agent = h.agent("agent", AGENT_ID, None, mqtt=broker,
                    extra={"forward": {"batch": {"max_records": 1000, "max_delay": "100ms"},
                                       "timeout": "5s"}}).start()
    tally = chaos.Tally()
    feeder = chaos.Feeder(agent, tally, "c2", rate=rate)
    feeder.start()
    h.wait(lambda: recv.count(AGENT_ID) > 0, timeout=60, what="the first records stored")
    t0 = time.monotonic()
    kills = sigterms = 0
    for k in range(faults):
        time.sleep(rnd.uniform(0.5, 4.0))
        broker.proc.check_alive()
        if k % 2 == 0:
            broker.kill9()
            kills += 1
            how = "kill -9"
        else:
            rc = broker.stop()
            sigterms += 1
            how = "SIGTERM (exit %s)" % rc
        mark = broker.mark()  # only what the new broker logs
        ch.log("broker %s, fault #%d (stored so far: %d, spool segments: %d, feeder lines: %d)"
               % (how, k + 1, recv.count(AGENT_ID), agent.segment_count(), feeder.n))
        time.sleep(rnd.uniform(0.0, 2.0))
        broker.start()
        for cid in (agent.mqtt_client_id, recv.mqtt_client_id):
            broker.wait_log(r"New client connected from \S+ as %s " % re.escape(cid), mark,
                            timeout=60, what="%s to reconnect after fault #%d" % (cid, k + 1))
    t_last = time.monotonic()
    ch.log("%d faults (%d kill -9, %d SIGTERM) in %.0fs; stopping the feeder"
           % (faults, kills, sigterms, t_last - t0))
    feeder.stop()
    chaos.wait_drained(h, [agent], timeout=chaos.param(180, 600))
    drain_s = time.monotonic() - t_last
    ch.log("spool drained %.1fs after the last restart" % drain_s)

    v = chaos.verdict(recv, [AGENT_ID], tally)
    chaos.report("c2", {"kill9": kills, "sigterm": sigterms, "rate": rate}, v, kills=kills,
                 sigterms=sigterms, drain_s=round(drain_s, 1))
    chaos.assert_verdict(v)
    ch.check(agent.stop() == 0, "agent did not exit 0 on SIGTERM")
    chaos.integrity_check(agent.spool_path)
    ch.check(recv.stop() == 0, "receiver did not exit 0 on SIGTERM")


if __name__ == "__main__":
    ch.run(main, "chaos_c2_broker_kill")

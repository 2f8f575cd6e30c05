#!/usr/bin/env python3
"""Chaos 3 (issue 7): the receiver is killed with kill -9 under HTTPS and MQTT load.

One receiver ingests both ways: listen.http (mTLS) and mqtt (a real mosquitto: TLS, the
per-gateway ACL, persistence on; shared subscription, persistent session). Two agents feed
it: "agent-h" forwards over HTTPS, "agent-m" over MQTT through the broker. A chaos.Feeder
writes unique lines to each agent's socket input at about 2,500 records/s all along. At
random moments (0.5-4 s after the receiver is back) the receiver is killed with kill -9;
PRAGMA integrity_check of its SQLite store runs while it is down; after a random 0-2 s it
is restarted on the same ports and store, and the next kill waits until it answers
/healthz and has subscribed again at the broker.

Parameters: short (CI) 6 kills; full (CISTERN_CHAOS_FULL=1) 20 kills; 2,500 records/s per
agent. Random moments from CISTERN_CHAOS_SEED (printed). Skipped (77) without mosquitto.

Checks: the receiver's store passes integrity_check after every kill. After the last
restart the feeding stops and both agents' spools drain (a segment leaves a spool only on
the receiver's ack, sent after its store committed); then the verdict over the three
sets, over both agents together and for each agent alone (a payload of one gateway stored
under the other counts as unexpected): lost, duplicated and unexpected all 0 (chaos.py).
Reported: kills, sent, accepted, stored, lost, duplicated, unexpected, stored_unacked,
drain_s (seconds from the last restart to both spools empty: for information, no bound),
and the figures per agent. Agents and receiver exit 0 on SIGTERM at the end, and
their spools and its store pass integrity_check."""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import chaos  # noqa: E402
from chaos import ch  # noqa: E402

HTTPS_ID = "gw-chaos-c3-https"
MQTT_ID = "gw-chaos-c3-mqtt"


def main(h):
    missing = ch.mosquitto_missing()
    if missing:
        ch.log("skipped: not installed: %s (scripts/deps.sh installs them)" % missing)
        sys.exit(77)
    kills = chaos.param(6, 20)
    rate = chaos.param(2500, 2500)
    rnd = chaos.rng()
    broker = h.mosquitto().start()
    recv = h.receiver(mqtt=broker).start()
    recv.wait_subscribed()
    batch = {"batch": {"max_records": 1000, "max_delay": "100ms"}}
    agent_h = h.agent("agent-h", HTTPS_ID, recv, extra={"forward": batch}).start()
    agent_m = h.agent("agent-m", MQTT_ID, None, mqtt=broker,
                      extra={"forward": dict(batch, timeout="5s")}).start()
    agents = [agent_h, agent_m]
    tallies = {HTTPS_ID: chaos.Tally(), MQTT_ID: chaos.Tally()}
    feeders = [chaos.Feeder(agent_h, tallies[HTTPS_ID], "c3h", rate=rate),
               chaos.Feeder(agent_m, tallies[MQTT_ID], "c3m", rate=rate)]
    for f in feeders:
        f.start()
    for a in agents:
        h.wait(lambda: recv.count(a.agent_id) > 0, timeout=60,
               what="the first records of %s stored" % a.agent_id)
    t0 = time.monotonic()
    for k in range(kills):
        time.sleep(rnd.uniform(0.5, 4.0))
        recv.proc.check_alive()  # a crash of its own is a failure, not a kill
        recv.proc.kill9()
        ch.log("receiver kill -9 #%d (stored so far: https %d, mqtt %d; spool segments: "
               "https %d, mqtt %d)" % (k + 1, recv.count(HTTPS_ID), recv.count(MQTT_ID),
                                       agent_h.segment_count(), agent_m.segment_count()))
        chaos.integrity_check(recv.db_path)
        time.sleep(rnd.uniform(0.0, 2.0))
        mark = broker.mark()
        recv.start()
        recv.wait_subscribed(since=mark)
    t_last = time.monotonic()
    ch.log("%d kills in %.0fs; stopping the feeders" % (kills, t_last - t0))
    for f in feeders:
        f.stop()
    chaos.wait_drained(h, agents, timeout=chaos.param(180, 600))
    drain_s = time.monotonic() - t_last
    ch.log("spools drained %.1fs after the last restart" % drain_s)

    both = chaos.Tally()
    for t in tallies.values():
        both.add(t.sent, t.accepted)
    v = chaos.verdict(recv, [HTTPS_ID, MQTT_ID], both)
    per = {aid: chaos.verdict(recv, [aid], t) for aid, t in tallies.items()}
    chaos.report("c3", {"kills": kills, "rate_per_agent": rate}, v, kills=kills,
                 drain_s=round(drain_s, 1),
                 per_agent={aid: {k: pv[k] for k in ("accepted", "stored", "lost",
                                                     "duplicated", "unexpected")}
                            for aid, pv in per.items()})
    chaos.assert_verdict(v)
    for aid, pv in per.items():
        ch.log("%s: %s" % (aid, {k: pv[k] for k in ("sent", "accepted", "stored", "lost",
                                                    "duplicated", "unexpected")}))
        chaos.assert_verdict(pv)
    for a in agents:
        ch.check(a.stop() == 0, "%s did not exit 0 on SIGTERM" % a.name)
        chaos.integrity_check(a.spool_path)
    ch.check(recv.stop() == 0, "receiver did not exit 0 on SIGTERM")
    chaos.integrity_check(recv.db_path)


if __name__ == "__main__":
    ch.run(main, "chaos_c3_receiver_kill9")

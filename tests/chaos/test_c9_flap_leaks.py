#!/usr/bin/env python3
"""Chaos 9 (issue 7): no leaks under reconnect churn.

The agent runs under valgrind (--leak-check=full --errors-for-leak-kinds=definite
--error-exitcode=99) under light load (a chaos.Feeder at 100 records/s on its socket input)
while its uplink flaps again and again; the other processes run bare (they are not the code
under test here). Two variants, one after the other, each with its own agent:
  https  the agent forwards over HTTPS to a receiver; a flap is the receiver going away
         (kill -9 every other flap, else SIGTERM) and being started again on its store;
  mqtt   the agent forwards over MQTT (mosquitto, TLS) to a receiver's MQTT ingest; a flap
         is the broker going away (kill -9 / SIGTERM alternately; its persistence makes a
         kill -9 come back with the stale state of its last clean stop) and coming back.
Each flap comes at a random moment of the traffic (0-0.6 s after the last one ended, so
sometimes with a batch in flight), the uplink stays away 0.2-1.5 s (random), and the flap
ends when a record is stored that the receiver did not hold before, sent by the agent on a
new connection (mqtt: the broker's log shows the agent's new PUBLISH).

Why restarts of the far end rather than a link cut (scenario 4's namespace): they make the
agent go through every reconnect path in each flap, at once, without waiting out timeouts:
requests in flight die mid-transfer (a reset on kill -9, a close on SIGTERM), connects are
refused while the far end is away, then a new connection and TLS handshake. A black-holed
link only ends in timeouts (scenario 4 covers those) and costs forward.timeout per flap;
and this way the scenario needs no root.

After every flap the agent's memory is sampled (/proc/PID/status: VmRSS and RssAnon of the
valgrind process, which holds the agent's heap and valgrind's own bookkeeping of it).
valgrind's queue of freed blocks is set to 2 MB (--freelist-vol) so that it is full early
and does not look like growth later on.

Parameters: https: short (CI) 20 flaps, full (CISTERN_CHAOS_FULL=1) 200 flaps (the issue's
figure); mqtt: short 8, full 60 (a broker flap costs about 5 s, three times an https one;
the full form must fit ctest's 900 s: about 11 minutes in all, measured; and
integration.mqtt_g_leaks runs 200 broker restarts under valgrind in scripts/soak.sh). The RSS reference is the flap at a quarter of the run
(https: flap 5 of 20, flap 50 of 200). CISTERN_C9_TRANSPORTS (default "https,mqtt") picks
the variants, CISTERN_C9_FLAPS sets the number of flaps of each. Random moments from
CISTERN_CHAOS_SEED (printed).

Checks, per variant: the verdict over the three sets once the flaps stop and the spool
drained (lost, duplicated, unexpected all 0); the agent exits 0 on SIGTERM (valgrind's 99
= an error or a definite leak) and valgrind's summary says 0 errors, 0 bytes definitely
lost. RSS is reported (CHAOS-RESULT "c9" and "c9-mqtt": rss_kib at the reference flap and
at the end, and the growth of RssAnon); the full form fails when RssAnon grew by more than
RSS_MARGIN (10%) from the reference flap to the end (https: flap 50 to flap 200); the short
form only reports it (20 flaps say little about a trend). The mqtt line also reports the
Paho clients the agent set aside (memory Paho 1.3.12 keeps after a failed PUBLISH write;
see test_mg_mqtt_leaks.py).

With binaries built with -DCISTERN_SANITIZE=ON (valgrind cannot run those) the agent runs
bare and LeakSanitizer checks at exit (a non-zero exit status on a leak); RSS is then only
reported (ASan keeps freed memory in quarantine, hundreds of MiB). Skipped (77)
without valgrind (and without a sanitizer build)."""
import os
import re
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import chaos  # noqa: E402
from chaos import ch  # noqa: E402

AGENT_ID = "gw-chaos-c9"
AGENT_ID_MQTT = "gw-chaos-c9-mqtt"
RSS_MARGIN = 0.10  # RssAnon may grow by at most 10% from the reference flap to the end (full)


class HttpsUplink:
    """The agent -> receiver over HTTPS; a flap restarts the receiver."""
    name = "https"
    flaps = chaos.param(20, 200)

    def __init__(self, h, wrapper):
        self.recv = h.receiver("receiver", wrapper=[]).start()
        self.agent = h.agent("agent", AGENT_ID, self.recv, tcp=False, wrapper=wrapper,
                             extra={"forward": {"batch": {"max_records": 500,
                                                          "max_delay": "100ms"}}})

    def down(self, k):
        if k % 2:
            self.recv.proc.kill9()
        else:
            ch.check(self.recv.stop() == 0, "receiver did not exit 0 on SIGTERM (flap %d)" % k)

    def up(self, k):
        self.recv.start()

    def reconnected(self, k, before):
        # the store cannot change while the receiver is away: a new row came through the
        # agent's new connection
        return self.recv.count(AGENT_ID) > before

    def stop(self):
        ch.check(self.recv.stop() == 0, "receiver did not exit 0 on SIGTERM")


class MqttUplink:
    """The agent -> mosquitto (TLS) -> receiver's MQTT ingest; a flap restarts the broker
    (kill -9 or SIGTERM, with its persistence: a kill -9 brings back the state of its last
    clean stop, stale sessions and queued messages included)."""
    name = "mqtt"
    flaps = chaos.param(8, 60)

    def __init__(self, h, wrapper):
        missing = ch.mosquitto_missing()
        ch.check(missing is None, "not installed: %s (scripts/deps.sh installs them)" % missing)
        self.broker = h.mosquitto("broker").start()
        self.recv = h.receiver("receiver-mqtt", mqtt=self.broker, wrapper=[]).start()
        self.recv.wait_subscribed()
        self.agent = h.agent("agent-mqtt", AGENT_ID_MQTT, None, mqtt=self.broker, tcp=False,
                             wrapper=wrapper,
                             extra={"forward": {"timeout": "3s",
                                                "batch": {"max_records": 500,
                                                          "max_delay": "100ms"}}})
        self.mark = 0

    def down(self, k):
        if k % 2:
            self.broker.kill9()
        else:
            self.broker.stop()
        self.mark = self.broker.mark()  # only what the new broker logs

    def up(self, k):
        self.broker.start()

    def reconnected(self, k, before):
        # Records may reach the receiver from the broker's stale persistence alone; what
        # counts is a batch the agent published on a new connection, stored.
        rx = r"Received PUBLISH from %s \(d\d, q1" % re.escape(self.agent.mqtt_client_id)
        return (re.search(rx, self.broker.log_text()[self.mark:])
                and self.recv.count(AGENT_ID_MQTT) > before)

    def stop(self):
        ch.check(self.recv.stop() == 0, "receiver did not exit 0 on SIGTERM")
        self.broker.stop()


def run_variant(h, uplink, flaps, ref_flap, rate, rnd, asan):
    """FLAPS flaps of UPLINK under light load; reports one CHAOS-RESULT line and returns
    (verdict, the failures as words)."""
    agent = uplink.agent
    agent_id = agent.agent_id
    agent.start(wait=False)
    agent.wait_ready(timeout=120)
    tally = chaos.Tally()
    feeder = chaos.Feeder(agent, tally, "c9" + uplink.name, rate=rate, chunk=10)
    feeder.start()
    h.wait(lambda: uplink.recv.count(agent_id) > 0, timeout=120,
           what="the first records stored (%s)" % uplink.name)

    samples = {}  # flap -> {"VmRSS": KiB, "RssAnon": KiB}
    t0 = time.monotonic()
    for k in range(1, flaps + 1):
        # a random moment of the traffic: sometimes with a batch in flight
        time.sleep(rnd.uniform(0.0, 0.6))
        agent.proc.check_alive()
        uplink.down(k)
        before = uplink.recv.count(agent_id)
        time.sleep(rnd.uniform(0.2, 1.5))
        uplink.up(k)
        h.wait(lambda: uplink.reconnected(k, before), timeout=120,
               what="a record delivered after %s flap %d" % (uplink.name, k), interval=0.05)
        samples[k] = chaos.rss_kib(agent.proc.pid)
        if k % 10 == 0 or k == ref_flap:
            ch.log("%s flap %d in %.0f s: stored %d, agent VmRSS %d KiB, RssAnon %d KiB"
                   % (uplink.name, k, time.monotonic() - t0, uplink.recv.count(agent_id),
                      samples[k]["VmRSS"], samples[k]["RssAnon"]))
    flap_s = time.monotonic() - t0

    feeder.stop()
    drain_s = chaos.wait_drained(h, [agent], timeout=chaos.param(180, 300))
    v = chaos.verdict(uplink.recv, [agent_id], tally)
    ref, end = samples[ref_flap], samples[flaps]
    growth = (end["RssAnon"] - ref["RssAnon"]) / float(ref["RssAnon"])
    code = agent.proc.stop(timeout=300)
    if asan:
        # LeakSanitizer's verdict is the exit status; its report is in the log
        errors, lost, records = None, None, []
        ch.log("%s: agent exit %s (LeakSanitizer)" % (uplink.name, code))
    else:
        errors, lost, records = chaos.valgrind_report(agent.proc)
        ch.log("%s: agent exit %s, valgrind errors %s, definitely lost %d bytes"
               % (uplink.name, code, errors, lost))
    ch.log("%s: RssAnon %d KiB at flap %d, %d KiB at flap %d (%+.1f%%)"
           % (uplink.name, ref["RssAnon"], ref_flap, end["RssAnon"], flaps, 100 * growth))
    aside = sum(1 for l in agent.proc.log_text().splitlines() if "is set aside" in l)
    extra = {}
    if uplink.name == "mqtt":
        extra["paho_clients_set_aside"] = aside
    chaos.report("c9" if uplink.name == "https" else "c9-" + uplink.name,
                 {"flaps": flaps, "rate": rate, "transport": uplink.name,
                  "ref_flap": ref_flap}, v,
                 flap_s=round(flap_s, 1), drain_s=round(drain_s, 1),
                 tool="lsan" if asan else "valgrind", agent_exit=code,
                 valgrind_errors=errors, definitely_lost_bytes=lost,
                 rss_kib={"flap_%d" % ref_flap: ref, "flap_%d" % flaps: end},
                 rss_anon_growth_pct=round(100 * growth, 1), **extra)
    failures = []
    if code != 0 or not (asan or (errors == 0 and lost == 0)):
        failures.append("%s: agent exit %s, valgrind ERROR SUMMARY %s errors, definitely lost "
                        "%s bytes (log %s):\n%s" % (uplink.name, code, errors, lost,
                                                    agent.proc.log_path, "\n".join(records[:3])))
    # (ASan's quarantine of freed memory grows for hundreds of MiB: no RSS bound there)
    if chaos.FULL and not asan and growth > RSS_MARGIN:
        failures.append("%s: the agent's RssAnon grew by %.1f%% from flap %d to flap %d (at "
                        "most %d%%)" % (uplink.name, 100 * growth, ref_flap, flaps,
                                        int(100 * RSS_MARGIN)))
    uplink.stop()
    return v, failures


def main(h):
    rate = chaos.param(100, 100)
    variants = os.environ.get("CISTERN_C9_TRANSPORTS", "https,mqtt").split(",")
    asan = chaos.sanitized(h.agent_bin)
    if asan:
        wrapper = []
        ch.log("sanitizer build: no valgrind; LeakSanitizer checks at exit")
    else:
        vg = shutil.which("valgrind")
        if not vg:
            ch.log("SKIP: valgrind is not installed (apt-get install valgrind)")
            sys.exit(77)
        wrapper = [vg] + chaos.VALGRIND_ARGS + ["--freelist-vol=2000000"]
    rnd = chaos.rng()
    failures = []
    for name in variants:
        uplink = {"https": HttpsUplink, "mqtt": MqttUplink}[name.strip()](h, wrapper)
        flaps = int(os.environ.get("CISTERN_C9_FLAPS") or uplink.flaps)
        v, f = run_variant(h, uplink, flaps, max(1, flaps // 4), rate, rnd, asan)
        chaos.assert_verdict(v)
        failures += f
    ch.check(not failures, "\n".join(failures))


if __name__ == "__main__":
    ch.run(main, "chaos_c9_flap_leaks")

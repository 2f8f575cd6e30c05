#!/usr/bin/env python3
"""Chaos 1 (issue 7): the agent is killed with kill -9 at random moments under load.

Two chaos.Feeders write unique lines to the agent's socket input, one over its unix socket
and one over TCP, at about 2,500 records/s each (5,000 in all), reconnecting whenever the
agent is down; the agent forwards over HTTPS to one receiver. The agent is killed with
kill -9 at random moments and restarted on the same spool each time. About one kill in
five hits the agent as it starts (it is restarted without waiting for it to listen and
killed 0-300 ms later: in its spool's opening and recovery, or just after); the others
hit it 0.5-4 s into its run.

Parameters: short (CI) 10 kills; full (CISTERN_CHAOS_FULL=1) 50 kills; 5,000 records/s.
Random moments from CISTERN_CHAOS_SEED (printed).

Checks: between each kill and its restart, PRAGMA integrity_check of the spool is ok, the
spool keeps its epoch and nothing was quarantined (no spool.db.corrupt-*). After the last
restart the feeding stops and the spool drains; then the verdict over the three sets:
lost, duplicated and unexpected all 0 (chaos.py). Reported: kills, sent, accepted,
stored, lost, duplicated, unexpected, stored_unacked, drain_s (seconds from the last
restart to an empty spool: for information, no bound). Both processes exit 0 on SIGTERM
at the end, and the spool passes integrity_check once more."""
import glob
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import chaos  # noqa: E402
from chaos import ch  # noqa: E402

AGENT_ID = "gw-chaos-c1"


def main(h):
    kills = chaos.param(10, 50)
    rate = chaos.param(5000, 5000)
    rnd = chaos.rng()
    recv = h.receiver().start()
    agent = h.agent("agent", AGENT_ID, recv,
                    extra={"forward": {"batch": {"max_records": 2000, "max_delay": "100ms"}}})
    agent.start()
    epoch = agent.epoch()
    tally = chaos.Tally()
    feeders = [chaos.Feeder(agent, tally, "c1u", rate=rate // 2, via="unix"),
               chaos.Feeder(agent, tally, "c1t", rate=rate // 2, via="tcp")]
    for f in feeders:
        f.start()
    h.wait(lambda: recv.count(AGENT_ID) > 0, timeout=60, what="the first records stored")
    t0 = time.monotonic()
    during_start = 0
    starting = False
    for k in range(kills):
        time.sleep(rnd.uniform(0.0, 0.3) if starting else rnd.uniform(0.5, 4.0))
        agent.proc.check_alive()  # a crash of its own is a failure, not a kill
        agent.kill9()
        during_start += starting
        ch.log("kill -9 #%d%s (stored so far: %d, spool segments: %d, feeder lines: %d)"
               % (k + 1, " while starting" if starting else "", recv.count(AGENT_ID),
                  agent.segment_count(), sum(f.n for f in feeders)))
        chaos.integrity_check(agent.spool_path)
        ch.check(agent.epoch() == epoch, "the spool's epoch changed after kill #%d" % (k + 1))
        quarantined = glob.glob(agent.spool_path + ".corrupt-*")
        ch.check(not quarantined, "kill #%d: the spool was quarantined: %r"
                 % (k + 1, quarantined))
        time.sleep(rnd.uniform(0.0, 0.5))
        starting = k + 1 < kills and rnd.random() < 0.2
        agent.start(wait=not starting)
    agent.wait_ready()
    t_last = time.monotonic()
    ch.log("%d kills (%d while starting) in %.0fs; stopping the feeders"
           % (kills, during_start, t_last - t0))
    for f in feeders:
        f.stop()
    chaos.wait_drained(h, [agent], timeout=chaos.param(180, 600))
    drain_s = time.monotonic() - t_last
    ch.log("spool drained %.1fs after the last restart" % drain_s)

    v = chaos.verdict(recv, [AGENT_ID], tally)
    chaos.report("c1", {"kills": kills, "rate": rate}, v, kills=kills,
                 kills_while_starting=during_start,
                 connections=sum(f.connections for f in feeders),
                 drain_s=round(drain_s, 1))
    chaos.assert_verdict(v)
    ch.check(agent.stop() == 0, "agent did not exit 0 on SIGTERM")
    chaos.integrity_check(agent.spool_path)
    ch.check(recv.stop() == 0, "receiver did not exit 0 on SIGTERM")


if __name__ == "__main__":
    ch.run(main, "chaos_c1_agent_kill9")

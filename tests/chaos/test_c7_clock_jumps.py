#!/usr/bin/env python3
"""Chaos 7 (issue 7): the agent's wall clock jumps (libfaketime).

The agent runs under libfaketime (libfaketimeMT.so.1, LD_PRELOAD) with
FAKETIME_TIMESTAMP_FILE, re-read at every call (FAKETIME_NO_CACHE=1), and with
FAKETIME_DONT_FAKE_MONOTONIC=1: only the wall clock moves, as when NTP sets it. Skipped (77)
when libfaketime is not installed. Every agent's input has a TTL (spool TTLs are where a wall
clock could drop records), and the harness's retry settings (forward.retry.initial 200ms,
max 1s). Three parts, each its own agent on one receiver:

  A. Jumps under load. A feeder writes about RATE lines/s. The agent's clock starts one hour
     ahead; at a random moment it jumps back by one hour (to the true time); the load goes on.
     Then the receiver stops (a backlog builds) and the clock jumps forward by two hours (a
     correction the other way), with a TTL of one hour on the input; then the receiver comes
     back.
  B. A boot at 1970, with a jump to now while it runs. The agent starts with its clock at
     1970-01-01 (a Raspberry Pi without an RTC) and the receiver down, and spools records
     under a 10-minute TTL; then the clock jumps to now; then the receiver comes back.
  C. A boot at 1970, then a restart after the clock was set: records spooled at 1970 (TTL
     10 minutes), the agent stopped, the clock set to now, the agent started again (the
     receiver down, then back).

Checks:
  - order and identity do not depend on wall time: for each part, the seqs of the records,
    taken in the order the source wrote them, strictly increase (one source connection at a
    time, answered in order), and every record is stored once under the (epoch, seq) its OK
    line named (chaos.ledger_verdict: lost, duplicated, unexpected and misfiled all 0; no
    loss-ledger entry of any reason, in particular no expired_ttl: no TTL passed in real time);
  - backoff runs on the monotonic clock: with the receiver down, the agent's failed delivery
    attempts (status: link.consecutive_failures) go on across each jump at the configured pace:
    over ATTEMPT_WINDOW seconds after the jump there is at least one (not stalled for an hour)
    and at most 10 per second (not spinning); the counts before and after are reported;
  - the agent stays up through every jump; integrity_check of each spool after it stops.

Parameters: short (CI) RATE 1000 lines/s, phases of 4 s; full (CISTERN_CHAOS_FULL=1) RATE 3000,
phases of 15 s. Random moments from CISTERN_CHAOS_SEED (printed). No timing assertion beyond the
attempt counts above (the issue's requirement: backoff on the monotonic clock)."""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import chaos  # noqa: E402
from chaos import ch  # noqa: E402

FAKETIME_LIB = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1"
ATTEMPT_WINDOW = 6.0
HOUR = 3600


class Clock:
    """The agent's faked wall clock: an offset in seconds from the true time, in a
    FAKETIME_TIMESTAMP_FILE that libfaketime re-reads at every call."""

    def __init__(self, h, name, offset):
        self.path = h.path(name + ".faketime")
        self.set(offset)

    def set(self, offset):
        self.offset = int(offset)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.write("%+d\n" % self.offset)
        os.replace(tmp, self.path)  # never a half-written file under the reader
        ch.log("clock %s: offset %+d s" % (os.path.basename(self.path), self.offset))

    def wrapper(self):
        return ["env", "LD_PRELOAD=" + FAKETIME_LIB, "FAKETIME_TIMESTAMP_FILE=" + self.path,
                "FAKETIME_NO_CACHE=1", "FAKETIME_DONT_FAKE_MONOTONIC=1"]


def make_agent(h, recv, name, clock, ttl):
    inp = {"name": "apps", "type": "socket", "priority": "normal", "ttl": ttl,
           "path": h.path(name + ".sock")}
    return h.agent(name, "gw-c7-" + name, recv, inputs=[inp], tcp=False,
                   extra={"forward": {"batch": {"max_records": 1000, "max_delay": "100ms"}}},
                   wrapper=clock.wrapper())


def failures(agent):
    return int(agent.status()["agent"]["link"]["consecutive_failures"])


def attempts_across(h, agent, do_jump):
    """With the receiver down: failed attempts over ATTEMPT_WINDOW seconds before do_jump() and
    over ATTEMPT_WINDOW seconds after it. Checks the pace after the jump."""
    h.wait(lambda: failures(agent) >= 2, timeout=60, what="%s to fail deliveries" % agent.name)
    f0 = failures(agent)
    time.sleep(ATTEMPT_WINDOW)
    f1 = failures(agent)
    do_jump()
    f2 = failures(agent)
    time.sleep(ATTEMPT_WINDOW)
    f3 = failures(agent)
    h.check_alive()
    before, after = f1 - f0, f3 - f2
    ch.log("%s: %d failed attempts in %.0f s before the jump, %d in %.0f s after"
           % (agent.name, before, ATTEMPT_WINDOW, after, ATTEMPT_WINDOW))
    ch.check(after >= 1, "%s: no delivery attempt in %.0f s after the clock jumped: backoff "
             "stalled on the wall clock" % (agent.name, ATTEMPT_WINDOW))
    ch.check(after <= 10 * ATTEMPT_WINDOW, "%s: %d attempts in %.0f s after the clock jumped: "
             "spinning" % (agent.name, after, ATTEMPT_WINDOW))
    return before, after


def order_check(recv, agent_id, prefix):
    """Seqs in the order the source wrote the lines (prefix-<n>) strictly increase."""
    rows = [(int(p.decode().split("-")[-1]), e, s) for e, s, p, _st in recv.rows(agent_id)
            if p.decode().startswith(prefix + "-")]
    rows.sort()
    bad = [(a, b) for a, b in zip(rows, rows[1:]) if (b[1], b[2]) <= (a[1], a[2])]
    ch.check(not bad, "%s: seqs do not follow ingest order, e.g. %r" % (agent_id, bad[:3]))
    return len(rows)


def stamps(recv, agent_id):
    """(oldest, newest) record time (ts_ms: the agent's wall clock) the receiver holds."""
    con = recv.db()
    try:
        return con.execute("SELECT min(ts_ms), max(ts_ms) FROM records WHERE agent_id = ?",
                           (agent_id,)).fetchone()
    finally:
        con.close()


def finish(h, recv, agent, tally, prefix, figures, name):
    chaos.wait_drained(h, [agent], timeout=chaos.param(120, 300))
    h.wait(lambda: all(l["sent"] for l in agent.ledger()), timeout=60,
           what="%s: every loss-ledger row sent" % agent.name)
    led = agent.ledger()
    ch.check(not led, "%s: records dropped: %r" % (agent.name, led[:3]))
    figures[name + "_ordered"] = order_check(recv, agent.agent_id, prefix)
    ch.check(agent.stop() == 0, "%s: agent did not exit 0" % agent.name)
    chaos.integrity_check(agent.spool_path)


def part_a(h, recv, rnd, rate, phase, figures):
    clock = Clock(h, "a", HOUR)
    agent = make_agent(h, recv, "a", clock, "1h")
    agent.start()
    tally = chaos.KeyedTally(agent.agent_id, agent.epoch())
    feeder = chaos.Feeder(agent, tally, "c7a", rate=rate)
    feeder.start()
    h.wait(lambda: recv.count(agent.agent_id) > 0, timeout=60, what="the first records stored")
    time.sleep(rnd.uniform(0.5, phase))
    clock.set(0)  # back by one hour
    time.sleep(phase)
    ch.check(recv.stop() == 0, "receiver did not exit 0")
    time.sleep(phase / 2)
    figures["a_attempts"] = attempts_across(h, agent, lambda: clock.set(2 * HOUR))
    recv.start()
    time.sleep(phase / 2)
    feeder.stop()
    finish(h, recv, agent, tally, "c7a", figures, "a")
    _oldest, newest = stamps(recv, agent.agent_id)
    ch.check(newest is not None and newest > (time.time() + HOUR) * 1000,
             "%s: no record stamped two hours ahead (newest ts_ms %r): libfaketime had no effect"
             % (agent.name, newest))
    return agent.agent_id, tally


def part_b(h, recv, rnd, rate, phase, figures):
    ch.check(recv.stop() == 0, "receiver did not exit 0")
    clock = Clock(h, "b", -time.time())
    agent = make_agent(h, recv, "b", clock, "10m")
    agent.start()
    tally = chaos.KeyedTally(agent.agent_id, agent.epoch())
    feeder = chaos.Feeder(agent, tally, "c7b", rate=rate)
    feeder.start()
    time.sleep(rnd.uniform(phase / 2, phase))
    figures["b_attempts"] = attempts_across(h, agent, lambda: clock.set(0))
    time.sleep(phase / 2)
    recv.start()
    feeder.stop()
    finish(h, recv, agent, tally, "c7b", figures, "b")
    # the records written before the jump carry 1970 stamps (information only): the agent's
    # clock really was faked, or this part tested nothing
    oldest, _newest = stamps(recv, agent.agent_id)
    ch.check(oldest is not None and oldest < 86400 * 1000 * 365,
             "%s: no record stamped in 1970 (oldest ts_ms %r): libfaketime had no effect"
             % (agent.name, oldest))
    return agent.agent_id, tally


def part_c(h, recv, rnd, rate, phase, figures):
    ch.check(recv.stop() == 0, "receiver did not exit 0")
    clock = Clock(h, "c", -time.time())
    agent = make_agent(h, recv, "c", clock, "10m")
    agent.start()
    tally = chaos.KeyedTally(agent.agent_id, agent.epoch())
    feeder = chaos.Feeder(agent, tally, "c7c", rate=rate)
    feeder.start()
    time.sleep(rnd.uniform(phase / 2, phase))
    pending = agent.pending_records()
    ch.check(agent.stop() == 0, "%s: agent did not exit 0" % agent.name)
    chaos.integrity_check(agent.spool_path)
    clock.set(0)
    agent.start()  # the feeder reconnects by itself
    epoch = agent.epoch()
    ch.check(epoch == tally.epoch, "the spool changed epoch across the restart")
    time.sleep(phase / 2)
    # nothing expired: the sweep runs every second
    ch.check(not agent.ledger(), "records spooled at 1970 were dropped after the clock was set: "
             "%r" % agent.ledger()[:3])
    figures["c_pending_at_restart"] = pending
    recv.start()
    feeder.stop()
    finish(h, recv, agent, tally, "c7c", figures, "c")
    return agent.agent_id, tally


def main(h):
    if not os.path.exists(FAKETIME_LIB):
        ch.log("SKIP: %s is not installed" % FAKETIME_LIB)
        sys.exit(77)
    rate = chaos.param(1000, 3000)
    phase = chaos.param(4.0, 15.0)
    rnd = chaos.rng()
    recv = h.receiver().start()
    figures = {}
    results = [part(h, recv, rnd, rate, phase, figures) for part in (part_a, part_b, part_c)]
    tally = chaos.KeyedTally()
    for _aid, t in results:
        tally.add(t.sent, t.accepted)
        tally.keys.update(t.keys)
    ids = [aid for aid, _t in results]
    # no ledger reason counts: nothing may be dropped
    v = chaos.ledger_verdict(recv, ids, tally, ())
    chaos.report("c7", {"rate": rate, "phase_s": phase, "attempt_window_s": ATTEMPT_WINDOW}, v,
                 misfiled=v["misfiled"], **figures)
    chaos.assert_verdict(v)
    ch.check(v["misfiled"] == 0, "%d records stored under another key than their OK said, e.g. %r"
             % (v["misfiled"], v["examples"]["misfiled"]))
    ch.check(recv.stop() == 0, "receiver did not exit 0")


if __name__ == "__main__":
    ch.run(main, "c7_clock_jumps")

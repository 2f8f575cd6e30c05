#!/usr/bin/env python3
"""l) `cistern-agent status --json` reports what the test put in: pending records per
priority, the link down with its last error while the receiver is down, then up with a last
successful delivery and nothing pending once it drained; ledger totals for all five reasons;
"running": false when the agent is stopped (and status still answers from the spool). The
human output names the same figures."""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cistern_harness as ch

REASONS = ("evicted_full", "expired_ttl", "rejected", "corrupt_spool", "tampered")


def send(h, path, tag, n):
    c = ch.SocketClient(unix_path=path)
    c.send_many([json.dumps({"t": tag, "i": i}).encode() for i in range(n)])
    ans = c.wait_answers(timeout=60, alive=h.check_alive)
    ch.check(all(a[0] == "OK" for a in ans), "%s refused" % tag)
    c.close()


def main(h):
    recv = h.receiver()
    inputs = [
        {"name": "hi", "type": "socket", "priority": "high", "path": h.path("hi.sock")},
        {"name": "lo", "type": "socket", "priority": "low", "path": h.path("lo.sock")},
    ]
    agent = h.agent("agent", "gw-status", recv, inputs=inputs, unix_socket=False, tcp=False).start()
    h.wait(lambda: os.path.exists(h.path("lo.sock")), what="lo socket")
    send(h, h.path("hi.sock"), "hi", 30)
    send(h, h.path("lo.sock"), "lo", 70)
    h.wait(lambda: agent.status()["agent"].get("link", {}).get("state") == "down", timeout=30,
           what="status to show the link down")
    st = agent.status()
    ch.log("status: %s" % json.dumps(st)[:600])
    ch.check(st["agent_id"] == "gw-status", "agent_id %r" % st.get("agent_id"))
    ch.check(ch.u64(st["epoch"]) == agent.epoch(), "epoch %r" % st["epoch"])
    ch.check(st["next_seq"] == 101, "next_seq %r" % st["next_seq"])
    ch.check(st["pending"]["records"] == 100, "pending %r" % st["pending"])
    bp = st["pending"]["by_priority"]
    ch.check((bp["high"]["records"], bp["normal"]["records"], bp["low"]["records"]) == (30, 0, 70),
             "by_priority %r" % bp)
    ch.check(st["pending"]["segments"] == agent.segment_count(), "segments %r" % st["pending"])
    ch.check(st["oldest_pending_age_s"] is not None and st["oldest_pending_age_s"] >= 0,
             "oldest age %r" % st["oldest_pending_age_s"])
    ch.check(st["spool_files"]["db_bytes"] + st["spool_files"]["wal_bytes"] == agent.spool_files_bytes()
             or abs(st["spool_files"]["db_bytes"] + st["spool_files"]["wal_bytes"] - agent.spool_files_bytes()) < 1 << 20,
             "spool_files %r" % st["spool_files"])
    ch.check(set(st["ledger"]) >= set(REASONS), "ledger reasons %r" % st["ledger"])
    ch.check(all(st["ledger"][r]["records"] == 0 for r in REASONS), "ledger %r" % st["ledger"])
    ag = st["agent"]
    ch.check(ag["running"] is True and ag["pid"] == agent.proc.pid, "agent %r" % ag)
    ch.check(ag["link"]["last_error"], "no last error while the receiver is down: %r" % ag["link"])
    ch.check(ag["link"]["last_success_at"] is None, "a success before the receiver ran?")
    ch.check(ag["counters"]["spooled"] == 100, "counters %r" % ag["counters"])
    text = agent.status(json_out=False)
    for word in ("gw-status", "down", "100", "pending"):
        ch.check(word in text, "human status lacks %r:\n%s" % (word, text))

    recv.start()
    h.wait(lambda: agent.segment_count() == 0, timeout=60, what="spool to drain")
    h.wait(lambda: agent.status()["agent"]["link"]["state"] == "up", timeout=30, what="link up")
    st = agent.status()
    ch.check(st["pending"]["records"] == 0 and st["oldest_pending_age_s"] is None,
             "after draining: %r" % st["pending"])
    ch.check(st["agent"]["link"]["last_success_at"], "no last success after delivering")
    ch.check(st["agent"]["counters"]["delivered"] == 100, "counters %r" % st["agent"]["counters"])

    ch.check(agent.stop() == 0, "agent did not exit 0")
    st = agent.status()
    ch.check(st["agent"]["running"] is False, "a stopped agent reported running")
    ch.check(st["pending"]["records"] == 0, "pending %r" % st["pending"])
    ch.check(recv.stop() == 0, "receiver did not exit 0")


if __name__ == "__main__":
    ch.run(main, "l_status")

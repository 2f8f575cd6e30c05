#!/usr/bin/env python3
"""Cistern quick-start demo (run by scripts/demo.sh after the build).

In a temp dir: a throwaway CA and certificates, a receiver (HTTPS with mTLS, embedded
SQLite store, read API on loopback) and an agent (synthetic `demo` input at ~200 records/s)
on free loopback ports. It prints progress once a second, stops the receiver for a while
(records wait in the agent's spool), restarts it (the spool drains), stops the agent, and
then checks that every record the agent spooled is stored exactly once.

Usage: demo.py --agent BIN --receiver BIN [--seconds-up 8] [--seconds-down 8]
Exit status: 0 when nothing was lost or duplicated, 1 otherwise, 130 on Ctrl-C.
"""
import argparse
import os
import signal
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "integration"))
import cistern_harness as ch  # noqa: E402

AGENT_ID = "demo-gw"


def say(msg):
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


class Demo:
    def __init__(self, args):
        self.args = args
        self.h = ch.Harness("demo", agent_bin=os.path.abspath(args.agent),
                            receiver_bin=os.path.abspath(args.receiver))
        self.t0 = time.monotonic()
        self.recv = self.h.receiver("receiver", log_level="warn")
        self.agent = self.h.agent(
            "agent", AGENT_ID, self.recv, unix_socket=False, tcp=False,
            inputs=[{"name": "demo", "type": "demo", "priority": "normal",
                     "rate": args.rate, "sensors": 4}],
            extra={"log": {"level": "info", "stats_interval": "1s"},
                   "spool": {"commit_interval": "200ms"},
                   "forward": {"batch": {"max_delay": "500ms"},
                               "retry": {"initial": "500ms", "max": "2s"},
                               "shutdown_timeout": "5s"}})
        self.last_stored = 0

    # -- one progress line -------------------------------------------------------------
    def stored(self):
        if self.recv.proc.running():
            try:
                a = self.recv.agents().get(AGENT_ID)
                self.last_stored = int(a["records"]) if a else 0
                return "%d" % self.last_stored
            except Exception:
                pass
        try:  # receiver down: its store is still readable on disk
            self.last_stored = self.recv.count(AGENT_ID)
            return "%d" % self.last_stored
        except Exception:
            return "%d" % self.last_stored

    def progress(self, note=""):
        stats = self.agent.stats_lines()
        if stats:
            produced, spooled, delivered, pending, rejected = stats[-1]
        else:
            produced = spooled = delivered = pending = rejected = "-"
        try:
            pending = str(self.agent.pending_records())  # straight from the spool DB
        except Exception:
            pass
        say("  t=%3.0fs  produced %6s  spooled %6s  delivered %6s  pending %6s  stored %6s%s"
            % (time.monotonic() - self.t0, produced, spooled, delivered, pending, self.stored(),
               ("   " + note) if note else ""))

    def run_for(self, seconds, note_fn=None):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(min(1.0, max(0.0, end - time.monotonic())))
            self.h.check_alive()
            self.progress(note_fn() if note_fn else "")

    # -- the story -----------------------------------------------------------------------
    def run(self):
        a = self.args
        say("cistern demo: temp dir %s" % self.h.tmp)
        say("  receiver: https://127.0.0.1:%d (mTLS)  api: %s  store: %s"
            % (self.recv.port, self.recv.api, self.recv.db_path))
        say("  agent %s: demo input at %d records/s, spool %s"
            % (AGENT_ID, a.rate, self.agent.spool_path))
        self.recv.start()
        self.agent.start()
        say("receiver and agent running")
        self.run_for(a.seconds_up)

        rc = self.recv.stop()
        say("receiver stopped (exit %s): records buffer in the spool" % rc)
        self.run_for(a.seconds_down, lambda: "(receiver down)")
        say("what a technician at the gateway sees now (cistern-agent status):")
        for ln in self.agent.status(json_out=False).rstrip().splitlines():
            say("    " + ln)

        self.recv.start()
        say("receiver restarted: the spool drains")
        drained = [False]

        def note():
            if not drained[0] and self.agent.pending_records() < a.rate:
                drained[0] = True
                return "(backlog drained)"
            return ""
        self.run_for(a.seconds_after, note)

        say("stopping the agent (SIGTERM): it stops its input, commits, and delivers what is "
            "in its spool")
        rc = self.agent.stop()
        say("agent exited with status %s" % rc)
        ok = rc == 0
        left = self.agent.segment_count()
        if left:
            # shutdown_timeout was not enough to send everything: run the agent once more
            # without an input, on the same spool, until it is empty.
            say("%d segments still in the spool; restarting the agent to flush them" % left)
            flush = self.h.agent("agent-flush", AGENT_ID, self.recv, unix_socket=True, tcp=False,
                                 spool_path=self.agent.spool_path,
                                 extra={"forward": {"retry": {"initial": "200ms", "max": "1s"}}})
            flush.start()
            self.h.wait(lambda: flush.segment_count() == 0, timeout=60,
                        what="the spool to be flushed")
            flush.stop()

        epoch = self.agent.epoch()
        next_seq = self.agent.next_seq()
        spooled = next_seq - 1
        try:
            ch.wait_until(lambda: self.recv.count(AGENT_ID) >= spooled, timeout=15,
                          what="the receiver to hold every spooled record")
        except ch.TestFailure as e:
            say("warning: %s" % e)
        self.progress()
        rows = self.recv.rows(AGENT_ID)
        per_seq = {}
        other = 0
        for e, s, _p, _st in rows:
            if e != epoch or not (1 <= s <= spooled):
                other += 1
            else:
                per_seq[s] = per_seq.get(s, 0) + 1
        lost = spooled - len(per_seq)
        duplicated = sum(n - 1 for n in per_seq.values())
        ledger = self.agent.ledger()
        stats = self.agent.stats_lines()
        last_produced = int(stats[-1][0]) if stats else 0
        rc = self.recv.stop()
        ok = ok and rc == 0
        say("")
        say("produced %d, stored %d, lost %d, duplicated %d"
            % (spooled, len(per_seq), lost, duplicated))
        say("  (agent epoch %d: spool seqs 1..%d; receiver rows for %s: %d%s)"
            % (epoch, spooled, AGENT_ID, len(rows),
               (", %d outside that range" % other) if other else ""))
        if ledger:
            say("  loss ledger: %s" % ", ".join("%s %s" % (r["reason"], r["count"]) for r in ledger))
        if last_produced > spooled:  # made by the input after the last commit, at shutdown
            say("  note: the agent's last [stats] line says produced=%d; the spool only ever "
                "held %d records (never acknowledged to a source)" % (last_produced, spooled))
        if spooled == 0:
            say("nothing was produced: see %s" % self.agent.proc.log_path)
            ok = False
        return ok and lost == 0 and duplicated == 0 and other == 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agent", required=True)
    ap.add_argument("--receiver", required=True)
    ap.add_argument("--rate", type=int, default=200)
    ap.add_argument("--seconds-up", type=float, default=8)
    ap.add_argument("--seconds-down", type=float, default=8)
    ap.add_argument("--seconds-after", type=float, default=10)
    args = ap.parse_args()

    def on_signal(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    demo = Demo(args)
    status = 1
    try:
        status = 0 if demo.run() else 1
    except KeyboardInterrupt:
        say("\ninterrupted")
        status = 130
    except Exception as e:
        say("demo failed: %s" % e)
        demo.h.dump_logs(30)
        status = 1
    finally:
        for p in demo.h.procs:  # graceful first, then the harness kills what is left
            try:
                if p.running():
                    p.stop(signal.SIGTERM, timeout=10)
            except Exception:
                pass
        demo.h.cleanup()
    if status == 1:
        say("demo: FAILED")
    elif status == 0:
        say("demo: OK")
    sys.exit(status)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""c) kill -9 of the agent at 10 random moments while a producer keeps sending and the
forwarder keeps forwarding; the agent is restarted on the same spool each time.

Checks: after each kill, PRAGMA integrity_check of the spool (read-only, agent down) is
'ok' and the spool keeps its epoch; at the end every line answered OK is stored exactly
once under (epoch, seq from its OK line); no payload is stored twice; every stored payload
was sent (lines without an OK may or may not be stored)."""
import json
import os
import random
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cistern_harness as ch

AGENT_ID = "gw-crashy"
KILLS = 10


class Producer(threading.Thread):
    """Sends unique lines in small pipelined chunks; reconnects whenever the agent dies."""

    def __init__(self, agent):
        super().__init__(daemon=True)
        self.agent = agent
        self.stop_flag = threading.Event()
        self.clients = []
        self.n = 0
        self.lock = threading.Lock()

    def run(self):
        rnd = random.Random(7)
        while not self.stop_flag.is_set():
            try:
                c = self.agent.client(rnd.choice(["unix", "tcp"]))
            except OSError:
                time.sleep(0.05)
                continue
            with self.lock:
                self.clients.append(c)
            try:
                while not self.stop_flag.is_set() and not c.eof:
                    chunk = []
                    for _ in range(rnd.randint(1, 200)):
                        chunk.append(json.dumps({"k": self.n, "pad": "x" * rnd.randint(0, 200)})
                                     .encode())
                        self.n += 1
                    c.send_many(chunk)
                    # keep a bounded number of unanswered lines in flight
                    while (not c.eof and not self.stop_flag.is_set()
                           and len(c.sent) - len(c.answers) > 2000):
                        time.sleep(0.01)
                    time.sleep(rnd.random() * 0.01)
            except OSError:
                pass
            if self.stop_flag.is_set() and not c.eof:
                try:
                    c.wait_answers(timeout=60)
                except ch.TestFailure:
                    pass
                c.close()
            else:
                c.abort()

    def results(self):
        acked, sent = [], []
        with self.lock:
            for c in self.clients:
                acked.extend(c.acked())
                sent.extend(c.sent)
        return acked, sent


def main(h):
    recv = h.receiver().start()
    agent = h.agent("agent", AGENT_ID, recv,
                    extra={"forward": {"batch": {"max_records": 500, "max_delay": "100ms"}}})
    agent.start()
    epoch = agent.epoch()
    prod = Producer(agent)
    prod.start()
    rnd = random.Random(int(os.environ.get("CISTERN_SEED", str(int(time.time())))))
    try:
        for k in range(KILLS):
            time.sleep(rnd.uniform(0.2, 2.5))
            agent.kill9()
            ch.log("kill -9 #%d (stored so far: %d, pending segments: %d)"
                   % (k + 1, recv.count(AGENT_ID), agent.segment_count()))
            res = agent.integrity_check()
            ch.check(res == ["ok"], "spool integrity_check after kill #%d: %r" % (k + 1, res))
            ch.check(agent.epoch() == epoch, "spool epoch changed after kill #%d" % (k + 1))
            time.sleep(rnd.uniform(0, 0.5))
            agent.start()
    finally:
        time.sleep(1)
        prod.stop_flag.set()
        prod.join(90)
    ch.check(not prod.is_alive(), "producer did not finish")
    acked, sent = prod.results()
    ch.log("sent %d lines, %d answered OK" % (len(sent), len(acked)))
    ch.check(len(acked) > 0, "no line was ever acknowledged")
    seqs = [s for _, s in acked]
    ch.check(len(set(seqs)) == len(seqs), "an OK seq was given to two different lines")

    h.wait(lambda: agent.segment_count() == 0, timeout=180, what="spool to drain")
    h.wait(lambda: all_stored(recv, acked), timeout=30, what="acked records stored")
    rows = ch.assert_stored_exactly_once(recv, agent, acked, sent=sent, epoch=epoch)
    ch.log("stored %d rows (%d acknowledged, %d more committed without an OK)"
           % (len(rows), len(acked), len(rows) - len(acked)))
    ch.check(agent.stop() == 0, "agent did not exit 0 on SIGTERM")
    ch.check(recv.stop() == 0, "receiver did not exit 0 on SIGTERM")


def all_stored(recv, acked):
    have = {p for _, _, p, _ in recv.rows(AGENT_ID)}
    return all(p in have for p, _ in acked)


if __name__ == "__main__":
    ch.run(main, "c_kill9_restart")

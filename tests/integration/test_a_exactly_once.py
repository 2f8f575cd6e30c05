#!/usr/bin/env python3
"""a) 20,000 records through the socket input (10,000 over the Unix socket and 10,000 over
TCP, concurrently, pipelined) are each answered OK and stored exactly once.

Checks, against the receiver's store DB: row count for the agent == 20,000; no key and no
payload stored twice; the set of stored payloads == the set sent; each record is stored
under the spool's epoch and the seq its OK line gave. Then the same through the read API
(paged /v1/agents/{id}/records and /v1/agents)."""
import json
import os
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cistern_harness as ch

N_PER_CLIENT = 10000
AGENT_ID = "gw-exactly-once"


def main(h):
    recv = h.receiver().start()
    agent = h.agent("agent", AGENT_ID, recv).start()

    clients = {"unix": agent.client("unix"), "tcp": agent.client("tcp")}

    def produce(via, c):
        chunk = []
        for i in range(N_PER_CLIENT):
            chunk.append(json.dumps({"via": via, "n": i, "v": i * 7 % 1000}).encode())
            if len(chunk) == 500:
                c.send_many(chunk)
                chunk = []
        if chunk:
            c.send_many(chunk)

    errors = []

    def run_producer(via, c):
        try:
            produce(via, c)
        except Exception as e:  # surfaced below
            errors.append((via, e))

    threads = [threading.Thread(target=run_producer, args=(v, c)) for v, c in clients.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ch.check(not errors, "producer failed: %r" % errors)

    acked, sent = [], []
    for via, c in clients.items():
        answers = c.wait_answers(N_PER_CLIENT, timeout=180, alive=h.check_alive)
        bad = [(i, a) for i, a in enumerate(answers) if a[0] != "OK"]
        ch.check(not bad, "%s: %d lines not answered OK, e.g. %r" % (via, len(bad), bad[:5]))
        seqs = [a[1] for a in answers]
        ch.check(all(x < y for x, y in zip(seqs, seqs[1:])),
                 "%s: OK seqs are not increasing on one connection" % via)
        acked.extend(c.acked())
        sent.extend(c.sent)
        c.close()
    total = 2 * N_PER_CLIENT
    ch.check(len(acked) == total, "acked %d of %d" % (len(acked), total))
    ch.check(len({s for _, s in acked}) == total, "OK seqs are not unique across connections")
    ch.log("all %d lines answered OK; waiting for the receiver to store them" % total)

    h.wait(lambda: recv.count(AGENT_ID) >= total, timeout=180,
           what="receiver to store %d records (has %s)" % (total, "?"))
    h.wait(lambda: agent.segment_count() == 0, timeout=60, what="spool to drain")
    n = recv.count(AGENT_ID)
    ch.check(n == total, "receiver holds %d rows for %s, expected %d" % (n, AGENT_ID, total))

    epoch = agent.epoch()
    rows = ch.assert_stored_exactly_once(recv, agent, acked, sent=sent, epoch=epoch)
    ch.check({p for _, _, p, _ in rows} == set(sent), "stored payload set != sent payload set")
    streams = {st for _, _, _, st in rows}
    ch.check(streams == {"apps"}, "stream should be the input name 'apps', got %r" % streams)
    ch.check(int(agent.next_seq()) > max(s for _, s in acked),
             "spool meta next_seq %s not past the highest OK seq" % agent.next_seq())

    # The read API tells the same story.
    api = recv.api_records(AGENT_ID, limit=1000)
    ch.check(len(api) == total, "API returned %d records, expected %d" % (len(api), total))
    api_map = {}
    for r in api:
        ch.check(isinstance(r["epoch"], str), "API epoch must be a decimal string: %r" % r)
        p = r["payload"].encode() if not r.get("payload_base64") else __import__(
            "base64").b64decode(r["payload"])
        api_map[(int(r["epoch"]), int(r["seq"]))] = p
    want = {(epoch, s): p for p, s in acked}
    ch.check(api_map == want, "API records differ from what was acknowledged")
    agents = recv.agents()
    ch.check(AGENT_ID in agents, "/v1/agents does not list %s: %r" % (AGENT_ID, agents))
    missing_fields = {"id", "first_seen_ms", "last_seen_ms", "spool_depth", "records"} - set(
        agents[AGENT_ID])
    ch.check(not missing_fields, "/v1/agents entry lacks %r: %r" % (missing_fields, agents[AGENT_ID]))
    ch.check(int(agents[AGENT_ID]["first_seen_ms"]) <= int(agents[AGENT_ID]["last_seen_ms"]),
             "/v1/agents first_seen_ms > last_seen_ms: %r" % agents[AGENT_ID])
    by_epoch = recv.api_records(AGENT_ID, limit=5000, epoch=epoch)
    ch.check(len(by_epoch) == total, "API with epoch=%d returned %d records, expected %d"
             % (epoch, len(by_epoch), total))
    other = recv.get("/v1/agents/%s/records?after=0&limit=10&epoch=%d"
                     % (AGENT_ID, (epoch + 1) % (1 << 64)))
    ch.check(other["records"] == [], "API with another epoch returned records: %r"
             % other["records"][:2])
    ch.check(int(agents[AGENT_ID]["records"]) == total,
             "/v1/agents records=%r, expected %d" % (agents[AGENT_ID]["records"], total))

    ch.check(agent.stop() == 0, "agent did not exit 0 on SIGTERM")
    ch.check(recv.stop() == 0, "receiver did not exit 0 on SIGTERM")
    ch.log("20000 records stored exactly once")


if __name__ == "__main__":
    ch.run(main, "a_20k_exactly_once")

#!/usr/bin/env python3
"""j) A corrupt spool is moved aside, a fresh spool (new epoch) starts, the loss is ledgered as
corrupt_spool and reaches the receiver, and the agent keeps working.

Cases, each on its own agent with the receiver down and records pending, then stopped:
truncated file, flipped bytes in page headers, a zero-byte database beside its WAL, a WAL
deleted after a kill -9 (its -shm left behind), and a file of random bytes. Then one case at
run time: the file is overwritten under the running agent; SQLite's SQLITE_CORRUPT on the next
read makes the agent quarantine and carry on."""
import glob
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cistern_harness as ch

PAGE = 4096


def fill(h, agent, tag, n=500, size=200):
    c = agent.client("unix")
    c.send_many([json.dumps({"t": tag, "i": i, "pad": os.urandom(size).hex()}).encode()
                 for i in range(n)])
    ans = c.wait_answers(timeout=60, alive=h.check_alive)
    ch.check(all(a[0] == "OK" for a in ans), "%s: refused" % tag)
    acked = c.acked()
    c.close()
    return acked


def truncate(p):
    sz = os.path.getsize(p)
    with open(p, "r+b") as f:
        f.truncate(sz // 2)


def flip_pages(p):
    sz = os.path.getsize(p)
    with open(p, "r+b") as f:
        for pg in range(1, sz // PAGE):
            f.seek(pg * PAGE)
            b = bytearray(f.read(8))
            f.seek(pg * PAGE)
            f.write(bytes(x ^ 0xA5 for x in b))


def zero_with_wal(p):
    with open(p, "r+b") as f:
        f.truncate(0)
    if not os.path.exists(p + "-wal"):
        open(p + "-wal", "wb").write(os.urandom(PAGE))


def delete_wal(p):
    ch.check(os.path.exists(p + "-wal") and os.path.exists(p + "-shm"),
             "kill -9 left no -wal/-shm to delete")
    os.unlink(p + "-wal")


def random_bytes(p):
    for suffix in ("-wal", "-shm"):
        if os.path.exists(p + suffix):
            os.unlink(p + suffix)
    with open(p, "wb") as f:
        f.write(os.urandom(64 * 1024))


CASES = [
    ("truncated", truncate, "term"),
    ("flipped", flip_pages, "term"),
    ("zero_byte_with_wal", zero_with_wal, "kill"),
    ("deleted_wal", delete_wal, "kill"),
    ("random_bytes", random_bytes, "term"),
]


def one_case(h, recv, name, damage, stop):
    agent_id = "gw-" + name.replace("_", "-")
    agent = h.agent(name, agent_id, recv).start()
    fill(h, agent, name)
    old_epoch, old_next = agent.epoch(), agent.next_seq()
    if stop == "kill":
        agent.kill9()
    else:
        ch.check(agent.stop() == 0, "agent did not exit 0")
    damage(agent.spool_path)
    agent.start()
    moved = glob.glob(agent.spool_path + ".corrupt-*")
    ch.check(any(not m.endswith(("-wal", "-shm")) for m in moved),
             "%s: nothing moved aside: %r" % (name, os.listdir(os.path.dirname(agent.spool_path))))
    ch.check(not glob.glob(agent.spool_path + ".new-*"), "a half-made spool is left behind")
    ch.check(agent.epoch() != old_epoch, "%s: same epoch after quarantine" % name)
    led = [l for l in agent.ledger() if l["reason"] == "corrupt_spool"]
    ch.check(len(led) == 1, "%s: corrupt_spool ledger rows: %r" % (name, led))
    ch.log("%s: moved aside to %s; ledger %r" % (name, [os.path.basename(m) for m in moved],
                                                   {k: led[0][k] for k in ("epoch", "first_seq", "last_seq", "count", "detail")}))
    if led[0]["epoch"]:
        ch.check(ch.u64(led[0]["epoch"]) == old_epoch, "ledger names epoch %r, the old one was %d"
                 % (led[0]["epoch"], old_epoch))
        ch.check(led[0]["last_seq"] <= old_next - 1, "ledger range past the old next_seq")
    ch.check("corrupt" in agent.proc.log_text(), "quarantine not logged")
    acked = fill(h, agent, name + "-after", n=50)
    return agent, acked, led[0]


def main(h):
    recv = h.receiver()
    done = []
    for name, damage, stop in CASES:
        done.append(one_case(h, recv, name, damage, stop))

    # Run time: overwrite every page but the first under the running agent. Records are in the
    # database file (small max_size: frequent checkpoints), more than SQLite's page cache holds.
    agent = h.agent("runtime", "gw-runtime", recv, extra={"spool": {"max_size": "16MiB"}}).start()
    fill(h, agent, "rt", n=3000, size=1000)
    old_epoch = agent.epoch()
    time.sleep(0.5)
    sz = os.path.getsize(agent.spool_path)
    with open(agent.spool_path, "r+b") as f:
        f.seek(PAGE)
        f.write(os.urandom(sz - PAGE))
    recv.start()             # the forwarder now reads old segments: SQLITE_CORRUPT
    h.wait(lambda: glob.glob(agent.spool_path + ".corrupt-*"), timeout=60,
           what="the running agent to quarantine its corrupt spool")
    h.wait(lambda: agent.epoch() != old_epoch, timeout=30, what="a new spool with a new epoch")
    h.check_alive()
    acked = fill(h, agent, "rt-after", n=50)
    h.wait(lambda: agent.segment_count() == 0, timeout=60, what="the new spool to drain")
    ch.assert_stored_exactly_once(recv, agent, acked)
    h.wait(lambda: any(l["reason"] == "corrupt_spool" for l in recv.losses("gw-runtime")),
           what="the runtime corrupt_spool entry at the receiver")

    for a, acked_after, led in done:
        h.wait(lambda: a.segment_count() == 0, timeout=60, what="%s to drain" % a.name)
        ch.assert_stored_exactly_once(recv, a, acked_after)
        h.wait(lambda: any(l["reason"] == "corrupt_spool" for l in recv.losses(a.agent_id)),
               what="%s: corrupt_spool entry at the receiver" % a.name)
        ch.check(a.stop() == 0, "%s did not exit 0" % a.name)
    ch.check(agent.stop() == 0, "runtime agent did not exit 0")
    ch.check(recv.stop() == 0, "receiver did not exit 0")


if __name__ == "__main__":
    ch.run(main, "j_corrupt_spool")

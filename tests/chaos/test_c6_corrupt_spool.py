#!/usr/bin/env python3
"""Chaos 6 (issue 7): the spool is corrupt, in generated ways, when the agent starts.

Each case is its own agent (own id, own spool) on one receiver:
  1. sometimes the agent first delivers a few hundred records (so the spool holds freed pages
     and delivered seqs), then it is stopped;
  2. with its uplink pointed at a closed port, it takes a few hundred to a few thousand
     records (compressible or random lines; some cases seal the spool with a key, some have a
     small max_size), which stay pending; then it is stopped, with SIGTERM or kill -9 (which
     leaves a -wal and -shm behind), and PRAGMA integrity_check of the spool says ok;
  3. the spool's files are damaged, one to three ways at once, chosen by the seed: random
     bytes over random pages, random bytes or single-bit flips at random offsets, truncation
     of the database at a random offset, a zeroed header or first page, two pages swapped, a
     page copied over another, the -wal deleted, truncated at a random offset, replaced by
     garbage or overwritten in part, garbage over the -shm or the -shm deleted, a zero-byte
     database beside its -wal, a database of random bytes;
  4. the agent starts on it, pointed at the receiver. It must start (accept connections
     within the harness's deadline: never crash, never hang), either moving the corrupt
     spool aside (spool.db.corrupt-*) and starting a new epoch with a corrupt_spool ledger
     entry, or going on with what it can read; it takes more records, and its spool drains
     and its every ledger row reaches the receiver; after it stops, integrity_check of the
     spool it left says ok.

Parameters: short (CI) 20 cases; full (CISTERN_CHAOS_FULL=1) 100 cases. Seed from
CISTERN_CHAOS_SEED (printed); each case logs its damage, so a failing case can be replayed.

Checks, per case and overall (chaos.ledger_verdict): no duplicates and no unexpected records
at the receiver, nothing stored under another key than its OK line named (misfiled), and
every accepted record is stored or covered by a loss-ledger entry the receiver holds:
corrupt_spool (the quarantine), tampered (a sealed segment that failed authentication), or
evicted_full (a case with a small max_size, while its uplink was down).
Where the corrupt_spool entry itself says it cannot name the whole range (the epoch or the
range were unreadable, or the WAL was lost: "unknown", "not counted"), the accepted records of
that epoch it does not cover are counted as dropped_unknown_range and reported, not lost.
Reported: cases, quarantined (cases that moved the spool aside), kept (cases that went on with
the same epoch), damage kinds, sent, accepted, stored, dropped_ledgered (by reason),
dropped_unknown_range."""
import base64
import glob
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import chaos  # noqa: E402
from chaos import ch  # noqa: E402

# evicted_full: the cases with a small max_size evict while their uplink is down
REASONS = ("corrupt_spool", "tampered", "evicted_full")


# ---------------------------------------------------------------------------------------
# Damage: each function takes (rnd, path) with no process holding the spool open, and
# returns a short description (or None when it does not apply to these files).

def page_size(path):
    with open(path, "rb") as f:
        h = f.read(100)
    if len(h) < 100 or not h.startswith(b"SQLite format 3\0"):
        return 1024
    ps = h[16] << 8 | h[17]
    return 65536 if ps == 1 else (ps or 1024)


def size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def overwrite(path, off, data):
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(data)


def d_random_pages(rnd, p):
    ps, n = page_size(p), size(p) // page_size(p)
    if n < 2:
        return None
    pages = sorted(rnd.sample(range(n), min(n, rnd.randint(1, 4))))
    for pg in pages:
        overwrite(p, pg * ps, rnd.randbytes(ps))
    return "random bytes over pages %s" % pages


def d_random_bytes(rnd, p):
    sz = size(p)
    if sz < 2:
        return None
    offs = sorted(rnd.randrange(sz) for _ in range(rnd.randint(1, 12)))
    for o in offs:
        overwrite(p, o, rnd.randbytes(rnd.randint(1, 16)))
    return "random bytes at offsets %s" % offs[:6]


def d_bit_flips(rnd, p):
    sz = size(p)
    if sz < 2:
        return None
    offs = sorted(rnd.randrange(sz) for _ in range(rnd.randint(1, 8)))
    with open(p, "r+b") as f:
        for o in offs:
            f.seek(o)
            b = f.read(1)
            f.seek(o)
            f.write(bytes([b[0] ^ (1 << rnd.randrange(8))]))
    return "bits flipped at %s" % offs[:6]


def d_truncate_db(rnd, p):
    sz = size(p)
    if sz < 2:
        return None
    off = rnd.randrange(1, sz)
    os.truncate(p, off)
    return "database truncated at %d of %d" % (off, sz)


def d_zero_header(rnd, p):
    overwrite(p, 0, b"\0" * 100)
    return "header zeroed"


def d_zero_page1(rnd, p):
    overwrite(p, 0, b"\0" * page_size(p))
    return "page 1 zeroed"


def d_swap_pages(rnd, p):
    ps = page_size(p)
    n = size(p) // ps
    if n < 3:
        return None
    a, b = rnd.sample(range(n), 2)
    with open(p, "r+b") as f:
        f.seek(a * ps)
        pa = f.read(ps)
        f.seek(b * ps)
        pb = f.read(ps)
        f.seek(a * ps)
        f.write(pb)
        f.seek(b * ps)
        f.write(pa)
    return "pages %d and %d swapped" % (a, b)


def d_dup_page(rnd, p):
    ps = page_size(p)
    n = size(p) // ps
    if n < 3:
        return None
    a, b = rnd.sample(range(n), 2)
    with open(p, "r+b") as f:
        f.seek(a * ps)
        pa = f.read(ps)
        f.seek(b * ps)
        f.write(pa)
    return "page %d copied over page %d" % (a, b)


def d_delete_wal(rnd, p):
    if not os.path.exists(p + "-wal"):
        return None
    os.unlink(p + "-wal")
    return "-wal deleted"


def d_truncate_wal(rnd, p):
    sz = size(p + "-wal")
    if sz < 33:
        return None
    off = rnd.randrange(0, sz)
    os.truncate(p + "-wal", off)
    return "-wal truncated at %d of %d" % (off, sz)


def d_garbage_wal(rnd, p):
    n = rnd.choice([32, 1000, 4096, 65536])
    with open(p + "-wal", "wb") as f:
        f.write(rnd.randbytes(n))
    return "-wal replaced by %d random bytes" % n


def d_garbage_in_wal(rnd, p):
    sz = size(p + "-wal")
    if sz < 64:
        return None
    off = rnd.randrange(0, sz - 1)
    n = min(sz - off, rnd.randint(1, 4096))
    overwrite(p + "-wal", off, rnd.randbytes(n))
    return "-wal: %d random bytes at %d of %d" % (n, off, sz)


def d_garbage_shm(rnd, p):
    sz = size(p + "-shm")
    if sz < 1:
        return None
    off = rnd.randrange(0, min(sz, 136))
    overwrite(p + "-shm", off, rnd.randbytes(rnd.randint(1, 64)))
    return "-shm: random bytes at %d" % off


def d_delete_shm(rnd, p):
    if not os.path.exists(p + "-shm"):
        return None
    os.unlink(p + "-shm")
    return "-shm deleted"


def d_zero_db_with_wal(rnd, p):
    if not os.path.exists(p + "-wal"):
        return None
    os.truncate(p, 0)
    return "database truncated to zero beside its -wal"


def d_random_file(rnd, p):
    for suffix in ("-wal", "-shm"):
        if os.path.exists(p + suffix) and rnd.random() < 0.5:
            os.unlink(p + suffix)
    with open(p, "wb") as f:
        f.write(rnd.randbytes(rnd.choice([100, 4096, 65536])))
    return "database replaced by random bytes"


DAMAGE = [d_random_pages, d_random_bytes, d_bit_flips, d_truncate_db, d_zero_header,
          d_zero_page1, d_swap_pages, d_dup_page, d_delete_wal, d_truncate_wal, d_garbage_wal,
          d_garbage_in_wal, d_garbage_shm, d_delete_shm, d_zero_db_with_wal, d_random_file]
WAL_DAMAGE = {d_delete_wal, d_truncate_wal, d_garbage_in_wal, d_garbage_shm, d_delete_shm,
              d_zero_db_with_wal}
# Not generated together: a WAL cut short or overwritten in part while its -shm is also gone (or
# garbage). The -shm is the only record of how many frames were committed; without it such a WAL
# cannot be told from a shorter one that is whole (SQLite itself cannot), so the commits it lost
# go unnoticed. Each alone is detected (the -shm, or the WAL's own header and checksums).
SHM_DAMAGE = {d_delete_shm, d_garbage_shm}
WAL_CONTENT_DAMAGE = {d_truncate_wal, d_garbage_in_wal}


# ---------------------------------------------------------------------------------------

def set_url(agent, url):
    agent.config["forward"]["url"] = url
    with open(agent.config_path, "w") as f:
        f.write("# written by test_c6_corrupt_spool\n" + ch.to_yaml(agent.config) + "\n")


def feed(h, agent, tally, tag, n, rnd, compressible):
    """Send N lines; every line is answered (OK or ERR); the connection's lines go to TALLY
    under the agent's current epoch."""
    c = agent.client("unix")
    sent = 0
    while sent < n:
        k = min(n - sent, rnd.randint(1, 300))
        if compressible:
            lines = [("%s-%d-%s" % (tag, sent + i, "x" * rnd.randint(0, 120))).encode()
                     for i in range(k)]
        else:
            lines = [("%s-%d-%s" % (tag, sent + i, base64.b64encode(rnd.randbytes(
                rnd.randint(10, 600))).decode())).encode() for i in range(k)]
        c.send_many(lines)
        sent += k
    c.wait_answers(timeout=120, alive=h.check_alive)
    tally.add_client(c, agent.agent_id, agent.epoch())
    c.close()


def one_case(h, recv, i, rnd, tally, dead_url, figures):
    name = "c6-%d" % i
    aid = "gw-" + name
    extra = {"forward": {"batch": {"max_records": rnd.choice([50, 500, 5000]),
                                   "max_delay": "50ms"}},
             "spool": {"commit_max_records": rnd.choice([50, 500, 5000])}}
    if rnd.random() < 0.3:
        extra["spool"]["max_size"] = "%dMiB" % rnd.choice([1, 2, 4])
    sealed = rnd.random() < 0.25
    if sealed:
        key = h.path(name + ".key")
        r = subprocess.run([h.agent_bin, "keygen", key], capture_output=True)
        ch.check(r.returncode == 0, "keygen: %r" % r.stderr)
        extra["spool"]["encryption_key_file"] = key
    agent = h.agent(name, aid, recv, extra=extra)
    compressible = rnd.random() < 0.5
    # 1. sometimes: records delivered first
    if rnd.random() < 0.35:
        agent.start()
        feed(h, agent, tally, name + "-a", rnd.randint(100, 600), rnd, compressible)
        chaos.wait_drained(h, [agent], timeout=60)
        ch.check(agent.stop() == 0, "%s: agent did not exit 0" % name)
    # 2. records pending: the uplink points at a closed port
    set_url(agent, dead_url)
    agent.start()
    epoch0 = agent.epoch()
    feed(h, agent, tally, name + "-b", rnd.randint(200, 3000), rnd, compressible)
    pending = agent.pending_records()
    kill = rnd.random() < 0.5
    if kill:
        agent.kill9()
    else:
        ch.check(agent.stop() == 0, "%s: agent did not exit 0" % name)
    chaos.integrity_check(agent.spool_path)
    # 3. damage
    p = agent.spool_path
    kinds = [k for k in DAMAGE if kill or k not in WAL_DAMAGE]
    done = []
    chosen = rnd.sample(kinds, rnd.choice([1, 1, 1, 2, 3]))
    if any(k in WAL_CONTENT_DAMAGE for k in chosen):
        chosen = [k for k in chosen if k not in SHM_DAMAGE]
    for fn in chosen:
        what = fn(rnd, p)
        if what:
            done.append(what)
            figures["damage"][fn.__name__[2:]] = figures["damage"].get(fn.__name__[2:], 0) + 1
    if not done:
        what = d_random_pages(rnd, p) or d_random_file(rnd, p)
        done.append(what)
    ch.log("%s: %d pending (epoch %d, %s, %s%s), stopped by %s; damage: %s"
           % (name, pending, epoch0, "compressible" if compressible else "random",
              "sealed" if sealed else "plain",
              ", max_size " + extra["spool"]["max_size"] if "max_size" in extra["spool"] else "",
              "kill -9" if kill else "SIGTERM", "; ".join(done)))
    # 4. the agent starts on it
    set_url(agent, recv.url)
    agent.start()
    h.check_alive()
    epoch1 = agent.epoch()
    moved = [m for m in glob.glob(p + ".corrupt-*") if not m.endswith(("-wal", "-shm"))]
    led = [l for l in agent.ledger() if l["reason"] == "corrupt_spool"]
    if moved or epoch1 != epoch0:
        figures["quarantined"] += 1
        ch.check(moved and epoch1 != epoch0 and len(led) == 1,
                 "%s: half a quarantine: moved %r, epoch %d -> %d, corrupt_spool rows %r"
                 % (name, moved, epoch0, epoch1, led))
        e = ch.u64(led[0]["epoch"]) if led[0]["epoch"] else 0
        ch.check(e in (0, epoch0), "%s: the corrupt_spool row names epoch %d, not %d"
                 % (name, e, epoch0))
        ch.log("%s: quarantined: new epoch %d; ledger %s %d-%d (%d): %s"
               % (name, epoch1, e, led[0]["first_seq"], led[0]["last_seq"], led[0]["count"],
                  led[0]["detail"]))
    else:
        figures["kept"] += 1
        ch.log("%s: went on with epoch %d (%d pending)" % (name, epoch1, agent.pending_records()))
    feed(h, agent, tally, name + "-c", rnd.randint(50, 300), rnd, compressible)
    chaos.wait_drained(h, [agent], timeout=120)
    h.wait(lambda: all(l["sent"] for l in agent.ledger()), timeout=60,
           what="%s: every loss-ledger row sent" % name)
    ch.check(agent.stop() == 0, "%s: agent did not exit 0" % name)
    chaos.integrity_check(p)
    tally.epochs[aid] = (epoch0, epoch1)
    return aid


def unknown_range(tally):
    """corrupt_spool entries that say they cannot name the whole range stand for the epoch
    that was quarantined (their own, or, when they could not read it, the case's first)."""
    def f(aid, ent):
        if ent["reason"] != "corrupt_spool":
            return None
        d = ent.get("detail") or ""
        if "unknown" not in d and "lost WAL" not in d:
            return None
        return ch.u64(ent["epoch"]) if ent["epoch"] and ch.u64(ent["epoch"]) else \
            tally.epochs[aid][0]
    return f


def main(h):
    cases = chaos.param(20, 100)
    rnd = chaos.rng()
    recv = h.receiver().start()
    dead_url = "https://127.0.0.1:%d/v1/batches" % ch.free_port()
    tally = chaos.KeyedTally()
    tally.epochs = {}
    figures = {"quarantined": 0, "kept": 0, "damage": {}}
    ids = []
    for i in range(cases):
        ids.append(one_case(h, recv, i, rnd, tally, dead_url, figures))
        if (i + 1) % 5 == 0:
            # per-case verdicts as we go: a failing case is named early
            v = chaos.ledger_verdict(recv, ids[-5:], tally, REASONS, unknown_range(tally))
            ch.check(v["lost"] == 0 and v["duplicated"] == 0 and v["unexpected"] == 0
                     and v["misfiled"] == 0,
                     "cases %d-%d: lost %d, duplicated %d, unexpected %d, misfiled %d (%r)"
                     % (i - 4, i, v["lost"], v["duplicated"], v["unexpected"], v["misfiled"],
                        v["examples"]))
    v = chaos.ledger_verdict(recv, ids, tally, REASONS, unknown_range(tally))
    chaos.report("c6", {"cases": cases}, v, cases=cases,
                 dropped_ledgered=v["dropped_ledgered"], dropped_by_reason=v["dropped_by_reason"],
                 dropped_unknown_range=v["dropped_unknown_range"], misfiled=v["misfiled"],
                 **figures)
    chaos.assert_verdict(v)
    ch.check(v["misfiled"] == 0, "%d records stored under another key than their OK said, e.g. %r"
             % (v["misfiled"], v["examples"]["misfiled"]))
    ch.check(recv.stop() == 0, "receiver did not exit 0")


if __name__ == "__main__":
    ch.run(main, "c6_corrupt_spool")

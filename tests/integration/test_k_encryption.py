#!/usr/bin/env python3
"""k) Encryption at rest.

`cistern-agent keygen` makes a 32-byte key file with mode 0600 and never overwrites one. A key
file with mode 0644 is refused by --check-config and at start (the message says chmod 600).
With the key, payloads do not appear in the spool's files (the same payloads do in an
unsealed control spool). A sealed segment changed by one byte while the agent is stopped is
never sent: it is ledgered as tampered for exactly its seq range, the receiver gets that
entry and classifies those seqs "dropped at the edge: tampered"; every other record arrives."""
import os
import sqlite3
import stat
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cistern_harness as ch

MARK = "CISTERN-PLAINTEXT-MARK"


def run(argv):
    return subprocess.run(argv, capture_output=True, timeout=30 * ch.SCALE)


def send(h, agent, tag, n):
    c = agent.client("unix")
    # raw random filler (no newline, CR or NUL) defeats compression, so an unsealed spool
    # stores each record, and MARK, verbatim
    def filler():
        return bytes(b for b in os.urandom(600) if b not in (0, 10, 13))[:400]
    c.send_many([("%s %s %d " % (MARK, tag, i)).encode() + filler() for i in range(n)])
    ans = c.wait_answers(timeout=60, alive=h.check_alive)
    ch.check(all(a[0] == "OK" for a in ans), "%s: refused" % tag)
    acked = c.acked()
    c.close()
    return acked


def files_contain(path, needle):
    for suffix in ("", "-wal"):
        if os.path.exists(path + suffix) and needle in open(path + suffix, "rb").read():
            return True
    return False


def main(h):
    key = h.path("spool.key")
    r = run([h.agent_bin, "keygen", key])
    ch.check(r.returncode == 0, "keygen failed: %r" % r.stderr)
    st = os.stat(key)
    ch.check(stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == 32,
             "key file mode %o size %d" % (stat.S_IMODE(st.st_mode), st.st_size))
    orig = open(key, "rb").read()
    r = run([h.agent_bin, "keygen", key])
    ch.check(r.returncode != 0 and open(key, "rb").read() == orig, "keygen overwrote a key")

    recv = h.receiver()
    # control: no key, the payload is visible on disk
    plain = h.agent("plain", "gw-plain", recv).start()
    send(h, plain, "plain", 50)
    ch.check(plain.stop() == 0, "plain agent did not exit 0")
    ch.check(files_contain(plain.spool_path, MARK.encode()),
             "control spool does not show the plaintext: the check below would prove nothing")

    agent = h.agent("sealed", "gw-sealed", recv, extra={"spool": {"encryption_key_file": key}})
    os.chmod(key, 0o644)
    r = run([h.agent_bin, "--check-config", agent.config_path])
    ch.check(r.returncode != 0 and b"chmod 600" in r.stderr,
             "--check-config accepted a 0644 key: %r" % r.stderr)
    r = run([h.agent_bin, "--config", agent.config_path])
    ch.check(r.returncode != 0 and b"chmod 600" in r.stderr, "agent started with a 0644 key")
    os.chmod(key, 0o600)
    r = run([h.agent_bin, "--check-config", agent.config_path])
    ch.check(r.returncode == 0, "--check-config refused a 0600 key: %r" % r.stderr)

    agent.start()
    acked = send(h, agent, "a", 100) + send(h, agent, "b", 100) + send(h, agent, "c", 100)
    ch.check(agent.stop() == 0, "sealed agent did not exit 0")
    ch.check(not files_contain(agent.spool_path, MARK.encode()),
             "the plaintext is readable in the sealed spool")

    con = sqlite3.connect(agent.spool_path)
    segs = con.execute("SELECT first_seq, last_seq, sealed FROM segments ORDER BY first_seq").fetchall()
    ch.check(len(segs) >= 2 and all(s[2] == 1 for s in segs), "segments not sealed: %r" % segs)
    victim = segs[1]
    blob = bytearray(con.execute("SELECT data FROM segments WHERE first_seq=?", (victim[0],)).fetchone()[0])
    blob[len(blob) // 2] ^= 0x01
    con.execute("UPDATE segments SET data=? WHERE first_seq=?", (bytes(blob), victim[0]))
    con.commit()
    con.close()

    agent.start()
    recv.start()
    h.wait(lambda: agent.segment_count() == 0, timeout=60, what="spool to drain")
    tam = [l for l in agent.ledger() if l["reason"] == "tampered"]
    ch.check(len(tam) == 1 and (tam[0]["first_seq"], tam[0]["last_seq"]) == victim[:2],
             "tampered ledger %r, expected seqs %d..%d" % (tam, victim[0], victim[1]))
    stored = {s for _e, s, _p, _st in recv.rows("gw-sealed")}
    ch.check(not any(victim[0] <= s <= victim[1] for s in stored), "a tampered record was sent")
    good = [(p, s) for p, s in acked if not victim[0] <= s <= victim[1]]
    ch.assert_stored_exactly_once(recv, agent, good)
    ch.assert_accounted(recv, agent, acked, ["tampered"])
    h.wait(lambda: any(l["reason"] == "tampered" for l in recv.losses("gw-sealed")),
           what="the tampered entry at the receiver")
    gaps = recv.gaps("gw-sealed", epoch=agent.epoch())["epochs"][0]["gaps"]
    ch.check([(int(g["first_seq"]), int(g["last_seq"]), g["status"]) for g in gaps]
             == [(victim[0], victim[1], "dropped at the edge: tampered")], "gaps: %r" % gaps)
    ch.check(agent.stop() == 0, "agent did not exit 0")
    ch.check(recv.stop() == 0, "receiver did not exit 0")


if __name__ == "__main__":
    ch.run(main, "k_encryption")

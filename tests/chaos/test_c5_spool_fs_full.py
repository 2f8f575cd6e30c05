#!/usr/bin/env python3
"""Chaos 5 (issue 7): the spool's filesystem is full, with the uplink down.

Each case puts an agent's spool on a small tmpfs of its own (mount -t tmpfs -o size=...;
unmounted at the end even on failure; the scenario is skipped, exit 77, when mounting is not
permitted). The receiver is stopped, and a source writes incompressible unique lines to the
agent's socket input in chunks (each chunk's answers awaited) until the filesystem is full.
Four cases, each for CYCLES fill/drain cycles:
  - drop_oldest, spool.max_size below the tmpfs: the spool reaches max_size first and evicts
    (evicted_full in the loss ledger, sources still told OK); then another file (a "filler",
    as another process's logs would) takes the rest of the filesystem;
  - reject_new, max_size below the tmpfs: the spool reaches max_size (ERR full), then the
    filler takes the rest;
  - drop_oldest and reject_new, max_size above the tmpfs: the spool itself fills the
    filesystem; then a filler takes the last bytes.
Once the filesystem is full, sources must get "ERR disk full ..." (never OK for a record
that was not stored), and the agent keeps running and logs the state once per change. Then
the receiver comes back, at random before or after the filler is removed (always before, for
the cases where the spool itself filled the filesystem). With the disk still full, the spool
must drain (deleting what the receiver acknowledged needs no new disk blocks) and then take
records again into its own free pages (a whole chunk answered OK); then the filler goes, and
ingest goes on.

Parameters: short (CI) tmpfs 8 MiB, max_size 4 MiB (or 64 MiB), 1 cycle per case; full
(CISTERN_CHAOS_FULL=1) tmpfs 32 MiB, max_size 16 MiB (or 256 MiB), 3 cycles per case. Seed
from CISTERN_CHAOS_SEED (printed).

Checks: PRAGMA integrity_check of each spool after the agent stops; the verdict with
chaos.ledger_verdict(): lost (accepted, neither stored nor in an evicted_full ledger range the
receiver holds), duplicated, unexpected and misfiled (stored under another key than the OK
said) all 0. Records answered ERR are sent-but-not-accepted (reported as refused, by reason).
Reported per run: cases, cycles, sent, accepted, stored, refused by reason, dropped_ledgered
(accepted records evicted by drop_oldest, each covered by a ledger range)."""
import base64
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import chaos  # noqa: E402
from chaos import ch  # noqa: E402

SKIP = 77
CHUNK = 200
ERR_REASONS = ("disk full", "full:", "busy")


def free_bytes(path):
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill_fs(path, leave=0):
    """Write zeros to PATH until the filesystem has at most LEAVE bytes free (ENOSPC ends it).
    Returns the bytes written."""
    n = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for block in (1 << 20, 64 << 10, 4 << 10, 512):
            while free_bytes(os.path.dirname(path)) > leave + block:
                try:
                    n += os.write(fd, b"\0" * block)
                except OSError:
                    break
        if leave == 0:
            try:
                while True:
                    n += os.write(fd, b"\0" * 512)
            except OSError:
                pass
    finally:
        os.close(fd)
    return n


class Source:
    """One connection to the agent's socket input, fed synchronously in chunks of unique,
    incompressible lines "<tag>-<n>-<random base64>"."""

    def __init__(self, h, agent, tally, tag, rnd):
        self.h, self.agent, self.tally, self.tag, self.rnd = h, agent, tally, tag, rnd
        self.c = agent.client("unix")
        self.n = 0
        self.refused = {}

    def chunk(self, n=CHUNK):
        """Send N lines; return their answers."""
        lines = []
        for _ in range(n):
            pad = base64.b64encode(self.rnd.randbytes(450)).decode()
            lines.append(("%s-%d-%s" % (self.tag, self.n, pad)).encode())
            self.n += 1
        before = len(self.c.answers)
        self.c.send_many(lines)
        ans = self.c.wait_answers(timeout=120, alive=self.h.check_alive)[before:]
        for kind, why in ans:
            if kind == "ERR":
                key = next((r for r in ERR_REASONS if why.startswith(r)), None)
                ch.check(key is not None, "%s: unexpected refusal %r" % (self.tag, why))
                self.refused[key] = self.refused.get(key, 0) + 1
            else:
                ch.check(kind == "OK", "%s: unexpected answer %r" % (self.tag, (kind, why)))
        return ans

    def close(self):
        self.tally.add_client(self.c)
        self.c.close()


def resumes(src, tag, what):
    """Ingest resumes: within a deadline, a whole chunk of 50 lines is answered OK."""
    deadline = time.monotonic() + 60 * ch.SCALE
    while time.monotonic() < deadline:
        if all(a[0] == "OK" for a in src.chunk(50)):
            return
        time.sleep(0.2)
    ch.check(False, "%s: records still refused after %s: %r" % (tag, what, src.refused))


def run_case(h, recv, name, policy, tmpfs, max_size, cycles, rnd, mounts):
    mnt = h.path("fs-" + name)
    os.makedirs(mnt)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%d,mode=0755" % tmpfs, "tmpfs", mnt],
                       capture_output=True)
    if r.returncode != 0:
        ch.log("SKIP: cannot mount a tmpfs (%s)" % r.stderr.decode().strip())
        sys.exit(SKIP)
    mounts.append(mnt)
    agent_id = "gw-c5-" + name
    spool_fills_fs = max_size > tmpfs
    agent = h.agent(name, agent_id, recv, spool_path=os.path.join(mnt, "spool.db"),
                    extra={"spool": {"max_size": max_size, "when_full": policy},
                           "forward": {"batch": {"max_records": 2000, "max_delay": "100ms"}}})
    agent.start()
    tally = chaos.KeyedTally(agent_id, agent.epoch())
    filler = os.path.join(mnt, "filler")
    refused = {}
    figures = {"receiver_first": 0}
    for cyc in range(cycles):
        src = Source(h, agent, tally, "c5-%s-%d" % (name, cyc), rnd)
        tag = "%s cycle %d" % (name, cyc)
        max_chunks = 4 * tmpfs // (CHUNK * 400) + 50
        # 1. the spool's own limit (max_size below the filesystem)
        if not spool_fills_fs:
            for _ in range(max_chunks):
                ans = src.chunk()
                if policy == "reject_new" and any(a[0] == "ERR" for a in ans):
                    ch.check(src.refused.get("full:"), "%s: refused, but not as full: %r"
                             % (tag, src.refused))
                    break
                if policy == "drop_oldest" and any(
                        l["reason"] == "evicted_full" for l in agent.ledger()):
                    ch.check(not src.refused, "%s: drop_oldest refused records before the disk"
                             " was full: %r" % (tag, src.refused))
                    break
            else:
                ch.check(False, "%s: max_size %d never reached" % (tag, max_size))
            for _ in range(3):
                src.chunk()  # a while at the limit
            fill_fs(filler)
            ch.log("%s: at max_size; the filler took the rest (%d bytes free)"
                   % (tag, free_bytes(mnt)))
        # 2. the filesystem is full: ERR disk full whenever the spool needs more of it (at its
        # own limit it may not: evictions and deliveries free pages it reuses), never an OK
        # for what was not stored (the verdict checks every OK)
        if spool_fills_fs:
            for _ in range(max_chunks):
                src.chunk()
                if src.refused.get("disk full"):
                    break
            else:
                ch.check(False, "%s: no ERR disk full (%d lines sent, %d bytes free)"
                         % (tag, src.n, free_bytes(mnt)))
            # the last bytes too (another process's log would take them)
            fill_fs(filler)
            ch.log("%s: the spool filled the filesystem; the filler took the last bytes" % tag)
        for _ in range(rnd.randint(2, 5)):
            src.chunk(rnd.randint(1, CHUNK))
        h.check_alive()
        # 3. the receiver comes back; the spool drains; ingest resumes
        receiver_first = spool_fills_fs or rnd.random() < 0.5
        if receiver_first:
            figures["receiver_first"] += 1
            recv.start()
            chaos.wait_drained(h, [agent], timeout=chaos.param(120, 300))
            ch.log("%s: the spool drained with the disk still full (%d bytes free)"
                   % (tag, free_bytes(mnt)))
            # the spool's own free pages take records again, the disk still full
            resumes(src, tag, "the spool drained, the disk still full")
            os.unlink(filler)
        else:
            os.unlink(filler)
            recv.start()
        resumes(src, tag, "the disk and the receiver came back")
        src.close()
        chaos.wait_drained(h, [agent], timeout=chaos.param(120, 300))
        # the loss ledger travels in batch headers: every row must reach the receiver
        h.wait(lambda: all(l["sent"] for l in agent.ledger()), timeout=60,
               what="%s: every loss-ledger row sent" % tag)
        for k, n in src.refused.items():
            refused[k] = refused.get(k, 0) + n
        ch.log("%s: sent %d, refused %r" % (tag, src.n, src.refused))
        if cyc + 1 < cycles:
            ch.check(recv.stop() == 0, "receiver did not exit 0")
    text = agent.proc.log_text()
    n_full = text.count("is full; sources are told ERR")
    # every other state it may leave "disk full" for: commits work again, or (reject_new)
    # the spool's own limit refuses the next commit before it needs the disk
    n_other = text.count("commits work again") + text.count("spool.when_full is reject_new")
    ch.check((n_full >= 1 or not spool_fills_fs) and n_full <= n_other + 1,
             "%s: the disk-full state logged %d times for %d changes to another state (once"
             " per change)" % (name, n_full, n_other))
    ch.check(agent.stop() == 0, "%s: agent did not exit 0" % name)
    chaos.integrity_check(agent.spool_path)
    ch.check(recv.stop() == 0, "receiver did not exit 0")
    return agent_id, tally, refused, figures


def main(h):
    tmpfs = chaos.param(8, 32) << 20
    limit = chaos.param(4, 16) << 20
    cycles = chaos.param(1, 3)
    rnd = chaos.rng()
    recv = h.receiver()
    cases = [("drop-limit", "drop_oldest", limit), ("reject-limit", "reject_new", limit),
             ("drop-fs", "drop_oldest", 8 * tmpfs), ("reject-fs", "reject_new", 8 * tmpfs)]
    mounts = []
    results = []
    try:
        for name, policy, max_size in cases:
            results.append((name, policy) + run_case(h, recv, name, policy, tmpfs, max_size,
                                                       cycles, rnd, mounts))
    finally:
        for m in mounts:
            subprocess.run(["umount", "-l", m], capture_output=True)
    recv.start()
    tally = chaos.KeyedTally()
    refused, figures, per_case = {}, {}, {}
    for name, policy, agent_id, t, ref, fig in results:
        tally.add(t.sent, t.accepted)
        tally.keys.update(t.keys)
        for k, n in ref.items():
            refused[k] = refused.get(k, 0) + n
        for k, n in fig.items():
            figures[k] = figures.get(k, 0) + n
        cv = chaos.ledger_verdict(recv, [agent_id], t, ("evicted_full",))
        per_case[name] = {k: cv[k] for k in ("accepted", "stored", "lost", "dropped_ledgered")}
        per_case[name]["refused"] = ref
        if policy == "reject_new":
            ch.check(cv["dropped_ledgered"] == 0, "%s: reject_new dropped %d accepted records"
                     % (name, cv["dropped_ledgered"]))
    ids = [r[2] for r in results]
    v = chaos.ledger_verdict(recv, ids, tally, ("evicted_full",))
    ch.check(per_case["drop-limit"]["dropped_ledgered"] > 0,
             "drop_oldest at max_size evicted nothing that had been accepted")
    chaos.report("c5", {"tmpfs_bytes": tmpfs, "max_size": limit, "cycles": cycles,
                        "cases": [c[0] for c in cases]}, v,
                 refused=refused, dropped_ledgered=v["dropped_ledgered"],
                 misfiled=v["misfiled"], per_case=per_case, **figures)
    chaos.assert_verdict(v)
    ch.check(v["misfiled"] == 0, "%d records stored under another key than their OK said, e.g. %r"
             % (v["misfiled"], v["examples"]["misfiled"]))
    ch.check(recv.stop() == 0, "receiver did not exit 0")


if __name__ == "__main__":
    ch.run(main, "c5_spool_fs_full")

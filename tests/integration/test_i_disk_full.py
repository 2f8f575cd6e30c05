#!/usr/bin/env python3
"""i) Disk full: the spool lives on a small tmpfs the test mounts (needs root; skipped
otherwise). With the receiver down and the disk filled by another file, the agent answers
"ERR disk full ..." instead of OK, never acknowledges what it could not commit, does not
crash, and logs the state once. When space returns it takes records again by itself, and
every record ever answered OK is delivered exactly once."""
import base64
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cistern_harness as ch

SKIP = 77


def free_bytes(path):
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def line(tag, i):
    return json.dumps({"t": tag, "i": i, "r": base64.b64encode(os.urandom(600)).decode()}).encode()


def main(h):
    mnt = h.path("small")
    os.makedirs(mnt)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m,mode=0755", "tmpfs", mnt],
                       capture_output=True)
    if r.returncode != 0:
        ch.log("SKIP: cannot mount a tmpfs (%s)" % r.stderr.decode().strip())
        sys.exit(SKIP)
    agent = None
    try:
        recv = h.receiver()
        agent = h.agent("agent", "gw-diskfull", recv, spool_path=os.path.join(mnt, "spool.db"),
                        extra={"spool": {"max_size": "64MiB"}}).start()
        c = agent.client("unix")
        c.send_many([line("warm", i) for i in range(100)])
        ans = c.wait_answers(timeout=60, alive=h.check_alive)
        ch.check(all(a[0] == "OK" for a in ans), "warm-up refused")
        filler = os.path.join(mnt, "filler")
        with open(filler, "wb") as f:
            f.write(b"\0" * max(0, free_bytes(mnt) - 1024 * 1024))
        ch.log("tmpfs: %d bytes free after the filler" % free_bytes(mnt))

        sent = 100
        errs = []
        for _ in range(40):
            c.send_many([line("fill", sent + i) for i in range(200)])
            sent += 200
            ans = c.wait_answers(timeout=60, alive=h.check_alive)
            errs = [a for a in ans if a[0] == "ERR"]
            if errs:
                break
        ch.check(errs, "no ERR after filling the disk (%d lines sent)" % sent)
        ch.check(all(e[1].startswith("disk full") for e in errs), "ERR reasons: %r" % errs[:3])
        # Take the last bytes too. A small commit may still fit in WAL space SQLite already
        # holds (that commit is real, and its OK is checked at the end like every other);
        # what must not happen is an OK for a record that was not committed, or a crash.
        fd = os.open(filler, os.O_WRONLY | os.O_APPEND)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError:
            pass
        finally:
            os.close(fd)
        n_err = len(errs)
        for _ in range(5):
            c.send_many([line("more", i) for i in range(50)])
            ans = c.wait_answers(timeout=60, alive=h.check_alive)
            n_err += sum(1 for a in ans[-50:] if a[0] == "ERR")
        h.check_alive()
        text = agent.proc.log_text()
        n_full, n_again = text.count("is full; sources are told ERR"), text.count("commits work again")
        ch.check(n_full >= 1 and n_full <= n_again + 1,
                 "disk-full state logged %d times for %d recoveries: not once per state change"
                 % (n_full, n_again))
        ch.check(n_full < n_err, "a log line per refused record (%d lines, %d ERR)" % (n_full, n_err))
        acked_before = len(c.acked())
        ch.log("disk full after %d OK answers" % acked_before)

        os.unlink(filler)
        ok = []
        deadline = time.monotonic() + 30 * ch.SCALE
        while time.monotonic() < deadline:
            c.send_many([line("after", i) for i in range(20)])
            ans = c.wait_answers(timeout=60, alive=h.check_alive)
            ok = [a for a in ans[-20:] if a[0] == "OK"]
            if len(ok) == 20:
                break
            time.sleep(0.5)
        ch.check(len(ok) == 20, "records still refused after space returned")
        ch.check("commits work again" in agent.proc.log_text(), "recovery not logged")

        recv.start()
        h.wait(lambda: agent.segment_count() == 0, timeout=120, what="spool to drain")
        ch.assert_stored_exactly_once(recv, agent, c.acked(), sent=c.sent)
        c.close()
        ch.check(agent.stop() == 0, "agent did not exit 0")
        ch.check(recv.stop() == 0, "receiver did not exit 0")
    finally:
        if agent is not None and agent.proc.running():
            agent.kill9()
        subprocess.run(["umount", "-l", mnt], capture_output=True)


if __name__ == "__main__":
    ch.run(main, "i_disk_full")

#!/usr/bin/env python3
"""B4 (agent memory through a 1M-record backlog) and B6 (drain under live load).

Each run has up to three phases, each with its own temp dir, receiver and agent (both bare,
never under CISTERN_TEST_WRAPPER), on loopback with mTLS over HTTPS:

  quiet (B4, and B6's baseline): the agent starts with its receiver down; 1 s later it is
      sampled idle with an empty spool (the floor: the same binary with the same libraries
      mapped, doing nothing). Then --backlog records (e2e.py's 100-byte payload) are
      pipelined into its TCP socket input and every "OK" is awaited (fill); the receiver is
      started and the backlog drains (drain); once the agent's spool is empty it is sampled
      for 10 s more (idle: the median of the last 5 s). /proc/<pid>/status (VmRSS, RssAnon,
      RssFile) of the agent, and of the receiver once it runs, is read every 50 ms.
  live (B6): the same fill; then the receiver starts, and a live feeder sends 1,000
      records/s (bursts of 10 records every 10 ms, on a schedule that does not drift) on a
      second connection, to a second TCP input named "live" (the records' stream), for the
      whole drain and 10 s past it. Both inputs have the default priority (normal).
  live-prio (B6): the same, with the live input at priority high (the backlog's stays
      normal): how a user gets low latency for live data during a drain.

Drain time runs from the receiver's launch (the live feeder starts at the same moment) until
every backlog record (by its seq, from the OK answers) is in the receiver's `records` table;
the receiver's start-up and the agent's reconnect back-off (forward.retry: up to 1 s here)
are inside it, so the time to the first stored record, and the rate from there, are printed
too. A poller reads the receiver's SQLite store every 20 ms: a live record's latency is the
time the poller first sees it stored minus the time its burst was sent (resolution: the
20 ms poll plus the query). Live records are split by send time: sent while the backlog
drained, or after. Every live record must be stored exactly
once, every backlog record stored, or the script exits non-zero.

Configuration: the agent's own spool defaults (commit_interval 200ms, 5000 records or 1 MiB
per commit, sync normal); the harness's forward settings (batch 5000 records / 1 MiB /
max_delay 200ms, in_flight 4, retry 200ms..1s); log level warn.

Baselines, measured in the same run: for B4 the floor above (ratio = figure / floor); for
B6's drain rate, the quiet drain (no live load); for live latency during the drain, the
latency of live records sent after it.

Usage: bench/backlog.py --build BUILD [--only memory|drain] [--backlog 1000000] [--runs 3]
"""
import argparse
import heapq
import os
import re
import socket
import statistics
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests", "integration"))
import cistern_harness as ch  # noqa: E402
from e2e import payload  # noqa: E402

AGENT_ID = "gw-bench"
SAMPLE_S = 0.05      # /proc/<pid>/status sampling period
POLL_S = 0.02        # receiver store polling period (latency resolution)
IDLE_S = 10.0        # sampling after the spool is empty
LIVE_RATE = 1000     # live records per second ...
LIVE_BURST = 10      # ... sent as bursts of this many every LIVE_BURST / LIVE_RATE s
LIVE_AFTER_S = 10.0  # live feed kept up this long after the backlog drained
WAIT_S = 900.0       # bound on every wait (fill, drain, answers)


class BenchError(Exception):
    pass


def need(cond, msg):
    if not cond:
        raise BenchError(msg)


# ---------------------------------------------------------------------------------------
# /proc sampling

STATUS_FIELDS = ("VmRSS", "RssAnon", "RssFile")


def proc_status(pid):
    """{VmRSS, RssAnon, RssFile} in KiB from /proc/<pid>/status, or None once it is gone."""
    out = {}
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in STATUS_FIELDS:
                    out[k] = int(v.split()[0])
    except (OSError, ValueError):
        return None
    return out if len(out) == len(STATUS_FIELDS) else None


def exe_of(pid):
    try:
        return os.path.realpath("/proc/%d/exe" % pid)
    except OSError:
        return None


class MemSampler(threading.Thread):
    """Reads /proc/<pid>/status of every watched process every SAMPLE_S seconds; each sample
    is tagged with the phase the main thread set. samples: [(t, phase, name, fields)]."""

    def __init__(self):
        super().__init__(daemon=True)
        self.pids = {}
        self.phase = "start"
        self.samples = []
        self.lock = threading.Lock()
        self.stop_flag = threading.Event()

    def watch(self, name, proc, binary):
        """Watch PROC (a harness Proc run bare): check its pid is BINARY itself, not a wrapper."""
        pid = proc.pid
        need(pid is not None and proc.running(), "%s is not running" % name)
        exe = exe_of(pid)
        need(exe == os.path.realpath(binary),
             "pid %d of %s runs %s, not %s: a wrapper?" % (pid, name, exe, binary))
        with self.lock:
            self.pids[name] = pid

    def set_phase(self, phase):
        with self.lock:
            self.phase = phase

    def sample_now(self):
        t = time.monotonic()
        with self.lock:
            pids, phase = dict(self.pids), self.phase
        got = []
        for name, pid in pids.items():
            st = proc_status(pid)
            if st is not None:
                got.append((t, phase, name, st))
        with self.lock:
            self.samples.extend(got)
        return got

    def run(self):
        nxt = time.monotonic()
        while not self.stop_flag.is_set():
            self.sample_now()
            nxt += SAMPLE_S
            self.stop_flag.wait(max(0.0, nxt - time.monotonic()))

    def stop(self):
        self.stop_flag.set()
        self.join(5)

    def values(self, name, field, phases=None, since=None):
        with self.lock:
            return [s[3][field] for s in self.samples
                    if s[2] == name and (phases is None or s[1] in phases)
                    and (since is None or s[0] >= since)]


# ---------------------------------------------------------------------------------------
# Feeding the agent

def fill(port, n, alive):
    """Pipeline N payload lines into the socket input at PORT, as fast as one sendall goes,
    and wait for every answer. Returns (seconds, the seqs the OK answers gave, in order)."""
    data = b"".join(payload(i) + b"\n" for i in range(n))
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.settimeout(None)
    chunks = []
    got = [0]
    done = threading.Event()

    def reader():
        try:
            while got[0] < n:
                d = s.recv(1 << 20)
                if not d:
                    break
                chunks.append(d)
                got[0] += d.count(b"\n")
        except OSError:
            pass
        done.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    t0 = time.monotonic()
    s.sendall(data)
    deadline = t0 + WAIT_S
    while not done.wait(0.5):
        alive()
        need(time.monotonic() < deadline, "fill: %d of %d answers after %.0f s"
             % (got[0], n, WAIT_S))
    secs = time.monotonic() - t0
    s.close()
    t.join(5)
    lines = b"".join(chunks).split(b"\n")
    need(lines[-1] == b"", "fill: answer stream ends mid-line")
    lines.pop()
    need(len(lines) == n, "fill: %d answers for %d records (connection closed?)"
         % (len(lines), n))
    seqs = []
    for ln in lines:
        need(ln.startswith(b"OK "), "fill: a record was answered %r" % ln[:80])
        seqs.append(int(ln[3:]))
    need(all(a < b for a, b in zip(seqs, seqs[1:])), "fill: OK seqs are not increasing")
    return secs, seqs


def live_payload(k):
    # a distinct marker ("live"), the same 100-byte size as the backlog's records
    return (b'{"live":%09d,"sensor":"s-live","temp_c":21.50,"humidity":45.0,'
            b'"pad":"xxxxxxxxxxxxxxxxxxxxxxxx"}' % k)


LIVE_RX = re.compile(rb'^\{"live":(\d{9}),')


class LiveFeeder(threading.Thread):
    """LIVE_RATE records/s to the socket input at PORT: LIVE_BURST records every
    LIVE_BURST/LIVE_RATE s on an absolute schedule (a late burst is sent at once, the next
    ones keep the schedule). sent_at[k] = monotonic time just before the sendall of record
    k's burst. A reader thread keeps every answer; answered_seqs is fed to the poller."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.settimeout(None)
        self.sent_at = []
        self.answers = []  # b"OK <seq>" / b"ERR ..." lines, in order
        self.lock = threading.Lock()
        self.new_seqs = []  # answered OK seqs the poller has not taken yet
        self.stop_flag = threading.Event()
        self.error = None
        self.eof = False
        self.rt = threading.Thread(target=self._reader, daemon=True)

    def _reader(self):
        buf = b""
        try:
            while True:
                d = self.sock.recv(65536)
                if not d:
                    break
                buf += d
                lines = buf.split(b"\n")
                buf = lines.pop()
                seqs = [int(ln[3:]) for ln in lines if ln.startswith(b"OK ")]
                with self.lock:
                    self.answers.extend(lines)
                    self.new_seqs.extend(seqs)
        except (OSError, ValueError) as e:
            self.error = self.error or e
        self.eof = True

    def run(self):
        self.rt.start()
        period = LIVE_BURST / LIVE_RATE
        t0 = time.monotonic()
        b = 0
        try:
            while not self.stop_flag.is_set():
                wait = t0 + b * period - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                k0 = len(self.sent_at)
                data = b"".join(live_payload(k0 + i) + b"\n" for i in range(LIVE_BURST))
                now = time.monotonic()
                self.sent_at.extend([now] * LIVE_BURST)
                self.sock.sendall(data)
                b += 1
        except OSError as e:
            self.error = e

    def take_seqs(self):
        with self.lock:
            s, self.new_seqs = self.new_seqs, []
            return s

    def finish(self, alive):
        """Stop sending, wait for every answer (all must be OK), close."""
        self.stop_flag.set()
        self.join(30)
        need(not self.is_alive(), "live feeder did not stop")
        need(self.error is None, "live feeder: %r" % (self.error,))
        n = len(self.sent_at)
        deadline = time.monotonic() + WAIT_S
        while True:
            with self.lock:
                got = len(self.answers)
            if got >= n:
                break
            need(not self.eof, "live connection closed after %d of %d answers" % (got, n))
            need(time.monotonic() < deadline, "live: %d of %d answers" % (got, n))
            alive()
            time.sleep(0.05)
        bad = [a for a in self.answers if not a.startswith(b"OK ")]
        need(not bad, "live: %d records not answered OK, e.g. %r" % (len(bad), bad[:3]))
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.rt.join(5)
        self.sock.close()
        return n


# ---------------------------------------------------------------------------------------
# Watching the receiver's store

class StorePoller(threading.Thread):
    """Every POLL_S seconds, reads the receiver's store (read-only):
    - backlog: walks the backlog's seqs (sorted) against the stored ones from the lowest not
      yet seen, so each poll costs about the rows stored since the last one; drained_at is
      the time of the poll that found the last one.
    - live: the rows from the lowest live seq not yet seen (answered, or above every seq
      answered so far) on; first_seen[k] = time of the poll that first saw live record k."""

    def __init__(self, receiver, backlog_seqs, live_feeder=None):
        super().__init__(daemon=True)
        self.r = receiver
        self.seqs = backlog_seqs
        self.i = 0
        self.feeder = live_feeder
        self.live_lo = backlog_seqs[-1] + 1  # every live seq lies above the backlog's
        self.pending_live = []               # heap of answered live seqs not seen yet
        self.seen_live_seqs = set()
        self.max_answered = backlog_seqs[-1]
        self.first_seen = {}
        self.first_row_at = None
        self.drained_at = None
        self.epoch = None  # as the store holds it (the query must compare like types)
        self.stop_flag = threading.Event()
        self.error = None

    def _backlog(self, con, now):
        while self.i < len(self.seqs):
            rows = con.execute("SELECT seq FROM records WHERE agent_id=? AND epoch=? AND seq>=? "
                               "ORDER BY seq LIMIT 50000",
                               (AGENT_ID, self.epoch, self.seqs[self.i])).fetchall()
            i0 = self.i
            for (s,) in rows:
                if self.i >= len(self.seqs) or s > self.seqs[self.i]:
                    break
                if s == self.seqs[self.i]:
                    self.i += 1
            if self.i == i0 or len(rows) < 50000:
                break
        if self.i == len(self.seqs) and self.drained_at is None:
            self.drained_at = now

    def _live(self, con, now):
        for s in self.feeder.take_seqs():
            heapq.heappush(self.pending_live, s)
            self.max_answered = max(self.max_answered, s)
        while self.pending_live and self.pending_live[0] in self.seen_live_seqs:
            self.seen_live_seqs.discard(heapq.heappop(self.pending_live))
        # A live record not seen yet is answered (in the heap) or above every answered seq.
        lo = self.pending_live[0] if self.pending_live else self.max_answered + 1
        for s, p in con.execute("SELECT seq, payload FROM records WHERE agent_id=? AND epoch=? "
                                "AND seq>=? ORDER BY seq", (AGENT_ID, self.epoch, lo)):
            m = LIVE_RX.match(bytes(p))
            if not m:
                continue
            k = int(m.group(1))
            if k not in self.first_seen:
                self.first_seen[k] = now
            self.seen_live_seqs.add(s)

    def poll_once(self, con):
        now = time.monotonic()
        if self.epoch is None:
            row = con.execute("SELECT epoch FROM records WHERE agent_id=? LIMIT 1",
                              (AGENT_ID,)).fetchone()
            if row is None:
                return
            self.epoch = row[0]
            self.first_row_at = now
        self._backlog(con, now)
        if self.feeder is not None:
            self._live(con, now)

    def run(self):
        con = None
        try:
            nxt = time.monotonic()
            while not self.stop_flag.is_set():
                if con is None and os.path.exists(self.r.db_path):
                    con = self.r.db()
                if con is not None:
                    self.poll_once(con)
                nxt += POLL_S
                self.stop_flag.wait(max(0.0, nxt - time.monotonic()))
        except Exception as e:  # surfaced by the main thread
            self.error = e
        finally:
            if con is not None:
                con.close()

    def check(self):
        need(self.error is None, "store poller: %r" % (self.error,))

    def stop(self):
        self.stop_flag.set()
        self.join(10)


def wait_for(pred, what, alive, timeout=WAIT_S, interval=0.05):
    deadline = time.monotonic() + timeout
    while not pred():
        alive()
        need(time.monotonic() < deadline, "timed out after %.0f s waiting for %s"
             % (timeout, what))
        time.sleep(interval)


# ---------------------------------------------------------------------------------------
# One phase

def make_agent(h, r, inputs=None):
    # the agent's own spool defaults: drop the harness's commit settings
    spool = {"sync": None, "commit_interval": None, "commit_max_records": None,
             "commit_max_bytes": None}
    a = ch.Agent(h, "agent", AGENT_ID, r, unix_socket=False, log_level="warn", inputs=inputs,
                 extra={"spool": spool}, wrapper=[], tcp=inputs is None)
    return a


def quiet_phase(build, n):
    """B4 and B6's baseline. Returns a dict of figures."""
    h = ch.Harness("bench-b4", agent_bin=os.path.join(build, "bin", "cistern-agent"),
                   receiver_bin=os.path.join(build, "bin", "cistern-receiver"))
    sampler = MemSampler()
    poller = None
    try:
        r = ch.Receiver(h, log_level="warn", wrapper=[])
        a = make_agent(h, r).start()
        sampler.watch("agent", a.proc, h.agent_bin)
        sampler.set_phase("floor")
        sampler.start()
        time.sleep(1.0)
        # the floor: 1 s after start-up, spool empty, receiver down
        got = sampler.sample_now()
        need(len(got) == 1 and got[0][2] == "agent", "agent floor sample missing")
        floor = got[0][3]
        sampler.set_phase("fill")
        fill_s, seqs = fill(a.tcp_port, n, h.check_alive)
        sampler.set_phase("drain")
        t0 = time.monotonic()
        r.start()
        sampler.watch("receiver", r.proc, h.receiver_bin)
        poller = StorePoller(r, seqs)
        poller.start()
        wait_for(lambda: poller.drained_at is not None or poller.error is not None,
                 "the backlog to be stored (%d records)" % n, h.check_alive)
        poller.check()
        drain_s = poller.drained_at - t0
        first_s = poller.first_row_at - t0
        poller.stop()
        # idle: once the agent's spool is empty (every segment acknowledged and deleted)
        wait_for(lambda: a.pending_records() == 0, "the agent's spool to empty", h.check_alive,
                 interval=0.2)
        sampler.set_phase("idle")
        t_idle = time.monotonic()
        time.sleep(IDLE_S)
        h.check_alive()
        sampler.stop()
        stored = r.count(AGENT_ID)
        need(stored == n, "%d records stored for %d sent" % (stored, n))
        agent_anon = lambda ph: sampler.values("agent", "RssAnon", ph)  # noqa: E731
        idle = sampler.values("agent", "RssAnon", ("idle",), since=t_idle + IDLE_S / 2)
        need(idle, "no idle samples")
        return {
            "floor_rssanon": floor["RssAnon"], "floor_vmrss": floor["VmRSS"],
            "floor_rssfile": floor["RssFile"],
            "fill_rssanon_peak": max(agent_anon(("fill",))),
            "drain_rssanon_peak": max(agent_anon(("drain",))),
            "idle_rssanon": statistics.median(idle),
            "idle_vmrss": statistics.median(
                sampler.values("agent", "VmRSS", ("idle",), since=t_idle + IDLE_S / 2)),
            "vmrss_peak": max(sampler.values("agent", "VmRSS")),
            "rssfile_peak": max(sampler.values("agent", "RssFile")),
            "recv_rssanon_peak": max(sampler.values("receiver", "RssAnon")),
            "recv_vmrss_peak": max(sampler.values("receiver", "VmRSS")),
            "fill_s": fill_s, "fill_rate": n / fill_s,
            "drain_s": drain_s, "drain_rate": n / drain_s, "first_s": first_s,
            "xfer_rate": n / max(1e-3, drain_s - first_s),
            "samples": len(sampler.samples),
        }
    except BaseException:
        h.dump_logs(20)
        raise
    finally:
        sampler.stop()
        if poller is not None:
            poller.stop()
        h.cleanup()


def pct(vals, p):
    """The p-th percentile (nearest rank) of vals, in ms."""
    v = sorted(vals)
    k = max(0, min(len(v) - 1, int(-(-p * len(v) // 100)) - 1))
    return v[k] * 1000.0


def live_phase(build, n, prio):
    """B6: drain with live load; prio: the live input at priority high."""
    h = ch.Harness("bench-b6", agent_bin=os.path.join(build, "bin", "cistern-agent"),
                   receiver_bin=os.path.join(build, "bin", "cistern-receiver"))
    poller = feeder = None
    try:
        r = ch.Receiver(h, log_level="warn", wrapper=[])
        bport, lport = ch.free_port(), ch.free_port()
        while lport == bport:
            lport = ch.free_port()
        inputs = [{"name": "backlog", "type": "socket", "priority": "normal",
                   "listen": "127.0.0.1:%d" % bport},
                  {"name": "live", "type": "socket", "priority": "high" if prio else "normal",
                   "listen": "127.0.0.1:%d" % lport}]
        a = make_agent(h, r, inputs)
        a.tcp_port = bport  # what Agent.wait_ready probes
        a.start()
        _fill_s, seqs = fill(bport, n, h.check_alive)
        feeder = LiveFeeder(lport)
        t0 = time.monotonic()
        feeder.start()
        r.start()
        poller = StorePoller(r, seqs, feeder)
        poller.start()
        wait_for(lambda: poller.drained_at is not None or poller.error is not None,
                 "the backlog to be stored (%d records)" % n, h.check_alive)
        poller.check()
        t_drained = poller.drained_at
        time.sleep(LIVE_AFTER_S)
        nlive = feeder.finish(h.check_alive)
        wait_for(lambda: len(poller.first_seen) >= nlive or poller.error is not None,
                 "all %d live records to be stored" % nlive, h.check_alive)
        poller.check()
        poller.stop()
        # exactly once: every live record stored once, under the live stream; the backlog too
        con = r.db()
        try:
            live_rows = con.execute("SELECT payload, stream FROM records WHERE agent_id=? "
                                    "AND seq>?", (AGENT_ID, seqs[-1])).fetchall()
            nstored = con.execute("SELECT count(*) FROM records WHERE agent_id=?",
                                  (AGENT_ID,)).fetchone()[0]
        finally:
            con.close()
        ks = []
        for p, stream in live_rows:
            m = LIVE_RX.match(bytes(p))
            need(m is not None and stream == "live", "a stored record above the backlog is not "
                 "a live one: stream %r payload %r" % (stream, bytes(p)[:60]))
            ks.append(int(m.group(1)))
        need(len(ks) == len(set(ks)), "%d live records stored more than once"
             % (len(ks) - len(set(ks))))
        need(sorted(ks) == list(range(nlive)), "live records stored: %d of %d sent"
             % (len(set(ks)), nlive))
        need(nstored == n + nlive, "%d records stored, %d backlog + %d live sent"
             % (nstored, n, nlive))
        during, after = [], []
        for k, ts in enumerate(feeder.sent_at):
            lat = poller.first_seen[k] - ts
            (during if ts < t_drained else after).append(lat)
        need(during and after, "no live records sent %s the drain"
             % ("during" if not during else "after"))
        drain_s = t_drained - t0
        first_s = poller.first_row_at - t0
        return {"drain_s": drain_s, "drain_rate": n / drain_s, "first_s": first_s,
                "xfer_rate": n / max(1e-3, drain_s - first_s), "live": nlive,
                "during_n": len(during), "after_n": len(after),
                "p50": pct(during, 50), "p99": pct(during, 99), "max": max(during) * 1000.0,
                "a_p50": pct(after, 50), "a_p99": pct(after, 99), "a_max": max(after) * 1000.0}
    except BaseException:
        h.dump_logs(20)
        raise
    finally:
        if feeder is not None:
            feeder.stop_flag.set()
        if poller is not None:
            poller.stop()
        h.cleanup()


# ---------------------------------------------------------------------------------------

def mib(kib):
    return kib / 1024.0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog=__doc__.split("\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default="build", help="build dir (BUILD/bin)")
    ap.add_argument("--backlog", type=int, default=1000000, help="backlog records")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", choices=("memory", "drain"),
                    help="memory: B4 only; drain: B6 only (its quiet-drain baseline still runs)")
    args = ap.parse_args()
    build = os.path.abspath(args.build)
    for b in ("cistern-agent", "cistern-receiver"):
        if not os.access(os.path.join(build, "bin", b), os.X_OK):
            sys.exit("backlog.py: %s/bin/%s not found: build first" % (build, b))
    if args.backlog < 1 or args.runs < 1:
        sys.exit("backlog.py: --backlog and --runs must be at least 1")
    do_mem = args.only in (None, "memory")
    do_drain = args.only in (None, "drain")
    n = args.backlog
    print("backlog %d records (100 B); live feed %d rec/s in bursts of %d every %.0f ms; "
          "store polled every %.0f ms; memory sampled every %.0f ms" % (
              n, LIVE_RATE, LIVE_BURST, 1000.0 * LIVE_BURST / LIVE_RATE, POLL_S * 1000,
              SAMPLE_S * 1000), flush=True)
    Q, L, P = [], [], []
    try:
        for run in range(1, args.runs + 1):
            q = quiet_phase(build, n)
            Q.append(q)
            print("run %d quiet: floor RssAnon %d KiB VmRSS %d KiB (RssFile %d); "
                  "fill %.1f s (%.0f rec/s) RssAnon peak %d KiB; "
                  "drain %.2f s (%.0f rec/s; first record stored after %.2f s, %.0f rec/s from "
                  "there) RssAnon peak %d KiB; idle RssAnon %d KiB VmRSS %d KiB; "
                  "agent VmRSS peak %d KiB (RssFile peak %d); "
                  "receiver RssAnon peak %d KiB VmRSS peak %d KiB; %d samples" % (
                      run, q["floor_rssanon"], q["floor_vmrss"], q["floor_rssfile"],
                      q["fill_s"], q["fill_rate"], q["fill_rssanon_peak"],
                      q["drain_s"], q["drain_rate"], q["first_s"], q["xfer_rate"],
                      q["drain_rssanon_peak"], q["idle_rssanon"], q["idle_vmrss"],
                      q["vmrss_peak"], q["rssfile_peak"],
                      q["recv_rssanon_peak"], q["recv_vmrss_peak"], q["samples"]), flush=True)
            if not do_drain:
                continue
            for prio, out in ((False, L), (True, P)):
                x = live_phase(build, n, prio)
                out.append(x)
                print("run %d live (%s): drain %.2f s (%.0f rec/s; first stored after "
                      "%.2f s, %.0f rec/s from there); %d live records; "
                      "during the drain (%d): p50 %.0f ms p99 %.0f ms max %.0f ms; "
                      "after it (%d): p50 %.0f ms p99 %.0f ms max %.0f ms" % (
                          run, "live input priority high" if prio else "default priorities",
                          x["drain_s"], x["drain_rate"], x["first_s"], x["xfer_rate"],
                          x["live"], x["during_n"], x["p50"], x["p99"], x["max"],
                          x["after_n"], x["a_p50"], x["a_p99"], x["a_max"]), flush=True)
    except (BenchError, ch.TestFailure) as e:
        sys.exit("backlog.py: FAILED: %s" % e)

    def med(rows, k):
        return statistics.median(r[k] for r in rows)

    results = []
    print("median of %d runs:" % args.runs)
    if do_mem:
        fl, flv = med(Q, "floor_rssanon"), med(Q, "floor_vmrss")
        fill_pk, drain_pk, idle = (med(Q, "fill_rssanon_peak"), med(Q, "drain_rssanon_peak"),
                                   med(Q, "idle_rssanon"))
        vm_pk = med(Q, "vmrss_peak")
        print("  B4 agent RssAnon: floor %.1f MiB (1 s after start, empty spool); peak during "
              "fill %.1f MiB, during drain %.1f MiB (target <= 16 MiB: %s); idle %.1f MiB "
              "(target <= 4 MiB: %s)" % (
                  mib(fl), mib(fill_pk), mib(drain_pk),
                  "met" if max(fill_pk, drain_pk) <= 16384 else "NOT met", mib(idle),
                  "met" if idle <= 4096 else "NOT met"))
        print("  B4 agent VmRSS: floor %.1f MiB, peak %.1f MiB; receiver peak RssAnon %.1f MiB, "
              "VmRSS %.1f MiB; quiet drain %.2f s" % (
                  mib(flv), mib(vm_pk), mib(med(Q, "recv_rssanon_peak")),
                  mib(med(Q, "recv_vmrss_peak")), med(Q, "drain_s")))
        results += [
            ("B4", "agent_rssanon_floor_kib", fl, None),
            ("B4", "agent_rssanon_fill_peak_kib", fill_pk, fill_pk / fl),
            ("B4", "agent_rssanon_drain_peak_kib", drain_pk, drain_pk / fl),
            ("B4", "agent_rssanon_peak_kib", max(fill_pk, drain_pk), max(fill_pk, drain_pk) / fl),
            ("B4", "agent_rssanon_idle_kib", idle, idle / fl),
            ("B4", "agent_vmrss_floor_kib", flv, None),
            ("B4", "agent_vmrss_peak_kib", vm_pk, vm_pk / flv),
            ("B4", "receiver_rssanon_peak_kib", med(Q, "recv_rssanon_peak"), None),
            ("B4", "receiver_vmrss_peak_kib", med(Q, "recv_vmrss_peak"), None),
            ("B4", "drain_s", med(Q, "drain_s"), None),
        ]
    if do_drain:
        qd = med(Q, "drain_rate")
        print("  B6 quiet drain (baseline): %.0f rec/s" % qd)
        for tag, rows, label in (("", L, "default priorities"),
                                 ("prio_", P, "live input priority high")):
            dr = med(rows, "drain_rate")
            print("  B6 %s: drain %.0f rec/s (%.2fx the quiet drain); live latency during the "
                  "drain p50 %.0f ms p99 %.0f ms max %.0f ms; after it p50 %.0f ms p99 %.0f ms "
                  "max %.0f ms (resolution: %.0f ms poll)" % (
                      label, dr, dr / qd, med(rows, "p50"), med(rows, "p99"), med(rows, "max"),
                      med(rows, "a_p50"), med(rows, "a_p99"), med(rows, "a_max"),
                      POLL_S * 1000))
            results.append(("B6", tag + "drain_rec_per_s", dr, dr / qd))
            for k in ("p50", "p99", "max"):
                during, after = med(rows, k), med(rows, "a_" + k)
                results.append(("B6", "%slive_%s_ms" % (tag, k), during, during / after))
            for k in ("p50", "p99", "max"):
                results.append(("B6", "%slive_after_%s_ms" % (tag, k), med(rows, "a_" + k), None))
        results.append(("B6", "quiet_drain_rec_per_s", qd, None))
    print("  ratios: B4 to the agent's own floor (same run); B6 drain to the quiet drain; B6 "
          "live latency during the drain to that after it")
    for b, m, v, ratio in results:
        print("RESULT %s %s %s%s" % (b, m, "%.0f" % v if abs(v) >= 100 else "%.3g" % v,
                                     "" if ratio is None else " ratio=%.2f" % ratio))


if __name__ == "__main__":
    main()

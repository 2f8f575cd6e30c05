#!/usr/bin/env python3
"""B7: CPU cost of the agent, in instructions per record.

The agent runs under `valgrind --tool=callgrind` (or `perf stat`, --tool perf, where the
machine's PMU counts instructions) through the harness (Harness.add_proc wrapper=), with a
real receiver run bare, on loopback with mTLS over HTTPS:

  e2e:     --records records (e2e.py's 100-byte payload) are pipelined into the agent's TCP
           socket input; every "OK" is awaited, every record must be stored at the receiver
           and the agent's spool must be empty (every segment acknowledged and deleted); then
           the agent is stopped (SIGTERM) and its instructions, all threads, are read from
           callgrind's `totals:` line. This is ingest + forwarding (the socket input, group
           commits, zstd, the spool, batch encoding, ECDSA signing, TLS, HTTP, acks, deletes).
  ingest:  the same with the receiver never started: socket input to spool only.
  floors:  after each, the same set-up started with no records, kept up about as long as the
           measured run took, and stopped: start-up (config, TLS contexts, SQLite, keys) and
           idle timers. A floor's instructions are subtracted from its run before dividing by
           the record count.

Baseline, measured in the same run and first: bench/baseline_sqlite plain (the naive design:
one SQLite row per record, 1,000-row transactions, WAL; B1's baseline) under the same tool,
at N and at 1 record, per row = (I(N) - I(1)) / (N - 1). Under callgrind the cost of
formatting its payloads (snprintf, inclusive) is taken out first: the agent gets ready-made
bytes. Under perf it cannot be and stays in (said in the output).

The baseline's count is deterministic. The agent's is not quite: how records group into
commits and batches depends on timing (commit_interval, batch max_delay), and per record it
varied by 3-6% between runs on the 2-core development machine; hence --runs 3 by default
(about 40 s a run there) and the median. Also printed: the top functions by inclusive cost
(callgrind_annotate --inclusive=yes) of the e2e and ingest runs, with generic frames (thread
start, libc start-up, unresolved ld.so addresses) left out; their Ir/record is not
floor-subtracted.

Usage: bench/cpu_cost.py --build BUILD [--records 100000] [--runs 3] [--tool callgrind|perf]
"""
import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests", "integration"))
import cistern_harness as ch  # noqa: E402
from backlog import BenchError, fill, need, wait_for  # noqa: E402

AGENT_ID = "gw-bench"
START_TIMEOUT = 300.0  # an agent under callgrind starts slowly
STOP_TIMEOUT = 600.0
# thread and process start-up frames, ld.so (start-up: in the floor), unresolved addresses
GENERIC = re.compile(r"\(below main\)|__libc_start|start_thread|\bclone3?\b|^\?\?\?:0x|"
                     r"\[ld-linux")


# ---------------------------------------------------------------------------------------
# Tools: how a process is wrapped, and how its count is read

class Callgrind:
    name = "callgrind"
    event = "Ir (instructions)"

    def __init__(self):
        self.valgrind = shutil.which("valgrind")
        self.annotate = shutil.which("callgrind_annotate")
        if not self.valgrind or not self.annotate:
            raise BenchError("valgrind and callgrind_annotate are needed "
                             "(apt-get install valgrind)")

    def wrapper(self, out):
        return [self.valgrind, "--tool=callgrind", "--callgrind-out-file=" + out]

    def target_pid(self, proc, binary):
        # valgrind runs the program in its own process (/proc/pid/exe is valgrind's tool)
        return proc.pid

    def total(self, out):
        with open(out) as f:
            text = f.read()
        m = re.search(r"^totals:\s+(\d+)", text, re.M) or re.search(r"^summary:\s+(\d+)",
                                                                      text, re.M)
        need(m is not None, "%s: no totals:/summary: line" % out)
        return int(m.group(1))

    def functions(self, out):
        """[(inclusive Ir, 'function [object]')] in callgrind_annotate's order."""
        r = subprocess.run([self.annotate, "--inclusive=yes", "--auto=no", out],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)
        need(r.returncode == 0, "callgrind_annotate failed: %s" % r.stderr.decode()[-500:])
        rows = []
        for line in r.stdout.decode("utf-8", "replace").splitlines():
            m = re.match(r"^\s*([\d,]+) \(\s*[\d.]+%\)\s+(.+)$", line)
            if not m or "PROGRAM TOTALS" in m.group(2):
                continue
            where = m.group(2)
            obj = re.search(r"\[(.*)\]\s*$", where)
            fn = re.sub(r"\s*\[.*\]\s*$", "", where)
            fn = fn.rsplit(":", 1)[-1] if ":" in fn else fn
            if fn.startswith("0x"):
                fn = where.split(" [")[0]
            rows.append((int(m.group(1).replace(",", "")), fn,
                         os.path.basename(obj.group(1)) if obj else None))
        # callgrind_annotate may list a function twice, once without its object (under its
        # absolute source path, with a few instructions more): keep the entry naming the object
        named = {fn for v, fn, obj in rows if obj}
        return [(v, "%s [%s]" % (fn, obj) if obj else fn) for v, fn, obj in rows
                if obj or fn not in named]


class Perf:
    name = "perf"

    def __init__(self, event):
        self.perf = shutil.which("perf")
        self.event = event
        if not self.perf:
            raise BenchError("perf is not installed")
        with tempfile.NamedTemporaryFile(prefix="cistern-perf-") as f:
            r = subprocess.run(self.wrapper(f.name) + ["true"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, timeout=60)
            text = open(f.name).read()
        if r.returncode != 0 or self._value(text) is None:
            raise BenchError("`perf stat -e %s true` does not count here (%s): no PMU access "
                             "(a VM, or kernel.perf_event_paranoid); use --tool callgrind"
                             % (event, (text.strip().splitlines() or ["no output"])[-1]))

    def wrapper(self, out):
        return [self.perf, "stat", "-x", ",", "-e", self.event, "-o", out, "--"]

    def target_pid(self, proc, binary):
        """perf runs the program as its child: the agent is that child."""
        path = "/proc/%d/task/%d/children" % (proc.pid, proc.pid)
        wait_for(lambda: open(path).read().split(), "perf to start its workload",
                 proc.check_alive, timeout=60)
        pid = int(open(path).read().split()[0])
        exe = os.path.realpath("/proc/%d/exe" % pid)
        need(exe == os.path.realpath(binary), "perf's child %d runs %s, not %s"
             % (pid, exe, binary))
        return pid

    def _value(self, text):
        for line in text.splitlines():
            f = line.split(",")
            if len(f) > 2 and f[2].startswith(self.event.split(":")[0]):
                try:
                    return float(f[0])
                except ValueError:
                    return None
        return None

    def total(self, out):
        with open(out) as f:
            v = self._value(f.read())
        need(v is not None, "%s: perf counted nothing for %s" % (out, self.event))
        return v

    def functions(self, out):
        return []


# ---------------------------------------------------------------------------------------

def baseline(build, tool, n):
    """Instructions per row of baseline_sqlite plain, measured at n and at 1 record."""
    exe = os.path.join(build, "bench", "baseline_sqlite")
    need(os.access(exe, os.X_OK), "%s not found: build first" % exe)
    d = tempfile.mkdtemp(prefix="cistern-b7-", dir="/var/tmp")  # a disk: it refuses tmpfs
    try:
        got = {}
        fmt = {}
        for k in (n, 1):
            out = os.path.join(d, "base-%d.out" % k)
            r = subprocess.run(tool.wrapper(out) + [exe, os.path.join(d, "b-%d.db" % k), str(k),
                                                    "plain"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=3600)
            need(r.returncode == 0, "baseline_sqlite %d under %s exited %d: %s"
                 % (k, tool.name, r.returncode, r.stderr.decode()[-800:]))
            need(("rows=%d " % k) in r.stdout.decode(), "baseline_sqlite: %r"
                 % r.stdout.decode())
            got[k] = tool.total(out)
            fmt[k] = sum(v for v, fn in tool.functions(out) if fn.startswith("snprintf "))
        return ((got[n] - fmt[n]) - (got[1] - fmt[1])) / (n - 1), (fmt[n] - fmt[1]) / (n - 1)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def agent_run(build, tool, mode, n, duration=None):
    """One agent under TOOL. mode: e2e (receiver up) or ingest (receiver never started);
    n records, or none for `duration` seconds (a floor). Returns (instructions, seconds,
    functions)."""
    h = ch.Harness("bench-b7", agent_bin=os.path.join(build, "bin", "cistern-agent"),
                   receiver_bin=os.path.join(build, "bin", "cistern-receiver"))
    try:
        r = ch.Receiver(h, log_level="warn", wrapper=[])
        if mode == "e2e":
            r.start()
        out = h.path("agent-%s.out" % tool.name)
        # the agent's own spool defaults, the harness's forward settings
        a = ch.Agent(h, "agent", AGENT_ID, r, unix_socket=False, log_level="warn",
                     extra={"spool": {"sync": None, "commit_interval": None,
                                      "commit_max_records": None, "commit_max_bytes": None}},
                     wrapper=tool.wrapper(out))
        t0 = time.monotonic()
        a.start(wait=False)
        a.wait_ready(timeout=START_TIMEOUT)
        if n:
            fill(a.tcp_port, n, h.check_alive)
            if mode == "e2e":
                wait_for(lambda: r.count(AGENT_ID) >= n, "%d records stored" % n,
                         h.check_alive, timeout=3600, interval=0.5)
                wait_for(lambda: a.pending_records() == 0, "the agent's spool to empty",
                         h.check_alive, timeout=3600, interval=0.5)
                stored = r.count(AGENT_ID)
                need(stored == n, "%d records stored for %d sent" % (stored, n))
        else:
            while time.monotonic() - t0 < duration:
                h.check_alive()
                time.sleep(min(0.5, max(0.0, duration - (time.monotonic() - t0))))
        pid = tool.target_pid(a.proc, h.agent_bin)
        a.proc.expect_running = False
        os.kill(pid, signal.SIGTERM)  # the agent flushes, exits, and the tool writes its count
        try:
            code = a.proc.popen.wait(STOP_TIMEOUT * ch.SCALE)
        except subprocess.TimeoutExpired:
            raise BenchError("the agent under %s did not exit within %.0f s of SIGTERM"
                             % (tool.name, STOP_TIMEOUT))
        secs = time.monotonic() - t0
        need(code == 0, "the agent under %s exited %d (log: %s)" % (tool.name, code,
                                                                    a.proc.tail(20)))
        h.check_alive()
        return tool.total(out), secs, tool.functions(out)
    except BaseException:
        h.dump_logs(20)
        raise
    finally:
        h.cleanup()


def show_top(title, funcs, n, top):
    rows = [(v, fn) for v, fn in funcs if not GENERIC.search(fn)][:top]
    if not rows:
        return
    print("  top %d functions by inclusive cost, %s (generic frames left out; Ir/record not "
          "floor-subtracted):" % (len(rows), title))
    for v, fn in rows:
        print("    %14s  %9.0f/rec  %s" % ("{:,}".format(v), v / n, fn))


def fmt(v):
    return "%.0f" % v if abs(v) >= 100 else "%.3g" % v


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog=__doc__.split("\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default="build", help="build dir (BUILD/bin, BUILD/bench)")
    ap.add_argument("--records", type=int, default=100000)
    ap.add_argument("--runs", type=int, default=3,
                    help="the agent's counts vary by a few %% between runs (default 3)")
    ap.add_argument("--tool", choices=("callgrind", "perf"), default="callgrind")
    ap.add_argument("--perf-event", default="instructions:u",
                    help="event counted with --tool perf (default instructions:u)")
    ap.add_argument("--top", type=int, default=15, help="functions shown per profile")
    args = ap.parse_args()
    build = os.path.abspath(args.build)
    for b in ("cistern-agent", "cistern-receiver"):
        if not os.access(os.path.join(build, "bin", b), os.X_OK):
            sys.exit("cpu_cost.py: %s/bin/%s not found: build first" % (build, b))
    if args.records < 2 or args.runs < 1:
        sys.exit("cpu_cost.py: --records must be at least 2 and --runs at least 1")
    n = args.records
    try:
        tool = Callgrind() if args.tool == "callgrind" else Perf(args.perf_event)
    except BenchError as e:
        sys.exit("cpu_cost.py: %s" % e)
    unit = "instructions" if args.tool == "callgrind" else args.perf_event
    print("B7: %d records (100 B) under %s, counting %s; agent: spool defaults, harness "
          "forward settings, HTTPS to a bare receiver" % (n, tool.name, tool.event), flush=True)
    base, e2e, ing = [], [], []
    try:
        for run in range(1, args.runs + 1):
            b, b_fmt = baseline(build, tool, n)
            base.append(b)
            print("run %d: baseline_sqlite plain %s %s/row (%s)" % (
                run, fmt(b), unit, "payload formatting, %.0f/row, taken out" % b_fmt
                if args.tool == "callgrind" else "payload formatting included"), flush=True)
            for mode, out in (("e2e", e2e), ("ingest", ing)):
                tot, secs, funcs = agent_run(build, tool, mode, n)
                ftot, fsecs, _ = agent_run(build, tool, mode, 0, duration=secs)
                per = (tot - ftot) / n
                out.append(per)
                print("run %d: %s: %s %s in %.0f s; floor (no records, %.0f s) %s; "
                      "(total - floor) / records = %s/rec" % (
                          run, "ingest + forwarding" if mode == "e2e" else "ingest only",
                          "{:,.0f}".format(tot), unit, secs, fsecs, "{:,.0f}".format(ftot),
                          fmt(per)), flush=True)
                if run == args.runs:
                    show_top(mode, funcs, n, args.top)
    except (BenchError, ch.TestFailure) as e:
        sys.exit("cpu_cost.py: FAILED: %s" % e)
    mb, me, mi = statistics.median(base), statistics.median(e2e), statistics.median(ing)
    print("median of %d run(s), %s per record:" % (args.runs, unit))
    print("  baseline (one SQLite row per record, 1,000-row transactions): %9s" % fmt(mb))
    print("  agent ingest only (socket -> spool):                          %9s  (%.2fx)"
          % (fmt(mi), mi / mb))
    print("  agent ingest + forwarding (stored at the receiver):           %9s  (%.2fx)"
          % (fmt(me), me / mb))
    print("  forwarding alone (the difference):                            %9s" % fmt(me - mi))
    print("  ratios: to the baseline above, measured in the same run; floors subtracted")
    tag = "instr" if args.tool == "callgrind" else re.sub(r"\W+", "_", args.perf_event)
    print("RESULT B7 agent_%s_per_rec %s ratio=%.2f" % (tag, fmt(me), me / mb))
    print("RESULT B7 agent_ingest_%s_per_rec %s ratio=%.2f" % (tag, fmt(mi), mi / mb))
    print("RESULT B7 agent_forward_%s_per_rec %s" % (tag, fmt(me - mi)))
    print("RESULT B7 baseline_sqlite_%s_per_row %s" % (tag, fmt(mb)))


if __name__ == "__main__":
    main()

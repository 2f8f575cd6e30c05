#!/usr/bin/env python3
"""B2/B3: end to end on loopback. bench/feed pipelines 100-byte JSON records into the
agent's TCP socket input; the agent commits them to its spool and forwards them over mTLS (HTTPS to
the receiver, or MQTT through a local mosquitto with TLS and client certificates, acknowledged
end to end); the receiver stores them in SQLite with dedup.

Per run, interleaved: the baseline, then Cistern. The baseline is the raw insert rate of the
same rows under the receiver's unique key (bench/baseline_sqlite unique: INSERT OR IGNORE,
1,000-row transactions, WAL, payloads formatted before the clock starts), at the receiver's
store.sync (--sync, default full: the receiver's default). Cistern's end-to-end rate is
records / (first byte sent by feed -> the last record found in the receiver's database); its
ingest rate is records / (first byte sent -> last OK answered). Medians of --runs runs.

Also the helpers bench/ingest.py (B1) shares: payload(), the baseline and feed runners, and
the agent's config handling (the product's defaults, not the harness's test settings).

Usage: bench/e2e.py --build BUILD [--transport https|mqtt] [--records 500000] [--runs 3]
                    [--sync full|normal] [--dir /var/tmp] [--agent-set KEY=VALUE ...]
"""
import argparse
import os
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "integration"))
import cistern_harness as ch  # noqa: E402
# flash_wear.py's config helpers: the harness's test-speed keys, and pruning/setting paths
from flash_wear import HARNESS_TEST_KEYS, del_path, prune, set_path  # noqa: E402

AGENT_ID = "gw-bench"
PAYLOAD_LEN = 100  # the 100-byte records; feed, baseline_sqlite and mqtt_pubsub agree


class BenchError(Exception):
    pass


def payload(i):
    """The 100-byte JSON sensor record i. bench/feed.c, bench/baseline_sqlite.c and
    bench/mqtt_pubsub.c make the very same bytes (check_payloads() and baseline() verify the
    first two, bench/mqtt_bridge.py the third): keep them in sync."""
    return (b'{"sensor":"s-%03d","n":%09d,"temp_c":%5.2f,"humidity":%4.1f,'
            b'"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxx"}'
            % (i % 64, i, 18.0 + (i % 800) / 100.0, 40.0 + (i % 300) / 10.0))


def fs_type(path):
    return subprocess.run(["stat", "-f", "-c", "%T", path], check=True, stdout=subprocess.PIPE,
                          universal_newlines=True).stdout.strip()


def kv_line(text, what):
    """The key=value pairs of the last line of TEXT holding '=' as a dict of strings."""
    lines = [ln for ln in text.splitlines() if "=" in ln]
    if not lines:
        raise BenchError("%s printed no result line: %r" % (what, text[-500:]))
    return dict(w.split("=", 1) for w in lines[-1].split() if "=" in w)


class Bins:
    """The binaries under BUILD; BenchError when one is missing."""

    def __init__(self, build):
        self.agent = os.path.abspath(os.path.join(build, "bin", "cistern-agent"))
        self.receiver = os.path.abspath(os.path.join(build, "bin", "cistern-receiver"))
        self.baseline = os.path.abspath(os.path.join(build, "bench", "baseline_sqlite"))
        self.feed = os.path.abspath(os.path.join(build, "bench", "feed"))
        for b in (self.agent, self.receiver, self.baseline, self.feed):
            if not os.access(b, os.X_OK):
                raise BenchError("%s is not an executable (build first: cmake --build %s; or "
                                 "fix --build)" % (b, build))


def check_payloads(bins):
    """feed sends exactly payload(i): a sample at both ends of the range, compared byte for
    byte (baseline_sqlite's rows are checked after each baseline run)."""
    for offset, n in ((0, 2000), (999000, 1000)):
        out = subprocess.run([bins.feed, "--dump", str(n), "--offset", str(offset)],
                             check=True, stdout=subprocess.PIPE).stdout
        want = b"".join(payload(offset + i) + b"\n" for i in range(n))
        if out != want:
            raise BenchError("bench/feed.c payload() no longer makes the records of "
                             "bench/e2e.py payload(): keep them in sync")
    if len(payload(0)) != PAYLOAD_LEN:
        raise BenchError("payload() makes %d-byte records, not %d" % (len(payload(0)), PAYLOAD_LEN))


def baseline(bins, n, mode, sync, where):
    """One bench/baseline_sqlite run (mode plain|unique, sync normal|full) in a fresh dir
    under WHERE; checks the rows it left. Returns its rows/s."""
    d = tempfile.mkdtemp(prefix="cistern-bench-base-", dir=where)
    try:
        db = os.path.join(d, "b.db")
        p = subprocess.run([bins.baseline, db, str(n), mode, sync], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, universal_newlines=True)
        if p.returncode != 0:
            raise BenchError("baseline_sqlite %s %s failed (exit %d): %s"
                             % (mode, sync, p.returncode, p.stderr.strip()))
        res = kv_line(p.stdout, "baseline_sqlite")
        if int(res["rows"]) != n:
            raise BenchError("baseline_sqlite inserted %s rows, not %d" % (res["rows"], n))
        con = sqlite3.connect("file:%s?mode=ro" % db, uri=True)
        try:
            q = ("SELECT payload FROM records WHERE rowid=?" if mode == "plain" else
                 "SELECT payload FROM records WHERE agent_id='gw-bench' AND epoch=1 AND seq=?")
            for i in sorted({0, n // 2, n - 1}):
                row = con.execute(q, (i + 1,)).fetchone()
                if row is None or bytes(row[0]) != payload(i):
                    raise BenchError("baseline_sqlite row %d is %r, not payload(%d)"
                                     % (i + 1, row, i))
        finally:
            con.close()
        return float(res["rows_per_s"])
    finally:
        subprocess.run(["rm", "-rf", d])


def feed(bins, h, port, n, offset=0, timeout=600, on_wait=None):
    """Runs bench/feed against 127.0.0.1:PORT and returns its result (a dict of floats; the
    t_start and t_end keys are time.monotonic() instants). Fails when the agent (any process
    of H) dies, when an answer is not OK, or after TIMEOUT seconds."""
    p = subprocess.Popen([bins.feed, "127.0.0.1", str(port), str(n), "--offset", str(offset),
                          "--timeout", str(timeout)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    h.popens.append(p)  # killed by the harness's cleanup if we fail first
    deadline = time.monotonic() + timeout
    while p.poll() is None:
        if time.monotonic() > deadline:
            p.kill()
            raise BenchError("feed still running after %d s" % timeout)
        h.check_alive()
        # 20 ms: an end-to-end clock read after feed must not lag its end by much
        time.sleep(0.02)
    out, err = p.communicate()
    if p.returncode != 0:
        raise BenchError("feed failed (exit %d): %s" % (p.returncode, err.strip()))
    res = {k: float(v) for k, v in kv_line(out, "feed").items()}
    if res["ok"] != n or res["records"] != n:
        raise BenchError("feed: %d of %d records answered OK" % (res["ok"], n))
    return res


# ---------------------------------------------------------------------------------------
# The agent's configuration: the product's defaults, not the harness's test settings

def config_defaults(agent_bin):
    """{key: default or None} for every key `cistern-agent --help-config` lists."""
    p = subprocess.run([agent_bin, "--help-config"], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, universal_newlines=True)
    keys = {}
    for m in re.finditer(r"^(\S+) \(([^)]*)\)", p.stdout, re.M):
        d = re.search(r"default (\S+)$", m.group(2))
        keys[m.group(1)] = d.group(1) if d else None
    if p.returncode != 0 or "spool.sync" not in keys:
        raise BenchError("%s --help-config failed or lists no spool.sync (exit %d):\n%s"
                         % (agent_bin, p.returncode, p.stdout[-2000:]))
    return keys


def check_agent_set(ap, agent_set, defaults, agent_bin):
    for kv in agent_set:
        if "=" not in kv or kv.split("=", 1)[0] not in defaults:
            ap.error("--agent-set %s: not KEY=VALUE with a key from %s --help-config"
                     % (kv, agent_bin))


def make_agent(h, r, bench_set, agent_set, defaults, mqtt=None):
    """A harness Agent (TCP socket input, log warn) whose config is the product's defaults
    except forward.url/tls, BENCH_SET ({path: value}: what the bench itself sets, said in its
    summary) and AGENT_SET (--agent-set KEY=VALUE strings, applied last)."""
    a = ch.Agent(h, "agent", AGENT_ID, r, unix_socket=False, log_level="warn", mqtt=mqtt)
    for path in HARNESS_TEST_KEYS:
        del_path(a.config, path)
    for path, value in bench_set.items():
        set_path(a.config, path, value)
    for kv in agent_set:
        set_path(a.config, *kv.split("=", 1))
    dropped = prune(a.config, set(defaults))
    if dropped:
        raise BenchError("this agent build does not know %s" % ", ".join(sorted(set(dropped))))
    with open(a.config_path, "w") as f:
        f.write("# written by cistern_harness, adjusted by bench/e2e.py\n"
                + ch.to_yaml(a.config) + "\n")
    return a


def get_path(d, path):
    for k in path.split("."):
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def settings_summary(cfg, defaults, prefixes):
    """'key=value' for every key under PREFIXES, marked (default) when the config leaves it."""
    out = []
    for k in sorted(defaults):
        if not any(k.startswith(p) for p in prefixes) or "[]" in k:
            continue
        v = get_path(cfg, k)
        if v is not None:
            out.append("%s=%s" % (k, v))
        elif defaults[k] is not None:
            out.append("%s=%s (default)" % (k, defaults[k]))
    return ", ".join(out)


def cpu_seconds(pid):
    """utime + stime of PID so far, in seconds."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def med_ratio(pairs):
    """The median of the per-run ratios cistern/baseline (the runs are interleaved pairs)."""
    return statistics.median(c / b for b, c in pairs)


def setup_env(where):
    """The harness's temp dirs (spools, receiver store, logs) go under WHERE; nothing runs
    under a test wrapper."""
    os.environ["CISTERN_TEST_TMPDIR"] = where
    os.environ.pop("CISTERN_TEST_WRAPPER", None)


def check_dir(ap, where):
    if not os.path.isdir(where):
        ap.error("--dir %s is not a directory" % where)
    fs = fs_type(where)
    if fs in ("tmpfs", "ramfs"):
        ap.error("--dir %s is on %s: commits would cost no I/O; give a directory on a disk "
                 "(e.g. /var/tmp)" % (where, fs))
    return fs


# ---------------------------------------------------------------------------------------
# B2 / B3

BENCH_SET = {
    # the default (2 s) would leave the tail of the run waiting for a batch to fill
    "forward.batch.max_delay": "100ms",
}


def cistern_run(args, bins, defaults):
    """One Cistern run: receiver (store.sync = args.sync), agent, and for mqtt a broker; feed
    sends args.records records. Returns {"ingest", "e2e" (rec/s), "cpu_agent",
    "cpu_receiver" (CPU seconds from the first record to the last stored)}."""
    n = args.records
    h = ch.Harness("bench", agent_bin=bins.agent, receiver_bin=bins.receiver)
    ok = False
    try:
        broker = h.mosquitto().start() if args.transport == "mqtt" else None
        r = ch.Receiver(h, log_level="warn", mqtt=broker, extra={"store": {"sync": args.sync}})
        r.start()
        if broker is not None:
            r.wait_subscribed()
        a = make_agent(h, r, BENCH_SET, args.agent_set, defaults, mqtt=broker).start()
        args.summary_cfg = a.config
        epoch = a.epoch()
        epoch_s = epoch - (1 << 64) if epoch >= 1 << 63 else epoch  # as SQLite stores it
        cpu_a0, cpu_r0 = cpu_seconds(a.proc.pid), cpu_seconds(r.proc.pid)
        res = feed(bins, h, a.tcp_port, n, timeout=args.timeout)
        first, last = int(res["first_seq"]), int(res["last_seq"])
        con = r.db()
        try:
            q_last = "SELECT 1 FROM records WHERE agent_id=? AND epoch=? AND seq=?"
            q_count = "SELECT count(*), min(seq), max(seq) FROM records WHERE agent_id=?"
            deadline = time.monotonic() + args.timeout
            while True:
                # a point lookup first: a full count on every poll would load the receiver
                if con.execute(q_last, (AGENT_ID, epoch_s, last)).fetchone():
                    c = con.execute(q_count, (AGENT_ID,)).fetchone()
                    if c[0] >= n:
                        break
                if time.monotonic() > deadline:
                    raise BenchError("not all %d records stored after %d s" % (n, args.timeout))
                h.check_alive()
                time.sleep(0.02)
            t_stored = time.monotonic()
        finally:
            con.close()
        cpu_a, cpu_r = cpu_seconds(a.proc.pid) - cpu_a0, cpu_seconds(r.proc.pid) - cpu_r0
        ch.check(c == (n, first, last), "the receiver holds %d records, seqs %s..%s; feed had "
                 "%d answered OK, seqs %d..%d" % (c[0], c[1], c[2], n, first, last))
        # every record acknowledged end to end: the agent's spool drains (untimed)
        h.wait(lambda: a.segment_count() == 0, 120, "the agent's spool to drain", interval=0.2)
        rc = a.stop()
        ch.check(rc == 0, "agent exited with status %s on SIGTERM" % rc)
        rc = r.stop()
        ch.check(rc == 0, "receiver exited with status %s on SIGTERM" % rc)
        ok = True
        return {"ingest": res["rec_per_s"], "e2e": n / (t_stored - res["t_start"]),
                "cpu_agent": cpu_a, "cpu_receiver": cpu_r}
    finally:
        if not ok:
            h.dump_logs(40)
        h.cleanup()


def one_run(build, n, transport, sync="full", agent_set=(), timeout=600):
    """cistern_run() with this script's defaults, for other benches (bench/mqtt_bridge.py):
    N records over TRANSPORT with the binaries of BUILD. The harness's temp dir is where
    CISTERN_TEST_TMPDIR says (setup_env())."""
    bins = Bins(build)
    args = argparse.Namespace(records=n, transport=transport, sync=sync,
                              agent_set=list(agent_set), timeout=timeout)
    return cistern_run(args, bins, config_defaults(bins.agent))


def main():
    ap = argparse.ArgumentParser(
        prog="bench/e2e.py",
        description="B2 (https) / B3 (mqtt): end-to-end records/s from the agent's socket "
                    "input to the receiver's SQLite store, beside a raw unique-key SQLite "
                    "insert baseline measured in the same run.",
        epilog="Prints per-run figures, the medians, and RESULT lines: B2 e2e_https_rec_per_s "
               "(ratio = median of per-run ratios to the baseline), or B3 "
               "cistern_mqtt_rec_per_s. Exits 1 if a process fails or a record is missing, "
               "2 on bad arguments.")
    ap.add_argument("--build", default="build",
                    help="CMake build dir: BUILD/bin/cistern-{agent,receiver}, "
                         "BUILD/bench/{feed,baseline_sqlite} (default build)")
    ap.add_argument("--records", type=int, default=500000, help="records per run (default 500000)")
    ap.add_argument("--runs", type=int, default=3, help="runs; medians reported (default 3)")
    ap.add_argument("--transport", choices=("https", "mqtt"), default="https")
    ap.add_argument("--sync", choices=("full", "normal"), default="full",
                    help="the receiver's store.sync and the baseline's PRAGMA synchronous "
                         "(default full, the receiver's default)")
    ap.add_argument("--dir", default="/var/tmp",
                    help="where the spool, the receiver's store and the baseline DB go; a disk, "
                         "not tmpfs (default /var/tmp)")
    ap.add_argument("--agent-set", action="append", default=[], metavar="KEY=VALUE",
                    help="agent config beyond the product's defaults, e.g. "
                         "spool.commit_interval=50ms (repeatable; keys from --help-config)")
    ap.add_argument("--timeout", type=int, default=600, help="seconds before a stuck run fails")
    args = ap.parse_args()
    if args.records <= 0 or args.runs <= 0 or args.timeout <= 0:
        ap.error("--records, --runs and --timeout must be above 0")
    if args.transport == "mqtt" and ch.mosquitto_missing():
        sys.exit("bench: not installed: %s (scripts/deps.sh installs it)" % ch.mosquitto_missing())
    try:
        bins = Bins(args.build)
    except BenchError as e:
        ap.error(str(e))
    fs = check_dir(ap, args.dir)
    args.dir = os.path.abspath(args.dir)
    setup_env(args.dir)
    try:
        defaults = config_defaults(bins.agent)
        check_agent_set(ap, args.agent_set, defaults, bins.agent)
        check_payloads(bins)
    except (BenchError, OSError, subprocess.CalledProcessError) as e:
        sys.stderr.write("e2e: FAILED: %s\n" % e)
        return 1

    tname = args.transport.upper()
    print("e2e (%s): %d records of %d bytes per run, %d run(s); dir %s (%s); receiver "
          "store.sync=%s" % (tname, args.records, PAYLOAD_LEN, args.runs, args.dir, fs, args.sync),
          flush=True)
    runs = []  # (baseline rows/s, cistern result)
    t0 = time.monotonic()
    try:
        for i in range(args.runs):
            b = baseline(bins, args.records, "unique", args.sync, args.dir)
            c = cistern_run(args, bins, defaults)
            runs.append((b, c))
            print("run %d: baseline %.0f rows/s | agent ingest %.0f rec/s, end to end %.0f rec/s "
                  "(%.2fx); CPU s: agent %.2f, receiver %.2f"
                  % (i + 1, b, c["ingest"], c["e2e"], c["e2e"] / b, c["cpu_agent"],
                     c["cpu_receiver"]), flush=True)
    except (ch.TestFailure, BenchError, OSError, subprocess.CalledProcessError) as e:
        sys.stderr.write("e2e: FAILED: %s\n" % e)
        return 1

    mb = statistics.median(b for b, _ in runs)
    mi = statistics.median(c["ingest"] for _, c in runs)
    me = statistics.median(c["e2e"] for _, c in runs)
    ratio = med_ratio([(b, c["e2e"]) for b, c in runs])
    print()
    print("median of %d run(s), %d records of %d bytes (%.0f s in all):"
          % (args.runs, args.records, PAYLOAD_LEN, time.monotonic() - t0))
    print("  %-56s %9.0f rows/s" % ("baseline (SQLite INSERT OR IGNORE, unique key, sync %s):"
                                        % args.sync, mb))
    print("  %-56s %9.0f rec/s" % ("agent ingest (OK answered):", mi))
    print("  %-56s %9.0f rec/s  (%.2fx baseline, median of per-run ratios)"
          % ("end to end over %s (stored at the receiver):" % tname, me, ratio))
    print("  agent: %s" % settings_summary(args.summary_cfg, defaults,
                                           ("spool.sync", "spool.commit", "forward.batch",
                                            "forward.in_flight")))
    if args.agent_set:
        print("  --agent-set: %s" % ", ".join(args.agent_set))
    if args.transport == "https":
        print("RESULT B2 baseline_unique_rows_per_s %.0f" % mb)
        print("RESULT B2 ingest_https_rec_per_s %.0f" % mi)
        print("RESULT B2 e2e_https_rec_per_s %.0f ratio=%.2f" % (me, ratio))
    else:
        # B3's baseline is the bridged-mosquitto setup (another bench): no ratio here
        print("RESULT B3 cistern_mqtt_rec_per_s %.0f" % me)
    return 0


if __name__ == "__main__":
    sys.exit(main())

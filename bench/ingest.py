#!/usr/bin/env python3
"""B1: agent ingest. bench/feed pipelines 100-byte JSON sensor records into the agent's
TCP socket input (answers read concurrently, each must be "OK <seq>"); the agent commits them to
its spool at spool.sync normal and full. No receiver is reachable (forward.url names a
loopback port nobody listens on), so the spool only grows: this is ingest alone.

Per run and sync level, interleaved: the baseline, then the agent. The baseline is
bench/baseline_sqlite plain: the naive design, one SQLite row per record (no index), in
1,000-row transactions, WAL, PRAGMA synchronous at the same level, payloads formatted before
the clock starts, in the same directory (a disk, not tmpfs) as the agent's spool. The agent
is timed from feed's first byte sent to its last OK received, and its spool is then checked
to hold every record. Medians of --runs runs, and the median of the per-run ratios
agent/baseline (target: at least 1.5x at normal).

The agent runs the product's default spool settings (commit_interval, commit_max_records...:
printed) except spool.sync and what --agent-set gives.

The last group commit waits up to spool.commit_interval (200 ms by default) after the last
record, as it does in the product; 2,000,000 records per run keep that tail under a tenth of
the measured time.

Usage: bench/ingest.py --build BUILD [--records 2000000] [--runs 3] [--sync normal,full]
                       [--dir /var/tmp] [--agent-set KEY=VALUE ...]
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

import e2e
from e2e import ch

TARGET = 1.5  # issue 8, B1: at least 1.5x the baseline at sync normal


def one_run(args, bins, defaults, sync):
    n = args.records
    h = ch.Harness("b1", agent_bin=bins.agent, receiver_bin=bins.receiver)
    ok = False
    try:
        # Made for its URL, PKI and registry, and never started: the forwarder finds nobody
        # at forward.url and retries (log level warn: once per state change).
        r = ch.Receiver(h, log_level="warn")
        a = e2e.make_agent(h, r, {"spool.sync": sync}, args.agent_set, defaults).start()
        args.summary_cfg = a.config
        fs = e2e.fs_type(os.path.dirname(a.spool_path))
        ch.check(fs not in ("tmpfs", "ramfs"), "the spool is on %s (%s)" % (fs, a.spool_path))
        # let the forwarder's first (refused) connect and anything else at start-up settle
        time.sleep(0.5)
        ch.check(not ch.port_listening(r.port), "something listens on the receiver's port %d"
                 % r.port)
        pid = a.proc.pid
        cpu0 = e2e.cpu_seconds(pid)
        res = e2e.feed(bins, h, a.tcp_port, n, timeout=args.timeout)
        cpu = e2e.cpu_seconds(pid) - cpu0
        # every record answered OK is in the spool (nothing was forwarded: nobody to take it)
        con = a.spool()
        try:
            segs, recs, lo, hi = con.execute(
                "SELECT count(*), coalesce(sum(record_count),0), min(first_seq), max(last_seq)"
                " FROM segments").fetchone()
        finally:
            con.close()
        ch.check((recs, lo, hi) == (n, int(res["first_seq"]), int(res["last_seq"])),
                 "the spool holds %d records, seqs %s..%s; feed had %d answered OK, seqs %d..%d"
                 % (recs, lo, hi, n, res["first_seq"], res["last_seq"]))
        rc = a.stop()
        ch.check(rc == 0, "agent exited with status %s on SIGTERM (log: %s)"
                 % (rc, a.proc.log_path))
        ok = True
        return {"rate": res["rec_per_s"], "seconds": res["seconds"], "cpu": cpu,
                "segments": segs, "tail": res["t_end"] - res["t_sent"]}
    finally:
        if not ok:
            h.dump_logs(40)
        h.cleanup()


def main():
    ap = argparse.ArgumentParser(
        prog="bench/ingest.py",
        description="B1: agent ingest (socket input -> spool) in records/s at spool.sync "
                    "normal and full, beside a one-row-per-record SQLite baseline measured in "
                    "the same run.",
        epilog="Prints per-run figures, the medians, and RESULT lines "
               "(B1 ingest_<sync>_rec_per_s MEDIAN ratio=MEDIAN_OF_PER_RUN_RATIOS). Exits 1 if "
               "a process fails or a record is missing, 2 on bad arguments.")
    ap.add_argument("--build", default="build",
                    help="CMake build dir: BUILD/bin/cistern-{agent,receiver}, "
                         "BUILD/bench/{feed,baseline_sqlite} (default build)")
    ap.add_argument("--records", type=int, default=2000000,
                    help="records per run (default 2000000)")
    ap.add_argument("--runs", type=int, default=3, help="runs; medians reported (default 3)")
    ap.add_argument("--sync", default="normal,full", help="spool.sync levels (default normal,full)")
    ap.add_argument("--dir", default="/var/tmp",
                    help="where the spool and the baseline DB go; a disk, not tmpfs "
                         "(default /var/tmp)")
    ap.add_argument("--agent-set", action="append", default=[], metavar="KEY=VALUE",
                    help="agent config beyond the product's defaults, e.g. "
                         "spool.commit_interval=50ms (repeatable; keys from --help-config)")
    ap.add_argument("--timeout", type=int, default=600, help="seconds before a stuck run fails")
    args = ap.parse_args()
    syncs = [s for s in args.sync.split(",") if s]
    if not syncs or any(s not in ("normal", "full") for s in syncs):
        ap.error("--sync takes normal and/or full")
    if args.records <= 0 or args.runs <= 0 or args.timeout <= 0:
        ap.error("--records, --runs and --timeout must be above 0")
    if any(kv.startswith("spool.sync=") for kv in args.agent_set):
        ap.error("set spool.sync with --sync, not --agent-set")
    try:
        bins = e2e.Bins(args.build)
    except e2e.BenchError as e:
        ap.error(str(e))
    fs = e2e.check_dir(ap, args.dir)
    args.dir = os.path.abspath(args.dir)
    e2e.setup_env(args.dir)
    try:
        defaults = e2e.config_defaults(bins.agent)
        e2e.check_agent_set(ap, args.agent_set, defaults, bins.agent)
        e2e.check_payloads(bins)
    except (e2e.BenchError, OSError, subprocess.CalledProcessError) as e:
        sys.stderr.write("ingest: FAILED: %s\n" % e)
        return 1

    print("ingest (B1): %d records of %d bytes per run, %d run(s), sync %s; dir %s (%s)"
          % (args.records, e2e.PAYLOAD_LEN, args.runs, ",".join(syncs), args.dir, fs),
          flush=True)
    results = {s: [] for s in syncs}  # sync -> [(baseline rows/s, agent result)]
    t0 = time.monotonic()
    try:
        for run in range(1, args.runs + 1):
            for sync in syncs:
                b = e2e.baseline(bins, args.records, "plain", sync, args.dir)
                a = one_run(args, bins, defaults, sync)
                results[sync].append((b, a))
                print("run %d sync=%-6s baseline %8.0f rows/s | agent %8.0f rec/s (%.2fx): "
                      "%.3f s, of which %.3f s after the last byte sent; %d segments (%.0f "
                      "records/commit); agent CPU %.2f s (%.2f us/rec)"
                      % (run, sync, b, a["rate"], a["rate"] / b, a["seconds"], a["tail"],
                         a["segments"], args.records / max(1, a["segments"]), a["cpu"],
                         a["cpu"] * 1e6 / args.records), flush=True)
    except (ch.TestFailure, e2e.BenchError, OSError, subprocess.CalledProcessError) as e:
        sys.stderr.write("ingest: FAILED: %s\n" % e)
        return 1

    print()
    print("median of %d run(s), %d records of %d bytes (%.0f s in all):"
          % (args.runs, args.records, e2e.PAYLOAD_LEN, time.monotonic() - t0))
    lines = []
    for sync in syncs:
        rs = results[sync]
        mb = statistics.median(b for b, _ in rs)
        ma = statistics.median(a["rate"] for _, a in rs)
        ratio = e2e.med_ratio([(b, a["rate"]) for b, a in rs])
        verdict = ""
        if sync == "normal":
            verdict = "  target >= %.1fx: %s" % (TARGET, "met" if ratio >= TARGET else "NOT met")
        print("  sync=%-6s baseline (SQLite row per record) %8.0f rows/s | agent %8.0f rec/s | "
              "%.2fx%s" % (sync, mb, ma, ratio, verdict))
        lines.append("RESULT B1 baseline_%s_rows_per_s %.0f" % (sync, mb))
        lines.append("RESULT B1 ingest_%s_rec_per_s %.0f ratio=%.2f" % (sync, ma, ratio))
    print("  (ratio: median of the per-run ratios agent/baseline)")
    print("  agent spool settings: %s" % e2e.settings_summary(
        args.summary_cfg, defaults, ("spool.commit", "spool.compression", "spool.max_size",
                                     "spool.wal_max_size", "spool.when_full")))
    if args.agent_set:
        print("  --agent-set: %s" % ", ".join(args.agent_set))
    for ln in lines:
        print(ln)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Flash wear: bytes the agent writes to disk per payload byte, at spool.sync normal and full.

A real cistern-receiver and cistern-agent (mTLS, throwaway PKI from
tests/integration/cistern_harness.py) run with the spool on a disk filesystem. The bench
feeds the agent's TCP socket input at a fixed rate (default 2,000 records/s for 20 s) with
JSON sensor records shaped like the demo input's ({"sensor":"s-001","n":..,"temp_c":..,
"humidity":..}, about 60 bytes). The pacing matters: group commits (spool.commit_interval)
form from what arrives in one interval, as they would on a gateway.

Scenarios, each at sync normal and full:
  up    receiver running: records are committed, forwarded, acknowledged and deleted;
        write_bytes is read once the receiver stored them all and the spool is empty.
  down  receiver never started: the spool only grows (the worst case for wear);
        write_bytes is read when the last record was answered OK (= committed).

write_bytes is the agent process's /proc/<pid>/io write_bytes (page-cache pages it dirtied,
which the kernel later writes to the device), read after start-up and before the first
record, and again at the end point above. The agent's log (level warn) is on the same disk
and included; it stays empty unless something goes wrong.

Baseline, measured in the same run: the naive design, one SQLite row per record
(INSERT of the same payloads into a WAL table, synchronous=NORMAL/FULL, SQLite's default
checkpointing), in transactions as large as the agent's group commits (mean records per
segment of the "down" scenario, else rate x 200 ms), at the same pace, in a child process
(python's sqlite3 module, the system libsqlite3) that reads its own /proc/self/io.

Each figure is the median of --runs runs. The agent's spool config is the product default
except spool.sync, log.level, and what --agent-set gives.

Usage: bench/flash_wear.py --build BUILD_DIR [--dir /var/tmp] [--rate 2000] [--seconds 20]
                           [--runs 3] [--sync normal,full] [--scenarios up,down]
                           [--agent-set spool.KEY=VALUE ...]
"""
import argparse
import json
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

AGENT_ID = "gw-wear"
STREAM = "apps"  # the harness's socket input name: the stream of every record
DEFAULT_COMMIT_INTERVAL_S = 0.2  # spool.commit_interval default; fallback baseline txn size
M64 = (1 << 64) - 1


class BenchError(Exception):
    pass


def payloads(n, sensors=4, seed=0x9E3779B97F4A7C15):
    """n records in the demo input's format and value ranges (edge-agent/inputs/demo.c,
    xorshift64 values), deterministic so the baseline inserts the very same bytes."""
    r = seed
    out = []
    for i in range(n):
        r ^= (r << 13) & M64
        r ^= r >> 7
        r ^= (r << 17) & M64
        out.append(b'{"sensor":"s-%03d","n":%d,"temp_c":%.2f,"humidity":%.1f}'
                   % (i % sensors, i, 18.0 + (r % 800) / 100.0, 40.0 + ((r >> 16) % 300) / 10.0))
    return out


def read_io(pid):
    """/proc/<pid>/io as a dict of ints ("self" for this process)."""
    with open("/proc/%s/io" % pid) as f:
        return {k: int(v) for k, v in (ln.split(":") for ln in f if ":" in ln)}


def fs_type(path):
    return subprocess.run(["stat", "-f", "-c", "%T", path], check=True, stdout=subprocess.PIPE,
                          universal_newlines=True).stdout.strip()


# ---------------------------------------------------------------------------------------
# Baseline: runs in a child process (this script with --baseline-child) so that
# /proc/self/io counts the SQLite writes and nothing of the bench or the agent.

def baseline_child(db, sync, txn, rate, n):
    pl = payloads(n)
    con = sqlite3.connect(db, isolation_level=None)
    mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode != "wal":
        raise BenchError("baseline: journal_mode is %s, not wal" % mode)
    con.execute("PRAGMA synchronous=%s" % ("FULL" if sync == "full" else "NORMAL"))
    con.execute("CREATE TABLE records(seq INTEGER PRIMARY KEY, ts_ms INTEGER NOT NULL,"
                " stream TEXT NOT NULL, payload BLOB NOT NULL)")
    io0 = read_io("self")
    t0 = time.monotonic()
    commits = 0
    for start in range(0, n, txn):
        end = min(n, start + txn)
        # Commit when the last record of this transaction has "arrived" at the paced rate,
        # as the agent's group commit does.
        wait = t0 + end / rate - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        ts = int(time.time() * 1000)
        con.execute("BEGIN")
        for j in range(start, end):
            con.execute("INSERT INTO records VALUES(?,?,?,?)", (j + 1, ts, STREAM, pl[j]))
        con.execute("COMMIT")
        commits += 1
    io1 = read_io("self")
    con.close()
    print(json.dumps({"write_bytes": io1["write_bytes"] - io0["write_bytes"],
                      "cancelled": io1["cancelled_write_bytes"] - io0["cancelled_write_bytes"],
                      "commits": commits, "seconds": time.monotonic() - t0}))


def baseline(args, sync, txn, payload_bytes):
    d = tempfile.mkdtemp(prefix="cistern-wear-base-", dir=args.dir)
    try:
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--baseline-child",
                            os.path.join(d, "b.db"), sync, str(txn), str(args.rate),
                            str(args.rate * args.seconds)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True)
        if p.returncode != 0:
            raise BenchError("baseline child failed (exit %d):\n%s" % (p.returncode, p.stderr))
        r = json.loads(p.stdout)
        if r["write_bytes"] == 0:
            raise BenchError("baseline wrote 0 bytes according to /proc/self/io: %s does not "
                             "account writes (tmpfs/overlay?); use --dir on a disk" % args.dir)
        r["per_payload_byte"] = r["write_bytes"] / payload_bytes
        return r
    finally:
        subprocess.run(["rm", "-rf", d])


# ---------------------------------------------------------------------------------------
# The agent

def agent_keys(agent_bin):
    """Config keys this agent build knows (from --help-config), e.g. 'spool.wal_max_size'."""
    p = subprocess.run([agent_bin, "--help-config"], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, universal_newlines=True)
    keys = set(re.findall(r"^(\S+) \(", p.stdout, re.M))
    if p.returncode != 0 or "spool.sync" not in keys:
        raise BenchError("%s --help-config failed or lists no spool.sync (exit %d):\n%s"
                         % (agent_bin, p.returncode, p.stdout[-2000:]))
    return keys


# Keys the harness sets for fast tests (50 ms commits, short retry delays): the bench takes
# the product's defaults for them instead.
HARNESS_TEST_KEYS = ["spool.commit_interval", "spool.commit_max_records",
                     "spool.commit_max_bytes", "forward.batch", "forward.retry",
                     "forward.in_flight", "forward.timeout", "forward.shutdown_timeout"]


def set_path(d, path, value):
    parts = path.split(".")
    for k in parts[:-1]:
        if not isinstance(d.get(k), dict):
            d[k] = {}
        d = d[k]
    d[parts[-1]] = value


def del_path(d, path):
    parts = path.split(".")
    for k in parts[:-1]:
        d = d.get(k)
        if not isinstance(d, dict):
            return
    d.pop(parts[-1], None)


def prune(cfg, keys, prefix=""):
    """Drop config keys this agent build does not know (the harness follows the newest
    main; the bench must also run older or newer builds). Returns the dropped paths."""
    dropped = []
    for k in list(cfg):
        path = prefix + k
        v = cfg[k]
        if isinstance(v, dict) and v:
            dropped += prune(v, keys, path + ".")
            if not v:
                del cfg[k]
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            if path not in keys:
                dropped.append(path)
                del cfg[k]
            else:
                for item in v:
                    dropped += prune(item, keys, path + "[].")
        elif path not in keys:
            dropped.append(path)
            del cfg[k]
    return dropped


def make_agent(h, r, args, sync, keys):
    a = ch.Agent(h, "agent", AGENT_ID, r, unix_socket=False, log_level="warn",
                 extra={"spool": {"sync": sync}})
    for path in HARNESS_TEST_KEYS:
        del_path(a.config, path)
    for kv in args.agent_set:
        set_path(a.config, *kv.split("=", 1))
    dropped = prune(a.config, keys)
    with open(a.config_path, "w") as f:
        f.write("# written by cistern_harness, adjusted by bench/flash_wear.py\n"
                + ch.to_yaml(a.config) + "\n")
    if dropped:
        if not args.pruned_said:
            print("note: this agent build does not know %s; left out of its config"
                  % ", ".join(sorted(set(dropped))), flush=True)
            args.pruned_said = True
    return a


def spool_stats(agent):
    con = agent.spool()
    try:
        segs, recs, stored, raw = con.execute(
            "SELECT count(*), coalesce(sum(record_count),0), coalesce(sum(length(data)),0),"
            " coalesce(sum(raw_size),0) FROM segments").fetchone()
    finally:
        con.close()
    files = {}
    for suffix in ("", "-wal", "-shm"):
        try:
            files[suffix or "db"] = os.path.getsize(agent.spool_path + suffix)
        except OSError:
            files[suffix or "db"] = 0
    return {"segments": segs, "records": recs, "stored": stored, "raw": raw, "files": files}


def agent_run(args, sync, scenario, pl, keys):
    n = len(pl)
    payload_bytes = sum(len(p) for p in pl)
    h = ch.Harness("wear", agent_bin=args.agent_bin, receiver_bin=args.receiver_bin)
    ok = False
    try:
        r = ch.Receiver(h, log_level="warn")
        if scenario == "up":
            r.start()
        a = make_agent(h, r, args, sync, keys).start()
        fs = fs_type(os.path.dirname(a.spool_path))
        if fs in ("tmpfs", "ramfs"):
            raise BenchError("the spool is on %s (%s): write_bytes is 0 there" % (fs, a.spool_path))
        c = a.client(via="tcp")
        # Start-up is over once the socket input accepts; let the forwarder's first connect
        # and anything else the agent does at start settle before the first reading.
        time.sleep(1.0)
        h.check_alive()
        pid = a.proc.pid
        io0 = read_io(pid)
        log0 = os.path.getsize(a.proc.log_path)
        t0 = time.monotonic()
        sent = 0
        tick = 0.01
        while sent < n:
            due = min(n, int((time.monotonic() - t0) * args.rate) + 1)
            if due > sent:
                c.send_many(pl[sent:due])
                sent = due
            h.check_alive()
            nxt = t0 + sent / args.rate
            time.sleep(max(0.0, min(tick, nxt - time.monotonic())))
        answers = c.wait_answers(n, timeout=120, alive=h.check_alive)
        t_committed = time.monotonic()
        bad = [x for x in answers if x[0] != "OK"]
        ch.check(not bad, "%d of %d records not answered OK, e.g. %r" % (len(bad), n, bad[:3]))
        io_c = read_io(pid)
        res = {"committed_write_bytes": io_c["write_bytes"] - io0["write_bytes"],
               "payload_bytes": payload_bytes, "records": n,
               "send_seconds": t_committed - t0}
        if scenario == "down":
            io_end = io_c
            st = spool_stats(a)
            ch.check(st["records"] == n, "spool holds %d records, %d were answered OK"
                     % (st["records"], n))
            res["spool"] = st
        else:
            h.wait(lambda: r.count(AGENT_ID) >= n, 120,
                   "all %d records stored at the receiver" % n, interval=0.2)
            h.wait(lambda: a.segment_count() == 0, 120, "the agent's spool to drain", interval=0.2)
            io_end = read_io(pid)
            ch.check(r.count(AGENT_ID) == n, "receiver stored %d records, %d sent"
                     % (r.count(AGENT_ID), n))
            res["drain_seconds"] = time.monotonic() - t_committed
        res["write_bytes"] = io_end["write_bytes"] - io0["write_bytes"]
        res["cancelled"] = io_end["cancelled_write_bytes"] - io0["cancelled_write_bytes"]
        res["log_bytes"] = os.path.getsize(a.proc.log_path) - log0
        res["per_payload_byte"] = res["write_bytes"] / payload_bytes
        c.close()
        rc = a.stop()
        ch.check(rc == 0, "agent exited with status %s on SIGTERM (log: %s)"
                 % (rc, a.proc.log_path))
        if scenario == "up":
            rc = r.stop()
            ch.check(rc == 0, "receiver exited with status %s on SIGTERM" % rc)
        ok = True
        return res
    finally:
        if not ok:
            h.dump_logs(40)
        h.cleanup()


# ---------------------------------------------------------------------------------------

def fmt_bytes(b):
    return "%.2f MB" % (b / 1e6)


def main():
    if len(sys.argv) == 7 and sys.argv[1] == "--baseline-child":
        _, _, db, sync, txn, rate, n = sys.argv
        baseline_child(db, sync, int(txn), int(rate), int(n))
        return 0

    ap = argparse.ArgumentParser(
        prog="bench/flash_wear.py",
        usage="%(prog)s --build BUILD_DIR [--dir DIR] [--rate N] [--seconds N] [--runs N]\n"
              "       [--sync normal,full] [--scenarios up,down] [--agent-set KEY=VALUE ...]",
        description="Measure bytes the agent writes to disk (/proc/<pid>/io write_bytes) per "
                    "payload byte, at spool.sync normal and full, with the uplink up and down, "
                    "beside a raw-SQLite baseline measured in the same run.",
        epilog="Example: bench/flash_wear.py --build build --runs 3 "
               "(about 2 x 2 x 3 agent runs of --seconds each, plus the baselines). "
               "Exits 1 if the agent or receiver fails, 2 on bad arguments.")
    ap.add_argument("--build", required=True,
                    help="CMake build dir holding bin/cistern-agent and bin/cistern-receiver")
    ap.add_argument("--dir", default="/var/tmp",
                    help="where spools and baseline databases go; must be a disk filesystem, "
                         "not tmpfs (default /var/tmp)")
    ap.add_argument("--rate", type=int, default=2000, help="records per second (default 2000)")
    ap.add_argument("--seconds", type=int, default=20, help="seconds of input per run (default 20)")
    ap.add_argument("--runs", type=int, default=3, help="runs per configuration; medians reported "
                                                        "(default 3)")
    ap.add_argument("--sync", default="normal,full", help="spool.sync values (default normal,full)")
    ap.add_argument("--scenarios", default="up,down",
                    help="up: receiver running; down: receiver never started (default up,down)")
    ap.add_argument("--agent-set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra agent config, e.g. spool.wal_max_size=8MiB (repeatable; the key "
                         "must be listed by cistern-agent --help-config)")
    args = ap.parse_args()

    syncs = [s for s in args.sync.split(",") if s]
    scenarios = [s for s in args.scenarios.split(",") if s]
    if not syncs or any(s not in ("normal", "full") for s in syncs):
        ap.error("--sync takes normal and/or full")
    if not scenarios or any(s not in ("up", "down") for s in scenarios):
        ap.error("--scenarios takes up and/or down")
    if args.rate <= 0 or args.seconds <= 0 or args.runs <= 0:
        ap.error("--rate, --seconds and --runs must be above 0")
    args.agent_bin = os.path.abspath(os.path.join(args.build, "bin", "cistern-agent"))
    args.receiver_bin = os.path.abspath(os.path.join(args.build, "bin", "cistern-receiver"))
    for b in (args.agent_bin, args.receiver_bin):
        if not os.access(b, os.X_OK):
            ap.error("%s is not an executable (build first, or fix --build)" % b)
    if not os.path.isdir(args.dir):
        ap.error("--dir %s is not a directory" % args.dir)
    fs = fs_type(args.dir)
    if fs in ("tmpfs", "ramfs"):
        ap.error("--dir %s is on %s: write_bytes stays 0 there; give a directory on a disk "
                 "filesystem (e.g. /var/tmp)" % (args.dir, fs))
    args.dir = os.path.abspath(args.dir)
    if not os.path.exists("/proc/self/io"):
        ap.error("/proc/self/io is missing: this kernel has no per-task I/O accounting")
    try:
        keys = agent_keys(args.agent_bin)
    except BenchError as e:
        sys.stderr.write("flash_wear: %s\n" % e)
        return 1
    for kv in args.agent_set:
        if "=" not in kv or kv.split("=", 1)[0] not in keys:
            ap.error("--agent-set %s: not KEY=VALUE with a key from %s --help-config"
                     % (kv, args.agent_bin))
    # The harness puts its temp dir (spool, logs, PKI) here; no wrapper: we read the
    # agent's own /proc/<pid>/io.
    os.environ["CISTERN_TEST_TMPDIR"] = args.dir
    os.environ.pop("CISTERN_TEST_WRAPPER", None)
    args.pruned_said = False

    n = args.rate * args.seconds
    pl = payloads(n)
    payload_bytes = sum(len(p) for p in pl)
    print("flash_wear: %d records (%d payload bytes, %.1f B/record) at %d rec/s for %d s; "
          "spool dir %s (%s); %d run(s); agent config extra: %s"
          % (n, payload_bytes, payload_bytes / n, args.rate, args.seconds, args.dir, fs,
             args.runs, ", ".join(args.agent_set) or "none"), flush=True)

    t_start = time.monotonic()
    results = {}  # (sync, scenario) -> [agent result]; (sync, "baseline") -> [baseline result]
    try:
        for run in range(1, args.runs + 1):
            for sync in syncs:
                # down first: its spool tells the group-commit size the baseline uses.
                txn = None
                for scen in sorted(scenarios):  # "down" < "up"
                    res = agent_run(args, sync, scen, pl, keys)
                    results.setdefault((sync, scen), []).append(res)
                    extra = ""
                    if scen == "down":
                        st = res["spool"]
                        txn = max(1, round(st["records"] / max(1, st["segments"])))
                        extra = ("; %d segments (mean %d records/commit), stored %s of %s raw"
                                 " (zstd %.2fx), db %s + wal %s"
                                 % (st["segments"], txn, fmt_bytes(st["stored"]),
                                    fmt_bytes(st["raw"]), st["raw"] / max(1, st["stored"]),
                                    fmt_bytes(st["files"]["db"]), fmt_bytes(st["files"]["-wal"])))
                    else:
                        extra = "; at commit %.3f, drained %.1f s after" % (
                            res["committed_write_bytes"] / res["payload_bytes"],
                            res["drain_seconds"])
                    print("run %d sync=%s %-4s agent: %s written, %.3f B/payload B "
                          "(cancelled %s, log %d B)%s"
                          % (run, sync, scen, fmt_bytes(res["write_bytes"]),
                             res["per_payload_byte"], fmt_bytes(res["cancelled"]),
                             res["log_bytes"], extra), flush=True)
                if txn is None:
                    txn = max(1, int(args.rate * DEFAULT_COMMIT_INTERVAL_S))
                b = baseline(args, sync, txn, payload_bytes)
                b["txn"] = txn
                results.setdefault((sync, "baseline"), []).append(b)
                print("run %d sync=%s baseline (SQLite row per record, %d-row transactions): "
                      "%s written, %.3f B/payload B (cancelled %s)"
                      % (run, sync, txn, fmt_bytes(b["write_bytes"]), b["per_payload_byte"],
                         fmt_bytes(b["cancelled"])), flush=True)
    except (ch.TestFailure, BenchError, OSError, subprocess.CalledProcessError) as e:
        sys.stderr.write("flash_wear: FAILED: %s\n" % e)
        return 1

    elapsed = time.monotonic() - t_start
    med = {k: statistics.median(r["per_payload_byte"] for r in v) for k, v in results.items()}
    print()
    print("Median of %d run(s), %d JSON records of %.1f B at %d rec/s (%d payload bytes); "
          "bytes written to disk per payload byte:" % (args.runs, n, payload_bytes / n,
                                                       args.rate, payload_bytes))
    print()
    print("| spool.sync | baseline: SQLite row per record (txn rows) | agent, uplink up "
          "(drained) | agent, uplink down (spool grows) | spool zstd ratio (down) |")
    print("|---|---:|---:|---:|---:|")
    for sync in syncs:
        bl = results[(sync, "baseline")]
        cells = ["%.3f (%d)" % (med[(sync, "baseline")], statistics.median(b["txn"] for b in bl))]
        for scen in ("up", "down"):
            if (sync, scen) in med:
                m = med[(sync, scen)]
                cells.append("%.3f (%.2fx baseline)" % (m, m / med[(sync, "baseline")]))
            else:
                cells.append("-")
        if (sync, "down") in results:
            cells.append("%.2fx" % statistics.median(
                r["spool"]["raw"] / max(1, r["spool"]["stored"]) for r in results[(sync, "down")]))
        else:
            cells.append("-")
        print("| %s | %s |" % (sync, " | ".join(cells)))
    print()
    for k in sorted(results):
        print("runs %s %s: %s" % (k[0], k[1], " / ".join("%.3f" % r["per_payload_byte"]
                                                          for r in results[k])))
    print("full run took %.0f s" % elapsed)
    # For bench/run.sh: one line per figure; ratio = agent / baseline of the same sync level.
    for k in sorted(med):
        if k[1] == "baseline":
            print("RESULT B5 baseline_%s_bytes_per_payload_byte %.3f" % (k[0], med[k]))
        else:
            print("RESULT B5 agent_%s_%s_bytes_per_payload_byte %.3f ratio=%.2f"
                  % (k[0], k[1], med[k], med[k] / med[(k[0], "baseline")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

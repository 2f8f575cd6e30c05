#!/usr/bin/env python3
"""End-to-end on loopback: records pipelined into the agent's TCP socket input, committed to
its spool, forwarded over mTLS (HTTPS to the receiver, or MQTT through a local mosquitto with
TLS and client certificates, acknowledged end to end), stored by the receiver in SQLite with
dedup.

Reports, as the median of --runs runs: the ingest rate (all OK answers received) and the
end-to-end rate (all records stored at the receiver), beside the baseline measured in the
same run: raw SQLite inserts of the same rows under the receiver's unique key
(bench/baseline_sqlite, 1,000-row transactions, WAL).

Usage: bench/e2e.py --build build [--transport https|mqtt] [--records 200000] [--runs 3]
"""
import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "integration"))
import cistern_harness as ch  # noqa: E402


def payload(i):
    # ~100-byte JSON sensor record, the same shape baseline_sqlite inserts
    return (b'{"sensor":"s-%03d","n":%09d,"temp_c":%5.2f,"humidity":%4.1f,"pad":"xxxxxxxxxxxx"}'
            % (i % 64, i, 18.0 + (i % 800) / 100.0, 40.0 + (i % 300) / 10.0))


def one_run(build, n, transport):
    h = ch.Harness("bench", agent_bin=os.path.join(build, "bin", "cistern-agent"),
                   receiver_bin=os.path.join(build, "bin", "cistern-receiver"))
    try:
        broker = h.mosquitto().start() if transport == "mqtt" else None
        r = ch.Receiver(h, log_level="warn", mqtt=broker).start()
        if broker is not None:
            r.wait_subscribed()
        a = ch.Agent(h, "agent", "gw-bench", r, unix_socket=False, log_level="warn",
                     mqtt=broker,
                     extra={"spool": {"commit_interval": "200ms"},
                            "forward": {"batch": {"max_delay": "100ms"}}}).start()
        data = b"".join(payload(i) + b"\n" for i in range(n))
        s = socket.create_connection(("127.0.0.1", a.tcp_port))
        answers = [0]
        done = threading.Event()

        def reader():
            while answers[0] < n:
                d = s.recv(1 << 20)
                if not d:
                    break
                answers[0] += d.count(b"\n")
            done.set()

        t = threading.Thread(target=reader)
        t.start()
        t0 = time.monotonic()
        s.sendall(data)
        done.wait(600)
        t_ok = time.monotonic()
        ch.check(answers[0] == n, "only %d of %d answers" % (answers[0], n))
        con = r.db()
        while True:
            c = con.execute("SELECT count(*) FROM records WHERE agent_id='gw-bench'").fetchone()[0]
            if c >= n:
                break
            ch.check(time.monotonic() - t0 < 600, "not all stored after 600 s (%d)" % c)
            time.sleep(0.02)
        t_stored = time.monotonic()
        con.close()
        s.close()
        t.join()
        return n / (t_ok - t0), n / (t_stored - t0)
    finally:
        h.cleanup()


def baseline(build, n):
    d = tempfile.mkdtemp(prefix="cistern-bench-")
    try:
        out = subprocess.run([os.path.join(build, "bench", "baseline_sqlite"),
                              os.path.join(d, "b.db"), str(n), "unique"],
                             check=True, stdout=subprocess.PIPE).stdout.decode()
        return float(out.split("rows_per_s=")[1])
    finally:
        subprocess.run(["rm", "-rf", d])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", default="build")
    ap.add_argument("--records", type=int, default=200000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--transport", choices=("https", "mqtt"), default="https")
    args = ap.parse_args()
    if args.transport == "mqtt" and ch.mosquitto_missing():
        sys.exit("bench: not installed: %s (scripts/deps.sh installs it)" % ch.mosquitto_missing())
    ingest, e2e, base = [], [], []
    for i in range(args.runs):
        b = baseline(args.build, args.records)
        ing, end = one_run(args.build, args.records, args.transport)
        base.append(b)
        ingest.append(ing)
        e2e.append(end)
        print("run %d: baseline %.0f rows/s, agent ingest %.0f rec/s, end-to-end %.0f rec/s"
              % (i + 1, b, ing, end), flush=True)
    mb, mi, me = statistics.median(base), statistics.median(ingest), statistics.median(e2e)
    print("median of %d runs, %d records of ~100 bytes:" % (args.runs, args.records))
    print("  baseline (SQLite INSERT OR IGNORE, unique key): %9.0f rows/s" % mb)
    print("  agent ingest (OK answered):                     %9.0f rec/s" % mi)
    print("  end to end over %-5s (stored at receiver):     %9.0f rec/s  (%.2fx baseline)"
          % (args.transport.upper(), me, me / mb))


if __name__ == "__main__":
    main()

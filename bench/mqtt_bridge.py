#!/usr/bin/env python3
"""B3: end to end over MQTT, Cistern against the do-it-yourself mosquitto bridge.

Per run, interleaved: the baseline, then Cistern, each on fresh processes. Medians of --runs
runs, and the ratio Cistern / baseline as the median of the per-run ratios (as bench/e2e.py).

Cistern: bench/e2e.py's one_run(BUILD, N, "mqtt"): bench/feed pipelines the records into the
agent's TCP socket input (answered after the spool commit), the agent forwards batches to a
mosquitto over mTLS (client certificates, ACL), the receiver stores them in SQLite under the
unique key and acknowledges end to end. Rate: N / (first record sent -> all N stored).

The baseline, the usual do-it-yourself setup: an "edge" mosquitto bridged to a "cloud"
mosquitto, both the system /usr/sbin/mosquitto (2.0.11), on loopback, plain TCP (TLS on the
bridge and the clients would only make the baseline slower; Cistern's side runs mTLS).
bench/mqtt_pubsub (Paho MQTT C, async API) publishes the same records (bench/e2e.py payload(),
checked byte for byte), one per message at QoS 1, to the edge broker, and a subscriber (a
child process) takes them at QoS 1 on sensors/# from the cloud broker. Rate: N / (first
publish -> N-th distinct record at the subscriber, by its "n" field; duplicates counted and
reported). Also reported per run: the edge broker's PUBACK rate, the CPU seconds of each
broker and of mqtt_pubsub, and the bytes each broker wrote to disk (/proc/PID/io).

The baseline's configuration (each broker's mosquitto.conf; anything not listed is
mosquitto's default):
  persistence true, persistence_location in the run's temp dir under --dir (default /var/tmp,
      a disk), persistence_file mosquitto.db. autosave_interval stays at its default, 1800 s:
      mosquitto keeps messages in memory and writes its database every 30 minutes and at a
      clean exit, so during a run it writes none of the messages (the per-run bytes-written
      figure shows a few KiB at most: its log lines).
  Bridge, on the edge broker: connection cloud; address 127.0.0.1:<cloud port>;
      topic sensors/# out 1; cleansession false; bridge_protocol_version mqttv311 (mosquitto's
      default; mqttv50 measured no faster here, and with mqttv50 max_inflight_messages must be
      1 or more: the bridge sends it as its Receive Maximum, where 0 is a protocol error and the
      bridge never connects). Defaults otherwise: try_private true, notifications true,
      keepalive_interval 60, restart_timeout 5 30, remote_clientid <hostname>.cloud.
  max_inflight_messages 1000 (default 20), both brokers: the window of QoS 1 messages each
      broker has in flight to a client (the bridge, the subscriber), and the Receive Maximum it
      announces to MQTT 5 clients. With the MQTT 3.1.1 clients used here, 20 measured the same
      rate; but at 20, a Paho MQTT 5 publisher crawls at ~450 rec/s (it sends 20, then stalls
      ~45 ms), so 1000 keeps --client-mqtt 5 a fair option.
  max_queued_messages 0 (no limit; default 1000), both brokers: messages queued for a client
      beyond those in flight. With the bridge up the queue stays short (1000 measured the same
      rate), but a store-and-forward user must raise it: at the default, a cloud outage of more
      than 1000 messages drops the rest at the edge. The queue is held in memory.
  set_tcp_nodelay false (the default; true measured no faster). Default log types (no
      per-message lines) to a file: the driver reads the cloud broker's log to learn that the
      bridge is up. user root when run as root (else mosquitto cannot write its files here).
The clients (bench/mqtt_pubsub): MQTT 3.1.1 (--client-mqtt 5 measured no faster), clean
sessions, MQTTCLIENT_PERSISTENCE_NONE; the publisher keeps up to 300 messages unacknowledged
(--window; Paho's maxInflight and maxBufferedMessages are sized from it). 300 was the best of
a sweep from 50 to 10000 (medians of 3 runs of 200,000 records, on a shared 2-core machine):
200-500 were within the noise of it, the others 5-20% slower. The subscriber runs in its own
process: Paho's async library serialises all clients of a process on one mutex. Paho costs
the baseline more CPU per message than both brokers together (the per-run CPU figures show
it): on a small machine that, as much as the brokers, bounds the baseline's rate; it is what
doing this with Paho, the library Cistern's agent uses too, costs.

What the baseline does NOT give, and Cistern does:
  - No end-to-end acknowledgement. The publisher's PUBACK comes from the edge broker: it says
    the edge broker holds the message in memory, not that the cloud has it, nor that anything
    is on disk. Nothing tells the publisher of a loss after that point. Cistern answers a
    source after its spool commit, and deletes a record only after the receiver acknowledged
    the committed store transaction that holds it.
  - No durability between snapshots: a power cut or kill -9 of the edge broker loses every
    message accepted since the last autosave (up to 30 minutes at the default).
  - Drops without an account: past max_queued_messages / max_queued_bytes (default 1000
    messages per client) or memory_limit, mosquitto drops messages, and logs only "Outgoing
    messages are being dropped for client X" and a $SYS rate: not which, nor how many, and the
    cloud side never learns of it. Cistern bounds its spool by size, and writes every drop
    (eviction, TTL, rejection, quarantine) to a loss ledger forwarded to the receiver.
  - No dedup: QoS 1 redelivers after a reconnect, and the subscriber sees duplicates; there is
    no record identity. Cistern's (agent_id, epoch, seq) key stores each record once.
  - No store: the cloud broker only hands messages to a subscriber (here a counter); Cistern's
    rate includes the receiver's SQLite commit.

Usage: bench/mqtt_bridge.py --build BUILD [--records 200000] [--runs 3] [--dir /var/tmp]
       (--help for the baseline's tuning options; --baseline-only to tune it alone)
"""
import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests", "integration"))
import cistern_harness as ch  # noqa: E402
import e2e  # noqa: E402  (Cistern's side, payload() and the shared helpers)

TOPIC = "sensors/bench"


def broker_conf(name, port, state_dir, log_path, max_inflight, max_queued, nodelay,
                bridge=None):
    """The mosquitto.conf of one broker of the baseline. bridge: (cloud port, protocol) for
    the edge broker's bridge to the cloud broker, None for the cloud broker."""
    conf = [
        "# bench/mqtt_bridge.py: the %s broker of B3's do-it-yourself baseline" % name,
        "persistence true",
        "persistence_location %s/" % state_dir,
        "persistence_file mosquitto.db",
        "max_inflight_messages %d" % max_inflight,
        "max_queued_messages %d" % max_queued,
        "set_tcp_nodelay %s" % ("true" if nodelay else "false"),
        # default log types (no per-message debug lines): connections are logged, which is how
        # the driver learns that the bridge is up
        "log_dest file %s" % log_path,
        "log_timestamp true",
    ]
    if os.geteuid() == 0:
        conf.append("user root")  # else mosquitto drops to 'mosquitto', who can't write here
    conf += ["listener %d 127.0.0.1" % port, "allow_anonymous true"]
    if bridge is not None:
        cloud_port, protocol = bridge
        conf += [
            "",
            "connection cloud",
            "address 127.0.0.1:%d" % cloud_port,
            "topic sensors/# out 1",
            "cleansession false",
            "bridge_protocol_version %s" % protocol,
        ]
    return "\n".join(conf) + "\n"


def bridge_run(bins, n, args):
    """One run of the baseline: two fresh brokers, then bench/mqtt_pubsub. Returns a dict:
    rec_per_s (first publish -> N-th distinct record at the cloud subscriber),
    puback_rec_per_s (first publish -> N-th PUBACK from the edge broker), dups, detail."""
    h = ch.Harness("b3-bridge")  # its temp dir is under --dir (e2e.setup_env): a disk
    ok = False
    try:
        cloud_port, edge_port = ch.free_port(), ch.free_port()
        brokers = {}
        for name, port, bridge in (("cloud", cloud_port, None),
                                   ("edge", edge_port, (cloud_port, args.bridge_protocol))):
            d = h.path(name)  # persistence_location
            os.makedirs(d)
            conf = os.path.join(d, "mosquitto.conf")
            with open(conf, "w") as f:
                f.write(broker_conf(name, port, d, h.path(name + ".log"), args.max_inflight,
                                    args.max_queued, args.tcp_nodelay, bridge))
            # not under a test wrapper: the brokers are the baseline, not our code
            p = h.add_proc(name, [ch.MOSQUITTO_BIN, "-c", conf], wrapper=[])
            brokers[name] = p
            p.start()
            h.wait(lambda port=port: ch.port_listening(port), 30,
                   "the %s broker to listen on port %d" % (name, port))
        # the bridge is up once the cloud broker has accepted its connection (mosquitto logs
        # "New bridge connected from ADDR as <hostname>.cloud" for a try_private bridge)
        h.wait(lambda: re.search(r"New (bridge|client) connected from \S+ as \S*cloud\b",
                                 brokers["cloud"].log_text()), 30,
               "the edge broker's bridge to connect to the cloud broker")
        argv = [bins.pubsub, "tcp://127.0.0.1:%d" % edge_port, "tcp://127.0.0.1:%d" % cloud_port,
                str(n), "--window", str(args.window), "--mqtt", args.client_mqtt,
                "--topic", TOPIC, "--timeout", str(args.timeout)]
        cpu0 = {k: e2e.cpu_seconds(p.pid) for k, p in brokers.items()}
        io0 = {k: write_bytes(p.pid) for k, p in brokers.items()}
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        try:
            r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               universal_newlines=True, timeout=args.timeout + 60)
        except subprocess.TimeoutExpired:
            raise e2e.BenchError("mqtt_pubsub still running after %d s" % (args.timeout + 60))
        try:
            h.check_alive()  # a broker that died is the failure to report first
        except ch.TestFailure as e:
            raise e2e.BenchError("baseline: %s; mqtt_pubsub: %s" % (e, r.stderr.strip()))
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = {k: e2e.cpu_seconds(p.pid) - cpu0[k] for k, p in brokers.items()}
        io = {k: write_bytes(p.pid) - io0[k] for k, p in brokers.items()}
        cpu["client"] = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
        if r.returncode != 0:
            raise e2e.BenchError("baseline: mqtt_pubsub failed (exit %d): %s"
                                 % (r.returncode, r.stderr.strip()))
        res = e2e.kv_line(r.stdout, "mqtt_pubsub")
        pa = re.search(r"puback_rec_per_s=(\S+)", r.stdout)
        if int(res["records"]) != n or int(res["received"]) != n or pa is None:
            raise e2e.BenchError("baseline: %s of %d records arrived at the cloud subscriber"
                                 % (res.get("received"), n))
        ok = True
        return {"rec_per_s": float(res["rec_per_s"]), "puback_rec_per_s": float(pa.group(1)),
                "dups": int(res["dups"]), "cpu": cpu, "io": io,
                "detail": r.stdout.strip() + "\ncpu seconds: edge broker %.2f, cloud broker "
                "%.2f, mqtt_pubsub (both ends) %.2f; bytes written to disk: edge broker %d, "
                "cloud broker %d" % (cpu["edge"], cpu["cloud"], cpu["client"], io["edge"],
                                     io["cloud"])}
    finally:
        if not ok:
            h.dump_logs(20)
        h.cleanup()


def write_bytes(pid):
    """Bytes PID has caused to be written to storage so far (/proc/PID/io write_bytes)."""
    with open("/proc/%d/io" % pid) as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    raise e2e.BenchError("no write_bytes in /proc/%d/io" % pid)


def cistern_run(args):
    """Cistern over MQTT, as bench/e2e.py measures it (its one_run()): bench/feed into the
    agent's socket input, agent -> mosquitto (mTLS) -> receiver, stored in SQLite and
    acknowledged end to end. Returns its result dict (ingest, e2e: rec/s)."""
    return e2e.one_run(args.build, args.records, "mqtt", sync=args.sync,
                       agent_set=args.agent_set, timeout=args.timeout)


def check_payloads(bins):
    """mqtt_pubsub publishes exactly e2e.payload(i): a sample at both ends of the range,
    compared byte for byte (e2e.check_payloads checks feed, Cistern's source)."""
    for offset, n in ((0, 2000), (999000, 1000)):
        out = subprocess.run([bins.pubsub, "--dump", str(n), "--offset", str(offset)],
                             check=True, stdout=subprocess.PIPE).stdout
        if out != b"".join(e2e.payload(offset + i) + b"\n" for i in range(n)):
            raise e2e.BenchError("bench/mqtt_pubsub.c payload() no longer makes the records of "
                                 "bench/e2e.py payload(): keep them in sync")


def main():
    ap = argparse.ArgumentParser(
        prog="bench/mqtt_bridge.py",
        description="B3: end to end over MQTT. Cistern (agent -> mosquitto -> receiver, "
                    "acknowledged end to end) against the do-it-yourself baseline (edge "
                    "mosquitto bridged to a cloud mosquitto, QoS 1, persistence), measured "
                    "interleaved in the same run.",
        epilog="Prints per-run figures, the medians, and RESULT lines (B3 bridge_rec_per_s; "
               "B3 cistern_mqtt_rec_per_s, ratio = median of the per-run ratios to the "
               "baseline). Exits 1 if a process fails or a record is missing, 2 on bad "
               "arguments.")
    ap.add_argument("--build", default="build",
                    help="CMake build dir: BUILD/bin/cistern-{agent,receiver}, "
                         "BUILD/bench/{mqtt_pubsub,feed} (default build)")
    ap.add_argument("--records", type=int, default=200000, help="records per run (default 200000)")
    ap.add_argument("--runs", type=int, default=3, help="runs; medians reported (default 3)")
    ap.add_argument("--dir", default="/var/tmp",
                    help="where the brokers' persistence, the spool and the receiver's store "
                         "go; a disk, not tmpfs (default /var/tmp)")
    ap.add_argument("--timeout", type=int, default=600, help="seconds before a stuck run fails")
    g = ap.add_argument_group("the baseline (defaults: its best measured setting, see the "
                              "docstring)")
    g.add_argument("--window", type=int, default=WINDOW,
                   help="publisher: QoS 1 messages unacknowledged at once (default %(default)s)")
    g.add_argument("--client-mqtt", choices=("5", "311"), default=CLIENT_MQTT,
                   help="publisher's and subscriber's MQTT version (default %(default)s)")
    g.add_argument("--bridge-protocol", choices=("mqttv311", "mqttv50"), default=BRIDGE_PROTO,
                   help="the bridge's bridge_protocol_version (default %(default)s)")
    g.add_argument("--max-inflight", type=int, default=MAX_INFLIGHT,
                   help="both brokers' max_inflight_messages (default %(default)s)")
    g.add_argument("--max-queued", type=int, default=0,
                   help="both brokers' max_queued_messages (default %(default)s: no limit)")
    g.add_argument("--tcp-nodelay", action="store_true",
                   help="set_tcp_nodelay true on both brokers (default: mosquitto's, false)")
    g.add_argument("--baseline-only", action="store_true",
                   help="run the baseline alone (to tune it): no Cistern, no ratio")
    c = ap.add_argument_group("Cistern (as bench/e2e.py --transport mqtt runs it)")
    c.add_argument("--sync", choices=("full", "normal"), default="full",
                   help="the receiver's store.sync (default full, the receiver's default)")
    c.add_argument("--agent-set", action="append", default=[], metavar="KEY=VALUE",
                   help="agent config beyond the product's defaults (repeatable)")
    args = ap.parse_args()
    if args.records <= 0 or args.runs <= 0 or args.timeout <= 0:
        ap.error("--records, --runs and --timeout must be above 0")
    if not 1 <= args.window <= 65535 or args.max_inflight < 0 or args.max_queued < 0:
        ap.error("--window must be 1..65535, --max-inflight and --max-queued 0 or more")
    if args.bridge_protocol == "mqttv50" and args.max_inflight == 0:
        # the v5 bridge sends max_inflight_messages as its Receive Maximum, where 0 is a
        # protocol error: the cloud broker drops it and the bridge never comes up
        ap.error("--bridge-protocol mqttv50 needs --max-inflight 1 or more")
    if ch.mosquitto_missing():
        sys.exit("bench B3: not installed: %s (scripts/deps.sh installs it)"
                 % ch.mosquitto_missing())
    try:
        bins = e2e.Bins(args.build)
    except e2e.BenchError as e:
        ap.error(str(e))
    bins.pubsub = os.path.abspath(os.path.join(args.build, "bench", "mqtt_pubsub"))
    if not os.access(bins.pubsub, os.X_OK):
        ap.error("%s is not an executable (build first: cmake --build %s; or fix --build)"
                 % (bins.pubsub, args.build))
    fs = e2e.check_dir(ap, args.dir)
    args.dir = os.path.abspath(args.dir)
    e2e.setup_env(args.dir)
    try:
        defaults = e2e.config_defaults(bins.agent)
        e2e.check_agent_set(ap, args.agent_set, defaults, bins.agent)
        e2e.check_payloads(bins)
        check_payloads(bins)
    except (e2e.BenchError, OSError, subprocess.CalledProcessError) as e:
        sys.stderr.write("mqtt_bridge: FAILED: %s\n" % e)
        return 1

    print("B3 (MQTT): %d records of %d bytes per run, %d run(s); dir %s (%s)"
          % (args.records, e2e.PAYLOAD_LEN, args.runs, args.dir, fs))
    print("baseline: bridge_protocol_version %s, clients MQTT %s, publisher window %d, "
          "max_inflight_messages %d, max_queued_messages %d, set_tcp_nodelay %s, plain TCP"
          % (args.bridge_protocol, "5" if args.client_mqtt == "5" else "3.1.1", args.window,
             args.max_inflight, args.max_queued, "true" if args.tcp_nodelay else "false"),
          flush=True)
    runs = []  # (baseline result, cistern result)
    t0 = time.monotonic()
    try:
        for i in range(args.runs):
            b = bridge_run(bins, args.records, args)
            line = ("run %d: bridge %.0f rec/s (edge PUBACKs %.0f rec/s, %d dups)"
                    % (i + 1, b["rec_per_s"], b["puback_rec_per_s"], b["dups"]))
            detail = "\n  " + b["detail"].replace("\n", "\n  ")
            if args.baseline_only:
                runs.append((b, None))
                print(line + detail, flush=True)
                continue
            c = cistern_run(args)
            runs.append((b, c))
            print(line + " | Cistern over MQTT %.0f rec/s end to end, ingest %.0f rec/s (%.2fx)"
                  % (c["e2e"], c["ingest"], c["e2e"] / b["rec_per_s"]) + detail, flush=True)
    except (ch.TestFailure, e2e.BenchError, OSError, subprocess.CalledProcessError) as e:
        sys.stderr.write("mqtt_bridge: FAILED: %s\n" % e)
        return 1

    mb = statistics.median(b["rec_per_s"] for b, _ in runs)
    mp = statistics.median(b["puback_rec_per_s"] for b, _ in runs)
    print()
    print("median of %d run(s), %d records of %d bytes (%.0f s in all):"
          % (args.runs, args.records, e2e.PAYLOAD_LEN, time.monotonic() - t0))
    print("  baseline: edge mosquitto -> bridge -> cloud mosquitto, QoS 1, persistence, plain TCP")
    print("    first publish -> N-th distinct record at the cloud subscriber: %9.0f rec/s" % mb)
    print("    first publish -> N-th PUBACK of the edge broker (no e2e ack):  %9.0f rec/s" % mp)
    print("    the brokers wrote at most %d bytes to disk in a run (their logs): a PUBACK means "
          "\"in the edge broker's memory\"" % max(b["io"]["edge"] + b["io"]["cloud"]
                                                  for b, _ in runs))
    if args.baseline_only:
        print("RESULT B3 bridge_rec_per_s %.0f" % mb)
        return 0
    mc = statistics.median(c["e2e"] for _, c in runs)
    mi = statistics.median(c["ingest"] for _, c in runs)
    ratio = e2e.med_ratio([(b["rec_per_s"], c["e2e"]) for b, c in runs])
    print("  Cistern: agent -> mosquitto (mTLS) -> receiver, SQLite, acknowledged end to end")
    print("    first record sent -> all stored at the receiver:              %9.0f rec/s  "
          "(%.2fx the baseline, median of per-run ratios; target 2x)" % (mc, ratio))
    print("    first record sent -> all answered OK (committed to the spool): %9.0f rec/s" % mi)
    print("RESULT B3 bridge_rec_per_s %.0f" % mb)
    print("RESULT B3 cistern_mqtt_rec_per_s %.0f ratio=%.2f" % (mc, ratio))
    return 0


# The baseline's tuning (see the docstring for why these values).
WINDOW = 300
CLIENT_MQTT = "311"
BRIDGE_PROTO = "mqttv311"
MAX_INFLIGHT = 1000

if __name__ == "__main__":
    sys.exit(main())

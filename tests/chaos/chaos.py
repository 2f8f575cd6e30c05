"""The chaos suite's checker and load, shared by every scenario (issue 7).

Every scenario ends the same way: once the faults stop and the spool has drained, three
sets are compared:
  sent      every payload a source wrote (unique lines "<prefix>-<n>"),
  accepted  the payloads a source was told were accepted ("OK <seq>" from the socket input,
            or the QoS 1 PUBACK for the MQTT input),
  stored    the rows the receiver holds;
and the verdict is
  lost        = accepted - stored                  must be 0
  duplicated  = rows beyond one per key, plus payloads stored under more than one key
                                                     must be 0
  unexpected  = stored - sent                        must be 0
  stored_unacked = stored - accepted  (information: sent, stored, never acknowledged, e.g.
                the agent was killed between its commit and its answer).

Parameters: each scenario has a short form (the default, in CI) and a full one
(CISTERN_CHAOS_FULL=1, scripts/chaos.sh --full). Every scenario prints one line
"CHAOS-RESULT {json}" with its parameters and figures, and appends it to the file named by
CISTERN_CHAOS_RESULTS when set (scripts/chaos.sh collects them for docs/reliability.md)."""
import json
import os
import socket
import sqlite3
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "integration"))
import cistern_harness as ch  # noqa: E402

FULL = os.environ.get("CISTERN_CHAOS_FULL") == "1"


def param(short, full):
    """The scenario's parameter: SHORT in CI, FULL with CISTERN_CHAOS_FULL=1."""
    return full if FULL else short


class Tally:
    """What the sources sent and what they were told was accepted, across every connection
    and restart. Payloads are bytes and unique per scenario."""

    def __init__(self):
        self.lock = threading.Lock()
        self.sent = set()
        self.accepted = set()

    def add(self, sent=(), accepted=()):
        with self.lock:
            self.sent.update(sent)
            self.accepted.update(accepted)

    def add_client(self, c):
        """Merge a SocketClient (alive or not): every line it wrote, and those answered OK."""
        with c.cond:
            sent = list(c.sent)
            ok = [sent[i] for i, a in enumerate(c.answers) if a[0] == "OK" and i < len(sent)]
        self.add(sent, ok)


class Feeder(threading.Thread):
    """Writes unique lines "<prefix>-<n>" to an agent's socket input at about RATE lines/s, in
    chunks, over one connection at a time; when the connection breaks (the agent was killed)
    it reconnects as soon as the agent listens again. Every connection's lines and OKs go to
    TALLY. stop() waits for the last connection's answers (if the agent is up)."""

    def __init__(self, agent, tally, prefix, rate=5000, chunk=100, via="unix",
                 max_unanswered=5000):
        super().__init__(daemon=True)
        self.agent, self.tally, self.prefix = agent, tally, prefix
        self.rate, self.chunk, self.via = rate, chunk, via
        self.max_unanswered = max_unanswered
        self.stop_flag = threading.Event()
        self.n = 0
        self.client = None
        self.connections = 0
        self.error = None

    def _connect(self):
        while not self.stop_flag.is_set():
            try:
                c = self.agent.client(self.via)
                self.connections += 1
                return c
            except OSError:
                time.sleep(0.05)
        return None

    def run(self):
        try:
            interval = self.chunk / float(self.rate)
            next_at = time.monotonic()
            c = self._connect()
            while c is not None and not self.stop_flag.is_set():
                if c.eof:
                    self.tally.add_client(c)
                    c.abort()
                    c = self.client = self._connect()
                    continue
                self.client = c
                lines = [("%s-%d" % (self.prefix, self.n + i)).encode()
                         for i in range(self.chunk)]
                try:
                    c.send_many(lines)
                except OSError:
                    # the lines may be partly written: count them as sent, never as accepted
                    self.tally.add(lines)
                    with c.cond:
                        c.eof = True
                self.n += self.chunk
                while (not c.eof and not self.stop_flag.is_set()
                       and len(c.sent) - len(c.answers) > self.max_unanswered):
                    time.sleep(0.005)
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                else:
                    next_at = time.monotonic()
        except Exception as e:  # surfaced by stop()
            self.error = e

    def stop(self, timeout=60):
        """Stop writing; wait for the answers of the live connection; merge it into the
        tally."""
        self.stop_flag.set()
        self.join(timeout)
        ch.check(not self.is_alive(), "feeder %s did not stop" % self.prefix)
        ch.check(self.error is None, "feeder %s failed: %r" % (self.prefix, self.error))
        c = self.client
        if c is not None:
            if not c.eof:
                try:
                    c.wait_answers(timeout=timeout)
                except ch.TestFailure:
                    pass  # counted as sent, not accepted
            self.tally.add_client(c)
            c.close()


def integrity_check(spool_path):
    """PRAGMA integrity_check of a spool that no process has open (after a kill, before the
    restart). Fails the test unless it says ok."""
    if not os.path.exists(spool_path):
        return
    con = sqlite3.connect("file:%s?mode=ro" % spool_path, uri=True, timeout=10)
    try:
        r = con.execute("PRAGMA integrity_check").fetchall()
    finally:
        con.close()
    ch.check(r == [("ok",)], "spool %s fails integrity_check: %r" % (spool_path, r[:5]))


def stored_rows(receiver, agent_ids):
    """[(agent_id, epoch, seq, payload)] the receiver holds for AGENT_IDS."""
    rows = []
    for aid in agent_ids:
        rows.extend((aid, e, s, p) for e, s, p, _st in receiver.rows(aid))
    return rows


def verdict(receiver, agent_ids, tally):
    """The three-set comparison; returns a dict of figures (see the module's doc)."""
    rows = stored_rows(receiver, agent_ids)
    keys = {}
    payloads = {}
    for aid, e, s, p in rows:
        keys[(aid, e, s)] = keys.get((aid, e, s), 0) + 1
        payloads.setdefault(bytes(p), set()).add((aid, e, s))
    dup_rows = sum(n - 1 for n in keys.values())
    dup_payloads = sum(len(k) - 1 for k in payloads.values())
    stored = set(payloads)
    with tally.lock:
        sent, accepted = set(tally.sent), set(tally.accepted)
    lost = accepted - stored
    unexpected = stored - sent
    return {
        "sent": len(sent),
        "accepted": len(accepted),
        "stored": len(stored),
        "lost": len(lost),
        "duplicated": dup_rows + dup_payloads,
        "unexpected": len(unexpected),
        "stored_unacked": len(stored - accepted),
        "examples": {
            "lost": sorted(p.decode("utf-8", "replace") for p in list(lost)[:5]),
            "unexpected": sorted(p.decode("utf-8", "replace") for p in list(unexpected)[:5]),
            "duplicated": [p.decode("utf-8", "replace") for p, k in payloads.items()
                           if len(k) > 1][:5],
        },
    }


def assert_verdict(v):
    ch.check(v["accepted"] > 0, "nothing was accepted: the scenario tested nothing")
    ch.check(v["lost"] == 0 and v["duplicated"] == 0 and v["unexpected"] == 0,
             "contract broken: lost %d, duplicated %d, unexpected %d (examples %r)"
             % (v["lost"], v["duplicated"], v["unexpected"], v["examples"]))


def report(scenario, params, v, **extra):
    """Print (and append to $CISTERN_CHAOS_RESULTS) one CHAOS-RESULT line."""
    rec = {"scenario": scenario, "full": FULL, "date": time.strftime("%Y-%m-%d"),
           "params": params}
    rec.update({k: v[k] for k in ("sent", "accepted", "stored", "lost", "duplicated",
                                  "unexpected", "stored_unacked")})
    rec.update(extra)
    line = "CHAOS-RESULT " + json.dumps(rec, sort_keys=True)
    print(line, flush=True)
    path = os.environ.get("CISTERN_CHAOS_RESULTS")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")
    return rec


def rng():
    """The scenario's random.Random: seeded from CISTERN_CHAOS_SEED, else from the clock, and
    the seed printed so that a failing run can be replayed (CISTERN_CHAOS_SEED=<seed>)."""
    import random
    seed = int(os.environ.get("CISTERN_CHAOS_SEED") or (time.time_ns() % 1000000007))
    ch.log("random seed %d (replay with CISTERN_CHAOS_SEED=%d)" % (seed, seed))
    return random.Random(seed)


def wait_drained(h, agents, timeout=300):
    """After the faults stopped and the feeders were stopped: wait until every agent's spool
    holds no segment (each one was acknowledged by the receiver after its store committed).
    Fails when a spool still holds segments after TIMEOUT seconds. Returns the seconds
    waited (the figure "drain_s" of the CHAOS-RESULT lines counts from the last fault)."""
    t0 = time.monotonic()
    h.wait(lambda: all(a.segment_count() == 0 for a in agents), timeout=timeout,
           what="the spool(s) of %s to drain" % ", ".join(a.name for a in agents), interval=0.2)
    return time.monotonic() - t0


# ---------------------------------------------------------------------------------------
# Network namespaces (scenario 4): a process on the far side of a real link

import re  # noqa: E402


def _sh(argv, check_rc=True, stdin=None):
    import subprocess
    r = subprocess.run(argv, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=60)
    out = r.stdout.decode("utf-8", "replace")
    if check_rc and r.returncode != 0:
        raise ch.TestFailure("`%s` exited %d: %s" % (" ".join(argv), r.returncode, out.strip()))
    return r.returncode, out


class NetNS:
    """A network namespace joined to the host by a veth pair on a private /30: the host's
    side has host_ip, the namespace's side ns_ip. Run a process inside with
    wrapper=ns.wrapper() (Agent, add_proc): `ip netns exec NAME` execs it, so its pid is the
    process's. A Unix socket path works from both sides (they share the filesystem).

    loss(pct): nftables in the namespace drops PCT% of the packets crossing the veth, at
    random, each way (input and output hooks: every packet passes one of them once).
    cut(side)/restore(): `ip link set DEV down` on the namespace's end ("ns": the agent's
    routes go, connects fail at once with ENETUNREACH) or on the host's end ("host": no
    carrier, packets vanish, connections hang until their timeouts).

    The link carries packets of one MTU (gso_max_segs 1), so a dropped packet is one
    packet, as on a wire. Names carry TAG and the test's pid (namespace cisns<TAG>-<pid>,
    veths <TAG>h<pid> and <TAG>n<pid>: at most 15 characters), and the /30 is one no host
    interface uses, so concurrent runs do not collide; a new one removes the namespaces of
    runs that died without cleaning up (their pid is gone). close() (also run at exit)
    deletes the veth and the namespace: stop the processes inside first."""

    PREFIX = "cisns"

    @staticmethod
    def unavailable():
        """None when namespaces, veth and nft can be used here, else why not."""
        import shutil
        if os.geteuid() != 0:
            return "not root (ip netns and nft need CAP_NET_ADMIN)"
        for tool in ("ip", "nft"):
            if not shutil.which(tool):
                return "%s is not installed" % tool
        return None

    def __init__(self, tag):
        self.name = "%s%s-%d" % (self.PREFIX, tag, os.getpid())
        self.host_dev = "%sh%d" % (tag, os.getpid())
        self.ns_dev = "%sn%d" % (tag, os.getpid())
        self.created = False
        self.lossy = 0
        self.down = None
        self._reap_stale()
        self.host_ip, self.ns_ip = self._pick_subnet()
        import atexit
        atexit.register(self.close)
        try:
            _sh(["ip", "netns", "add", self.name])
            self.created = True
            _sh(["ip", "link", "add", self.host_dev, "type", "veth", "peer", "name", self.ns_dev])
            _sh(["ip", "link", "set", self.ns_dev, "netns", self.name])
            _sh(["ip", "addr", "add", self.host_ip + "/30", "dev", self.host_dev])
            _sh(["ip", "link", "set", self.host_dev, "up"])
            self.exec(["ip", "addr", "add", self.ns_ip + "/30", "dev", self.ns_dev])
            self.exec(["ip", "link", "set", self.ns_dev, "up"])
            self.exec(["ip", "link", "set", "lo", "up"])
            # Packets of one MTU, as on a real link: without this, TCP hands the veth 64 KiB
            # super-packets and a "dropped packet" is 45 of them.
            _sh(["ip", "link", "set", self.host_dev, "gso_max_segs", "1"])
            self.exec(["ip", "link", "set", self.ns_dev, "gso_max_segs", "1"])
            # One table of ours, empty chains: loss() fills them.
            self.exec(["nft", "-f", "-"], stdin=(
                "table inet cischaos {\n"
                " chain cin { type filter hook input priority 0; policy accept; }\n"
                " chain cout { type filter hook output priority 0; policy accept; }\n"
                "}\n").encode())
        except Exception:
            self.close()
            raise

    def _reap_stale(self):
        rc, out = _sh(["ip", "netns", "list"], check_rc=False)
        for line in out.splitlines():
            nm = line.split()[0] if line.split() else ""
            if not nm.startswith(self.PREFIX) or "-" not in nm:
                continue
            try:
                pid = int(nm.rsplit("-", 1)[1])
            except ValueError:
                continue
            if pid != os.getpid() and not os.path.exists("/proc/%d" % pid):
                ch.log("removing namespace %s left by a run that died" % nm)
                _sh(["ip", "netns", "del", nm], check_rc=False)

    def _pick_subnet(self):
        """A /30 in 10.213.0.0/16 that no interface of the host uses: (host_ip, ns_ip)."""
        _rc, out = _sh(["ip", "-4", "-o", "addr", "show"], check_rc=False)
        used = {(int(a) << 6) | (int(b) // 4)
                for a, b in re.findall(r"inet 10\.213\.(\d+)\.(\d+)/", out)}
        for k in range(16384):
            i = (os.getpid() + k) % 16384
            if i not in used:
                net = "10.213.%d." % (i >> 6)
                return net + str((i & 63) * 4 + 1), net + str((i & 63) * 4 + 2)
        raise ch.TestFailure("no free /30 in 10.213.0.0/16")

    def wrapper(self):
        """Prepend to a process's argv to run it inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    def exec(self, argv, stdin=None, check_rc=True):
        return _sh(self.wrapper() + list(argv), check_rc=check_rc, stdin=stdin)

    def loss(self, pct):
        """Drop PCT% of the packets each way at random (0: drop none)."""
        rules = "flush chain inet cischaos cin\nflush chain inet cischaos cout\n"
        if pct > 0:
            rules += ("add rule inet cischaos cin iifname \"%s\" numgen random mod 100 < %d drop\n"
                      "add rule inet cischaos cout oifname \"%s\" numgen random mod 100 < %d drop\n"
                      % (self.ns_dev, pct, self.ns_dev, pct))
        self.exec(["nft", "-f", "-"], stdin=rules.encode())
        self.lossy = pct

    def cut(self, side="host"):
        """Take the link down at SIDE's end ("host" or "ns")."""
        if side == "ns":
            self.exec(["ip", "link", "set", self.ns_dev, "down"])
        else:
            _sh(["ip", "link", "set", self.host_dev, "down"])
        self.down = side

    def restore(self):
        """Bring both ends of the link up again."""
        _sh(["ip", "link", "set", self.host_dev, "up"])
        self.exec(["ip", "link", "set", self.ns_dev, "up"])
        # addresses survive a down/up; the namespace's route to the /30 comes back with it
        self.down = None

    def close(self):
        if not self.created:
            return
        self.created = False
        # Deleting one end of a veth deletes both; the namespace goes with its last process.
        _sh(["ip", "link", "del", self.host_dev], check_rc=False)
        _sh(["ip", "netns", "del", self.name], check_rc=False)


def server_cert_for_ip(h, ip, name="server-ns"):
    """(cert, key): a receiver certificate from the harness's test CA whose subjectAltName
    holds IP (the harness's own holds 127.0.0.1 and localhost only)."""
    h.make_pki()
    pki = h.path("pki")
    ext = os.path.join(pki, name + ".cnf")
    with open(ext, "w") as f:
        f.write("[req]\ndistinguished_name=dn\n[dn]\n"
                "[server]\nbasicConstraints=critical,CA:FALSE\n"
                "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
                "subjectAltName=IP:%s\n"
                "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n" % ip)
    key = os.path.join(pki, name + ".key")
    csr = os.path.join(pki, name + ".csr")
    crt = os.path.join(pki, name + ".pem")
    h._key(key)
    h._openssl("req", "-new", "-key", key, "-subj", "/CN=" + ip, "-config", ext, "-out", csr)
    h._openssl("x509", "-req", "-in", csr, "-CA", h.ca_cert, "-CAkey", h.ca_key,
               "-CAcreateserial", "-days", "3", "-sha256", "-extfile", ext,
               "-extensions", "server", "-out", crt)
    return crt, key


# ---------------------------------------------------------------------------------------
# Memory (scenario 9): valgrind and RSS

# The leak tests' valgrind arguments and report parser live in the harness (test_mg uses them
# too).
VALGRIND_ARGS = ch.VALGRIND_ARGS
sanitized = ch.sanitized
valgrind_report = ch.valgrind_report


def rss_kib(pid):
    """{"VmRSS": KiB, "RssAnon": KiB} of a live process, from /proc/PID/status."""
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon"):
                out[k] = int(v.split()[0])
    return out


# ---------------------------------------------------------------------------------------
# Records dropped on purpose (scenarios 5 and 6): a record the receiver does not hold is not
# lost when a loss-ledger range the receiver holds covers its key (agent id, epoch, seq).

class KeyedTally(Tally):
    """A Tally that also keeps the key each accepted payload was given: the seq of its OK
    line, under the agent id and epoch of the spool the scenario says the connection wrote
    to (set_spool(), or add_client's arguments). Used with ledger_verdict()."""

    def __init__(self, agent_id=None, epoch=None):
        super().__init__()
        self.keys = {}  # payload -> (agent_id, epoch, seq)
        self.agent_id, self.epoch = agent_id, epoch

    def set_spool(self, agent_id, epoch):
        with self.lock:
            self.agent_id, self.epoch = agent_id, epoch

    def add_client(self, c, agent_id=None, epoch=None):
        with c.cond:
            sent = list(c.sent)
            answers = list(c.answers)
        with self.lock:
            aid = agent_id or self.agent_id
            ep = self.epoch if epoch is None else epoch
        ok, keys = [], {}
        for i, a in enumerate(answers):
            if a[0] == "OK" and i < len(sent):
                ok.append(sent[i])
                keys[sent[i]] = (aid, ep, a[1])
        self.add(sent, ok)
        with self.lock:
            self.keys.update(keys)


def ledger_verdict(receiver, agent_ids, tally, reasons, unknown_range=None):
    """verdict() for scenarios where the agent drops records on purpose and ledgers them.
    TALLY is a KeyedTally. An accepted payload the receiver does not hold counts as
    dropped_ledgered (not lost) when a loss-ledger entry the receiver holds for its agent and
    epoch, with a reason in REASONS, covers its seq. unknown_range: optional
    callable(agent_id, entry) for an entry that cannot name the whole range it dropped (the
    scenario says which, e.g. a corrupt spool whose WAL was deleted): it returns the epoch
    the entry stands for (True: the entry's own; falsy: none); accepted payloads of that
    epoch no entry covers count as dropped_unknown_range, not lost.
    Adds: dropped_ledgered, dropped_unknown_range, dropped_by_reason {reason: n}, and
    misfiled (payloads stored under another key than their OK line said: must be 0)."""
    v = verdict(receiver, agent_ids, tally)
    by_payload = {}
    for aid, e, s, p in stored_rows(receiver, agent_ids):
        by_payload.setdefault(bytes(p), set()).add((aid, e, s))
    ranges, vague = {}, set()
    for aid in agent_ids:
        for ent in receiver.losses(aid):
            if ent["reason"] not in reasons:
                continue
            k = (aid, ch.u64(ent["epoch"]))
            ranges.setdefault(k, []).append((int(ent["first_seq"]), int(ent["last_seq"]),
                                             ent["reason"]))
            if unknown_range is not None:
                ep = unknown_range(aid, ent)
                if ep is True:
                    vague.add(k)
                elif ep:
                    vague.add((aid, ep))
    with tally.lock:
        keys = dict(tally.keys)
        # the payloads accepted by these agents (a payload whose key is unknown counts too)
        accepted = {p for p in tally.accepted if p not in keys or keys[p][0] in agent_ids}
    v["accepted"] = len(accepted)
    v["stored_unacked"] = len(set(by_payload) - accepted)
    lost, misfiled, by_reason = [], [], {}
    vague_n = 0
    for p in accepted:
        key = keys.get(p)
        got = by_payload.get(p)
        if got:
            if key is not None and key not in got:
                misfiled.append(p)
            continue
        reason = None
        if key is not None:
            reason = next((r for a, b, r in ranges.get(key[:2], ()) if a <= key[2] <= b), None)
        if reason is not None:
            by_reason[reason] = by_reason.get(reason, 0) + 1
        elif key is not None and key[:2] in vague:
            vague_n += 1
        else:
            lost.append(p)
    v["lost"] = len(lost)
    v["dropped_ledgered"] = sum(by_reason.values())
    v["dropped_unknown_range"] = vague_n
    v["dropped_by_reason"] = by_reason
    v["misfiled"] = len(misfiled)
    v["examples"]["lost"] = sorted(p.decode("utf-8", "replace") for p in lost[:5])
    v["examples"]["misfiled"] = sorted(p.decode("utf-8", "replace") for p in misfiled[:5])
    return v

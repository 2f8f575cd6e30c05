#!/usr/bin/env python3
"""Chaos 8 (issue 7): a power cut below SQLite.

How: the agent runs with an LD_PRELOAD shim (tests/chaos/powercut.c, built as
libcis_powercut.so, found through CISTERN_BUILD_DIR) that journals every write, truncate,
fallocate, sync, creation, removal and rename of the spool's files (the database, -wal,
-journal; of -shm only its name) and every fsync of the spool's directory, lets them all
happen, and SIGKILLs the agent just before the Nth of them (the crash point, chosen by the
test). The test then rebuilds the spool's files as a disk holds them after a power cut at that
point, from the files as they were before the run and the journal:
  - a file's content is what it was at its last fdatasync/fsync; in half the runs ("subset")
    each later write also reaches the disk whole, not at all, or torn into a random subset of
    its 512-byte sectors (disks reorder and tear);
  - names (creations, removals, renames) are durable up to the directory's last fsync, then a
    random prefix of the later ones (a journaling filesystem such as ext4 keeps metadata in
    order); an -shm file that exists is left empty (SQLite rebuilds it);
and the next run starts the agent on them, under the shim again, with a new boot id (the
shim shows it in place of /proc/sys/kernel/random/boot_id: a power cut is a reboot, and the
agent tells a stop in this boot from one in an earlier one). Before each rebuild the shim
is checked: the journal replayed over the files as they were must give exactly the files on
disk (a write the shim missed fails the test).

Crash points: counted over any operation (N spread over the run's load), over syncs only,
over the database file only (inside checkpoints), over the -wal only, or among the operations
of the agent's start (open, WAL recovery, the checkpoint at open); some runs end in a clean
SIGTERM stop and then the cut; some make a new spool (a second spool of the same agent, cut,
restarted without the shim, drained and removed). A third of the runs have the uplink down
(a backlog builds). Load: a socket-input feeder at about 2,000 records/s.

Two sweeps, one agent each:
  sync: full    spool.commit_interval 20ms, max_size 4MiB (a checkpoint every 128 KiB of WAL),
                when_full reject_new (nothing is evicted), forward.batch.max_delay 100ms:
                checkpoints, acks and deletes come often. Verdict: lost, duplicated and
                unexpected all 0 over every record the source was told OK, after the drain.
  sync: normal  the shipped defaults of spool.* and forward.*. Figures: per cut, the
                acknowledged records it lost (records, and ms from the oldest one's OK to the
                cut; the OK times are sampled every few ms), with the uplink up and down.
                Checked: duplicated and unexpected 0.
Both: integrity_check ok after every cut (before every restart); no record lost because a
seq was handed out again after a cut (lost_seq_reused: the receiver holds its key with the
payload of an earlier run, sent before a cut took its commit back: must be 0); with sync
full, no quarantine and the spool keeps its epoch. No timing assertions.

When a rebuilt spool fails integrity_check, what it was rebuilt from (the files before the
run, the run's journal, the image) is kept in evidence-<sync>-<run>/ of the temp dir
(CISTERN_KEEP_TMP=1 keeps the temp dir), for replay with DiskModel.

Parameters: short (CI) 20 crash points with sync: full and 6 with sync: normal; full
(CISTERN_CHAOS_FULL=1) 200 and 40. Random choices from CISTERN_CHAOS_SEED (printed). Exits
77 (skip) when the shim is not built or the platform is not 64-bit Linux."""
import glob
import os
import random
import shutil
import signal
import sqlite3
import statistics
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import chaos  # noqa: E402
from chaos import ch  # noqa: E402

SKIP = 77
RATE = 2000  # records/s the feeder writes

# ---------------------------------------------------------------------------------------
# The shim's journal (see powercut.c): records of six little-endian u64 (type, open id, a, b,
# path length, data length), then the path, then the data.

HDR = struct.Struct("<6Q")
START, OPEN, WRITE, TRUNC, SYNC, CLOSE, UNLINK, RENAME, CRASH, EXTEND = range(1, 11)
SECTOR = 512


def read_journal(path):
    """[(type, open_id, a, b, path, data)]; a torn last record (an outside kill) is left out."""
    with open(path, "rb") as f:
        buf = f.read()
    recs, i = [], 0
    while i + HDR.size <= len(buf):
        t, oid, a, b, plen, dlen = HDR.unpack_from(buf, i)
        j = i + HDR.size
        if j + plen + dlen > len(buf):
            break
        recs.append((t, oid, a, b, buf[j:j + plen].decode("utf-8", "replace"),
                     buf[j + plen:j + plen + dlen]))
        i = j + plen + dlen
    return recs


def apply_op(buf, op):
    """Apply a data operation ("w", offset, bytes), ("t", length) or ("x", length: at least)
    to bytearray BUF."""
    if op[0] == "w":
        off, data = op[1], op[2]
        if len(buf) < off:
            buf.extend(bytes(off - len(buf)))
        buf[off:off + len(data)] = data
    elif op[0] == "x":
        if len(buf) < op[1]:
            buf.extend(bytes(op[1] - len(buf)))
    else:
        n = op[1]
        if len(buf) > n:
            del buf[n:]
        else:
            buf.extend(bytes(n - len(buf)))


def torn(op, rnd):
    """A write torn at sector boundaries: the pieces (as writes) that reached the disk."""
    off, data = op[1], op[2]
    pieces, at = [], off
    while at < off + len(data):
        end = min((at // SECTOR + 1) * SECTOR, off + len(data))
        if rnd.random() < 0.5:
            pieces.append(("w", at, data[at - off:end - off]))
        at = end
    return pieces


class DiskModel:
    """The spool's files through one run of the agent under the shim: from SNAPSHOT (every
    file of the spool as it was before the run: {path: bytes}) and the run's journal, the
    files as the kernel held them (current()) and as a disk holds them after a power cut at
    the end of the journal (image())."""

    def __init__(self, prefix, snapshot):
        self.prefix = prefix
        self.dir = os.path.dirname(prefix)
        self.inodes = []      # [{"base": bytes, "ops": [(seq, op)], "sync": seq}]
        self.ns = {}          # path -> inode index, now
        for p, data in snapshot.items():
            self.ns[p] = self._new(data)
        self.base_ns = dict(self.ns)
        self.ns_ops = []      # [(seq, ("link", path, ino) | ("unlink", path) | ("rename", a, b))]
        self.dir_sync = 0
        self.opens = {}       # open id -> inode index, or "dir"
        self.seq = 0
        self.crash = None     # (op count, monotonic ns, path, what)
        self.start_ns = None
        self.counts = {"write": 0, "truncate": 0, "sync": 0, "dirsync": 0, "create": 0,
                       "unlink": 0, "rename": 0}
        self.op_times = {"any": [], "sync": [], "db": [], "wal": []}  # monotonic s, per class

    def _new(self, data):
        self.inodes.append({"base": bytes(data), "ops": [], "sync": 0})
        return len(self.inodes) - 1

    def content(self, ino, upto=None):
        buf = bytearray(self.inodes[ino]["base"])
        for s, op in self.inodes[ino]["ops"]:
            if upto is None or s <= upto:
                apply_op(buf, op)
        return buf

    def _timed(self, target, b, is_sync=False):
        """Note the time of a counted operation on TARGET (an inode, "dir" or a path)."""
        if not b:
            return
        ts = b / 1e9
        self.op_times["any"].append(ts)
        if is_sync:
            self.op_times["sync"].append(ts)
        path = target if isinstance(target, str) else next(
            (p for p, i in self.ns.items() if i == target), None)
        if path == self.prefix:
            self.op_times["db"].append(ts)
        elif path == self.prefix + "-wal":
            self.op_times["wal"].append(ts)

    def feed(self, recs):
        for t, oid, a, b, path, data in recs:
            self.seq += 1
            if t in (WRITE, TRUNC, EXTEND, SYNC):
                self._timed(self.opens[oid], b, t == SYNC)
            elif t in (UNLINK, RENAME):
                self._timed(path, b)
            if t == START:
                self.start_ns = b
            elif t == OPEN:
                if path == self.dir:
                    self.opens[oid] = "dir"
                    continue
                created = b == 1
                if created:
                    ch.check(path not in self.ns, "journal: %s created, but the model has it "
                             "already" % path)
                    ino = self._new(b"")
                    self.ns[path] = ino
                    self.ns_ops.append((self.seq, ("link", path, ino)))
                    self.counts["create"] += 1
                ch.check(path in self.ns, "journal: %s opened, but the model has no such file"
                         % path)
                ino = self.ns[path]
                self.opens[oid] = ino
                if (a & os.O_TRUNC) and not created:
                    self.inodes[ino]["ops"].append((self.seq, ("t", 0)))
                if len(data) == 8:
                    size = struct.unpack("<Q", data)[0]
                    have = len(self.content(ino))
                    ch.check(have == size, "journal: %s is %d bytes at its open, the model says "
                             "%d: the shim missed a write" % (path, size, have))
            elif t == WRITE:
                self.inodes[self.opens[oid]]["ops"].append((self.seq, ("w", a, data)))
                self.counts["write"] += 1
            elif t == TRUNC:
                self.inodes[self.opens[oid]]["ops"].append((self.seq, ("t", a)))
                self.counts["truncate"] += 1
            elif t == EXTEND:
                self.inodes[self.opens[oid]]["ops"].append((self.seq, ("x", a)))
                self.counts["truncate"] += 1
            elif t == SYNC:
                target = self.opens[oid]
                if target == "dir":
                    self.dir_sync = self.seq
                    self.counts["dirsync"] += 1
                else:
                    self.inodes[target]["sync"] = self.seq
                    self.counts["sync"] += 1
            elif t == UNLINK:
                self.ns.pop(path, None)
                self.ns_ops.append((self.seq, ("unlink", path)))
                self.counts["unlink"] += 1
            elif t == RENAME:
                new = data.decode("utf-8", "replace")
                if path in self.ns:
                    ino = self.ns.pop(path)
                    if new.startswith(self.prefix):
                        self.ns[new] = ino
                self.ns_ops.append((self.seq, ("rename", path, new)))
                self.counts["rename"] += 1
            elif t == CRASH:
                self.crash = (a, b, path, data.decode("utf-8", "replace"))

    def crash_kind(self):
        """What the operation the cut replaced would have done, and to which file."""
        if self.crash is None:
            return None
        path, what = self.crash[2], self.crash[3]
        if path == self.dir:
            name = "dir"
        elif path == self.prefix:
            name = "db"
        else:
            name = path[len(self.prefix):].lstrip("-") or "db"
        return "%s:%s" % (name, what)

    def check_current(self):
        """The files on disk now must be the journal replayed: proves the shim saw every write.
        Returns a list of differences (empty when all agree)."""
        diffs = []
        on_disk = set(glob.glob(glob.escape(self.prefix) + "*"))
        if on_disk != set(self.ns):
            diffs.append("files on disk %r, model %r" % (sorted(on_disk), sorted(self.ns)))
        for p, ino in self.ns.items():
            if p.endswith("-shm") or not os.path.exists(p):
                continue
            with open(p, "rb") as f:
                real = f.read()
            model = bytes(self.content(ino))
            if real != model:
                at = next((i for i in range(min(len(real), len(model))) if real[i] != model[i]),
                          min(len(real), len(model)))
                diffs.append("%s: %d bytes on disk, %d in the model, first difference at %d"
                             % (p, len(real), len(model), at))
        return diffs

    def image(self, rnd=None):
        """{path: bytes} on the disk after the cut. rnd None: only what was synced; else also a
        random subset of the unsynced writes (whole, dropped or torn) and a random prefix of
        the names changed since the directory's last sync."""
        ns = dict(self.base_ns)
        done = [op for s, op in self.ns_ops if s <= self.dir_sync]
        pending = [op for s, op in self.ns_ops if s > self.dir_sync]
        keep = rnd.randint(0, len(pending)) if rnd is not None else 0
        for op in done + pending[:keep]:
            if op[0] == "link":
                ns[op[1]] = op[2]
            elif op[0] == "unlink":
                ns.pop(op[1], None)
            elif op[0] == "rename" and op[1] in ns:
                ino = ns.pop(op[1])
                if op[2].startswith(self.prefix):
                    ns[op[2]] = ino
        out = {}
        for p, ino in ns.items():
            if p.endswith("-shm"):
                out[p] = b""
                continue
            node = self.inodes[ino]
            buf = bytearray(node["base"])
            for s, op in node["ops"]:
                if s <= node["sync"]:
                    apply_op(buf, op)
                elif rnd is not None:
                    r = rnd.random()
                    if r < 0.45:
                        apply_op(buf, op)
                    elif r < 0.55 and op[0] == "w":
                        for piece in torn(op, rnd):
                            apply_op(buf, piece)
            out[p] = bytes(buf)
        return out


def spool_files(prefix):
    return sorted(glob.glob(glob.escape(prefix) + "*"))


def snapshot(prefix):
    out = {}
    for p in spool_files(prefix):
        with open(p, "rb") as f:
            out[p] = f.read()
    return out


def write_image(prefix, image):
    for p in spool_files(prefix):
        os.unlink(p)
    for p, data in image.items():
        with open(p, "wb") as f:
            f.write(data)


def integrity_check(prefix, scratch):
    """chaos.integrity_check, also when the cut left a rollback journal (the spool was being
    made, before it went to WAL mode): a read-only connection cannot roll that back, so the
    check runs on a copy in SCRATCH, rolled back there as the agent's own open will do."""
    journal = prefix + "-journal"
    if not (os.path.exists(prefix) and os.path.exists(journal)):
        return chaos.integrity_check(prefix)
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(scratch)
    copy = os.path.join(scratch, os.path.basename(prefix))
    shutil.copy(prefix, copy)
    shutil.copy(journal, copy + "-journal")
    con = sqlite3.connect(copy, timeout=10)
    try:
        r = con.execute("PRAGMA integrity_check").fetchall()
    finally:
        con.close()
    shutil.rmtree(scratch, ignore_errors=True)
    ch.check(r == [("ok",)], "spool %s (with its rollback journal) fails integrity_check: %r"
             % (prefix, r[:5]))


def spool_epoch(path):
    """The epoch in the spool's meta, or None (no spool, or no schema yet)."""
    if not os.path.exists(path):
        return None
    try:
        con = ch.ro_connect(path)
        try:
            r = con.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()
        finally:
            con.close()
    except Exception:
        return None
    return ch.u64(r[0]) if r else None


# ---------------------------------------------------------------------------------------
# Load

class RunFeeder(threading.Thread):
    """Feeds one run of the agent over one connection: connects as soon as the agent listens
    (gives up when it died first), writes unique lines at about RATE/s, pipelined, and notes
    when each answer arrived (monotonic seconds, sampled every few ms)."""

    def __init__(self, agent, tag, rate, seed, chunk=20):
        super().__init__(daemon=True)
        self.agent, self.tag, self.rate, self.chunk = agent, tag, rate, chunk
        self.rnd = random.Random(seed)
        self.stop_flag = threading.Event()
        self.client = None
        self.times = []
        self.n = 0
        self.error = None

    def _note(self):
        c = self.client
        with c.cond:
            n = len(c.answers)
        if n > len(self.times):
            now = time.monotonic()
            self.times.extend([now] * (n - len(self.times)))

    def run(self):
        try:
            while self.client is None and not self.stop_flag.is_set():
                if not self.agent.proc.running():
                    return
                try:
                    self.client = self.agent.client("unix")
                except OSError:
                    time.sleep(0.01)
            c = self.client
            next_at = time.monotonic()
            while c is not None and not c.eof and not self.stop_flag.is_set():
                self._note()
                now = time.monotonic()
                if now >= next_at and len(c.sent) - len(c.answers) < 2000:
                    # unique, with 8-160 random hex digits: segments of varied sizes
                    lines = [b"%s-%06d-%x" % (self.tag, self.n + i,
                                              self.rnd.getrandbits(4 * self.rnd.randint(8, 160)))
                             for i in range(self.chunk)]
                    self.n += self.chunk
                    try:
                        c.send_many(lines)
                    except OSError:
                        break
                    next_at += self.chunk / float(self.rate)
                    if next_at < now:
                        next_at = now
                time.sleep(0.003)
        except Exception as e:  # surfaced by finish()
            self.error = e

    def finish(self, alive):
        """Stop writing; when the agent is still up (ALIVE), wait for its answers. Returns
        [(payload, seq, answered at)] of the lines answered OK."""
        self.stop_flag.set()
        self.join(30)
        ch.check(not self.is_alive(), "feeder %s did not stop" % self.tag.decode())
        ch.check(self.error is None, "feeder %s failed: %r" % (self.tag.decode(), self.error))
        c = self.client
        if c is None:
            return []
        if alive and not c.eof:
            try:
                c.wait_answers(timeout=60)
            except ch.TestFailure:
                pass
        deadline = time.monotonic() + 10
        while not c.eof and not alive and time.monotonic() < deadline:
            time.sleep(0.005)  # the agent died: the reader sees EOF after the last answer
        self._note()
        with c.cond:
            sent, answers = list(c.sent), list(c.answers)
        return [(sent[i], a[1], self.times[i]) for i, a in enumerate(answers)
                if a[0] == "OK" and i < len(sent)]


# ---------------------------------------------------------------------------------------
# One sweep: one agent, one spool.sync mode

# sync: full: small and quick, so that checkpoints, acks and deletes come often
FULL_CONFIG = {"spool": {"sync": "full", "commit_interval": "20ms", "max_size": "4MiB",
                         "when_full": "reject_new"},
               "forward": {"batch": {"max_records": 1000, "max_delay": "100ms"},
                           "retry": {"initial": "100ms", "max": "500ms"}}}
# sync: normal: the shipped defaults of spool.* and forward.* (None drops the harness's
# setting), so that its figures are the ones a gateway sees
NORMAL_CONFIG = {"spool": {"sync": "normal", "commit_interval": None, "commit_max_records": None,
                           "commit_max_bytes": None},
                 "forward": {"batch": None, "in_flight": None, "timeout": None, "retry": None}}


class Sweep:
    def __init__(self, h, recv, sync, agent_id, rnd, shim, config, span):
        self.h, self.recv, self.sync, self.rnd, self.shim = h, recv, sync, rnd, shim
        self.agent_id = agent_id
        self.span = span  # seconds of load a run's crash point lies within (drawn uniformly)
        self.tally = chaos.KeyedTally(agent_id)
        extra = config
        self.agent = h.agent("agent-" + sync, agent_id, recv, extra=extra)
        # a second spool of the same agent, made anew for each "create" run
        self.fresh = h.agent("fresh-" + sync, agent_id, recv, extra=extra)
        self.dead_url = "https://127.0.0.1:%d/v1/batches" % ch.free_port()
        self.runs = []       # one dict per crash point
        self.rate = {}       # operations per second of each counting class, from the first run
        self.base = {}       # and how many of them the agent's start makes
        self.epoch = None

    def _tag(self, k):
        return b"c8%s-%03d" % (self.sync[0].encode(), k)

    def _run_of(self, payload):
        """The run whose feeder wrote PAYLOAD ("c8<f|n>-<run>-<n>-<pad>")."""
        return int(payload.split(b"-")[1])

    def _configure(self, agent, uplink):
        cfg = dict(agent.config)
        cfg["forward"] = dict(cfg["forward"], url=self.recv.url if uplink else self.dead_url)
        with open(agent.config_path, "w") as f:
            f.write("# written by test_c8_power_cut\n" + ch.to_yaml(cfg) + "\n")

    def _shim_env(self, agent, journal, at, on, k):
        env = dict(os.environ)
        # every run starts after a power cut: in a new boot, as far as the agent can tell
        boot = self.h.path("boot_id-%s-%03d" % (self.sync, k))
        with open(boot, "w") as f:
            f.write("%08x-c8c8-4c8c-8c8c-%012x\n" % (self.rnd.getrandbits(32),
                                                   self.rnd.getrandbits(48)))
        env["CISTERN_POWERCUT_BOOT_ID"] = boot
        env["LD_PRELOAD"] = " ".join(x for x in (self.shim, env.get("LD_PRELOAD", "")) if x)
        # under -fsanitize=address the shim comes before the ASan runtime: allowed, it
        # calls the kernel directly and allocates nothing
        env["ASAN_OPTIONS"] = ":".join(x for x in (env.get("ASAN_OPTIONS", ""),
                                                   "verify_asan_link_order=0") if x)
        env["CISTERN_POWERCUT_PREFIX"] = agent.spool_path
        env["CISTERN_POWERCUT_JOURNAL"] = journal
        env["CISTERN_POWERCUT_AT"] = str(at)
        env["CISTERN_POWERCUT_ON"] = on
        return env

    def plan(self, k):
        """The crash point of run K: (kind, counting class, N)."""
        if k == 0:
            return "calibrate", "any", 0
        r = self.rnd.random()
        if r < 0.08:
            return "create", "any", self.rnd.randint(1, 80)
        if r < 0.16:
            return "stop", "any", 0
        if r < 0.30:
            return "start", "any", self.rnd.randint(1, max(10, self.base.get("any", 40)))
        # (with the shipped defaults the database file is written only by the checkpoint at
        # start-up: "start" runs cover it)
        on = self.rnd.choice(["any", "any", "sync", "wal"] + (["db"] if self.sync == "full"
                                                              else []))
        if on == "sync" and self.sync == "normal":
            # syncs come with checkpoints and the forwarder's batches: a few per run
            return "load", on, self.base.get(on, 0) + self.rnd.randint(1, 4)
        span = self.rnd.uniform(*self.span)
        return "load", on, self.base.get(on, 0) + max(1, int(self.rate.get(on, 50) * span))

    def run(self, k, kind, on, at, uplink, subset):
        agent = self.fresh if kind == "create" else self.agent
        prefix = agent.spool_path
        if kind == "create":
            for p in spool_files(prefix):
                os.unlink(p)
        before = snapshot(prefix)
        epoch_before = spool_epoch(prefix)
        journal = self.h.path("%s-journal-%03d" % (agent.name, k))
        self._configure(agent, uplink)
        agent.proc.env = self._shim_env(agent, journal, at, on, k)
        mark = len(agent.proc.log_text())
        agent.start(wait=False)
        t_start = time.monotonic()
        feeder = RunFeeder(agent, self._tag(k), RATE, self.rnd.getrandbits(32))
        feeder.start()
        how = "cut"
        if kind in ("calibrate", "stop"):
            time.sleep(self.rnd.uniform(*self.span) if kind == "stop" else self.span[0] + 2.0)
        deadline = t_start + (0 if kind in ("calibrate", "stop") else self.span[1] + 4.0)
        while agent.proc.running() and time.monotonic() < deadline:
            time.sleep(0.005)
        t_kill = time.monotonic()
        if agent.proc.running():
            if kind == "stop":
                how = "stop"
                ch.check(agent.stop() == 0, "run %d: agent did not exit 0 on SIGTERM" % k)
            else:
                how = "kill"  # the crash point lay beyond this run: cut now
                agent.kill9()
        rc = agent.proc.popen.returncode
        agent.proc.expect_running = False
        agent.proc.env = None
        acked = feeder.finish(alive=False)
        ch.check(how != "cut" or rc == -signal.SIGKILL,
                 "run %d: the agent exited with %s before its crash point (log: %s)"
                 % (k, rc, agent.proc.log_path))
        self._check_log(agent, mark, "run %d" % k)

        model = DiskModel(prefix, before)
        model.feed(read_journal(journal))
        if how == "cut":
            ch.check(model.crash is not None, "run %d: SIGKILL without the shim's crash record"
                     % k)
        diffs = model.check_current()
        if how != "kill":  # an outside kill may land between a write and its record
            ch.check(not diffs, "run %d: the journal does not replay to the files on disk: %s"
                     % (k, diffs))
        epoch = spool_epoch(prefix)  # the files as the agent left them: its epoch
        if feeder.client is not None:
            self.tally.add_client(feeder.client, epoch=epoch)
        image = model.image(self.rnd if subset else None)
        write_image(prefix, image)
        try:
            integrity_check(prefix, self.h.path("check"))
        except ch.TestFailure:
            self._keep_evidence(k, before, journal, image)
            raise
        quarantined = glob.glob(glob.escape(prefix) + ".corrupt-*")
        if self.sync == "full":
            ch.check(not quarantined, "run %d: quarantined: %r" % (k, quarantined))
            if kind != "create" and epoch_before is not None:
                ch.check(spool_epoch(prefix) == epoch_before,
                         "run %d: the spool's epoch changed after the cut" % k)
        ops = sum(model.counts[x] for x in ("write", "truncate", "sync", "dirsync", "create",
                                            "unlink", "rename"))
        if kind == "calibrate":
            # per counting class: the operations of the start (before the first OK), and the
            # rate under load after it
            t_ok = min([t for _p, _s, t in acked] or [t_start])
            for cls, times in model.op_times.items():
                after = [t for t in times if t >= t_ok]
                self.base[cls] = len(times) - len(after)
                # (at least one every 2 s: syncs with sync: normal come with the forwarder's
                # batches, which a short first run may not have seen)
                self.rate[cls] = max(0.5, len(after) / max(0.5, t_kill - t_ok))
            ch.log("%s: operations before the first OK %s, per second after it %s"
                   % (self.sync, self.base, {x: round(v, 1) for x, v in self.rate.items()}))
        t_cut = model.crash[1] / 1e9 if model.crash else time.monotonic()
        if how == "kill":
            t_cut = t_kill
        rec = {"k": k, "kind": kind, "on": on, "at": at, "how": how, "uplink": uplink,
               "subset": subset, "crash": model.crash_kind() or how, "ops": ops,
               "acked": acked, "epoch": epoch, "t_cut": t_cut, "spool": prefix}
        self.runs.append(rec)
        ch.log("%s run %d: %s on=%s N=%d uplink=%s %s -> %s (%s), %d OK, files %s"
               % (self.sync, k, kind, on, at, "up" if uplink else "down",
                  "subset" if subset else "synced-only", rec["crash"], how, len(acked),
                  {os.path.basename(p)[len(os.path.basename(prefix)):] or "db": len(d)
                   for p, d in image.items()}))
        if kind == "create":
            self._drain_fresh(k)

    def _keep_evidence(self, k, before, journal, image):
        """What a failing cut is rebuilt from, for replay: the files before the run, its
        journal, the image; kept in the test's temp dir (CISTERN_KEEP_TMP=1 keeps that)."""
        d = self.h.path("evidence-%s-%03d" % (self.sync, k))
        for sub, files in (("before", before), ("image", image)):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
            for p, data in files.items():
                with open(os.path.join(d, sub, os.path.basename(p)), "wb") as f:
                    f.write(data)
        shutil.copy(journal, d)
        ch.log("evidence of run %d kept in %s" % (k, d))

    def _check_log(self, agent, mark, what):
        """With sync full, the start since log offset MARK found no corrupt spool."""
        text = agent.proc.log_text()[mark:]
        ch.check("was corrupt" not in text or self.sync != "full",
                 "%s: sync full, yet the agent found its spool corrupt after a power cut: %s"
                 % (what, [l for l in text.splitlines() if "corrupt" in l][:2]))

    def _drain_fresh(self, k):
        """After a "create" run: start its spool without the shim, let it drain, remove it."""
        a = self.fresh
        self._configure(a, True)
        mark = len(a.proc.log_text())
        a.start()
        self._check_log(a, mark, "run %d, restart" % k)
        chaos.wait_drained(self.h, [a], timeout=120)
        ch.check(a.stop() == 0, "run %d: the new spool's agent did not exit 0 on SIGTERM" % k)
        for p in spool_files(a.spool_path):
            os.unlink(p)

    def sweep(self, cuts):
        self.epoch = None
        down_run = 0
        for k in range(cuts):
            kind, on, at = self.plan(k)
            # the uplink down in a third of the runs, never more than two in a row (the
            # backlog stays far below max_size: nothing is refused for lack of room)
            uplink = not (down_run < 2 and self.rnd.random() < 0.33) or kind == "create"
            down_run = 0 if uplink else down_run + 1
            self.run(k, kind, on, at, uplink, subset=self.rnd.random() < 0.5)
        # the last start, without the shim: drain
        self._configure(self.agent, True)
        mark = len(self.agent.proc.log_text())
        self.agent.start()
        self._check_log(self.agent, mark, "the last start")
        t0 = time.monotonic()
        chaos.wait_drained(self.h, [self.agent], timeout=chaos.param(180, 600))
        self.drain_s = time.monotonic() - t0
        ch.check(self.agent.stop() == 0, "%s: agent did not exit 0 on SIGTERM" % self.sync)

    def losses(self):
        """Per cut: the acknowledged records of that run the receiver does not hold, split into
        those lost in the cut and those lost because their seq was used before: the receiver
        holds their key with the payload of an earlier run (sent, then taken back by a cut
        together with next_seq). A key held with the payload of a later run is a record lost in
        its cut whose seq the next runs handed out again: harmless, nobody had seen it."""
        rows = chaos.stored_rows(self.recv, [self.agent_id])
        stored = {bytes(p) for _a, _e, _s, p in rows}
        by_key = {(e, s): bytes(p) for _a, e, s, p in rows}
        out = []
        for r in self.runs:
            window, reused = [], []
            for p, seq, t in r["acked"]:
                if p in stored:
                    continue
                other = by_key.get((r["epoch"], seq))
                if other is not None and self._run_of(other) < r["k"]:
                    reused.append((p, seq, t))
                else:
                    window.append((p, seq, t))
            ms = (r["t_cut"] - min(t for _p, _s, t in window)) * 1000.0 if window else 0.0
            out.append({"k": r["k"], "uplink": r["uplink"], "crash": r["crash"],
                        "lost": len(window), "lost_ms": ms, "reused": len(reused),
                        "acked": len(r["acked"])})
        return out


def coverage(runs):
    kinds = {}
    for r in runs:
        kinds[r["crash"]] = kinds.get(r["crash"], 0) + 1
    return kinds


def pct(values, q):
    if not values:
        return 0
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main(h):
    if struct.calcsize("P") != 8 or not sys.platform.startswith("linux"):
        ch.log("SKIP: the power-cut shim needs 64-bit Linux")
        sys.exit(SKIP)
    build = os.environ.get("CISTERN_BUILD_DIR") or os.path.join(
        os.path.dirname(os.path.abspath(sys.argv[1])), "..")
    shim = os.path.join(build, "tests", "chaos", "libcis_powercut.so")
    if not os.path.exists(shim):
        ch.log("SKIP: %s is not built" % shim)
        sys.exit(SKIP)
    cuts_full = chaos.param(20, 200)
    cuts_normal = chaos.param(6, 40)
    rnd = chaos.rng()
    recv = h.receiver().start()

    full = Sweep(h, recv, "full", "gw-chaos-c8-full", rnd, shim, FULL_CONFIG, (0.3, 2.5))
    t0 = time.monotonic()
    full.sweep(cuts_full)
    ch.log("sync full: %d cuts in %.0fs" % (cuts_full, time.monotonic() - t0))
    # runs long enough to pass forward.batch.max_delay (2s): the records a cut takes are then
    # those not yet handed to the forwarder, not simply all of a short run
    normal = Sweep(h, recv, "normal", "gw-chaos-c8-normal", rnd, shim, NORMAL_CONFIG,
                   (2.0, 8.0))
    t1 = time.monotonic()
    normal.sweep(cuts_normal)
    ch.log("sync normal: %d cuts in %.0fs" % (cuts_normal, time.monotonic() - t1))

    params = {"cuts": cuts_full, "sync": "full", "rate": RATE, "max_size": "4MiB",
              "commit_interval": "20ms"}
    v = chaos.verdict(recv, [full.agent_id], full.tally)
    lf = full.losses()
    chaos.report("c8", params, v, cuts=cuts_full,
                 cut_by_shim=sum(1 for r in full.runs if r["how"] == "cut"),
                 crash_points=coverage(full.runs), drain_s=round(full.drain_s, 1),
                 lost_seq_reused=sum(x["reused"] for x in lf))

    vn = chaos.verdict(recv, [normal.agent_id], normal.tally)
    ln = normal.losses()
    figures = {}
    for name, sel in (("up", True), ("down", False)):
        xs = [x for x in ln if x["uplink"] == sel]
        hit = [x for x in xs if x["lost"]]
        figures["uplink_" + name] = {
            "cuts": len(xs), "cuts_with_loss": len(hit),
            "lost_max": max([x["lost"] for x in xs] or [0]),
            "lost_median_of_lossy": statistics.median([x["lost"] for x in hit]) if hit else 0,
            "lost_ms_max": round(max([x["lost_ms"] for x in xs] or [0])),
            "lost_ms_median_of_lossy": round(statistics.median([x["lost_ms"] for x in hit]))
            if hit else 0,
            "lost_ms_p90_of_lossy": round(pct([x["lost_ms"] for x in hit], 0.9)),
        }
    chaos.report("c8_normal", {"cuts": cuts_normal, "sync": "normal", "rate": RATE,
                               "config": "spool.* and forward.* defaults"}, vn,
                 cuts=cuts_normal, cut_by_shim=sum(1 for r in normal.runs if r["how"] == "cut"),
                 crash_points=coverage(normal.runs), drain_s=round(normal.drain_s, 1),
                 lost_in_cut=sum(x["lost"] for x in ln),
                 lost_seq_reused=sum(x["reused"] for x in ln), window=figures)
    for x in ln:
        if x["lost"] or x["reused"]:
            ch.log("sync normal run %d (%s, uplink %s): %d of %d OK lost in the cut (oldest "
                   "acknowledged %.0f ms before it), %d lost to a reused seq"
                   % (x["k"], x["crash"], "up" if x["uplink"] else "down", x["lost"], x["acked"],
                      x["lost_ms"], x["reused"]))

    chaos.assert_verdict(v)
    reused = sum(x["reused"] for x in lf + ln)
    ch.check(reused == 0, "%d acknowledged records lost because a cut took back a commit that "
             "had already been sent and its seqs were handed out again" % reused)
    ch.check(vn["duplicated"] == 0 and vn["unexpected"] == 0,
             "sync normal: duplicated %d, unexpected %d (examples %r)"
             % (vn["duplicated"], vn["unexpected"], vn["examples"]))
    ch.check(recv.stop() == 0, "receiver did not exit 0 on SIGTERM")


if __name__ == "__main__":
    ch.run(main, "chaos_c8_power_cut")

"""Shared harness for Cistern's integration tests (and the quick-start demo).

Python 3 standard library only. It starts real cistern-receiver and cistern-agent
processes on free loopback ports, with TLS material from a throwaway CA made with the
`openssl` CLI, and gives the tests ways to feed the agent's socket input, read the
receiver's API and store database, and read the agent's spool database. Every agent it
makes is registered in the device registry of every receiver it makes (Harness.register;
Agent(register=False) to leave one out), and it can craft, sign and take apart batches
(make_batch, sign_envelope, open_envelope).

Nothing here asserts on timing: every wait has a generous deadline and only fails when
the condition is still false at the deadline (machines running the tests are shared).
"""

import atexit
import hashlib
import hmac
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request

# Every wait in the tests is bounded by this many seconds unless said otherwise.
# CISTERN_TEST_TIMEOUT_SCALE stretches them on very slow machines (e.g. sanitizer builds).
SCALE = float(os.environ.get("CISTERN_TEST_TIMEOUT_SCALE", "1"))
DEFAULT_WAIT = 60.0 * SCALE

_live_procs = []  # every Proc started, so atexit can kill what is still running


def _kill_all_live():
    for p in list(_live_procs):
        try:
            p.kill9()
        except Exception:
            pass


atexit.register(_kill_all_live)


def _on_signal(signum, frame):
    _kill_all_live()
    sys.exit(128 + signum)


# ctest kills a test on TIMEOUT with SIGTERM/SIGKILL; make SIGTERM/SIGINT clean up children.
for _s in (signal.SIGTERM, signal.SIGINT):
    try:
        signal.signal(_s, _on_signal)
    except (ValueError, OSError):  # not in the main thread
        pass


class TestFailure(AssertionError):
    pass


def check(cond, msg):
    if not cond:
        raise TestFailure(msg)


def log(msg):
    sys.stdout.write("[%s] %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stdout.flush()


def free_port():
    """A loopback TCP port nobody listens on right now (bind to port 0, then release)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
    finally:
        s.close()


def wait_until(pred, timeout=None, what="condition", interval=0.1, alive=None):
    """Poll pred() until it returns a truthy value; return that value.

    alive: optional callable run on each poll that raises when a process the caller
    depends on has died (so a crash fails fast instead of waiting out the deadline).
    """
    timeout = DEFAULT_WAIT if timeout is None else timeout * SCALE
    deadline = time.monotonic() + timeout
    last_exc = None
    while True:
        if alive is not None:
            alive()
        try:
            v = pred()
            if v:
                return v
            last_exc = None
        except TestFailure:
            raise
        except Exception as e:  # e.g. DB not created yet, connection refused
            last_exc = e
        if time.monotonic() >= deadline:
            extra = (" (last error: %r)" % (last_exc,)) if last_exc else ""
            raise TestFailure("timed out after %.0fs waiting for %s%s" % (timeout, what, extra))
        time.sleep(interval)


def u64(v):
    """Normalize an epoch as stored by SQLite (signed INTEGER, or decimal TEXT) to 0..2^64-1."""
    if isinstance(v, bytes):
        v = v.decode()
    v = int(v)
    return v + (1 << 64) if v < 0 else v


def as_bytes(v):
    if v is None:
        return None
    if isinstance(v, str):
        return v.encode("utf-8")
    return bytes(v)


# ---------------------------------------------------------------------------------------
# YAML (only what our configs need: nested maps, lists of maps, scalars)

_PLAIN = re.compile(r"^[A-Za-z0-9_./:@+-]+$")
_YAML_SPECIAL = {"true", "false", "yes", "no", "on", "off", "null", "~", "y", "n"}


def _scalar(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    s = str(v)
    if _PLAIN.match(s) and s.lower() not in _YAML_SPECIAL and not s.startswith("-"):
        return s
    return json.dumps(s)  # a JSON string is a valid YAML double-quoted scalar


def to_yaml(obj, indent=0):
    sp = "  " * indent
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, (dict, list)) and v:
                out.append("%s%s:" % (sp, k))
                out.append(to_yaml(v, indent + 1))
            elif isinstance(v, list):
                out.append("%s%s: []" % (sp, k))
            else:
                out.append("%s%s: %s" % (sp, k, _scalar(v)))
    elif isinstance(obj, list):
        for item in obj:
            if isinstance(item, dict):
                sub = to_yaml(item, indent + 1).split("\n")
                out.append("%s- %s" % (sp, sub[0].lstrip()))
                out.extend(sub[1:])
            else:
                out.append("%s- %s" % (sp, _scalar(item)))
    else:
        out.append(sp + _scalar(obj))
    return "\n".join(out)


def deep_merge(base, over):
    """Return base updated recursively with over (a value of None deletes the key)."""
    res = dict(base)
    for k, v in (over or {}).items():
        if v is None:
            res.pop(k, None)
        elif isinstance(v, dict) and isinstance(res.get(k), dict):
            res[k] = deep_merge(res[k], v)
        else:
            res[k] = v
    return res


# ---------------------------------------------------------------------------------------
# The wire format by hand (common/proto/cistern.proto): a minimal protobuf writer and
# reader, batches, and SignedBatch envelopes signed exactly as the agent signs them, so
# that tests can craft, inspect and tamper with what travels.

BATCH_CT = "application/vnd.cistern.batch.v1+protobuf"  # an unsigned Batch: refused (415)
SIGNED_CT = "application/vnd.cistern.signed-batch.v1+protobuf"
SIG_ECDSA = 1  # SignatureAlg SIGNATURE_ECDSA_P256_SHA256
SIG_HMAC = 2   # SignatureAlg SIGNATURE_HMAC_SHA256
TEST_EPOCH = 0x1234567890ABCDEF


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def f_varint(num, v):
    return varint(num << 3) + varint(v)


def f_bytes(num, b):
    return varint((num << 3) | 2) + varint(len(b)) + b


def f_fixed64(num, v):
    return varint((num << 3) | 1) + struct.pack("<Q", v)


def pb_fields(buf, base=0):
    """The fields of one message level: [(field number, wire type, value, start, end)].
    value is an int (varint, fixed64, fixed32) or the bytes of a length-delimited field;
    buf[start:end] is where that value lies, as offsets into buf plus base (so offsets of
    a nested message parsed from a slice can be made absolute)."""
    out = []
    i = 0

    def rd_varint():
        nonlocal i
        shift = v = 0
        while True:
            check(i < len(buf), "protobuf: truncated varint")
            b = buf[i]
            i += 1
            v |= (b & 0x7F) << shift
            if not b & 0x80:
                return v
            shift += 7

    while i < len(buf):
        key = rd_varint()
        num, wt = key >> 3, key & 7
        start = i
        if wt == 0:
            v = rd_varint()
        elif wt == 1:
            v = struct.unpack_from("<Q", buf, i)[0]
            i += 8
        elif wt == 5:
            v = struct.unpack_from("<I", buf, i)[0]
            i += 4
        elif wt == 2:
            n = rd_varint()
            start = i
            check(i + n <= len(buf), "protobuf: truncated field %d" % num)
            v = bytes(buf[i:i + n])
            i += n
        else:
            raise TestFailure("protobuf: wire type %d not expected here" % wt)
        out.append((num, wt, v, base + start, base + i))
    return out


def pb_first(fields, num, default=None):
    for f in fields:
        if f[0] == num:
            return f[2]
    return default


def make_batch(agent_id, first_seq, n, epoch=TEST_EPOCH, payloads=None, zip_bomb=False):
    """A serialized Batch of N records (seq FIRST_SEQ..) in one uncompressed segment;
    payloads: a list of N bytes (default b"rec-<seq>"). zip_bomb: one zstd segment that
    declares 1 GiB decompressed and is a few bytes long."""
    now = int(time.time() * 1000)
    if payloads is None:
        payloads = [b"rec-%d" % (first_seq + i) for i in range(n)]
    recs = b"".join(f_bytes(1, f_varint(1, first_seq + i) + f_varint(2, now) + f_bytes(3, b"t")
                            + f_bytes(5, as_bytes(payloads[i]))) for i in range(n))
    last = first_seq + n - 1
    seg = f_varint(1, first_seq) + f_varint(2, last) + f_varint(3, n) + f_varint(4, 1)
    if zip_bomb:
        # zstd magic and a few bytes: what matters is the declared raw_size
        seg += f_varint(5, 1) + f_varint(6, 1 << 30) + f_bytes(7, b"\x28\xb5\x2f\xfd" + b"\0" * 12)
    else:
        seg += f_varint(6, len(recs)) + f_bytes(7, recs)
    hdr = (f_bytes(1, agent_id.encode()) + f_fixed64(2, epoch) + f_varint(3, first_seq)
           + f_varint(4, last) + f_varint(5, n) + f_varint(6, now))
    return f_bytes(1, hdr) + f_bytes(2, seg)


def _run_openssl(args, stdin=None):
    r = subprocess.run(["openssl"] + list(args), input=stdin, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=60)
    if r.returncode != 0:
        raise TestFailure("openssl %s failed: %s" % (" ".join(args),
                                                     r.stderr.decode("utf-8", "replace")))
    return r.stdout


_spki_cache = {}


def spki_der(key_path):
    """The DER SubjectPublicKeyInfo of the private key in key_path."""
    if key_path not in _spki_cache:
        _spki_cache[key_path] = _run_openssl(["pkey", "-in", key_path, "-pubout", "-outform",
                                              "DER"])
    return _spki_cache[key_path]


def key_fingerprint(key_path):
    """The fingerprint ("sha256:<hex>") of the private key's public key, as `cistern-agent
    enroll` prints it."""
    return "sha256:" + hashlib.sha256(spki_der(key_path)).hexdigest()


def read_hmac_secret(path):
    """An HMAC secret file as the agent reads it: its bytes without trailing whitespace."""
    with open(path, "rb") as f:
        return f.read().rstrip(b" \t\r\n")


def hmac_key_id(secret):
    return hashlib.sha256(b"cistern.v1.hmac-key-id\0" + as_bytes(secret)).digest()[:16]


def signed_bytes(agent_id, batch_bytes):
    return b"cistern.v1.SignedBatch\0" + as_bytes(agent_id) + b"\0" + batch_bytes


def envelope(agent_id, alg, key, signature, batch_bytes):
    """A serialized SignedBatch from its parts (no signing: see sign_envelope)."""
    return (f_bytes(1, as_bytes(agent_id)) + f_varint(2, alg) + f_bytes(3, key)
            + f_bytes(4, signature) + f_bytes(5, batch_bytes))


def sign_envelope(agent_id, batch_bytes, key_path=None, secret=None):
    """A SignedBatch of batch_bytes for agent_id, signed as the agent signs: with the ECDSA
    P-256 private key in key_path (openssl dgst -sha256 -sign: a DER signature; key = the
    DER SubjectPublicKeyInfo), or with the HMAC secret (bytes; key = its key id)."""
    msg = signed_bytes(agent_id, batch_bytes)
    if secret is not None:
        secret = as_bytes(secret)
        return envelope(agent_id, SIG_HMAC, hmac_key_id(secret),
                        hmac.new(secret, msg, hashlib.sha256).digest(), batch_bytes)
    check(key_path is not None, "sign_envelope: a key_path or a secret is needed")
    sig = _run_openssl(["dgst", "-sha256", "-sign", key_path], stdin=msg)
    return envelope(agent_id, SIG_ECDSA, spki_der(key_path), sig, batch_bytes)


def open_envelope(buf):
    """A SignedBatch decoded: {"agent_id", "alg", "key", "signature", "batch", and
    "batch_at": (start, end), the inner batch's offsets in buf}."""
    fields = pb_fields(buf)
    out = {"agent_id": pb_first(fields, 1, b"").decode("utf-8", "replace"),
           "alg": pb_first(fields, 2, 0), "key": pb_first(fields, 3, b""),
           "signature": pb_first(fields, 4, b""), "batch": pb_first(fields, 5, b""),
           "batch_at": None}
    for num, _wt, _v, start, end in fields:
        if num == 5:
            out["batch_at"] = (start, end)
    return out


def batch_summary(batch_bytes):
    """The header of a serialized Batch: {"agent_id", "epoch", "first_seq", "last_seq",
    "record_count", "losses": n, "segments": n}."""
    fields = pb_fields(batch_bytes)
    hdr = pb_fields(pb_first(fields, 1, b""))
    return {"agent_id": pb_first(hdr, 1, b"").decode("utf-8", "replace"),
            "epoch": pb_first(hdr, 2, 0), "first_seq": pb_first(hdr, 3, 0),
            "last_seq": pb_first(hdr, 4, 0), "record_count": pb_first(hdr, 5, 0),
            "losses": sum(1 for f in hdr if f[0] == 9),
            "segments": sum(1 for f in fields if f[0] == 2)}


# ---------------------------------------------------------------------------------------
# Processes

class ProcessDied(TestFailure):
    pass


class Proc:
    """One binary run; stdout+stderr go (appended) to a log file in the temp dir."""

    def __init__(self, name, argv, log_path, env=None):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.popen = None
        self.expect_running = False
        self.starts = 0

    def start(self):
        check(not self.running(), "%s already running" % self.name)
        self.starts += 1
        with open(self.log_path, "ab") as f:
            f.write(("=== %s start #%d: %s\n" % (time.strftime("%H:%M:%S"), self.starts,
                                                  " ".join(self.argv))).encode())
            f.flush()
            self.popen = subprocess.Popen(self.argv, stdout=f, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=self.env,
                                          start_new_session=True)
        self.expect_running = True
        if self not in _live_procs:
            _live_procs.append(self)
        return self

    @property
    def pid(self):
        return self.popen.pid if self.popen else None

    def running(self):
        return self.popen is not None and self.popen.poll() is None

    def check_alive(self):
        if self.expect_running and self.popen is not None and self.popen.poll() is not None:
            self.expect_running = False
            raise ProcessDied("%s exited unexpectedly with status %s (log: %s)"
                              % (self.name, self.popen.returncode, self.log_path))

    def stop(self, sig=signal.SIGTERM, timeout=30.0):
        """Send sig and wait for exit; returns the exit status. SIGKILL after timeout."""
        self.expect_running = False
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            try:
                os.kill(self.popen.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout * SCALE)
            except subprocess.TimeoutExpired:
                self.kill9()
                raise TestFailure("%s did not exit within %.0fs of signal %d"
                                  % (self.name, timeout * SCALE, sig))
        return self.popen.returncode

    def kill9(self):
        self.expect_running = False
        if self.popen is not None and self.popen.poll() is None:
            try:
                os.kill(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.popen.wait()

    def log_text(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def tail(self, n=50):
        return "\n".join(self.log_text().splitlines()[-n:])


# ---------------------------------------------------------------------------------------
# Harness: one temp dir, one CA, any number of receivers and agents

class Harness:
    def __init__(self, name, agent_bin=None, receiver_bin=None, keep=None):
        self.name = name
        self.agent_bin = agent_bin
        self.receiver_bin = receiver_bin
        base = os.environ.get("CISTERN_TEST_TMPDIR") or None
        self.tmp = tempfile.mkdtemp(prefix="cistern-%s-" % name, dir=base)
        self.keep = (os.environ.get("CISTERN_KEEP_TMP") == "1") if keep is None else keep
        self.procs = []
        self.popens = []  # helper processes (mosquitto_sub spies...): killed at cleanup
        self._pki = False
        self._clients = {}  # CN -> (cert, key)
        # The device registry as the harness knows it: every receiver made holds each of
        # these devices (agent id -> `device add` credential arguments; the last word wins).
        self.devices = {}
        self.receivers = []
        self._registered = {}  # store path -> {agent id: arguments registered there}
        atexit.register(self.cleanup)

    def path(self, *parts):
        return os.path.join(self.tmp, *parts)

    # -- PKI ------------------------------------------------------------------------
    def _openssl(self, *args):
        r = subprocess.run(["openssl"] + list(args), cwd=self.tmp, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
        if r.returncode != 0:
            raise TestFailure("openssl %s failed:\n%s" % (" ".join(args), r.stdout.decode()))

    def _key(self, path):
        self._openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                      "-out", path)
        os.chmod(path, 0o600)

    def make_pki(self):
        """Throwaway CA, and a server certificate for localhost / 127.0.0.1."""
        if self._pki:
            return
        pki = self.path("pki")
        os.makedirs(pki, exist_ok=True)
        with open(os.path.join(pki, "ext.cnf"), "w") as f:
            f.write("[req]\ndistinguished_name=dn\n[dn]\n"
                    "[v3_ca]\nbasicConstraints=critical,CA:TRUE\n"
                    "keyUsage=critical,keyCertSign,cRLSign\n"
                    "subjectKeyIdentifier=hash\n"
                    "[server]\nbasicConstraints=critical,CA:FALSE\n"
                    "keyUsage=critical,digitalSignature\n"
                    "extendedKeyUsage=serverAuth\n"
                    "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                    "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
                    "[client]\nbasicConstraints=critical,CA:FALSE\n"
                    "keyUsage=critical,digitalSignature\n"
                    "extendedKeyUsage=clientAuth\n"
                    "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
        self.ca_cert = os.path.join(pki, "ca.pem")
        self.ca_key = os.path.join(pki, "ca.key")
        self._key(self.ca_key)
        self._openssl("req", "-x509", "-new", "-key", self.ca_key, "-subj", "/CN=cistern-test-ca",
                      "-days", "3", "-config", "pki/ext.cnf", "-extensions", "v3_ca",
                      "-out", self.ca_cert)
        self.server_cert, self.server_key = self._leaf("server", "localhost", "server")
        self._pki = True

    def _leaf(self, fname, cn, profile):
        pki = self.path("pki")
        key = os.path.join(pki, fname + ".key")
        csr = os.path.join(pki, fname + ".csr")
        crt = os.path.join(pki, fname + ".pem")
        self._key(key)
        self._openssl("req", "-new", "-key", key, "-subj", "/CN=" + cn, "-config", "pki/ext.cnf",
                      "-out", csr)
        self._openssl("x509", "-req", "-in", csr, "-CA", self.ca_cert, "-CAkey", self.ca_key,
                      "-CAcreateserial", "-days", "3", "-sha256", "-extfile", "pki/ext.cnf",
                      "-extensions", profile, "-out", crt)
        return crt, key

    def client_cert(self, cn):
        """(cert, key) for a client certificate with this CN, signed by the test CA. Made
        once per CN: rewriting the files under a client that is reading them would break
        its handshake."""
        self.make_pki()
        if cn not in self._clients:
            safe = re.sub(r"[^A-Za-z0-9_.-]", "_", cn)
            self._clients[cn] = self._leaf("client-" + safe, cn, "client")
        return self._clients[cn]

    # -- the device registry ------------------------------------------------------------
    def device(self, receiver, *args, timeout=60):
        """Run `cistern-receiver --config <receiver's config> device ARGS` (bare: never under
        CISTERN_TEST_WRAPPER); returns (exit status, stdout, stderr)."""
        argv = [self.receiver_bin, "--config", receiver.config_path, "device"]
        argv += [str(a) for a in args]
        try:
            r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, timeout=timeout * SCALE)
        except subprocess.TimeoutExpired:
            raise TestFailure("`%s` still running after %.0fs" % (" ".join(argv), timeout * SCALE))
        return (r.returncode, r.stdout.decode("utf-8", "replace"),
                r.stderr.decode("utf-8", "replace"))

    def register(self, agent_id, key=None, fingerprint=None, hmac_secret_file=None):
        """Make agent_id a device of the harness, with the credentials `device add` takes: key
        (a certificate, CSR, public or private key file), fingerprint ("sha256:HEX"),
        hmac_secret_file. It is registered now in the store of every receiver made so far,
        and in that of every receiver made later. Registering an id again replaces its
        credentials (and enables it) wherever they differ."""
        args = []
        if key:
            args += ["--key", key]
        if fingerprint:
            args += ["--fingerprint", fingerprint]
        if hmac_secret_file:
            args += ["--hmac-secret-file", hmac_secret_file]
        check(args, "register %s: no credential given" % agent_id)
        self.devices[agent_id] = args
        for r in self.receivers:
            self._register_in(r, agent_id, args)

    def _register_in(self, receiver, agent_id, args):
        # Receivers may share a store: `device add` runs once per store and credentials.
        done = self._registered.setdefault(receiver.store_key(), {})
        if done.get(agent_id) == args:
            return
        rc, out, err = self.device(receiver, "add", agent_id, *(args + ["--force"]))
        if rc != 0:
            raise TestFailure("`cistern-receiver --config %s device add %s %s --force` exited "
                              "%d:\n%s%s" % (receiver.config_path, agent_id, " ".join(args), rc,
                                             out, err))
        done[agent_id] = args

    # -- processes ------------------------------------------------------------------
    def add_proc(self, name, argv, wrapper=None):
        # CISTERN_TEST_WRAPPER runs the binaries under a tool, e.g.
        # "valgrind --leak-check=full --errors-for-leak-kinds=definite --error-exitcode=99".
        # wrapper (a list) replaces it for this one process; [] runs it bare.
        wrap = os.environ.get("CISTERN_TEST_WRAPPER", "").split() if wrapper is None else wrapper
        p = Proc(name, list(wrap) + list(argv), self.path(name + ".log"))
        self.procs.append(p)
        return p

    def check_alive(self):
        for p in self.procs:
            p.check_alive()

    def wait(self, pred, timeout=None, what="condition", interval=0.1):
        return wait_until(pred, timeout, what, interval, alive=self.check_alive)

    def dump_logs(self, n=50):
        for p in self.procs:
            sys.stdout.write("----- last %d lines of %s -----\n%s\n" % (n, p.log_path, p.tail(n)))
        sys.stdout.flush()

    def cleanup(self):
        for p in self.procs:
            try:
                p.kill9()
            except Exception:
                pass
        for p in self.popens:
            try:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            except Exception:
                pass
        if self.tmp and os.path.isdir(self.tmp):
            if self.keep:
                log("keeping temp dir %s" % self.tmp)
            else:
                shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp = self.tmp if self.keep else None

    # -- components -----------------------------------------------------------------
    def receiver(self, name="receiver", **kw):
        return Receiver(self, name, **kw)

    def agent(self, name, agent_id, receiver, **kw):
        return Agent(self, name, agent_id, receiver, **kw)

    def mosquitto(self, name="broker", **kw):
        return Mosquitto(self, name, **kw)


def http_get_json(url, timeout=10.0):
    req = urllib.request.Request(url, headers={"Accept": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read().decode("utf-8"))


def ro_connect(path):
    """A read-only SQLite connection (the writer keeps WAL mode; we never write)."""
    con = sqlite3.connect("file:%s?mode=ro" % path, uri=True, timeout=10.0)
    con.execute("PRAGMA busy_timeout=10000")
    return con


class Receiver:
    """mqtt: a Mosquitto; the receiver then also ingests from it (top-level `mqtt:` section)
    with a client certificate whose CN is mqtt_cn (the broker's ACL knows it), client id
    mqtt_client_id (default: the name) and shared-subscription group mqtt_group (default:
    the receiver's own default). db_path lets several receivers share one store."""

    def __init__(self, h, name="receiver", limits=None, extra=None, log_level="info", port=None,
                 api_port=None, mqtt=None, mqtt_cn="receiver-1", mqtt_client_id=None,
                 mqtt_group=None, db_path=None, wrapper=None):
        self.h = h
        self.name = name
        h.make_pki()
        self.port = port or free_port()
        self.api_port = api_port or free_port()
        self.db_path = db_path or h.path(name + "-store.db")
        self.mqtt = mqtt
        self.mqtt_client_id = mqtt_client_id or name
        cfg = {
            "log": {"level": log_level},
            "listen": {
                "http": "127.0.0.1:%d" % self.port,
                "tls": {"cert_file": h.server_cert, "key_file": h.server_key,
                        "client_ca_file": h.ca_cert},
                "api": "127.0.0.1:%d" % self.api_port,
            },
            "store": {"type": "sqlite", "path": self.db_path},
            "limits": deep_merge({"max_body": "8MiB", "max_decompressed": "64MiB",
                                  "max_records": 100000, "max_connections": 64,
                                  "connection_timeout": "30s"}, limits or {}),
        }
        if mqtt is not None:
            cert, key = h.client_cert(mqtt_cn)
            m = {"url": mqtt.url, "client_id": self.mqtt_client_id,
                 "tls": {"ca_file": h.ca_cert, "cert_file": cert, "key_file": key}}
            if mqtt_group:
                m["group"] = mqtt_group
            if mqtt.topic_prefix != "cistern/v1":
                m["topic_prefix"] = mqtt.topic_prefix
            cfg["mqtt"] = m
        cfg = deep_merge(cfg, extra)
        self.config = cfg
        self.config_path = h.path(name + ".yaml")
        with open(self.config_path, "w") as f:
            f.write("# written by cistern_harness\n" + to_yaml(cfg) + "\n")
        self.url = "https://127.0.0.1:%d/v1/batches" % self.port
        self.api = "http://127.0.0.1:%d" % self.api_port
        self.proc = h.add_proc(name, [h.receiver_bin, "--config", self.config_path], wrapper)
        # every device the harness knows is registered in this receiver's store
        h.receivers.append(self)
        for agent_id, args in list(h.devices.items()):
            h._register_in(self, agent_id, args)

    def store_key(self):
        """The store this receiver writes (several receivers may share one)."""
        return os.path.realpath(self.config.get("store", {}).get("path") or self.db_path)

    def start(self, wait=True):
        self.proc.start()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout=None):
        def ok():
            return http_get_json(self.api + "/healthz", timeout=2).get("status") == "ok"
        self.h.wait(ok, timeout, "%s /healthz on %s" % (self.name, self.api))

    def wait_subscribed(self, since=0, timeout=None):
        """Wait until the broker's log shows this receiver's SUBSCRIBE (after log offset since)."""
        check(self.mqtt is not None, "%s has no mqtt ingest" % self.name)
        self.mqtt.wait_subscribed(self.mqtt_client_id, since=since, timeout=timeout)

    def stop(self, sig=signal.SIGTERM):
        return self.proc.stop(sig)

    def get(self, path):
        return http_get_json(self.api + path)

    def gaps(self, agent_id, epoch=None):
        q = "/v1/agents/%s/gaps" % agent_id + ("?epoch=%d" % epoch if epoch is not None else "")
        return self.get(q)

    def losses(self, agent_id):
        return self.get("/v1/agents/%s/losses" % agent_id)["losses"]

    def agents(self):
        return {a["id"]: a for a in self.get("/v1/agents")["agents"]}

    def api_records(self, agent_id, limit=1000, epoch=None):
        """All records of an agent through the paged read API."""
        out = []
        after = 0
        while True:
            q = "/v1/agents/%s/records?after=%d&limit=%d" % (
                urllib.request.quote(agent_id, safe=""), after, limit)
            if epoch is not None:
                q += "&epoch=%d" % epoch
            page = self.get(q)
            recs = page["records"]
            out.extend(recs)
            if not recs:
                return out
            nxt = page.get("next_after")
            check(nxt is not None and int(nxt) > after,
                  "API paging: next_after %r does not advance past %d" % (nxt, after))
            after = int(nxt)

    def db(self):
        return ro_connect(self.db_path)

    def rows(self, agent_id):
        """[(epoch:u64, seq, payload:bytes, stream)] for the agent, straight from the store DB."""
        if not os.path.exists(self.db_path):
            return []
        con = self.db()
        try:
            return [(u64(e), int(s), as_bytes(p), st) for e, s, p, st in con.execute(
                "SELECT epoch, seq, payload, stream FROM records WHERE agent_id=?", (agent_id,))]
        finally:
            con.close()

    def count(self, agent_id):
        if not os.path.exists(self.db_path):
            return 0
        con = self.db()
        try:
            return con.execute("SELECT count(*) FROM records WHERE agent_id=?",
                               (agent_id,)).fetchone()[0]
        finally:
            con.close()


class Agent:
    """mqtt: a Mosquitto to forward through (forward.transport mqtt, ssl:// to its TLS
    listener, with the agent's client certificate, CN = cn or agent_id); receiver is then
    only informative and may be None.

    register (default True): the agent is a device of the harness (Harness.register), so
    every receiver of the harness, made before or after it, holds it: its signing key
    (forward.sign.key_file, else forward.tls.key_file) or, with forward.sign.method hmac,
    its secret file. When cn differs from agent_id, that CN is registered too (with the
    same key) unless the harness already knows it: over HTTPS the receiver refuses an
    unregistered CN on its headers, before any check that a test of the batch's agent id
    would be about. register=False leaves the agent unknown (a test registers it with
    Harness.device or Harness.register)."""

    def __init__(self, h, name, agent_id, receiver, cn=None, inputs=None, unix_socket=True,
                 tcp=True, max_line="64KiB", extra=None, log_level="info", url=None,
                 spool_path=None, mqtt=None, wrapper=None, register=True):
        self.h = h
        self.mqtt = mqtt
        self.name = name
        self.agent_id = agent_id
        self.receiver = receiver
        self.cert, self.key = h.client_cert(cn or agent_id)
        self.spool_path = spool_path or h.path(name + "-spool.db")
        self.sock_path = h.path(name + ".sock") if unix_socket else None
        self.tcp_port = free_port() if tcp else None
        if inputs is None:
            inp = {"name": "apps", "type": "socket", "priority": "normal", "max_line": max_line}
            if self.sock_path:
                inp["path"] = self.sock_path
            if self.tcp_port:
                inp["listen"] = "127.0.0.1:%d" % self.tcp_port
            inputs = [inp]
        self.inputs = inputs
        self.status_sock = h.path(name + "-status.sock")
        cfg = {
            "agent": {"id": agent_id},
            "log": {"level": log_level},
            "status": {"socket": self.status_sock},
            "spool": {"path": self.spool_path, "sync": "normal", "commit_interval": "50ms",
                      "commit_max_records": 5000, "commit_max_bytes": "1MiB"},
            "inputs": inputs,
            "forward": {
                "transport": "https",
                "url": url or (mqtt.url if mqtt is not None else receiver.url),
                "tls": {"ca_file": h.ca_cert, "cert_file": self.cert, "key_file": self.key},
                "batch": {"max_records": 5000, "max_bytes": "1MiB", "max_delay": "200ms"},
                "in_flight": 4,
                "timeout": "10s",
                "retry": {"initial": "200ms", "max": "1s"},
                "shutdown_timeout": "5s",
            },
        }
        if mqtt is not None:
            cfg["forward"]["transport"] = "mqtt"
            cfg["forward"]["retry"]["unreachable_max"] = "1s"
            # the documented default, spelled out: the tests find the agent in the broker's log
            cfg["forward"]["mqtt"] = {"client_id": agent_id}
            if mqtt.topic_prefix != "cistern/v1":
                cfg["forward"]["mqtt"]["topic_prefix"] = mqtt.topic_prefix
        cfg = deep_merge(cfg, extra)
        self.mqtt_client_id = cfg["forward"].get("mqtt", {}).get("client_id", agent_id)
        self.config = cfg
        self.config_path = h.path(name + ".yaml")
        with open(self.config_path, "w") as f:
            f.write("# written by cistern_harness\n" + to_yaml(cfg) + "\n")
        self.proc = h.add_proc(name, [h.agent_bin, "--config", self.config_path], wrapper)
        if register:
            h.register(agent_id, **self.credentials())
            tls = cfg["forward"].get("tls", {})
            if (cn and cn != agent_id and cn not in h.devices
                    and tls.get("cert_file") == self.cert):
                h.register(cn, key=tls.get("key_file") or self.key)

    def credentials(self):
        """What the registry must hold for this agent's signatures, as Harness.register's
        keyword arguments."""
        fwd = self.config["forward"]
        sign = fwd.get("sign") or {}
        if sign.get("method") == "hmac":
            return {"hmac_secret_file": sign["hmac_secret_file"]}
        return {"key": sign.get("key_file") or fwd.get("tls", {}).get("key_file") or self.key}

    def start(self, wait=True):
        # a stale socket file from a kill -9 must not make us think the agent is up
        self.proc.start()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout=None):
        def ok():
            if self.sock_path:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.settimeout(2)
                    s.connect(self.sock_path)
                finally:
                    s.close()
            if self.tcp_port:
                s = socket.create_connection(("127.0.0.1", self.tcp_port), timeout=2)
                s.close()
            return True
        if self.sock_path or self.tcp_port:
            self.h.wait(ok, timeout, "%s socket input to accept connections" % self.name)
        else:
            self.h.wait(lambda: os.path.exists(self.spool_path), timeout,
                        "%s to create its spool" % self.name)

    def stop(self, sig=signal.SIGTERM):
        return self.proc.stop(sig)

    def kill9(self):
        self.proc.kill9()

    def client(self, via="unix"):
        if via == "unix":
            return SocketClient(unix_path=self.sock_path)
        return SocketClient(tcp=("127.0.0.1", self.tcp_port))

    # -- spool ------------------------------------------------------------------------
    def spool(self):
        return ro_connect(self.spool_path)

    def _q(self, sql, args=()):
        con = self.spool()
        try:
            return con.execute(sql, args).fetchall()
        finally:
            con.close()

    def meta(self):
        return {k: v for k, v in self._q("SELECT key, value FROM meta")}

    def epoch(self):
        return u64(self.meta()["epoch"])

    def next_seq(self):
        return int(self.meta()["next_seq"])

    def segment_count(self):
        return self._q("SELECT count(*) FROM segments")[0][0]

    def pending_records(self):
        return self._q("SELECT coalesce(sum(record_count),0) FROM segments")[0][0]

    def ledger(self):
        cols = ["id", "reason", "epoch", "first_seq", "last_seq", "count", "ts_ms", "detail", "sent"]
        return [dict(zip(cols, r)) for r in self._q(
            "SELECT id, reason, epoch, first_seq, last_seq, count, ts_ms, detail, sent "
            "FROM ledger ORDER BY id")]

    def integrity_check(self):
        return [r[0] for r in self._q("PRAGMA integrity_check")]

    def spool_files_bytes(self):
        """Bytes of the spool's database + WAL files on disk now."""
        total = 0
        for suffix in ("", "-wal"):
            try:
                total += os.stat(self.spool_path + suffix).st_size
            except FileNotFoundError:
                pass
        return total

    def status(self, *args, json_out=True):
        """Run `cistern-agent status -c CONFIG [--json]`; returns the parsed object (or the text)."""
        argv = [self.h.agent_bin, "status", "-c", self.config_path] + (["--json"] if json_out else [])
        r = subprocess.run(argv + list(args), capture_output=True, timeout=30 * SCALE)
        check(r.returncode == 0, "status exited %d: %s" % (r.returncode, r.stderr.decode(errors="replace")))
        out = r.stdout.decode()
        return json.loads(out) if json_out else out

    def stats_lines(self):
        return re.findall(r"\[stats\] produced=(\d+) spooled=(\d+) delivered=(\d+) pending=(\d+)"
                          r" rejected=(\d+)", self.proc.log_text())


# ---------------------------------------------------------------------------------------
# MQTT broker (mosquitto) and its stock clients

MOSQUITTO_BIN = os.environ.get("CISTERN_MOSQUITTO", "/usr/sbin/mosquitto")
MOSQUITTO_PUB = shutil.which("mosquitto_pub") or "/usr/bin/mosquitto_pub"
MOSQUITTO_SUB = shutil.which("mosquitto_sub") or "/usr/bin/mosquitto_sub"


# -- valgrind and sanitizers, for the leak tests ------------------------------------------
# --fair-sched=yes: valgrind runs one thread at a time, and its default lock lets a busy thread
# keep it while a woken one waits (for tens of ms on a loaded machine). Paho's reader then sees a
# broken connection far later than it would natively; the ticket lock keeps the threads'
# order closer to theirs.
VALGRIND_ARGS = ["--leak-check=full", "--errors-for-leak-kinds=definite",
                 "--error-exitcode=99", "--num-callers=30", "--fair-sched=yes"]


def sanitized(path):
    """Built with -fsanitize=address (or leak)? Such binaries import __asan_init/__lsan_init
    (valgrind cannot run them; LeakSanitizer checks at exit instead)."""
    with open(path, "rb") as f:
        data = f.read()
    return b"__asan_init" in data or b"__lsan_init" in data


def valgrind_report(proc):
    """(errors, definitely lost bytes, the error and definite-leak records) from the valgrind
    output in PROC's log."""
    text = proc.log_text()
    errs = re.findall(r"ERROR SUMMARY: (\d+) errors", text)
    lost = re.findall(r"definitely lost: ([\d,]+) bytes", text)
    records = []
    lines = text.splitlines()
    for i, l in enumerate(lines):
        if "are definitely lost" in l or re.search(r"==\d+== (Invalid|Conditional|Use of)", l):
            records.append("\n".join(lines[i:i + 30]))
    return (int(errs[-1]) if errs else None,
            int(lost[-1].replace(",", "")) if lost else 0, records)


def mosquitto_missing():
    """None when the broker and its clients are installed, else what is missing."""
    missing = [p for p in (MOSQUITTO_BIN, MOSQUITTO_PUB, MOSQUITTO_SUB)
               if not (os.path.isfile(p) and os.access(p, os.X_OK))]
    return ", ".join(missing) or None


def port_listening(port, host="127.0.0.1"):
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False


class Mosquitto:
    """A mosquitto broker on a loopback port it picks; config, ACL, persistence and log in
    the test's temp dir. It survives kill9()/start() on the same port, with its
    persistence (sessions and queued messages as of its last save: a clean stop() saves,
    a kill -9 does not; autosave_interval=N also saves every N seconds).

    tls=True (the transport broker): one TLS listener (url ssl://127.0.0.1:port) with the
    harness's server certificate. Every client needs a certificate from the test CA
    (require_certificate) and its CN is its user name (use_identity_as_username). The ACL:
      - any CN (an agent) may write only <prefix>/<CN>/batch and read only <prefix>/<CN>/ack;
      - each CN in `receivers` reads <prefix>/+/batch (also as $share/<group>/...) and
        writes <prefix>/+/ack;
      - each CN in `admins` may read and write everything (the tests' spy and forger).
    tls=False (a gateway's local broker): one plain listener on loopback
    (url tcp://127.0.0.1:port), anonymous clients, no ACL: devices -> agent mqtt input.

    The broker logs everything (log_type all) to its Proc log, which the tests read to
    learn when a client has subscribed and which client got which PUBLISH."""

    def __init__(self, h, name="broker", tls=True, topic_prefix="cistern/v1",
                 receivers=("receiver-1", "receiver-2"), admins=("admin",), port=None,
                 autosave_interval=None, extra_conf=""):
        self.h = h
        self.name = name
        self.tls = tls
        self.topic_prefix = topic_prefix
        self.receivers = list(receivers)
        self.admins = list(admins)
        self.port = port or free_port()
        scheme = "ssl" if tls else "tcp"
        self.url = "%s://127.0.0.1:%d" % (scheme, self.port)
        self.dir = h.path(name)
        os.makedirs(self.dir, exist_ok=True)
        self.conf_path = os.path.join(self.dir, "mosquitto.conf")
        self.acl_path = os.path.join(self.dir, "acl")
        if tls:
            h.make_pki()
        conf = [
            "# written by cistern_harness",
            "per_listener_settings false",
            "persistence true",
            "persistence_location %s/" % self.dir,
            "persistence_file mosquitto.db",
        ]
        if autosave_interval is not None:
            # also save every N seconds, so a kill -9 restarts from a slightly stale state
            conf.append("autosave_interval %d" % autosave_interval)
        conf += [
            # the gateway's local broker keeps everything queued for the agent's session
            # while it is away (mosquitto's default would drop past 1000 messages)
            "max_queued_messages 1000000",
            # the Proc log (mosquitto flushes its log file per line, not stdout)
            "log_dest file %s" % h.path(name + ".log"),
            "log_type all",
            "connection_messages true",
            "log_timestamp true",
        ]
        if os.geteuid() == 0:
            conf.append("user root")  # else mosquitto drops to 'mosquitto', who can't read our keys
        conf.append("listener %d 127.0.0.1" % self.port)
        if tls:
            conf += [
                "cafile %s" % h.ca_cert,
                "certfile %s" % h.server_cert,
                "keyfile %s" % h.server_key,
                "require_certificate true",
                "use_identity_as_username true",
                "allow_anonymous false",
                "acl_file %s" % self.acl_path,
            ]
            acl = ["# each agent (user name = certificate CN) only under its own id",
                   "pattern write %s/%%u/batch" % topic_prefix,
                   "pattern read %s/%%u/ack" % topic_prefix, ""]
            # (mosquitto checks a $share/<group>/<filter> subscription against <filter>)
            for r in self.receivers:
                acl += ["user %s" % r,
                        "topic read %s/+/batch" % topic_prefix,
                        "topic write %s/+/ack" % topic_prefix, ""]
            for a in self.admins:
                acl += ["user %s" % a, "topic readwrite #", ""]
            with open(self.acl_path, "w") as f:
                f.write("\n".join(acl) + "\n")
        else:
            conf.append("allow_anonymous true")
        if extra_conf:
            conf.append(extra_conf)
        with open(self.conf_path, "w") as f:
            f.write("\n".join(conf) + "\n")
        # not under CISTERN_TEST_WRAPPER: the broker is not the code under test
        self.proc = h.add_proc(name, [MOSQUITTO_BIN, "-c", self.conf_path], wrapper=[])

    # -- lifecycle ------------------------------------------------------------------
    def start(self, wait=True):
        self.proc.start()
        if wait:
            self.wait_listening()
        return self

    def wait_listening(self, timeout=None):
        self.h.wait(lambda: port_listening(self.port), timeout,
                    "%s to listen on port %d" % (self.name, self.port))

    def kill9(self):
        self.proc.kill9()

    def stop(self, sig=signal.SIGTERM):
        return self.proc.stop(sig)

    def restart(self, kill=True, pause=0.0):
        """kill -9 (or SIGTERM when kill=False), wait pause seconds, start on the same port
        and wait until it listens."""
        if kill:
            self.kill9()
        else:
            self.stop()
        if pause:
            time.sleep(pause)
        return self.start()

    def running(self):
        return self.proc.running()

    # -- its log ----------------------------------------------------------------------
    def log_text(self):
        return self.proc.log_text()

    def mark(self):
        """An offset in the broker's log: pass it as `since` to look only at what follows."""
        return len(self.log_text())

    def wait_log(self, regex, since=0, timeout=None, what=None):
        rx = re.compile(regex)
        return self.h.wait(lambda: rx.search(self.log_text()[since:]), timeout,
                           what or "broker log to match %r" % regex)

    def wait_subscribed(self, client_id, since=0, timeout=None):
        """Wait for the broker to have answered a SUBSCRIBE of client_id (after since)."""
        return self.wait_log(r"Sending SUBACK to %s\b" % re.escape(client_id), since, timeout,
                             "%s to subscribe on %s" % (client_id, self.name))

    def publishes_to(self, client_id, topic_regex=".*", since=0):
        """How many PUBLISH the broker sent to client_id on a topic matching topic_regex."""
        rx = re.compile(r"Sending PUBLISH to %s \(d\d, q\d, r\d, m\d+, '(%s)'"
                        % (re.escape(client_id), topic_regex))
        return len(rx.findall(self.log_text()[since:]))

    # -- the stock clients --------------------------------------------------------------
    def client_args(self, identity="admin"):
        """Connection arguments for mosquitto_pub/mosquitto_sub (MQTT v5). On the TLS
        broker the client authenticates with a test-CA certificate whose CN is identity."""
        args = ["-h", "127.0.0.1", "-p", str(self.port), "-V", "5"]
        if self.tls:
            cert, key = self.h.client_cert(identity)
            args += ["--cafile", self.h.ca_cert, "--cert", cert, "--key", key]
        return args

    def pub(self, topic, args=(), identity="admin", stdin=None, timeout=120):
        """Run mosquitto_pub -t topic ARGS; returns (exit status, output)."""
        argv = [MOSQUITTO_PUB] + self.client_args(identity) + ["-t", topic] + list(args)
        r = subprocess.run(argv, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           timeout=timeout * SCALE)
        return r.returncode, r.stdout.decode("utf-8", "replace")

    def sub(self, topic, args=(), identity="admin", stdout=subprocess.PIPE):
        """Start mosquitto_sub -t topic ARGS in the background; returns the Popen."""
        argv = [MOSQUITTO_SUB] + self.client_args(identity) + ["-t", topic] + list(args)
        p = subprocess.Popen(argv, stdout=stdout, stderr=subprocess.PIPE,
                             stdin=subprocess.DEVNULL)
        self.h.popens.append(p)
        return p


# ---------------------------------------------------------------------------------------
# Socket input client

class SocketClient:
    """Pipelined line client for the agent's socket input.

    send()/send_many() write lines without waiting; a reader thread collects the answer
    lines. The i-th answer belongs to the i-th line sent (the agent answers in order).
    """

    def __init__(self, unix_path=None, tcp=None, timeout=60.0):
        if unix_path:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect(unix_path)
        else:
            s = socket.create_connection(tcp, timeout=10)
        s.settimeout(timeout * SCALE)  # bounds a blocked sendall
        self.sock = s
        self.sent = []      # payloads (bytes), in order
        self.answers = []   # ("OK", seq:int) or ("ERR", reason:str), in order
        self.eof = False
        self.error = None
        self.cond = threading.Condition()
        self._closing = False
        self._rt = threading.Thread(target=self._reader, daemon=True)
        self._rt.start()

    def _reader(self):
        buf = b""
        try:
            while True:
                try:
                    chunk = self.sock.recv(65536)
                except socket.timeout:
                    if self._closing:
                        break
                    continue
                if not chunk:
                    break
                buf += chunk
                lines = buf.split(b"\n")
                buf = lines.pop()
                parsed = []
                for ln in lines:
                    t = ln.decode("utf-8", "replace").rstrip("\r")
                    if t.startswith("OK "):
                        parsed.append(("OK", int(t[3:].strip())))
                    elif t.startswith("ERR"):
                        parsed.append(("ERR", t[3:].strip()))
                    else:
                        parsed.append(("?", t))
                with self.cond:
                    self.answers.extend(parsed)
                    self.cond.notify_all()
        except OSError as e:
            self.error = e
        finally:
            with self.cond:
                self.eof = True
                self.cond.notify_all()

    def send(self, payload):
        self.send_many([payload])

    def send_many(self, payloads):
        data = b"".join(as_bytes(p) + b"\n" for p in payloads)
        with self.cond:
            self.sent.extend(as_bytes(p) for p in payloads)
        self.sock.sendall(data)

    def wait_answers(self, n=None, timeout=None, alive=None):
        """Wait until n answers (default: one per line sent) arrived; return the answers."""
        n = len(self.sent) if n is None else n
        timeout = DEFAULT_WAIT if timeout is None else timeout
        deadline = time.monotonic() + timeout * SCALE
        with self.cond:
            while len(self.answers) < n:
                if self.eof:
                    raise TestFailure("connection closed after %d of %d answers"
                                      % (len(self.answers), n))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TestFailure("timed out waiting for answers: got %d of %d"
                                      % (len(self.answers), n))
                self.cond.wait(min(left, 0.5))
                if alive is not None:
                    self.cond.release()
                    try:
                        alive()
                    finally:
                        self.cond.acquire()
            return list(self.answers)

    def acked(self):
        """[(payload, seq)] of every line answered OK so far."""
        with self.cond:
            return [(self.sent[i], a[1]) for i, a in enumerate(self.answers) if a[0] == "OK"]

    def close(self):
        self._closing = True
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self._rt.join(1.0)
        try:
            self.sock.close()
        except OSError:
            pass

    def abort(self):
        self._closing = True
        try:
            self.sock.close()
        except OSError:
            pass


class LineProducer(threading.Thread):
    """Feeds an agent's socket input with unique lines ("<prefix>-<n>") in chunks of `chunk`
    every `interval` seconds, over one connection, until stop(); keeps at most
    max_unanswered lines unanswered. stop() gives (acked, sent) as SocketClient does."""

    def __init__(self, agent, prefix, chunk=50, interval=0.05, max_unanswered=2000, via="unix"):
        super().__init__(daemon=True)
        self.agent = agent
        self.prefix = prefix
        self.chunk = chunk
        self.interval = interval
        self.max_unanswered = max_unanswered
        self.via = via
        self.stop_flag = threading.Event()
        self.client = None
        self.error = None
        self.n = 0

    def run(self):
        try:
            c = self.client = self.agent.client(self.via)
            while not self.stop_flag.is_set() and not c.eof:
                c.send_many([("%s-%d" % (self.prefix, self.n + i)).encode()
                             for i in range(self.chunk)])
                self.n += self.chunk
                while (not c.eof and not self.stop_flag.is_set()
                       and len(c.sent) - len(c.answers) > self.max_unanswered):
                    time.sleep(0.01)
                time.sleep(self.interval)
        except Exception as e:  # surfaced by stop()
            self.error = e

    def stop(self, timeout=60):
        """Stop sending, wait for every answer, close; returns (acked, sent)."""
        self.stop_flag.set()
        self.join(timeout * SCALE)
        check(not self.is_alive(), "producer %s did not stop" % self.prefix)
        check(self.error is None, "producer %s failed: %r" % (self.prefix, self.error))
        c = self.client
        answers = c.wait_answers(timeout=timeout, alive=self.agent.h.check_alive)
        bad = [a for a in answers if a[0] != "OK"]
        check(not bad, "producer %s: %d lines not answered OK, e.g. %r"
              % (self.prefix, len(bad), bad[:3]))
        c.close()
        return c.acked(), list(c.sent)


def send_lines(agent, payloads, via="unix", timeout=120):
    """Send payloads to the agent's socket input; every line must be answered OK.
    Returns (acked, sent)."""
    c = agent.client(via)
    c.send_many(payloads)
    answers = c.wait_answers(len(payloads), timeout=timeout, alive=agent.h.check_alive)
    bad = [a for a in answers if a[0] != "OK"]
    check(not bad, "%d lines not answered OK, e.g. %r" % (len(bad), bad[:3]))
    acked, sent = c.acked(), list(c.sent)
    c.close()
    return acked, sent


# ---------------------------------------------------------------------------------------
# Checks shared by the tests

def assert_stored_exactly_once(receiver, agent, acked, sent=None, epoch=None):
    """Every (payload, seq) in acked is stored exactly once, under the agent's epoch and that
    seq; no payload is stored twice; if sent is given, every stored payload was sent.
    Returns the stored rows."""
    rows = receiver.rows(agent.agent_id)
    epoch = agent.epoch() if epoch is None else epoch
    by_payload = {}
    by_key = {}
    for e, s, p, _st in rows:
        by_payload.setdefault(p, []).append((e, s))
        by_key.setdefault((e, s), []).append(p)
    dup_keys = {k: v for k, v in by_key.items() if len(v) > 1}
    check(not dup_keys, "rows stored twice under one key: %r" % list(dup_keys.items())[:5])
    dups = {p: v for p, v in by_payload.items() if len(v) > 1}
    check(not dups, "%d payloads stored more than once, e.g. %r"
          % (len(dups), list(dups.items())[:3]))
    missing = []
    wrong = []
    for p, seq in acked:
        got = by_payload.get(p)
        if not got:
            missing.append((seq, p[:60]))
        elif got[0] != (epoch, seq):
            wrong.append((p[:60], "OK said epoch %d seq %d" % (epoch, seq),
                          "stored as epoch %d seq %d" % got[0]))
    check(not missing, "%d acknowledged records are not stored, e.g. %r"
          % (len(missing), missing[:5]))
    check(not wrong, "%d acknowledged records stored under another key, e.g. %r"
          % (len(wrong), wrong[:5]))
    if sent is not None:
        sent_set = set(sent)
        unexpected = [p for p in by_payload if p not in sent_set]
        check(not unexpected, "%d stored payloads were never sent, e.g. %r"
              % (len(unexpected), unexpected[:3]))
    return rows


def assert_accounted(receiver, agent, acked, reasons, epoch=None):
    """Every acknowledged record is either stored exactly once under its (epoch, seq), or its
    seq lies in a loss-ledger range the receiver holds for that epoch with one of REASONS.
    Nothing is stored twice. Returns (stored, dropped) counts."""
    rows = receiver.rows(agent.agent_id)
    epoch = agent.epoch() if epoch is None else epoch
    by_key = {}
    for e, s, p, _st in rows:
        by_key.setdefault((e, s), []).append(p)
    dup = {k: v for k, v in by_key.items() if len(v) > 1}
    check(not dup, "rows stored twice under one key: %r" % list(dup.items())[:3])
    ranges = [(int(l["first_seq"]), int(l["last_seq"]), l["reason"])
              for l in receiver.losses(agent.agent_id)
              if u64(l["epoch"]) == epoch and l["reason"] in reasons]
    stored = dropped = 0
    lost = []
    wrong = []
    for p, seq in acked:
        got = by_key.get((epoch, seq))
        if got:
            if got[0] != p:
                wrong.append(seq)
            stored += 1
        elif any(a <= seq <= b for a, b, _r in ranges):
            dropped += 1
        else:
            lost.append(seq)
    check(not wrong, "%d seqs stored with another payload, e.g. %r" % (len(wrong), wrong[:5]))
    check(not lost, "%d acknowledged records neither stored nor in the loss ledger (%s), e.g. "
          "seqs %r" % (len(lost), "/".join(reasons), lost[:10]))
    return stored, dropped


def run(test_fn, name):
    """Entry point of a test script: argv = [agent_bin, receiver_bin]."""
    if len(sys.argv) < 3:
        sys.stderr.write("usage: %s AGENT_BIN RECEIVER_BIN\n" % sys.argv[0])
        sys.exit(2)
    h = Harness(name, agent_bin=os.path.abspath(sys.argv[1]),
                receiver_bin=os.path.abspath(sys.argv[2]))
    t0 = time.monotonic()
    ok = False
    try:
        test_fn(h)
        ok = True
    except BaseException as e:
        if isinstance(e, SystemExit) and e.code == 0:
            ok = True
        elif isinstance(e, SystemExit) and e.code == 77:
            log("%s: SKIPPED" % name)
            sys.exit(77)
        else:
            sys.stdout.write("FAIL: %s\n" % name)
            traceback.print_exc(file=sys.stdout)
            h.dump_logs(50)
    finally:
        h.cleanup()
    log("%s: %s in %.1fs" % (name, "PASS" if ok else "FAIL", time.monotonic() - t0))
    sys.exit(0 if ok else 1)

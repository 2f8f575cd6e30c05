#!/usr/bin/env python3
"""o) Bad certificates and old TLS versions are refused, on both sides, in plain words.

Certificates are made here with the openssl CLI (`openssl ca` for arbitrary validity windows).

Agent -> receiver over HTTPS, the receiver presenting, in turn: an expired certificate, one not
valid yet, a self-signed one, one from another CA, one for another host name. For each: the
agent stores nothing at the receiver, its records stay in the spool, its log says what is wrong
in words (once for the failure, not once per retry); then the receiver restarts with its good
certificate and every record is stored exactly once.

The agent presenting an expired, not-yet-valid, self-signed or other-CA client certificate:
refused (401), nothing stored, the receiver logs which check failed once (not once per retry),
the agent's log carries the receiver's words (once), and the agent keeps every record
spooled: a 401 is about the certificate, not the batch, so it is retried with backoff.

TLS versions: a TLS 1.1 client (openssl s_client) is refused by the receiver with a protocol
version alert or a closed connection, while the same client with TLS 1.2 completes the
handshake; an agent whose "receiver" (openssl s_server) speaks TLS 1.1 only refuses it and
says so.

MQTT: the broker (mosquitto) presents an expired, then an other-CA certificate: the agent's
MQTT transport and the receiver's MQTT ingest both refuse to connect and log it (for now in
OpenSSL's words, "certificate verify failed", which does not say which check failed); the
records stay spooled and are delivered exactly once when the broker's good certificate is
back. Skipped when mosquitto is not installed."""
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cistern_harness as ch

AGENT_ID = "gw-tls"

EXT = """[req]
distinguished_name=dn
[dn]
[v3_ca]
basicConstraints=critical,CA:TRUE
keyUsage=critical,keyCertSign,cRLSign
subjectKeyIdentifier=hash
[server]
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost
subjectKeyIdentifier=hash
[server_selfsigned]
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyCertSign
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost
subjectKeyIdentifier=hash
[server_otherhost]
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=DNS:wrong.example.net
subjectKeyIdentifier=hash
[client]
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth
subjectKeyIdentifier=hash
[client_selfsigned]
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyCertSign
extendedKeyUsage=clientAuth
subjectKeyIdentifier=hash
"""


class BadPki:
    """Certificates signed by the harness's CA with chosen validity windows (openssl ca), a
    second, unrelated CA, and self-signed ones."""

    def __init__(self, h):
        h.make_pki()
        self.h = h
        self.dir = h.path("badpki")
        os.makedirs(os.path.join(self.dir, "new"), exist_ok=True)
        self.ext = os.path.join(self.dir, "ext.cnf")
        with open(self.ext, "w") as f:
            f.write(EXT)
        open(os.path.join(self.dir, "index.txt"), "w").close()
        with open(os.path.join(self.dir, "serial"), "w") as f:
            f.write("1000\n")
        self.ca_cnf = os.path.join(self.dir, "ca.cnf")
        with open(self.ca_cnf, "w") as f:
            f.write("[ca]\ndefault_ca=cd\n[cd]\ndir=%s\ndatabase=$dir/index.txt\n"
                    "new_certs_dir=$dir/new\nserial=$dir/serial\ndefault_md=sha256\n"
                    "policy=pol\nunique_subject=no\ncopy_extensions=none\n"
                    "[pol]\ncommonName=supplied\n" % self.dir)
        # another CA, that nobody trusts
        self.other_ca_key = self.key("other-ca")
        self.other_ca = os.path.join(self.dir, "other-ca.pem")
        self.openssl("req", "-x509", "-new", "-key", self.other_ca_key, "-subj",
                     "/CN=some-other-ca", "-days", "3", "-config", self.ext, "-extensions",
                     "v3_ca", "-out", self.other_ca)

    def openssl(self, *args):
        r = subprocess.run(["openssl"] + list(args), cwd=self.dir, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
        if r.returncode != 0:
            raise ch.TestFailure("openssl %s failed:\n%s" % (" ".join(args), r.stdout.decode()))
        return r.stdout.decode()

    def key(self, name):
        k = os.path.join(self.dir, name + ".key")
        self.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                     "-out", k)
        os.chmod(k, 0o600)
        return k

    def csr(self, name, cn):
        k = self.key(name)
        csr = os.path.join(self.dir, name + ".csr")
        self.openssl("req", "-new", "-key", k, "-subj", "/CN=" + cn, "-config", self.ext,
                     "-out", csr)
        return k, csr

    def signed(self, name, cn, profile, start=None, end=None, ca=None, ca_key=None):
        """Signed by the harness's CA (or CA/CA_KEY), valid from START to END
        (YYYYMMDDHHMMSSZ; default: from yesterday for 3 days)."""
        k, csr = self.csr(name, cn)
        crt = os.path.join(self.dir, name + ".pem")
        t = time.time()
        start = start or time.strftime("%Y%m%d%H%M%SZ", time.gmtime(t - 86400))
        end = end or time.strftime("%Y%m%d%H%M%SZ", time.gmtime(t + 3 * 86400))
        self.openssl("ca", "-batch", "-config", self.ca_cnf, "-notext",
                     "-cert", ca or self.h.ca_cert, "-keyfile", ca_key or self.h.ca_key,
                     "-in", csr, "-out", crt, "-startdate", start, "-enddate", end,
                     "-extfile", self.ext, "-extensions", profile)
        return crt, k

    def self_signed(self, name, cn, profile):
        k = self.key(name)
        crt = os.path.join(self.dir, name + ".pem")
        self.openssl("req", "-x509", "-new", "-key", k, "-subj", "/CN=" + cn, "-days", "3",
                     "-config", self.ext, "-extensions", profile, "-out", crt)
        return crt, k

    def expired(self, name, cn, profile):
        return self.signed(name, cn, profile, start="20200101000000Z", end="20200102000000Z")

    def not_yet_valid(self, name, cn, profile):
        return self.signed(name, cn, profile, start="20990101000000Z", end="20991231000000Z")

    def other_ca_signed(self, name, cn, profile):
        return self.signed(name, cn, profile, ca=self.other_ca, ca_key=self.other_ca_key)


def log_since(proc, mark):
    return proc.log_text()[mark:]


def wait_log(h, proc, mark, regex, what, timeout=60):
    rx = re.compile(regex)
    return h.wait(lambda: rx.search(log_since(proc, mark)), timeout=timeout, what=what)


class Ports:
    def __init__(self, h):
        self.port = ch.free_port()
        self.api_port = ch.free_port()
        self.db = h.path("store.db")


def receiver_with(h, ports, name, cert=None, key=None):
    extra = None
    if cert:
        extra = {"listen": {"tls": {"cert_file": cert, "key_file": key}}}
    return h.receiver(name, port=ports.port, api_port=ports.api_port, db_path=ports.db,
                      extra=extra)


def server_side(h, pki, ports, good, agent):
    """The receiver presents each bad certificate in turn; the agent refuses, keeps the
    records, says why; the good receiver then gets them exactly once."""
    cases = [
        ("expired", pki.expired("srv-expired", "localhost", "server"),
         r"the receiver's certificate expired on Jan\s+2 00:00:00 2020 GMT"),
        ("not yet valid", pki.not_yet_valid("srv-future", "localhost", "server"),
         r"the receiver's certificate is not valid before Jan\s+1 00:00:00 2099 GMT"),
        ("self-signed", pki.self_signed("srv-self", "localhost", "server_selfsigned"),
         r"the receiver's certificate \(CN\s?=\s?localhost\) is self-signed"),
        ("other CA", pki.other_ca_signed("srv-otherca", "localhost", "server"),
         r"the receiver's certificate is not signed by forward.tls.ca_file "
         r"\(its issuer is CN\s?=\s?some-other-ca\)"),
        ("wrong host", pki.signed("srv-otherhost", "wrong.example.net", "server_otherhost"),
         r"the receiver's certificate is for DNS:wrong.example.net, not 127.0.0.1"),
    ]
    all_acked, all_sent = [], []
    for i, (label, (cert, key), words) in enumerate(cases):
        bad = receiver_with(h, ports, "recv-bad-%d" % i, cert, key).start()
        mark = len(agent.proc.log_text())
        acked, sent = ch.send_lines(agent, [json.dumps({"case": label, "n": n}).encode()
                                            for n in range(50)])
        all_acked += acked
        all_sent += sent
        line = wait_log(h, agent.proc, mark, r"\[forward\] cannot deliver: " + words,
                        "the agent's log to say, for the %s certificate: %s" % (label, words))
        ch.log("%s: agent says: %s" % (label, line.group(0)))
        # let it retry a few times: still nothing stored, still one line
        h.wait(lambda: agent.status()["agent"].get("link", {}).get("consecutive_failures", 0) >= 3, timeout=60,
               what="three failed attempts against the %s certificate" % label)
        st = agent.status()["agent"]["link"]
        ch.check(st["state"] == "down" and re.search(words, st["last_error"] or ""),
                 "%s: `cistern-agent status` does not show the words: %r" % (label, st))
        ch.check(bad.count(AGENT_ID) == len(all_acked) - len(acked),
                 "%s: records stored through a refused certificate" % label)
        ch.check(agent.pending_records() == 50,
                 "%s: %d records pending, expected 50 to stay in the spool"
                 % (label, agent.pending_records()))
        n_lines = len(re.findall(r"\[forward\] cannot deliver", log_since(agent.proc, mark)))
        ch.check(n_lines == 1, "%s: the agent logged the failure %d times, expected once"
                 % (label, n_lines))
        ch.check(bad.stop() == 0, "receiver did not exit 0 on SIGTERM")
        good.start()
        h.wait(lambda: agent.pending_records() == 0, timeout=120,
               what="the %s case's records to drain to the good receiver" % label)
        ch.check(good.stop() == 0, "receiver did not exit 0 on SIGTERM")
        ch.assert_stored_exactly_once(good, agent, all_acked, sent=all_sent)
        ch.log("%s: refused, kept, then delivered exactly once" % label)
    return all_acked


def client_side(h, pki, ports, good):
    """The agent presents each bad client certificate: 401, nothing stored, the receiver says
    which check failed, once."""
    cases = [
        ("expired", pki.expired("cli-expired", AGENT_ID + "-c0", "client"),
         r"client certificate expired on 2020-01-02 00:00:00 UTC"),
        ("not yet valid", pki.not_yet_valid("cli-future", AGENT_ID + "-c1", "client"),
         r"client certificate is not valid before 2099-01-01 00:00:00 UTC"),
        ("self-signed", pki.self_signed("cli-self", AGENT_ID + "-c2", "client_selfsigned"),
         r"client certificate is self-signed"),
        ("other CA", pki.other_ca_signed("cli-otherca", AGENT_ID + "-c3", "client"),
         r"client certificate is not signed by a CA in listen.tls.client_ca_file"),
    ]
    good.start()
    for i, (label, (cert, key), words) in enumerate(cases):
        aid = AGENT_ID + "-c%d" % i
        rmark = len(good.proc.log_text())
        agent = h.agent("agent-c%d" % i, aid, good, extra={
            "forward": {"tls": {"cert_file": cert, "key_file": key}}}).start()
        acked, _sent = ch.send_lines(agent, [json.dumps({"client": label, "n": n}).encode()
                                             for n in range(20)])
        line = wait_log(h, agent.proc, 0, r"HTTP 401: the receiver refused this gateway: "
                        + words,
                        "the agent's log to carry the receiver's words for the %s client "
                        "certificate" % label)
        ch.log("%s client certificate: agent says: %s" % (label, line.group(0)))
        rline = wait_log(h, good.proc, rmark, r"\[http\] refused the client certificate of "
                         r"127.0.0.1 CN=%s: %s" % (re.escape(aid), words),
                         "the receiver to log why it refused the %s client certificate" % label)
        ch.log("%s client certificate: receiver says: %s" % (label, rline.group(0)))
        # more attempts (a 401 is retried with backoff: the certificate is at fault, not the
        # batch): still one receiver line, and one agent line
        for k in range(3):
            ch.send_lines(agent, [json.dumps({"client": label, "more": k}).encode()])
            time.sleep(0.5)
        h.wait(lambda: agent.status()["agent"].get("link", {})
               .get("consecutive_failures", 0) >= 3, timeout=60,
               what="more refused attempts")
        ch.check(len(re.findall(r"HTTP 401", agent.proc.log_text())) == 1,
                 "%s: the agent logged the refusal more than once" % label)
        n_lines = len(re.findall(r"refused the client certificate of 127.0.0.1 CN=%s:"
                                 % re.escape(aid), log_since(good.proc, rmark)))
        ch.check(n_lines == 1, "%s: the receiver logged the refusal %d times, expected once"
                 % (label, n_lines))
        ch.check(good.count(aid) == 0, "%s: records stored from a refused client certificate"
                 % label)
        ch.check(aid not in good.agents(), "%s: the refused agent appears in /v1/agents"
                 % label)
        # nothing is written off: every acknowledged record is still spooled
        pending = agent.pending_records()
        ledgered = sum(int(r["count"]) for r in agent.ledger() if r["reason"] == "rejected")
        ch.check(pending >= len(acked) and ledgered == 0,
                 "%s: %d records acked, %d pending, %d ledgered as rejected (expected all "
                 "pending, none ledgered)" % (label, len(acked), pending, ledgered))
        ch.check(agent.stop() == 0, "agent did not exit 0 on SIGTERM")
    ch.check(good.stop() == 0, "receiver did not exit 0 on SIGTERM")


def s_client(h, port, version):
    args = ["openssl", "s_client", "-connect", "127.0.0.1:%d" % port, "-CAfile", h.ca_cert,
            "-" + version, "-cipher", "DEFAULT:@SECLEVEL=0", "-brief"]
    cert, key = h.client_cert(AGENT_ID)
    args += ["-cert", cert, "-key", key]
    r = subprocess.run(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=60)
    return r.returncode, r.stdout.decode("utf-8", "replace")


def versions(h, pki, ports, good):
    good.start()
    rc, out = s_client(h, ports.port, "tls1_2")
    ch.check(re.search(r"Protocol version: TLSv1.2", out),
             "control: a TLS 1.2 client did not complete the handshake:\n%s" % out)
    rc, out = s_client(h, ports.port, "tls1_1")
    ch.check("no protocols available" not in out,
             "the TLS 1.1 client could not offer TLS 1.1 here, so this proves nothing:\n%s" % out)
    ch.check(rc != 0 and "Protocol version: TLSv1.1" not in out,
             "the receiver accepted a TLS 1.1 handshake:\n%s" % out)
    # GnuTLS (libmicrohttpd) may send a protocol_version alert or just close: either way the
    # only difference from the control above is the version offered.
    ch.log("TLS 1.1 client refused: %s" % out.strip().splitlines()[-1:])
    ch.check(good.stop() == 0, "receiver did not exit 0 on SIGTERM")

    # a "receiver" that speaks TLS 1.1 only
    srv = subprocess.Popen(["openssl", "s_server", "-accept", "127.0.0.1:%d" % ports.port,
                            "-cert", h.server_cert, "-key", h.server_key, "-tls1_1",
                            "-cipher", "DEFAULT:@SECLEVEL=0", "-www"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    h.popens.append(srv)
    h.wait(lambda: ch.port_listening(ports.port), timeout=30, what="openssl s_server to listen")
    recv = receiver_with(h, ports, "recv-unused")  # only for its URL
    agent = h.agent("agent-v", AGENT_ID + "-v", recv).start()
    ch.send_lines(agent, [b'{"tls":"1.1"}'])
    line = wait_log(h, agent.proc, 0, r"\[forward\] cannot deliver: the receiver offers no TLS "
                    r"version this gateway accepts \(TLS 1.2 or newer only\)",
                    "the agent to refuse a TLS 1.1-only server in words")
    ch.log("TLS 1.1 server: agent says: %s" % line.group(0))
    ch.check(agent.pending_records() == 1, "the record left the spool")
    ch.check(agent.stop() == 0, "agent did not exit 0 on SIGTERM")
    srv.kill()
    srv.wait()


def broker_cert(broker, cert, key):
    """Point the broker's TLS listener at another certificate (before it starts)."""
    h = broker.h
    with open(broker.conf_path) as f:
        conf = f.read()
    conf = re.sub(r"(?m)^certfile .*$", "certfile %s" % cert, conf)
    conf = re.sub(r"(?m)^keyfile .*$", "keyfile %s" % key, conf)
    with open(broker.conf_path, "w") as f:
        f.write(conf)


def mqtt_side(h, pki):
    """The broker presents an expired, then an other-CA certificate: the agent's MQTT transport
    and the receiver's MQTT ingest refuse it and say so; with the good certificate back, the
    records are delivered exactly once."""
    if ch.mosquitto_missing():
        ch.log("mosquitto not installed: MQTT part skipped")
        return
    broker = h.mosquitto()
    recv = h.receiver("recv-mqtt", mqtt=broker)
    agent = h.agent("agent-m", AGENT_ID + "-m", None, mqtt=broker)
    cases = [("expired", pki.expired("mq-expired", "localhost", "server"),
              r"certificate verify failed"),
             ("other CA", pki.other_ca_signed("mq-otherca", "localhost", "server"),
              r"certificate verify failed")]
    acked_all, sent_all = [], []
    for label, (cert, key), words in cases:
        broker_cert(broker, cert, key)
        broker.start()
        amark = len(agent.proc.log_text())
        rmark = len(recv.proc.log_text())
        # both start against the bad certificate, so both log their first failure afresh
        recv.start()
        agent.start()
        acked, sent = ch.send_lines(agent, [json.dumps({"mqtt": label, "n": n}).encode()
                                            for n in range(20)])
        acked_all += acked
        sent_all += sent
        line = wait_log(h, agent.proc, amark, r"\[(mqtt|forward)\] cannot (connect|deliver).*"
                        + words + ".*",
                        "the agent's MQTT transport to refuse the %s broker certificate" % label)
        ch.log("mqtt %s: agent says: %s" % (label, line.group(0)))
        rline = wait_log(h, recv.proc, rmark, r"\[mqtt\] cannot connect.*" + words + ".*",
                         "the receiver's MQTT ingest to refuse the %s broker certificate" % label)
        ch.log("mqtt %s: receiver says: %s" % (label, rline.group(0)))
        ch.check(recv.count(agent.agent_id) == len(acked_all) - len(acked),
                 "mqtt %s: records stored through a refused broker certificate" % label)
        ch.check(agent.pending_records() == 20, "mqtt %s: %d records pending, expected 20"
                 % (label, agent.pending_records()))
        broker.stop()
        broker_cert(broker, h.server_cert, h.server_key)
        broker.start()
        h.wait(lambda: agent.pending_records() == 0, timeout=120,
               what="mqtt %s: the records to drain once the broker's certificate is good" % label)
        ch.assert_stored_exactly_once(recv, agent, acked_all, sent=sent_all)
        ch.check(agent.stop() == 0, "agent did not exit 0 on SIGTERM")
        ch.check(recv.stop() == 0, "receiver did not exit 0 on SIGTERM")
        broker.stop()
        ch.log("mqtt %s: refused, kept, then delivered exactly once" % label)


def main(h):
    pki = BadPki(h)
    ports = Ports(h)
    good = receiver_with(h, ports, "receiver")
    agent = h.agent("agent", AGENT_ID, good, extra={"forward": {"retry": {"unreachable_max":
                                                                          "1s"}}}).start()
    server_side(h, pki, ports, good, agent)
    ch.check(agent.stop() == 0, "agent did not exit 0 on SIGTERM")
    client_side(h, pki, ports, good)
    versions(h, pki, ports, good)
    mqtt_side(h, pki)


if __name__ == "__main__":
    ch.run(main, "o_tls_refusals")

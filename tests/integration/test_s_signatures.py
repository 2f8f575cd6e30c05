#!/usr/bin/env python3
"""s) Signed batches (issue 5, "Signed batches"): a changed batch is refused and ledgered, a
replay stores nothing and is counted, HMAC signing works and a wrong secret is not taken.

tampering  A receiver with listen.insecure_plain_http behind a TLS proxy written here (python
           ssl with the harness's server certificate, forwarding each POST over plain HTTP and
           relaying the answer): the TLS-terminating proxy a deployment would trust. The proxy
           flips one bit of a record payload inside the inner batch of the first 3 batches that
           carry records (offsets from the envelope's field 5, with the harness's protobuf
           reader; each record is its own segment, so segments travel uncompressed and the
           changed batch still decodes). Checks: those 3 are answered 400 with a reason naming
           the signature; the agent's ledger holds exactly the records of those that carried no
           loss entries as `rejected`, its detail naming the signature (a refused batch with
           loss entries has its records sent again apart, by design, and they are stored); the
           receiver stores none of the ledgered records and every other record exactly once;
           the ledger entries reach the receiver (GET /v1/agents/ID/losses).
replay     A batch the proxy relayed (answered 200) is POSTed again, byte for byte, twice, to
           the plain receiver: 200, accepted 0, duplicates = its records; the stored rows are
           unchanged; GET /v1/agents shows the agent's replayed_batches up by exactly 2.
HMAC       (an HTTPS receiver) an agent with forward.sign.method hmac (secret file 0600),
           registered with --hmac-secret-file, delivers exactly once; a second agent whose
           secret is not the registered one is answered 401 and keeps its records (nothing
           ledgered); a device registered with a key only, sent an HMAC envelope: 401.
by hand    (HTTPS, a registered device's client certificate) a correct key with a flipped
           signature byte: 400, nothing stored; an envelope whose inner batch names another
           agent: 400; an unsigned Batch (the old content type): 415; the same as the body of
           the new type: 400; the control, the same batch correctly signed: 200, stored."""
import http.client
import http.server
import json
import os
import re
import socketserver
import ssl
import stat
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cistern_harness as ch

AGENT_ID = "gw-signed"
TAMPER = 3


# ---------------------------------------------------------------------------------------------
def flip_payload(body):
    """BODY (a SignedBatch) with one bit of its first record's payload flipped, or None when
    its batch carries no records. Returns (bytes, what was changed)."""
    env = ch.open_envelope(body)
    start, _end = env["batch_at"]
    fields = ch.pb_fields(env["batch"], base=start)
    segs = [f for f in fields if f[0] == 2]
    if not segs:
        return None
    _n, _wt, seg, seg_at, _e = segs[0]
    sf = ch.pb_fields(seg, base=seg_at)
    data = [f for f in sf if f[0] == 7]
    ch.check(data, "proxy: a segment without data")
    _n, _wt, dv, d_at, d_end = data[0]
    pos = None
    where = "compressed segment data"
    if ch.pb_first(sf, 5, 0) == 0:  # COMPRESSION_NONE: the data is a SegmentBody
        recs = [f for f in ch.pb_fields(dv, base=d_at) if f[0] == 1]
        if recs:
            rf = ch.pb_fields(recs[0][2], base=recs[0][3])
            pl = [f for f in rf if f[0] == 5 and f[4] > f[3]]
            if pl:
                pos = (pl[0][3] + pl[0][4]) // 2
                where = "record payload %r" % pl[0][2][:40]
    if pos is None:
        pos = (d_at + d_end) // 2
    out = bytearray(body)
    out[pos] ^= 0x01
    return bytes(out), where


def segment_seqs(batch):
    """Every seq the segments of a serialized Batch hold."""
    seqs = set()
    for f in ch.pb_fields(batch):
        if f[0] == 2:
            sf = ch.pb_fields(f[2])
            seqs.update(range(ch.pb_first(sf, 1, 0), ch.pb_first(sf, 2, 0) + 1))
    return seqs


class TamperProxy:
    """HTTPS on 127.0.0.1 with the harness's server certificate; each POST is forwarded to
    the receiver over plain HTTP and its answer relayed. The first `tamper` batches with
    records have a bit flipped. Every exchange is kept in self.log."""

    def __init__(self, h, upstream_port, tamper):
        self.upstream = upstream_port
        self.tamper_left = tamper
        self.lock = threading.Lock()
        self.log = []  # {"body", "sent", "tampered", "status", "answer"}
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    body = b""
                    while True:
                        n = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        chunk = self.rfile.read(n)
                        self.rfile.readline()
                        if n == 0:
                            break
                        body += chunk
                else:
                    body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, headers, answer = proxy.relay(self.path, self.headers, body)
                self.send_response(status)
                for k, v in headers:
                    if k.lower() in ("content-type", "retry-after"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

        self.httpd = Server(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(h.server_cert, h.server_key)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def relay(self, path, headers, body):
        sent, tampered = body, None
        with self.lock:
            if self.tamper_left > 0:
                t = flip_payload(body)
                if t is not None:
                    self.tamper_left -= 1
                    sent, tampered = t
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream, timeout=30)
        try:
            conn.request("POST", path, body=sent,
                         headers={"Content-Type": headers.get("Content-Type") or "",
                                  "Content-Length": str(len(sent))})
            r = conn.getresponse()
            status, rh, answer = r.status, r.getheaders(), r.read()
        finally:
            conn.close()
        with self.lock:
            self.log.append({"body": body, "sent": sent, "tampered": tampered,
                             "status": status, "answer": answer})
        return status, rh, answer

    def entries(self):
        with self.lock:
            return list(self.log)


def post(h, port, body, cn=None, ct=ch.SIGNED_CT, tls=True):
    """POST /v1/batches; returns (status, answer bytes)."""
    if tls:
        ctx = ssl.create_default_context(cafile=h.ca_cert)
        cert, key = h.client_cert(cn)
        ctx.load_cert_chain(cert, key)
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/v1/batches", body=body, headers={"Content-Type": ct})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def link(agent):
    return agent.status()["agent"].get("link", {})


def secret_file(h, name, secret):
    path = h.path(name)
    with open(path, "wb") as f:
        f.write(secret + b"\n")
    os.chmod(path, 0o600)
    return path


# ---------------------------------------------------------------------------------------------
def tampering_and_replay(h):
    plain = h.receiver("plain", extra={"listen": {"insecure_plain_http": True,
                                                  "tls": None}}).start()
    proxy = TamperProxy(h, plain.port, TAMPER).start()
    # Each line is committed alone (answered before the next is sent, commit_max_records 1):
    # segments of one record, which zstd never makes smaller, so they travel uncompressed and
    # the proxy can change a record's payload in place (a batch that still decodes: only the
    # signature can tell).
    agent = h.agent("agent", AGENT_ID, plain, url="https://127.0.0.1:%d/v1/batches" % proxy.port,
                    extra={"spool": {"commit_max_records": 1},
                           "forward": {"batch": {"max_delay": "100ms"}}}).start()
    c = agent.client("unix")
    for g in range(12):
        # one group at a time, seen by the proxy before the next
        before = len(proxy.entries())
        for i in range(8):
            c.send(b"signed-%d-%d" % (g, i))
            c.wait_answers(timeout=60, alive=h.check_alive)
        h.wait(lambda: len(proxy.entries()) > before, timeout=60,
               what="the proxy to relay group %d" % g)
    ch.check(all(a[0] == "OK" for a in c.answers), "a line was not answered OK")
    acked, sent = c.acked(), list(c.sent)
    c.close()
    h.wait(lambda: agent.segment_count() == 0, timeout=60, what="the agent's spool to drain")

    tampered = [e for e in proxy.entries() if e["tampered"]]
    ch.check(len(tampered) == TAMPER, "the proxy changed %d batches, expected %d"
             % (len(tampered), TAMPER))
    # A refused batch that also carried loss entries is not ledgered: the agent cannot tell
    # which part was refused, and sends its records and its loss entries apart (forwarder.c);
    # the records, unchanged this time, are then stored. Records refused alone are ledgered.
    bad_seqs = set()
    apart = set()
    for e in tampered:
        inner = ch.open_envelope(e["body"])["batch"]
        losses = ch.batch_summary(inner)["losses"]
        ch.log("tampered (%s, %d loss entries): HTTP %d %s" % (e["tampered"], losses,
                                                               e["status"], e["answer"][:200]))
        ch.check(e["tampered"].startswith("record payload"), "the proxy changed %s, not a "
                 "record payload: the segment was compressed" % e["tampered"])
        ch.check(e["status"] == 400, "a changed batch was answered %d, expected 400: %r"
                 % (e["status"], e["answer"]))
        ch.check(re.search(rb"(?i)signature", e["answer"]),
                 "the 400 does not name the signature: %r" % e["answer"])
        (apart if losses else bad_seqs).update(segment_seqs(inner))
    apart -= bad_seqs
    ch.check(bad_seqs, "the changed batches held no records")

    epoch = agent.epoch()
    rej = [r for r in agent.ledger() if r["reason"] == "rejected"]
    ledgered = set()
    for r in rej:
        ch.check(ch.u64(r["epoch"]) == epoch, "a ledger row of another epoch: %r" % r)
        ledgered.update(range(int(r["first_seq"]), int(r["last_seq"]) + 1))
        ch.check(re.search(r"(?i)signature", str(r["detail"] or "")),
                 "the ledger detail does not name the signature: %r" % r)
    ch.check(ledgered == bad_seqs, "the agent ledgered seqs %s as rejected, the changed batches "
             "held %s" % (sorted(ledgered), sorted(bad_seqs)))
    ch.check(sum(int(r["count"]) for r in rej) == len(bad_seqs), "ledger counts: %r" % rej)
    ch.check(not [r for r in agent.ledger() if r["reason"] != "rejected"],
             "other ledger rows: %r" % agent.ledger())

    rows = plain.rows(AGENT_ID)
    ch.check(not [r for r in rows if r[1] in bad_seqs], "records of a changed batch were stored")
    good = [(p, s) for p, s in acked if s not in bad_seqs]
    ch.assert_stored_exactly_once(plain, agent, good, sent=sent)
    ch.check(len(rows) == len(good), "%d rows stored, expected %d" % (len(rows), len(good)))
    ch.check(apart <= {s for _e, s, _p, _st in rows}, "records of a changed batch that carried "
             "loss entries were not sent again apart")
    ch.log("tampering: %d batches changed, %d records ledgered as rejected (%d sent again apart "
           "from loss entries and stored); the other %d stored exactly once"
           % (TAMPER, len(bad_seqs), len(apart), len(good)))

    def losses_in():
        got = set()
        for l in plain.losses(AGENT_ID):
            if l["reason"] == "rejected" and ch.u64(l["epoch"]) == epoch:
                got.update(range(int(l["first_seq"]), int(l["last_seq"]) + 1))
        return got == bad_seqs
    h.wait(losses_in, timeout=60, what="the rejected ledger entries to reach the receiver")
    ch.log("the receiver holds the loss entries: %r" % plain.losses(AGENT_ID))

    # replay: a batch that was stored, sent again byte for byte
    # (one without loss entries, so that only its records could be new)
    ok = [e for e in proxy.entries() if not e["tampered"] and e["status"] == 200
          and segment_seqs(ch.open_envelope(e["body"])["batch"])
          and ch.batch_summary(ch.open_envelope(e["body"])["batch"])["losses"] == 0]
    ch.check(ok, "no relayed batch with records and no loss entries was answered 200")
    replay = ok[-1]["body"]
    n = len(segment_seqs(ch.open_envelope(replay)["batch"]))
    before_rows = sorted(plain.rows(AGENT_ID))
    before = int(plain.agents()[AGENT_ID].get("replayed_batches", -1))
    ch.check(before >= 0, "GET /v1/agents has no replayed_batches: %r"
             % plain.agents()[AGENT_ID])
    for i in range(2):
        st, answer = post(h, plain.port, replay, tls=False)
        ch.check(st == 200, "replay %d: HTTP %d %r" % (i, st, answer))
        a = json.loads(answer.decode())
        ch.check(int(a.get("accepted", -1)) == 0 and int(a.get("duplicates", -1)) == n,
                 "replay %d of a batch of %d records: %r" % (i, n, a))
    ch.check(sorted(plain.rows(AGENT_ID)) == before_rows, "a replay changed the stored rows")
    after = int(plain.agents()[AGENT_ID]["replayed_batches"])
    ch.check(after - before == 2, "replayed_batches went from %d to %d after 2 replays"
             % (before, after))
    ch.log("replay: 2 replays of a %d-record batch answered 200, accepted 0; replayed_batches "
           "%d -> %d" % (n, before, after))
    ch.check(agent.stop() == 0, "agent did not exit 0 on SIGTERM")
    proxy.stop()
    ch.check(plain.stop() == 0, "receiver did not exit 0 on SIGTERM")


def hmac_agents(h, recv):
    s1 = secret_file(h, "hmac-1.secret", os.urandom(24).hex().encode())
    ch.check(stat.S_IMODE(os.stat(s1).st_mode) == 0o600, "secret file mode")
    a1 = h.agent("hmac-1", "gw-hmac-1", recv, extra={
        "forward": {"sign": {"method": "hmac", "hmac_secret_file": s1}}}).start()
    acked, sent = ch.send_lines(a1, [b"hmac-%d" % i for i in range(100)])
    h.wait(lambda: a1.segment_count() == 0 and recv.count("gw-hmac-1") == 100, timeout=60,
           what="the HMAC agent's records stored")
    ch.assert_stored_exactly_once(recv, a1, acked, sent=sent)
    ch.check(a1.ledger() == [], "the HMAC agent ledgered: %r" % a1.ledger())
    ch.log("HMAC: 100 records stored exactly once")
    ch.check(a1.stop() == 0, "agent did not exit 0 on SIGTERM")

    # a secret that is not the registered one
    s2 = secret_file(h, "hmac-2.secret", os.urandom(24).hex().encode())
    s2_reg = secret_file(h, "hmac-2-registered.secret", os.urandom(24).hex().encode())
    h.register("gw-hmac-2", hmac_secret_file=s2_reg)
    a2 = h.agent("hmac-2", "gw-hmac-2", recv, register=False, extra={
        "forward": {"sign": {"method": "hmac", "hmac_secret_file": s2}}}).start()
    ch.send_lines(a2, [b"hmac-wrong-%d" % i for i in range(20)])
    h.wait(lambda: "HTTP 401" in a2.proc.log_text(), timeout=60,
           what="the agent with the wrong secret to be answered 401")
    h.wait(lambda: link(a2).get("consecutive_failures", 0) >= 3, timeout=60,
           what="three refused attempts with the wrong secret")
    ch.check(recv.count("gw-hmac-2") == 0, "records stored with the wrong secret")
    ch.check(a2.pending_records() == 20, "%d records pending, expected 20" % a2.pending_records())
    ch.check(a2.ledger() == [], "the agent with the wrong secret ledgered: %r" % a2.ledger())
    ch.log("HMAC, wrong secret: 401 (%s), 20 records kept" % link(a2).get("last_error"))
    ch.check(a2.stop() == 0, "agent did not exit 0 on SIGTERM")


def by_hand(h, recv):
    aid = "gw-by-hand"
    h.register(aid, key=h.client_cert(aid)[0])  # a key, no HMAC secret
    key = h.client_cert(aid)[1]

    def none_stored(what, first, n):
        seqs = [s for _e, s, _p, _st in recv.rows(aid) if first <= s < first + n]
        ch.check(not seqs, "%s: seqs %r stored" % (what, seqs))

    def expect(what, body, want, first, n, ct=ch.SIGNED_CT, words=None):
        st, answer = post(h, recv.port, body, cn=aid, ct=ct)
        ch.log("%s: HTTP %d %s" % (what, st, answer[:200]))
        ch.check(st == want, "%s: HTTP %d, expected %d: %r" % (what, st, want, answer))
        if words:
            ch.check(re.search(words, answer), "%s: the answer lacks %r: %r"
                     % (what, words, answer))
        none_stored(what, first, n)

    batch = ch.make_batch(aid, 1, 5)
    expect("an HMAC envelope for a device with a key only",
           ch.sign_envelope(aid, batch, secret=os.urandom(32)), 401, 1, 5)
    good = ch.sign_envelope(aid, batch, key_path=key)
    env = ch.open_envelope(good)
    sig = bytearray(env["signature"])
    sig[-1] ^= 0x01  # inside the DER INTEGER s: still DER, no longer the signature
    expect("a flipped signature byte",
           ch.envelope(aid, ch.SIG_ECDSA, env["key"], bytes(sig), batch), 400, 1, 5,
           words=rb"(?i)signature")
    other = ch.make_batch("gw-someone-else", 1, 5)
    expect("an inner batch of another agent", ch.sign_envelope(aid, other, key_path=key),
           400, 1, 5)
    ch.check(recv.count("gw-someone-else") == 0, "records stored for the inner batch's agent")
    expect("an unsigned batch", batch, 415, 1, 5, ct=ch.BATCH_CT)
    expect("a signed batch with the old content type", good, 415, 1, 5, ct=ch.BATCH_CT)
    expect("an unsigned batch as a signed one", batch, 400, 1, 5)

    # the control: the same batch, correctly signed, is taken
    st, answer = post(h, recv.port, good, cn=aid)
    ch.check(st == 200, "the correctly signed control: HTTP %d %r" % (st, answer))
    ch.check(sorted(s for _e, s, _p, _st in recv.rows(aid)) == [1, 2, 3, 4, 5],
             "the control's records are not stored")
    ch.log("by hand: refusals as expected; the same batch correctly signed is stored")


def main(h):
    tampering_and_replay(h)
    recv = h.receiver("receiver").start()
    hmac_agents(h, recv)
    by_hand(h, recv)
    ch.check(recv.stop() == 0, "receiver did not exit 0 on SIGTERM")


if __name__ == "__main__":
    ch.run(main, "s_signatures")

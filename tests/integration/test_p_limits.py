#!/usr/bin/env python3
"""p) Each ingest limit refuses with its status and stores nothing (issue 5, "Ingest hardening").

One receiver with small limits; requests crafted here (python ssl with client certificates
from the test CA, batches encoded by the harness's protobuf writer, each in an envelope signed
with the key of its CN, which is registered) so each limit is hit alone:
  control           a well-formed batch is answered 200 and its 5 records are stored (so the
                    crafted batches below are refused for their limit, not for their form)
  limits.max_body   Content-Length over it: 413 on the headers; chunked over it: 413
  max_decompressed  a zip bomb (a zstd segment declaring 1 GiB, a few bytes long): 413,
                    refused from the declared size before any decompression
  max_records       101 records with a limit of 100: 413
  max_header_size   one 20 KiB header, and 600 small ones: 431
  max_connections   8 open connections: the 9th is closed during its TLS handshake (MHD
                    accepts and closes it at once; it is not queued); once one closes, a new
                    connection is served
  connection_timeout an idle connection is closed by the receiver
  request_timeout   headers dripped one line every 0.5 s (never idle) and a body dripped one
                    byte every 0.5 s are both cut; the slow batch is not stored
  rate              a burst of 20 batches from one CN with rate 2/s burst 10: some are answered
                    429 with Retry-After >= 1; exactly the 200-answered batches are stored
  rate + agent      a real agent sending far above the rate delivers every record exactly once
                    (it honours 429 and Retry-After), and it did get 429s
A second receiver checks limits.max_connections_per_ip (3 from 127.0.0.1: the 4th is closed).
"nothing stored" is checked in the receiver's database for every refused agent id."""
import http.client
import os
import socket
import ssl
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cistern_harness as ch

CT = ch.SIGNED_CT
# every CN the crafted requests use: registered, with its certificate, so that each request is
# refused for its limit, not as an unknown device
CNS = ("gw-ctl", "gw-body", "gw-bomb", "gw-many", "gw-hdr", "gw-conn", "gw-idle", "gw-slow",
       "gw-rate", "gw-ip")


def batch(h, agent_id, first_seq, n, zip_bomb=False):
    """A batch (the harness's protobuf writer) in an envelope signed with the key of the
    client certificate of CN agent_id: what the registry holds for it."""
    return ch.sign_envelope(agent_id, ch.make_batch(agent_id, first_seq, n, zip_bomb=zip_bomb),
                            key_path=h.client_cert(agent_id)[1])


# -- raw HTTPS requests with a client certificate ---------------------------------------------
class Client:
    def __init__(self, h, recv):
        self.h = h
        self.port = recv.port

    def tls(self, cn, timeout=15):
        cert, key = self.h.client_cert(cn)
        ctx = ssl.create_default_context(cafile=self.h.ca_cert)
        ctx.load_cert_chain(cert, key)
        s = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        return ctx.wrap_socket(s, server_hostname="localhost")

    @staticmethod
    def head(method="POST", path="/v1/batches", headers=None, length=None, chunked=False):
        lines = ["%s %s HTTP/1.1" % (method, path), "Host: localhost", "Content-Type: " + CT]
        if length is not None:
            lines.append("Content-Length: %d" % length)
        if chunked:
            lines.append("Transfer-Encoding: chunked")
        lines += headers or []
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    @staticmethod
    def response(s):
        r = http.client.HTTPResponse(s)
        r.begin()
        return r.status, dict((k.lower(), v) for k, v in r.getheaders()), r.read()

    def post(self, cn, body, headers=None):
        s = self.tls(cn)
        try:
            s.sendall(self.head(headers=headers, length=len(body)) + body)
            return self.response(s)
        finally:
            s.close()


def closed_by_peer(s, limit_s):
    """Read from S until the peer closes it (True) or LIMIT_S pass (False)."""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        try:
            s.settimeout(max(0.1, end - time.monotonic()))
            if s.recv(4096) == b"":
                return True
        except socket.timeout:
            return False
        except (ssl.SSLError, OSError):
            return True
    return False


def stored(recv, agent_id):
    return recv.count(agent_id)


def main(h):
    for cn in CNS:
        h.register(cn, key=h.client_cert(cn)[0])
    recv = h.receiver(limits={"max_body": "64KiB", "max_decompressed": "1MiB",
                              "max_records": 100, "max_header_size": "8KiB",
                              "max_connections": 8, "connection_timeout": "2s",
                              "request_timeout": "4s", "rate": 2, "rate_burst": 10}).start()
    c = Client(h, recv)

    # control: the crafted encoding is a batch the receiver takes
    st, _, body = c.post("gw-ctl", batch(h, "gw-ctl", 1, 5))
    ch.check(st == 200, "control batch: HTTP %d %r" % (st, body))
    ch.check(stored(recv, "gw-ctl") == 5, "control batch: %d rows stored, expected 5"
             % stored(recv, "gw-ctl"))
    ch.log("control: 200, 5 records stored")

    # limits.max_body, declared: answered on the headers, before any body byte is read
    s = c.tls("gw-body")
    s.sendall(c.head(length=70000))
    st, _, body = c.response(s)
    s.close()
    ch.check(st == 413, "Content-Length 70000 over max_body 64KiB: HTTP %d %r" % (st, body))
    # chunked: the size is only known while it arrives
    s = c.tls("gw-body")
    s.sendall(c.head(chunked=True))
    chunk = b"x" * 16384
    try:
        for _ in range(6):
            s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        s.sendall(b"0\r\n\r\n")
    except OSError:
        pass
    st, _, body = c.response(s)
    s.close()
    ch.check(st == 413, "96 KiB chunked body over max_body 64KiB: HTTP %d %r" % (st, body))
    ch.check(stored(recv, "gw-body") == 0, "an oversized body was stored")
    ch.log("max_body: 413 for a declared and for a chunked oversized body")

    # limits.max_decompressed: a zip bomb refused from its declared size
    st, _, body = c.post("gw-bomb", batch(h, "gw-bomb", 1, 3, zip_bomb=True))
    ch.check(st == 413 and b"decompressed" in body, "zip bomb: HTTP %d %r" % (st, body))
    ch.check(stored(recv, "gw-bomb") == 0, "the zip bomb's records were stored")
    ch.log("max_decompressed: zip bomb (1 GiB declared) answered 413 %r" % body)

    # limits.max_records
    st, _, body = c.post("gw-many", batch(h, "gw-many", 1, 101))
    ch.check(st == 413 and b"records" in body, "101 records: HTTP %d %r" % (st, body))
    st2, _, body2 = c.post("gw-many", batch(h, "gw-many", 200, 100))
    ch.check(st2 == 200, "100 records (the limit): HTTP %d %r" % (st2, body2))
    ch.check(sorted(s for _, s, _, _ in recv.rows("gw-many")) == list(range(200, 300)),
             "max_records: only the batch of 100 may be stored")
    ch.log("max_records: 101 answered 413, 100 stored")

    # limits.max_header_size
    for what, hdrs in (("one 20 KiB header", ["X-Big: " + "a" * 20480]),
                       ("600 headers", ["X-H%d: v" % i for i in range(600)])):
        body = batch(h, "gw-hdr", 1, 2)
        s = c.tls("gw-hdr")
        try:
            s.sendall(c.head(headers=hdrs, length=len(body)) + body)
        except OSError:
            pass
        st, _, _ = c.response(s)
        s.close()
        ch.check(st == 431, "%s over max_header_size 8KiB: HTTP %d" % (what, st))
    ch.check(stored(recv, "gw-hdr") == 0, "a batch with oversized headers was stored")
    ch.log("max_header_size: 431 for one 20 KiB header and for 600 headers")

    # limits.max_connections: 8 held (handshake done), the 9th is refused at once
    held = [c.tls("gw-conn") for _ in range(8)]
    refused = False
    try:
        extra = c.tls("gw-conn", timeout=10)
        extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        refused = extra.recv(100) == b""
    except (ssl.SSLError, OSError) as e:
        refused = True
        ch.log("9th connection: %r" % e)
    ch.check(refused, "a 9th connection was served with max_connections 8")
    held.pop().close()
    time.sleep(0.5)
    st, _, body = c.post("gw-ctl", batch(h, "gw-ctl", 6, 1))
    ch.check(st == 200, "after one of 8 closed, a new connection: HTTP %d %r" % (st, body))
    for x in held:
        x.close()
    ch.log("max_connections: the 9th connection is closed in its handshake; a freed slot serves")

    # limits.connection_timeout (idle, 2s): the receiver closes a silent connection
    time.sleep(0.5)
    s = c.tls("gw-idle")
    ch.check(closed_by_peer(s, 20), "an idle connection was not closed by the receiver")
    s.close()
    ch.log("connection_timeout: an idle connection was closed by the receiver")

    # limits.request_timeout (4s): dripped headers and a dripped body are cut, though never idle
    s = c.tls("gw-slow")
    s.sendall(b"POST /v1/batches HTTP/1.1\r\nHost: localhost\r\n")
    cut = False
    t0 = time.monotonic()
    try:
        for i in range(60):
            time.sleep(0.5)
            s.sendall(b"X-Drip-%d: v\r\n" % i)
    except (ssl.SSLError, OSError):
        cut = True
    ch.check(cut, "headers dripped for 30 s were not cut (request_timeout 4s)")
    s.close()
    ch.log("request_timeout: dripped headers cut after %.1f s" % (time.monotonic() - t0))
    body = batch(h, "gw-slow", 1, 3)
    s = c.tls("gw-slow")
    s.sendall(c.head(length=len(body)))
    cut = False
    t0 = time.monotonic()
    try:
        for i in range(len(body)):
            s.sendall(body[i:i + 1])
            time.sleep(0.5)
    except (ssl.SSLError, OSError):
        cut = True
    ch.check(cut, "a body dripped for %d s was not cut (request_timeout 4s)" % (len(body) // 2))
    s.close()
    ch.check(stored(recv, "gw-slow") == 0, "the slow batch was stored")
    ch.log("request_timeout: dripped body cut after %.1f s, nothing stored"
           % (time.monotonic() - t0))

    # limits.rate: 2/s, burst 10, per CN: 20 batches in less than 5 s meet a 429
    answers = []
    # signed beforehand: the burst must not wait for openssl
    rate_batches = [batch(h, "gw-rate", 1 + 10 * i, 10) for i in range(20)]
    s = c.tls("gw-rate")
    try:
        for i in range(20):
            b = rate_batches[i]
            s.sendall(c.head(length=len(b)) + b)
            st, hd, body = c.response(s)
            answers.append((st, hd.get("retry-after"), 1 + 10 * i))
            if hd.get("connection", "").lower() == "close":
                s.close()
                s = c.tls("gw-rate")
    finally:
        s.close()
    ok = [a for a in answers if a[0] == 200]
    limited = [a for a in answers if a[0] == 429]
    ch.log("rate: %d answered 200, %d answered 429 (Retry-After %s)"
           % (len(ok), len(limited), sorted(set(a[1] for a in limited))))
    ch.check(len(ok) + len(limited) == 20, "rate: unexpected answers %r" % answers)
    ch.check(limited, "20 batches at once with rate 2/s burst 10: none answered 429")
    ch.check(all(a[1] is not None and int(a[1]) >= 1 for a in limited),
             "a 429 without a Retry-After of at least 1 s: %r" % limited)
    want = sorted(f + k for _, _, f in ok for k in range(10))
    got = sorted(s for _, s, _, _ in recv.rows("gw-rate"))
    ch.check(got == want, "rate: stored seqs are not exactly those of the 200 answers")

    # an agent sending far above the rate still delivers everything, once
    # segments of at most 5 records (a segment is never split), one per batch
    agent = h.agent("agent", "gw-agent", recv, extra={
        "spool": {"commit_max_records": 5},
        "forward": {"batch": {"max_records": 5, "max_delay": "10ms"}, "in_flight": 4}}).start()
    # 5 lines at a time, each group answered (committed) before the next: small segments
    cl = agent.client("unix")
    for g in range(40):
        cl.send_many([b"over-rate-%d" % (5 * g + i) for i in range(5)])
        cl.wait_answers(5 * (g + 1), timeout=60, alive=h.check_alive)
    ch.check(all(a[0] == "OK" for a in cl.answers), "a line was not answered OK")
    acked, sent = cl.acked(), list(cl.sent)
    cl.close()
    h.wait(lambda: agent.segment_count() == 0, timeout=120, what="the agent's spool to drain")
    ch.assert_stored_exactly_once(recv, agent, acked, sent=sent)
    alog = open(agent.proc.log_path, errors="replace").read()
    ch.check("429" in alog, "the agent was never answered 429; the rate limit was not exercised")
    ch.check(not [r for r in agent.ledger() if r["reason"] == "rejected"],
             "the agent ledgered records as rejected: a 429 must be retried, not dropped")
    ch.log("rate + agent: 200 records in 5-record batches, 429s retried, all stored once")
    ch.check(agent.stop() == 0, "agent did not exit 0 on SIGTERM")
    ch.check(recv.stop() == 0, "receiver did not exit 0 on SIGTERM")

    # limits.max_connections_per_ip
    recv2 = h.receiver("receiver2", limits={"max_connections_per_ip": 3}).start()
    c2 = Client(h, recv2)
    held = [c2.tls("gw-ip") for _ in range(3)]
    refused = False
    try:
        extra = c2.tls("gw-ip", timeout=10)
        extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        refused = extra.recv(100) == b""
    except (ssl.SSLError, OSError):
        refused = True
    ch.check(refused, "a 4th connection from 127.0.0.1 was served with max_connections_per_ip 3")
    for x in held:
        x.close()
    ch.log("max_connections_per_ip: the 4th connection from one address is closed")
    ch.check(recv2.stop() == 0, "receiver2 did not exit 0 on SIGTERM")


if __name__ == "__main__":
    ch.run(main, "p_limits")

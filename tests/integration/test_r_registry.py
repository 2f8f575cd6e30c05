#!/usr/bin/env python3
"""r) The device registry (issue 5, "Device registry"): only registered, enabled devices,
signing with their registered key, get records stored, over HTTPS and over MQTT.

CLI (`cistern-receiver device ...` on the receiver's config): `--key` takes a certificate, a
CSR, a public key or a private key, and registers the fingerprint openssl computes for it;
`--key` with a `--fingerprint` of another key is refused and registers nothing; an id that
exists is refused without --force; `device list --json` shows each device enabled or revoked
as `revoke` / `enable` set it.

HTTPS, one receiver:
  unregistered  an agent that is not registered (register=False) is answered 401: its log and
                `cistern-agent status` say so, nothing is stored, its records stay spooled and
                nothing is ledgered. `device add` while both run: every record arrives once.
  revoke        while an agent streams, `device revoke`: the time from the command's return
                to the last newly stored record (polled: the store's max seq and row count for
                the agent) is at most 5 s (the issue's bound, which the 2 s registry cache
                serves; plus the poll interval) and is printed. What the agent reads after that
                stays in its spool, nothing ledgered; `device enable`: everything arrives,
                exactly once.
  impersonation by certificate: a client certificate from the test CA with CN gw-a but another
                key than the one registered for gw-a, used by an agent configured as gw-a:
                401, its records stay spooled, nothing of it is stored under gw-a (only the
                genuine gw-a's records are there).
MQTT (skipped without mosquitto): an unregistered agent is answered {"status":"retry"} (its
ack topic, spied on), nothing stored, records kept; registered, it delivers exactly once. A
revoked agent's new records are answered "retry" and not stored; enabled, they arrive. A
correctly signed envelope of gw-mq-a published on gw-mq-b's topic (the broker's admin
identity) is answered "rejected" and stores nothing; the same bytes on gw-mq-a's own topic
are stored (so it was the topic, not the envelope, that was refused)."""
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cistern_harness as ch

CORR = b"fedcba9876543210"
POLL_S = 0.1            # poll interval of the revocation measurement
QUIET_S = 8.0           # no new row for this long: the agent is refused for good
REVOKE_BOUND_S = 5.0    # the bound on a revocation reaching a running receiver


def device_ok(h, recv, *args):
    rc, out, err = h.device(recv, *args)
    ch.check(rc == 0, "`device %s` exited %d:\n%s%s" % (" ".join(args), rc, out, err))
    return out


def device_states(h, recv):
    """{id: "enabled" | "revoked"} from `device list --json` (a JSON array, an object with
    a "devices" array, or one object per line; each object has "id" and an "enabled" flag
    or a "state")."""
    out = device_ok(h, recv, "list", "--json")
    try:
        data = json.loads(out)
    except ValueError:
        data = [json.loads(l) for l in out.splitlines() if l.strip()]
    if isinstance(data, dict):
        data = data.get("devices", data.get("agents"))
    ch.check(isinstance(data, list), "device list --json: not a list of devices: %r" % out)
    states = {}
    for d in data:
        ch.check(isinstance(d, dict) and "id" in d, "device list --json: an entry without an "
                 "id: %r" % d)
        if isinstance(d.get("enabled"), bool):
            states[d["id"]] = "enabled" if d["enabled"] else "revoked"
        else:
            st = str(d.get("state", d.get("status", ""))).lower()
            ch.check(st in ("enabled", "revoked", "disabled"),
                     "device list --json: no enabled flag or state in %r" % d)
            states[d["id"]] = "enabled" if st == "enabled" else "revoked"
    return states


def link(agent):
    return agent.status()["agent"].get("link", {})


def stored_marker(recv, agent_id):
    """(max seq, rows) stored for AGENT_ID: changes whenever a new record is stored."""
    con = recv.db()
    try:
        m, n = con.execute("SELECT max(seq), count(*) FROM records WHERE agent_id=?",
                           (agent_id,)).fetchone()
    finally:
        con.close()
    return (m, n)


# ---------------------------------------------------------------------------------------------
def cli(h, recv):
    key = h.path("pki", "cli-dev.key")
    h._key(key)
    cert, _ = h.client_cert("gw-cli-cert")
    csr = h.path("pki", "cli-dev.csr")
    h._openssl("req", "-new", "-key", key, "-subj", "/CN=gw-cli", "-config", "pki/ext.cnf",
               "-out", csr)
    pub = h.path("pki", "cli-dev.pub")
    h._openssl("pkey", "-in", key, "-pubout", "-out", pub)
    fpr = ch.key_fingerprint(key)
    other_fpr = ch.key_fingerprint(h.client_cert("gw-cli-cert")[1])

    # --key with a fingerprint of another key: refused, nothing registered
    rc, out, err = h.device(recv, "add", "gw-cli", "--key", csr, "--fingerprint", other_fpr)
    ch.check(rc != 0 and err.strip(), "--key with another key's --fingerprint: exit %d, %r %r"
             % (rc, out, err))
    ch.log("--key/--fingerprint mismatch refused (exit %d): %s" % (rc, err.strip()))
    rc, out, err = h.device(recv, "show", "gw-cli")
    ch.check(rc != 0, "after a refused add, `device show gw-cli` exited 0: %r" % out)
    ch.check("gw-cli" not in device_states(h, recv), "a refused add left gw-cli registered")

    # each form of --key registers the key's fingerprint (as openssl computes it)
    for i, (what, path) in enumerate((("CSR", csr), ("public key", pub), ("private key", key))):
        aid = "gw-cli-%d" % i
        device_ok(h, recv, "add", aid, "--key", path)
        shown = device_ok(h, recv, "show", aid)
        ch.check(fpr in shown, "--key %s: `device show` does not name %s: %r" % (what, fpr, shown))
    device_ok(h, recv, "add", "gw-cli-cert", "--key", cert)
    ch.check(other_fpr in device_ok(h, recv, "show", "gw-cli-cert"),
             "--key certificate: `device show` does not name the certificate key's fingerprint")
    device_ok(h, recv, "add", "gw-cli", "--key", csr, "--fingerprint", fpr)
    device_ok(h, recv, "add", "gw-cli-fpr", "--fingerprint", fpr)
    ch.check(fpr in device_ok(h, recv, "show", "gw-cli-fpr"), "--fingerprint not shown")
    shown_json = json.loads(device_ok(h, recv, "show", "gw-cli", "--json"))
    ch.check(fpr in json.dumps(shown_json), "show --json lacks the fingerprint: %r" % shown_json)

    # an id that exists: refused without --force, unchanged; replaced with --force
    rc, out, err = h.device(recv, "add", "gw-cli", "--fingerprint", other_fpr)
    ch.check(rc != 0 and err.strip(), "add over an existing id without --force: exit %d" % rc)
    ch.check(fpr in device_ok(h, recv, "show", "gw-cli"), "a refused add changed gw-cli")
    device_ok(h, recv, "add", "gw-cli", "--fingerprint", other_fpr, "--force")
    ch.check(other_fpr in device_ok(h, recv, "show", "gw-cli"), "--force did not replace")
    for bad in (("add", "gw-cli-bad", "--fingerprint", "sha256:1234"),
                ("add", "gw-cli-bad", "--key", h.path("no-such-file.pem")),
                ("add", "gw-cli-bad"),
                ("revoke", "gw-no-such-device")):
        rc, out, err = h.device(recv, *bad)
        ch.check(rc != 0 and err.strip(), "`device %s`: exit %d, stderr %r"
                 % (" ".join(bad), rc, err))
    ch.check("gw-cli-bad" not in device_states(h, recv), "a refused add registered gw-cli-bad")

    # states
    device_ok(h, recv, "revoke", "gw-cli-1")
    st = device_states(h, recv)
    ch.check(st.get("gw-cli-1") == "revoked" and st.get("gw-cli-0") == "enabled"
             and st.get("gw-cli") == "enabled", "device list after revoke: %r" % st)
    device_ok(h, recv, "enable", "gw-cli-1")
    st = device_states(h, recv)
    ch.check(st.get("gw-cli-1") == "enabled", "device list after enable: %r" % st)
    ch.log("CLI: --key (certificate, CSR, public and private key) and --fingerprint register "
           "%s; list --json shows the states" % fpr)


def https_unregistered(h, recv):
    aid = "gw-unregistered"
    agent = h.agent("unreg", aid, recv, register=False).start()
    acked, sent = ch.send_lines(agent, [b"unreg-%d" % i for i in range(100)])
    h.wait(lambda: re.search(r"HTTP 401.*regist", agent.proc.log_text()), timeout=60,
           what="the unregistered agent's log to say 401, not registered")
    h.wait(lambda: link(agent).get("consecutive_failures", 0) >= 3, timeout=60,
           what="three refused attempts of the unregistered agent")
    lk = link(agent)
    ch.check("401" in (lk.get("last_error") or ""), "status does not show the 401: %r" % lk)
    ch.check(recv.count(aid) == 0, "records stored for an unregistered agent")
    ch.check(agent.pending_records() == 100, "the unregistered agent's spool holds %d records, "
             "expected 100" % agent.pending_records())
    ch.check(agent.ledger() == [], "the unregistered agent ledgered: %r" % agent.ledger()[:3])
    ch.check(aid not in recv.agents(), "the unregistered agent appears in /v1/agents")
    ch.log("unregistered: 401 (%s), nothing stored, 100 records kept" % lk.get("last_error"))

    device_ok(h, recv, "add", aid, "--key", agent.cert)
    h.wait(lambda: agent.segment_count() == 0 and recv.count(aid) == 100, timeout=60,
           what="the records to arrive once the agent is registered")
    ch.assert_stored_exactly_once(recv, agent, acked, sent=sent)
    ch.check(agent.ledger() == [], "records were ledgered: %r" % agent.ledger()[:3])
    ch.check(recv.losses(aid) == [], "the receiver holds losses for %s" % aid)
    ch.log("unregistered: after `device add` all 100 records stored exactly once")
    ch.check(agent.stop() == 0, "agent did not exit 0 on SIGTERM")


def revoke_while_streaming(h, recv):
    aid = "gw-stream"
    agent = h.agent("stream", aid, recv).start()
    prod = ch.LineProducer(agent, "stream", chunk=10, interval=0.05)
    prod.start()
    h.wait(lambda: recv.count(aid) >= 300, timeout=60, what="records stored before the revoke")

    t0 = time.monotonic()
    device_ok(h, recv, "revoke", aid)
    t_revoked = time.monotonic()
    last = stored_marker(recv, aid)
    last_change = t_revoked
    while True:
        time.sleep(POLL_S)
        now = time.monotonic()
        cur = stored_marker(recv, aid)
        if cur != last:
            last, last_change = cur, now
        if now - last_change >= QUIET_S * ch.SCALE:
            break
        h.check_alive()
        ch.check(prod.is_alive() and prod.error is None, "the producer stopped: %r" % prod.error)
        ch.check(now - t_revoked < 60 * ch.SCALE,
                 "records still stored %.0f s after `device revoke`" % (now - t_revoked))
    took = last_change - t_revoked
    ch.log("revoke: `device revoke` ran %.2f s; the last new record was stored %.2f s after it "
           "returned (bound %.1f s + %.1f s poll interval)" % (t_revoked - t0, took,
                                                               REVOKE_BOUND_S, POLL_S))
    ch.check(took <= REVOKE_BOUND_S + POLL_S,
             "records were still stored %.2f s after the revocation (the bound is %.0f s)"
             % (took, REVOKE_BOUND_S))
    stored_at_revoke = recv.count(aid)

    # what the agent reads now stays in its spool: more lines come in, none is stored
    pending0 = agent.pending_records()
    h.wait(lambda: agent.pending_records() >= pending0 + 200, timeout=60,
           what="the revoked agent to keep spooling what it reads")
    ch.check(recv.count(aid) == stored_at_revoke, "records stored while revoked")
    ch.check(agent.ledger() == [], "the revoked agent ledgered: %r" % agent.ledger()[:3])
    ch.check(re.search(r"HTTP 401.*revoked", agent.proc.log_text()),
             "the agent's log does not say it is revoked")
    ch.check(device_states(h, recv).get(aid) == "revoked", "device list does not show %s "
             "revoked" % aid)
    ch.log("revoked: %d records stored, %d pending at the agent, none ledgered"
           % (stored_at_revoke, agent.pending_records()))

    device_ok(h, recv, "enable", aid)
    h.wait(lambda: recv.count(aid) > stored_at_revoke, timeout=30,
           what="records to arrive again after `device enable`")
    acked, sent = prod.stop()
    h.wait(lambda: agent.segment_count() == 0, timeout=120, what="the spool to drain")
    ch.assert_stored_exactly_once(recv, agent, acked, sent=sent)
    ch.check(recv.count(aid) == len(acked), "%d rows for %d acknowledged records"
             % (recv.count(aid), len(acked)))
    ch.check(agent.ledger() == [], "records were ledgered: %r" % agent.ledger()[:3])
    ch.log("enabled: all %d records stored exactly once, nothing ledgered" % len(acked))
    ch.check(agent.stop() == 0, "agent did not exit 0 on SIGTERM")


def impersonation_by_certificate(h, recv):
    genuine = h.agent("gw-a", "gw-a", recv).start()
    acked, sent = ch.send_lines(genuine, [b"genuine-%d" % i for i in range(20)])
    h.wait(lambda: genuine.segment_count() == 0 and recv.count("gw-a") == 20, timeout=60,
           what="the genuine gw-a's records stored")
    ch.check(genuine.stop() == 0, "gw-a did not exit 0 on SIGTERM")

    # the test CA signs a certificate for CN gw-a over another key
    cert, key = h._leaf("client-gw-a-impostor", "gw-a", "client")
    ch.check(ch.key_fingerprint(key) != ch.key_fingerprint(genuine.key), "same key")
    imp = h.agent("impostor", "gw-a", recv, register=False,
                  extra={"forward": {"tls": {"cert_file": cert, "key_file": key}}}).start()
    ch.send_lines(imp, [b"impostor-%d" % i for i in range(20)])
    h.wait(lambda: "HTTP 401" in imp.proc.log_text(), timeout=60,
           what="the impostor to be answered 401")
    h.wait(lambda: link(imp).get("consecutive_failures", 0) >= 3, timeout=60,
           what="three refused attempts of the impostor")
    rows = recv.rows("gw-a")
    ch.check(not [r for r in rows if r[2].startswith(b"impostor-")],
             "records of the impostor were stored under gw-a")
    ch.check(not [r for r in rows if r[0] == imp.epoch()],
             "rows stored under the impostor's epoch")
    ch.assert_stored_exactly_once(recv, genuine, acked, sent=sent)
    ch.check(imp.pending_records() == 20, "the impostor's spool holds %d records, expected 20"
             % imp.pending_records())
    ch.check(imp.ledger() == [], "the impostor ledgered: %r" % imp.ledger()[:3])
    ch.log("impersonation by certificate: 401 (%s), nothing stored"
           % link(imp).get("last_error"))
    ch.check(imp.stop() == 0, "the impostor did not exit 0 on SIGTERM")


# ---------------------------------------------------------------------------------------------
def ack_spy(broker, agent_id, cid):
    p = broker.sub("cistern/v1/%s/ack" % agent_id, ["-C", "1", "-N", "-q", "1", "-i", cid,
                                                     "-F", "%p"])
    broker.wait_subscribed(cid)
    return p


def spied_answer(p):
    out, err = p.communicate(timeout=60 * ch.SCALE)
    ch.check(p.returncode == 0 and out, "no answer on the ack topic: %r" % err)
    return json.loads(out.decode())


def mqtt(h):
    missing = ch.mosquitto_missing()
    if missing:
        ch.log("not installed: %s: MQTT part skipped" % missing)
        return
    broker = h.mosquitto().start()
    # made before the receiver: the harness registers it in the receiver's store when that
    # receiver is made
    a = h.agent("mq-a", "gw-mq-a", None, mqtt=broker)
    recv = h.receiver("recv-mqtt", mqtt=broker).start()
    recv.wait_subscribed()

    # unregistered: "retry", nothing stored, records kept; registered: delivered once
    aid = "gw-mq-unreg"
    agent = h.agent("mq-unreg", aid, None, mqtt=broker, register=False)
    spy = ack_spy(broker, aid, "spy-unreg")
    agent.start()
    acked, sent = ch.send_lines(agent, [b"mq-unreg-%d" % i for i in range(50)])
    ans = spied_answer(spy)
    ch.log("unregistered over MQTT, the receiver answers: %r" % ans)
    ch.check(ans.get("status") == "retry" and "regist" in str(ans.get("error")),
             "an unregistered agent over MQTT: %r, expected a retry naming the registry" % ans)
    time.sleep(2)
    ch.check(recv.count(aid) == 0, "records stored for an unregistered agent over MQTT")
    ch.check(agent.pending_records() == 50, "%d records pending, expected 50"
             % agent.pending_records())
    ch.check(agent.ledger() == [], "ledgered over MQTT: %r" % agent.ledger()[:3])
    device_ok(h, recv, "add", aid, "--key", agent.cert)
    h.wait(lambda: agent.segment_count() == 0 and recv.count(aid) == 50, timeout=90,
           what="the registered MQTT agent's records stored")
    ch.assert_stored_exactly_once(recv, agent, acked, sent=sent)
    ch.check(agent.ledger() == [], "ledgered over MQTT: %r" % agent.ledger()[:3])
    ch.log("MQTT unregistered: retry, kept; registered: 50 records stored exactly once")
    ch.check(agent.stop() == 0, "agent did not exit 0 on SIGTERM")

    # revoked: new records are not stored; enabled: they arrive
    aid = "gw-mq-a"
    a.start()
    acked1, sent1 = ch.send_lines(a, [b"mq-a-%d" % i for i in range(30)])
    h.wait(lambda: a.segment_count() == 0 and recv.count(aid) == 30, timeout=90,
           what="gw-mq-a's records stored")
    device_ok(h, recv, "revoke", aid)
    time.sleep(REVOKE_BOUND_S + 1)  # wait out the registry cache (not a measurement)
    spy = ack_spy(broker, aid, "spy-revoked")
    acked2, sent2 = ch.send_lines(a, [b"mq-a-revoked-%d" % i for i in range(30)])
    ans = spied_answer(spy)
    ch.log("revoked over MQTT, the receiver answers: %r" % ans)
    ch.check(ans.get("status") == "retry" and "revoked" in str(ans.get("error")),
             "a revoked agent over MQTT: %r, expected a retry saying revoked" % ans)
    time.sleep(2)
    ch.check(recv.count(aid) == 30, "records of a revoked agent stored over MQTT")
    ch.check(a.pending_records() == 30, "%d records pending, expected 30" % a.pending_records())
    ch.check(a.ledger() == [], "the revoked agent ledgered: %r" % a.ledger()[:3])
    device_ok(h, recv, "enable", aid)
    h.wait(lambda: a.segment_count() == 0 and recv.count(aid) == 60, timeout=90,
           what="gw-mq-a's records stored after `device enable`")
    ch.assert_stored_exactly_once(recv, a, acked1 + acked2, sent=sent1 + sent2)
    ch.log("MQTT revoked: retry, kept; enabled: all 60 records stored exactly once")
    ch.check(a.stop() == 0, "agent did not exit 0 on SIGTERM")

    # impersonation by topic: gw-mq-a's signed envelope on gw-mq-b's topic
    h.register("gw-mq-b", key=h.client_cert("gw-mq-b")[0])
    env = ch.sign_envelope(aid, ch.make_batch(aid, 1, 5, payloads=[b"forged-%d" % i
                                                                   for i in range(5)]),
                           key_path=a.key)
    path = h.path("gw-mq-a-envelope.bin")
    with open(path, "wb") as f:
        f.write(env)
    for topic_id, want in (("gw-mq-b", "rejected"), (aid, "ok")):
        spy = broker.sub("cistern/v1/%s/ack" % topic_id, ["-C", "1", "-N", "-q", "1", "-i",
                                                          "spy-" + topic_id, "-F", "%D %p"])
        broker.wait_subscribed("spy-" + topic_id)
        rc, msg = broker.pub("cistern/v1/%s/batch" % topic_id, [
            "-q", "1", "-f", path,
            "-D", "publish", "response-topic", "cistern/v1/%s/ack" % topic_id,
            "-D", "publish", "correlation-data", CORR.decode(),
            "-D", "publish", "content-type", ch.SIGNED_CT])
        ch.check(rc == 0, "mosquitto_pub failed: %s" % msg)
        out, err = spy.communicate(timeout=60 * ch.SCALE)
        ch.check(spy.returncode == 0 and out[:17] == CORR + b" ",
                 "no answer with our correlation data on %s's ack topic: %r %r"
                 % (topic_id, out[:60], err))
        ans = json.loads(out[17:].decode())
        ch.log("gw-mq-a's envelope on %s's topic: %r" % (topic_id, ans))
        ch.check(ans.get("status") == want, "on %s's topic: %r, expected %s"
                 % (topic_id, ans, want))
        forged = [r for r in recv.rows(aid) if r[0] == ch.TEST_EPOCH]
        if want == "rejected":
            ch.check(not forged and recv.count("gw-mq-b") == 0,
                     "the envelope on another agent's topic stored records")
        else:
            ch.check(sorted(r[1] for r in forged) == [1, 2, 3, 4, 5],
                     "the envelope on its own topic: stored seqs %r"
                     % sorted(r[1] for r in forged))
    ch.check(recv.count("gw-mq-b") == 0, "records stored for gw-mq-b")
    ch.log("impersonation by topic: rejected, nothing stored; on its own topic it is stored")
    ch.check(recv.stop() == 0, "receiver did not exit 0 on SIGTERM")


def main(h):
    recv = h.receiver().start()
    cli(h, recv)
    https_unregistered(h, recv)
    revoke_while_streaming(h, recv)
    impersonation_by_certificate(h, recv)
    ch.check(recv.stop() == 0, "receiver did not exit 0 on SIGTERM")
    mqtt(h)


if __name__ == "__main__":
    ch.run(main, "r_registry")

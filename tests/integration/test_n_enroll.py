#!/usr/bin/env python3
"""n) Enrolment: `cistern-agent enroll --id ID` makes the device key and its CSR.

The key is a P-256 key in a mode-0600 file that openssl reads; the fingerprint printed is
exactly sha256 over `openssl pkey -in KEY -pubout -outform DER`; the CSR passes
`openssl req -verify` with subject CN=ID. Signed by the test CA with `openssl x509 -req`, it
makes a client certificate with which an agent delivers to a real receiver, and the
certificate's public key has the same fingerprint. Refusals change nothing on disk: an
existing key (exit 1), a bad id, a missing --id, an unknown option (exit 2), a missing or
world-writable directory (exit 1); --force replaces both files with a new key."""
import hashlib
import json
import os
import re
import stat
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cistern_harness as ch

ID = "gw-enrolled.7"


def enroll(h, *args):
    # under CISTERN_TEST_WRAPPER (valgrind) like the other processes of the tests
    wrap = os.environ.get("CISTERN_TEST_WRAPPER", "").split()
    r = subprocess.run(wrap + [h.agent_bin, "enroll"] + list(args), capture_output=True,
                       timeout=120 * ch.SCALE)
    # (valgrind's own "==pid==" lines are not the command's)
    err = "".join(l for l in r.stderr.decode().splitlines(True) if not re.match(r"==\d+==", l))
    return r.returncode, r.stdout.decode(), err


def openssl(*args, stdin=None):
    r = subprocess.run(["openssl"] + list(args), input=stdin, capture_output=True, timeout=60)
    ch.check(r.returncode == 0, "openssl %s failed: %s" % (" ".join(args), r.stderr.decode()))
    return r.stdout, r.stderr.decode()


def spki_fingerprint(key=None, cert=None):
    """sha256:<hex> over the DER SubjectPublicKeyInfo, as openssl computes it."""
    if key:
        der, _ = openssl("pkey", "-in", key, "-pubout", "-outform", "DER")
    else:
        pem, _ = openssl("x509", "-in", cert, "-noout", "-pubkey")
        der, _ = openssl("pkey", "-pubin", "-outform", "DER", stdin=pem)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def snapshot(d):
    return {n: open(os.path.join(d, n), "rb").read() for n in sorted(os.listdir(d))}


def main(h):
    d = h.path("gw")
    os.makedirs(d, mode=0o700)
    key, csr = os.path.join(d, "device.key"), os.path.join(d, "device.csr")

    # -- usage errors (2): nothing written
    for args, why in [((), "no --id"), (("--id", "gw/1", "--key", key), "'/' in the id"),
                      (("--id", "a" * 65, "--key", key), "a 65-character id"),
                      (("--id", ID, "--key", key, "--bogus"), "an unknown option"),
                      (("--id", ID, "--key", key, "extra"), "an extra argument"),
                      (("--id", ID, "--key", key, "--csr", key), "key and CSR the same file")]:
        rc, out, err = enroll(h, *args)
        ch.check(rc == 2 and err.strip(), "%s: exit %d, stderr %r" % (why, rc, err))
        ch.check(os.listdir(d) == [], "%s: files were written: %r" % (why, os.listdir(d)))

    # -- the key and the CSR (the CSR's path defaults to the key's, .csr for .key)
    rc, out, err = enroll(h, "--id", ID, "--key", key)
    ch.check(rc == 0, "enroll exited %d: %s" % (rc, err))
    ch.log("enroll printed:\n" + out)
    ch.check(sorted(os.listdir(d)) == ["device.csr", "device.key"],
             "files after enroll: %r" % os.listdir(d))
    ch.check(stat.S_IMODE(os.stat(key).st_mode) == 0o600,
             "key mode %o" % stat.S_IMODE(os.stat(key).st_mode))
    ch.check(stat.S_IMODE(os.stat(csr).st_mode) == 0o644,
             "CSR mode %o" % stat.S_IMODE(os.stat(csr).st_mode))
    m = re.search(r"^fingerprint: (sha256:[0-9a-f]{64})$", out, re.M)
    ch.check(m, "no fingerprint line in %r" % out)
    fpr = m.group(1)
    ch.check(key in out and csr in out, "the paths written are not printed")
    ch.check("openssl x509 -req" in out and "register" in out, "no next steps printed")

    # openssl reads the key: a P-256 key, and the fingerprint is over its public key
    text, _ = openssl("pkey", "-in", key, "-noout", "-text")
    ch.check(b"prime256v1" in text or b"P-256" in text, "not a P-256 key: %r" % text[:300])
    ch.check(spki_fingerprint(key=key) == fpr,
             "printed %s, openssl says %s" % (fpr, spki_fingerprint(key=key)))

    # the CSR verifies and names the id
    out_req, err_req = openssl("req", "-in", csr, "-noout", "-verify", "-subject")
    ch.check("verify OK" in err_req + out_req.decode(), "CSR did not verify: %r %r"
             % (out_req, err_req))
    ch.check(re.search(r"^subject=CN\s*=\s*%s$" % re.escape(ID), out_req.decode(), re.M),
             "CSR subject: %r" % out_req)
    pem, _ = openssl("req", "-in", csr, "-noout", "-pubkey")
    der, _ = openssl("pkey", "-pubin", "-outform", "DER", stdin=pem)
    ch.check("sha256:" + hashlib.sha256(der).hexdigest() == fpr, "the CSR holds another key")

    # -- refusals (1) leave the files as they were
    before = snapshot(d)
    rc, out, err = enroll(h, "--id", ID, "--key", key)
    ch.check(rc == 1 and key in err and "exists" in err and len(err.strip().split("\n")) == 1,
             "second enroll: exit %d, stderr %r" % (rc, err))
    ch.check(snapshot(d) == before, "a refused enroll changed the files")
    os.unlink(csr)
    rc, out, err = enroll(h, "--id", ID, "--key", key)
    ch.check(rc == 1 and csr not in os.listdir(d), "enroll with only the key there: exit %d" % rc)
    rc, out, err = enroll(h, "--id", ID, "--key", key, "--csr", csr + ".2")
    ch.check(rc == 1 and snapshot(d) == {"device.key": before["device.key"]},
             "enroll over an existing key with a new --csr: exit %d, %r" % (rc, err))
    rc, out, err = enroll(h, "--id", ID, "--key", h.path("missing", "device.key"))
    ch.check(rc == 1 and h.path("missing", "device.key") in err, "missing dir: %d %r" % (rc, err))
    open_dir = h.path("open")
    os.makedirs(open_dir)
    os.chmod(open_dir, 0o1777)
    rc, out, err = enroll(h, "--id", ID, "--key", os.path.join(open_dir, "device.key"))
    ch.check(rc == 1 and "writable by everyone" in err and os.listdir(open_dir) == [],
             "world-writable dir: exit %d, %r" % (rc, err))

    # -- --force: a new key and CSR in place, still 0600
    rc, out, err = enroll(h, "--id", ID, "--key", key, "--force")
    ch.check(rc == 0, "--force exited %d: %s" % (rc, err))
    fpr2 = re.search(r"^fingerprint: (sha256:[0-9a-f]{64})$", out, re.M).group(1)
    ch.check(fpr2 != fpr and spki_fingerprint(key=key) == fpr2, "--force: same or wrong key")
    ch.check(stat.S_IMODE(os.stat(key).st_mode) == 0o600, "--force: key mode")
    ch.check(sorted(os.listdir(d)) == ["device.csr", "device.key"],
             "--force left files behind: %r" % os.listdir(d))
    fpr = fpr2

    # -- the operator signs the CSR with the CA, as docs/security.md shows
    h.make_pki()
    cert = os.path.join(d, "device.pem")
    openssl("x509", "-req", "-in", csr, "-CA", h.ca_cert, "-CAkey", h.ca_key, "-CAcreateserial",
            "-days", "2", "-sha256", "-extfile", h.path("pki", "ext.cnf"), "-extensions", "client",
            "-out", cert)
    subj, _ = openssl("x509", "-in", cert, "-noout", "-subject")
    ch.check(re.search(r"CN\s*=\s*%s" % re.escape(ID), subj.decode()), "cert subject %r" % subj)
    ch.check(spki_fingerprint(cert=cert) == fpr, "the certificate's key is not the enrolled key")

    # -- and the agent delivers with it to a real receiver (mTLS: CN = agent id)
    recv = h.receiver().start()
    agent = h.agent("enrolled", ID, recv,
                    extra={"forward": {"tls": {"cert_file": cert, "key_file": key}}}).start()
    acked, sent = ch.send_lines(agent, [json.dumps({"enrolled": i}).encode() for i in range(200)])
    h.wait(lambda: agent.segment_count() == 0 and recv.count(ID) == 200, timeout=60,
           what="the enrolled agent's records to be stored")
    ch.assert_stored_exactly_once(recv, agent, acked, sent)
    ch.check(agent.stop() == 0, "agent did not exit 0")
    ch.check(recv.stop() == 0, "receiver did not exit 0")


if __name__ == "__main__":
    ch.run(main, "n_enroll")

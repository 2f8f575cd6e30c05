#!/usr/bin/env python3
"""CLI: --check-config accepts the shipped example configs ("FILE: ok", exit 0), rejects an
unknown key with "FILE:LINE:COL: section.key: unknown key" and a non-zero exit; --version
and --help exit 0. `cistern-receiver device`: add (refuses an id already registered, and a
--key whose fingerprint is not --fingerprint's), list, show, revoke, enable, with their exit
codes and what the store holds afterwards. argv: AGENT_BIN RECEIVER_BIN CONFIGS_DIR"""
import hashlib
import json
import os
import re
import sqlite3
import stat
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cistern_harness as ch

CONFIGS = os.path.abspath(sys.argv[3]) if len(sys.argv) > 3 else None


def run_cli(argv):
    try:
        r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return -999, "", "(still running after 30s; killed)"
    return r.returncode, r.stdout.decode("utf-8", "replace"), r.stderr.decode("utf-8", "replace")


def check_device_commands(h, expect):
    """The device registry commands against a store of their own."""
    store = h.path("devices-store.db")
    cfg = h.path("devices-receiver.yaml")
    with open(cfg, "w") as f:
        f.write("listen:\n  http: 127.0.0.1:0\n  insecure_plain_http: true\n"
                "store:\n  path: %s\n" % store)

    def dev(*args):
        rc, out, err = run_cli([h.receiver_bin, "-c", cfg, "device"] + list(args))
        ch.log("device %s -> %d, stdout %r, stderr %r" % (" ".join(args), rc, out[:300], err[:300]))
        return rc, out, err

    def registry():
        con = sqlite3.connect("file:%s?mode=ro" % store, uri=True, timeout=10.0)
        try:
            return {r[0]: r[1:] for r in con.execute(
                "SELECT id, CASE WHEN fingerprint IS NULL THEN NULL ELSE hex(fingerprint) END,"
                " length(hmac_secret), enabled FROM devices")}
        finally:
            con.close()

    # a key, its CSR, its fingerprint (SHA-256 of the DER SubjectPublicKeyInfo)
    key, csr = h.path("gw-cli.key"), h.path("gw-cli.csr")
    subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-out", key], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run(["openssl", "req", "-new", "-key", key, "-subj", "/CN=gw-cli-1", "-out", csr],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    der = subprocess.run(["openssl", "pkey", "-in", key, "-pubout", "-outform", "DER"],
                         check=True, stdout=subprocess.PIPE).stdout
    fpr_hex = hashlib.sha256(der).hexdigest()
    fpr = "sha256:" + fpr_hex
    secret_file = h.path("gw-cli.secret")
    secret = "c2VjcmV0LXNoYXJlZC13aXRoLXRoZS1nYXRld2F5LTAwNDI="
    with open(secret_file, "w") as f:
        f.write(secret + "\n")
    os.chmod(secret_file, 0o600)

    # help and usage
    rc, out, err = dev("--help")
    expect(rc == 0 and "revoke" in out, "device --help exited %d or lacks the commands" % rc)
    rc, out, err = dev("add", "--help")
    expect(rc == 0 and "--fingerprint" in out, "device add --help exited %d" % rc)
    for args in ([], ["frob"], ["add", "gw-x"], ["add", "bad/id", "--fingerprint", fpr],
                 ["add", "gw-x", "--fingerprint", "sha256:xyz"], ["list", "extra"],
                 ["revoke"]):
        rc, out, err = dev(*args)
        expect(rc == 2, "device %s exited %d, not 2 (usage)" % (" ".join(args), rc))

    # list on a store that is not there: an error, and no store made
    rc, out, err = dev("list")
    expect(rc == 1 and store in err, "device list without a store exited %d (%r)" % (rc, err))
    expect(not os.path.exists(store), "device list made a store at %s" % store)

    # add: --key and --fingerprint agree
    rc, out, err = dev("add", "gw-cli-1", "--key", csr, "--fingerprint", fpr)
    expect(rc == 0, "device add gw-cli-1 exited %d (%r)" % (rc, err))
    expect(fpr in out and "enabled" in out, "device add did not print the key and state: %r" % out)
    expect(os.path.exists(store) and stat.S_IMODE(os.stat(store).st_mode) == 0o600,
           "the store is not mode 0600")
    expect(registry().get("gw-cli-1") == (fpr_hex.upper(), None, 1),
           "gw-cli-1 in the store: %r" % (registry().get("gw-cli-1"),))

    # an id already registered is refused, and left as it was
    rc, out, err = dev("add", "gw-cli-1", "--hmac-secret-file", secret_file)
    expect(rc == 1 and "already registered; --force replaces its credentials" in err,
           "a second add of gw-cli-1 exited %d (%r)" % (rc, err))
    expect(registry().get("gw-cli-1") == (fpr_hex.upper(), None, 1),
           "the refused add changed gw-cli-1: %r" % (registry().get("gw-cli-1"),))

    # a key file that is not the fingerprint's key: refused, nothing registered
    rc, out, err = dev("add", "gw-cli-2", "--key", csr, "--fingerprint", "sha256:" + "0" * 64)
    expect(rc == 1 and fpr in err, "a --key/--fingerprint mismatch exited %d (%r)" % (rc, err))
    expect("gw-cli-2" not in registry(), "gw-cli-2 was registered despite the mismatch")

    # a secret: registered, never printed
    rc, out, err = dev("add", "gw-cli-3", "--hmac-secret-file", secret_file)
    expect(rc == 0, "device add gw-cli-3 --hmac-secret-file exited %d (%r)" % (rc, err))
    expect(registry().get("gw-cli-3") == (None, len(secret), 1),
           "gw-cli-3 in the store: %r" % (registry().get("gw-cli-3"),))

    rc, out, err = dev("list")
    expect(rc == 0, "device list exited %d" % rc)
    lines = out.strip().split("\n")
    expect(lines and lines[0].split() == ["ID", "STATE", "KEY", "HMAC", "CHANGED"],
           "device list header: %r" % lines[:1])
    rows = [l.split() for l in lines[1:]]
    expect([r[:4] for r in rows] == [["gw-cli-1", "enabled", fpr, "no"],
                                     ["gw-cli-3", "enabled", "-", "yes"]],
           "device list rows: %r" % rows)
    expect(all(re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", r[4]) for r in rows),
           "CHANGED is not UTC ISO 8601: %r" % rows)
    rc, out2, err = dev("list", "--json")
    try:
        listed = json.loads(out2)
    except ValueError:
        listed = None
    expect(isinstance(listed, list) and [d.get("id") for d in listed] == ["gw-cli-1", "gw-cli-3"]
           and listed[0].get("fingerprint") == fpr and listed[1].get("fingerprint") is None
           and listed[1].get("hmac") is True, "device list --json: %r" % out2)
    rc, out3, err = dev("show", "gw-cli-3")
    expect(rc == 0 and "never delivered" in out3, "device show gw-cli-3 exited %d: %r" % (rc, out3))
    for text in (out, out2, out3):
        expect(secret not in text, "a secret was printed")

    # revoke, enable
    rc, out, err = dev("revoke", "gw-cli-1")
    expect(rc == 0 and "revoked" in out and "within 5 s" in out,
           "device revoke exited %d: %r" % (rc, out))
    expect(registry().get("gw-cli-1", (0, 0, None))[2] == 0, "gw-cli-1 is not revoked in the store")
    rc, out, err = dev("show", "gw-cli-1", "--json")
    try:
        shown = json.loads(out)
    except ValueError:
        shown = {}
    expect(shown.get("state") == "revoked" and "agent" in shown and shown["agent"] is None,
           "device show --json after revoke: %r" % out)
    rc, out, err = dev("enable", "gw-cli-1")
    expect(rc == 0 and "enabled" in out, "device enable exited %d" % rc)
    expect(registry().get("gw-cli-1", (0, 0, None))[2] == 1, "gw-cli-1 is not enabled in the store")
    rc, out, err = dev("revoke", "gw-nobody")
    expect(rc == 1 and "not registered" in err, "revoke of an unknown id exited %d" % rc)

    # --force replaces every credential
    rc, out, err = dev("add", "gw-cli-1", "--hmac-secret-file", secret_file, "--force")
    expect(rc == 0, "device add --force exited %d (%r)" % (rc, err))
    expect(registry().get("gw-cli-1") == (None, len(secret), 1),
           "gw-cli-1 after --force: %r" % (registry().get("gw-cli-1"),))


def check_signing_config(h, expect):
    """Every batch is signed: a config that leaves the agent nothing to sign with is refused
    at the key that is missing; a secret file others can read stops the agent at start."""
    base = ("agent:\n  id: gw-1\ninputs:\n  - name: d\n    type: demo\n"
            "forward:\n  url: https://127.0.0.1:1/v1/batches\n")
    cases = (("no-key", base, "forward.sign.key_file"),
             ("hmac-no-secret", base + "  sign:\n    method: hmac\n",
              "forward.sign.hmac_secret_file"),
             ("bad-method", base + "  sign:\n    method: rsa\n", "forward.sign.method"))
    for name, text, key in cases:
        path = h.path("sign-%s.yaml" % name)
        with open(path, "w") as f:
            f.write(text)
        rc, out, err = run_cli([h.agent_bin, "--check-config", path])
        ch.log("agent --check-config %s -> %d, %r" % (name, rc, (out + err).strip()))
        expect(rc == 1 and re.search(r"%s:\d+:\d+: %s: " % (re.escape(path), re.escape(key)),
                                     out + err),
               "agent --check-config %s: want exit 1 and 'FILE:LINE:COL: %s:', got %d %r"
               % (name, key, rc, out + err))
    secret = h.path("sign-secret")
    with open(secret, "w") as f:
        f.write("x" * 40 + "\n")
    os.chmod(secret, 0o644)
    path = h.path("sign-world-readable.yaml")
    with open(path, "w") as f:
        f.write(base
                + "  sign:\n    method: hmac\n    hmac_secret_file: %s\n" % secret
                + "spool:\n  path: %s\nstatus:\n  socket: ''\n" % h.path("sign-spool.db"))
    rc, out, err = run_cli([h.agent_bin, "--config", path])
    ch.log("agent with a 0644 secret -> %d, %r" % (rc, (out + err).strip()[-300:]))
    expect(rc != 0 and "chmod 600" in out + err,
           "an agent whose HMAC secret is mode 0644 must refuse to start and say chmod 600; "
           "got %d %r" % (rc, (out + err)[-300:]))


def main(h):
    ch.check(CONFIGS and os.path.isdir(CONFIGS), "configs dir not given")
    problems = []

    def expect(cond, msg):
        if not cond:
            problems.append(msg)
            ch.log("PROBLEM: " + msg)

    for binary, cfg, section in ((h.agent_bin, "agent.yaml", "spool"),
                                 (h.receiver_bin, "receiver.yaml", "store")):
        name = os.path.basename(binary)
        path = os.path.join(CONFIGS, cfg)
        rc, out, err = run_cli([binary, "--check-config", path])
        ch.log("%s --check-config %s -> %d, stdout %r, stderr %r" % (name, path, rc, out, err))
        expect(rc == 0, "%s --check-config %s exited %d (stderr %r)" % (name, path, rc, err))
        expect(re.search(r"^%s: ok$" % re.escape(path), out, re.M),
               "%s --check-config %s: stdout %r lacks '%s: ok'" % (name, path, out, path))

        # the shipped example with one misspelled key added to a section
        with open(path) as f:
            text = f.read()
        lines = text.split("\n")
        idx = lines.index(section + ":")
        lines.insert(idx + 1, "  pathh: x")
        bad = h.path("bad-" + cfg)
        with open(bad, "w") as f:
            f.write("\n".join(lines))
        # a minimal file with only the misspelled key
        bad2 = h.path("bad-minimal-" + cfg)
        with open(bad2, "w") as f:
            f.write("%s:\n  pathh: x\n" % section)
        for b, line in ((bad, idx + 2), (bad2, 2)):
            rc, out, err = run_cli([binary, "--check-config", b])
            ch.log("%s --check-config %s -> %d, stdout %r, stderr %r" % (name, b, rc, out, err))
            expect(rc != 0, "%s --check-config %s exited 0 for an unknown key" % (name, b))
            m = re.search(r"%s:(\d+):(\d+): %s\.pathh: unknown key" % (re.escape(b), section),
                          out + err)
            expect(m, "%s --check-config %s: no 'FILE:LINE:COL: %s.pathh: unknown key' in %r"
                   % (name, b, section, out + err))
            if m:
                expect(int(m.group(1)) == line and int(m.group(2)) == 3,
                       "%s: reported %s:%s, the key is at %d:3" % (name, m.group(1), m.group(2),
                                                                    line))
            # --config with the same file must also refuse to start
            rc, out, err = run_cli([binary, "--config", b])
            expect(rc != 0, "%s --config %s started with an unknown key" % (name, b))

        for flag in ("--version", "--help"):
            rc, out, err = run_cli([binary, flag])
            ch.log("%s %s -> %d, %r" % (name, flag, rc, (out + err)[:200]))
            expect(rc == 0, "%s %s exited %d" % (name, flag, rc))
            expect((out + err).strip() != "", "%s %s printed nothing" % (name, flag))
        rc, out, err = run_cli([binary, "--no-such-option"])
        expect(rc != 0, "%s --no-such-option exited 0" % name)

    check_device_commands(h, expect)
    check_signing_config(h, expect)

    ch.check(not problems, "%d CLI problems:\n  %s" % (len(problems), "\n  ".join(problems)))


if __name__ == "__main__":
    ch.run(main, "cli")

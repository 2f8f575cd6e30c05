#!/usr/bin/env python3
"""CLI: --check-config accepts the shipped example configs ("FILE: ok", exit 0), rejects an
unknown key with "FILE:LINE:COL: section.key: unknown key" and a non-zero exit; --version
and --help exit 0. argv: AGENT_BIN RECEIVER_BIN CONFIGS_DIR"""
import os
import re
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

    ch.check(not problems, "%d CLI problems:\n  %s" % (len(problems), "\n  ".join(problems)))


if __name__ == "__main__":
    ch.run(main, "cli")

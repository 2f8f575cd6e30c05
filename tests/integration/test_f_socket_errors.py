#!/usr/bin/env python3
"""f) Socket input protocol edge cases: one answer per line, in order; an over-long line
(> max_line), an empty line and a line with a NUL byte are answered ERR and not stored;
the connection keeps working after an ERR; a non-UTF-8 line is stored byte for byte and the
read API returns it with payload_base64:true."""
import base64
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cistern_harness as ch

AGENT_ID = "gw-protocol"


def main(h):
    recv = h.receiver().start()
    agent = h.agent("agent", AGENT_ID, recv, max_line="1KiB").start()
    lines = [
        (b"first good line", "OK"),
        (b"x" * 3000, "ERR"),                 # longer than max_line
        (b"", "ERR"),                         # empty
        (b"has\x00nul", "ERR"),               # NUL byte
        (b"\xff\xfebinary \x80 bytes", "OK"),  # not UTF-8, still a valid line
        (b"y" * 1000, "OK"),                  # within max_line (1024)
        (b"last good line", "OK"),
    ]
    for via in ("unix", "tcp"):
        c = agent.client(via)
        c.send_many([l for l, _ in lines])
        ans = c.wait_answers(len(lines), timeout=60, alive=h.check_alive)
        kinds = [a[0] for a in ans]
        ch.check(kinds == [k for _, k in lines], "%s: answers %r, expected %r"
                 % (via, ans, [k for _, k in lines]))
        ch.check(all(a[1] for a in ans if a[0] == "ERR"), "ERR answer without a reason: %r" % ans)
        acked = c.acked()
        c.close()
        ch.log("%s answers: %r" % (via, [(k, v if k == "ERR" else v) for k, v in ans]))

    good = [l for l, k in lines if k == "OK"]
    h.wait(lambda: agent.segment_count() == 0 and recv.count(AGENT_ID) >= 2 * len(good),
           timeout=60, what="the good lines to be stored")
    rows = recv.rows(AGENT_ID)
    ch.check(len(rows) == 2 * len(good), "%d rows stored, expected %d" % (len(rows), 2 * len(good)))
    stored = sorted(p for _, _, p, _ in rows)
    ch.check(stored == sorted(good * 2), "stored payloads differ from the OK lines: %r"
             % [p[:20] for p in stored])

    api = recv.api_records(AGENT_ID)
    binary = [r for r in api if r.get("payload_base64")]
    ch.check(len(binary) == 2, "expected 2 records with payload_base64:true, got %r" % binary)
    ch.check(all(base64.b64decode(r["payload"]) == lines[4][0] for r in binary),
             "payload_base64 does not decode to the bytes sent")
    text = [r for r in api if not r.get("payload_base64")]
    ch.check(sorted(r["payload"].encode() for r in text) ==
             sorted([l for l in good if l != lines[4][0]] * 2), "text payloads differ in the API")

    ch.check(agent.stop() == 0, "agent did not exit 0 on SIGTERM")
    ch.check(recv.stop() == 0, "receiver did not exit 0 on SIGTERM")


if __name__ == "__main__":
    ch.run(main, "f_socket_protocol_errors")

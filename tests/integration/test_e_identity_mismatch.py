#!/usr/bin/env python3
"""e) An agent whose client certificate says CN=gw-cert-alpha but whose config says
agent.id gw-config-beta is refused (403): its spool gets a 'rejected' ledger row whose
detail mentions the certificate's CN, and the receiver stores no records for either id.
A correctly configured agent on the same receiver still gets its records stored."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cistern_harness as ch

CN = "gw-cert-alpha"
ID = "gw-config-beta"


def main(h):
    recv = h.receiver().start()
    bad = h.agent("bad-agent", ID, recv, cn=CN).start()
    good = h.agent("good-agent", "gw-good", recv).start()

    cb = bad.client("unix")
    cb.send_many([json.dumps({"n": i}).encode() for i in range(20)])
    ans = cb.wait_answers(20, timeout=60, alive=h.check_alive)
    cb.close()
    ch.check(all(a[0] == "OK" for a in ans), "bad agent did not accept its input: %r" % ans[:3])

    cg = good.client("unix")
    cg.send_many([json.dumps({"n": i}).encode() for i in range(20)])
    cg.wait_answers(20, timeout=60, alive=h.check_alive)
    cg.close()

    rej = h.wait(lambda: [r for r in bad.ledger() if r["reason"] == "rejected"], timeout=90,
                 what="a 'rejected' row in the mismatched agent's ledger")
    h.wait(lambda: bad.pending_records() == 0, timeout=60,
           what="the mismatched agent's records to be ledgered (spool empty)")
    h.wait(lambda: good.segment_count() == 0 and recv.count("gw-good") == 20, timeout=60,
           what="the good agent's records to be stored")
    rej = [r for r in bad.ledger() if r["reason"] == "rejected"]
    ch.log("ledger: %r" % rej)
    ch.check(sum(int(r["count"]) for r in rej) == 20,
             "rejected ledger rows count %d records, expected 20"
             % sum(int(r["count"]) for r in rej))
    ch.check(any(CN in str(r["detail"] or "") for r in rej),
             "no ledger detail mentions the certificate CN %r: %r"
             % (CN, [r["detail"] for r in rej]))

    ch.check(recv.count(CN) == 0, "receiver stored records for %s" % CN)
    ch.check(recv.count(ID) == 0, "receiver stored records for %s" % ID)
    con = recv.db()
    try:
        n = con.execute("SELECT count(*) FROM records WHERE agent_id<>'gw-good'").fetchone()[0]
    finally:
        con.close()
    ch.check(n == 0, "receiver stored %d records for agents other than gw-good" % n)

    for a in (bad, good):
        ch.check(a.stop() == 0, "%s did not exit 0 on SIGTERM" % a.name)
    ch.check(recv.stop() == 0, "receiver did not exit 0 on SIGTERM")


if __name__ == "__main__":
    ch.run(main, "e_identity_mismatch_403")

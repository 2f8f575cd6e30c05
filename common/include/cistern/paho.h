/* Holding Paho MQTT C's process-wide state for as long as the process uses MQTT. */
#ifndef CISTERN_PAHO_H
#define CISTERN_PAHO_H

/* Paho C (1.3.12, Debian bookworm) sets up its global state (threads, lists, and the
 * bookkeeping of its own heap) when the first client of the process is created, and tears it
 * down when the last is destroyed. Cistern takes a new client for every connection, so without
 * a hold each reconnect tears the state down and sets it up again, and Paho's heap bookkeeping
 * restarts empty: blocks that Paho's threads still held at that moment (a half-written PUBLISH,
 * a packet being read) are never freed afterwards. Valgrind saw ~1.4 KiB lost per such
 * reconnect. A hold is an idle client, never connected, that keeps the state up.
 *
 * Call cis_paho_hold() before a module creates its first client and cis_paho_release() after
 * it destroyed its last. Holds are counted; thread-safe. Returns 0, or CIS_ENOMEM. */
int cis_paho_hold(void);
void cis_paho_release(void);

#endif

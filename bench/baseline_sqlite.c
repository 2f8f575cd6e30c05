/* Baseline for the benchmarks: the naive design, one SQLite row per record, inserted in
 * 1,000-row transactions (WAL), plain (no index: B1's baseline) or under the receiver's unique
 * key with INSERT OR IGNORE (B2's). Every payload is formatted before the clock starts, so the
 * timed loop is SQLite alone, as the agent is timed on records that already exist.
 * Prints "rows=N seconds=S rows_per_s=R". */
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/vfs.h>
#include <time.h>

#define TXN_ROWS 1000
#define PAYLOAD_MAX 128
#define TMPFS_MAGIC_ 0x01021994L
#define RAMFS_MAGIC_ 0x858458f6L

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int parse_long(const char *s, long *out)
{
    char *end;
    *out = strtol(s, &end, 10);
    return *end == '\0' && *out > 0 ? 0 : -1;
}

/* The 100-byte JSON sensor record of record i, as bench/e2e.py payload(), bench/feed.c
 * and bench/mqtt_pubsub.c make it: keep them in sync (bench/e2e.py checks the rows).
 * Returns its length. */
static int payload(char *buf, size_t cap, long i)
{
    return snprintf(buf, cap,
                    "{\"sensor\":\"s-%03ld\",\"n\":%09ld,\"temp_c\":%5.2f,\"humidity\":%4.1f,"
                    "\"pad\":\"xxxxxxxxxxxxxxxxxxxxxxxxxxxx\"}",
                    i % 64, i, 18.0 + (double)(i % 800) / 100.0, 40.0 + (double)(i % 300) / 10.0);
}

/* The directory part of path, in a buffer of cap bytes: "." when it has none. */
static void dir_of(const char *path, char *dir, size_t cap)
{
    const char *slash = strrchr(path, '/');
    if (!slash)
        snprintf(dir, cap, ".");
    else if (slash == path)
        snprintf(dir, cap, "/");
    else
        snprintf(dir, cap, "%.*s", (int)(slash - path), path);
}

static int exec_ok(sqlite3 *db, const char *sql)
{
    return sqlite3_exec(db, sql, NULL, NULL, NULL) == SQLITE_OK ? 0 : -1;
}

int main(int argc, char **argv)
{
    sqlite3 *db = NULL;
    sqlite3_stmt *st = NULL;
    char *buf = NULL;     /* every payload, back to back */
    size_t *off = NULL;   /* payload i is buf[off[i] .. off[i + 1]) */
    const char *why = NULL;
    long n, unique, full = 0;
    double t0, secs;
    char dir[4096];
    struct statfs sfs;
    int rc = 1;

    if ((argc != 4 && argc != 5) || parse_long(argv[2], &n) || n > 100000000L ||
        (strcmp(argv[3], "plain") && strcmp(argv[3], "unique")) ||
        (argc == 5 && strcmp(argv[4], "normal") && strcmp(argv[4], "full"))) {
        fprintf(stderr, "usage: baseline_sqlite DB RECORDS plain|unique [normal|full]\n"
                        "  DB must not exist yet and must be on a disk filesystem (not tmpfs)\n");
        return 2;
    }
    unique = strcmp(argv[3], "unique") == 0;
    full = argc == 5 && strcmp(argv[4], "full") == 0;

    /* On tmpfs a commit costs no I/O at all: the baseline would be flattered, not measured. */
    dir_of(argv[1], dir, sizeof(dir));
    if (statfs(dir, &sfs) != 0) {
        fprintf(stderr, "baseline_sqlite: %s: cannot stat its filesystem\n", dir);
        return 1;
    }
    if ((long)sfs.f_type == TMPFS_MAGIC_ || (long)sfs.f_type == RAMFS_MAGIC_) {
        fprintf(stderr, "baseline_sqlite: %s is on tmpfs/ramfs; give a DB path on a disk "
                        "(e.g. /var/tmp)\n", dir);
        return 1;
    }

    buf = malloc((size_t)n * PAYLOAD_MAX);
    off = malloc(((size_t)n + 1) * sizeof(*off));
    if (!buf || !off) {
        why = "out of memory for the payloads";
        goto out;
    }
    off[0] = 0;
    for (long i = 0; i < n; i++)
        off[i + 1] = off[i] + (size_t)payload(buf + off[i], PAYLOAD_MAX, i);

    if (sqlite3_open_v2(argv[1], &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, NULL))
        goto out;
    if (sqlite3_prepare_v2(db, "PRAGMA journal_mode=WAL", -1, &st, NULL) != SQLITE_OK)
        goto out;
    if (sqlite3_step(st) != SQLITE_ROW ||
        strcmp((const char *)sqlite3_column_text(st, 0), "wal")) {
        why = "journal_mode=WAL refused";
        goto out;
    }
    sqlite3_finalize(st);
    st = NULL;
    if (exec_ok(db, full ? "PRAGMA synchronous=FULL" : "PRAGMA synchronous=NORMAL"))
        goto out;
    if (exec_ok(db, unique ? "CREATE TABLE records(agent_id TEXT NOT NULL, epoch INTEGER NOT NULL,"
                             " seq INTEGER NOT NULL, ts_ms INTEGER NOT NULL, stream TEXT NOT NULL,"
                             " payload BLOB NOT NULL, PRIMARY KEY(agent_id, epoch, seq))"
                             " WITHOUT ROWID"
                           : "CREATE TABLE records(agent_id TEXT, epoch INTEGER, seq INTEGER,"
                             " ts_ms INTEGER, stream TEXT, payload BLOB)"))
        goto out;
    if (sqlite3_prepare_v2(db, unique ? "INSERT OR IGNORE INTO records VALUES(?,?,?,?,?,?)"
                                      : "INSERT INTO records VALUES(?,?,?,?,?,?)",
                           -1, &st, NULL) != SQLITE_OK)
        goto out;

    t0 = now_s();
    for (long i = 0; i < n; i++) {
        if (i % TXN_ROWS == 0 && exec_ok(db, "BEGIN"))
            goto out;
        sqlite3_bind_text(st, 1, "gw-bench", -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 2, 1);
        sqlite3_bind_int64(st, 3, i + 1);
        sqlite3_bind_int64(st, 4, 1700000000000 + i);
        sqlite3_bind_text(st, 5, "bench", -1, SQLITE_STATIC);
        sqlite3_bind_blob(st, 6, buf + off[i], (int)(off[i + 1] - off[i]), SQLITE_STATIC);
        if (sqlite3_step(st) != SQLITE_DONE)
            goto out;
        sqlite3_reset(st);
        if ((i % TXN_ROWS == TXN_ROWS - 1 || i == n - 1) && exec_ok(db, "COMMIT"))
            goto out;
    }
    secs = now_s() - t0;
    sqlite3_finalize(st);
    st = NULL;

    /* Untimed: the rows are all there (a silent failure must not pass for a fast run). */
    if (sqlite3_prepare_v2(db, "SELECT count(*) FROM records", -1, &st, NULL) != SQLITE_OK)
        goto out;
    if (sqlite3_step(st) != SQLITE_ROW || sqlite3_column_int64(st, 0) != n) {
        why = "the table does not hold one row per record";
        goto out;
    }
    printf("rows=%ld seconds=%.3f rows_per_s=%.0f\n", n, secs, (double)n / secs);
    rc = 0;
out:
    if (rc)
        fprintf(stderr, "baseline_sqlite: %s\n",
                why ? why : db ? sqlite3_errmsg(db) : "cannot open");
    sqlite3_finalize(st);
    sqlite3_close(db);
    free(buf);
    free(off);
    return rc;
}

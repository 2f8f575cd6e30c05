/* Baseline for the benchmarks: the naive design, one SQLite row per record, inserted in
 * 1,000-row transactions (WAL), optionally under the receiver's unique key with
 * INSERT OR IGNORE. Prints "rows=N seconds=S rows_per_s=R". */
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

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

int main(int argc, char **argv)
{
    sqlite3 *db = NULL;
    sqlite3_stmt *st = NULL;
    long n, unique;
    char payload[128];
    double t0;
    int rc = 1;

    if (argc != 4 || parse_long(argv[2], &n) || (strcmp(argv[3], "plain") && strcmp(argv[3], "unique"))) {
        fprintf(stderr, "usage: baseline_sqlite DB RECORDS plain|unique\n");
        return 2;
    }
    unique = strcmp(argv[3], "unique") == 0;
    if (sqlite3_open(argv[1], &db) != SQLITE_OK)
        goto out;
    sqlite3_exec(db, "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;", NULL, NULL, NULL);
    if (sqlite3_exec(db, unique ? "CREATE TABLE records(agent_id TEXT NOT NULL, epoch INTEGER NOT NULL,"
                                  " seq INTEGER NOT NULL, ts_ms INTEGER NOT NULL, stream TEXT NOT NULL,"
                                  " payload BLOB NOT NULL, PRIMARY KEY(agent_id, epoch, seq)) WITHOUT ROWID"
                                : "CREATE TABLE records(agent_id TEXT, epoch INTEGER, seq INTEGER,"
                                  " ts_ms INTEGER, stream TEXT, payload BLOB)",
                     NULL, NULL, NULL) != SQLITE_OK)
        goto out;
    if (sqlite3_prepare_v2(db, unique ? "INSERT OR IGNORE INTO records VALUES(?,?,?,?,?,?)"
                                      : "INSERT INTO records VALUES(?,?,?,?,?,?)",
                           -1, &st, NULL) != SQLITE_OK)
        goto out;
    t0 = now_s();
    for (long i = 0; i < n; i++) {
        int len;
        if (i % 1000 == 0)
            sqlite3_exec(db, "BEGIN", NULL, NULL, NULL);
        /* The same 100-byte JSON sensor record the agent benchmarks send. */
        len = snprintf(payload, sizeof(payload),
                       "{\"sensor\":\"s-%03ld\",\"n\":%09ld,\"temp_c\":%5.2f,\"humidity\":%4.1f,\"pad\":\"xxxxxxxxxxxx\"}",
                       i % 64, i, 18.0 + (double)(i % 800) / 100.0, 40.0 + (double)(i % 300) / 10.0);
        sqlite3_bind_text(st, 1, "gw-bench", -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 2, 1);
        sqlite3_bind_int64(st, 3, i + 1);
        sqlite3_bind_int64(st, 4, 1700000000000 + i);
        sqlite3_bind_text(st, 5, "bench", -1, SQLITE_STATIC);
        sqlite3_bind_blob(st, 6, payload, len, SQLITE_STATIC);
        if (sqlite3_step(st) != SQLITE_DONE)
            goto out;
        sqlite3_reset(st);
        if (i % 1000 == 999 || i == n - 1)
            sqlite3_exec(db, "COMMIT", NULL, NULL, NULL);
    }
    {
        double s = now_s() - t0;
        printf("rows=%ld seconds=%.3f rows_per_s=%.0f\n", n, s, (double)n / s);
    }
    rc = 0;
out:
    if (rc)
        fprintf(stderr, "baseline_sqlite: %s\n", db ? sqlite3_errmsg(db) : "cannot open");
    sqlite3_finalize(st);
    sqlite3_close(db);
    return rc;
}

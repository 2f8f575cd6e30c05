/* Fuzz helpers: a SQLite store on tmpfs for the process, started afresh when it grows large,
 * removed at exit. */
#include "fuzz_store.h"

#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <sqlite3.h>

#include <cistern/log.h>

#include "store/store.h"

#ifndef STORE_MAX_BYTES
#define STORE_MAX_BYTES (32 << 20) /* database + WAL: then a fresh store (tmpfs is memory) */
#endif
#define CHECK_EVERY 4096           /* calls between two looks at the size */

static char dir[64], path[128];
static struct recv_store *st;
static struct recv_ingest_ctx ctx;
static sqlite3 *probe; /* ours, read-only: sees the store's commits as another connection */
static unsigned long calls;

static const char *const suffixes[] = {"", "-wal", "-shm"};

static void store_close(void)
{
    char p[160];

    sqlite3_close(probe);
    probe = NULL;
    recv_store_sqlite.close(st);
    st = NULL;
    for (size_t i = 0; i < sizeof suffixes / sizeof suffixes[0]; i++) {
        snprintf(p, sizeof p, "%s%s", path, suffixes[i]);
        unlink(p);
    }
}

static void store_open(void)
{
    struct recv_store_opts o = {0};
    char err[256];

    o.path = path;
    o.busy_timeout_ms = 1000;
    if (recv_store_sqlite.open(&o, &st, err, sizeof err) != 0) {
        fprintf(stderr, "fuzz: cannot open the store: %s\n", err);
        abort();
    }
    if (sqlite3_open_v2(path, &probe, SQLITE_OPEN_READONLY, NULL) != SQLITE_OK) {
        fprintf(stderr, "fuzz: cannot open the store read-only: %s\n", sqlite3_errmsg(probe));
        abort();
    }
    ctx.st = st;
}

static off_t store_size(void)
{
    struct stat sb;
    char p[160];
    off_t n = 0;

    for (size_t i = 0; i < 2; i++) {
        snprintf(p, sizeof p, "%s%s", path, suffixes[i]);
        if (stat(p, &sb) == 0)
            n += sb.st_size;
    }
    return n;
}

static void cleanup(void)
{
    store_close();
    rmdir(dir);
}

const struct recv_ingest_ctx *cis_fuzz_ingest_ctx(const char *identity_name)
{
    if (st != NULL) {
        /* Accepted batches add a few MB a minute: a long run would fill the memory. */
        if (++calls % CHECK_EVERY == 0 && store_size() > STORE_MAX_BYTES) {
            store_close();
            store_open();
        }
        return &ctx;
    }
    /* Quiet: the ingest logs every rejected batch at debug and a failing store at warn. */
    cis_log_set_level(CIS_LOG_ERROR);
    snprintf(dir, sizeof dir, "%s/cistern-fuzz.XXXXXX",
             access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp");
    if (mkdtemp(dir) == NULL) {
        perror("fuzz: mkdtemp");
        abort();
    }
    snprintf(path, sizeof path, "%s/store.db", dir);
    /* The receiver's defaults (configs/receiver.yaml) scaled down so that one input cannot make
     * the fuzzer spend seconds or hundreds of MiB: the checks are the same, only the numbers
     * differ. */
    ctx = (struct recv_ingest_ctx){
        .ops = &recv_store_sqlite,
        .max_body = 1 << 20,
        .limits = {.max_decompressed = 4 << 20, .max_records = 10000},
        .identity_name = identity_name,
    };
    store_open();
    atexit(cleanup);
    return &ctx;
}

long long cis_fuzz_store_version(void)
{
    sqlite3_stmt *s = NULL;
    long long v;

    if (st == NULL)
        abort(); /* cis_fuzz_ingest_ctx first */
    if (sqlite3_prepare_v2(probe, "PRAGMA data_version", -1, &s, NULL) != SQLITE_OK ||
        sqlite3_step(s) != SQLITE_ROW) {
        fprintf(stderr, "fuzz: PRAGMA data_version: %s\n", sqlite3_errmsg(probe));
        abort();
    }
    v = sqlite3_column_int64(s, 0);
    sqlite3_finalize(s);
    return v;
}

/* Fuzz helpers: a SQLite store on tmpfs for the process, started afresh when it grows large,
 * removed at exit. */
#include "fuzz_store.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <sqlite3.h>

#include <cistern/err.h>
#include <cistern/log.h>
#include <cistern/sign.h>

#include "fuzz_seeds.h"
#include "registry.h"
#include "store/store.h"

#ifndef STORE_MAX_BYTES
#define STORE_MAX_BYTES (32 << 20) /* database + WAL: then a fresh store (tmpfs is memory) */
#endif
#define CHECK_EVERY 4096           /* calls between two looks at the size */

static char dir[64], path[128], secret_path[128];
static struct recv_store *st;
static struct recv_registry *reg;
static struct cis_signer *signer;
static struct recv_ingest_ctx ctx;
static sqlite3 *probe; /* ours, read-only: sees the store's commits as another connection */
static unsigned long calls;

static const char *const suffixes[] = {"", "-wal", "-shm"};

static void store_close(void)
{
    char p[160];

    sqlite3_close(probe);
    probe = NULL;
    recv_registry_free(reg);
    reg = NULL;
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
    for (int i = 0; i < 2; i++) {
        struct recv_device d = {.enabled = 1, .has_fpr = 1};
        snprintf(d.id, sizeof d.id, "%s", i ? SEED_AGENT_2 : SEED_AGENT);
        memcpy(d.secret, SEED_SECRET, strlen(SEED_SECRET));
        d.secret_len = strlen(SEED_SECRET);
        if (cis_fpr_parse(SEED_KEY_FPR, d.fpr) != 0 ||
            recv_store_sqlite.device_put(st, &d, 1, 1) != 0) {
            fprintf(stderr, "fuzz: cannot register %s\n", d.id);
            abort();
        }
    }
    if (recv_registry_new(&recv_store_sqlite, st, RECV_REGISTRY_TTL_MS, &reg) != 0)
        abort();
    ctx.st = st;
    ctx.reg = reg;
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
    cis_signer_free(signer);
    unlink(secret_path);
    rmdir(dir);
}

int cis_fuzz_wrap(const char *agent, const uint8_t *batch, size_t len, uint8_t **out,
                  size_t *out_len)
{
    if (signer == NULL)
        abort(); /* cis_fuzz_ingest_ctx first */
    return cis_signer_wrap(signer, agent, batch, len, out, out_len);
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
    snprintf(secret_path, sizeof secret_path, "%s/secret", dir);
    {
        FILE *f = fopen(secret_path, "w");
        char err[256];
        if (f == NULL || fputs(SEED_SECRET, f) < 0 || fclose(f) != 0 ||
            chmod(secret_path, 0600) != 0 ||
            cis_signer_open_hmac(secret_path, &signer, err, sizeof err) != 0) {
            fprintf(stderr, "fuzz: cannot make the signer\n");
            abort();
        }
    }
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

int cis_fuzz_body(const uint8_t *p, size_t n, uint8_t **body, size_t *len)
{
    char agent[256];
    size_t l;

    *body = NULL;
    *len = 0;
    if (n == 0)
        return -1;
    if (p[0] == SEED_BODY_WRAP) {
        if (n < 2 || (l = p[1]) + 2 > n)
            return -1;
        memcpy(agent, p + 2, l);
        agent[l] = '\0';
        return cis_fuzz_wrap(agent, p + 2 + l, n - 2 - l, body, len) == 0 ? 0 : -1;
    }
    *len = n - 1;
    *body = malloc(*len ? *len : 1);
    if (*body == NULL)
        return -1;
    memcpy(*body, p + 1, *len);
    return 0;
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

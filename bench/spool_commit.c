/* What the agent's group commit costs per record: agent_spool_commit() (encode, zstd, CRC-32C,
 * INSERT, COMMIT) on a real spool, with the product's spool defaults (sync normal, 512 MiB
 * max_size, 64 MiB WAL cap), for COMMITS commits of RECORDS ~100-byte JSON records each.
 *
 * Prints per run: ns per record of the commits only, as CPU time of this process (user + system:
 * less disturbed by other processes on a shared machine) and as wall-clock time; bytes stored
 * per record and the zstd ratio; then the medians over RUNS. Each run uses a fresh spool in
 * DIR.
 *
 * For instructions per record, run it under callgrind counting only the commits:
 *   valgrind --tool=callgrind --toggle-collect=agent_spool_commit \
 *       BUILD/bench/spool_commit 1000 50 1 3
 * and divide the total Ir by RECORDS x COMMITS (the driver prints that product).
 *
 * Usage: spool_commit [RECORDS (1000)] [COMMITS (200)] [RUNS (3)] [ZSTD_LEVEL (3)] [DIR (/var/tmp)]
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <sqlite3.h>

#include "cistern/codec.h"
#include "cistern/err.h"
#include "spool.h"

static double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static double cpu_ns(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1e9 +
           (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1e3;
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void die(const char *what)
{
    fprintf(stderr, "spool_commit: %s\n", what);
    exit(1);
}

static unsigned long arg(int argc, char **argv, int i, unsigned long def)
{
    if (argc <= i)
        return def;
    char *end = NULL;
    unsigned long v = strtoul(argv[i], &end, 10);
    if (!end || *end || v == 0) {
        fprintf(stderr, "usage: spool_commit [RECORDS] [COMMITS] [RUNS] [ZSTD_LEVEL] [DIR]\n");
        exit(2);
    }
    return v;
}

int main(int argc, char **argv)
{
    size_t nrec = arg(argc, argv, 1, 1000);
    size_t ncommit = arg(argc, argv, 2, 200);
    size_t runs = arg(argc, argv, 3, 3);
    int level = (int)arg(argc, argv, 4, 3);
    const char *base = argc > 5 ? argv[5] : "/var/tmp";
    if (runs > 99)
        die("at most 99 runs");

    /* Records like the demo input's, with a few more fields: about 100 bytes of JSON each,
     * deterministic (xorshift64). */
    size_t total = nrec * ncommit;
    char(*pay)[128] = malloc(total * sizeof(*pay));
    struct cis_record *recs = calloc(nrec, sizeof(*recs));
    uint32_t *prio = calloc(nrec, sizeof(*prio));
    int64_t *ttl = calloc(nrec, sizeof(*ttl));
    size_t *plen = malloc(total * sizeof(*plen));
    if (!pay || !recs || !prio || !ttl || !plen)
        die("out of memory");
    uint64_t r = 0x9E3779B97F4A7C15ULL;
    size_t payload_bytes = 0;
    for (size_t i = 0; i < total; i++) {
        r ^= r << 13;
        r ^= r >> 7;
        r ^= r << 17;
        int n = snprintf(pay[i], sizeof(pay[i]),
                         "{\"sensor\":\"s-%03zu\",\"n\":%zu,\"temp_c\":%.2f,\"humidity\":%.1f,"
                         "\"site\":\"plant-7\",\"line\":%u,\"ok\":true}",
                         i % 16, i, 18.0 + (double)(r % 800) / 100.0,
                         40.0 + (double)((r >> 16) % 300) / 10.0, (unsigned)((r >> 32) % 8));
        plen[i] = (size_t)n;
        payload_bytes += (size_t)n;
    }
    for (size_t i = 0; i < nrec; i++)
        prio[i] = CIS_PRIO_NORMAL;

    printf("spool_commit: %zu commits of %zu records (%.1f B payload/record), zstd level %d, "
           "%zu run(s), spool in %s; records measured per run: %zu\n",
           ncommit, nrec, (double)payload_bytes / (double)total, level, runs, base, total);
    double per[100], cpu[100];
    for (size_t run = 0; run < runs; run++) {
        char dir[256], path[300], err[256] = "";
        snprintf(dir, sizeof(dir), "%s/cistern-spool-commit-XXXXXX", base);
        if (!mkdtemp(dir))
            die("mkdtemp failed (is DIR writable?)");
        snprintf(path, sizeof(path), "%s/spool.db", dir);
        struct agent_spool_opts o = {.path = path, .sync_full = 0, .zstd_level = level,
                                     .max_size = 512ULL << 20, .wal_max_size = 64ULL << 20};
        struct agent_spool *s = NULL;
        if (agent_spool_open(&o, &s, err, sizeof(err)) != 0) {
            fprintf(stderr, "spool_commit: open: %s\n", err);
            return 1;
        }
        double t = 0, tc = 0;
        for (size_t c = 0; c < ncommit; c++) {
            for (size_t i = 0; i < nrec; i++) {
                size_t k = c * nrec + i;
                recs[i] = (struct cis_record){.ts_ms = 1700000000000LL + (int64_t)k,
                                              .stream = "apps",
                                              .content_type = "application/json",
                                              .payload = (const uint8_t *)pay[k],
                                              .payload_len = plen[k]};
            }
            double t0 = now_ns(), c0 = cpu_ns();
            int rc = agent_spool_commit(s, recs, prio, ttl, nrec);
            tc += cpu_ns() - c0;
            t += now_ns() - t0;
            if (rc != 0) {
                fprintf(stderr, "spool_commit: commit %zu failed: %s\n", c, cis_strerror(rc));
                return 1;
            }
            if (recs[nrec - 1].seq != (uint64_t)(c + 1) * nrec)
                die("a commit returned unexpected seqs");
        }
        struct agent_spool_stats st;
        agent_spool_stats(s, &st);
        agent_spool_close(s);
        if (st.pending_records != total)
            die("the spool does not hold every committed record");
        uint64_t stored = st.prio[CIS_PRIO_NORMAL].bytes;
        /* the raw (encoded, uncompressed) size, from the spool itself */
        sqlite3 *db = NULL;
        sqlite3_stmt *q = NULL;
        int64_t raw = 0;
        if (sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL) == SQLITE_OK &&
            sqlite3_prepare_v2(db, "SELECT sum(raw_size) FROM segments", -1, &q, NULL) ==
                SQLITE_OK &&
            sqlite3_step(q) == SQLITE_ROW)
            raw = sqlite3_column_int64(q, 0);
        sqlite3_finalize(q);
        sqlite3_close(db);
        char f[320];
        const char *sfx[] = {"", "-wal", "-shm"};
        for (int i = 0; i < 3; i++) {
            snprintf(f, sizeof(f), "%s%s", path, sfx[i]);
            unlink(f);
        }
        rmdir(dir);
        per[run] = t / (double)total;
        cpu[run] = tc / (double)total;
        printf("run %zu: %.0f ns CPU/record, %.0f ns wall/record (%.2f M records/s in commits), "
               "stored %.1f B/record, encoded %.1f B/record, zstd %.2fx\n",
               run + 1, cpu[run], per[run], 1e3 / per[run], (double)stored / (double)total,
               (double)raw / (double)total, stored ? (double)raw / (double)stored : 0.0);
    }
    qsort(per, runs, sizeof(per[0]), cmp);
    qsort(cpu, runs, sizeof(cpu[0]), cmp);
    printf("median: %.0f ns CPU/record, %.0f ns wall/record\n", cpu[runs / 2], per[runs / 2]);
    printf("RESULT spool_commit cpu_ns_per_record %.0f\n", cpu[runs / 2]);
    printf("RESULT spool_commit wall_ns_per_record %.0f\n", per[runs / 2]);
    free(pay);
    free(plen);
    free(recs);
    free(prio);
    free(ttl);
    return 0;
}

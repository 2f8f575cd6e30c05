/* What signing costs per batch, against what the batch costs anyway, in the same run.
 *
 * Builds batches as the agent does (records -> zstd segments -> Batch), then times, per batch:
 *   baseline  encode the Batch (the agent's work without signing) and decode it with the
 *             receiver's checks and decompression (the receiver's work without verifying);
 *   signing   cis_signer_wrap (ECDSA P-256, HMAC-SHA256) at the agent, and
 *             cis_envelope_decode + cis_envelope_verify at the receiver.
 * Prints medians over RUNS batches, and the signing cost as a fraction of the baseline.
 *
 * Usage: sign_cost [RECORDS_PER_BATCH (5000)] [RUNS (21)]      (run from any directory) */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cistern/codec.h>
#include <cistern/err.h>
#include <cistern/sign.h>

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp);
    return v[n / 2];
}

static void die(const char *what)
{
    fprintf(stderr, "sign_cost: %s\n", what);
    exit(1);
}

int main(int argc, char **argv)
{
    size_t nrec = argc > 1 ? strtoul(argv[1], NULL, 10) : 5000;
    int runs = argc > 2 ? atoi(argv[2]) : 21;
    char dir[] = "/tmp/cistern-sign-cost-XXXXXX", key[64], secret[64], cmd[256], err[256];
    struct cis_record *recs = calloc(nrec, sizeof *recs);
    char (*payloads)[112] = calloc(nrec, sizeof *payloads);
    struct cis_signer *ec = NULL, *hm = NULL;
    struct cis_segment seg;
    uint8_t *data = NULL, *batch = NULL, fpr[CIS_FPR_LEN];
    size_t dlen = 0, blen = 0;
    double *t[5];
    const char *names[5] = {"baseline: encode + decode the batch", "ECDSA sign (agent)",
                            "ECDSA decode + verify (receiver)", "HMAC sign (agent)",
                            "HMAC decode + verify (receiver)"};

    if (!recs || !payloads || runs < 1 || nrec < 1 || !mkdtemp(dir))
        die("setup");
    for (int i = 0; i < 5; i++)
        if (!(t[i] = calloc((size_t)runs, sizeof(double))))
            die("oom");
    snprintf(key, sizeof key, "%s/k.pem", dir);
    snprintf(secret, sizeof secret, "%s/s", dir);
    snprintf(cmd, sizeof cmd,
             "openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out %s", key);
    if (system(cmd) != 0)
        die("openssl genpkey");
    {
        FILE *f = fopen(secret, "w");
        if (!f || fputs("0123456789abcdef0123456789abcdef0123456789", f) < 0 || fclose(f))
            die("secret");
        chmod(secret, 0600);
    }
    if (cis_signer_open_ecdsa(key, &ec, err, sizeof err) || cis_signer_open_hmac(secret, &hm, err, sizeof err) ||
        cis_fpr_of_file(key, fpr, err, sizeof err))
        die(err);

    /* Sensor-like JSON of about 100 bytes, as bench/e2e.py sends. */
    for (size_t i = 0; i < nrec; i++) {
        snprintf(payloads[i], sizeof payloads[i],
                 "{\"sensor\":\"s-%03zu\",\"seq\":%zu,\"t\":%.2f,\"h\":%.1f,\"ok\":true,"
                 "\"site\":\"plant-7\"}", i % 97, i, 20.0 + (double)(i % 50) / 10, 40.0 + (double)(i % 30));
        recs[i] = (struct cis_record){.seq = 1 + i, .ts_ms = 1700000000000 + (int64_t)i,
                                      .stream = "apps", .payload = (const uint8_t *)payloads[i],
                                      .payload_len = strlen(payloads[i])};
    }
    if (cis_segment_encode(recs, nrec, 1, 3, &seg, &data, &dlen))
        die("segment");
    seg.data = data;
    seg.data_len = dlen;
    struct cis_batch_meta meta = {.agent_id = "gw-bench", .epoch = 42, .created_ms = 1};
    struct cis_decode_limits lim = {.max_decompressed = 64 << 20, .max_records = 1000000};

    for (int r = 0; r < runs; r++) {
        struct cis_decoded_batch dec;
        struct cis_envelope e;
        uint8_t *env;
        size_t elen;
        double a = now_ms();

        free(batch);
        if (cis_batch_encode(&meta, &seg, 1, &batch, &blen) ||
            cis_batch_decode(batch, blen, &lim, &dec, err, sizeof err))
            die("batch");
        cis_batch_free(&dec);
        t[0][r] = now_ms() - a;
        for (int alg = 0; alg < 2; alg++) {
            struct cis_signer *s = alg ? hm : ec;
            a = now_ms();
            if (cis_signer_wrap(s, "gw-bench", batch, blen, &env, &elen))
                die("wrap");
            t[1 + 2 * alg][r] = now_ms() - a;
            a = now_ms();
            if (cis_envelope_decode(env, elen, &e, err, sizeof err) ||
                cis_envelope_verify(&e, fpr, (const uint8_t *)"0123456789abcdef0123456789abcdef0123456789",
                                    42, err, sizeof err))
                die(err);
            t[2 + 2 * alg][r] = now_ms() - a;
            cis_envelope_free(&e);
            free(env);
        }
    }
    printf("batch: %zu records, %zu bytes on the wire (zstd), %d runs, medians:\n", nrec, blen, runs);
    double base = median(t[0], runs);
    for (int i = 0; i < 5; i++) {
        double m = median(t[i], runs);
        printf("  %-40s %8.3f ms  %5.2fx baseline  (%.2f us/record)\n", names[i], m, m / base,
               m * 1000 / (double)nrec);
    }
    cis_signer_free(ec);
    cis_signer_free(hm);
    unlink(key);
    unlink(secret);
    rmdir(dir);
    free(batch);
    free(data);
    free(recs);
    free(payloads);
    for (int i = 0; i < 5; i++)
        free(t[i]);
    return 0;
}

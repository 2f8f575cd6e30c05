/* libFuzzer target: the receiver's signed envelope (common/sign.c) on untrusted bytes: decode,
 * then verify against a registered key and secret (the ones tests/fuzz/make_seeds.c signs the
 * seeds with, so that mutations of valid envelopes reach the cryptography), and against a
 * registry that holds neither. Input: an envelope as sent. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cistern/err.h>
#include <cistern/sign.h>

#include "fuzz_seeds.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static uint8_t fpr[CIS_FPR_LEN];
    static int ready;
    struct cis_envelope e;
    char why[256];
    volatile size_t sink = 0;
    int rc;

    if (!ready) {
        if (cis_fpr_parse(SEED_KEY_FPR, fpr) != CIS_OK)
            abort();
        ready = 1;
    }
    if (cis_envelope_decode(data, size, &e, why, sizeof why) != CIS_OK)
        return 0;
    /* Touch every byte the envelope points at, so that a view past its buffer shows up under
     * ASan. */
    sink += strlen(e.agent_id);
    for (size_t i = 0; i < e.key_len; i++)
        sink += e.key[i];
    for (size_t i = 0; i < e.sig_len; i++)
        sink += e.sig[i];
    for (size_t i = 0; i < e.batch_len; i++)
        sink += e.batch[i];
    rc = cis_envelope_verify(&e, fpr, (const uint8_t *)SEED_SECRET, strlen(SEED_SECRET), why,
                             sizeof why);
    if (rc != CIS_OK && rc != CIS_EKEY && rc != CIS_EBADSIG && rc != CIS_EDECODE)
        abort(); /* sign.h names every answer */
    /* Nothing registered: never accepted. */
    if (cis_envelope_verify(&e, NULL, NULL, 0, why, sizeof why) != CIS_EKEY)
        abort();
    (void)sink;
    cis_envelope_free(&e);
    return 0;
}

/* libFuzzer target: POST /v1/batches as served (recv_http_batch: Content-Type, size, envelope,
 * identity, registry, signature, decode, check, store in a real SQLite store, status and JSON
 * answer), without the network.
 *
 * Input: [1 byte N][N bytes: the Content-Type header, cut at a NUL; N = 0xff: no header]
 *        [1 byte M][M bytes: the client certificate's CN, cut at a NUL; M = 0: plain HTTP]
 *        [the rest: the body, framed as fuzz_seeds.h says: as sent, or a batch the target
 *        signs with a registered secret so that mutations reach the decoder].
 * Seeds: tests/fuzz/corpus/http_ingest (made by tests/fuzz/make_seeds.c). */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "api.h"
#include "fuzz_store.h"
#include "ingest/http.h"

#define IDENTITY_NAME "certificate CN" /* as recv_http_start says it */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const struct recv_ingest_ctx *ctx = cis_fuzz_ingest_ctx(IDENTITY_NAME);
    char ct[256], id[256];
    const char *ctp = NULL, *idp = NULL;
    struct recv_buf answer;
    uint8_t *body;
    size_t n, m, off;
    long long before;
    int status;

    if (size < 2)
        return 0;
    n = data[0];
    off = 1;
    /* libmicrohttpd hands header values over as C strings. */
    if (n != 0xff) {
        if (off + n >= size)
            return 0;
        memcpy(ct, data + off, n);
        ct[n] = '\0';
        ctp = ct;
        off += n;
    }
    m = data[off++];
    if (off + m > size)
        return 0;
    if (m > 0) {
        memcpy(id, data + off, m);
        id[m] = '\0';
        idp = id[0] != '\0' ? id : NULL; /* an empty CN is refused before the body is read */
        off += m;
    }
    if (cis_fuzz_body(data + off, size - off, &body, &size) != 0)
        return 0;
    before = cis_fuzz_store_version();
    status = recv_http_batch(ctx, ctp, size ? body : NULL, size, idp, &answer);
    if (status != 200 && status != 400 && status != 401 && status != 403 && status != 413 &&
        status != 415 && status != 503)
        abort(); /* not a status the agent's table expects */
    if (status != 200 && cis_fuzz_store_version() != before)
        abort(); /* a refused batch changed the store */
    if (!answer.oom && (answer.p == NULL || answer.len < 2 || answer.p[0] != '{' ||
                        answer.p[answer.len - 1] != '}'))
        abort(); /* every answer is a JSON object */
    recv_buf_free(&answer);
    free(body);
    return 0;
}

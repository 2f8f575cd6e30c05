/* libFuzzer target: the receiver's config loader (libyaml, the key table of recv_config.c, its
 * cross-key checks). Input: a receiver.yaml. Seeds: tests/fuzz/corpus/recv_config. */
#include "fuzz_config.h"
#include "recv_config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct recv_config cfg;

    cis_fuzz_config("receiver.yaml", &recv_config_schema, &cfg, sizeof cfg, data, size);
    return 0;
}

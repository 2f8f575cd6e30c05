/* libFuzzer target: the agent's config loader (libyaml, the key table of agent_config.c, its
 * cross-key checks). Input: an agent.yaml. Seeds: tests/fuzz/corpus/agent_config. */
#include "agent_config.h"
#include "fuzz_config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct agent_config cfg;

    cis_fuzz_config("agent.yaml", &agent_config_schema, &cfg, sizeof cfg, data, size);
    return 0;
}

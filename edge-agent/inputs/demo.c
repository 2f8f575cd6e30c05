/* Input "demo": synthetic sensor readings (JSON) at a fixed rate, for the quick start. */
#include <stdio.h>
#include <stdlib.h>

#include "agent.h"
#include "cistern/backoff.h"
#include "cistern/err.h"
#include "cistern/log.h"

struct demo {
    int64_t start_ms;
    uint64_t made;
    uint64_t rng;
    int stopped;
};

static uint64_t next_rand(struct demo *d)
{
    d->rng ^= d->rng << 13;
    d->rng ^= d->rng >> 7;
    d->rng ^= d->rng << 17;
    return d->rng;
}

static int demo_start(struct agent_input *in)
{
    struct demo *d = calloc(1, sizeof(*d));
    if (!d)
        return CIS_ENOMEM;
    d->start_ms = cis_mono_ms();
    d->rng = (uint64_t)cis_wall_ms() | 1;
    in->priv = d;
    cis_info("[demo] %s: %lld readings/s from %lld sensors", in->cfg->name,
             (long long)in->cfg->rate, (long long)in->cfg->sensors);
    return 0;
}

static int64_t demo_tick(struct agent_input *in, int64_t now)
{
    struct demo *d = in->priv;
    uint64_t due;
    if (d->stopped)
        return -1;
    /* Catch up to where the rate says we should be, a bounded step at a time so one slow
     * commit does not turn into a burst that fills the ingest queue. */
    due = (uint64_t)((now - d->start_ms) * in->cfg->rate / 1000);
    for (int i = 0; d->made < due && i < 10000 && !agent_ingest_full(in->agent); i++) {
        char buf[192];
        uint64_t r = next_rand(d);
        int sensor = (int)(d->made % (uint64_t)in->cfg->sensors);
        int n = snprintf(buf, sizeof(buf),
                         "{\"sensor\":\"s-%03d\",\"n\":%llu,\"temp_c\":%.2f,\"humidity\":%.1f}",
                         sensor, (unsigned long long)d->made, 18.0 + (double)(r % 800) / 100.0,
                         40.0 + (double)((r >> 16) % 300) / 10.0);
        if (agent_ingest_submit(in->agent, in->cfg, (const uint8_t *)buf, (size_t)n, NULL, NULL,
                                0) != 0)
            break;
        d->made++;
    }
    return d->start_ms + (int64_t)((d->made + 1) * 1000 / (uint64_t)in->cfg->rate);
}

static void demo_stop(struct agent_input *in)
{
    struct demo *d = in->priv;
    if (d)
        d->stopped = 1;
}

static int demo_idle(struct agent_input *in)
{
    return 1;
}

static void demo_destroy(struct agent_input *in)
{
    free(in->priv);
    in->priv = NULL;
}

const struct agent_input_ops agent_input_demo = {
    .name = "demo",
    .start = demo_start,
    .tick = demo_tick,
    .stop = demo_stop,
    .idle = demo_idle,
    .destroy = demo_destroy,
};

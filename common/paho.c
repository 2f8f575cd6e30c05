/* An idle Paho client, held while any module uses MQTT: see cistern/paho.h. */
#include <MQTTAsync.h>
#include <pthread.h>

#include "cistern/err.h"
#include "cistern/log.h"
#include "cistern/paho.h"

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static unsigned holds;
static MQTTAsync anchor;

int cis_paho_hold(void)
{
    int rc = 0;
    pthread_mutex_lock(&mu);
    if (holds == 0) {
        /* Never connected, so the URL only has to parse; nothing is persisted. */
        if (MQTTAsync_create(&anchor, "tcp://127.0.0.1:1", "cistern-paho-hold",
                             MQTTCLIENT_PERSISTENCE_NONE, NULL) != MQTTASYNC_SUCCESS) {
            anchor = NULL;
            rc = CIS_ENOMEM;
        }
    }
    if (rc == 0)
        holds++;
    pthread_mutex_unlock(&mu);
    if (rc)
        cis_error("[mqtt] cannot create Paho's idle client: %s", cis_strerror(rc));
    return rc;
}

void cis_paho_release(void)
{
    pthread_mutex_lock(&mu);
    if (holds > 0 && --holds == 0 && anchor)
        MQTTAsync_destroy(&anchor);
    pthread_mutex_unlock(&mu);
}

/* The agent's configuration: one struct, filled from YAML by the table in agent_config.c. */
#ifndef AGENT_CONFIG_H
#define AGENT_CONFIG_H

#include <stdint.h>

#include "cistern/config.h"

enum agent_input_type { AGENT_INPUT_SOCKET = 0, AGENT_INPUT_DEMO = 1, AGENT_INPUT_MQTT = 2 };
enum agent_transport { AGENT_TRANSPORT_HTTPS = 0, AGENT_TRANSPORT_MQTT = 1 };
enum agent_sign { AGENT_SIGN_ECDSA = 0, AGENT_SIGN_HMAC = 1 };
enum agent_mqtt_ack { AGENT_MQTT_ACK_END_TO_END = 0, AGENT_MQTT_ACK_BROKER = 1 };
enum agent_input_ack { AGENT_INPUT_ACK_AFTER_COMMIT = 0, AGENT_INPUT_ACK_ON_ARRIVAL = 1 };
enum agent_sync { AGENT_SYNC_NORMAL = 0, AGENT_SYNC_FULL = 1 };
enum agent_when_full { AGENT_WHEN_FULL_DROP_OLDEST = 0, AGENT_WHEN_FULL_REJECT_NEW = 1 };

struct agent_input_cfg {
    char *name;
    int type;     /* enum agent_input_type */
    int priority; /* enum cis_priority */
    int64_t ttl_ms; /* 0: records never expire */
    char *content_type;
    /* socket */
    char *path;
    char *listen;
    uint64_t max_line;
    /* demo */
    int64_t rate;
    int64_t sensors;
    /* mqtt: a local broker */
    char *url;                /* tcp://127.0.0.1:1883, or ssl://... */
    struct cis_strlist topics; /* topic filters */
    int64_t qos;              /* 0 or 1 */
    char *client_id;          /* NULL: "<agent.id>-<name>" */
    char *username;
    char *password;
    char *ca_file, *cert_file, *key_file; /* for ssl:// */
    int64_t session_expiry_ms;
    int ack; /* enum agent_input_ack: when the broker gets its PUBACK */
};

struct agent_config {
    char *id;
    int log_level;
    int64_t stats_interval_ms;

    char *spool_path;
    int sync; /* enum agent_sync */
    int64_t commit_interval_ms;
    int64_t commit_max_records;
    uint64_t commit_max_bytes;
    int64_t compression_level;
    uint64_t spool_max_size;
    int when_full; /* enum agent_when_full */
    uint64_t wal_max_size;
    char *encryption_key_file;
    char *status_socket; /* control socket `status` asks; "" disables */

    struct cis_maplist inputs; /* struct agent_input_cfg items */

    int transport; /* enum agent_transport */
    char *url;     /* https://host:port/path, or for mqtt ssl://host:port (mqtts:// too) */
    char *ca_file;
    char *cert_file;
    char *key_file;
    char *token;
    int sign_method;        /* enum agent_sign */
    char *sign_key_file;    /* NULL: key_file */
    char *sign_hmac_secret_file;
    int64_t batch_max_records;
    uint64_t batch_max_bytes;
    int64_t batch_max_delay_ms;
    int64_t in_flight;
    int64_t timeout_ms;
    int64_t retry_initial_ms;
    int64_t retry_max_ms;
    int64_t retry_unreachable_max_ms;
    int64_t shutdown_timeout_ms;

    /* forward.mqtt */
    char *mqtt_topic_prefix;
    int mqtt_ack; /* enum agent_mqtt_ack */
    char *mqtt_client_id; /* NULL: agent.id */
    char *mqtt_username;
    char *mqtt_password;
    int64_t mqtt_keepalive_ms;
    int64_t mqtt_session_expiry_ms;
};

extern const struct cis_cfg_schema agent_config_schema;

/* Load and check FILE into CFG (zeroed by the caller). Returns 0, or CIS_ECONFIG/CIS_EIO
 * with "FILE:LINE:COL: key: what is wrong" in ERR. Free with agent_config_free(). */
int agent_config_load(const char *file, struct agent_config *cfg, char *err, size_t errlen);
void agent_config_free(struct agent_config *cfg);

static inline struct agent_input_cfg *agent_config_input(const struct agent_config *cfg, size_t i)
{
    return &((struct agent_input_cfg *)cfg->inputs.items)[i];
}

#endif

/* Receiver configuration: the struct every key of receiver.yaml lands in, and its schema. */
#ifndef RECV_CONFIG_H
#define RECV_CONFIG_H

#include <stddef.h>
#include <stdint.h>

#include <cistern/config.h>

enum recv_store_type { RECV_STORE_SQLITE = 0, RECV_STORE_POSTGRES = 1 };
enum recv_sync { RECV_SYNC_NORMAL = 0, RECV_SYNC_FULL = 1 };

struct recv_config {
    int log_level;              /* enum cis_log_level */
    char *listen_http;          /* host:port; NULL when unset (then mqtt_url is set) */
    char *tls_cert_file;        /* required unless insecure_plain_http */
    char *tls_key_file;         /* required unless insecure_plain_http */
    char *tls_client_ca_file;   /* required unless insecure_plain_http */
    int insecure_plain_http;
    char *listen_api;           /* optional plain GET-only listener, NULL when unset */
    int store_type;             /* enum recv_store_type */
    char *store_path;
    int store_sync;             /* enum recv_sync */
    uint64_t max_body;
    uint64_t max_decompressed;
    int64_t max_records;
    int64_t max_connections;
    int64_t connection_timeout_ms;  /* idle: no byte either way for this long closes it */
    uint64_t max_header_size;       /* per-connection memory for the request line and headers */
    int64_t max_connections_per_ip; /* 0: no per-address limit */
    int64_t request_timeout_ms;     /* whole request, from accept or the previous answer */
    int64_t rate;                   /* batches per second per client certificate CN; 0: off */
    int64_t rate_burst;             /* batches one CN may send at once before the rate applies */
    /* mqtt: ingest from a broker on a shared subscription; off while mqtt_url is NULL */
    char *mqtt_url;             /* ssl://host:8883 or mqtts://host:8883 */
    char *mqtt_group;           /* shared subscription group */
    char *mqtt_topic_prefix;    /* batches arrive on <prefix>/<agent_id>/batch */
    char *mqtt_client_id;       /* required with mqtt_url: one persistent session per receiver */
    char *mqtt_ca_file;         /* NULL: the system's CAs */
    char *mqtt_cert_file;       /* client certificate and key, together or neither */
    char *mqtt_key_file;
    char *mqtt_username;
    char *mqtt_password;
    int64_t mqtt_keepalive_ms;
    int64_t mqtt_session_expiry_ms;
};

/* The schema of receiver.yaml (keys, types, defaults, help, cross-key check). */
extern const struct cis_cfg_schema recv_config_schema;

/* Load FILE into CFG (zeroed by this function). Returns 0, or CIS_ECONFIG / CIS_EIO with
 * "FILE:LINE:COL: key: what" in ERR. Caller releases CFG with recv_config_free(). */
int recv_config_load(const char *file, struct recv_config *cfg, char *err, size_t errlen);

/* Free what recv_config_load() allocated inside CFG. Accepts a zeroed CFG. */
void recv_config_free(struct recv_config *cfg);

#endif

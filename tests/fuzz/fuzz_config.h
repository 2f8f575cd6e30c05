/* The body of the two config targets: load bytes as YAML against a schema, check the loader's
 * contract, free. */
#ifndef CIS_FUZZ_CONFIG_H
#define CIS_FUZZ_CONFIG_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cistern/config.h>
#include <cistern/err.h>
#include <cistern/log.h>

/* Load DATA as the file NAME against SCHEMA into OBJ (OBJSIZE bytes), as the binaries do
 * (cis_config_load reads the file, then calls cis_config_load_string). Aborts when the
 * contract of cis_config_load is broken: an error must say "NAME:..." and leave OBJ zeroed. */
static inline void cis_fuzz_config(const char *name, const struct cis_cfg_schema *schema,
                                   void *obj, size_t objsize, const uint8_t *data, size_t size)
{
    char err[1024];
    size_t nlen = strlen(name);
    /* A copy in a buffer of its own size, so that ASan sees any read past the input. */
    char *yaml = malloc(size ? size : 1);
    int rc;

    if (yaml == NULL)
        return;
    memcpy(yaml, data, size);
    memset(obj, 0, objsize);
    rc = cis_config_load_string(name, yaml, size, schema, obj, err, sizeof err);
    if (rc != 0) {
        const unsigned char *p = obj;
        if (rc != CIS_ECONFIG && rc != CIS_ENOMEM)
            abort(); /* only these two come from memory */
        if (strncmp(err, name, nlen) != 0 || err[nlen] != ':' || err[nlen + 1] == '\0')
            abort(); /* every error names the file */
        for (size_t i = 0; i < objsize; i++)
            if (p[i] != 0)
                abort(); /* a failed load leaves the struct freed and zeroed */
    }
    cis_config_free(schema, obj);
    free(yaml);
}

#endif

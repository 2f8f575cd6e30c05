/* placeholder: being written */
typedef int cis_placeholder_t;

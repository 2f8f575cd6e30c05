/* `cistern-receiver device ...`: the operator's commands on the device registry held in the
 * receiver's store (add, list, show, revoke, enable). They open the store named by the
 * receiver's configuration, alongside running receivers, which apply a change within
 * RECV_REGISTRY_TTL_MAX_MS (registry.h). */
#ifndef RECV_DEVICE_CMD_H
#define RECV_DEVICE_CMD_H

/* Run the command in ARGV (ARGV[0] is "device", ARGV[1] the subcommand) against the store of
 * the receiver configuration CONFIG_PATH. Prints results on stdout, errors on stderr.
 * Returns the exit status: 0 done, 1 failed (nothing changed), 2 bad usage. */
int recv_device_main(const char *config_path, int argc, char **argv);

#endif

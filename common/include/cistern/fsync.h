/* Making a file's or a directory entry's creation survive a power cut. */
#ifndef CISTERN_FSYNC_H
#define CISTERN_FSYNC_H

/* fsync PATH (a directory when DIR is non-zero). Returns 0, or -1 with errno set. */
int cis_fsync_path(const char *path, int dir);

/* fsync the directory holding PATH, so that a name just created or renamed into it survives
 * a power cut. Returns 0, or -1 with errno set. */
int cis_fsync_parent(const char *path);

#endif

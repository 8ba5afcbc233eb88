/* The program's mount namespace: the host read-only, private tmpfs for /tmp (the working
 * directory), /dev/shm and /run, a /proc of the sandbox's pid namespace only, and the
 * interpreter's prefix bound read-only at /tmp/python (a Python under a private home still runs).
 * Everything here vanishes with the namespace. Works as root and as the owner of a user
 * namespace; there, the flags the kernel locks on inherited mounts are carried over unchanged.
 */
#include "sandbox.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#define MAX_MOUNTS 1024

static int by_length(const void *a, const void *b) {
    size_t la = strlen(*(char *const *)a), lb = strlen(*(char *const *)b);
    return la < lb ? -1 : la > lb;
}

/* Undoes mountinfo's octal escapes (\040 for a space) in place. */
static void unescape(char *s) {
    char *out = s;
    for (; *s; s++) {
        if (s[0] == '\\' && s[1] >= '0' && s[1] <= '3' && s[2] && s[3]) {
            *out++ = (char)(((s[1] - '0') << 6) | ((s[2] - '0') << 3) | (s[3] - '0'));
            s += 3;
        } else {
            *out++ = *s;
        }
    }
    *out = '\0';
}

/* Mount points of this namespace, shortest first (parents before children); caller frees. */
static int list_mounts(char **points, int max) {
    FILE *f = fopen("/proc/self/mountinfo", "re");
    if (!f) return -1;
    char line[8192];
    int n = 0;
    while (n < max && fgets(line, sizeof(line), f)) {
        char *field = strtok(line, " ");
        for (int i = 0; field && i < 4; i++) field = strtok(NULL, " ");  /* the 5th field */
        if (!field) continue;
        unescape(field);
        int seen = 0;
        for (int i = 0; i < n && !seen; i++) seen = strcmp(points[i], field) == 0;
        if (!seen) points[n++] = strdup(field);
    }
    fclose(f);
    qsort(points, n, sizeof(char *), by_length);
    return n;
}

/* statvfs flags -> the MS_ flags that a read-only bind remount must repeat. */
static unsigned long kept_flags(unsigned long st) {
    static const unsigned long map[][2] = {
        {ST_RDONLY, MS_RDONLY}, {ST_NOSUID, MS_NOSUID}, {ST_NODEV, MS_NODEV}, {ST_NOEXEC, MS_NOEXEC},
        {ST_NOATIME, MS_NOATIME}, {ST_NODIRATIME, MS_NODIRATIME}, {ST_RELATIME, MS_RELATIME},
    };
    unsigned long ms = 0;
    for (size_t i = 0; i < sizeof(map) / sizeof(map[0]); i++)
        if (st & map[i][0]) ms |= map[i][1];
    return ms;
}

static int remount_all_read_only(char *err, size_t err_len) {
    char *points[MAX_MOUNTS];
    int n = list_mounts(points, MAX_MOUNTS), rc = 0;
    if (n < 0) {
        snprintf(err, err_len, "reading /proc/self/mountinfo: %s", strerror(errno));
        return -1;
    }
    for (int i = 0; i < n; i++) {
        struct statvfs sv;
        int root = strcmp(points[i], "/") == 0;
        /* Unreachable points (hidden under another mount, or not ours to stat) stay as they are. */
        if (rc == 0 && statvfs(points[i], &sv) == 0 && (root || !(sv.f_flag & ST_RDONLY))) {
            unsigned long flags = MS_REMOUNT | MS_BIND | MS_RDONLY | kept_flags(sv.f_flag);
            if (mount(NULL, points[i], NULL, flags, NULL) != 0 && root) {
                snprintf(err, err_len, "remounting / read-only: %s", strerror(errno));
                rc = -1;
            }
        }
        free(points[i]);
    }
    return rc;
}

static int write_code(const char *path, const char *code, size_t len, long uid) {
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) return -1;
    for (size_t done = 0; done < len;) {
        ssize_t w = write(fd, code + done, len - done);
        if (w <= 0) {
            close(fd);
            return -1;
        }
        done += (size_t)w;
    }
    close(fd);
    return uid >= 0 ? chown(path, (uid_t)uid, (gid_t)uid) : 0;
}

/* Binds the interpreter's prefix at /tmp/python; `prefix_fd` was opened before /tmp was covered. */
static int bind_prefix(const struct config *c, int prefix_fd, char *exe, size_t exe_len) {
    char src[64];
    snprintf(src, sizeof(src), "/proc/self/fd/%d", prefix_fd);
    if (mkdir("/tmp/python", 0755) != 0 || mount(src, "/tmp/python", NULL, MS_BIND | MS_REC, NULL) != 0
        || mount(NULL, "/tmp/python", NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, NULL) != 0)
        return -1;
    close(prefix_fd);
    size_t plen = strlen(c->prefix);
    snprintf(exe, exe_len, "/tmp/python%s", c->python + plen);  /* python lies under prefix */
    return 0;
}

#define FAIL(...) do { snprintf(err, err_len, __VA_ARGS__); return -1; } while (0)

int setup_mounts(const struct config *c, const char *code, size_t code_len, long uid,
                 char *exe, size_t exe_len, char *err, size_t err_len) {
    char opts[128];
    int prefix_fd = c->prefix[0] ? open(c->prefix, O_PATH | O_DIRECTORY | O_CLOEXEC) : -1;
    if (c->prefix[0] && prefix_fd < 0) FAIL("opening prefix %s: %s", c->prefix, strerror(errno));
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0)  /* nothing propagates to the host */
        FAIL("making / private: %s", strerror(errno));
    if (remount_all_read_only(err, err_len) != 0) return -1;
    snprintf(opts, sizeof(opts), "size=%ldm,nr_inodes=4096,mode=0755", c->tmpfs_mb);
    if (mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, opts) != 0) FAIL("tmpfs on /tmp: %s", strerror(errno));
    snprintf(opts, sizeof(opts), "size=%ldm,mode=1777", c->tmpfs_mb);
    if (access("/dev/shm", F_OK) == 0 && mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, opts) != 0)
        FAIL("tmpfs on /dev/shm: %s", strerror(errno));
    if (access("/run", F_OK) == 0 && mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755") != 0)
        FAIL("tmpfs on /run: %s", strerror(errno));
    if (mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) != 0)
        FAIL("mounting /proc: %s", strerror(errno));
    if (mkdir("/tmp/work", 0700) != 0 || (uid >= 0 && chown("/tmp/work", (uid_t)uid, (gid_t)uid) != 0)
        || write_code("/tmp/work/main.py", code, code_len, uid) != 0)
        FAIL("writing /tmp/work/main.py: %s", strerror(errno));
    snprintf(exe, exe_len, "%s", c->python);
    if (prefix_fd >= 0 && bind_prefix(c, prefix_fd, exe, exe_len) != 0)
        FAIL("binding %s at /tmp/python: %s", c->prefix, strerror(errno));
    return 0;
}

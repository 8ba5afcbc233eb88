/* A cgroup per run: one memory cap and one task cap for the sandbox as a whole.
 *
 * RLIMIT_AS bounds each process, so without a cgroup a program may hold max_processes times
 * memory_mb in all; the cgroup's memory limit bounds the sum, and its OOM killer stops the
 * program inside the sandbox instead of the node's OOM killer choosing a victim outside it.
 *
 * cgroup v2 is used where it is mounted with the memory controller available to our own cgroup
 * (delegated, or we are at its root); otherwise the v1 memory and pids hierarchies (a hybrid
 * host such as this project's machines mounts v2 with no controllers). The run's cgroup is made
 * under the launcher's own cgroup of each hierarchy, named after the launcher's pid, so
 * concurrent runs never share one; the launcher removes it when the program is gone.
 */
#include "sandbox.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static const char *const V2_MOUNTS[] = {"/sys/fs/cgroup", "/sys/fs/cgroup/unified"};

static int write_file(const char *dir, const char *name, const char *value) {
    char path[PATH_MAX + 64];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = write(fd, value, strlen(value));
    int saved = errno;
    close(fd);
    errno = saved;
    return n == (ssize_t)strlen(value) ? 0 : -1;
}

static ssize_t read_file(const char *dir, const char *name, char *buf, size_t len) {
    char path[PATH_MAX + 64];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = read(fd, buf, len - 1);
    close(fd);
    buf[n > 0 ? n : 0] = '\0';
    return n;
}

/* The value of the "key N" line of a flat-keyed cgroup file, 0 if absent. */
static long read_key(const char *dir, const char *name, const char *key) {
    char buf[4096];
    if (read_file(dir, name, buf, sizeof(buf)) <= 0) return 0;
    size_t klen = strlen(key);
    for (char *line = buf; line && *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL)
        if (strncmp(line, key, klen) == 0 && line[klen] == ' ') return strtol(line + klen + 1, NULL, 10);
    return 0;
}

/* Our cgroup path in the hierarchy of `controller` (NULL: the v2 hierarchy) from /proc/self/cgroup. */
static int own_path(const char *controller, char *out, size_t len) {
    FILE *f = fopen("/proc/self/cgroup", "re");
    if (!f) return -1;
    char line[PATH_MAX + 128];
    int found = -1;
    while (found < 0 && fgets(line, sizeof(line), f)) {
        line[strcspn(line, "\n")] = '\0';
        char *ctrls = strchr(line, ':'), *path = ctrls ? strchr(ctrls + 1, ':') : NULL;
        if (!path) continue;
        *path++ = '\0';
        ctrls++;
        int match = controller == NULL ? strcmp(line, "0") == 0 && *ctrls == '\0' : 0;
        for (char *tok = controller ? strtok(ctrls, ",") : NULL; tok && !match; tok = strtok(NULL, ","))
            match = strcmp(tok, controller) == 0;
        if (match && (size_t)snprintf(out, len, "%s", path) < len) found = 0;
    }
    fclose(f);
    return found;
}

static int kill_listed(const char *dir);

/* Removes run cgroups whose launcher is gone: one SIGKILLed (the trainer's backstop) cannot clean
 * up after itself, and its program died with it (PDEATHSIG), so the cgroup is empty or nearly. */
static void remove_stale(const char *parent) {
    DIR *d = opendir(parent);
    if (!d) return;
    struct dirent *e;
    char path[2 * PATH_MAX];
    while ((e = readdir(d)) != NULL) {
        if (strncmp(e->d_name, "prolix-sandbox-", 15) != 0) continue;
        pid_t owner = (pid_t)atol(e->d_name + 15);
        if (owner <= 0 || kill(owner, 0) == 0 || errno != ESRCH) continue;
        snprintf(path, sizeof(path), "%s/%s", parent, e->d_name);
        kill_listed(path);
        rmdir(path);  /* EBUSY while a task is still exiting: the next launcher retries */
    }
    closedir(d);
}

static int make_child(const char *mount, const char *own, char *out) {
    char parent[PATH_MAX];
    snprintf(parent, sizeof(parent), "%s%s", mount, strcmp(own, "/") == 0 ? "" : own);
    remove_stale(parent);
    snprintf(out, PATH_MAX, "%s/prolix-sandbox-%d", parent, (int)getpid());
    return mkdir(out, 0755);
}

static int create_v2(struct cgroup *cg, long memory_mb, long max_tasks) {
    char own[PATH_MAX], parent[2 * PATH_MAX], buf[512], limit[32];
    for (size_t i = 0; i < sizeof(V2_MOUNTS) / sizeof(V2_MOUNTS[0]); i++) {
        snprintf(parent, sizeof(parent), "%s/cgroup.controllers", V2_MOUNTS[i]);
        if (access(parent, R_OK) != 0 || own_path(NULL, own, sizeof(own)) != 0) continue;
        snprintf(parent, sizeof(parent), "%s%s", V2_MOUNTS[i], own);
        if (read_file(parent, "cgroup.controllers", buf, sizeof(buf)) <= 0 || !strstr(buf, "memory")) continue;
        read_file(parent, "cgroup.subtree_control", buf, sizeof(buf));
        /* Fails (EBUSY) where our own cgroup holds processes and is not the root: no v2 then. */
        if (!strstr(buf, "memory") && write_file(parent, "cgroup.subtree_control", "+memory +pids") != 0
            && write_file(parent, "cgroup.subtree_control", "+memory") != 0) continue;
        if (make_child(V2_MOUNTS[i], own, cg->mem) != 0) continue;
        snprintf(limit, sizeof(limit), "%ld", memory_mb << 20);
        int ok = write_file(cg->mem, "memory.max", limit) == 0;
        write_file(cg->mem, "memory.swap.max", "0");  /* absent without swap accounting */
        snprintf(limit, sizeof(limit), "%ld", max_tasks);
        write_file(cg->mem, "pids.max", limit);       /* absent when pids is not delegated */
        if (ok) {
            cg->version = 2;
            return 0;
        }
        rmdir(cg->mem);
    }
    return -1;
}

static int create_v1(struct cgroup *cg, long memory_mb, long max_tasks) {
    char own[PATH_MAX], limit[32];
    if (own_path("memory", own, sizeof(own)) != 0 || make_child("/sys/fs/cgroup/memory", own, cg->mem) != 0)
        return -1;
    snprintf(limit, sizeof(limit), "%ld", memory_mb << 20);
    if (write_file(cg->mem, "memory.limit_in_bytes", limit) != 0) {
        rmdir(cg->mem);
        return -1;
    }
    write_file(cg->mem, "memory.memsw.limit_in_bytes", limit);  /* swap accounting may be off */
    cg->version = 1;
    cg->pids[0] = '\0';
    if (own_path("pids", own, sizeof(own)) == 0 && make_child("/sys/fs/cgroup/pids", own, cg->pids) == 0) {
        snprintf(limit, sizeof(limit), "%ld", max_tasks);
        if (write_file(cg->pids, "pids.max", limit) != 0) {
            rmdir(cg->pids);
            cg->pids[0] = '\0';
        }
    } else {
        cg->pids[0] = '\0';
    }
    return 0;
}

int cgroup_create(struct cgroup *cg, long memory_mb, long max_tasks) {
    memset(cg, 0, sizeof(*cg));
    if (create_v2(cg, memory_mb, max_tasks) == 0 || create_v1(cg, memory_mb, max_tasks) == 0) return 0;
    cg->version = 0;
    return -1;
}

/* Moves the calling process into the run's cgroup ("0" names the writer in v1 and v2). */
int cgroup_join(const struct cgroup *cg) {
    if (cg->version == 0) return -1;
    if (write_file(cg->mem, "cgroup.procs", "0") != 0) return -1;
    if (cg->version == 1 && cg->pids[0]) write_file(cg->pids, "cgroup.procs", "0");
    return 0;
}

static int kill_listed(const char *dir) {
    char buf[65536];
    if (read_file(dir, "cgroup.procs", buf, sizeof(buf)) <= 0) return 0;
    int n = 0;
    for (char *tok = strtok(buf, "\n"); tok; tok = strtok(NULL, "\n"), n++) kill((pid_t)atol(tok), SIGKILL);
    return n;
}

/* SIGKILL everything in the cgroup until it is empty (processes may fork while we read the list). */
void cgroup_kill_all(const struct cgroup *cg) {
    if (cg->version == 0) return;
    if (cg->version == 2 && write_file(cg->mem, "cgroup.kill", "1") == 0) return;  /* Linux >= 5.14 */
    struct timespec ms = {0, 1000000};
    for (int i = 0; i < 2000 && kill_listed(cg->mem) > 0; i++) nanosleep(&ms, NULL);
}

void cgroup_stats(const struct cgroup *cg, long *oom_kills, long *pids_refused) {
    *oom_kills = *pids_refused = 0;
    if (cg->version == 2) {
        *oom_kills = read_key(cg->mem, "memory.events", "oom_kill");
        *pids_refused = read_key(cg->mem, "pids.events", "max");
    } else if (cg->version == 1) {
        *oom_kills = read_key(cg->mem, "memory.oom_control", "oom_kill");
        if (cg->pids[0]) *pids_refused = read_key(cg->pids, "pids.events", "max");
    }
}

/* Removes the cgroup once its last (already killed) task has gone: exiting tasks hold it briefly
 * (seconds for one that is freeing gigabytes under memory pressure on a loaded machine). */
void cgroup_destroy(struct cgroup *cg) {
    struct timespec ms = {0, 1000000};
    const char *dirs[2] = {cg->mem, cg->version == 1 ? cg->pids : ""};
    for (int d = 0; d < 2 && cg->version; d++) {
        if (!dirs[d][0]) continue;
        for (int i = 0; i < 5000 && rmdir(dirs[d]) != 0 && errno == EBUSY; i++) {
            kill_listed(dirs[d]);
            nanosleep(&ms, NULL);
        }
    }
    cg->version = 0;
}

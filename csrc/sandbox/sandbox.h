/* prolix-sandbox: the native launcher of prolix.trainer.rewards.sandbox (see launcher.c for the protocol). */
#ifndef PROLIX_SANDBOX_H
#define PROLIX_SANDBOX_H

#include <limits.h>
#include <stddef.h>
#include <sys/types.h>

#define MAX_ENV 16
#define MAX_ISOLATION 12

/* What the trainer asks for; parsed from argv by launcher.c. */
struct config {
    const char *workdir;       /* the trainer's 0700 directory holding main.py */
    long uid;                  /* sandbox uid (root callers), or -1: keep the caller's */
    const char *python;        /* interpreter path as seen from the host */
    const char *prefix;        /* its installation prefix to bind-mount, or "" */
    double timeout;            /* wall-clock seconds */
    long memory_mb;            /* RLIMIT_AS per process and the cgroup cap of the whole sandbox */
    int isolate;               /* try namespaces (and a user namespace when not root) */
    int cgroup;                /* try a per-run cgroup */
    int sweep_first;           /* kill the uid's processes first: its last run did not end cleanly */
    long max_processes;        /* RLIMIT_NPROC under a private uid, and the cgroup's pids.max */
    long nproc_fallback;       /* RLIMIT_NPROC when the caller's uid is shared (no user namespace) */
    long file_mb, open_files, tmpfs_mb;
    const char *boot;          /* python -c text */
    const char *boot_hooked;   /* the same with the audit hook, used when neither netns nor seccomp */
    const char *env[MAX_ENV];  /* KEY=VALUE for the program */
    int n_env;
};

/* The per-run cgroup; version 0 when none could be made. */
struct cgroup {
    int version;               /* 0, 1 or 2 */
    char mem[PATH_MAX];        /* v2: the cgroup; v1: its memory-controller directory */
    char pids[PATH_MAX];       /* v1: its pids-controller directory, "" if none */
};

/* The isolation layers applied, in order, as reported to the trainer. */
struct isolation {
    const char *names[MAX_ISOLATION];
    int n;
};

void isolation_add(struct isolation *iso, const char *name);
int isolation_has(const struct isolation *iso, const char *name);

int sandbox_install_seccomp(void);

int cgroup_create(struct cgroup *cg, long memory_mb, long max_tasks);
int cgroup_join(const struct cgroup *cg);
void cgroup_kill_all(const struct cgroup *cg);
void cgroup_stats(const struct cgroup *cg, long *oom_kills, long *pids_refused);
void cgroup_destroy(struct cgroup *cg);

/* Mount namespace set-up in the program's process; 0 or -1 with `err` filled. */
int setup_mounts(const struct config *c, const char *code, size_t code_len, long uid,
                 char *exe, size_t exe_len, char *err, size_t err_len);

#endif

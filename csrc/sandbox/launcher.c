/* prolix-sandbox: start one untrusted Python program in a throw-away sandbox and report how it ended.
 *
 * The native twin of trainer/rewards/sandbox/launcher.py, with the same protocol:
 *
 *   trainer ──exec(new session)──► prolix-sandbox --key value ... ──fork──► program (pid 1 of a pid ns)
 *           ◄── stdout/stderr: the program's own, inherited ─────────────────┘
 *           ◄── fd $PROLIX_SANDBOX_STATUS_FD: one JSON object (exit status, timeout, isolation)
 *
 * SIGTERM from the trainer (output over its cap) stops the program. Layers, in the order the
 * program's process applies them before exec: the run's cgroup (memory and task cap of the whole
 * sandbox), a mount namespace (see mounts.c), rlimits, the uid drop (root) or the user namespace
 * made by the launcher (not root), no-new-privs, the parent-death signal, the seccomp filter
 * (seccomp.c). The launcher itself keeps the wall clock and, at the end, kills what is left
 * (cgroup, uid, subreaper sweep) and removes the cgroup.
 */
#include "sandbox.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <math.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define REPORT_MAX 4096

void isolation_add(struct isolation *iso, const char *name) {
    if (iso->n < MAX_ISOLATION) iso->names[iso->n++] = name;
}

int isolation_has(const struct isolation *iso, const char *name) {
    for (int i = 0; i < iso->n; i++)
        if (strcmp(iso->names[i], name) == 0) return 1;
    return 0;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* ------------------------------------------------------------------ arguments and the status */

static int parse_args(int argc, char **argv, struct config *c, char *err, size_t err_len) {
    *c = (struct config){.uid = -1, .cgroup = 1, .sweep_first = 1, .prefix = "", .timeout = -1, .memory_mb = -1, .max_processes = 16,
                         .nproc_fallback = -1, .file_mb = 16, .open_files = 64, .tmpfs_mb = 64};
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];
        if (!strcmp(k, "--workdir")) c->workdir = v;
        else if (!strcmp(k, "--uid")) c->uid = atol(v);
        else if (!strcmp(k, "--python")) c->python = v;
        else if (!strcmp(k, "--prefix")) c->prefix = v;
        else if (!strcmp(k, "--timeout")) c->timeout = atof(v);
        else if (!strcmp(k, "--memory-mb")) c->memory_mb = atol(v);
        else if (!strcmp(k, "--isolate")) c->isolate = atoi(v);
        else if (!strcmp(k, "--cgroup")) c->cgroup = atoi(v);
        else if (!strcmp(k, "--sweep-first")) c->sweep_first = atoi(v);
        else if (!strcmp(k, "--max-processes")) c->max_processes = atol(v);
        else if (!strcmp(k, "--nproc-fallback")) c->nproc_fallback = atol(v);
        else if (!strcmp(k, "--file-mb")) c->file_mb = atol(v);
        else if (!strcmp(k, "--open-files")) c->open_files = atol(v);
        else if (!strcmp(k, "--tmpfs-mb")) c->tmpfs_mb = atol(v);
        else if (!strcmp(k, "--boot")) c->boot = v;
        else if (!strcmp(k, "--boot-hooked")) c->boot_hooked = v;
        else if (!strcmp(k, "--env") && c->n_env < MAX_ENV - 4) c->env[c->n_env++] = v;
        else {
            snprintf(err, err_len, "unknown argument %s", k);
            return -1;
        }
    }
    if (!c->workdir || !c->python || !c->boot || !c->boot_hooked || c->timeout <= 0 || c->memory_mb < 1
        || c->nproc_fallback < 1) {
        snprintf(err, err_len, "missing or bad --workdir/--python/--boot/--boot-hooked/--timeout/--memory-mb/"
                 "--nproc-fallback (timeout %g, memory_mb %ld, nproc_fallback %ld)",
                 c->timeout, c->memory_mb, c->nproc_fallback);
        return -1;
    }
    return 0;
}

static void json_string(FILE *f, const char *s) {
    fputc('"', f);
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\') fprintf(f, "\\%c", ch);
        else if (ch < 0x20 || ch >= 0x7f) fprintf(f, "\\u%04x", ch);  /* bytes as code points: readable */
        else fputc(ch, f);
    }
    fputc('"', f);
}

struct status {
    const char *error;         /* NULL: the program ran */
    int has_rc, rc, timed_out, stopped;
    double wall_s;
    long oom_kills, pids_refused;
    char isolation[REPORT_MAX];  /* comma-separated, from the program's report */
};

static void write_status(int fd, const struct status *st) {
    FILE *f = fdopen(fd, "w");
    if (!f) return;
    fputs("{\"error\": ", f);
    if (st->error) json_string(f, st->error);
    else fputs("null", f);
    if (st->has_rc) fprintf(f, ", \"returncode\": %d", st->rc);
    else fputs(", \"returncode\": null", f);
    fprintf(f, ", \"timed_out\": %s, \"stopped\": %s, \"wall_s\": %.4f, \"oom_kills\": %ld, "
            "\"pids_refused\": %ld, \"isolation\": [", st->timed_out ? "true" : "false",
            st->stopped ? "true" : "false", st->wall_s, st->oom_kills, st->pids_refused);
    char iso[REPORT_MAX];
    snprintf(iso, sizeof(iso), "%s", st->isolation);
    int first = 1;
    for (char *tok = strtok(iso, ","); tok; tok = strtok(NULL, ","), first = 0) {
        if (!first) fputs(", ", f);
        json_string(f, tok);
    }
    fputs("]}", f);
    fclose(f);
}

/* ------------------------------------------------------------------ the program's process */

struct child_ctx {
    const struct config *c;
    const struct cgroup *cg;
    struct isolation iso;
    const char *code;
    size_t code_len;
    int report_w, alive_r;
};

static _Noreturn void child_fail(const struct child_ctx *x, const char *fmt, ...) {
    char msg[REPORT_MAX];
    int n = snprintf(msg, sizeof(msg), "ERR ");
    va_list ap;
    va_start(ap, fmt);
    n += vsnprintf(msg + n, sizeof(msg) - n - 1, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof(msg) - 2) n = (int)sizeof(msg) - 2;
    msg[n++] = '\n';
    if (write(x->report_w, msg, n) < 0) _exit(126);
    _exit(127);
}

static void set_limits(const struct child_ctx *x, long nproc) {
    const struct config *c = x->c;
    rlim_t cpu = (rlim_t)ceil(c->timeout) + 1;
    struct { int res; rlim_t soft, hard; } lim[] = {
        {RLIMIT_CPU, cpu, cpu + 1},
        {RLIMIT_AS, (rlim_t)c->memory_mb << 20, (rlim_t)c->memory_mb << 20},
        {RLIMIT_FSIZE, (rlim_t)c->file_mb << 20, (rlim_t)c->file_mb << 20},
        {RLIMIT_NOFILE, (rlim_t)c->open_files, (rlim_t)c->open_files},
        {RLIMIT_NPROC, (rlim_t)nproc, (rlim_t)nproc},
        {RLIMIT_CORE, 0, 0},
    };
    for (size_t i = 0; i < sizeof(lim) / sizeof(lim[0]); i++) {
        struct rlimit r = {lim[i].soft, lim[i].hard};
        if (setrlimit(lim[i].res, &r) != 0) child_fail(x, "setrlimit(%d): %s", lim[i].res, strerror(errno));
    }
}

/* Close everything but 0-2 and the report pipe (close-on-exec, so EOF tells the launcher "exec'd"). */
static void close_other_fds(int keep) {
    if (keep > 3) syscall(SYS_close_range, 3, keep - 1, 0);
    if (syscall(SYS_close_range, keep + 1, ~0U, 0) != 0)
        for (int fd = keep + 1; fd < 65536; fd++) close(fd);
}

static void confine(struct child_ctx *x, char *exe, size_t exe_len, const char **cwd) {
    const struct config *c = x->c;
    char err[REPORT_MAX - 64];
    if (cgroup_join(x->cg) == 0) isolation_add(&x->iso, "cgroup");
    snprintf(exe, exe_len, "%s", c->python);
    *cwd = c->workdir;
    if (isolation_has(&x->iso, "pidns") && unshare(CLONE_NEWNS) == 0) {  /* a fresh /proc needs the pid ns */
        if (setup_mounts(c, x->code, x->code_len, c->uid, exe, exe_len, err, sizeof(err)) != 0)
            child_fail(x, "%s", err);  /* half a mount namespace is worse than none */
        isolation_add(&x->iso, "mountns");
        *cwd = "/tmp/work";
    }
    if (chdir(*cwd) != 0) child_fail(x, "chdir %s: %s", *cwd, strerror(errno));
    /* One uid per sandbox: under a private uid (root) or a user namespace, the count is ours alone.
     * In the user namespace the launcher is counted too. */
    long nproc = c->uid >= 0 ? c->max_processes
               : isolation_has(&x->iso, "userns") ? c->max_processes + 1 : c->nproc_fallback;
    set_limits(x, nproc);
    if (c->uid >= 0) {
        uid_t u = (uid_t)c->uid;
        if (setgroups(0, NULL) != 0 || setresgid(u, u, u) != 0 || setresuid(u, u, u) != 0)
            child_fail(x, "dropping to uid %ld: %s", c->uid, strerror(errno));
        isolation_add(&x->iso, "uid");
    }
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 || prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0)
        child_fail(x, "prctl: %s", strerror(errno));  /* PDEATHSIG after setresuid, which clears it */
    char probe;
    if (read(x->alive_r, &probe, 1) == 0) _exit(1);  /* EOF: the launcher died before PDEATHSIG was armed */
    if (sandbox_install_seccomp() != 0) child_fail(x, "installing the seccomp filter: %s", strerror(errno));
    isolation_add(&x->iso, "seccomp");
    isolation_add(&x->iso, "rlimits");
}

static _Noreturn void run_child(struct child_ctx *x) {
    const struct config *c = x->c;
    char exe[PATH_MAX], report[REPORT_MAX], home[PATH_MAX + 8], tmpdir[PATH_MAX + 8], ldpath[64];
    const char *cwd;
    if (setpgid(0, 0) != 0) child_fail(x, "setpgid: %s", strerror(errno));
    confine(x, exe, sizeof(exe), &cwd);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    const char *envp[MAX_ENV + 1];
    int n = 0;
    for (int i = 0; i < c->n_env; i++) envp[n++] = c->env[i];
    snprintf(home, sizeof(home), "HOME=%s", cwd);
    snprintf(tmpdir, sizeof(tmpdir), "TMPDIR=%s", cwd);
    envp[n++] = home;
    envp[n++] = tmpdir;
    if (isolation_has(&x->iso, "mountns") && c->prefix[0]) {
        snprintf(ldpath, sizeof(ldpath), "LD_LIBRARY_PATH=/tmp/python/lib");  /* libpython's RUNPATH is absolute */
        envp[n++] = ldpath;
    }
    envp[n] = NULL;
    int len = snprintf(report, sizeof(report), "OK ");
    for (int i = 0; i < x->iso.n; i++) len += snprintf(report + len, sizeof(report) - len, "%s%s", i ? "," : "",
                                                      x->iso.names[i]);
    report[len++] = '\n';
    if (write(x->report_w, report, len) != len) _exit(126);
    close_other_fds(x->report_w);
    /* seccomp stops sockets and ctypes-level escapes; without it and a netns, the audit hook is all. */
    int hooked = !isolation_has(&x->iso, "netns") && !isolation_has(&x->iso, "seccomp");
    char *const argv[] = {exe, "-I", "-S", "-B", "-c", (char *)(hooked ? c->boot_hooked : c->boot), NULL};
    execve(exe, argv, (char *const *)envp);
    child_fail(x, "execve %s: %s", exe, strerror(errno));
}

/* ------------------------------------------------------------------ the launcher */

static int write_proc_self(const char *name, const char *text) {
    char path[64];
    snprintf(path, sizeof(path), "/proc/self/%s", name);
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    int ok = write(fd, text, strlen(text)) == (ssize_t)strlen(text);
    close(fd);
    return ok ? 0 : -1;
}

/* Not root: one user namespace owning pid, net, IPC and UTS namespaces (as bubblewrap does), our
 * own uid and gid mapped to themselves. The launcher holds the namespace's capabilities for the
 * mount set-up; the program, not uid 0 inside, loses them at exec. Returns 1 when the kernel
 * refuses user namespaces (the caller goes on without), -1 when one was made but not mapped. */
static int enter_user_namespace(struct isolation *iso) {
    uid_t uid = geteuid();
    gid_t gid = getegid();
    char map[64];
    if (unshare(CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS) != 0) return 1;
    snprintf(map, sizeof(map), "%u %u 1\n", uid, uid);
    if (write_proc_self("uid_map", map) != 0 || write_proc_self("setgroups", "deny") != 0) return -1;
    snprintf(map, sizeof(map), "%u %u 1\n", gid, gid);
    if (write_proc_self("gid_map", map) != 0) return -1;
    const char *names[] = {"userns", "pidns", "netns", "ipcns", "utsns"};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) isolation_add(iso, names[i]);
    return 0;
}

/* Root: each namespace on its own, keeping those the host allows. Not root: a user namespace.
 * Returns -1 (errno set) only for a user namespace left half-made. */
static int enter_namespaces(const struct config *c, struct isolation *iso) {
    if (!c->isolate) return 0;
    if (c->uid < 0) return enter_user_namespace(iso) < 0 ? -1 : 0;
    const struct { int flag; const char *name; } ns[] = {
        {CLONE_NEWPID, "pidns"}, {CLONE_NEWNET, "netns"}, {CLONE_NEWIPC, "ipcns"}, {CLONE_NEWUTS, "utsns"}};
    for (size_t i = 0; i < sizeof(ns) / sizeof(ns[0]); i++)
        if (unshare(ns[i].flag) == 0) isolation_add(iso, ns[i].name);
    return 0;
}

/* Kill every process of `uid` from a helper holding that uid: kill(-1) reaches exactly those. One
 * pass suffices (fork fails once SIGKILL is pending and kill(-1) runs under the tasklist lock); a
 * second pass is cheap insurance. */
static void kill_uid(long uid) {
    pid_t pid = fork();
    if (pid == 0) {
        uid_t u = (uid_t)uid;
        if (setresgid(u, u, u) == 0 && setresuid(u, u, u) == 0) {
            kill(-1, SIGKILL);
            kill(-1, SIGKILL);
        }
        _exit(0);
    }
    if (pid > 0) waitpid(pid, NULL, 0);
}

/* As a subreaper, the program's orphans are our children: kill and reap until none is left. */
static void reap_descendants(void) {
    char path[64], buf[8192];
    snprintf(path, sizeof(path), "/proc/self/task/%d/children", (int)getpid());
    struct timespec ms = {0, 1000000};
    for (;;) {
        pid_t pid = waitpid(-1, NULL, WNOHANG);
        if (pid < 0 && errno == ECHILD) return;
        if (pid > 0) continue;
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        ssize_t n = fd >= 0 ? read(fd, buf, sizeof(buf) - 1) : -1;
        if (fd >= 0) close(fd);
        buf[n > 0 ? n : 0] = '\0';
        for (char *tok = strtok(buf, " \n"); tok; tok = strtok(NULL, " \n")) kill((pid_t)atol(tok), SIGKILL);
        nanosleep(&ms, NULL);
    }
}

/* Wait for the program, the deadline, or SIGTERM from the trainer; SIGCHLD/SIGTERM are blocked. */
static void wait_program(pid_t child, double deadline, struct status *st) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGCHLD);
    sigaddset(&set, SIGTERM);
    for (;;) {
        siginfo_t info = {0};
        if (waitid(P_PID, child, &info, WEXITED | WNOHANG | WNOWAIT) == 0 && info.si_pid == child) {
            st->has_rc = 1;
            st->rc = info.si_code == CLD_EXITED ? info.si_status : -info.si_status;
            return;
        }
        double left = deadline - now();
        if (left <= 0) {
            st->timed_out = 1;
            return;
        }
        struct timespec ts = {(time_t)left, (long)((left - (double)(time_t)left) * 1e9)};
        int sig = sigtimedwait(&set, &info, &ts);
        if (sig == SIGTERM) {
            st->stopped = 1;
            return;
        }
    }
}

/* Reads the program's report up to EOF (its close-on-exec end closing at exec) into st. */
static void read_report(int fd, struct status *st, char *err, size_t err_len) {
    char buf[REPORT_MAX];
    size_t len = 0;
    ssize_t n;
    while (len < sizeof(buf) - 1 && ((n = read(fd, buf + len, sizeof(buf) - 1 - len)) > 0 || (n < 0 && errno == EINTR)))
        if (n > 0) len += (size_t)n;
    buf[len] = '\0';
    char *second = strchr(buf, '\n');
    if (len == 0 || strncmp(buf, "OK ", 3) != 0 || (second && second[1] != '\0')) {
        char *last = buf;  /* the last line says why: ERR <message> */
        for (char *p = buf; (p = strstr(p, "ERR ")) != NULL; p += 4) last = p + 4;
        last[strcspn(last, "\n")] = '\0';
        snprintf(err, err_len, "%s", len ? last : "the sandboxed process died before exec");
        st->error = err;
        return;
    }
    *second = '\0';
    snprintf(st->isolation, sizeof(st->isolation), "%s", buf + 3);
}

static int read_code(const char *workdir, char **code, size_t *len) {
    char path[PATH_MAX + 16];
    snprintf(path, sizeof(path), "%s/main.py", workdir);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat sb;
    if (fd < 0 || fstat(fd, &sb) != 0) return -1;
    *code = malloc((size_t)sb.st_size + 1);
    size_t done = 0;
    ssize_t n;
    while (*code && done < (size_t)sb.st_size && (n = read(fd, *code + done, (size_t)sb.st_size - done)) > 0)
        done += (size_t)n;
    close(fd);
    *len = done;
    return *code && done == (size_t)sb.st_size ? 0 : -1;
}

/* Fork the program, wait for it, kill what is left. Fills `st`; `err` backs st->error. */
static void launch(const struct config *c, char *code, size_t code_len, struct status *st, char *err, size_t err_len) {
    struct child_ctx x = {.c = c, .code = code, .code_len = code_len};
    struct cgroup cg;
    int report[2], alive[2];  /* alive is never written: EOF in the child means the launcher is gone */
    /* Made before the user namespace: the cgroup tree's permissions are the host's. */
    if (!c->cgroup || cgroup_create(&cg, c->memory_mb, c->max_processes) != 0) cg.version = 0;
    x.cg = &cg;
    if (enter_namespaces(c, &x.iso) != 0) {
        snprintf(err, err_len, "user namespace made but not mapped: %s", strerror(errno));
        st->error = err;
    } else if (pipe2(report, O_CLOEXEC) != 0 || pipe2(alive, O_CLOEXEC | O_NONBLOCK) != 0) {
        snprintf(err, err_len, "pipe: %s", strerror(errno));
        st->error = err;
    }
    if (st->error) {
        cgroup_destroy(&cg);
        return;
    }
    double start = now();
    pid_t child = fork();
    if (child == 0) {
        close(report[0]);
        close(alive[1]);
        x.report_w = report[1];
        x.alive_r = alive[0];
        run_child(&x);
    }
    close(report[1]);
    close(alive[0]);
    if (child < 0) {
        snprintf(err, err_len, "fork: %s", strerror(errno));
        st->error = err;
    } else {
        read_report(report[0], st, err, err_len);
        if (!st->error) wait_program(child, start + c->timeout, st);
    }
    close(report[0]);
    st->wall_s = now() - start;
    if (child > 0) {
        kill(child, SIGKILL);
        killpg(child, SIGKILL);  /* unreaped, the program's pid and group id are still ours */
        waitpid(child, NULL, 0);
    }
    /* In a pid namespace the kernel has killed everything with its pid 1; otherwise hunt. */
    cgroup_kill_all(&cg);
    if (c->uid >= 0 && !isolation_has(&x.iso, "pidns")) kill_uid(c->uid);
    reap_descendants();
    cgroup_stats(&cg, &st->oom_kills, &st->pids_refused);
    cgroup_destroy(&cg);
    close(alive[1]);
}

int main(int argc, char **argv) {
    const char *fd_text = getenv("PROLIX_SANDBOX_STATUS_FD");
    int status_fd = fd_text ? atoi(fd_text) : -1;
    if (status_fd < 3 || fcntl(status_fd, F_SETFD, FD_CLOEXEC) != 0) {
        fprintf(stderr, "prolix-sandbox: PROLIX_SANDBOX_STATUS_FD must name an open fd >= 3\n");
        return 2;
    }
    struct config c;
    struct status st = {0};
    char err[REPORT_MAX], *code = NULL;
    size_t code_len = 0;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGCHLD);
    sigaddset(&set, SIGTERM);
    sigprocmask(SIG_BLOCK, &set, NULL);
    prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);  /* the trainer died: so do we, and the program with us */
    prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    if (parse_args(argc, argv, &c, err, sizeof(err)) != 0) {
        st.error = err;
    } else if (read_code(c.workdir, &code, &code_len) != 0) {
        snprintf(err, sizeof(err), "reading %s/main.py: %s", c.workdir, strerror(errno));
        st.error = err;
    } else {
        if (c.uid >= 0) {
            if (c.sweep_first) kill_uid(c.uid);  /* a previous holder of this uid died without cleaning up */
            char path[PATH_MAX + 16];
            snprintf(path, sizeof(path), "%s/main.py", c.workdir);
            /* Used where there is no mount namespace (the program then runs in workdir itself). */
            if (chown(c.workdir, (uid_t)c.uid, (gid_t)c.uid) != 0 || chown(path, (uid_t)c.uid, (gid_t)c.uid) != 0) {
                snprintf(err, sizeof(err), "chown %s to %ld: %s", c.workdir, c.uid, strerror(errno));
                st.error = err;
            }
        }
        if (!st.error) launch(&c, code, code_len, &st, err, sizeof(err));
    }
    write_status(status_fd, &st);
    free(code);
    return 0;
}

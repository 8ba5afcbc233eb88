"""Run untrusted, model-written Python in a throw-away sandbox: `run_python(code, stdin)`.

A code reward executes thousands of model programs per step for days; one of them will loop
forever, fork-bomb, allocate 100 GB, print a gigabyte, read the run directory or delete files.
None of that may end the run or change anything outside the sandbox, so every program runs in a
fresh process tree set up by a small launcher. Two launchers speak the same protocol:
- the native one, `prolix-sandbox` (C, csrc/sandbox/, built by CMake through setup.py and placed
  next to this file): everything below plus a seccomp filter, a per-run cgroup and, without root,
  an unprivileged user namespace; it adds ~6 ms of CPU per run to the interpreter's own start
  where the Python launcher adds ~88 ms (`prolix bench sandbox`, README);
- the Python one (this file run as a script, stdlib only), used when the native one is not built.
`PROLIX_SANDBOX_LAUNCHER` picks one: "native" (raise `SandboxError` if it is not built), "python",
or unset / "auto" (native when built). The process tree is the same:

    trainer ──Popen(new session)──► launcher (subreaper) ──fork──► program (pid 1 of a pid ns)
            ◄── stdout/stderr pipes (read incrementally, capped) ─────────┘
            ◄── status pipe (JSON: exit status, timeout, isolation actually applied)

Layers, strongest first (the `isolation` field of the result lists what was applied):
- Native only: "seccomp", a system-call filter (EPERM for ptrace, process_vm_*, bpf,
  perf_event_open, the key store, userfaultfd, io_uring, kexec, modules, mount and namespace
  calls, swap, reboot, sockets other than AF_UNIX; see csrc/sandbox/seccomp.c); "cgroup", a
  per-run cgroup (v2, else the v1 memory and pids controllers) capping the whole sandbox at
  memory_mb and MAX_PROCESSES tasks, removed after the run, whose OOM kills give reason
  "memory"; "userns" when not root: one unprivileged user namespace owning the pid, network,
  IPC, UTS and mount namespaces below (the program keeps the caller's uid, mapped to itself).
- Namespaces (root): new pid, network, IPC, UTS and mount namespaces via `unshare(2)` through
  ctypes (`os.unshare` is Python 3.12+). Network: only a loopback interface, left down, so
  connecting anywhere (127.0.0.1 included) fails. Pid: the program is pid 1; when it exits or is
  killed the kernel kills every process it left behind. Mount: every inherited mount is remounted
  read-only, with fresh tmpfs on /tmp (the size-capped working directory), /dev/shm and /run, and
  a fresh /proc showing only the sandbox's processes; all of it vanishes with the namespace. The
  interpreter's prefix is bind-mounted read-only into /tmp/python, so a Python installed under a
  private directory (pyenv in /root) still runs.
- Privilege drop (root): the program runs as a dedicated unprivileged uid/gid,
  `UID_BASE + slot` (a slot is an flock'ed file, so concurrent sandboxes, threads or processes,
  never share a uid), with no supplementary groups and `PR_SET_NO_NEW_PRIVS`. It cannot read
  0600/0700 files of the trainer, write to root-owned directories, or signal the trainer.
  RLIMIT_NPROC, which root ignores, then bounds the process count: a fork bomb gets
  `MAX_PROCESSES` processes.
- Limits (always): RLIMIT_AS = memory_mb per process, RLIMIT_CPU (backstop for the wall-clock
  timeout), RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_NPROC, core dumps off; a wall-clock timeout
  enforced by the launcher; stdout/stderr capped at `max_output_bytes` each by the trainer, which
  reads incrementally and stops the program past the cap (printing 1 GB costs the trainer 1 MiB).
  No cgroup is used, so memory is bounded per process: at most MAX_PROCESSES x memory_mb in all.
- Hygiene (always): a fresh empty working directory, a minimal environment (PATH, a UTF-8
  locale, HOME = TMPDIR = the working directory; nothing of the trainer's), `python -I -S -B`
  (site's exit/quit put back), no inherited fds beyond stdin/stdout/stderr, `PR_SET_PDEATHSIG`
  so a killed launcher takes the program with it, and at the end a sweep that kills the program's
  process group, every process of the sandbox uid, and every descendant of the launcher (a
  subreaper); the trainer then kills the launcher's group.
- Without a network namespace an audit hook (`sys.addaudithook`) in the program refuses
  sockets, subprocess/exec/spawn and ctypes. Audit hooks are not a security boundary (PEP 578);
  this is the fallback, not the mechanism.

What holds where:
- root with namespaces (here, a VM, Docker with `--privileged` or CAP_SYS_ADMIN): all of the above.
- root without namespaces (default Docker seccomp): privilege drop, limits, hygiene, audit hook.
  Not covered: writes to world-writable directories (/tmp, /var/tmp, /dev/shm, within
  RLIMIT_FSIZE per file), SysV IPC objects that outlive the program, and the host's process list
  is visible. The interpreter must be readable by other users (or set `PYTHON`).
- not root, native launcher, user namespaces allowed: user, pid, network, IPC, UTS and mount
  namespaces, seccomp, limits, hygiene. The program keeps the trainer's uid, so it can *read* the
  trainer's files (all of the host is read-only to it), but it cannot see, signal or trace the
  trainer's processes, write outside its tmpfs, or reach the network. No cgroup (not ours to make
  unless delegated): memory is bounded per process only.
- not root otherwise: limits, hygiene, audit hook (Python launcher) or seccomp (native), subreaper
  sweep. The program runs as the *trainer's own user*: it can read and write everything the
  trainer can (checkpoints, the run directory) and signal the trainer. RLIMIT_NPROC counts all of
  that user's processes and threads, so it is set to (current count + MAX_PROCESSES) and is racy.
  Use root (or a container) for real runs.
Containers that share a kernel without user namespaces share uids: give each its own `UID_BASE`.
A host that allows the namespaces but refuses one of the mounts makes every run raise
`SandboxError` (set `NAMESPACES = False` there).

`reason` is one of "ok", "error" (non-zero exit, e.g. an exception or a syntax error), "timeout",
"memory" (MemoryError, an OOM kill in the run's cgroup, or killed by SIGKILL we did not send, as
the OOM killer does), "process_limit" (fork/thread creation refused), "output_limit", "signal"
(killed by another signal, e.g. SIGSYS for a system call of a foreign ABI). "memory" and
"process_limit" are read from the program's own stderr and the cgroup's counters: they label,
they do not score. A sandbox that cannot be *set up* (interpreter missing, uid unmapped) raises
`SandboxError`: that is the operator's problem and must not look like a wrong answer.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import json
import math
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time

__all__ = ["SandboxResult", "SandboxError", "run_python", "REASONS"]

UID_BASE = 0x40000000  # sandbox uids UID_BASE + [0, MAX_SLOTS); lower it where high uids are unmapped
MAX_SLOTS = 64  # concurrent sandboxes on one machine (more wait for a free slot)
SLOT_DIR = "/run/prolix-sandbox"  # root-only flock files, one per slot
PYTHON: str | None = None  # interpreter for the program; None: the trainer's own base interpreter
NAMESPACES = True  # try namespaces (root, or a user namespace); False exercises the fallback the tests check
CGROUPS = True  # native launcher: try a per-run cgroup; False exercises the rlimits-only memory bound
MAX_PROCESSES = 16  # RLIMIT_NPROC (processes + threads); bounds total memory by 16 x memory_mb
MAX_FILE_MB = 16  # RLIMIT_FSIZE
MAX_OPEN_FILES = 64  # RLIMIT_NOFILE
TMPFS_MB = 64  # size of the sandbox's /tmp (working directory) and /dev/shm under a mount namespace
BACKSTOP_S = 10.0  # the trainer kills a launcher that overstays timeout by this much (never expected)

LAUNCHER_ENV = "PROLIX_SANDBOX_LAUNCHER"  # "native", "python", or unset/"auto"
NATIVE_LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prolix-sandbox")  # setup.py puts it here

REASONS = ("ok", "error", "timeout", "memory", "process_limit", "output_limit", "signal")
_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}


class SandboxError(RuntimeError):
    """The sandbox could not be set up or run (a host problem, not the program's fault)."""


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    ok: bool  # exited 0 within every limit
    reason: str  # one of REASONS
    stdout: str  # utf-8 (invalid bytes replaced), at most max_output_bytes
    stderr: str
    returncode: int | None  # negative: killed by that signal; None: killed by the sandbox
    wall_s: float  # the program's wall-clock time
    isolation: tuple[str, ...]  # what was applied, e.g. ("uid", "pidns", "netns", "mountns", ...)


def run_python(code: str, stdin: str = "", timeout: float = 5.0, memory_mb: int = 512, *,
               max_output_bytes: int = 1 << 20) -> SandboxResult:
    """Run `code` as a Python program in a fresh sandbox and return what it printed and why it ended.

    Args:
        code: program text (run as `__main__` from `main.py` in an empty working directory).
        stdin: fed to the program's stdin, then closed.
        timeout: wall-clock seconds for the program (interpreter start-up included); CPU time is
            capped at ceil(timeout) + 1 s per process.
        memory_mb: address-space limit of each process (RLIMIT_AS), >= 32.
        max_output_bytes: cap on stdout and on stderr; past it the program is stopped.
    Returns: a `SandboxResult`; never raises for anything the program does.
    Raises: ValueError for bad arguments; SandboxError when the sandbox itself cannot run.
    """
    if not isinstance(code, str) or not isinstance(stdin, str):
        raise ValueError(f"code and stdin must be str, got {type(code).__name__} and {type(stdin).__name__}")
    if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and 0 < timeout <= 600):
        raise ValueError(f"timeout must be in (0, 600] seconds, got {timeout!r}")
    if isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or not 32 <= memory_mb <= 1 << 20:
        raise ValueError(f"memory_mb must be an int in [32, 2**20], got {memory_mb!r}")
    if not isinstance(max_output_bytes, int) or max_output_bytes < 1:
        raise ValueError(f"max_output_bytes must be an int >= 1, got {max_output_bytes!r}")
    exe, prefix = _interpreter()
    native = _native_launcher()
    with _uid_slot() as (uid, swept, slot_fd):
        workdir = tempfile.mkdtemp(prefix="prolix-sandbox-")  # 0700, the trainer's user
        try:
            with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8") as f:
                f.write(code)
            cfg = {"workdir": workdir, "uid": uid, "python": exe, "prefix": prefix, "timeout": float(timeout),
                   "memory_mb": memory_mb, "isolate": NAMESPACES and (uid is not None or native is not None),
                   "sweep_first": not swept}
            argv = _native_argv(native, cfg) if native else _python_argv(cfg)
            result, clean = _launch(argv, cfg, stdin.encode("utf-8", "surrogateescape"), max_output_bytes)
            if clean and slot_fd is not None:
                os.pwrite(slot_fd, b"clean", 0)  # the next holder of this uid may skip its first sweep
            return result
        finally:
            _rmtree(workdir)


# --------------------------------------------------------------------------- trainer side

def _native_launcher() -> str | None:
    """The native launcher's path, or None for the Python one (see LAUNCHER_ENV)."""
    choice = os.environ.get(LAUNCHER_ENV, "auto")
    if choice not in ("auto", "native", "python"):
        raise ValueError(f"{LAUNCHER_ENV} must be 'auto', 'native' or 'python', got {choice!r}")
    built = os.access(NATIVE_LAUNCHER, os.X_OK)
    if choice == "native" and not built:
        raise SandboxError(f"{LAUNCHER_ENV}=native but {NATIVE_LAUNCHER} is not built "
                           "(pip install -e . or `make native` with CMake and a C compiler)")
    return NATIVE_LAUNCHER if built and choice != "python" else None


def _python_argv(cfg: dict) -> list[str]:
    return [sys.executable, "-I", "-S", "-B", os.path.abspath(__file__), json.dumps(cfg)]


def _native_argv(launcher: str, cfg: dict) -> list[str]:
    """The native launcher's command line: the same settings, plus the boot text it runs."""
    nproc = MAX_PROCESSES if cfg["uid"] is not None else _count_tasks(os.getuid()) + MAX_PROCESSES
    options = {"workdir": cfg["workdir"], "uid": -1 if cfg["uid"] is None else cfg["uid"],
               "python": cfg["python"], "prefix": cfg["prefix"] or "", "timeout": repr(cfg["timeout"]),
               "memory-mb": cfg["memory_mb"], "isolate": int(cfg["isolate"]), "cgroup": int(CGROUPS),
               "sweep-first": int(cfg["sweep_first"]), "max-processes": MAX_PROCESSES,
               "nproc-fallback": nproc, "file-mb": MAX_FILE_MB, "open-files": MAX_OPEN_FILES,
               "tmpfs-mb": TMPFS_MB, "boot": _BOOT.format(hook=""), "boot-hooked": _BOOT.format(hook=_DENY_HOOK)}
    argv = [launcher]
    for key, value in options.items():
        argv += [f"--{key}", str(value)]
    for key, value in _ENV.items():
        argv += ["--env", f"{key}={value}"]
    return argv


def _interpreter() -> tuple[str, str | None]:
    """(interpreter path, prefix to bind-mount or None): the base interpreter, not a venv shim."""
    if PYTHON is not None:
        return os.path.realpath(PYTHON), None
    exe = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    prefix = os.path.realpath(sys.base_prefix)
    return exe, (prefix if exe.startswith(prefix + os.sep) else None)


@contextlib.contextmanager
def _uid_slot():
    """(uid, swept, fd): a uid no other live sandbox uses (root), held via an flock on `fd`, and
    whether the uid's last run ended with its launcher's own sweep, so that none of its processes
    can be left (the file says "clean" from such an end to the next start; a launcher killed by
    the backstop leaves "dirty" and the next one sweeps first). (None, True, None) when not root.
    """
    if os.geteuid() != 0:
        yield None, True, None
        return
    os.makedirs(SLOT_DIR, mode=0o700, exist_ok=True)
    while True:
        for slot in range(MAX_SLOTS):
            fd = os.open(os.path.join(SLOT_DIR, f"slot-{slot}"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                swept = os.pread(fd, 5, 0) == b"clean"
                os.pwrite(fd, b"dirty", 0)
                yield UID_BASE + slot, swept, fd
            finally:
                os.close(fd)  # releases the lock
            return
        time.sleep(0.05)  # every slot busy: wait for one


def _rmtree(path: str) -> None:
    """Remove the working directory even if the program made parts of it unreadable (non-root)."""
    try:
        shutil.rmtree(path)
    except OSError:
        with contextlib.suppress(OSError):
            os.chmod(path, 0o700)
        for root, dirs, _ in os.walk(path):  # top-down: each directory is fixed before it is entered
            for d in dirs:
                with contextlib.suppress(OSError):
                    os.chmod(os.path.join(root, d), 0o700, follow_symlinks=False)
        shutil.rmtree(path, ignore_errors=True)


def _launch(argv: list[str], cfg: dict, stdin: bytes, cap: int) -> tuple[SandboxResult, bool]:
    """Run the launcher; (result, whether it reported normally: its own end-of-run sweep ran)."""
    status_r, status_w = os.pipe()
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(status_w,),
            env={**_ENV, "PROLIX_SANDBOX_STATUS_FD": str(status_w)}, cwd="/", start_new_session=True)
    finally:
        os.close(status_w)
    try:
        out, err, overflow, backstop = _pump(proc, stdin, cap, cfg["timeout"] + BACKSTOP_S)
    finally:
        # The launcher is not reaped yet, so its pid (the group id) cannot have been reused:
        # killing the group is safe, and takes any straggler that kept the launcher's group.
        _kill_group(proc)
        proc.wait()
        raw = _read_available(status_r)
        os.close(status_r)
    try:
        status = json.loads(raw)
    except ValueError:
        if backstop:
            return SandboxResult(False, "timeout", _text(out), _text(err), None, cfg["timeout"], ()), False
        raise SandboxError(f"sandbox launcher died (exit {proc.returncode}) without a status: "
                           f"{_text(err)[-2000:] or 'no stderr'}") from None
    if status.get("error"):
        raise SandboxError(f"sandbox setup failed: {status['error']}")
    reason = _classify(status, _text(err), overflow)
    return SandboxResult(reason == "ok", reason, _text(out), _text(err), status["returncode"],
                         status["wall_s"], tuple(status["isolation"])), True


def _pump(proc: subprocess.Popen, stdin: bytes, cap: int, budget_s: float):
    """Feed stdin and read stdout/stderr without blocking, keeping at most `cap` bytes of each.

    Past the cap the launcher is told to stop (SIGTERM) and the rest is drained and dropped, so a
    program printing forever costs the trainer `cap` bytes. Returns (out, err, overflow, backstop).
    """
    deadline = time.monotonic() + budget_s
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    seen = dict.fromkeys(bufs, 0)  # bytes received, kept or not
    overflow = backstop = False
    sel = selectors.DefaultSelector()
    for fd in bufs:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    stdin_fd, sent = proc.stdin.fileno(), 0
    if stdin:
        os.set_blocking(stdin_fd, False)
        sel.register(stdin_fd, selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    launcher_done = False
    try:
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                backstop = not launcher_done  # the caller kills the group
                break
            if not launcher_done and _exited(proc):
                # The launcher has swept the program's processes; whatever still holds the pipes
                # open must not stall the trainer: drain briefly, then stop.
                launcher_done, deadline = True, min(deadline, time.monotonic() + 0.2)
            for key, _ in sel.select(min(remaining, 0.1)):
                fd = key.fd
                if fd == stdin_fd:
                    sent = _feed(fd, stdin, sent)
                    if sent >= len(stdin):
                        sel.unregister(fd)
                        proc.stdin.close()
                    continue
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    sel.unregister(fd)
                    continue
                bufs[fd] += chunk[:max(cap - seen[fd], 0)]
                seen[fd] += len(chunk)
                if seen[fd] > cap and not overflow:
                    overflow = True
                    os.kill(proc.pid, signal.SIGTERM)  # the launcher (unreaped) stops the program
    finally:
        sel.close()
        if not proc.stdin.closed:
            with contextlib.suppress(OSError):
                proc.stdin.close()
    return bytes(bufs[proc.stdout.fileno()]), bytes(bufs[proc.stderr.fileno()]), overflow, backstop


def _feed(fd: int, data: bytes, sent: int) -> int:
    """Write the next chunk of stdin; a closed pipe (the program is done with stdin) ends it."""
    try:
        return sent + os.write(fd, data[sent:sent + (1 << 16)])
    except BlockingIOError:
        return sent
    except BrokenPipeError:
        return len(data)


def _exited(proc: subprocess.Popen) -> bool:
    """Whether the launcher has exited, without reaping it (WNOWAIT keeps its pid reserved)."""
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # SIGCHLD ignored by the host process: children are auto-reaped
        return True


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher's process group; call only before the launcher is reaped."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher leads its own session and group


def _read_available(fd: int) -> bytes:
    os.set_blocking(fd, False)
    chunks = []
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    return b"".join(chunks)


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def _classify(status: dict, stderr: str, overflow: bool) -> str:
    rc = status["returncode"]
    if overflow or status["stopped"]:
        return "output_limit"
    if status["timed_out"] or rc in (-signal.SIGXCPU,):
        return "timeout"
    if rc == 0:
        return "ok"
    tail = stderr[-4000:]
    if "MemoryError" in tail or rc == -signal.SIGKILL or status.get("oom_kills", 0) > 0:
        return "memory"
    if ("BlockingIOError: [Errno 11]" in tail or "can't start new thread" in tail
            or status.get("pids_refused", 0) > 0):
        return "process_limit"
    return "signal" if rc is not None and rc < 0 else "error"


# --------------------------------------------------------------------------- launcher side (root)
# Everything below runs in the launcher process: `python -I -S -B sandbox.py CONFIG_JSON`.

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 21
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38
_ST_TO_MS = {os.ST_RDONLY: MS_RDONLY, os.ST_NOSUID: MS_NOSUID, os.ST_NODEV: MS_NODEV, os.ST_NOEXEC: MS_NOEXEC,
             os.ST_NOATIME: MS_NOATIME, os.ST_NODIRATIME: MS_NODIRATIME, os.ST_RELATIME: MS_RELATIME}

# Runs the program as __main__ under `python -I -S -B -c`: -S drops site (and its exit/quit), put back.
_BOOT = """\
import builtins, sys, types
builtins.exit = builtins.quit = sys.exit
{hook}
with open("main.py", "rb") as _f:
    _code = compile(_f.read(), "main.py", "exec")
_main = types.ModuleType("__main__")
_main.__file__ = "main.py"
sys.modules["__main__"] = _main
sys.argv = ["main.py"]
del _f, builtins, types
exec(_code, _main.__dict__)
"""
_DENY_HOOK = """\
def _deny(event, args, _blocked=("socket.", "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn",
                                 "os.spawn", "ctypes.")):
    if event.startswith(_blocked) or (event == "import" and args[0] == "_posixsubprocess"):  # raw fork_exec
        raise PermissionError(f"{event} {args[0] if event == 'import' else ''}".strip() + " is not allowed")
sys.addaudithook(_deny)
del _deny"""

_libc = None


def _sys(name: str, *args) -> None:
    """Call a libc function, raising OSError with errno on failure."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(_libc, name)
    if fn(*args) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{name}{args}: {os.strerror(e)}")


def _mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _sys("mount", enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data))


def _prctl(option: int, value: int) -> None:
    _sys("prctl", option, ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))


def _mountpoints() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4].encode().decode("unicode_escape") for line in f]
    return sorted(set(points), key=len)


def _try_unshare(flag: int) -> bool:
    try:
        _sys("unshare", flag)
        return True
    except OSError:
        return False


def _setup_mount_ns(cfg: dict, code: bytes, uid: int) -> tuple[str, str, dict]:
    """In a fresh mount namespace: everything read-only, private tmpfs for the program, fresh /proc.

    Returns (interpreter path, working directory, extra environment) as seen inside.
    """
    prefix_fd = os.open(cfg["prefix"], os.O_PATH | os.O_DIRECTORY) if cfg["prefix"] else None
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount propagates back to the host
    for point in _mountpoints():
        flags = sum(ms for st, ms in _ST_TO_MS.items() if os.statvfs(point).f_flag & st)
        if point == "/" or not flags & MS_RDONLY:
            try:
                _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags)
            except OSError:
                if point == "/":
                    raise
    tmp_flags = MS_NOSUID | MS_NODEV
    _mount("tmpfs", "/tmp", "tmpfs", tmp_flags, f"size={TMPFS_MB}m,nr_inodes=4096,mode=0755")
    for point, mode in (("/dev/shm", "1777"), ("/run", "0755")):
        if os.path.isdir(point):
            _mount("tmpfs", point, "tmpfs", tmp_flags, f"size={TMPFS_MB if mode == '1777' else 1}m,mode={mode}")
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)  # only our pid namespace
    os.mkdir("/tmp/work", 0o700)
    os.chown("/tmp/work", uid, uid)
    with open("/tmp/work/main.py", "wb") as f:
        f.write(code)
    exe, env = cfg["python"], {}
    if prefix_fd is not None:
        os.mkdir("/tmp/python", 0o755)
        _mount(f"/proc/self/fd/{prefix_fd}", "/tmp/python", None, MS_BIND | MS_REC)
        _mount(None, "/tmp/python", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
        os.close(prefix_fd)
        exe = os.path.join("/tmp/python", os.path.relpath(cfg["python"], cfg["prefix"]))
        env["LD_LIBRARY_PATH"] = "/tmp/python/lib"  # a shared libpython with an absolute RUNPATH
    return exe, "/tmp/work", env


def _count_tasks(uid: int) -> int:
    """Processes + threads of `uid` (what RLIMIT_NPROC counts)."""
    n = 0
    for pid in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            if pid.isdigit() and os.stat(f"/proc/{pid}").st_uid == uid:
                n += len(os.listdir(f"/proc/{pid}/task"))
    return n


def _set_limits(cfg: dict, uid: int | None) -> None:
    cpu = math.ceil(cfg["timeout"]) + 1
    nproc = MAX_PROCESSES if uid is not None else _count_tasks(os.getuid()) + MAX_PROCESSES
    for limit, value in ((resource.RLIMIT_CPU, (cpu, cpu + 1)),
                         (resource.RLIMIT_AS, (cfg["memory_mb"] << 20,) * 2),
                         (resource.RLIMIT_FSIZE, (MAX_FILE_MB << 20,) * 2),
                         (resource.RLIMIT_NOFILE, (MAX_OPEN_FILES,) * 2),
                         (resource.RLIMIT_NPROC, (nproc,) * 2),
                         (resource.RLIMIT_CORE, (0, 0))):
        resource.setrlimit(limit, value)


def _child(cfg: dict, code: bytes, isolation: list, report_w: int, alive_r: int) -> None:
    """The forked program process: confine itself, drop privileges, exec. Never returns."""
    try:
        os.setpgid(0, 0)  # a group of its own, which the launcher kills at the end in one go
        uid = cfg["uid"]
        exe, cwd, env = cfg["python"], cfg["workdir"], {}
        if "pidns" in isolation and _try_unshare(CLONE_NEWNS):  # pid ns needed for a fresh /proc
            exe, cwd, env = _setup_mount_ns(cfg, code, uid)  # a failure half-way is fatal
            isolation.append("mountns")
        os.chdir(cwd)  # before dropping privileges: the path above may not be traversable by uid
        _set_limits(cfg, uid)
        if uid is not None:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            isolation.append("uid")
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # set after setresuid, which clears it
        with contextlib.suppress(BlockingIOError):  # EAGAIN: the launcher is alive
            if os.read(alive_r, 1) == b"":  # EOF: it died before PDEATHSIG was armed
                os._exit(1)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        hook = "" if "netns" in isolation else _DENY_HOOK
        isolation.append("rlimits")
        os.write(report_w, b"OK " + json.dumps(isolation).encode() + b"\n")
        os.closerange(3, report_w)
        os.closerange(report_w + 1, MAX_OPEN_FILES + 1024)
        argv = [exe, "-I", "-S", "-B", "-c", _BOOT.format(hook=hook)]
        os.execve(exe, argv, {**_ENV, "HOME": cwd, "TMPDIR": cwd, **env})
    except BaseException as e:  # noqa: BLE001 — report anything, then die without cleanup handlers
        with contextlib.suppress(OSError):
            os.write(report_w, b"ERR " + f"{type(e).__name__}: {e}".encode(errors="replace") + b"\n")
    finally:
        os._exit(127)


def _sweep(uid: int | None) -> None:
    """Kill what the program left behind: every process of the sandbox uid, then every descendant."""
    if uid is not None:
        pid = os.fork()
        if pid == 0:  # a killer with the sandbox's uid: kill(-1) reaches exactly the uid's processes
            try:
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
                for _ in range(1000):  # one pass kills a fork bomb; re-check in case it raced
                    os.kill(-1, signal.SIGKILL)
                    if not _live_pids(uid):
                        break
                    time.sleep(0.001)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
    while True:  # as a subreaper, orphans of the program are reparented to us
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            for child in _children():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
            time.sleep(0.001)


def _live_pids(uid: int) -> list[int]:
    """Processes of `uid` other than us that are not yet zombies."""
    me, found = os.getpid(), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
            if int(pid) != me and state not in "ZX" and os.stat(f"/proc/{pid}").st_uid == uid:
                found.append(int(pid))
    return found


def _children() -> list[int]:
    me = os.getpid()
    try:
        with open(f"/proc/{me}/task/{me}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:  # a kernel without CONFIG_PROC_CHILDREN: scan every process's parent
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                    found.append(int(pid))
        return found


def _launcher_main(cfg: dict) -> dict:
    """Set up namespaces, fork the program, wait for it within the timeout, clean up; the status."""
    uid, isolation = cfg["uid"], []
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD, signal.SIGTERM})
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the trainer died: so do we, and the program with us
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    with open(os.path.join(cfg["workdir"], "main.py"), "rb") as f:
        code = f.read()
    if uid is not None:
        if cfg.get("sweep_first", True):
            _sweep(uid)  # a previous holder of this uid crashed without cleaning up
        for path in (cfg["workdir"], os.path.join(cfg["workdir"], "main.py")):
            os.chown(path, uid, uid)  # used when there is no mount namespace
    if cfg["isolate"]:
        isolation += [name for flag, name in ((CLONE_NEWPID, "pidns"), (CLONE_NEWNET, "netns"),
                                              (CLONE_NEWIPC, "ipcns"), (CLONE_NEWUTS, "utsns"))
                      if _try_unshare(flag)]
    report_r, report_w = os.pipe()
    alive_r, alive_w = os.pipe()  # never written: EOF in the child means the launcher is gone
    os.set_blocking(alive_r, False)
    start = time.monotonic()
    child = os.fork()
    if child == 0:
        os.close(report_r)
        os.close(alive_w)
        _child(cfg, code, isolation, report_w, alive_r)
    os.close(report_w)
    os.close(alive_r)
    with os.fdopen(report_r, "rb") as f:
        report = f.read().decode(errors="replace").splitlines()  # EOF at exec (O_CLOEXEC)
    status = {"error": None, "returncode": None, "timed_out": False, "stopped": False, "isolation": []}
    if not report or not report[0].startswith("OK ") or len(report) > 1:
        status["error"] = (report[-1][4:] if report else "the sandboxed process died before exec")
    else:
        status["isolation"] = json.loads(report[0][3:])
        status.update(_wait(child, start + cfg["timeout"]))
    status["wall_s"] = round(time.monotonic() - start, 4)
    for kill in (os.kill, os.killpg):  # the program leads its own group; unreaped, its id is still ours
        with contextlib.suppress(ProcessLookupError):
            kill(child, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(child, 0)
    # In a pid namespace the kernel has already killed everything (and we can no longer fork
    # into it); otherwise hunt down what the program left.
    _sweep(None if "pidns" in isolation else uid)
    os.close(alive_w)
    return status


def _wait(child: int, deadline: float) -> dict:
    """Wait for the program to exit, the deadline, or SIGTERM from the trainer (output over cap)."""
    while True:
        info = signal.sigtimedwait({signal.SIGCHLD, signal.SIGTERM}, max(deadline - time.monotonic(), 0))
        if info is None:
            return {"timed_out": True}
        if info.si_signo == signal.SIGTERM:
            return {"stopped": True}
        done = os.waitid(os.P_PID, child, os.WEXITED | os.WNOHANG | os.WNOWAIT)  # not reaped yet
        if done is not None:
            return {"returncode": done.si_status if done.si_code == os.CLD_EXITED else -done.si_status}


if __name__ == "__main__":
    status_fd = int(os.environ["PROLIX_SANDBOX_STATUS_FD"])
    os.set_inheritable(status_fd, False)
    try:
        result = _launcher_main(json.loads(sys.argv[1]))
    except BaseException as exc:  # noqa: BLE001 — the trainer must hear about any launcher failure
        result = {"error": f"launcher: {type(exc).__name__}: {exc}"}
    os.write(status_fd, json.dumps(result).encode())

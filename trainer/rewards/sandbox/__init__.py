"""Run untrusted, model-written Python in a throw-away sandbox: `run_python(code, stdin)`.

A code reward executes thousands of model programs per step for days; one of them will loop
forever, fork-bomb, allocate 100 GB, print a gigabyte, read the run directory or delete files.
None of that may end the run or change anything outside the sandbox, so every program runs in a
fresh process tree set up by a small launcher. Two launchers speak the same protocol:
- the native one, `prolix-sandbox` (C, csrc/sandbox/, built by CMake through setup.py and placed
  in this folder): everything below plus a seccomp filter, a per-run cgroup and, without root,
  an unprivileged user namespace; it costs far less CPU per run than the Python one
  (`prolix bench sandbox` measures both);
- the Python one (`launcher.py` of this package run as a script, stdlib only), used when the
  native one is not built.
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
- root with namespaces (a VM, Docker with `--privileged` or CAP_SYS_ADMIN): all of the above.
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
import dataclasses
import fcntl
import json
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from .launcher import BOOT, DENY_HOOK, ENV, MAX_FILE_MB, MAX_OPEN_FILES, MAX_PROCESSES, TMPFS_MB, count_tasks

__all__ = ["SandboxResult", "SandboxError", "run_python", "REASONS"]

UID_BASE = 0x40000000  # sandbox uids UID_BASE + [0, MAX_SLOTS); lower it where high uids are unmapped
MAX_SLOTS = 64  # concurrent sandboxes on one machine (more wait for a free slot)
SLOT_DIR = "/run/prolix-sandbox"  # root-only flock files, one per slot
PYTHON: str | None = None  # interpreter for the program; None: the trainer's own base interpreter
NAMESPACES = True  # try namespaces (root, or a user namespace); False exercises the fallback the tests check
CGROUPS = True  # native launcher: try a per-run cgroup; False exercises the rlimits-only memory bound
BACKSTOP_S = 10.0  # the trainer kills a launcher that overstays timeout by this much (never expected)

LAUNCHER_ENV = "PROLIX_SANDBOX_LAUNCHER"  # "native", "python", or unset/"auto"
_HERE = os.path.dirname(os.path.abspath(__file__))
NATIVE_LAUNCHER = os.path.join(_HERE, "prolix-sandbox")  # setup.py builds it here
PYTHON_LAUNCHER = os.path.join(_HERE, "launcher.py")  # run as a script

REASONS = ("ok", "error", "timeout", "memory", "process_limit", "output_limit", "signal")


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
    exe, prefix = interpreter()
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
    return [sys.executable, "-I", "-S", "-B", PYTHON_LAUNCHER, json.dumps(cfg)]


def _native_argv(launcher: str, cfg: dict) -> list[str]:
    """The native launcher's command line: the same settings, plus the boot text it runs."""
    nproc = MAX_PROCESSES if cfg["uid"] is not None else count_tasks(os.getuid()) + MAX_PROCESSES
    options = {"workdir": cfg["workdir"], "uid": -1 if cfg["uid"] is None else cfg["uid"],
               "python": cfg["python"], "prefix": cfg["prefix"] or "", "timeout": repr(cfg["timeout"]),
               "memory-mb": cfg["memory_mb"], "isolate": int(cfg["isolate"]), "cgroup": int(CGROUPS),
               "sweep-first": int(cfg["sweep_first"]), "max-processes": MAX_PROCESSES,
               "nproc-fallback": nproc, "file-mb": MAX_FILE_MB, "open-files": MAX_OPEN_FILES,
               "tmpfs-mb": TMPFS_MB, "boot": BOOT.format(hook=""), "boot-hooked": BOOT.format(hook=DENY_HOOK)}
    argv = [launcher]
    for key, value in options.items():
        argv += [f"--{key}", str(value)]
    for key, value in ENV.items():
        argv += ["--env", f"{key}={value}"]
    return argv


def interpreter() -> tuple[str, str | None]:
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
            env={**ENV, "PROLIX_SANDBOX_STATUS_FD": str(status_w)}, cwd="/", start_new_session=True)
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

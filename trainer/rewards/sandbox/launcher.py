"""The Python sandbox launcher: the launcher process of `run_python`, run as a script.

`python -I -S -B launcher.py CONFIG_JSON` sets up the namespaces, forks the program, confines it
(limits, mount namespace, privilege drop), waits for it within the timeout, sweeps what it left
and writes a JSON status to the file descriptor named by PROLIX_SANDBOX_STATUS_FD. The native
launcher (`prolix-sandbox`, csrc/sandbox/) speaks the same protocol. This module imports only the
standard library and nothing of the package, because it runs as a script under `-I`, where its
package is not importable. The package imports the limits, the environment and the boot text
from here, so that both launchers apply the same ones.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import resource
import signal
import sys
import time

__all__ = ["MAX_PROCESSES", "MAX_FILE_MB", "MAX_OPEN_FILES", "TMPFS_MB", "ENV", "BOOT", "DENY_HOOK", "count_tasks"]

MAX_PROCESSES = 16  # RLIMIT_NPROC (processes + threads); bounds total memory by 16 x memory_mb
MAX_FILE_MB = 16  # RLIMIT_FSIZE
MAX_OPEN_FILES = 64  # RLIMIT_NOFILE
TMPFS_MB = 64  # size of the sandbox's /tmp (working directory) and /dev/shm under a mount namespace
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}  # all the program gets

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 21
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38
_ST_TO_MS = {os.ST_RDONLY: MS_RDONLY, os.ST_NOSUID: MS_NOSUID, os.ST_NODEV: MS_NODEV, os.ST_NOEXEC: MS_NOEXEC,
             os.ST_NOATIME: MS_NOATIME, os.ST_NODIRATIME: MS_NODIRATIME, os.ST_RELATIME: MS_RELATIME}

# Runs the program as __main__ under `python -I -S -B -c`: -S drops site (and its exit/quit), put back.
BOOT = """\
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
DENY_HOOK = """\
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


def count_tasks(uid: int) -> int:
    """Processes + threads of `uid` (what RLIMIT_NPROC counts)."""
    n = 0
    for pid in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            if pid.isdigit() and os.stat(f"/proc/{pid}").st_uid == uid:
                n += len(os.listdir(f"/proc/{pid}/task"))
    return n


def _set_limits(cfg: dict, uid: int | None) -> None:
    cpu = math.ceil(cfg["timeout"]) + 1
    nproc = MAX_PROCESSES if uid is not None else count_tasks(os.getuid()) + MAX_PROCESSES
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
        hook = "" if "netns" in isolation else DENY_HOOK
        isolation.append("rlimits")
        os.write(report_w, b"OK " + json.dumps(isolation).encode() + b"\n")
        os.closerange(3, report_w)
        os.closerange(report_w + 1, MAX_OPEN_FILES + 1024)
        argv = [exe, "-I", "-S", "-B", "-c", BOOT.format(hook=hook)]
        os.execve(exe, argv, {**ENV, "HOME": cwd, "TMPDIR": cwd, **env})
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

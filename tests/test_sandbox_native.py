"""The native launcher's own layers: the seccomp filter, the per-run cgroup, and what both launchers
must still run (benign programs) or stop (a thread bomb).

Every refused call class is attempted through ctypes or the stdlib, as root and as an unprivileged
uid; the program must see EPERM (what the filter returns), so its result is reason "error" with a
PermissionError, and nothing of the attempt may have happened; a call through another ABI
(i386's int 0x80, x32) kills the program with SIGSYS. The whole-sandbox memory cap is
first checked with two allocations before sixteen are run, so a broken cap costs the machine at
most 800 MB, never 6.4 GB.
"""

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading

import pytest
from test_sandbox import _own_cgroup_dirs, _world_python, no_leftovers  # noqa: F401 — the autouse leftover check

from prolix.trainer.cli import main as cli_main
from prolix.trainer.rewards import sandbox
from prolix.trainer.rewards.sandbox import MAX_PROCESSES, run_python

ROOT = os.geteuid() == 0
NATIVE_BUILT = os.access(sandbox.NATIVE_LAUNCHER, os.X_OK)
needs_native = pytest.mark.skipif(not NATIVE_BUILT, reason=f"{sandbox.NATIVE_LAUNCHER} is not built (`make native`)")
EPERM_LINE = "PermissionError: [Errno 1] Operation not permitted"

# Calls without a libc wrapper, by number; the filter's numbers come from the C headers, these
# from the kernel's syscall tables (arch/x86/entry/syscalls/syscall_64.tbl, asm-generic/unistd.h).
SYSCALLS = {
    "x86_64": {"bpf": 321, "io_uring_setup": 425, "perf_event_open": 298, "keyctl": 250, "userfaultfd": 323},
    "aarch64": {"bpf": 280, "io_uring_setup": 425, "perf_event_open": 241, "keyctl": 219, "userfaultfd": 282},
}.get(platform.machine())

# Each program makes one refused call and raises OSError with the errno it got (or prints "done").
_CALL = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
buf = ctypes.create_string_buffer(256)  # zeroed attr/params structs, big enough for each call
rc = {call}
if rc == -1:
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err))
print("done", rc)
"""


def _attacks(trainer_pid: int) -> dict[str, str]:
    nr = SYSCALLS
    calls = {
        "ptrace_trainer": f"libc.ptrace(16, {trainer_pid}, 0, 0)",  # PTRACE_ATTACH
        "bpf": f"libc.syscall({nr['bpf']}, 5, buf, 128)",  # BPF_PROG_LOAD
        "io_uring_setup": f"libc.syscall({nr['io_uring_setup']}, 4, buf)",
        "unshare_user": "libc.unshare(0x10000000)",  # CLONE_NEWUSER
        "mount": "libc.mount(b'none', b'.', b'tmpfs', 0, None)",
        "perf_event_open": f"libc.syscall({nr['perf_event_open']}, buf, 0, -1, -1, 0)",
        "keyctl": f"libc.syscall({nr['keyctl']}, 0, -3, 1)",  # KEYCTL_GET_KEYRING_ID, session, create
        "userfaultfd": f"libc.syscall({nr['userfaultfd']}, 0)",
    }
    programs = {name: _CALL.format(call=call) for name, call in calls.items()}
    programs["af_inet"] = "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_STREAM)\nprint('done')"
    programs["af_netlink"] = "import socket\nsocket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)\nprint('done')"
    return programs


# Runs {name: program} through run_python and prints {name: [reason, last stderr line, stdout]}.
ATTACK_RUNNER = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("prolix_sandbox", sys.argv[1])
sb = importlib.util.module_from_spec(spec)
sys.modules["prolix_sandbox"] = sb
spec.loader.exec_module(sb)
out = {}
for name, code in json.loads(sys.argv[2]).items():
    r = sb.run_python(code, timeout=5)
    out[name] = [r.reason, (r.stderr.strip().splitlines() or [""])[-1], r.stdout, list(r.isolation)]
print(json.dumps(out))
"""
UNPRIVILEGED_UID = sandbox.UID_BASE + sandbox.MAX_SLOTS + 9  # no process of it may be left: checked with ps


def _run_as_unprivileged(programs: dict[str, str]) -> dict[str, list]:
    python = _world_python()
    if python is None:
        pytest.skip("no interpreter that an unprivileged uid can run")
    uid = UNPRIVILEGED_UID
    proc = subprocess.run([python, "-I", "-c", ATTACK_RUNNER, sandbox.__file__, json.dumps(programs)],
                          capture_output=True, text=True, timeout=120, cwd="/", user=uid, group=uid, extra_groups=[])
    assert proc.returncode == 0, proc.stderr
    assert subprocess.run(["ps", "-o", "pid=", "-u", str(uid)], capture_output=True, text=True).stdout == ""
    return json.loads(proc.stdout)


@pytest.fixture
def native(monkeypatch):
    if not NATIVE_BUILT:
        pytest.skip(f"{sandbox.NATIVE_LAUNCHER} is not built (`make native`)")
    monkeypatch.setenv(sandbox.LAUNCHER_ENV, "native")


@pytest.mark.skipif(SYSCALLS is None, reason=f"no syscall table for {platform.machine()}")
@pytest.mark.parametrize("caller", ["root", "unprivileged"])
def test_every_refused_call_class_gets_eperm(native, caller):
    if caller == "root" and not ROOT:
        pytest.skip("needs root")
    if caller == "unprivileged" and not ROOT:
        caller = "self"  # already unprivileged: run in-process
    programs = _attacks(os.getpid())
    if caller == "unprivileged":
        results = _run_as_unprivileged(programs)
    else:
        results = {name: [r.reason, (r.stderr.strip().splitlines() or [""])[-1], r.stdout, list(r.isolation)]
                   for name, r in ((n, run_python(code, timeout=5)) for n, code in programs.items())}
    for name, (reason, last_line, stdout, isolation) in results.items():
        assert "seccomp" in isolation, (name, isolation)
        assert (reason, last_line, stdout) == ("error", EPERM_LINE, ""), f"{name}: {reason} {last_line!r} {stdout!r}"


@needs_native
def test_program_runs_with_the_filter_and_no_new_privileges(monkeypatch):
    monkeypatch.setenv(sandbox.LAUNCHER_ENV, "native")
    r = run_python("print(''.join(l for l in open('/proc/self/status') if l.startswith(('Seccomp:', 'NoNewPrivs:'))))")
    assert r.ok, r.stderr
    assert r.stdout.split() == ["NoNewPrivs:", "1", "Seccomp:", "2"]  # 2: SECCOMP_MODE_FILTER


def _host_gives_root_a_cgroup() -> bool:
    return ROOT and any(os.access(p, os.W_OK) for p in ("/sys/fs/cgroup/memory", "/sys/fs/cgroup/cgroup.procs"))


# {n} processes (the program and n - 1 children) each hold 400 MB at the same time.
ALLOCATE = """
import os, time
def allocate():
    block = bytearray(400 << 20)
    block[::4096] = b"x" * len(range(0, 400 << 20, 4096))  # touch every page: resident, not just mapped
    time.sleep(1)  # hold it while the others allocate
    return block
kids = []
for _ in range({n} - 1):
    pid = os.fork()
    if pid == 0:
        allocate()
        os._exit(0)
    kids.append(pid)
allocate()
failed = sum(os.waitpid(pid, 0)[1] != 0 for pid in kids)
if failed:
    raise SystemExit(f"{{failed}} of {n} allocations failed")
print("all allocated")
"""


@needs_native
def test_sixteen_400mb_processes_hit_the_whole_sandbox_cap(monkeypatch):
    if not _host_gives_root_a_cgroup():
        pytest.skip("no cgroup this caller can create (memory is then bounded per process only)")
    monkeypatch.setenv(sandbox.LAUNCHER_ENV, "native")
    two = run_python(ALLOCATE.format(n=2), timeout=10, memory_mb=512)
    assert "cgroup" in two.isolation and two.reason == "memory", "cap not in force: refusing to run 16 x 400 MB"
    r = run_python(ALLOCATE.format(n=16), timeout=10, memory_mb=512)
    assert (r.ok, r.reason) == (False, "memory") and "all allocated" not in r.stdout
    assert _own_cgroup_dirs() == []  # the run's cgroup went with it
    assert run_python("print('still fine')").stdout == "still fine\n"  # the next sandbox is unaffected


@needs_native
def test_concurrent_runs_get_distinct_cgroups_and_uids(monkeypatch):
    if not _host_gives_root_a_cgroup():
        pytest.skip("no cgroup this caller can create")
    monkeypatch.setenv(sandbox.LAUNCHER_ENV, "native")
    code = ("import os, time\ntime.sleep(0.5)\n"
            "print(os.getuid(), [l.strip() for l in open('/proc/self/cgroup') if ':memory:' in l or l.startswith('0::')])")
    results = [None] * 4
    threads = [threading.Thread(target=lambda k=k: results.__setitem__(k, run_python(code))) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.ok and "cgroup" in r.isolation for r in results), [r.stderr for r in results]
    uids = {r.stdout.split()[0] for r in results}
    cgroups = {r.stdout.split(maxsplit=1)[1] for r in results}
    assert len(uids) == 4 and len(cgroups) == 4 and all("prolix-sandbox-" in c for c in cgroups)
    assert _own_cgroup_dirs() == []


THREAD_BOMB = """
import threading, time
started = 0
try:
    while True:
        threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
        started += 1
finally:
    print(started)
"""


@pytest.mark.parametrize("which", ["native", "python"])
def test_thread_bomb_is_capped(monkeypatch, which):
    if which == "native" and not NATIVE_BUILT:
        pytest.skip("the native launcher is not built")
    monkeypatch.setenv(sandbox.LAUNCHER_ENV, which)
    r = run_python(THREAD_BOMB, timeout=10)  # generous: a loaded 2-core CI machine starts threads slowly
    assert (r.ok, r.reason) == (False, "process_limit"), (r.stdout, r.stderr, r.wall_s, r.isolation)
    assert int(r.stdout) < MAX_PROCESSES * 4  # bounded by the task cap, not by the machine


BENIGN = {
    "stdin_stdout": ("print(sum(map(int, input().split())))", "1 2 3\n", "6\n"),
    "workdir_files": ("open('data.txt', 'w').write('kept')\nimport os\nprint(open('data.txt').read(), os.listdir('.'))",
                      "", "kept ['data.txt', 'main.py']\n"),
    "threads": ("import threading\nout = []\nts = [threading.Thread(target=out.append, args=(i,)) for i in range(4)]\n"
                "[t.start() for t in ts]\n[t.join() for t in ts]\nprint(sorted(out))", "", "[0, 1, 2, 3]\n"),
    "pool": ("from multiprocessing import Pool\nwith Pool(2) as p:\n    print(p.map(abs, [-1, -2, -3]))", "", "[1, 2, 3]\n"),
    "recursion": ("import sys\ndef depth(n):\n    return 0 if n == 0 else 1 + depth(n - 1)\n"
                  "print(depth(sys.getrecursionlimit() - 10))", "", "990\n"),
    "unix_socketpair": ("import socket\na, b = socket.socketpair()\na.sendall(b'ping')\nprint(b.recv(4).decode())",
                        "", "ping\n"),
}


@pytest.mark.parametrize("which", ["native", "python"])
@pytest.mark.parametrize("program", sorted(BENIGN))
def test_benign_programs_keep_working(monkeypatch, which, program):
    if which == "native" and not NATIVE_BUILT:
        pytest.skip("the native launcher is not built")
    monkeypatch.setenv(sandbox.LAUNCHER_ENV, which)
    code, stdin, expected = BENIGN[program]
    r = run_python(code, stdin=stdin, timeout=20)
    assert (r.reason, r.stdout) == ("ok", expected), r.stderr


def test_launcher_choice_is_validated(monkeypatch):
    monkeypatch.setenv(sandbox.LAUNCHER_ENV, "rust")
    with pytest.raises(ValueError, match="PROLIX_SANDBOX_LAUNCHER must be 'auto', 'native' or 'python', got 'rust'"):
        run_python("pass")
    monkeypatch.setenv(sandbox.LAUNCHER_ENV, "native")
    monkeypatch.setattr(sandbox, "NATIVE_LAUNCHER", "/nonexistent/prolix-sandbox")
    with pytest.raises(sandbox.SandboxError, match="not built"):
        run_python("pass")


def test_native_launcher_was_built_where_required():
    """`make test` sets PROLIX_SANDBOX_REQUIRE_NATIVE: with CMake and a C compiler there, a build
    that silently failed must not leave CI testing the Python launcher alone."""
    if not os.environ.get("PROLIX_SANDBOX_REQUIRE_NATIVE"):
        pytest.skip("PROLIX_SANDBOX_REQUIRE_NATIVE is not set (it is under `make test`)")
    if not shutil.which("cmake") or not any(shutil.which(c) for c in ("cc", "gcc", "clang")):
        pytest.skip("no CMake or C compiler here: the native launcher is optional")
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "aarch64"):
        pytest.skip(f"the native launcher is not built on {sys.platform}/{platform.machine()}")
    assert NATIVE_BUILT, f"{sandbox.NATIVE_LAUNCHER} missing: see `make native`'s output"


def test_bench_sandbox_writes_a_row_per_launcher(tmp_path, capsys):
    """`prolix bench sandbox` end to end at 2 runs: the contract of its JSON, not its numbers."""
    assert cli_main(["bench", "sandbox", "--runs", "2", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*-sandbox-*.json")
    results = json.loads(path.read_text())
    expected = ["native", "native, no cgroup", "python"] if NATIVE_BUILT else ["python"]
    assert [r["launcher"] for r in results["launchers"]] == expected
    for row in [*results["launchers"], results["bare_python"]]:
        assert row["n"] == 2 and 0 < row["min_ms"] <= row["median_ms"] <= row["p95_ms"] and row["cpu_ms"] > 0
    assert all(r["runs_per_s_1"] > 0 and r["runs_per_s_2"] > 0 for r in results["launchers"])
    assert {"cpus", "loadavg_1m", "root"} <= set(results["conditions"]["before"])
    assert path.with_suffix(".md").read_text() in capsys.readouterr().out
    assert cli_main(["bench", "sandbox", "--runs", "1", "--out", str(tmp_path)]) == 2
    assert "--runs must be >= 2, got 1" in capsys.readouterr().err


# getpid through the i386 ABI (int 0x80, eax = 20), from an executable page: x86-64 only.
INT80_GETPID = """
import ctypes, mmap
page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
page.write(bytes([0xB8, 20, 0, 0, 0, 0xCD, 0x80, 0xC3]))  # mov eax, 20; int 0x80; ret
fn = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(page)))
print("pid", fn())
"""
X32_GETPID = "import ctypes\nprint('rc', ctypes.CDLL(None).syscall(0x40000000 + 39))"  # __X32_SYSCALL_BIT | getpid


@needs_native
@pytest.mark.skipif(platform.machine() != "x86_64", reason="the i386 and x32 ABIs exist on x86-64 only")
@pytest.mark.parametrize("abi", ["i386", "x32"])
def test_system_calls_of_another_abi_kill_the_program(monkeypatch, abi):
    """Their numbers mean other calls (i386's 20 is getpid, x86-64's is writev), so the filter kills."""
    code = INT80_GETPID if abi == "i386" else X32_GETPID
    if abi == "i386":  # the kernel may lack IA32 emulation; then int 0x80 faults before any filter
        outside = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=30)
        if outside.returncode != 0:
            pytest.skip(f"no i386 system calls on this kernel ({outside.returncode})")
    monkeypatch.setenv(sandbox.LAUNCHER_ENV, "native")
    r = run_python(code)
    assert (r.reason, r.returncode, r.stdout) == ("signal", -signal.SIGSYS, "")

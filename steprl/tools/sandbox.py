"""Run model-written Python in a sandboxed subprocess.

A policy under RL will, sooner or later, write `while True: pass`, a fork bomb or `rm -rf`. Each
snippet runs in a fresh interpreter (`python -I -S`, standard library only) with:
- rlimits on CPU time, address space, process count, file size and open files;
- a wall-clock timeout; the child leads its own session so the whole process group is killed;
- a private temporary directory as cwd and HOME, deleted afterwards;
- output captured in files (not pipes, so a flood of output cannot fill the parent's memory) and
  truncated.
Isolation beyond that depends on what the machine allows; the strongest mode that works is picked
once per process (see `isolation_mode()`):
- "root": we are root. The child gets new network and mount namespaces (no network at all), its
  directory is bind-mounted over /tmp, /var/tmp, /run/lock and /dev/shm (so every world-writable
  place is its own directory), and it runs as a fresh unprivileged uid, so it can write nothing
  else, and every process it leaves behind is found by uid and killed.
- "userns": not root but unprivileged user namespaces work: same namespaces and mounts, same uid.
  The child can still write where the user can (outside the world-writable dirs).
- "plain": neither: rlimits, timeout and a socket guard in a prelude (best effort only).
"""
from __future__ import annotations

import ctypes
import math
import os
import resource
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

MEMORY_BYTES = 512 * 2**20
FILE_BYTES = 2 * 2**20  # largest file the snippet may write (also bounds captured output)
MAX_PROCESSES = 32
MAX_OPEN_FILES = 64
MAX_OUTPUT_CHARS = 4000
MAX_TIMEOUT_S = 60.0

_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
_MS_BIND, _MS_REC, _MS_PRIVATE, _MS_NOSUID, _MS_NODEV = 4096, 16384, 1 << 18, 2, 4
_MNT_DETACH = 2
_WRITABLE_DIRS = ("/var/tmp", "/run/lock", "/dev/shm", "/tmp")  # /tmp last: sbx may live in it
_SOCKET_GUARD = (
    "import socket as _s\n"
    "def _no_network(*a, **k):\n    raise OSError('network access is disabled in this sandbox')\n"
    "_s.socket = _s.create_connection = _s.getaddrinfo = _s.socketpair = _no_network\n"
    "del _s, _no_network\n"
)


@dataclass
class ToolResult:
    ok: bool
    output: str
    error: str | None = None


def run_python(code: str, timeout_s: float = 5.0) -> ToolResult:
    """Run a Python program and return what it prints (standard library only, no network).

    Args:
        code: The complete Python program to run.
        timeout_s: Seconds before the program is stopped.
    """
    if not isinstance(code, str):
        return ToolResult(False, "", f"code must be a string, got {type(code).__name__}")
    try:
        timeout_s = min(float(timeout_s), MAX_TIMEOUT_S)
    except (TypeError, ValueError):
        return ToolResult(False, "", f"timeout_s must be a number, got {timeout_s!r}")
    if not timeout_s > 0:
        return ToolResult(False, "", "timeout_s must be positive")
    return _run(code, timeout_s, isolation_mode())


_MODE: str | None = None


def isolation_mode() -> str:
    """'root', 'userns' or 'plain': the strongest isolation that works here (probed once)."""
    global _MODE
    if _MODE is None:
        candidates = ["root", "userns"] if os.geteuid() == 0 else ["userns"]
        _MODE = "plain"
        for mode in candidates:
            probe = _run("open('probe.txt', 'w').write('x'); print(open('probe.txt').read())", 10.0, mode)
            if probe.ok and probe.output.strip() == "x":
                _MODE = mode
                break
    return _MODE


def _run(code: str, timeout_s: float, mode: str) -> ToolResult:
    uid = 1_100_000 + secrets.randbelow(1_000_000) if mode == "root" else os.getuid()
    gid = uid if mode == "root" else os.getgid()
    workdir = tempfile.mkdtemp(prefix="steprl-sandbox-")
    try:
        stash = os.path.join(workdir, ".python")  # mount point used while exposing the interpreter
        os.mkdir(stash)
        with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        if mode == "root":
            os.chown(workdir, uid, gid)
            os.chown(os.path.join(workdir, "main.py"), uid, gid)
        python = os.path.realpath(sys.executable)
        argv = [python, "-I", "-S", "-X", "utf8"]
        argv += ["-c", _SOCKET_GUARD + "exec(compile(open('main.py').read(), 'main.py', 'exec'))"] if mode == "plain" else ["main.py"]
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        env["HOME"] = env["TMPDIR"] = "/tmp" if mode != "plain" else workdir
        cpu_s = math.ceil(timeout_s) + 1
        preexec = _Preexec(mode, workdir, stash, uid, gid, cpu_s, _hidden_ancestor(sys.base_prefix))
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=workdir,
                                        env=env, start_new_session=True, preexec_fn=preexec)
            except (OSError, subprocess.SubprocessError) as e:
                return ToolResult(False, "", f"sandbox failed to start: {e}")
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_all(proc, uid if mode == "root" else None)
            stdout, stderr = _read(out), _read(err)
    finally:
        _remove(workdir)
    output = _truncate(stdout + (("\n" if stdout and not stdout.endswith("\n") else "") + stderr if stderr else ""))
    if timed_out:
        return ToolResult(False, output, f"timeout after {timeout_s}s")
    if proc.returncode == 0:
        return ToolResult(True, output, None)
    return ToolResult(False, output, _describe_failure(proc.returncode, stderr))


class _Preexec:
    """Runs in the child between fork and exec: namespaces, mounts, limits, then drop to `uid`."""

    def __init__(self, mode, workdir, stash, uid, gid, cpu_s, hidden):
        self.mode, self.workdir, self.stash, self.uid, self.gid = mode, workdir, stash, uid, gid
        self.cpu_s, self.hidden = cpu_s, hidden
        self.libc = ctypes.CDLL(None, use_errno=True) if mode != "plain" else None

    def __call__(self):
        if self.mode == "root":
            self._syscall("unshare", _CLONE_NEWNS | _CLONE_NEWNET)
        elif self.mode == "userns":
            uid, gid = os.getuid(), os.getgid()
            self._syscall("unshare", _CLONE_NEWUSER | _CLONE_NEWNS | _CLONE_NEWNET)
            for path, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
                with open(f"/proc/self/{path}", "w") as f:
                    f.write(text)
        if self.mode != "plain":
            self._mount(None, "/", None, _MS_REC | _MS_PRIVATE)
            if self.mode == "root" and self.hidden:
                self._expose_python(*self.hidden)
            for target in _WRITABLE_DIRS:
                if os.path.isdir(target) and not os.path.islink(target):
                    self._mount(self.workdir, target, None, _MS_BIND)
            os.chdir("/tmp")
        limits = [(resource.RLIMIT_CPU, self.cpu_s, self.cpu_s + 1), (resource.RLIMIT_AS, MEMORY_BYTES, MEMORY_BYTES),
                  (resource.RLIMIT_FSIZE, FILE_BYTES, FILE_BYTES), (resource.RLIMIT_NOFILE, MAX_OPEN_FILES, MAX_OPEN_FILES),
                  (resource.RLIMIT_CORE, 0, 0)]
        if self.mode == "root":  # a per-run uid makes the count ours alone; root itself is never limited
            limits.append((resource.RLIMIT_NPROC, MAX_PROCESSES, MAX_PROCESSES))
        for which, soft, hard in limits:
            resource.setrlimit(which, (soft, hard))
        if self.mode == "root":
            os.setgroups([])
            os.setgid(self.gid)
            os.setuid(self.uid)

    def _expose_python(self, ancestor, prefix):
        """The interpreter lives under a directory others cannot enter (e.g. /root, mode 700):
        cover that directory with an empty tmpfs and bind just the interpreter back into place."""
        self._mount(prefix, self.stash, None, _MS_BIND | _MS_REC)
        self._mount(b"tmpfs", ancestor, b"tmpfs", _MS_NOSUID | _MS_NODEV, b"mode=755,size=64k")
        os.makedirs(prefix, exist_ok=True)
        self._mount(self.stash, prefix, None, _MS_BIND | _MS_REC)
        self._syscall("umount2", self.stash.encode(), _MNT_DETACH)

    def _mount(self, source, target, fstype, flags, data=None):
        enc = lambda s: s.encode() if isinstance(s, str) else s
        self._syscall("mount", enc(source), enc(target), enc(fstype), flags, enc(data))

    def _syscall(self, name, *args):
        if getattr(self.libc, name)(*args) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"{name}{args}: {os.strerror(errno)}")


def _hidden_ancestor(prefix: str) -> tuple[str, str] | None:
    """(highest ancestor of the interpreter's prefix that others cannot traverse, prefix) or None."""
    prefix = os.path.realpath(prefix)
    parts = prefix.strip("/").split("/")
    for i in range(1, len(parts) + 1):
        path = "/" + "/".join(parts[:i])
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return (path, prefix) if path != prefix else None
    return None


def _kill_all(proc: subprocess.Popen, uid: int | None) -> None:
    """Kill the child's process group, and with a per-run uid every process running as it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    if uid is None:
        return
    for _ in range(100):  # loop: a fork bomb may fork between listing and killing
        pids = _pids_of(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.01)


def _pids_of(uid: int) -> list[int]:
    """Live (non-zombie) processes whose real uid is `uid`."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if int(fields.get("Uid", "-1").split()[0]) == uid and not fields.get("State", "").strip().startswith("Z"):
            pids.append(int(entry))
    return pids


def _read(f) -> str:
    f.seek(0)
    return f.read(FILE_BYTES + 1).decode("utf-8", errors="replace")


def _truncate(text: str) -> str:
    if len(text) <= MAX_OUTPUT_CHARS:
        return text
    half = MAX_OUTPUT_CHARS // 2
    return f"{text[:half]}\n... [{len(text) - 2 * half} characters truncated] ...\n{text[-half:]}"


def _describe_failure(returncode: int, stderr: str) -> str:
    if returncode < 0:
        sig = -returncode
        reason = {signal.SIGXCPU: "CPU time limit exceeded", signal.SIGKILL: "killed (CPU time or memory limit)",
                  signal.SIGXFSZ: "file size limit exceeded", signal.SIGSEGV: "segmentation fault"}
        return reason.get(sig, f"killed by signal {signal.Signals(sig).name}")
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return lines[-1][:300] if lines else f"exit status {returncode}"


def _remove(path: str) -> None:
    """Delete the sandbox directory, even parts the snippet made unreadable (chmod 000)."""
    def fix_and_retry(func, p, _exc):
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass
    shutil.rmtree(path, onerror=fix_and_retry)

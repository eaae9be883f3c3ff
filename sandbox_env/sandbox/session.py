"""Sandboxed, stateful python and shell sessions for model-written code (bubblewrap).

Popular agent libraries run model code with a "local executor" that is explicitly not a
security boundary. This module is one: every session is a bubblewrap container with its own
network, PID, IPC and UTS namespaces (no network at all, no view of host processes), a
read-only view of only the interpreter and system libraries, a private writable work dir,
an empty environment, resource limits and a wall-clock timeout that kills the whole process
tree. The one idea: a session is ONE long-lived python worker (`_py_worker.py`) inside that
container, spoken to over pipes, so interpreter state persists across calls like a notebook
and a warm call costs a pipe round trip, not an interpreter start. A hostile call fails only
itself: if the worker dies or hangs it is killed with its whole namespace and restarted on the
next call (its state is then lost, and the result says so).

What the code sees: /usr (and the /bin, /lib* links into it), a few /etc files the dynamic
loader needs, the interpreter's install and venv, all read-only; a fresh /proc of its own PID
namespace, a minimal /dev, private tmpfs /tmp, /dev/shm and home, and the work dir (a host temp
dir, bind-mounted read-write at /home/sandbox/work). Nothing else of the host: no /home, /root,
/work, /etc/shadow, /var, /run, /sys.

Two ways bubblewrap is run, chosen by who we are on the host (both tested in this container):
- an unprivileged user (the usual case, CI): new user, PID, network, IPC, UTS and cgroup
  namespaces; the sandbox user is uid 65534 there, with no capabilities and `--disable-userns`.
- real root (containers, like this project's dev box): a user namespace would map the sandbox
  to host uid 0, and the kernel never applies RLIMIT_NPROC to uid 0, so a fork bomb would not be
  contained. Instead bwrap runs without a user namespace, keeps only CAP_SETUID/CAP_SETGID, and
  the worker immediately becomes a random unprivileged uid of its own (all capabilities drop
  with it; bwrap set no_new_privs). The sandbox user then owns nothing on the host but its work
  dir, cannot signal or ptrace bwrap's root-owned PID 1, and has its own process budget.

    from sandbox_env import Sandbox, SandboxConfig
    with Sandbox(SandboxConfig(timeout_s=10)) as sb:
        sb.write_file("data.csv", "a,b\\n1,2\\n")
        sb.run_python("x = 2\\nprint(x + 1)").output      # '3\\n'
        sb.run_python("x * 10").output                   # '20\\n' (a trailing expression is shown)
        sb.run_shell("wc -l data.csv").output
"""

from __future__ import annotations

import atexit
import dataclasses
import errno
import functools
import json
import logging
import marshal
import os
import random
import select
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

logger = logging.getLogger(__name__)

_HEADER = struct.Struct(">I")
_WORKER_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_py_worker.py")
_WORKER_IN_SANDBOX = "/opt/sandbox/worker"  # + ".py" or ".pyc"
HOME_IN_SANDBOX = "/home/sandbox"
WORKDIR_IN_SANDBOX = "/home/sandbox/work"
_SANDBOX_USER_NS_UID = 65534  # "nobody" inside the user namespace (unprivileged host mode)
_ROOT_MODE_UID_BASE = 200_000  # per-session uids in root mode: far above any real account
_INSTALL_HINT = (
    "bubblewrap (the 'bwrap' program) is required for the sandbox but was not found on PATH. "
    "Install it with 'sudo apt-get install bubblewrap' (Debian/Ubuntu), 'sudo dnf install bubblewrap' "
    "(Fedora) or run 'bash scripts/setup.sh'. For trusted code only, SandboxConfig(isolation='none') "
    "runs without isolation."
)
_USERNS_HINT = (
    "bubblewrap could not create its namespaces. Unprivileged user namespaces may be disabled: try "
    "'sudo sysctl -w kernel.unprivileged_userns_clone=1' (Debian) or "
    "'sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0' (Ubuntu >= 23.10), or run as root."
)


@dataclass
class SandboxConfig:
    """Limits and isolation of one sandbox session. All limits apply to model-written code."""

    timeout_s: float = 10.0
    """Wall clock per call. Python code is interrupted at the limit (state kept); if it does
    not yield within `kill_grace_s` more, the whole sandbox is killed and restarted (state lost)."""
    cpu_seconds: int = 60
    """RLIMIT_CPU of each sandbox process, over its whole life (the python worker included)."""
    memory_mb: int = 1024
    """RLIMIT_AS (address space) of each sandbox process, in MiB."""
    max_processes: int = 64
    """RLIMIT_NPROC: processes plus threads of the sandbox user (contains fork bombs; not applied
    with isolation='none', where it would count all of the host user's processes)."""
    max_file_mb: int = 64
    """RLIMIT_FSIZE: the largest file a sandbox process may write, in MiB."""
    max_open_files: int = 256
    """RLIMIT_NOFILE of each sandbox process."""
    max_output_bytes: int = 16384
    """Output (stdout+stderr) kept per call: the head and the tail, with a marker in between."""
    tmpfs_mb: int = 256
    """Size of each private tmpfs in the sandbox (/tmp and the home dir), in MiB."""
    isolation: str = "bwrap"
    """'bwrap' (default) or 'none': no isolation at all, for trusted code only (warns loudly)."""
    python: str | None = None
    """Interpreter run in the sandbox; None = the one running this process (its venv is visible
    read-only, so its packages are importable)."""
    kill_grace_s: float = 1.0
    """Extra seconds a timed-out call gets to yield before the sandbox is killed."""
    start_timeout_s: float = 20.0
    """How long the worker may take to start before the session reports a start failure."""

    def __post_init__(self):
        def positive(name, kind):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
                raise ValueError(f"SandboxConfig.{name} must be a positive {'number' if kind is not int else 'integer'}, "
                                 f"got {value!r}; set e.g. sandbox.{name}={getattr(SandboxConfig, name)}")

        for name in ("timeout_s", "kill_grace_s", "start_timeout_s"):
            positive(name, (int, float))
        for name in ("cpu_seconds", "memory_mb", "max_processes", "max_file_mb", "max_open_files",
                     "max_output_bytes", "tmpfs_mb"):
            positive(name, int)
        if self.max_open_files < 16:
            raise ValueError(f"SandboxConfig.max_open_files={self.max_open_files} is too small for python "
                             "itself to run; use at least 16 (default 256)")
        if self.memory_mb < 64:
            raise ValueError(f"SandboxConfig.memory_mb={self.memory_mb} is too small for python itself to "
                             "start; use at least 64 (default 1024)")
        if self.isolation not in ("bwrap", "none"):
            raise ValueError(f"SandboxConfig.isolation must be 'bwrap' or 'none', got {self.isolation!r}")
        if self.python is not None and not (isinstance(self.python, str) and os.path.isabs(self.python)):
            raise ValueError(f"SandboxConfig.python must be an absolute path to an interpreter or None, "
                             f"got {self.python!r}")


@dataclass
class RunResult:
    """What one run_python / run_shell call did."""

    output: str
    """stdout and stderr, interleaved as written, truncated to max_output_bytes with a marker."""
    ok: bool
    """True when the code ran to the end without an exception (shell: exit status 0)."""
    timed_out: bool = False
    error: str | None = None
    """Why the call failed (the exception line, the exit status, a timeout, a dead worker); None when ok."""
    truncated: bool = False
    exit_code: int | None = None
    """Shell calls: the command's exit status (negative: killed by that signal)."""
    state_lost: bool = False
    """True when the interpreter had to be restarted, so earlier variables and imports are gone."""
    duration_s: float = 0.0


def _is_root_mode() -> bool:
    return os.geteuid() == 0


@functools.lru_cache(maxsize=8)
def _interpreter_roots(python: str) -> tuple[str, ...]:
    """Host directories the interpreter needs (its venv and its base install), outside /usr."""
    # Compare the paths as given: every venv of one base install resolves to the same binary.
    if os.path.abspath(python) == os.path.abspath(sys.executable):
        prefixes = [sys.prefix, sys.base_prefix]
    else:
        # Without -S: site.py is what points sys.prefix at a venv.
        out = subprocess.run([python, "-I", "-c", "import sys; print(sys.prefix); print(sys.base_prefix)"],
                             capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise ValueError(f"SandboxConfig.python={python!r} does not run: {out.stderr.strip()[-300:]}")
        prefixes = out.stdout.split()
    roots = set()
    for p in prefixes + [os.path.dirname(os.path.dirname(os.path.realpath(python)))]:
        for q in {os.path.abspath(p), os.path.realpath(p)}:
            if not (q == "/usr" or q.startswith("/usr/")):
                roots.add(q)
    # drop roots nested in other roots: one bind covers them
    roots = sorted(r for r in roots if not any(r != o and r.startswith(o + "/") for o in roots))
    home = os.path.expanduser("~")
    for r in roots:
        # The whole install becomes visible to the sandboxed code: never a home or a top dir.
        if r.count("/") < 2 or r == home or home.startswith(r + "/"):
            raise ValueError(f"the interpreter {python!r} is installed at {r!r}; making it visible in the sandbox "
                             "would expose too much of the host. Use a venv or an install in its own directory "
                             "(SandboxConfig.python)")
    return tuple(roots)


@functools.lru_cache(maxsize=8)
def _worker_script(python: str) -> str:
    """The worker as bytecode when the sandbox runs our own interpreter (compiling the source on
    every session start would cost ~10 ms of the ~30 ms start), else as source.

    The .pyc goes where Python itself caches bytecode (next to the source, as trusted as the
    source); if that is not writable, into a private temp dir. Never a shared, guessable path:
    the worker starts with the right to change uids, so its code must not be swappable.
    """
    if os.path.realpath(python) != os.path.realpath(sys.executable):
        return _WORKER_SRC
    import importlib.util
    import py_compile

    target = importlib.util.cache_from_source(_WORKER_SRC)
    try:
        if os.path.getmtime(target) >= os.path.getmtime(_WORKER_SRC):
            return target
    except OSError:
        pass
    try:
        return py_compile.compile(_WORKER_SRC, cfile=target, doraise=True)
    except (OSError, py_compile.PyCompileError):
        private = tempfile.mkdtemp(prefix="aq-sandbox-worker-")
        atexit.register(shutil.rmtree, private, True)
        return py_compile.compile(_WORKER_SRC, cfile=os.path.join(private, "worker.pyc"), doraise=True)


@functools.lru_cache(maxsize=8)
def _site_dirs(python: str) -> tuple[str, ...]:
    """The interpreter's site-packages dirs (the worker runs with -S and adds them itself)."""
    if os.path.abspath(python) == os.path.abspath(sys.executable):  # as in _interpreter_roots
        path = sys.path
    else:
        out = subprocess.run([python, "-I", "-c", "import sys, json; print(json.dumps(sys.path))"],
                             capture_output=True, text=True, timeout=30)
        path = json.loads(out.stdout) if out.returncode == 0 else []
    return tuple(p for p in path if os.path.basename(p) in ("site-packages", "dist-packages"))


@functools.lru_cache(maxsize=8)
def _static_bwrap_args(python: str, tmpfs_bytes: int, root_mode: bool) -> tuple[str, ...]:
    args = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
            "--hostname", "sandbox", "--new-session", "--die-with-parent"]
    if root_mode:
        args += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        args += ["--unshare-user", "--uid", str(_SANDBOX_USER_NS_UID), "--gid", str(_SANDBOX_USER_NS_UID),
                 "--disable-userns", "--cap-drop", "ALL"]
    # The read-only view: system programs and libraries, and the interpreter; nothing else of
    # the host (no /home, /root, /work, /etc/shadow, /var, /run, /sys).
    args += ["--ro-bind", "/usr", "/usr"]
    for d in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(d):
            args += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            args += ["--ro-bind", d, d]
    # bwrap would create /etc with mode 0700 (owned by root): the sandbox user could not read the
    # linker cache, the time zone or /etc/alternatives (awk, editor, ... are links through it).
    args += ["--perms", "0755", "--dir", "/etc"]
    for f in ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "alternatives"):
        args += ["--ro-bind-try", f"/etc/{f}", f"/etc/{f}"]
    # The private /tmp goes before the interpreter's binds: bwrap mounts in order, so a tmpfs on /tmp
    # mounted later would hide an interpreter or venv that lives under /tmp (a checkout in /tmp).
    args += ["--perms", "1777", "--size", str(tmpfs_bytes), "--tmpfs", "/tmp"]
    made: set[str] = set()
    for root in _interpreter_roots(python):
        if root == HOME_IN_SANDBOX or root.startswith(HOME_IN_SANDBOX + "/"):
            raise ValueError(f"the interpreter lives under {root}, which collides with the sandbox home "
                             f"{HOME_IN_SANDBOX}; set SandboxConfig.python to an interpreter elsewhere")
        # bwrap would create the mount point's parents with the host's modes (e.g. /root is
        # 0700), which the unprivileged sandbox user could not traverse: make them 0755 first.
        parent, parents = os.path.dirname(root), []
        while parent not in ("/", "") and parent not in made:
            parents.append(parent)
            made.add(parent)
            parent = os.path.dirname(parent)
        for d in reversed(parents):
            args += ["--perms", "0755", "--dir", d]
        args += ["--ro-bind", root, root]
    script = _worker_script(python)
    args += ["--perms", "0755", "--dir", os.path.dirname(_WORKER_IN_SANDBOX),
             "--ro-bind", script, _WORKER_IN_SANDBOX + os.path.splitext(script)[1],
             "--proc", "/proc", "--dev", "/dev",
             "--perms", "1777", "--size", str(tmpfs_bytes), "--tmpfs", "/dev/shm",  # multiprocessing needs it
             "--perms", "1777", "--size", str(tmpfs_bytes), "--tmpfs", HOME_IN_SANDBOX]
    return tuple(args)


# One thread per math library: BLAS/OpenMP would otherwise start one thread per host core on
# `import numpy`, which on a big machine exceeds max_processes and memory_mb in every session.
_SINGLE_THREADED = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


def _clean_env(python: str, home: str) -> dict[str, str]:
    # No host variable gets in: API keys and tokens in the host environment stay invisible.
    return {"PATH": f"{os.path.dirname(os.path.abspath(python))}:/usr/local/bin:/usr/bin:/bin",
            "HOME": home, "LANG": "C.UTF-8", "TMPDIR": "/tmp" if home == HOME_IN_SANDBOX else tempfile.gettempdir(),
            **_SINGLE_THREADED}


def _describe_death(returncode: int | None, cfg: SandboxConfig, bwrap: bool) -> str:
    sig = None
    if returncode is not None and returncode < 0:
        sig = -returncode
    elif bwrap and returncode is not None and returncode > 128:
        sig = returncode - 128  # bwrap reports a child killed by signal N as status 128+N
    if sig is not None:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        why = {
            "SIGKILL": f"killed: the memory (memory_mb={cfg.memory_mb}) or CPU (cpu_seconds={cfg.cpu_seconds}) "
                       "limit was hit, or the code killed its own process",
            "SIGXCPU": f"the CPU-time limit (cpu_seconds={cfg.cpu_seconds}) was exceeded",
            "SIGSEGV": "it crashed (segmentation fault)",
        }.get(name, f"it was killed by signal {name}")
        return f"the python worker died: {why}"
    return f"the python worker exited (status {returncode})"


class Sandbox:
    """One isolated, stateful session (one episode). Use as a context manager.

    The worker starts lazily on the first run_python/run_shell, so a session that only gets
    files written costs a temp dir. write_file/read_file act on the work dir from the host,
    never following links the sandboxed code may have planted.
    """

    def __init__(self, config: SandboxConfig | None = None, **overrides):
        if config is None:
            config = SandboxConfig(**overrides)
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        if not isinstance(config, SandboxConfig):
            raise TypeError(f"Sandbox(config) takes a SandboxConfig, got {type(config).__name__}")
        self.config = config
        self.python = config.python or sys.executable
        self._bwrap: str | None = None
        if config.isolation == "bwrap":
            self._bwrap = shutil.which("bwrap")
            if self._bwrap is None:
                raise RuntimeError(_INSTALL_HINT)
        else:
            msg = ("SANDBOX ISOLATION IS OFF (SandboxConfig.isolation='none'): model-written code runs as "
                   "you, with your files, environment and network. Use this for trusted code only.")
            logger.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
        self._root_mode = _is_root_mode() and self._bwrap is not None
        self.workdir: str | None = None
        self.worker_starts = 0
        self._proc: subprocess.Popen | None = None
        self._req_w = self._resp_r = -1
        # What must be released even if the session is never closed: the garbage collector or
        # interpreter exit runs _cleanup on it. _stop_worker/close empty it as they release.
        self._resources: dict = {"bwrap": self._bwrap is not None}
        self._finalizer = weakref.finalize(self, _cleanup, self._resources)
        self._uid = self._gid = None
        self._closed = False
        self._lock = threading.Lock()  # one call at a time: the protocol is strictly request/response

    # -- session lifetime -------------------------------------------------------------------
    def __enter__(self) -> Sandbox:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> Sandbox:
        """Creates the work dir (the worker itself starts on the first call). Idempotent."""
        if self._closed:
            raise RuntimeError("this Sandbox session is closed; start a new Sandbox for a new episode")
        if self.workdir is not None:
            return self
        self.workdir = tempfile.mkdtemp(prefix="aq-sandbox-")
        self._resources["workdir"] = self.workdir
        if self._root_mode:
            self._uid = self._gid = _ROOT_MODE_UID_BASE + random.randrange(1 << 20)
            os.chown(self.workdir, self._uid, self._gid)
        return self

    def close(self) -> None:
        """Kills the sandbox and removes the work dir. Idempotent."""
        self._stop_worker()
        _cleanup(self._resources)
        self.workdir = None
        self._closed = True

    @property
    def path_in_sandbox(self) -> str:
        """Where the work dir appears to the sandboxed code (its current directory)."""
        return WORKDIR_IN_SANDBOX if self._bwrap else (self.workdir or "")

    # -- calls ------------------------------------------------------------------------------
    def run_python(self, code: str, timeout_s: float | None = None) -> RunResult:
        """Runs code in the session's persistent interpreter; a trailing expression is shown."""
        return self._call("python", code, timeout_s)

    def run_shell(self, command: str, timeout_s: float | None = None) -> RunResult:
        """Runs `/bin/sh -c command` in the work dir, inside the same sandbox."""
        return self._call("shell", command, timeout_s)

    def _call(self, op: str, code: str, timeout_s: float | None) -> RunResult:
        with self._lock:
            return self._call_locked(op, code, timeout_s)

    def _call_locked(self, op: str, code: str, timeout_s: float | None) -> RunResult:
        if not isinstance(code, str):
            raise TypeError(f"run_{op} takes the code as str, got {type(code).__name__}")
        timeout = float(timeout_s if timeout_s is not None else self.config.timeout_s)
        if timeout <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
        if self.workdir is None:
            self.open()
        t0 = time.monotonic()
        notice = None
        if self._proc is not None and self._proc.poll() is not None:
            why = _describe_death(self._proc.returncode, self.config, self._bwrap is not None)
            self._stop_worker()
            notice = f"[note: since the previous call, {why}; the interpreter was restarted and its state was lost]"
        if self._proc is None:  # first call, or the previous call killed it (and said so)
            self._start_worker()
        request = marshal.dumps({"op": op, "code": code, "timeout": timeout})
        try:
            _write_all(self._req_w, _HEADER.pack(len(request)) + request)
            resp = self._recv(t0 + timeout + self.config.kill_grace_s)
        except BrokenPipeError:
            resp = "eof"
        if isinstance(resp, dict):
            output = resp["output"] if notice is None else f"{notice}\n{resp['output']}"
            return RunResult(output=output, ok=resp["ok"], timed_out=resp["timed_out"], error=resp["error"],
                             truncated=resp["truncated"], exit_code=resp["exit_code"],
                             state_lost=notice is not None, duration_s=time.monotonic() - t0)
        # The worker hung past the grace period or died mid-call: kill the whole sandbox.
        if resp != "timeout":
            try:  # a worker that exited: let bwrap report its status before we kill anything
                self._proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
        returncode = self._stop_worker()
        if resp == "timeout":
            error = (f"TimeoutError: the call ran longer than timeout_s={timeout:g} and did not yield, so the "
                     "sandbox was killed; the interpreter state was lost (the next call starts a fresh one)")
        else:
            error = (_describe_death(returncode, self.config, self._bwrap is not None)
                     + "; the interpreter state was lost (the next call starts a fresh one)")
        output = error if notice is None else f"{notice}\n{error}"
        return RunResult(output=output, ok=False, timed_out=resp == "timeout", error=error, state_lost=True,
                         duration_s=time.monotonic() - t0)

    # -- files --------------------------------------------------------------------------------
    def write_file(self, path: str, content: str | bytes) -> str:
        """Writes a file in the work dir (parent dirs created); returns its path in the sandbox."""
        if self.workdir is None:
            self.open()
        data = content.encode() if isinstance(content, str) else bytes(content)
        parts = self._parts(path)
        fd = self._open_in_workdir(parts, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, create_dirs=True)
        try:
            if self._uid is not None:
                os.fchown(fd, self._uid, self._gid)
            _write_all(fd, data)
        finally:
            os.close(fd)
        return os.path.join(self.path_in_sandbox, *parts)

    def read_file(self, path: str, max_bytes: int = 16 << 20) -> str:
        """Reads a regular file of the work dir as text (undecodable bytes replaced)."""
        if self.workdir is None:
            raise ValueError("read_file: the session is not open (use `with Sandbox(...) as sb`)")
        # O_NONBLOCK: a FIFO planted by the sandboxed code must not hang the host.
        fd = self._open_in_workdir(self._parts(path), os.O_RDONLY | os.O_NONBLOCK, create_dirs=False)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"read_file: {path!r} is not a regular file")
            if st.st_size > max_bytes:
                raise ValueError(f"read_file: {path!r} has {st.st_size} bytes, more than max_bytes={max_bytes}")
            with os.fdopen(os.dup(fd), "rb") as f:
                return f.read(max_bytes).decode("utf-8", "replace")
        finally:
            os.close(fd)

    def _parts(self, path: str) -> list[str]:
        if not isinstance(path, str) or not path:
            raise ValueError(f"a work-dir path must be a non-empty str, got {path!r}")
        for prefix in (WORKDIR_IN_SANDBOX, self.workdir):
            if prefix and (path == prefix or path.startswith(prefix + "/")):
                path = path[len(prefix):].lstrip("/")
                break
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if path.startswith("/") or not parts or ".." in parts:
            raise ValueError(f"path {path!r} must name a file inside the work dir (relative, no '..')")
        return parts

    def _open_in_workdir(self, parts: list[str], flags: int, create_dirs: bool) -> int:
        # Walk one component at a time with O_NOFOLLOW: a symlink in the work dir (which the
        # sandboxed code controls) can never lead the host outside of it.
        dfd = os.open(self.workdir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for part in parts[:-1]:
                try:
                    nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
                except FileNotFoundError:
                    if not create_dirs:
                        raise
                    os.mkdir(part, 0o755, dir_fd=dfd)
                    nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
                    if self._uid is not None:
                        os.fchown(nfd, self._uid, self._gid)
                os.close(dfd)
                dfd = nfd
            try:
                return os.open(parts[-1], flags | os.O_NOFOLLOW, 0o644, dir_fd=dfd)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise ValueError(f"{'/'.join(parts)!r} is a symlink; the host does not follow links "
                                     "in the work dir") from None
                raise
        finally:
            os.close(dfd)

    # -- the worker ---------------------------------------------------------------------------
    def _worker_argv_env(self, req_r: int, resp_w: int, alive_r: int, info_w: int) -> tuple[list[str], dict]:
        cfg = self.config
        mib = 1 << 20
        limits = {
            "RLIMIT_CPU": [cfg.cpu_seconds, cfg.cpu_seconds + 1],  # SIGXCPU first, SIGKILL 1 s later
            "RLIMIT_AS": cfg.memory_mb * mib,
            "RLIMIT_NPROC": cfg.max_processes,
            "RLIMIT_FSIZE": cfg.max_file_mb * mib,
            "RLIMIT_NOFILE": cfg.max_open_files,
            "RLIMIT_CORE": 0,
        }
        if not self._bwrap:
            # Without a sandbox uid of its own, RLIMIT_NPROC would count all of the host user's
            # processes and could forbid the shell from starting at all.
            del limits["RLIMIT_NPROC"]
        if self._bwrap:
            script = _worker_script(self.python)
            home, workdir, script = HOME_IN_SANDBOX, WORKDIR_IN_SANDBOX, _WORKER_IN_SANDBOX + os.path.splitext(script)[1]
        else:
            home, workdir, script = self.workdir, self.workdir, _worker_script(self.python)
        worker_cfg = {"uid": self._uid, "gid": self._gid, "limits": limits, "workdir": workdir, "alive_fd": alive_r,
                      "max_output_bytes": cfg.max_output_bytes, "site_dirs": _site_dirs(self.python)}
        cmd = [self.python, "-I", "-S", "-B", script, str(req_r), str(resp_w), marshal.dumps(worker_cfg).hex()]
        env = _clean_env(self.python, home)
        if not self._bwrap:
            return cmd, env
        argv = [self._bwrap, *_static_bwrap_args(self.python, cfg.tmpfs_mb * mib, self._root_mode),
                "--bind", self.workdir, WORKDIR_IN_SANDBOX, "--info-fd", str(info_w),
                "--clearenv"]  # the worker chdirs there itself
        for k, v in env.items():
            argv += ["--setenv", k, v]
        return argv + cmd, {}

    def _start_worker(self) -> None:
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        # Nothing is ever written to the "alive" pipe: the worker sees EOF on it exactly when
        # this process is gone (even by SIGKILL), and then ends the sandbox. --die-with-parent
        # alone only ties the sandbox to the bwrap process, not to us.
        alive_r, alive_w = os.pipe()
        # bwrap writes the host pid of the sandbox's PID 1 to the info pipe (then closes it).
        info_r, info_w = os.pipe() if self._bwrap else (-1, -1)
        try:
            argv, env = self._worker_argv_env(req_r, resp_w, alive_r, info_w)
            self._proc = _spawn(
                argv, env=env, pass_fds=tuple(fd for fd in (req_r, resp_w, alive_r, info_w) if fd >= 0),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                cwd=self.workdir, start_new_session=True)
        except BaseException:
            for fd in (req_r, req_w, resp_r, resp_w, alive_r, alive_w, info_r, info_w):
                if fd >= 0:
                    os.close(fd)
            raise
        for fd in (req_r, resp_w, alive_r, info_w):
            if fd >= 0:
                os.close(fd)
        self._req_w, self._resp_r = req_w, resp_r
        self._resources.update(proc=self._proc, fds=[req_w, resp_r, alive_w])
        self.worker_starts += 1
        ready = self._recv(time.monotonic() + self.config.start_timeout_s)
        if info_r >= 0:
            pidfd = _read_pid1(info_r)  # written before the worker started: never waits here
            if pidfd is not None:
                self._resources["pidfd"] = pidfd
        if not (isinstance(ready, dict) and ready.get("ready")):
            proc = self._proc
            returncode = self._stop_worker(keep_stderr=True)
            err = proc.stderr.read().decode("utf-8", "replace").strip()[-2000:]
            proc.stderr.close()
            hint = _USERNS_HINT if self._bwrap and ("namespace" in err or "uid map" in err) else ""
            raise RuntimeError(f"the sandbox failed to start ({'timed out' if ready == 'timeout' else 'exited'}, "
                               f"status {returncode}): {err or '(no message)'} {hint}".strip())

    def _stop_worker(self, keep_stderr: bool = False) -> int | None:
        proc = self._proc
        if proc is None:
            return None
        self._proc = None
        returncode = _kill_tree(proc, self._resources.pop("pidfd", None), bwrap=self._bwrap is not None)
        for fd in self._resources.pop("fds", ()):
            os.close(fd)
        self._resources.pop("proc", None)
        self._req_w = self._resp_r = -1
        if proc.stderr is not None and not keep_stderr:
            proc.stderr.close()
        return returncode

    def _recv(self, deadline: float):
        """One framed message, or 'timeout' / 'eof'."""
        buf = b""
        need = _HEADER.size
        have_header = False
        while True:
            while len(buf) < need:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return "timeout"
                ready, _, _ = select.select([self._resp_r], [], [], remaining)
                if not ready:
                    return "timeout"
                chunk = os.read(self._resp_r, max(need - len(buf), 65536))
                if not chunk:
                    return "eof"
                buf += chunk
            if have_header:
                try:
                    return json.loads(buf[_HEADER.size:need])
                except ValueError:
                    return "eof"  # garbage on the protocol pipe: treat the worker as broken
            need = _HEADER.size + _HEADER.unpack(buf[:_HEADER.size])[0]
            have_header = True


def _read_pid1(info_r: int) -> int | None:
    """A pidfd of the sandbox's PID 1, from bwrap's --info-fd JSON; None if unavailable."""
    data = b""
    try:
        while select.select([info_r], [], [], 1.0)[0]:
            chunk = os.read(info_r, 4096)
            if not chunk:
                break
            data += chunk
        return os.pidfd_open(json.loads(data)["child-pid"])
    except (OSError, ValueError, KeyError, AttributeError):  # old kernel/python: kill via bwrap then
        return None
    finally:
        os.close(info_r)


_spawner: tuple[int, ThreadPoolExecutor] | None = None
_spawner_lock = threading.Lock()


def _spawn(argv: list[str], **kwargs) -> subprocess.Popen:
    """Popen from one long-lived thread per process.

    bwrap's --die-with-parent uses PR_SET_PDEATHSIG, which Linux ties to the *thread* that
    forked bwrap: a session started from a short-lived thread (a thread pool's, a per-call
    timeout helper's) would be SIGKILLed when that thread ends. Spawning from a thread that
    lives as long as the process keeps "dies with the host process" without that trap.
    """
    global _spawner
    with _spawner_lock:
        if _spawner is None or _spawner[0] != os.getpid():  # a forked child needs its own thread
            _spawner = (os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="aq-sandbox-spawner"))
        pool = _spawner[1]
    return pool.submit(subprocess.Popen, argv, **kwargs).result()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _rmtree(path: str) -> None:
    def onerror(func, p, exc_info):
        # the sandboxed code may have removed permissions from its own files
        try:
            os.chmod(os.path.dirname(p), 0o700)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=onerror)


def _kill_tree(proc: subprocess.Popen, pidfd: int | None, bwrap: bool) -> int:
    """Kills a session's whole process tree and reaps it; returns the exit status of `proc`."""
    if pidfd is not None:
        # bwrap's PID 1, through a pidfd (no PID-reuse race). Linux kills every process of the
        # PID namespace before PID 1 finishes exiting, so once the pidfd is readable the sandbox
        # is empty: nothing is left writing into the work dir we are about to remove.
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        select.select([pidfd], [], [], 5.0)
        os.close(pidfd)
    if proc.returncode is None:  # not reaped yet, so its pid (and group id) cannot have been reused
        try:
            if bwrap:
                proc.kill()  # and --die-with-parent takes PID 1 down, if there was no pidfd
            else:
                os.killpg(proc.pid, signal.SIGKILL)  # no namespace without bwrap: the process group
        except ProcessLookupError:
            pass
    return proc.wait()


def _cleanup(resources: dict) -> None:
    proc = resources.pop("proc", None)
    pidfd = resources.pop("pidfd", None)
    if proc is not None:
        _kill_tree(proc, pidfd, bwrap=pidfd is not None or resources.get("bwrap", False))
    for fd in resources.pop("fds", ()):
        try:
            os.close(fd)
        except OSError:
            pass
    workdir = resources.pop("workdir", None)
    if workdir and os.path.isdir(workdir):
        _rmtree(workdir)

"""The python worker that runs inside the sandbox: one per session, alive across calls.

`sandbox_env.sandbox.Sandbox` starts this file (inside bubblewrap, or bare for
`isolation="none"`) and talks to it over two inherited pipes with length-prefixed JSON
messages. The one idea: the interpreter state of a session (variables, imports, the current
directory) lives in this long-lived process, like a notebook kernel, so a call costs one
round trip over a pipe instead of an interpreter start.

It imports only the standard library (it must run under any interpreter the sandbox is given)
and nothing of the project. It lowers its own privileges and resource limits before it reads
the first request, so model-written code never runs with more.

Session starts are dominated by imports, so at start it imports only C modules (_ast, _json,
_thread, _signal, marshal, resource: about 2 ms) and not their Python wrappers (ast, json,
threading, signal, traceback: about 25 ms together); the wrappers it needs only for errors or
shell commands are imported when first needed.

Protocol (4-byte big-endian length, then the message):
  argv: worker.py REQ_FD RESP_FD CONFIG (marshal, hex)
  host -> worker (marshal; the host is trusted): {"op": "python" | "shell" | "exit", "code": str,
                                                 "timeout": float}
  worker -> host (UTF-8 JSON, since the host must never unmarshal what the sandbox wrote):
    once:      {"ready": true, "pid": int}
    per call:  {"output": str, "ok": bool, "error": str | None, "timed_out": bool,
                "truncated": bool, "output_bytes": int, "exit_code": int | None}
"""

import _ast
import _signal
import _thread
import builtins
import io
import marshal
import os
import resource
import sys
from _json import encode_basestring_ascii as _json_str


class CellTimeout(BaseException):
    """Raised into user code by SIGALRM. A BaseException, so `except Exception` does not swallow it."""


def _read_exact(fd, n):
    chunks = []
    while n:
        b = os.read(fd, n)
        if not b:
            return None
        chunks.append(b)
        n -= len(b)
    return b"".join(chunks)


def _recv(fd):
    head = _read_exact(fd, 4)
    if head is None:
        return None
    body = _read_exact(fd, int.from_bytes(head, "big"))
    return None if body is None else marshal.loads(body)


def _json(value):
    # Enough JSON for our flat replies (str, bool, int, None), without importing json.
    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, str):
        return _json_str(value)
    return str(int(value))


def _send(fd, obj):
    data = ("{" + ", ".join(f"{_json_str(k)}: {_json(v)}" for k, v in obj.items()) + "}").encode()
    _write_all(fd, len(data).to_bytes(4, "big") + data)


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _drop_privileges(uid, gid):
    # Only reached when the host ran bubblewrap as real root (see sandbox.py): the worker starts
    # as root with CAP_SETUID/CAP_SETGID only, and becomes an unprivileged per-session uid here.
    # Changing all three uids away from 0 clears every capability, and bwrap set no_new_privs.
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getuid() == 0 or os.geteuid() == 0:
        raise SystemExit("sandbox worker: failed to drop root privileges")
    # The uid change made the process non-dumpable, which hands its /proc/self files to root:
    # the code could not even read /proc/self/status. Dumpable again, as after a plain exec
    # (core dumps stay off: RLIMIT_CORE is 0).
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE = 4


def _set_limits(limits):
    for name, value in limits.items():
        which = getattr(resource, name)
        soft, hard = (value, value) if isinstance(value, int) else value
        _, cur_hard = resource.getrlimit(which)
        if cur_hard != resource.RLIM_INFINITY:  # never try to raise a hard limit set above us
            soft, hard = min(soft, cur_hard), min(hard, cur_hard)
        resource.setrlimit(which, (soft, hard))


class _Capture:
    """Captures fds 1 and 2 of this process and of every child through one pipe.

    Python-level prints and output of subprocesses (os.system, shell commands) land in the
    same pipe in the order they were written. A reader thread keeps the first part and a
    rolling tail within `cap` bytes and drops the middle, so a gigabyte of output costs no
    memory. A call ends with a random sentinel written to the pipe; when the reader sees it,
    everything the call wrote before it has been collected.
    """

    def __init__(self, cap):
        self.cap = cap
        self.tail_cap = cap // 4
        self.head_cap = cap - self.tail_cap
        r, w = os.pipe()
        os.dup2(w, 1)
        os.dup2(w, 2)
        self._sentinel_fd = w  # non-inheritable (os.pipe), so children never get it
        self._r = r
        self._sentinel = b"\x00aq-end-" + os.urandom(12).hex().encode() + b"\x00"
        self._lock = _thread.allocate_lock()
        self._done = _thread.allocate_lock()  # held; the reader releases it when it sees the sentinel
        self._done.acquire()
        self._reset()
        self.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8",
                                       errors="backslashreplace", line_buffering=True)
        self.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                       errors="backslashreplace", line_buffering=True)
        _thread.start_new_thread(self._reader, ())  # a daemon: never waited for

    def _reset(self):
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def _keep(self, data):
        self.total += len(data)
        room = self.head_cap - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            if len(self.tail) > 2 * self.tail_cap + 65536:
                del self.tail[: len(self.tail) - self.tail_cap]

    def _reader(self):
        keep_back = len(self._sentinel) - 1
        pending = b""
        while True:
            chunk = os.read(self._r, 65536)
            if not chunk:
                return
            data = pending + chunk
            with self._lock:
                i = data.find(self._sentinel)
                if i >= 0:
                    self._keep(data[:i])
                    pending = data[i + len(self._sentinel):]
                    self._done.release()
                    continue
                cut = max(len(data) - keep_back, 0)
                self._keep(data[:cut])
                pending = data[cut:]

    def restore_streams(self):
        # Repairs whatever the last call did to its output: closed or redirected fds 1 and 2,
        # replaced sys.stdout/sys.stderr.
        os.dup2(self._sentinel_fd, 1)
        os.dup2(self._sentinel_fd, 2)
        sys.stdout, sys.stderr = self.stdout, self.stderr

    def finish(self):
        """Returns (text, total_bytes, truncated) of everything written since the last finish."""
        for stream in (sys.stdout, sys.stderr, self.stdout, self.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a stream the code broke: nothing left to flush to
                pass
        self.restore_streams()
        _write_all(self._sentinel_fd, self._sentinel)
        self._done.acquire(timeout=5.0)
        with self._lock:
            total, head, tail = self.total, bytes(self.head), bytes(self.tail)
            self._reset()
        if total <= self.cap:
            return (head + tail).decode("utf-8", "replace"), total, False
        tail = tail[len(tail) - self.tail_cap:] if self.tail_cap else b""
        marker = f"\n[... output truncated: {total - len(head) - len(tail)} of {total} bytes omitted ...]\n"
        return head.decode("utf-8", "replace") + marker + tail.decode("utf-8", "replace"), total, True


def _on_alarm(signum, frame):
    raise CellTimeout()


def _user_traceback(exc):
    """The traceback without this file's frames: the model should see only its own code."""
    import traceback

    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == _user_traceback.__code__.co_filename:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def _exception_line(exc):
    import traceback

    return "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()[-1]


class _Kernel:
    def __init__(self, capture):
        self.capture = capture
        self.globals = {"__name__": "__main__", "__builtins__": builtins}
        self.pid = os.getpid()
        self.sources = {}

    def _register_sources(self):
        # Tracebacks (and inspect.getsource) quote cell lines through linecache, as in a
        # notebook. Registered on the first error only: importing linecache costs a start.
        import linecache

        for filename, code in self.sources.items():
            linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)

    def run_python(self, code, timeout):
        filename = f"<cell {len(self.sources) + 1}>"
        self.sources[filename] = code
        if "linecache" in sys.modules:
            self._register_sources()
        error, timed_out = None, False
        try:
            tree = compile(code, filename, "exec", _ast.PyCF_ONLY_AST)
            # Notebook rule: a trailing expression's value is shown (its repr).
            last = tree.body.pop() if tree.body and isinstance(tree.body[-1], _ast.Expr) else None
            body = compile(tree, filename, "exec")
            tail = compile(_ast.Expression(last.value), filename, "eval") if last is not None else None
        except (SyntaxError, ValueError) as e:  # ValueError: e.g. a NUL byte in the source
            self._register_sources()
            import traceback

            sys.stderr.write("".join(traceback.format_exception_only(type(e), e)))
            where = f" (line {e.lineno})" if isinstance(e, SyntaxError) else ""
            return False, f"{type(e).__name__}: {getattr(e, 'msg', None) or e}{where}", False
        _signal.signal(_signal.SIGALRM, _on_alarm)  # an earlier call may have replaced the handler
        _signal.setitimer(_signal.ITIMER_REAL, timeout)
        try:
            exec(body, self.globals)
            if tail is not None:
                value = eval(tail, self.globals)
                if value is not None:
                    self.globals["_"] = value
                    print(repr(value))
        except CellTimeout:
            timed_out = True
            error = (f"TimeoutError: the code ran longer than timeout_s={timeout:g} and was interrupted; "
                     "the interpreter state is kept")
            sys.stderr.write(f"\n{error}\n")
        except BaseException as e:  # noqa: BLE001 - user code may raise anything, SystemExit included
            _signal.setitimer(_signal.ITIMER_REAL, 0)
            self._register_sources()
            error = _exception_line(e)
            try:
                sys.stderr.write(_user_traceback(e))
            except Exception:  # noqa: BLE001 - the code may have broken sys.stderr itself
                pass
        finally:
            _signal.setitimer(_signal.ITIMER_REAL, 0)
            if os.getpid() != self.pid:
                # A child forked by the user code got back here: it must never speak the
                # protocol (it would answer or steal requests), so it ends now.
                for stream in (sys.stdout, sys.stderr):
                    try:
                        stream.flush()
                    except Exception:  # noqa: BLE001 - a stream the code broke: nothing left to flush to
                        pass
                os._exit(0)
        return error is None, error, timed_out

    def run_shell(self, command, timeout, cwd):
        import signal  # lazily, like everything for the shell: most sessions never call it
        import subprocess
        import time

        exit_code, timed_out = None, False
        try:
            proc = subprocess.Popen(["/bin/sh", "-c", command], stdin=subprocess.DEVNULL, cwd=cwd,
                                    start_new_session=True)
        except OSError as e:
            return False, f"could not start the shell: {e}", False, None
        try:
            exit_code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            # Kill the command's whole process group, and keep at it until the group is gone:
            # the shell may exit before its children, and a child already inside a write()
            # finishes that write after SIGKILL. Output after our end-of-call sentinel would
            # leak into the next call.
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    break
                if proc.poll() is None:
                    proc.wait()
                time.sleep(0.002)
        if timed_out:
            return False, f"TimeoutError: the command ran longer than timeout_s={timeout:g} and was killed", True, None
        if exit_code == 0:
            return True, None, False, 0
        if exit_code < 0:
            try:
                name = signal.Signals(-exit_code).name
            except ValueError:
                name = str(-exit_code)
            return False, f"the command was killed by signal {name}", False, exit_code
        return False, f"the command exited with status {exit_code}", False, exit_code


def _exit_with_host(alive_fd):
    # Blocks until the host process is gone (nothing is ever written to this pipe), then ends
    # the worker even in the middle of a call; bwrap's PID 1 follows, and with it every
    # process left in the sandbox.
    try:
        os.read(alive_fd, 1)
    finally:
        os._exit(70)


def main():
    req_fd, resp_fd = int(sys.argv[1]), int(sys.argv[2])
    cfg = marshal.loads(bytes.fromhex(sys.argv[3]))
    for fd in (req_fd, resp_fd, cfg["alive_fd"]):
        os.set_inheritable(fd, False)  # children (shell commands, os.system) must not see the protocol
    _thread.start_new_thread(_exit_with_host, (cfg["alive_fd"],))
    if cfg.get("uid") is not None and os.getuid() == 0:
        _drop_privileges(cfg["uid"], cfg["gid"])
    _set_limits(cfg["limits"])
    # A write past RLIMIT_FSIZE then fails with EFBIG in the writer instead of killing the worker.
    _signal.signal(_signal.SIGXFSZ, _signal.SIG_IGN)
    _signal.signal(_signal.SIGALRM, _on_alarm)
    os.chdir(cfg["workdir"])
    os.environ["PWD"] = cfg["workdir"]
    # The worker runs with -S (site processing costs more than the rest of the start), so the
    # interpreter's site-packages are added here, without executing their .pth files.
    sys.path[0:0] = [""]  # like `python -c`: the work dir is importable
    sys.path += [p for p in cfg.get("site_dirs", ()) if p not in sys.path]
    capture = _Capture(cfg["max_output_bytes"])
    capture.restore_streams()
    kernel = _Kernel(capture)
    _send(resp_fd, {"ready": True, "pid": os.getpid()})
    while True:
        req = _recv(req_fd)
        if req is None or req["op"] == "exit":
            return
        capture.restore_streams()
        exit_code = None
        try:
            if req["op"] == "python":
                ok, error, timed_out = kernel.run_python(req["code"], req["timeout"])
            else:
                ok, error, timed_out, exit_code = kernel.run_shell(req["code"], req["timeout"], cfg["workdir"])
        except BaseException as e:  # noqa: BLE001 - e.g. a second CellTimeout landing in our own code
            ok, error, timed_out = False, f"{type(e).__name__} in the sandbox worker: {e}", isinstance(e, CellTimeout)
            _signal.setitimer(_signal.ITIMER_REAL, 0)
        output, total, truncated = capture.finish()
        _send(resp_fd, {"output": output, "ok": ok, "error": error, "timed_out": timed_out,
                        "truncated": truncated, "output_bytes": total, "exit_code": exit_code})


if __name__ == "__main__":
    main()

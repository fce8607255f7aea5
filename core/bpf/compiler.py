"""Compiles and loads a probe's BPF program in a short-lived child process.

bcc compiles with clang and LLVM inside the calling process: importing bcc alone
maps and relocates about 60 MB of LLVM, and a compile peaks well above that. A
daemon that lives for months should not carry that for one start-up step, so the
daemon runs this module's `child_main` in a child process (CHILD_COMMAND): it compiles,
loads the programs into the kernel (the verifier runs here), creates the maps,
and hands the program and map file descriptors back over a Unix socket
(SCM_RIGHTS). The kernel objects outlive the child; the daemon attaches and
reads them through libbcc_bpf, bcc's small syscall library without LLVM.

Request (JSON on stdin): program (the C text), cflags, functions [[name, type], ...], maps.
Reply (one message on the socket, fds attached in the order named):
    {"ok": true, "functions": [...], "maps": [...], "peak_rss_mb": N}
or  {"ok": false, "error": "..."}.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass

REPLY_MAX_BYTES = 1 << 16
# The fd number the daemon gives the child's end of the socket pair.
SOCKET_FD_ENV = "PGSLOWLOG_COMPILER_FD"
# Not `python -m pgslowlog.bpf.compiler`: importing the package imports this module
# first, and runpy would warn that it runs a module already imported (and run it twice).
CHILD_COMMAND = [
    "-c",
    "from pgslowlog.bpf.compiler import child_main; raise SystemExit(child_main())",
]
KPROBE, RAW_TRACEPOINT = "kprobe", "raw_tracepoint"
COMPILE_TIMEOUT_S = 120  # a big program on a slow machine; never forever


class CompileError(Exception):
    """The compiler or the kernel's verifier refused the program; says which and why."""


@dataclass
class Compiled:
    """Program and map fds, owned by the caller from now on."""

    functions: dict[str, int]
    maps: dict[str, int]
    compiler_peak_rss_mb: float

    def close(self) -> None:
        for fd in (*self.functions.values(), *self.maps.values()):
            os.close(fd)
        self.functions.clear()
        self.maps.clear()


def compile_program(
    program_text: bytes, cflags: list[str], functions: list[tuple[str, str]], maps: list[str]
) -> Compiled:
    """Compile `program_text` in a child; the fds of `functions` (name, type) and `maps`."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    request = {
        "program": program_text.decode(),
        "cflags": cflags,
        "functions": functions,
        "maps": maps,
    }
    try:
        process = subprocess.Popen(
            [sys.executable, *CHILD_COMMAND],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            pass_fds=[child.fileno()],
            env={**os.environ, SOCKET_FD_ENV: str(child.fileno())},
        )
        child.close()
        try:
            _, stderr = process.communicate(json.dumps(request).encode(), COMPILE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise CompileError(f"compiling took over {COMPILE_TIMEOUT_S} s") from None
        parent.setblocking(False)
        try:
            message, fds, _flags, _address = socket.recv_fds(parent, REPLY_MAX_BYTES, 64)
        except BlockingIOError:
            raise CompileError(
                f"the compiler process ended ({process.returncode}) without an answer: "
                f"{_last_lines(stderr)}"
            ) from None
    finally:
        parent.close()
    reply = json.loads(message)
    if not reply["ok"]:
        for fd in fds:
            os.close(fd)
        detail = _last_lines(stderr)
        raise CompileError(reply["error"] + (f": {detail}" if detail else ""))
    names = [*reply["functions"], *reply["maps"]]
    if len(fds) != len(names):
        for fd in fds:
            os.close(fd)
        raise CompileError(f"the compiler sent {len(fds)} descriptors for {len(names)} objects")
    handed = dict(zip(names, fds))  # same length, checked above (no strict= on 3.9)
    return Compiled(
        functions={name: handed[name] for name in reply["functions"]},
        maps={name: handed[name] for name in reply["maps"]},
        compiler_peak_rss_mb=reply["peak_rss_mb"],
    )


def _last_lines(stderr: bytes, lines: int = 6) -> str:
    """The part of clang's or the verifier's output that says what went wrong: clang's
    error lines where there are any (a macro's notes follow them), else the last lines."""
    text = [line.strip() for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    errors = [line for line in text if " error: " in line or line.startswith("error: ")]
    return " | ".join(errors[:3] if errors else text[-lines:])


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as status:
        match = re.search(r"VmHWM:\s+(\d+)", status.read())
    return int(match.group(1)) / 1024 if match else 0.0


def child_main() -> int:
    """The child: compile and load what the request on stdin asks, answer on the socket."""
    sock = socket.socket(fileno=int(os.environ[SOCKET_FD_ENV]))
    request = json.load(sys.stdin)

    def answer(reply: dict[str, object], fds: list[int]) -> int:
        socket.send_fds(sock, [json.dumps(reply).encode()], fds)
        return 0

    try:
        import bcc
    except ImportError:
        return answer({"ok": False, "error": "bcc's Python module is not importable"}, [])
    try:
        bpf = bcc.BPF(text=request["program"].encode(), cflags=request["cflags"])
    except Exception as error:
        return answer({"ok": False, "error": f"compiling failed ({error})"}, [])
    types = {KPROBE: bcc.BPF.KPROBE, RAW_TRACEPOINT: bcc.BPF.RAW_TRACEPOINT}
    fds, names = [], []
    for name, kind in request["functions"]:
        try:
            fds.append(bpf.load_func(name.encode(), types[kind]).fd)
        except Exception as error:
            return answer({"ok": False, "error": f"the kernel rejected {name}: {error}"}, [])
        names.append(name)
    map_fds = [bpf[name.encode()].map_fd for name in request["maps"]]
    reply = {
        "ok": True,
        "functions": names,
        "maps": request["maps"],
        "peak_rss_mb": round(_peak_rss_mb(), 1),
    }
    # Sent while bpf still holds them; the kernel objects live on in the daemon.
    return answer(reply, [*fds, *map_fds])

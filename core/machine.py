"""What the machine must offer before a probe can load, said one finding a line.

`check` prints every finding; `run` stops at the first failed one with the same
words (cause; fix), before it compiles anything.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path

from pgslowlog.containers import INITIAL_PID_NAMESPACE_INODE
from pgslowlog.errors import UserError

BCC_MISSING = (
    "bcc's Python module is not importable",
    "apt-get install python3-bpfcc libbpfcc, and create the venv with --system-site-packages",
)
CAP_SYS_PTRACE = 19
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39


# BPF ring buffer (5.8), task-local storage for tracing programs and BPF memory charged
# to the cgroup instead of RLIMIT_MEMLOCK, so no CAP_SYS_RESOURCE is needed (5.11).
MINIMUM_KERNEL = (5, 11)
UPROBE_PMU = Path("/sys/bus/event_source/devices/uprobe/type")
TRACEFS = (
    Path("/sys/kernel/tracing/uprobe_events"),
    Path("/sys/kernel/debug/tracing/uprobe_events"),
)


@dataclass(frozen=True)
class Finding:
    ok: bool
    text: str
    warning: bool = False  # not an error: `run` copes, but the operator should know

    def __str__(self) -> str:
        return f"{'warning' if self.warning else 'ok' if self.ok else 'error'}: {self.text}"


def _effective_capabilities() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


# The fix of CVE-2025-38466 (Linux 6.16, commit ba677dbe77af, backported to the stable
# series from 5.10.240, 5.15.189, 6.1.146, 6.6.99, 6.12.39 and 6.15.7) makes the perf
# uprobe PMU want CAP_SYS_ADMIN again: CAP_PERFMON alone gets EACCES. A distribution's
# release string does not tell whether a pre-6.16 kernel carries it: warn there.
UPROBES_NEED_SYS_ADMIN = (6, 16)
UNIT_PRIVILEGES = (
    "run as root, or as etc/pgslowlog.service does: a user with CAP_SYS_ADMIN and "
    "CAP_SYS_PTRACE as ambient capabilities"
)


def _kernel_version(release: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", release)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def check_privileges(caps: int | None = None, release: str | None = None) -> Finding:
    """The first capability missing, named; the capabilities, not the user id, decide."""
    caps = _effective_capabilities() if caps is None else caps
    release = release or platform.release()
    has_admin = caps & (1 << CAP_SYS_ADMIN)
    has_bpf = caps & (1 << CAP_BPF) or has_admin
    has_perfmon = caps & (1 << CAP_PERFMON) or has_admin
    if not (has_bpf and has_perfmon):
        return Finding(False, f"privileges: CAP_BPF and CAP_PERFMON are missing; {UNIT_PRIVILEGES}")
    if not has_admin:
        if _kernel_version(release) >= UPROBES_NEED_SYS_ADMIN:
            return Finding(
                False,
                f"privileges: CAP_SYS_ADMIN is missing: on kernel {release} (6.16 or newer) "
                f"attaching a uprobe needs it, CAP_PERFMON is not enough; {UNIT_PRIVILEGES}",
            )
        return Finding(
            True,
            "privileges: CAP_SYS_ADMIN is missing: kernels since 6.16 and stable ones with "
            "the CVE-2025-38466 fix refuse uprobes without it (EACCES)",
            warning=True,
        )
    if not caps & (1 << CAP_SYS_PTRACE):
        return Finding(
            True,
            "privileges: CAP_SYS_PTRACE is missing: the sampled probe cannot read the backends' "
            "memory (process_vm_readv) and sees no statement",
            warning=True,
        )
    return Finding(
        True, "privileges: CAP_SYS_ADMIN (so CAP_BPF, CAP_PERFMON) and CAP_SYS_PTRACE held"
    )


def check_bcc() -> Finding:
    # Found, not imported: importing bcc loads LLVM (about 60 MB), which only the
    # compiler child (bpf/compiler.py) may carry.
    if importlib.util.find_spec("bcc") is None:
        return Finding(False, "; ".join(BCC_MISSING))
    try:
        version = importlib.metadata.version("bcc")
    except importlib.metadata.PackageNotFoundError:
        version = "(version unknown)"
    return Finding(True, f"bcc {version} found")


def check_kernel_headers() -> Finding:
    release = platform.release()
    build = Path(f"/lib/modules/{release}/build")
    try:
        present = build.exists()
        header_release = _headers_release(build) if present else None
    except OSError as error:  # EACCES: /lib/modules hidden (ProtectKernelModules=) or locked
        return Finding(
            False,
            f"cannot read the kernel headers at {build} ({error.strerror}); let the daemon "
            "read /lib/modules and /usr/src (no ProtectKernelModules= in its unit)",
        )
    if not present:
        return Finding(
            False,
            f"no kernel headers at {build}; apt-get install linux-headers-{release}, or where "
            "the running kernel has no package, install linux-headers-amd64 and link "
            f"{build} to /usr/src/linux-headers-<version>-amd64 (and source to ...-common)",
        )
    if header_release == release:
        return Finding(True, f"kernel headers at {build} match the running kernel {release}")
    return Finding(
        True,
        f"kernel headers at {build} are {header_release or 'of unknown version'}, the running "
        f"kernel is {release}: fine, the probes read no kernel structs",
    )


def _headers_release(build: Path) -> str | None:
    for candidate in ("include/config/kernel.release", "include/generated/utsrelease.h"):
        path = build / candidate
        if path.exists():
            text = path.read_text(errors="replace").strip()
            return text.split('"')[1] if '"' in text else text
    return None


# The ring-buffer reader (bpf/ringbuf.py) relies on x86's memory ordering, and the USDT
# argument parser (plugins/usdt_probe.py) knows x86 register names only.
SUPPORTED_ARCHITECTURES = ("x86_64",)


def check_architecture(machine: str | None = None) -> Finding:
    machine = machine or platform.machine()
    if machine in SUPPORTED_ARCHITECTURES:
        return Finding(True, f"architecture {machine} is supported")
    return Finding(
        False,
        f"architecture {machine} is not supported yet (the ring-buffer reader relies on "
        "x86's memory ordering, the USDT parser on x86 register names); run it on x86_64 hosts",
    )


def check_kernel() -> Finding:
    release = platform.release()
    if _kernel_version(release) < MINIMUM_KERNEL:
        return Finding(
            False,
            f"kernel {release} is older than 5.11 (BPF ring buffer, task-local storage, BPF "
            "memory charged to the cgroup); "
            "boot a newer kernel",
        )
    if not Path("/proc/sys/kernel/unprivileged_bpf_disabled").exists():
        return Finding(
            False, f"kernel {release} has no BPF system call; boot a kernel built with BPF_SYSCALL"
        )
    return Finding(True, f"kernel {release} has BPF, its ring buffer and task-local storage")


def check_uprobe_attach() -> Finding:
    """Uprobes attach through the perf uprobe PMU; without it, through tracefs."""
    if UPROBE_PMU.exists():
        return Finding(True, "uprobes attach through the perf uprobe PMU: tracefs is not needed")
    if any(path.exists() for path in TRACEFS):
        return Finding(True, "uprobes attach through tracefs (no perf uprobe PMU)")
    return Finding(
        False,
        "no perf uprobe PMU and tracefs is not mounted; mount -t tracefs nodev /sys/kernel/tracing",
    )


def check_pid_namespace(inode: int | None = None) -> Finding:
    """In a pid namespace of its own (a sidecar, a container sharing its server's pids)
    the daemon traces that namespace's servers: what containers = true needs, the
    host's, is checked with the targets (planner)."""
    if inode is None:
        inode = os.stat("/proc/self/ns/pid").st_ino
    if inode == INITIAL_PID_NAMESPACE_INODE:
        return Finding(True, "runs in the host's pid namespace")
    return Finding(
        True,
        "runs in a pid namespace of its own: it traces the servers of that namespace only "
        "(a sidecar's); for every server on the host, run it in the host's pid namespace "
        "(--pid=host for docker run, hostPID: true in Kubernetes)",
        warning=True,
    )


def machine_findings() -> list[Finding]:
    return [
        check_architecture(),
        check_pid_namespace(),
        check_kernel(),
        check_privileges(),
        check_bcc(),
        check_kernel_headers(),
        check_uprobe_attach(),
    ]


def require_machine() -> None:
    """For `run`: the first missing piece as a UserError, before anything is compiled."""
    for finding in machine_findings():
        if not finding.ok:
            cause, _, fix = finding.text.partition("; ")
            raise UserError(cause, fix or "see `pgslowlog check`")

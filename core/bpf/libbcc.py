"""libbcc_bpf through ctypes: bcc's syscall wrappers, without the LLVM libbcc loads.

The prototypes are our own: bcc's Python wrapper declares bpf_attach_uprobe without
its 7th argument, ref_ctr_offset, which USDT semaphores need. The library is opened
at the first call, so importing this module needs no bcc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from pathlib import Path

LIBBCC_BPF = "libbcc_bpf.so.0"


class _Libbcc:
    def __init__(self) -> None:
        library = ctypes.CDLL(ctypes.util.find_library("bcc_bpf") or LIBBCC_BPF, use_errno=True)
        self.attach_uprobe = library.bpf_attach_uprobe
        self.attach_uprobe.restype = ctypes.c_int
        self.attach_uprobe.argtypes = [
            ctypes.c_int,  # progfd
            ctypes.c_int,  # attach type: 0 entry, 1 return
            ctypes.c_char_p,  # event name (used only on the tracefs fallback)
            ctypes.c_char_p,  # binary path
            ctypes.c_uint64,  # file offset
            ctypes.c_int,  # pid, -1 for all
            ctypes.c_uint32,  # ref_ctr_offset (USDT semaphore), 0 for none
        ]
        self.close_perf_event = library.bpf_close_perf_event_fd
        self.close_perf_event.restype = ctypes.c_int
        self.close_perf_event.argtypes = [ctypes.c_int]
        self.attach_raw_tracepoint = library.bpf_attach_raw_tracepoint
        self.attach_raw_tracepoint.restype = ctypes.c_int
        self.attach_raw_tracepoint.argtypes = [ctypes.c_int, ctypes.c_char_p]
        self.update_elem = library.bpf_update_elem
        self.update_elem.restype = ctypes.c_int
        self.update_elem.argtypes = [
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_ulonglong,
        ]
        self.lookup_elem = library.bpf_lookup_elem
        self.lookup_elem.restype = ctypes.c_int
        self.lookup_elem.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]


_libbcc: _Libbcc | None = None


def libbcc() -> _Libbcc:
    global _libbcc
    if _libbcc is None:
        _libbcc = _Libbcc()
    return _libbcc


def possible_cpus() -> int:
    """How many values a per-CPU map holds: one per possible CPU ("0-3,8-11")."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    count = 0
    for part in text.split(","):
        first, _, last = part.partition("-")
        count += int(last or first) - int(first) + 1
    return count

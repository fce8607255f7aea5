"""Which clusters run the binary: postmasters found in /proc, and their memory opened.

A cluster started after the daemon, restarted, or recovering from a crash (its
shared memory made anew) is found here and read from scratch.
"""

from __future__ import annotations

import os
import time
from collections.abc import Set as AbstractSet

from pgslowlog.containers import PidNamespace, container_of, own_pid_namespace, pid_namespace
from pgslowlog.elf import FileIdentity, PostgresBinary
from pgslowlog.log import get_logger
from pgslowlog.pg_layouts import BackendStatusLayout
from pgslowlog.process_memory import MemoryReadError
from pgslowlog.sampled.procfs import parent_of, serves
from pgslowlog.sampled.reading import ClusterMemory, ClusterStarting

log = get_logger(__name__)
# How often new (or restarted) postmasters are looked for: a scan of /proc costs about
# a millisecond at 200 processes, but a server started while another of the binary
# runs (Debian's clusters share one) is unseen until then. A crash or a restart is
# found at once (cluster_lost).
DISCOVER_EVERY_S = 1.0
# How often the children of the postmasters known are asked (the looks see backends
# come and go in the status array; this finds those without a slot and any exit the
# looks missed).
CHILDREN_EVERY_S = 5.0
# ... and while none is known, or for a while after one went (a restart): a statement
# in a new server's first moments is then seen. A look at /proc costs about 0.5 ms.
DISCOVER_SOON_S = 0.1
SOON_AFTER_LOSS_S = 10.0


def postmasters(identity: FileIdentity, backends: AbstractSet[int] = frozenset()) -> list[int]:
    """Pids of the postmasters running this binary file: processes running it whose
    parent does not (a backend's parent is its postmaster). `backends`, known not to
    be postmasters, are passed over: at a thousand backends, asking each for its
    executable and parent at each discovery would cost more than all the looks."""
    running = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in backends:
            continue
        try:
            status = os.stat(f"/proc/{entry}/exe")
        except OSError:
            continue
        if (status.st_dev, status.st_ino) == (identity.device, identity.inode):
            running.add(int(entry))
    # initdb's single-user postgres (--boot, --single) is none: taken for one, it would
    # keep the real postmaster waiting for the next scan.
    return sorted(pid for pid in running if parent_of(pid) not in running and serves(pid))


class Discovery:
    """The clusters of one binary file, looked for again every DISCOVER_EVERY_S (sooner while
    none is known or soon after one went)."""

    def __init__(
        self,
        binary: PostgresBinary,
        identity: FileIdentity,
        layout: BackendStatusLayout,
        scope: PidNamespace,
    ) -> None:
        self._binary = binary
        self._identity = identity
        self._layout = layout
        # Only the postmasters of one pid namespace: the daemon's own for a host target,
        # a container's for its instance. The others are said once each.
        self._scope = scope
        self._foreign = self._scope != own_pid_namespace()
        self._elsewhere: set[int] = set()
        self.clusters: dict[int, ClusterMemory] = {}  # postmaster pid -> its memory
        self._unreadable: set[int] = set()  # postmasters already said to be unreadable
        self._next = 0.0
        self._soon_until = 0.0  # looked for every DISCOVER_SOON_S until then

    def due(self) -> bool:
        return time.monotonic() >= self._next

    def discover(self, backends: AbstractSet[int]) -> None:
        """Look for postmasters now; `backends` are known not to be any."""
        now = time.monotonic()
        found = {
            pid
            for pid in postmasters(self._identity, backends)
            if pid in self.clusters or self._in_scope(pid)
        }
        # A postmaster that stays but whose memory cannot be read (its shared memory made
        # anew after a backend crashed, maybe elsewhere) is taken up again from scratch.
        lost = {pid for pid, cluster in self.clusters.items() if cluster.lost}
        for pid in (set(self.clusters) - found) | lost:
            self.clusters.pop(pid).close()  # the source's reap reports its backends gone
            self._soon_until = now + SOON_AFTER_LOSS_S
        for pid in found - set(self.clusters):
            try:
                self.clusters[pid] = ClusterMemory(
                    pid, self._binary, self._identity.inode, self._layout, self._foreign
                )
            except ClusterStarting:
                continue  # asked again at the next discovery
            except MemoryReadError as error:
                if pid not in self._unreadable:  # said once per postmaster, not each second
                    self._unreadable.add(pid)
                    log.warning("cluster_unreadable", postmaster=pid, error=str(error))
        soon = not self.clusters or now < self._soon_until or len(found) > len(self.clusters)
        self._next = now + (DISCOVER_SOON_S if soon else DISCOVER_EVERY_S)

    def _in_scope(self, postmaster: int) -> bool:
        namespace = pid_namespace(postmaster)
        if namespace == self._scope:
            return True
        # A container's instance passes over its siblings silently: they are other
        # instances'. A host target names what it leaves to containers = true.
        if namespace is not None and not self._foreign and postmaster not in self._elsewhere:
            self._elsewhere.add(postmaster)  # said once per postmaster
            log.warning(
                "cluster_in_other_namespace",
                postmaster=postmaster,
                container=container_of(postmaster, namespace).name,
                action="not traced by this target: a [[target]] with containers = true "
                "traces servers in containers",
            )
        return False

    def close(self) -> None:
        for cluster in self.clusters.values():
            cluster.close()
        self.clusters.clear()

    def cluster_lost(self) -> None:
        """A look found a cluster's memory gone (a restart?): find its successor now,
        and soon after."""
        now = time.monotonic()
        if now >= self._soon_until:
            self._soon_until = now + SOON_AFTER_LOSS_S
            self._next = now

"""Plans of slow statements: `EXPLAIN (FORMAT JSON)` over the daemon's own connection.

Opt-in through the `[explain]` table (docs/explain.md). `statements` is pure: what
may be explained, and every event's `fingerprint`. `servers` finds a backend's
server (socket directory and port, from its postmaster.pid). `explainer` holds the
connections (psycopg, the optional extra `pgslowlog[explain]`, imported only there)
and the events that wait for their plan.
"""

from __future__ import annotations

# The explain connections name themselves so, for an operator's pg_stat_activity.
APPLICATION_NAME = "pgslowlog explain"
# The backend pids of the explain connections open now: the enricher drops their
# statements, whatever the threshold, so that an EXPLAIN is never itself reported (or
# explained). By pid, not by application_name, which any client may set to hide. Set
# operations are atomic: the explainer's thread adds and removes, collectors ask.
OWN_PIDS: set[int] = set()

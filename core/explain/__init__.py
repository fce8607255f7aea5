"""Plans of slow statements: `EXPLAIN (FORMAT JSON)` over the daemon's own connection.

Opt-in through the `[explain]` table (docs/explain.md). `statements` is pure: what
may be explained, and every event's `fingerprint`. `servers` finds a backend's
server (socket directory and port, from its postmaster.pid). `explainer` holds the
connections (psycopg, the optional extra `pgslowlog[explain]`, imported only there)
and the events that wait for their plan.
"""

# The explain connections name themselves so: the enricher drops their statements,
# whatever the threshold, so that an EXPLAIN is never itself reported (or explained).
APPLICATION_NAME = "pgslowlog explain"

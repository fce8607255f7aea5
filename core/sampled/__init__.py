"""The sampled kind of statement source: slow statements found by looking.

Every few milliseconds it reads each backend's pg_stat_activity entry and wait word
from PostgreSQL's shared memory, mapped read-only, with no trap per statement. By job:
discovery (which postmasters run the binary), reading (one look at a cluster's
memory), statements (looks turned into statements), schedule (when to look), blind
(the time no look was taken when one was due), outcomes (how each ended, from a small
BPF program on the failure paths: outcomes.c), thresholds and hand_over (which
finished statements are this source's to report), source (the StatementSource that
runs them together) and pg_time (PostgreSQL's timestamps).
"""

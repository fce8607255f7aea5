/*
 * `sampled` times statements without BPF: it reads PostgreSQL's bookkeeping from
 * outside (sampled_probe.py, pgslowlog/sampler.py). This program only tells how they
 * ended: the shared outcome handlers (slow_query.h), built with REPORT_FAILURES, send
 * each error (AbortCurrentTransaction) and cancel (StatementCancelHandler) as a
 * record. Both run only when a statement fails: an ordinary statement traps nothing.
 */

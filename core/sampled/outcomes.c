/*
 * `sampled` times statements without BPF: it reads PostgreSQL's bookkeeping from
 * outside (pgslowlog/sampled/). This program only tells how they
 * ended: the shared outcome handlers (slow_query.h), built with REPORT_FAILURES, send
 * each error (AbortCurrentTransaction) and cancel (StatementCancelHandler) as a
 * record. Both run only when a statement fails: an ordinary statement traps nothing.
 * One more uprobe, on proc_exit, runs once per backend (below).
 */

/*
 * proc_exit(code): a backend leaves on its own. Code 0 follows the client's goodbye, so
 * a statement the last look still saw running had ended, ok or with an error reported
 * above; another code is a FATAL (pg_terminate_backend, a lost client) mid-statement.
 * With connection-per-statement clients the next connection takes the slot at once,
 * before a look could read how the statement ended: this is then all there is to go
 * by. It runs once per backend, never per statement.
 */
int on_backend_exit(struct pt_regs *ctx)
{
    if (!in_scope())
        return 0;
    struct record_header exit = {};
    exit.start_ns = bpf_ktime_get_ns();
    exit.pid = current_pid();
    exit.kind = RECORD_BACKEND_EXITED;
    exit.outcome = (int)PT_REGS_PARM1(ctx) == 0 ? OUTCOME_OK : OUTCOME_ERROR;
    if (ring_output(&exit, sizeof(exit), BPF_RB_NO_WAKEUP) != 0)
        count(COUNTER_RINGBUF_FULL);
    return 0;
}

/*
 * One uprobe on pgstat_report_activity(BackendState state, const char *cmd_str).
 *
 * The function is exported (it is in the dynamic symbol table of stripped
 * distribution builds). Every exec_* function of both wire protocols reports
 * STATE_RUNNING with the statement text; the main loop reports an idle state
 * before ReadyForQuery. So RUNNING starts a statement and the next idle report
 * ends it, whatever the protocol; an ERROR or a cancel ends it earlier, in the
 * shared outcome probes.
 *
 * The BackendState numbering changed in PostgreSQL 18 (STATE_STARTING was
 * inserted), so the definition passes the values for the binary's major.
 * slow_query.h (statement_begin, statement_end) is put in front by pgslowlog.
 */
#if !defined(STATE_IDLE) || !defined(STATE_RUNNING) || \
    !defined(STATE_IDLEINTRANSACTION) || !defined(STATE_IDLEINTRANSACTION_ABORTED)
#error "the BackendState values must be passed as cflags"
#endif

int on_report_activity(struct pt_regs *ctx)
{
    int state = (int)PT_REGS_PARM1(ctx);
    if (state == STATE_RUNNING)
        return statement_begin(ctx, (const char *)PT_REGS_PARM2(ctx), 1,
                               VADDR_pgstat_report_activity);
    if (state == STATE_IDLE || state == STATE_IDLEINTRANSACTION ||
        state == STATE_IDLEINTRANSACTION_ABORTED)
        return statement_end(0);
    return 0;
}

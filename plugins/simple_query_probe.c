/*
 * The original pair: a uprobe and a uretprobe on exec_simple_query(const char
 * *query_string). The function is static, so only binaries with a full symbol
 * table have it, and it sees the simple protocol only. A statement that fails
 * leaves through an ERROR longjmp that skips the uretprobe; the shared outcome
 * probe on AbortCurrentTransaction ends it instead.
 * slow_query.h (statement_begin, statement_end) is put in front by pgslowlog.
 */
int on_exec_simple_query(struct pt_regs *ctx)
{
    return statement_begin(ctx, (const char *)PT_REGS_PARM1(ctx), 0, VADDR_exec_simple_query);
}

int on_exec_simple_query_return(struct pt_regs *ctx)
{
    return statement_end(0);
}

/*
 * The postgresql:query__start / query__done USDT probes of builds made with
 * --enable-dtrace (Debian's are). They fire in exec_simple_query only, so they
 * see the simple protocol; an ERROR skips query__done, and the shared outcome
 * probe on AbortCurrentTransaction ends the statement instead.
 *
 * Where the compiler put query__start's argument (a register, or memory at an
 * offset from one) comes from the binary's USDT note, as cflags:
 *   QUERY_START_ARG_REG     the pt_regs field: bx, di, bp, ...
 *   QUERY_START_ARG_OFFSET  for memory operands, the displacement
 *   QUERY_START_ARG_DEREF   1 for a memory operand, 0 for a register
 * slow_query.h (statement_begin, statement_end) is put in front by pgslowlog.
 */
#if !defined(QUERY_START_ARG_REG) || !defined(QUERY_START_ARG_OFFSET) || \
    !defined(QUERY_START_ARG_DEREF)
#error "the location of query__start's argument must be passed as cflags"
#endif

static __always_inline const char *query_start_text(struct pt_regs *ctx)
{
    u64 value = ctx->QUERY_START_ARG_REG;
    if (QUERY_START_ARG_DEREF) {
        u64 address = value + QUERY_START_ARG_OFFSET;
        value = 0;
        bpf_probe_read_user(&value, sizeof(value), (void *)address);
    }
    return (const char *)value;
}

int on_query_start(struct pt_regs *ctx)
{
    return statement_begin(ctx, query_start_text(ctx), 0, VADDR_postgresql_query__start);
}

int on_query_done(struct pt_regs *ctx)
{
    return statement_end(0);
}

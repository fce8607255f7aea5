/*
 * `extended`: what `activity` does, plus the extended-protocol functions of builds
 * that keep them (at -O2 they are inlined into PostgresMain; at -O0 they stay):
 *   exec_parse_message(const char *query_string, const char *stmt_name, ...)
 *   exec_bind_message(StringInfo input_message)
 *   exec_execute_message(const char *portal_name, long max_rows)
 * Parse and Execute mark the statement as extended-protocol; Bind hands its
 * message (statement name, parameter values) to statement_add_bind(). The
 * StringInfo is read as its first two members, `char *data; int len;`, which
 * have not moved since PostgreSQL 7.
 * slow_query.h and activity_probe.c (on_report_activity: start, end, text) are
 * put in front by pgslowlog.
 */
struct string_info_head {
    const char *data;
    int len;
};

static __always_inline int mark_extended(void)
{
    struct slow_query *record = statement_in_flight();
    if (record)
        record->header.protocol = PROTOCOL_EXTENDED;
    return 0;
}

int on_parse_message(struct pt_regs *ctx)
{
    /* The statement starts here, with its text; the RUNNING report that follows counts. */
    statement_begin(ctx, (const char *)PT_REGS_PARM1(ctx), 1, VADDR_exec_parse_message);
    return mark_extended();
}

int on_bind_message(struct pt_regs *ctx)
{
    struct string_info_head message = {};
    if (bpf_probe_read_user(&message, sizeof(message), (void *)PT_REGS_PARM1(ctx)) != 0)
        return 0;
    return statement_add_bind(message.data, message.len);
}

int on_execute_message(struct pt_regs *ctx)
{
    return mark_extended();
}

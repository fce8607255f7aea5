/*
 * Utility statements (DO, VACUUM, CREATE INDEX, ...) through the exported
 * standard_ProcessUtility(PlannedStmt *pstmt, const char *queryString, ...).
 * pgslowlog puts slow_query.h in front of this file: statement_begin(),
 * statement_end() and VADDR_<symbol> for each symbol this definition names.
 */
int on_utility(struct pt_regs *ctx)
{
    /* keep_running = 1: a utility statement run from inside another keeps the outer one */
    return statement_begin(ctx, (const char *)PT_REGS_PARM2(ctx), 1,
                           VADDR_standard_ProcessUtility);
}

int on_utility_return(struct pt_regs *ctx)
{
    return statement_end(0);
}

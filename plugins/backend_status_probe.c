/*
 * One uprobe per statement, on ReadyForQuery(), plus one on proc_exit().
 *
 * The other definitions trap when a statement starts and again when it ends (a
 * prepared statement three times). This one traps once, where the backend tells
 * the client it is ready again, and reads the statement from the backend's own
 * pg_stat_activity entry (MyBEEntry, an exported PgBackendStatus *):
 *   st_activity_start_timestamp  when the last statement began (its message arrived)
 *   st_state_start_timestamp     when the backend went idle: the statement's end
 *   st_activity_raw              its text, cut at track_activity_query_size - 1
 * PostgreSQL writes all three before ReadyForQuery, in the same process, so they
 * are consistent when read here.
 *
 * Set by the definition through cflags, for the binary's major (pg_layouts.py):
 *   STATE_*                      BackendState values
 *   OFFSET_ACTIVITY_START ...    offsets into PgBackendStatus
 *   MYBEENTRY_VADDR              file address of MyBEEntry
 *   QUERY_SIZE_VADDR             file address of pgstat_track_activity_query_size
 */
#if !defined(STATE_RUNNING) || !defined(STATE_DISABLED) || !defined(OFFSET_ACTIVITY_START) || \
    !defined(OFFSET_STATE_START) || !defined(OFFSET_STATE) || !defined(OFFSET_ACTIVITY_RAW) || \
    !defined(MYBEENTRY_VADDR) || !defined(QUERY_SIZE_VADDR)
#error "the backend_status definition passes the PgBackendStatus layout as cflags"
#endif
/* Both timestamps are read in one copy (`stamps` below). */
_Static_assert(OFFSET_STATE_START == OFFSET_ACTIVITY_START + 8,
               "st_state_start_timestamp does not follow st_activity_start_timestamp");

#define POSTGRES_EPOCH_UNIX_US 946684800000000LL  /* 2000-01-01 in Unix microseconds */

/* Unix nanoseconds of a PostgreSQL timestamp (microseconds since 2000). */
static __always_inline u64 realtime_ns(s64 postgres_us)
{
    return (u64)(postgres_us + POSTGRES_EPOCH_UNIX_US) * 1000;
}

/* CLOCK_MONOTONIC ns of a PostgreSQL timestamp, to compare with the kernel's own stamps. */
static __always_inline u64 monotonic_ns(s64 postgres_us)
{
    return realtime_ns(postgres_us) - setting(SETTING_REALTIME_OFFSET);
}

static __always_inline const char *backend_entry(struct slow_query *record)
{
    const char *entry = 0;
    bpf_probe_read_user(&entry, sizeof(entry), (void *)(record->load_bias + MYBEENTRY_VADDR));
    return entry;
}

/* Copy the statement's text out of the entry; PostgreSQL kept query_size - 1 bytes. */
static __always_inline void read_text(struct slow_query *record, const char *entry)
{
    struct record_header *header = &record->header;
    const char *text = 0;
    int query_size = 0;
    header->query_len = 0;
    header->query_truncated = 0;
    record->query[0] = 0;
    if (bpf_probe_read_user(&text, sizeof(text), entry + OFFSET_ACTIVITY_RAW) || !text)
        return;
    read_query_text(record, text);
    /* As long as PostgreSQL's buffer allows: it may have been cut there. */
    bpf_probe_read_user(&query_size, sizeof(query_size),
                        (void *)(record->load_bias + QUERY_SIZE_VADDR));
    if (query_size > 0 && header->query_len >= query_size - 1)
        header->query_truncated = 1;
}

/*
 * Report the statement the entry describes, if it is new and over the threshold.
 * `end_us` is when it ended (PostgreSQL's clock); `exited` for a backend on its way out.
 */
static __always_inline void report(struct slow_query *record, const char *entry, s64 start_us,
                                   s64 end_us, int exited)
{
    struct record_header *header = &record->header;
    u8 aborted = record->abort_seen, cancelled = record->cancel_requested;
    if (start_us == 0 || start_us == record->last_start_us)
        return;  /* no statement since the last ready: an empty Sync, a failed Bind */
    record->last_start_us = start_us;
    count(COUNTER_STATEMENTS);
    u64 duration = end_us > start_us ? (u64)(end_us - start_us) * 1000 : 0;
    if (!over_threshold(duration))
        return;
    header->start_ns = realtime_ns(start_us);  /* PostgreSQL's clock: Unix time already */
    header->start_clock = START_CLOCK_UNIX;
    header->pid = current_pid();
    header->kind = RECORD_STATEMENT;
    header->protocol = PROTOCOL;
    header->application_name[0] = 0;
    /* A cancel that arrived while the backend was idle cancelled nothing. */
    cancelled = cancelled && record->cancel_ns >= monotonic_ns(start_us);
    header->outcome = exited || aborted ? (cancelled ? OUTCOME_CANCELLED : OUTCOME_ERROR)
                                        : OUTCOME_OK;
    record->running_reports = 0;  /* not seen: the protocol stays unknown */
    read_text(record, entry);
    emit_statement(record, duration, exited, 1);
}

/* The backend state for this call, with the binary's load bias worked out. */
static __always_inline struct slow_query *backend_here(struct pt_regs *ctx, u64 anchor_vaddr)
{
    if (!in_scope())
        return 0;
    struct slow_query *record = backend_state(1);
    if (!record) {
        count(COUNTER_UNTRACKED);
        return 0;
    }
    record->load_bias = (PT_REGS_IP(ctx) - anchor_vaddr) & ~PAGE_MASK_BITS;
    return record;
}

/* The error and cancel flags the outcome probes left belong to this cycle only. */
static __always_inline void forget_outcome(struct slow_query *record)
{
    record->abort_seen = 0;
    record->cancel_requested = 0;
}

/* What one ReadyForQuery tells: the statement of the cycle that just ended, if any. */
static __always_inline void ready(struct slow_query *record)
{
    int first_sight = !record->announced;
    if (first_sight) {
        /* Ready for its first statement: the process title names user and database. */
        record->announced = 1;
        notify_backend(current_pid(), RECORD_BACKEND_STARTED);
    }
    const char *entry = backend_entry(record);
    if (!entry)
        return;
    struct {
        s64 activity_start;
        s64 state_start;
    } stamps = {};
    if (bpf_probe_read_user(&stamps, sizeof(stamps), entry + OFFSET_ACTIVITY_START))
        return;
    if (stamps.activity_start == 0) {
        /* No statement yet, or track_activities = off: then PostgreSQL keeps no record. */
        int state = 0;
        if (bpf_probe_read_user(&state, sizeof(state), entry + OFFSET_STATE) == 0 &&
            state == STATE_DISABLED)
            count(COUNTER_UNRECORDED);
        return;
    }
    if (first_sight && realtime_ns(stamps.activity_start) < setting(SETTING_ATTACHED_REALTIME)) {
        /*
         * A backend that was there before the probes: its last statement began
         * before they attached (a cycle without a statement, such as a bare Sync,
         * would even be timed from long ago). Take it as seen: the other
         * definitions miss a statement that straddles the attach too.
         */
        record->last_start_us = stamps.activity_start;
        return;
    }
    report(record, entry, stamps.activity_start, stamps.state_start, 0);
}

int on_ready_for_query(struct pt_regs *ctx)
{
    struct slow_query *record = backend_here(ctx, VADDR_ReadyForQuery);
    if (!record)
        return 0;
    ready(record);
    forget_outcome(record);
    return 0;
}

/*
 * proc_exit() runs for pg_terminate_backend, FATAL errors and a client's goodbye,
 * while the backend's memory and entry are intact. A statement still running is
 * reported here, timed to now (PostgreSQL has no end for it).
 */
int on_backend_exit(struct pt_regs *ctx)
{
    struct slow_query *record = backend_state(0);
    if (!record)
        return 0;
    const char *entry = backend_entry(record);
    if (!entry)
        return 0;
    s64 start_us = 0;
    int state = 0;
    if (bpf_probe_read_user(&start_us, sizeof(start_us), entry + OFFSET_ACTIVITY_START) ||
        bpf_probe_read_user(&state, sizeof(state), entry + OFFSET_STATE) || state != STATE_RUNNING)
        return 0;
    s64 now_us = (s64)((bpf_ktime_get_ns() + setting(SETTING_REALTIME_OFFSET)) / 1000) -
                 POSTGRES_EPOCH_UNIX_US;
    report(record, entry, start_us, now_us, 1);
    return 0;
}

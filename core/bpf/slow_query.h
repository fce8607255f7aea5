/*
 * What every probe definition shares: the in-flight statement map, the live
 * threshold, the counters and the ring buffer, the record that leaves the kernel,
 * and the outcome handlers (error, cancel) bpf/program.py attaches for every
 * definition. A probe's .c file only decides *when* a statement begins and ends
 * and calls statement_begin() / statement_end().
 *
 * bpf/program.py puts this text in front of the program's .c file to make one
 * translation unit: bcc rewrites map calls (settings.lookup() and friends) only
 * in the main file, so an #include of this file would not work.
 *
 * The record layout, the enums, the counters and the settings indexes are what
 * user space reads (pgslowlog/bpf/decoder.py, program.py): it passes its view as PY_*
 * cflags and the _Static_asserts below stop the compile where the two differ.
 *
 * No kernel struct is dereferenced anywhere: the kernel headers bcc compiles
 * against may not match the running kernel, and only pt_regs, helpers and maps
 * are layout-stable. The shared code reads no PostgreSQL struct either: only
 * exported globals of a plain C type (application_name is a char *), found at
 * load bias + their address in the file. Definitions that do read PostgreSQL's
 * structs (backend_status, for PgBackendStatus) get each offset per major
 * version as cflags from their plugin, which refuses versions it does not know.
 *
 * Set by bpf/program.py through cflags:
 *   QUERY_MAX_BYTES         bytes of query text kept per statement
 *   RINGBUF_PAGES           ring buffer size in pages (a power of two)
 *   REPORT_BACKEND_EXIT     1 to report a statement whose backend exits mid-way
 *   PROTOCOL                0: tell from the number of RUNNING reports; 1 simple; 2 extended
 *   APPLICATION_NAME_VADDR  file address of the global `char *application_name`, or 0
 *   VADDR_<symbol>          file address of each probed function or USDT probe
 *   CAPTURE_PARAMS          1 to copy bound parameter values out of Bind messages
 *   REPORT_FAILURES         1 (sampled only): the outcome handlers send each error and
 *                           cancel as a RECORD_FAILURE, for a definition that times
 *                           statements without this program (optional, default 0)
 *   PY_*                    user space's view of the layout (program.shared_layout_cflags)
 */
#include <uapi/linux/ptrace.h>

#if !defined(QUERY_MAX_BYTES) || !defined(RINGBUF_PAGES) || \
    !defined(REPORT_BACKEND_EXIT) || !defined(PROTOCOL) || !defined(APPLICATION_NAME_VADDR) || \
    !defined(CAPTURE_PARAMS) || !defined(PY_RECORD_HEADER_SIZE)
#error "bpf/program.py passes QUERY_MAX_BYTES, RINGBUF_PAGES, ... as cflags"
#endif
#ifndef REPORT_FAILURES
#define REPORT_FAILURES 0
#endif

#define APPLICATION_NAME_BYTES 64  /* NAMEDATALEN */
#define PAGE_MASK_BITS 0xfffULL

/* What user space receives: a header, then query_len bytes of text for a statement. */
enum record_kind {
    RECORD_STATEMENT = 0,        /* a statement at or over the threshold */
    RECORD_BACKEND_STARTED = 1,  /* first statement of a pid: read its process title now */
    RECORD_BACKEND_EXITED = 2,   /* that pid is gone: forget its title */
    RECORD_BIND = 3,             /* the Bind message of the statement that follows */
    RECORD_FAILURE = 4,          /* REPORT_FAILURES: an error or cancel, start_ns = when */
};

enum outcome { OUTCOME_OK = 0, OUTCOME_ERROR = 1, OUTCOME_CANCELLED = 2 };
enum protocol { PROTOCOL_UNKNOWN = 0, PROTOCOL_SIMPLE = 1, PROTOCOL_EXTENDED = 2 };
/* What start_ns counts: the kernel's clock, which user space turns into Unix time, or
 * Unix time already (a program that reads PostgreSQL's own timestamps). */
enum start_clock { START_CLOCK_MONOTONIC = 0, START_CLOCK_UNIX = 1 };

struct record_header {
    u64 start_ns;        /* statement start, as start_clock says: bpf_ktime_get_ns() mostly */
    u64 duration_ns;
    u32 pid;
    u32 query_len;       /* bytes of text that follow, without the NUL */
    u8 query_truncated;
    u8 backend_exited;   /* the backend ended while the statement was running */
    u8 kind;             /* enum record_kind */
    u8 outcome;          /* enum outcome */
    u8 protocol;         /* enum protocol */
    u8 start_clock;      /* enum start_clock */
    u8 reserved[2];
    char application_name[APPLICATION_NAME_BYTES];
};

struct slow_query {
    struct record_header header;
    char query[QUERY_MAX_BYTES + 1];
    /* Kept in the kernel, never sent: */
    u64 load_bias;          /* where the binary is mapped in this backend */
    u32 running_reports;    /* statement starts seen for this statement */
    u8 cancel_requested;    /* SIGINT arrived since the statement began (or the last end) */
    u8 in_flight;           /* a statement is running: begun, not yet ended */
    u8 announced;           /* user space was sent RECORD_BACKEND_STARTED for this backend */
    u8 abort_seen;          /* an ERROR was recovered from since the last statement end */
    s64 last_start_us;      /* definitions that read PostgreSQL's timestamps: the last seen */
    u64 cancel_ns;          /* bpf_ktime_get_ns() of the last SIGINT */
};

#define BIND_NAME_BYTES 64      /* NAMEDATALEN */
#define BIND_PARAMS_BYTES 8192  /* parameter section of a Bind message kept, at most */

/* A Bind message (portal, statement name, then the parameter section, raw). */
struct bind_record {
    struct record_header header;  /* kind RECORD_BIND; pid and start_ns of the statement */
    char portal[BIND_NAME_BYTES];
    char statement[BIND_NAME_BYTES];
    u32 message_len;              /* the whole message, to tell a cut copy */
    u32 params_len;               /* bytes of params[] that follow */
    char params[BIND_PARAMS_BYTES];
    u8 pending;                   /* kept, never sent: a Bind waits for its statement's end */
};

/* Counters read (and logged when they move) by pgslowlog/bpf/source.py. */
enum counter {
    COUNTER_STATEMENTS = 0,     /* statements seen: as they begin (backend_status: end) */
    COUNTER_EMITTED = 1,        /* slow statements sent to user space */
    COUNTER_UNTRACKED = 2,      /* a statement could not be tracked: no kernel memory */
    COUNTER_RINGBUF_FULL = 3,   /* a record was dropped: the ring buffer refused it twice */
    COUNTER_UNRECORDED = 4,     /* PostgreSQL kept no record to read (track_activities off) */
    COUNTER_COUNT = 5,
};

/* The layout user space reads, checked against what it says it reads. */
#define SAME_AS_USER_SPACE(c_value, py_value, what) \
    _Static_assert((c_value) == (py_value), \
                   what " differs between bpf/slow_query.h and user space (bpf/decoder.py, program.py)")
#define HEADER_FIELD(field) \
    SAME_AS_USER_SPACE(offsetof(struct record_header, field), PY_HEADER_##field, \
                       "the offset of record_header." #field)
#define BIND_FIELD(field) \
    SAME_AS_USER_SPACE(offsetof(struct bind_record, field), PY_BIND_##field, \
                       "the offset of bind_record." #field)
SAME_AS_USER_SPACE(sizeof(struct record_header), PY_RECORD_HEADER_SIZE,
                   "the size of struct record_header");
HEADER_FIELD(start_ns);
HEADER_FIELD(duration_ns);
HEADER_FIELD(pid);
HEADER_FIELD(query_len);
HEADER_FIELD(query_truncated);
HEADER_FIELD(backend_exited);
HEADER_FIELD(kind);
HEADER_FIELD(outcome);
HEADER_FIELD(protocol);
HEADER_FIELD(start_clock);
HEADER_FIELD(reserved);
HEADER_FIELD(application_name);
BIND_FIELD(portal);
BIND_FIELD(statement);
BIND_FIELD(message_len);
BIND_FIELD(params_len);
BIND_FIELD(params);
SAME_AS_USER_SPACE(RECORD_STATEMENT, PY_RECORD_STATEMENT, "RECORD_STATEMENT");
SAME_AS_USER_SPACE(RECORD_BACKEND_STARTED, PY_RECORD_BACKEND_STARTED, "RECORD_BACKEND_STARTED");
SAME_AS_USER_SPACE(RECORD_BACKEND_EXITED, PY_RECORD_BACKEND_EXITED, "RECORD_BACKEND_EXITED");
SAME_AS_USER_SPACE(RECORD_BIND, PY_RECORD_BIND, "RECORD_BIND");
SAME_AS_USER_SPACE(RECORD_FAILURE, PY_RECORD_FAILURE, "RECORD_FAILURE");
SAME_AS_USER_SPACE(OUTCOME_OK, PY_OUTCOME_OK, "OUTCOME_OK");
SAME_AS_USER_SPACE(OUTCOME_ERROR, PY_OUTCOME_ERROR, "OUTCOME_ERROR");
SAME_AS_USER_SPACE(OUTCOME_CANCELLED, PY_OUTCOME_CANCELLED, "OUTCOME_CANCELLED");
SAME_AS_USER_SPACE(PROTOCOL_UNKNOWN, PY_PROTOCOL_UNKNOWN, "PROTOCOL_UNKNOWN");
SAME_AS_USER_SPACE(PROTOCOL_SIMPLE, PY_PROTOCOL_SIMPLE, "PROTOCOL_SIMPLE");
SAME_AS_USER_SPACE(PROTOCOL_EXTENDED, PY_PROTOCOL_EXTENDED, "PROTOCOL_EXTENDED");
SAME_AS_USER_SPACE(START_CLOCK_MONOTONIC, PY_START_CLOCK_MONOTONIC, "START_CLOCK_MONOTONIC");
SAME_AS_USER_SPACE(START_CLOCK_UNIX, PY_START_CLOCK_UNIX, "START_CLOCK_UNIX");
SAME_AS_USER_SPACE(COUNTER_STATEMENTS, PY_COUNTER_STATEMENTS, "COUNTER_STATEMENTS");
SAME_AS_USER_SPACE(COUNTER_EMITTED, PY_COUNTER_EMITTED, "COUNTER_EMITTED");
SAME_AS_USER_SPACE(COUNTER_UNTRACKED, PY_COUNTER_UNTRACKED, "COUNTER_UNTRACKED");
SAME_AS_USER_SPACE(COUNTER_RINGBUF_FULL, PY_COUNTER_RINGBUF_FULL, "COUNTER_RINGBUF_FULL");
SAME_AS_USER_SPACE(COUNTER_UNRECORDED, PY_COUNTER_UNRECORDED, "COUNTER_UNRECORDED");
SAME_AS_USER_SPACE(COUNTER_COUNT, PY_COUNTER_COUNT, "COUNTER_COUNT");

#ifdef BPF_TASK_STORAGE
/*
 * Each backend's statement state lives in task-local storage: created on the
 * backend's first statement and freed by the kernel with the process. A statement
 * then costs no map allocation, no hash look-up and no copy of the record: the
 * text is read straight into its slot. Nothing caps the number of backends.
 */
BPF_TASK_STORAGE(backend_statements, struct slow_query);
/* The last Bind message of each backend, until its statement ends. */
BPF_TASK_STORAGE(backend_binds, struct bind_record);
#else
/*
 * This bcc cannot declare task storage (bcc before 0.24, such as Debian 11's 0.18):
 * the same state in hash maps keyed by pid. Costs: a hash look-up per probe hit; an
 * allocation on a backend's first statement (not preallocated: MAX_BACKENDS slots of
 * QUERY_MAX_BYTES each would pin tens of MiB), which kernels before 6.1 (no BPF
 * allocator of their own) warn about once in their log; at most MAX_BACKENDS
 * backends tracked at once (beyond, COUNTER_UNTRACKED); and the entries are
 * removed by the exit tracepoint below instead of by the kernel.
 */
#ifndef MAX_BACKENDS
#error "bpf/program.py passes MAX_BACKENDS as a cflag"
#endif
BPF_F_TABLE("hash", u32, struct slow_query, backend_statements, MAX_BACKENDS, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", u32, struct bind_record, backend_binds, MAX_BACKENDS, BPF_F_NO_PREALLOC);
/* Never written: the zeroes a new entry starts from (too big for the BPF stack). */
BPF_ARRAY(empty_statement, struct slow_query, 1);
BPF_ARRAY(empty_bind, struct bind_record, 1);
#endif
/*
 * [0] = threshold in ns. A map, not a cflag, so SIGHUP changes it without re-attaching.
 * [1] = CLOCK_REALTIME - CLOCK_MONOTONIC in ns, kept current by user space: for
 *       definitions that compare the kernel's clock with PostgreSQL's timestamps.
 * [2] = CLOCK_REALTIME ns when the probes were attached.
 */
#define SETTING_THRESHOLD 0
#define SETTING_REALTIME_OFFSET 1
#define SETTING_ATTACHED_REALTIME 2
BPF_ARRAY(settings, u64, 3);
SAME_AS_USER_SPACE(SETTING_THRESHOLD, PY_SETTING_THRESHOLD, "SETTING_THRESHOLD");
SAME_AS_USER_SPACE(SETTING_REALTIME_OFFSET, PY_SETTING_REALTIME_OFFSET, "SETTING_REALTIME_OFFSET");
SAME_AS_USER_SPACE(SETTING_ATTACHED_REALTIME, PY_SETTING_ATTACHED_REALTIME,
                   "SETTING_ATTACHED_REALTIME");
BPF_PERCPU_ARRAY(counters, u64, COUNTER_COUNT);
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
/* Where a record goes when `events` refuses it: see ring_output(). 256 KiB. */
BPF_RINGBUF_OUTPUT(spill, 64);

static __always_inline void count(int which)
{
    u64 *value = counters.lookup(&which);
    if (value)
        (*value)++;  /* per-CPU slot: no atomic needed */
}

/*
 * The current process's pid as the daemon's /proc shows it. The kernel's tgid is the
 * initial pid namespace's: the daemon's own on a host, not in a sidecar or a container
 * that shares its server's pid namespace (OWN_PID_NS_INIT 0), where the helper gives
 * the pid of the daemon's namespace (the probes trace only that one there).
 */
#ifndef OWN_PID_NS_INIT
#error "bpf/program.py passes OWN_PID_NS_INIT, OWN_PID_NS_DEV and OWN_PID_NS_INO as cflags"
#endif
static __always_inline u32 current_pid(void)
{
#if OWN_PID_NS_INIT
    return bpf_get_current_pid_tgid() >> 32;
#else
    struct bpf_pidns_info ns = {};
    if (bpf_get_ns_current_pid_tgid(OWN_PID_NS_DEV, OWN_PID_NS_INO, &ns, sizeof(ns)))
        return 0;  /* not in it: never the case where a program runs (in_scope) */
    return ns.tgid;
#endif
}

/*
 * The current backend's statement state; created only when a statement begins.
 * bpf_get_current_task_btf() is handed to the helper, never dereferenced.
 */
static __always_inline struct slow_query *backend_state(int create)
{
#ifdef BPF_TASK_STORAGE
    struct task_struct *task = (struct task_struct *)bpf_get_current_task_btf();
    return backend_statements.task_storage_get(task, 0,
                                               create ? BPF_LOCAL_STORAGE_GET_F_CREATE : 0);
#else
    u32 pid = current_pid();
    if (!create)
        return backend_statements.lookup(&pid);
    int zero = 0;
    struct slow_query *empty = empty_statement.lookup(&zero);
    return empty ? backend_statements.lookup_or_try_init(&pid, empty) : 0;
#endif
}

/* The statement the current backend is running, or NULL. */
static __always_inline struct slow_query *statement_in_flight(void)
{
    struct slow_query *record = backend_state(0);
    return record && record->in_flight ? record : 0;
}

static __always_inline struct bind_record *backend_bind(int create)
{
#ifdef BPF_TASK_STORAGE
    struct task_struct *task = (struct task_struct *)bpf_get_current_task_btf();
    return backend_binds.task_storage_get(task, 0, create ? BPF_LOCAL_STORAGE_GET_F_CREATE : 0);
#else
    u32 pid = current_pid();
    if (!create)
        return backend_binds.lookup(&pid);
    int zero = 0;
    struct bind_record *empty = empty_bind.lookup(&zero);
    return empty ? backend_binds.lookup_or_try_init(&pid, empty) : 0;
#endif
}

/* At the backend's exit: what task storage would have freed with the task. */
static __always_inline void forget_backend(u32 pid)
{
#ifndef BPF_TASK_STORAGE
    backend_statements.delete(&pid);
    backend_binds.delete(&pid);
#endif
}

static __always_inline void forget_bind(void)
{
    struct bind_record *bind = backend_bind(0);
    if (bind)
        bind->pending = 0;
}

/*
 * Whether to wake the reader for this record. A wake-up for every record is a
 * context switch per statement at threshold 0, on the cores PostgreSQL needs, so
 * the reader (ringbuf.py) also looks every few milliseconds on its own and is
 * woken only every WAKEUP_EVERY statements a CPU emits (so a burst cannot fill
 * the buffer between two looks), or for an urgent record.
 */
#define WAKEUP_EVERY 512

static __always_inline u64 wakeup_flags(int urgent)
{
    if (urgent)
        return BPF_RB_FORCE_WAKEUP;
    int which = COUNTER_EMITTED;
    u64 *emitted = counters.lookup(&which);
    if (emitted && (*emitted & (WAKEUP_EVERY - 1)) == WAKEUP_EVERY - 1)
        return BPF_RB_FORCE_WAKEUP;
    return BPF_RB_NO_WAKEUP;
}

/*
 * Submit a record. The ring buffer's lock (a resilient spin lock since Linux
 * 6.15) may refuse a reservation at once with room to spare: measured here,
 * about 1 record in 300,000 at threshold 0 on 2 busy CPUs, refused in under
 * 300 ns, sometimes several times in a row. A second, small ring buffer with a
 * lock of its own took every one of them in the same test, so a refused record
 * goes there; user space reads both. Only when both refuse is it lost (counted).
 */
static __always_inline long ring_output(void *data, u64 size, u64 flags)
{
    if (events.ringbuf_output(data, size, flags) == 0)
        return 0;
    if (events.ringbuf_output(data, size, flags) == 0)
        return 0;
    return spill.ringbuf_output(data, size, BPF_RB_NO_WAKEUP);
}

/*
 * A uprobe fires in every process that maps the file, in whatever container it runs:
 * several containers of one image share it. Each program traces one pid namespace
 * (PID_NS_DEV/PID_NS_INO: a container's instance, or the daemon's own for a host
 * target), so each statement reaches its own instance, and only one. The helper
 * compares the current task's namespace; it costs a few tens of nanoseconds, paid
 * where a statement or a failure begins.
 */
#ifndef PID_NS_INO
#error "bpf/program.py passes PID_NS_DEV and PID_NS_INO as cflags"
#endif
static __always_inline int in_scope(void)
{
    struct bpf_pidns_info ns = {};
    return bpf_get_ns_current_pid_tgid(PID_NS_DEV, PID_NS_INO, &ns, sizeof(ns)) == 0;
}

/* Urgent when a backend starts: user space reads its process title while it lives. */
static __always_inline void notify_backend(u32 pid, u8 kind)
{
    struct record_header notice = {};
    notice.pid = pid;
    notice.kind = kind;
    u64 flags = wakeup_flags(kind == RECORD_BACKEND_STARTED);
    if (ring_output(&notice, sizeof(notice), flags) != 0)
        count(COUNTER_RINGBUF_FULL);
}

/* Copy a statement's text into the record: query, query_len, query_truncated. */
static __always_inline void read_query_text(struct slow_query *record, const char *text)
{
    struct record_header *header = &record->header;
    long copied = bpf_probe_read_user_str(record->query, sizeof(record->query), text);
    header->query_len = copied > 0 ? copied - 1 : 0;
    header->query_truncated = 0;
    if (copied == sizeof(record->query)) {
        /* Exactly full: the text is longer than QUERY_MAX_BYTES only if more follows. */
        char next = 0;
        bpf_probe_read_user(&next, 1, text + QUERY_MAX_BYTES);
        header->query_truncated = next != 0;
    }
}

/*
 * Start timing a statement of the current backend. `anchor_vaddr` is the file
 * address of the probed function or USDT probe (VADDR_<name>): the difference to
 * the instruction pointer is where the binary is mapped, which locates globals.
 * With keep_running set, a statement already in flight is kept (its start time
 * and text win): the extended protocol reports parse, bind and execute of one
 * statement separately.
 */
static __always_inline int statement_begin(struct pt_regs *ctx, const char *text,
                                           int keep_running, u64 anchor_vaddr)
{
    if (!in_scope())
        return 0;
    u32 pid = current_pid();
    struct slow_query *record = backend_state(1);
    if (!record) {
        count(COUNTER_UNTRACKED);
        return 0;
    }
    if (keep_running && record->in_flight) {
        record->running_reports++;
        return 0;
    }
    if (!record->announced) {
        record->announced = 1;
        notify_backend(pid, RECORD_BACKEND_STARTED);
    }

    struct record_header *header = &record->header;
    header->start_ns = bpf_ktime_get_ns();
    header->start_clock = START_CLOCK_MONOTONIC;
    header->duration_ns = 0;
    header->pid = pid;
    header->backend_exited = 0;
    header->query_truncated = 0;
    header->kind = RECORD_STATEMENT;
    header->outcome = OUTCOME_OK;
    header->protocol = PROTOCOL;
    header->application_name[0] = 0;
    /* A mapping starts on a page boundary: masking also absorbs an IP past the trap. */
    record->load_bias = (PT_REGS_IP(ctx) - anchor_vaddr) & ~PAGE_MASK_BITS;
    record->running_reports = 1;
    record->cancel_requested = 0;
    read_query_text(record, text);
    record->in_flight = 1;
    count(COUNTER_STATEMENTS);
    return 0;
}

static __always_inline void read_application_name(struct slow_query *record)
{
    if (!APPLICATION_NAME_VADDR)
        return;
    const char *name = 0;
    bpf_probe_read_user(&name, sizeof(name), (void *)(record->load_bias + APPLICATION_NAME_VADDR));
    if (name)
        bpf_probe_read_user_str(record->header.application_name, APPLICATION_NAME_BYTES, name);
}

/*
 * A definition that sees Bind messages hands them over here: `message` and
 * `message_len` are the StringInfo's data and len (the message body). The names
 * are always kept; parameter values only with CAPTURE_PARAMS, since they may hold
 * personal data.
 */
static __always_inline int statement_add_bind(const char *message, int message_len)
{
    if (!in_scope())
        return 0;
    struct bind_record *bind = backend_bind(1);
    if (!bind)
        return 0;
    bind->pending = 0;  /* until this message is read whole */
    if (message_len < 2)
        return 0;
    long portal = bpf_probe_read_user_str(bind->portal, BIND_NAME_BYTES, message);
    if (portal < 1)
        return 0;
    long statement = bpf_probe_read_user_str(bind->statement, BIND_NAME_BYTES, message + portal);
    if (statement < 1)
        return 0;
    bind->message_len = message_len;
    bind->params_len = 0;
    /* A name that filled its slot may be longer: then the parameters' start is unknown. */
    if (CAPTURE_PARAMS && portal < BIND_NAME_BYTES && statement < BIND_NAME_BYTES) {
        u64 offset = portal + statement;
        u64 size = message_len > offset ? message_len - offset : 0;
        asm volatile("" : "+r"(size));
        if (size > BIND_PARAMS_BYTES)
            size = BIND_PARAMS_BYTES;
        asm volatile("" : "+r"(size));
        if (size > 0 && bpf_probe_read_user(bind->params, size, message + offset) == 0)
            bind->params_len = size;
    }
    bind->pending = 1;
    return 0;
}

static __always_inline void emit_bind(u32 pid, u64 start_ns)
{
    struct bind_record *bind = backend_bind(0);
    if (!bind || !bind->pending)
        return;
    bind->header.kind = RECORD_BIND;
    bind->header.pid = pid;
    bind->header.start_ns = start_ns;
    u64 size = offsetof(struct bind_record, params) + bind->params_len;
    asm volatile("" : "+r"(size));
    if (size > sizeof(struct bind_record))
        size = sizeof(struct bind_record);
    asm volatile("" : "+r"(size));
    /* Never woken for: the statement record that follows decides. */
    if (ring_output(bind, size, BPF_RB_NO_WAKEUP) != 0)
        count(COUNTER_RINGBUF_FULL);
}

static __always_inline u64 setting(int which)
{
    u64 *value = settings.lookup(&which);
    return value ? *value : 0;
}

static __always_inline int over_threshold(u64 duration_ns)
{
    int which = SETTING_THRESHOLD;
    u64 *threshold = settings.lookup(&which);
    return threshold && duration_ns >= *threshold;
}

/*
 * Send a statement that reached the threshold: header->start_ns, query and
 * query_len are filled in by the caller. `read_memory` is 0 when the backend's
 * memory may already be gone (an exiting process).
 */
static __always_inline void emit_statement(struct slow_query *record, u64 duration_ns,
                                           int backend_exited, int read_memory)
{
    struct record_header *header = &record->header;
    header->duration_ns = duration_ns;
    header->backend_exited = backend_exited;
    if (header->protocol == PROTOCOL_UNKNOWN && record->running_reports > 0)
        /* parse+bind+execute, or bind+execute, report RUNNING more than once */
        header->protocol = record->running_reports > 1 ? PROTOCOL_EXTENDED : PROTOCOL_SIMPLE;
    if (read_memory)
        read_application_name(record);
    emit_bind(header->pid, header->start_ns);  /* first: user space pairs it with what follows */
    /* Send only the header and the text that is there, not the whole buffer. */
    u64 size = sizeof(struct record_header) + header->query_len;
    /* The barriers keep clang from clamping a copy the verifier cannot see. */
    asm volatile("" : "+r"(size));
    if (size > sizeof(struct record_header) + QUERY_MAX_BYTES + 1)
        size = sizeof(struct record_header) + QUERY_MAX_BYTES + 1;
    asm volatile("" : "+r"(size));
    if (ring_output(record, size, wakeup_flags(0)) != 0)
        count(COUNTER_RINGBUF_FULL);
    else
        count(COUNTER_EMITTED);
}

/* Stop timing; only a statement at or over the threshold leaves the kernel. */
static __always_inline int statement_end(int backend_exited)
{
    struct slow_query *record = statement_in_flight();
    if (!record)
        return 0;
    u64 duration = bpf_ktime_get_ns() - record->header.start_ns;
    if (over_threshold(duration))
        /* an exiting process's memory is being torn down: do not read it */
        emit_statement(record, duration, backend_exited, !backend_exited);
    record->in_flight = 0;
    forget_bind();
    return 0;
}

/*
 * Outcome, attached by bpf/program.py for every program where the binary has the
 * exported symbols. StatementCancelHandler is the SIGINT handler: statement_timeout,
 * pg_cancel_backend() and a client's cancel request all arrive through it.
 * AbortCurrentTransaction runs when a client backend recovers from an ERROR: the
 * statement ends there, as an error, or cancelled if a cancel had arrived.
 */
/* REPORT_FAILURES: the failure itself, for user space to match with the statement it
 * times by other means (its pid, and a time between the statement's start and end). */
static __always_inline int report_failure(u8 outcome)
{
    if (!in_scope())
        return 0;
    struct record_header failure = {};
    failure.start_ns = bpf_ktime_get_ns();
    failure.pid = current_pid();
    failure.kind = RECORD_FAILURE;
    failure.outcome = outcome;
    if (ring_output(&failure, sizeof(failure), BPF_RB_NO_WAKEUP) != 0)
        count(COUNTER_RINGBUF_FULL);
    return 0;
}

int on_cancel_request(struct pt_regs *ctx)
{
    if (REPORT_FAILURES)
        return report_failure(OUTCOME_CANCELLED);
    /* Not only in flight: a definition that times statements at their end asks later. */
    struct slow_query *record = backend_state(0);
    if (record) {
        record->cancel_requested = 1;
        record->cancel_ns = bpf_ktime_get_ns();
    }
    return 0;
}

int on_transaction_abort(struct pt_regs *ctx)
{
    if (REPORT_FAILURES)
        return report_failure(OUTCOME_ERROR);
    struct slow_query *state = backend_state(0);
    if (state)
        state->abort_seen = 1;  /* for a definition that learns of the statement at its end */
    struct slow_query *record = statement_in_flight();
    if (!record) {
        forget_bind();  /* a Bind that failed before its statement began */
        return 0;
    }
    record->header.outcome = record->cancel_requested ? OUTCOME_CANCELLED : OUTCOME_ERROR;
    return statement_end(0);
}

/*
 * A backend that exits mid-statement (pg_terminate_backend, FATAL, crash) never
 * reports the end: report it here. A raw tracepoint needs no tracefs and no
 * struct access: the exiting task is the current one. The kernel frees the task's
 * storage itself.
 * A probe that cannot see every statement end is built with REPORT_BACKEND_EXIT 0:
 * a stale entry would be reported with a made-up duration, so it is only dropped.
 */
RAW_TRACEPOINT_PROBE(sched_process_exit)
{
    u64 id = bpf_get_current_pid_tgid();
    if ((u32)id != (u32)(id >> 32))
        return 0;  /* a thread, not a whole process (pid == tgid in every namespace) */
    u32 pid = current_pid();
    if (!pid)
        return 0;  /* outside the daemon's pid namespace, where it traces nothing */
    struct slow_query *record = backend_state(0);
    if (!record) {
        forget_backend(pid);  /* a Bind may have come without a statement */
        return 0;  /* not a backend that ever ran a statement */
    }
    if (record->in_flight) {
        if (REPORT_BACKEND_EXIT) {
            record->header.outcome = OUTCOME_ERROR;
            statement_end(1);
        } else {
            record->in_flight = 0;
        }
    }
    if (record->announced)
        notify_backend(pid, RECORD_BACKEND_EXITED);
    forget_backend(pid);
    return 0;
}

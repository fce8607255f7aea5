/*
 * Every exec of a program called "postgres" (or "postmaster", the old name 13-15 still
 * install as a link), anywhere on the host, in any container: its pid (the host's),
 * for container_finder.py to look at. A container's postmaster is exec'd (by its
 * runtime, an entrypoint script or pg_ctl); backends are forked, so a busy server
 * sends nothing here. The comparison runs in the kernel: other execs cost a few
 * instructions and reach no one.
 */
#include <linux/sched.h>

BPF_RINGBUF_OUTPUT(execs, 8);  /* 32 KiB: 8,192 pids between two reads */
BPF_ARRAY(lost, u64, 1);       /* notices the ring refused: user space says so */

/* `name` with its NUL, against the command name. */
static __always_inline int named(const char *comm, const char *name, int length)
{
#pragma unroll
    for (int i = 0; i < length; i++)
        if (comm[i] != name[i])
            return 0;
    return 1;
}

RAW_TRACEPOINT_PROBE(sched_process_exec)
{
    char comm[TASK_COMM_LEN] = {};
    bpf_get_current_comm(&comm, sizeof(comm));
    /* After exec the command name is the new program's file name. */
    if (!named(comm, "postgres", 9) && !named(comm, "postmaster", 11))
        return 0;
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    if (execs.ringbuf_output(&pid, sizeof(pid), 0) != 0) {
        int zero = 0;
        u64 *count = lost.lookup(&zero);
        if (count)
            __sync_fetch_and_add(count, 1);
    }
    return 0;
}

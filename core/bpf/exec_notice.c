/*
 * Every exec of a program called "postgres", anywhere on the host, in any container:
 * its pid (the host's), for container_finder.py to look at. A container's postmaster
 * is exec'd (by its runtime, an entrypoint script or pg_ctl); backends are forked, so
 * a busy server sends nothing here. The comparison runs in the kernel: other execs
 * cost a few instructions and reach no one.
 */
#include <linux/sched.h>

BPF_RINGBUF_OUTPUT(execs, 8);  /* 32 KiB: 8,192 pids between two reads */

RAW_TRACEPOINT_PROBE(sched_process_exec)
{
    char comm[TASK_COMM_LEN] = {};
    bpf_get_current_comm(&comm, sizeof(comm));
    /* After exec the command name is the new program's file name. */
    if (comm[0] != 'p' || comm[1] != 'o' || comm[2] != 's' || comm[3] != 't' ||
        comm[4] != 'g' || comm[5] != 'r' || comm[6] != 'e' || comm[7] != 's' || comm[8] != 0)
        return 0;
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    execs.ringbuf_output(&pid, sizeof(pid), 0);
    return 0;
}

"""The BPF kind of statement source: a program in the kernel times every statement.

program (what a definition's BPF program is, and the factory that builds it for one
target: cflags, one translation unit with slow_query.h), compiler (compiled and
loaded in a short-lived child, so the daemon never maps LLVM), source (attach,
threshold, counters, detach: the StatementSource), libbcc (bcc's syscall library
through ctypes), ringbuf (records read from the ring buffer's shared memory) and
decoder (a record's bytes to records.py types, the kernel's clock to Unix time).
"""

"""The harness of the demo, the tests and the benchmark: not part of the daemon.

cluster: a throwaway PostgreSQL cluster from any bin directory.
daemon_process: `pgslowlog run` as a child process, watched through its JSON log.
"""

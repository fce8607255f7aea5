"""`pgslowlog check`: validate the config and the machine before anything attaches.

Every finding is one line: "ok: ..." or "error: <cause>; <fix>". Exit status 2 when
any check failed, so an installer can use it as a validate step.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from pgslowlog.config import STDIN, STDIN_NAME, Config, DaemonConfig, load_config
from pgslowlog.container_finder import servers_now
from pgslowlog.container_watch import assign
from pgslowlog.containers import ContainerServer
from pgslowlog.elf import PostgresBinary, file_identity, inspect_binary
from pgslowlog.errors import UserError
from pgslowlog.machine import Finding, machine_findings
from pgslowlog.metrics import check_listen
from pgslowlog.planner import PlannedTarget, Planner
from pgslowlog.plugin_manager import Plugins
from pgslowlog.probes import ProbeDefinition, auto_order, wanted_symbols
from pgslowlog.sources import ProbeLoadError
from pgslowlog.targets import Target, resolve_target


def run_checks(config_path: str) -> list[Finding]:
    findings: list[Finding] = []
    try:
        config = load_config(config_path)
    except UserError as error:
        return [Finding(False, str(error))]
    if config_path == STDIN:
        config_path = STDIN_NAME
    findings.append(Finding(True, f"config {config_path} is valid"))
    if config.metrics is not None:
        try:
            findings.append(check_listen(config.metrics))
        except UserError as error:
            findings.append(Finding(False, str(error)))

    if config.explaining:
        findings.append(explain_finding(config))

    machine = machine_findings()
    findings += machine

    plugins = Plugins.load()
    findings += [Finding(False, f"{failure}; fix or uninstall it") for failure in plugins.failures]
    findings += _target_findings(config, plugins)
    try:
        the_plan = Planner(plugins).plan(config, config_path)
    except UserError as error:
        findings.append(Finding(False, str(error)))
        return findings
    findings += [Finding(True, f"sink {name} options valid") for name in the_plan.sink_options]

    try:
        if all(finding.ok for finding in machine):
            findings += _load_findings(config, the_plan.targets)
    finally:
        the_plan.close()
    return findings


def explain_finding(config: Config) -> Finding:
    """[explain] needs the optional extra's driver, psycopg; and its passfile, if named."""
    try:
        import psycopg  # noqa: F401  # only whether it is installed
    except ImportError:
        return Finding(
            False,
            "[explain] is set but psycopg is missing; install the extra: "
            "pip install 'pgslowlog[explain]' (or remove [explain])",
        )
    assert config.explain is not None
    passfile = config.explain.passfile
    if passfile is not None and not os.access(passfile, os.R_OK):
        return Finding(
            False,
            f"explain.passfile {passfile} is not readable; create it (mode 0600, owned by "
            "the daemon's user) or remove the key to use peer authentication",
        )
    return Finding(True, f"[explain] explains as role {config.explain.user} (psycopg installed)")


def _load_findings(config: Config, targets: list[PlannedTarget]) -> list[Finding]:
    findings = []
    for planned in targets:
        target = planned.target
        for definition in planned.definitions:
            try:
                # Opening runs the compiler and the kernel's verifier; nothing is attached.
                definition.open(definition, target, config.daemon).close()
            except ProbeLoadError as error:
                findings.append(Finding(False, str(error)))
            else:
                findings.append(
                    Finding(True, f"{target.label}: probe {definition.name} compiled and verified")
                )
    return findings


def _target_findings(config: Config, plugins: Plugins) -> list[Finding]:
    findings = []
    definitions = plugins.probe_definitions
    wanted = wanted_symbols(definitions.values())
    containers = [(i, t) for i, t in enumerate(config.target) if t.containers]
    assigned = assign(servers_now(), containers) if containers else {}
    for index, target_config in enumerate(config.target):
        if target_config.containers:
            findings += _container_findings(config, index, assigned[index], plugins)
            continue
        if target_config.binary is not None and file_identity(target_config.binary) is None:
            # Not an error: ExecStartPre runs check, and PostgreSQL may be installed later.
            findings.append(
                Finding(
                    True,
                    f"target[{index}] binary {target_config.binary} does not exist yet; "
                    "run attaches when it appears (check the path if PostgreSQL is installed)",
                    warning=True,
                )
            )
            continue
        try:
            target = resolve_target(target_config, index, wanted)
        except UserError as error:
            findings.append(Finding(False, str(error)))
            continue
        target.file.close()
        findings.append(Finding(True, _support(target, plugins)))
    return findings


def _support(target: Target, plugins: Plugins) -> str:
    binary = target.binary
    support = []
    for name, definition in sorted(
        plugins.probe_definitions.items(), key=lambda kv: -kv[1].priority
    ):
        reason = definition.unsupported_reason(binary)
        support.append(f"{name}: {'supported' if reason is None else reason}")
    return (
        f"{target.label}: {binary.path} is PostgreSQL {binary.version}, "
        f"{binary.symbols_kind}, {binary.usdt_kind}; probes: {'; '.join(support)}"
    )


def _container_findings(
    config: Config, index: int, servers: list[ContainerServer], plugins: Plugins
) -> list[Finding]:
    """The servers a containers = true target would trace now, one line each. A server
    it cannot trace is a warning, not an error: `run` says so and traces the others."""
    target_config = config.target[index]
    if not servers:
        return [
            Finding(
                True,
                f"target[{index}] (containers = true): no PostgreSQL server runs in a "
                "container now; run traces each one as it starts",
                warning=True,
            )
        ]
    findings = []
    for server in servers:
        where = f"hostname {server.hostname}, postmaster pid {server.host_pid} here"
        try:  # as run resolves it: a major no definition fits is refused there too
            target, _ = Planner(plugins).resolve(target_config, index, config.daemon, server)
        except UserError as error:
            findings.append(Finding(True, f"{error} ({where}): not traced", warning=True))
            continue
        target.file.close()
        findings.append(Finding(True, f"{_support(target, plugins)} ({where})"))
    return findings


def describe_probes(binary_path: str) -> list[str]:
    """`pgslowlog probes --binary PATH`: every known definition, usable or why not."""
    plugins = Plugins.load()
    definitions = plugins.probe_definitions
    binary = inspect_binary(binary_path, wanted_symbols(definitions.values()))
    lines = [
        f"{binary.path}: PostgreSQL {binary.version}, {binary.symbols_kind}, {binary.usdt_kind}"
    ]
    for definition in sorted(definitions.values(), key=lambda d: -d.priority):
        reason = definition.unsupported_reason(binary)
        status = "can attach" if reason is None else f"cannot attach: {reason}"
        lines.append(f"  {definition.name:<14} {status}")
        lines.append(f"  {'':<14} {definition.description}")
    lines.append(f'probes = ["auto"] picks: {auto_choice(definitions.values(), binary)}')
    lines += [f"warning: {failure}" for failure in plugins.failures]
    return lines


def auto_choice(definitions: Iterable[ProbeDefinition], binary: PostgresBinary) -> str:
    """What "auto" picks on `binary`, by threshold where a definition has a floor
    (at the default settings: the floor may depend on them)."""
    defaults = DaemonConfig()
    picks: list[str] = []
    for definition in auto_order(definitions):
        if definition.unsupported_reason(binary) is not None:
            continue
        if definition.auto_floor_ms is None:
            picks.append(definition.name if not picks else f"otherwise {definition.name}")
            break
        floor = definition.auto_floor_ms(defaults)
        picks.append(f"{definition.name} when threshold_ms >= {floor:g} (default settings)")
    return ", ".join(picks) or "nothing (no definition can attach)"


def main(config_path: str) -> int:
    findings = run_checks(config_path)
    for finding in findings:
        print(finding)
    failed = [f for f in findings if not f.ok]
    print(f"{len(failed)} problem(s) found" if failed else "all checks passed")
    return 2 if failed else 0

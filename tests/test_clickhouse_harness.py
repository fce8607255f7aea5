"""pgslowlog.testing.clickhouse: real clickhouse-server shards for the ClickHouse sink's tests.

Debian 12's ClickHouse 18.16.1 (.ci/bootstrap installs it): two servers, a cluster
`fleet` of them, a ReplacingMergeTree table on each and a Distributed table over both.
What the sink will lean on is shown here against the real servers: a synchronous insert
through the Distributed table spreads rows by cityHash64(id), FINAL collapses the rows
inserted twice, a shard that is down fails a synchronous insert with a clear error, and
the cluster leaves no process and no file behind.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgslowlog.testing.clickhouse import (
    ClickHouseCluster,
    ClickHouseError,
    clickhouse_processes,
)

pytestmark = pytest.mark.system  # Debian's clickhouse-server, as .ci/bootstrap installs it

LOCAL = (
    "CREATE TABLE default.t_local (id String, v UInt32) ENGINE = ReplacingMergeTree() ORDER BY id"
)
DISTRIBUTED = (
    "CREATE TABLE default.t (id String, v UInt32) "
    "ENGINE = Distributed(fleet, default, t_local, cityHash64(id))"
)
INSERT = "INSERT INTO t FORMAT JSONEachRow"
SYNC = {"insert_distributed_sync": 1}  # the insert returns once every shard has its rows
ROWS = "\n".join(json.dumps({"id": f"query-{n}", "v": n}) for n in range(10)) + "\n"


@pytest.fixture
def fleet() -> Iterator[ClickHouseCluster]:
    with ClickHouseCluster(shards=2, password="s3cret") as cluster:
        for shard in range(2):
            cluster.query(LOCAL, shard)
            cluster.query(DISTRIBUTED, shard)
        yield cluster


def local_counts(cluster: ClickHouseCluster) -> list[int]:
    return [int(cluster.query("SELECT count() FROM t_local", shard)) for shard in range(2)]


def test_distributed_insert_spreads_rows_and_final_collapses_repeats(
    fleet: ClickHouseCluster,
) -> None:
    assert fleet.query("SELECT version()").strip() == "18.16.1"
    clusters = fleet.query(
        "SELECT shard_num, port FROM system.clusters WHERE cluster = 'fleet' FORMAT TSV"
    )
    assert clusters.split() == [
        str(value)
        for number, shard in enumerate(fleet.shards, 1)
        for value in (number, shard.tcp_port)
    ]

    fleet.query(INSERT, data=ROWS, settings=SYNC)
    first = local_counts(fleet)
    assert sum(first) == 10 and all(first), first  # both shards hold some
    fleet.query(INSERT, data=ROWS, settings=SYNC)  # the same rows again: a retried batch
    assert local_counts(fleet) == [2 * count for count in first]  # same ids, same shards

    assert fleet.query("SELECT count() FROM t FINAL").strip() == "10"
    assert fleet.query("SELECT count() FROM t").strip() == "20"  # until a merge


def test_insert_fails_clearly_while_a_shard_is_down(fleet: ClickHouseCluster) -> None:
    fleet.stop_server(1)
    assert not fleet.running(1) and fleet.running(0)
    with pytest.raises(ClickHouseError) as refused:
        fleet.query(INSERT, data=ROWS, settings=SYNC)
    assert refused.value.status == 500
    assert refused.value.code == 210  # NETWORK_ERROR
    assert f"Connection refused (127.0.0.1:{fleet.shards[1].tcp_port})" in refused.value.text
    # The text says shard 0 wrote its part ("Wrote 1 blocks and N rows on shard 0"), yet
    # 18.16 kept none of it here; either way a retry after the outage is what counts.
    assert "Insertion status:" in refused.value.text

    fleet.start_server(1)  # same ports, same data
    fleet.query(INSERT, data=ROWS, settings=SYNC)
    assert fleet.query("SELECT count() FROM t FINAL").strip() == "10"


def test_user_with_password(fleet: ClickHouseCluster) -> None:
    assert fleet.query("SELECT 1", user="pgslowlog", password="s3cret").strip() == "1"
    with pytest.raises(ClickHouseError) as wrong:
        fleet.query("SELECT 1", user="pgslowlog", password="nope")
    assert (wrong.value.status, wrong.value.code) == (401, 193)
    assert "Wrong password for user pgslowlog" in wrong.value.text
    with pytest.raises(ClickHouseError) as missing:
        fleet.query("SELECT 1", user="pgslowlog")
    assert (missing.value.status, missing.value.code) == (401, 194)


def test_refused_statements_carry_status_code_and_text(fleet: ClickHouseCluster) -> None:
    with pytest.raises(ClickHouseError) as unknown:
        fleet.query("INSERT INTO nosuch FORMAT JSONEachRow", data=ROWS)
    assert (unknown.value.status, unknown.value.code) == (404, 60)
    assert "Table default.nosuch doesn't exist." in unknown.value.text
    with pytest.raises(ClickHouseError) as mismatch:
        fleet.query(INSERT, data='{"id": "a", "v": "x"}\n', settings=SYNC)
    assert (mismatch.value.status, mismatch.value.code) == (500, 27)
    assert "(while read the value of key v)" in mismatch.value.text


def test_stop_leaves_nothing_and_is_safe_twice() -> None:
    cluster = ClickHouseCluster(shards=2)
    cluster.start()
    base, pids = cluster.base, cluster.pids()
    assert base is not None and len(pids) == 2
    assert sorted(clickhouse_processes(base)) == sorted(pids)
    cluster.stop()
    assert clickhouse_processes(base) == [] and not base.exists()
    cluster.stop()


def test_failed_start_stops_what_it_started(tmp_path: Path) -> None:
    cluster = ClickHouseCluster(shards=2, workdir=tmp_path, start_timeout_s=10)
    taken = socket.socket()  # shard 1's HTTP port, taken: that server cannot listen
    try:
        taken.bind(("127.0.0.1", cluster.shards[1].http_port))
        taken.listen()
        with pytest.raises(RuntimeError, match="shard 1") as failed:
            cluster.start()
    finally:
        taken.close()
    assert "server.log" in str(failed.value)  # the log's tail is in the message
    assert cluster.base is None and cluster.pids() == []
    assert clickhouse_processes(tmp_path) == [] and list(tmp_path.iterdir()) == []
    cluster.stop()

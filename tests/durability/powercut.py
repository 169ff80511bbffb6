"""Power cuts under a real broker: powerfs mounts, durable producers, and the check afterwards.

`power_cut_cycle` runs one cycle: mount powerfs over the disk image, start a broker whose data
directory is the mount, produce to a topic from one thread per partition (every request's
records are remembered in order; two requests in three ask for durable acks, the third for
leader acks) while another thread commits a consumer group's offsets and a third creates topics
and deletes every other one, cut the power at a
random moment (SIGKILL the broker, SIGKILL powerfs, unmount: everything not fsynced is gone,
the kernel's page cache included), mount the image again, start a broker on it and read
everything back. `check` then compares: every record of a durably acknowledged produce must be
there, everything served must be exactly what was sent at that offset (whole batches, CRC-valid,
nothing torn or foreign), the group's committed offset must be at least the last commit the
broker acknowledged, every topic whose creation was acknowledged must exist and no topic whose
deletion was acknowledged may come back.

Each partition has one producer that waits for each answer before the next request, so the
partition's log is exactly that producer's requests in order, and the log after the cut must
be a prefix of them at least as long as the durably acknowledged part.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from brokerproc import BrokerProcess, RawClient
from rustmq.protocol import batch, records
from rustmq.protocol.api import ApiKey, ErrorCode

POWERFS = Path(__file__).with_name("powerfs.py")
TOPIC = "power"
GROUP = "power-group"
PARTITIONS = 3
RECORDS_PER_REQUEST = 6


class PowerFS:
    """One powerfs process serving `image` at `mount_point`."""

    def __init__(self, image: Path, mount_point: Path, log: Path) -> None:
        self.image = image
        self.mount_point = mount_point
        self.log_path = log
        self.proc: subprocess.Popen[bytes] | None = None

    def mount(self, timeout: float = 90.0) -> None:
        self.mount_point.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen([sys.executable, str(POWERFS), str(self.image),
                                          str(self.mount_point)], stdout=log, stderr=log)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while not os.path.ismount(self.mount_point):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.cut()
                raise RuntimeError(f"powerfs did not mount:\n{self.log_path.read_text()}")
            time.sleep(0.05)

    def cut(self) -> None:
        """The power cut: the process and its memory go; the mount is detached."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None
        if os.path.ismount(self.mount_point) or _is_dead_mount(self.mount_point):
            unmount = ["fusermount3", "-u", "-z", str(self.mount_point)]
            if shutil.which("fusermount3") is None or subprocess.run(unmount).returncode:
                subprocess.run(["umount", "-l", str(self.mount_point)], check=True)


def _is_dead_mount(path: Path) -> bool:
    try:
        os.stat(path)
    except OSError:
        return True  # ENOTCONN: a FUSE mount whose process is gone
    return False


@dataclass
class Sent:
    """What one partition's producer sent and what the broker acknowledged."""

    values: list[bytes] = field(default_factory=list)  # every record sent, in order
    base: int | None = None  # the partition's end offset when this producer started
    durable: int = 0  # records up to the end of the last durably acknowledged request
    acknowledged: int = 0  # records up to the end of the last acknowledged request
    errors: list[str] = field(default_factory=list)


@dataclass
class Admin:
    """Topics created and deleted while producing: only acknowledged changes are remembered."""

    created: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@dataclass
class Cycle:
    sent: list[Sent]
    admin: Admin
    topics_after: list[str]
    committed_acked: int  # the last group offset whose commit the broker acknowledged
    recovered: list[list[bytes]]  # per partition, the values served after the cut
    committed_after: int | None
    corrupt: list[str]  # batches that failed validation when read back
    uptime_s: float


def build_request(cycle: int, partition: int, first: int) -> tuple[bytes, list[bytes]]:
    values = [b"c%d-p%d-r%06d-" % (cycle, partition, first + i) + bytes(180)
              for i in range(RECORDS_PER_REQUEST)]
    body = records.encode_body([[i, None, value, None] for i, value in enumerate(values)])
    now = int(time.time() * 1000)
    return batch.build_batch(body, record_count=len(values), first_timestamp_ms=now,
                             max_timestamp_ms=now + len(values)), values


def _produce(port: int, cycle: int, partition: int, sent: Sent, stop: threading.Event) -> None:
    try:
        client = RawClient(port, timeout=30.0)
    except OSError as error:
        sent.errors.append(f"connect: {error}")
        return
    request = 0
    try:
        while not stop.is_set():
            payload, values = build_request(cycle, partition, len(sent.values))
            acks = 1 if request % 3 == 2 else 2
            request += 1
            sent.values.extend(values)  # before sending: the broker may write them any time now
            response, _ = client.call({"api": ApiKey.PRODUCE, "topic": TOPIC,
                                       "partition": partition, "acks": acks}, payload)
            if response["error"] != 0:
                sent.errors.append(f"produce: {response}")
                return
            end = int(response["last_offset"]) + 1
            if sent.base is None:
                sent.base = end - len(sent.values)
            if end - sent.base != len(sent.values):
                sent.errors.append(f"offsets: the broker's end offset {end} does not follow "
                                   f"{len(sent.values)} records from {sent.base}")
                return
            if acks == 2:
                sent.durable = len(sent.values)
            sent.acknowledged = len(sent.values)
    except (OSError, EOFError):
        pass  # the power went
    finally:
        client.close()


def _commit(port: int, acked: list[int], stop: threading.Event) -> None:
    try:
        client = RawClient(port, timeout=30.0)
    except OSError:
        return
    offset = 0
    try:
        while not stop.is_set():
            offset += 1
            response, _ = client.call({"api": ApiKey.COMMIT_OFFSETS, "group": GROUP,
                                       "member_id": None, "generation": -1,
                                       "offsets": [[TOPIC, 0, offset]]})
            if response["error"] != 0:
                return
            acked[0] = offset
            time.sleep(0.01)
    except (OSError, EOFError):
        pass
    finally:
        client.close()


def _administer(port: int, cycle: int, admin: Admin, stop: threading.Event) -> None:
    """Create topic after topic; delete every other one right after it was created."""
    try:
        client = RawClient(port, timeout=30.0)
    except OSError:
        return
    number = 0
    try:
        while not stop.is_set():
            name = f"admin-{cycle}-{number}"
            response, _ = client.call({"api": ApiKey.CREATE_TOPIC, "topic": name, "partitions": 2})
            if response["error"] != 0:
                admin.errors.append(f"create {name}: {response}")
                return
            admin.created.append(name)
            if number % 2:
                response, _ = client.call({"api": ApiKey.DELETE_TOPIC, "topic": name})
                if response["error"] != 0:
                    admin.errors.append(f"delete {name}: {response}")
                    return
                admin.deleted.append(name)
            number += 1
            time.sleep(0.05)
    except (OSError, EOFError):
        pass
    finally:
        client.close()


def read_back(port: int) -> tuple[list[list[bytes]], list[str], int | None]:
    """Every record value per partition (from offset 0), corrupt batches, committed offset."""
    client = RawClient(port, timeout=30.0)
    recovered: list[list[bytes]] = []
    corrupt: list[str] = []
    try:
        for partition in range(PARTITIONS):
            values: list[bytes] = []
            offset = 0
            while True:
                response, data = client.call({"api": ApiKey.FETCH, "max_wait_ms": 0, "partitions": [
                    {"topic": TOPIC, "partition": partition, "offset": offset}]})
                part = response["partitions"][0]
                assert part["error"] == 0, part
                if offset >= part["high_watermark"] or not data:
                    break
                view = memoryview(data)
                position = 0
                while position < len(view):
                    try:
                        header = batch.check_batch(view, position, len(view))
                        decoded = records.decode_body(
                            view[position + batch.HEADER_SIZE : position + header.size],
                            header.attributes & records.CODEC_MASK)
                    except Exception as error:  # noqa: BLE001 - reported, the check fails on it
                        corrupt.append(f"partition {partition} at {offset}: {error}")
                        return recovered + [values], corrupt, None
                    if header.base_offset != offset:
                        corrupt.append(f"partition {partition}: batch at {header.base_offset}, "
                                       f"expected {offset}")
                    values.extend(record[2] for record in decoded)
                    offset = header.base_offset + header.record_count
                    position += header.size
            recovered.append(values)
        response, _ = client.call({"api": ApiKey.FETCH_OFFSETS, "group": GROUP,
                                   "partitions": [[TOPIC, 0]]})
        offsets = response.get("offsets") or []
        committed = int(offsets[0][2]) if offsets else None
    finally:
        client.close()
    return recovered, corrupt, committed


def start_broker(data_dir: Path, env: dict[str, str] | None) -> BrokerProcess:
    return BrokerProcess(data_dir, "--partitions", "2", env=env).start(timeout=90)


def power_cut_cycle(root: Path, env: dict[str, str] | None, run_s: float, number: int) -> Cycle:
    """One cycle on the disk image in root/image (kept between cycles)."""
    image, mount_point = root / "image", root / "data"
    fs = PowerFS(image, mount_point, root / "powerfs.log")
    fs.mount()
    broker: BrokerProcess | None = None
    try:
        broker = start_broker(mount_point, env)
        admin = RawClient(broker.producer_port, timeout=60.0)
        response, _ = admin.call({"api": ApiKey.CREATE_TOPIC, "topic": TOPIC,
                                  "partitions": PARTITIONS})
        admin.close()
        assert response["error"] in (0, ErrorCode.TOPIC_EXISTS), response  # a later cycle
        stop = threading.Event()
        sent = [Sent() for _ in range(PARTITIONS)]
        committed = [0]
        threads = [threading.Thread(target=_produce,
                                    args=(broker.producer_port, number, p, sent[p], stop))
                   for p in range(PARTITIONS)]
        threads.append(threading.Thread(target=_commit, args=(broker.producer_port, committed,
                                                              stop)))
        admin = Admin()
        threads.append(threading.Thread(target=_administer,
                                        args=(broker.producer_port, number, admin, stop)))
        started = time.monotonic()
        for thread in threads:
            thread.start()
        time.sleep(run_s * random.Random(number).uniform(0.6, 1.0))
        broker.kill()  # the power cut: the broker and the "page cache" go at once
        fs.cut()
        broker.stop()  # only closes its log file now
        uptime = time.monotonic() - started
        stop.set()
        for thread in threads:
            thread.join(60)
        fs.mount()
        broker = start_broker(mount_point, env)
        recovered, corrupt, committed_after = read_back(broker.producer_port)
        client = RawClient(broker.producer_port, timeout=60.0)
        listed, _ = client.call({"api": ApiKey.LIST_TOPICS})
        client.close()
        broker.stop()
        broker = None
        return Cycle(sent, admin, list(listed["topics"]), committed[0], recovered,
                     committed_after, corrupt, uptime)
    finally:
        if broker is not None:
            broker.kill()
            broker.stop()
        fs.cut()


@dataclass
class Report:
    lost: list[str]  # durably acknowledged records missing after the cut
    wrong: list[str]  # records served that differ from what was sent there
    notes: list[str]


def check(cycle: Cycle, previous: list[list[bytes]] | None = None) -> Report:
    """Compare what was sent and acknowledged with what the broker served after the cut.

    `previous`: the values each partition held before this cycle's producing began (what an
    earlier cycle recovered); this cycle's producers appended after them.
    """
    lost: list[str] = []
    wrong: list[str] = list(cycle.corrupt)
    notes: list[str] = []
    for partition, (sent, got) in enumerate(zip(cycle.sent, cycle.recovered, strict=True)):
        before = previous[partition] if previous else []
        if sent.base is not None and sent.base != len(before):
            wrong.append(f"partition {partition}: producing started at offset {sent.base}, "
                         f"but {len(before)} records were recovered before")
        expected = before + sent.values
        durable = len(before) + sent.durable
        wrong.extend(f"partition {partition}: {error}" for error in sent.errors)
        if len(got) < durable:
            lost.append(f"partition {partition}: {durable - len(got)} durably acknowledged "
                        f"record(s) missing (log ends at {len(got)}, acknowledged to {durable})")
        for offset, value in enumerate(got):
            if offset >= len(expected) or value != expected[offset]:
                wrong.append(f"partition {partition} offset {offset}: {value[:24]!r} was never "
                             f"sent there")
                break
        notes.append(f"partition {partition}: sent {len(sent.values)}, acknowledged "
                     f"{sent.acknowledged}, durably {sent.durable}, recovered "
                     f"{len(got) - len(before)}")
    wrong.extend(cycle.admin.errors)
    missing = set(cycle.admin.created) - set(cycle.admin.deleted) - set(cycle.topics_after)
    if missing:
        lost.append(f"topics whose creation was acknowledged are gone: {sorted(missing)}")
    back = set(cycle.admin.deleted) & set(cycle.topics_after)
    if back:
        wrong.append(f"topics whose deletion was acknowledged are back: {sorted(back)}")
    notes.append(f"topics created {len(cycle.admin.created)}, deleted {len(cycle.admin.deleted)}")
    if cycle.committed_acked and (cycle.committed_after or 0) < cycle.committed_acked:
        lost.append(f"group commit: offset {cycle.committed_acked} was acknowledged, "
                    f"{cycle.committed_after} survived")
    notes.append(f"commits acknowledged up to {cycle.committed_acked}, "
                 f"after the cut {cycle.committed_after}; cut after {cycle.uptime_s:.1f} s")
    return Report(lost, wrong, notes)


def run(root: Path, cycles: int, env: dict[str, str] | None = None, run_s: float = 3.0
        ) -> list[Report]:
    reports = []
    previous: list[list[bytes]] | None = None
    for number in range(cycles):
        cycle = power_cut_cycle(root, env, run_s, number)
        reports.append(check(cycle, previous))
        previous = cycle.recovered
    return reports


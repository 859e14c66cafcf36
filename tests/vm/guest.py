"""Boot the lane's q35 guest under TCG, run a scenario, and observe the kexec into a second kernel.

    run = boot_guest("petitkexec exec --kexec /usr/sbin/kexec-readback ...")
    assert run.second_up, run.tail()

The guest (tests/vm/guest/init-stage1) loads the devices' drivers, `kexec -l`s the second
kernel, prints STAGE1-READY, runs the scenario with busybox sh, prints `SCENARIO-EXIT <n>` and
powers off. If the scenario kexecs, the second kernel (tests/vm/guest/init-second) prints
`PETITKEXEC-SECOND-UP <marker>`, its devices and drivers, runs the second scenario and powers off.

QEMU is always killed when `timeout` runs out, and when power-off does not follow the final
line within `poweroff_grace` seconds (a hung device shutdown): a test run never hangs.

boot() does this on any lane's `Machine` (`Q35` here, powernv.POWERNV9); boot_guest() is boot()
on q35 with its virtio-9p share and second serial port.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

from .images.build import Images, current_images
from .images.cpio import write_cpio
from .images.lanes import X86, Lane

QEMU = "qemu-system-x86_64"
VIRTFS_TAG = "host0"
MEMORY = "1G"
KEEP_LOGS = 100  # serial logs kept in .cache/vm/runs/

# The PCI topology (X86-LANE.md), with fixed slots so BDFs are the same on every boot. Bus
# numbers follow the guest's depth-first enumeration of the root ports at 00:02.0..00:07.0.
TOPOLOGY: tuple[str, ...] = (
    *(
        f"-device pcie-root-port,id=rp{n},chassis={n},slot={n},bus=pcie.0,addr={n + 1:#x}"
        for n in range(1, 7)
    ),
    # 01:00.0 nvme (SR-IOV capable: VFs at 01:00.1, 01:00.2 after setup-sriov)
    "-device nvme-subsys,id=ss0,nqn=petitkexec-lane",
    "-device nvme,serial=pkx0001,id=nvme0,bus=rp1,subsys=ss0,sriov_max_vfs=2,"
    "sriov_vq_flexible=4,sriov_vi_flexible=2,max_ioqpairs=8",
    "-device nvme-ns,drive=nvmedisk,bus=nvme0,nsid=1",
    # NICs get romfile= (no iPXE option ROM): SeaBIOS boots faster and nothing uses PXE.
    # 02:00.0 e1000e
    "-netdev user,id=n0,restrict=on",
    "-device e1000e,romfile=,netdev=n0,bus=rp2,mac=52:54:00:00:00:10",
    # 03:00.0 xHCI
    "-device qemu-xhci,id=xhci0,bus=rp3",
    # 04:00.0 virtio-net
    "-netdev user,id=n1,restrict=on",
    "-device virtio-net-pci,romfile=,netdev=n1,bus=rp4,mac=52:54:00:00:00:11",
    # 05:00.0 PCIe-to-PCI bridge, 06:01.0 e1000 behind it
    "-device pcie-pci-bridge,id=pb1,bus=rp5",
    "-netdev user,id=n2,restrict=on",
    "-device e1000,romfile=,netdev=n2,bus=pb1,addr=1,mac=52:54:00:00:00:12",
    # 07:00.0 + 07:00.1: one multi-function device with two different drivers
    "-netdev user,id=n3,restrict=on",
    "-device e1000e,romfile=,netdev=n3,bus=rp6,addr=0.0,multifunction=on,mac=52:54:00:00:00:13",
    "-device virtio-rng-pci,bus=rp6,addr=0.1",
    # 00:08.0 virtio-rng on the root bus (a root-complex integrated endpoint)
    "-device virtio-rng-pci,bus=pcie.0,addr=0x8",
    # 08:00.0 an AHCI controller behind its own root port (q35's own is 00:1f.2)
    "-device pcie-root-port,id=rp7,chassis=7,slot=7,bus=pcie.0,addr=0xa",
    "-device ahci,id=ahci1,bus=rp7",
)
VIRTFS_BDF = "0000:00:09.0"

# What the topology looks like in the guest once every driver has probed. q35 adds 00:00.0
# (host bridge), 00:01.0 (VGA, no driver), 00:1f.0 (LPC), 00:1f.2 (ahci), 00:1f.3 (SMBus).
EXPECTED_DRIVERS: dict[str, str | None] = {
    "0000:00:00.0": None,
    "0000:00:01.0": None,
    "0000:00:02.0": "pcieport",
    "0000:00:03.0": "pcieport",
    "0000:00:04.0": "pcieport",
    "0000:00:05.0": "pcieport",
    "0000:00:06.0": "pcieport",
    "0000:00:07.0": "pcieport",
    "0000:00:08.0": "virtio-pci",
    "0000:00:1f.0": None,
    "0000:00:1f.2": "ahci",
    "0000:00:1f.3": None,
    "0000:01:00.0": "nvme",
    "0000:02:00.0": "e1000e",
    "0000:03:00.0": "xhci_hcd",
    "0000:04:00.0": "virtio-pci",
    "0000:05:00.0": None,
    "0000:06:01.0": "e1000",
    "0000:07:00.0": "e1000e",
    "0000:07:00.1": "virtio-pci",
    "0000:00:0a.0": "pcieport",
    "0000:08:00.0": "ahci",
}


@dataclasses.dataclass(frozen=True)
class Machine:
    """A lane's QEMU machine: what boot() does not do the same way on every lane."""

    lane: Lane  # the images it boots; the serial logs go to its cache's runs/
    qemu: str
    machine: str
    memory: str
    console: str  # both kernels' console=
    topology: tuple[str, ...]
    serial: tuple[str, ...] = ()  # an explicit console port (q35: so a capture port is ttyS1)
    # init-stage1 gives the second kernel console=ttyS0: another console must be added.
    second_console: bool = False
    timeout: float = 240
    keep_logs: int = 100  # serial logs kept in runs/

    def command(self, kernel: Path, initrd: Path, disk: Path, append: str) -> list[str]:
        qemu = shutil.which(self.qemu)
        if qemu is None:
            raise RuntimeError(f"{self.qemu} not found: see .ci/apt-packages")
        args = [
            qemu,
            "-machine",
            self.machine,
            "-accel",
            "tcg",
            "-m",
            self.memory,
            "-smp",
            "1",
            "-nographic",
            "-no-reboot",
            *self.serial,
            "-kernel",
            str(kernel),
            "-initrd",
            str(initrd),
            "-append",
            append,
            "-drive",
            f"if=none,id=nvmedisk,file={disk},format=raw",
        ]
        for option in self.topology:
            args += option.split(" ", 1)
        return args


Q35 = Machine(
    lane=X86,
    qemu=QEMU,
    machine="q35",
    memory=MEMORY,
    console="ttyS0",
    topology=TOPOLOGY,
    serial=("-serial", "mon:stdio"),
    keep_logs=KEEP_LOGS,
)

_PRINTK_TIME = re.compile(r"^\[\s*(\d+\.\d+)\]\s")
_UPTIME = re.compile(r"\buptime=(\d+\.\d+)")
# A driver's name may hold spaces (i6300esb registers "i6300ESB timer").
_READBACK = re.compile(
    r"^READBACK (?P<bdf>\S+) driver=(?P<driver>.+?) command=(?P<command>[0-9a-fA-F]{4}|----)"
    r" tag=(?P<tag>\S+)"
)
_KV_LINE = re.compile(r"^(?P<key>SECOND-DEVICE) (?P<bdf>\S+) driver=(?P<driver>.+?)\s*$")


@dataclasses.dataclass(frozen=True)
class ReadbackLine:
    """One `READBACK <bdf> driver=<d> command=<hhhh> tag=<t>` line from the guest."""

    bdf: str
    driver: str | None
    command: int | None  # None when config could not be read
    tag: str

    @property
    def bus_master(self) -> bool | None:
        return None if self.command is None else bool(self.command & 0x0004)


@dataclasses.dataclass(frozen=True)
class ConsoleReport:
    """What the guest said on its serial console (parse_console): the lines tests/vm/README.md
    lists. Times: `guest_times` are guest clocks, `host_times` are seconds after QEMU started
    at which a line arrived."""

    exit_code: int | None  # SCENARIO-EXIT; None if the scenario never returned (kexec'd)
    stage1_ready: bool
    second_up: bool  # PETITKEXEC-SECOND-UP with this run's marker
    second_done: bool
    second_scenario_exit: int | None
    second_devices: dict[str, str | None]
    second_nvme: list[str]
    second_net: list[str]
    second_usb: list[str]
    readback_snapshots: list[tuple[str, list[ReadbackLine]]]
    guest_times: dict[str, float]
    host_times: dict[str, float]

    @property
    def readbacks(self) -> dict[str, dict[str, ReadbackLine]]:
        """The last read-back taken with each tag, by BDF."""
        return {tag: {line.bdf: line for line in lines} for tag, lines in self.readback_snapshots}

    @property
    def kexec_to_second_guest_seconds(self) -> float | None:
        """Guest clocks: KEXEC-START -> "Starting new kernel" (stage 1's printk clock) plus the
        second kernel's uptime at its marker. Purgatory and decompression, before the second
        kernel's clock starts, are not in it: compare kexec_to_second_host_seconds."""
        t = self.guest_times
        if not {"kexec_start", "starting_new_kernel", "second_up"} <= t.keys():
            return None
        return t["starting_new_kernel"] - t["kexec_start"] + t["second_up"]

    @property
    def kexec_to_second_host_seconds(self) -> float | None:
        t = self.host_times
        if "KEXEC-START" not in t or "PETITKEXEC-SECOND-UP" not in t:
            return None
        return t["PETITKEXEC-SECOND-UP"] - t["KEXEC-START"]


_Run = TypeVar("_Run", bound="GuestRun")


@dataclasses.dataclass(frozen=True)
class GuestRun(ConsoleReport):
    """What one boot showed: what the console said (the ConsoleReport it extends) and how the
    run went."""

    log: str
    log_path: Path
    marker: str
    timed_out: bool
    poweroff_hung: bool
    qemu_returncode: int | None
    wall_seconds: float
    capture_path: Path | None = None
    qemu_args: list[str] = dataclasses.field(default_factory=list)

    @classmethod
    def from_qemu(
        cls: type[_Run],
        qemu: QemuRun,
        *,
        marker: str,
        log_path: Path,
        args: Sequence[str],
        **more: Any,
    ) -> _Run:
        """What a QEMU run of any guest showed: its console read (lines a firmware cut in
        two made whole) and parsed, and how the run went; `more`: a subclass's own fields."""
        lines = rejoin_firmware_interruptions(qemu.lines)
        return cls(
            **vars(parse_console(lines, marker)),
            log="\n".join(line for _, line in lines),
            log_path=log_path,
            marker=marker,
            timed_out=qemu.timed_out,
            poweroff_hung=qemu.poweroff_hung,
            qemu_returncode=qemu.returncode,
            wall_seconds=qemu.wall_seconds,
            qemu_args=list(args),
            **more,
        )

    def readback(self, tag: str) -> dict[str, ReadbackLine]:
        try:
            return self.readbacks[tag]
        except KeyError:
            raise AssertionError(f"no read-back tagged {tag!r}\n{self.tail()}") from None

    def lines_starting(self, prefix: str) -> list[str]:
        return [line for line in self.log.splitlines() if line.startswith(prefix)]

    def tail(self, lines: int = 60) -> str:
        state = (
            f"[timed_out={self.timed_out} poweroff_hung={self.poweroff_hung} "
            f"exit={self.exit_code} second_up={self.second_up} log={self.log_path}]"
        )
        return "\n".join([*self.log.splitlines()[-lines:], state])


class _SerialReader(threading.Thread):
    """Reads QEMU's stdout (the guest's ttyS0) line by line, stamping each line on arrival."""

    def __init__(self, stream: IO[bytes], log_file: IO[bytes], started: float, echo: bool) -> None:
        super().__init__(daemon=True)
        self.stream, self.log_file, self.started, self.echo = stream, log_file, started, echo
        self.lines: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        self.final_line_at: float | None = None

    def run(self) -> None:
        pending = b""
        while True:
            chunk = os.read(self.stream.fileno(), 65536)
            if not chunk:
                break
            self.log_file.write(chunk)
            self.log_file.flush()
            if self.echo:
                sys.stderr.buffer.write(chunk)
                sys.stderr.flush()
            pending += chunk
            *complete, pending = pending.split(b"\n")
            now = time.monotonic() - self.started
            with self.lock:
                for raw in complete:
                    line = raw.decode("utf-8", "replace").replace("\r", "")
                    self.lines.append((now, line))
                    if line.startswith(("SCENARIO-EXIT ", "SECOND-DONE")):
                        self.final_line_at = time.monotonic()
        if pending:
            self.lines.append(
                (
                    time.monotonic() - self.started,
                    pending.decode("utf-8", "replace").replace("\r", ""),
                )
            )


def _run_layer(
    path: Path,
    *,
    scenario: str,
    second_scenario: str | None,
    marker: str,
    load_second: bool,
    second_append: str,
    virtfs: bool,
    extra_files: dict[str, bytes],
) -> Path:
    """The run's own initramfs layer: /scenario.sh, /etc/stage1.conf and the second scenario
    (as a cpio that stage 1 appends to the second kernel's initramfs)."""
    second_files = {"second-scenario.sh": second_scenario.encode()} if second_scenario else {}
    with tempfile.TemporaryDirectory() as tmp:
        extra = write_cpio(None, Path(tmp) / "second-extra.cpio.gz", files=second_files, level=1)
        conf = (
            f"MARKER={marker}\nLOAD_SECOND={int(load_second)}\n"
            f"SECOND_APPEND='{second_append}'\n"
            f"PK_VIRTFS_TAG={VIRTFS_TAG if virtfs else ''}\nexport PK_VIRTFS_TAG\n"
        )
        return write_cpio(
            None,
            path,
            level=1,
            files={
                "scenario.sh": scenario.encode(),
                "etc/stage1.conf": conf.encode(),
                "boot/second-extra.cpio.gz": extra.read_bytes(),
                **extra_files,
            },
        )


# Lines whose arrival (and uptime=, when they carry one) is recorded in host_times/guest_times.
_TIMED_WORDS = (
    "STAGE1-BOOT",
    "STAGE1-SETTLED",
    "STAGE1-READY",
    "KEXEC-START",
    "PETITKEXEC-SECOND-UP",
    "SECOND-SETTLED",
    "SECOND-DONE",
    "SCENARIO-EXIT",
)


# skiboot (OPAL) writes some messages straight to the console while Linux runs ("SBE: Timer
# stuck, falling back to OPAL pollers" on a loaded host), in the middle of whatever line the
# guest is printing: "READBACK 0003:01[   81.460996725,3] SBE: ...", then the rest of the
# guest's line (":00.0 driver=xhci_hcd ...") after the firmware's lines.
_FIRMWARE_MESSAGE = re.compile(r"\[\s*\d+\.\d{9},\d\] ")
# A guest line that quotes the firmware's log on purpose: a label, then the message.
_QUOTING_LABEL = re.compile(r"[A-Z0-9-]+ ")


def rejoin_firmware_interruptions(lines: list[tuple[float, str]]) -> list[tuple[float, str]]:
    """The console lines with each guest line the firmware cut in two made whole again (at
    the time its end arrived), and the firmware's messages as lines of their own."""
    joined: list[tuple[float, str]] = []
    cut: str | None = None  # the start of a guest line the firmware interrupted
    for at, line in lines:
        message = _FIRMWARE_MESSAGE.search(line)
        if cut is None and message and message.start() > 0:
            start = line[: message.start()]
            if not _QUOTING_LABEL.fullmatch(start):
                cut = start
                joined.append((at, line[message.start() :]))
                continue
        if cut is not None and not _FIRMWARE_MESSAGE.match(line):
            line, cut = cut + line, None
        joined.append((at, line))
    return joined if cut is None else [*joined, (joined[-1][0], cut)]


def parse_console(run_lines: list[tuple[float, str]], marker: str) -> ConsoleReport:
    """What the console lines (arrival time, text) of the run with this marker say."""
    guest_times: dict[str, float] = {}
    host_times: dict[str, float] = {}
    snapshots: list[tuple[str, list[ReadbackLine]]] = []
    current: list[ReadbackLine] | None = None
    second_up = False
    exit_code: int | None = None
    second_scenario_exit: int | None = None
    second_devices: dict[str, str | None] = {}
    second_lists: dict[str, list[str]] = {"SECOND-NVME": [], "SECOND-NET": [], "SECOND-USB": []}
    for at, line in run_lines:
        word = line.split(" ", 1)[0]
        uptime = _UPTIME.search(line)
        if word in _TIMED_WORDS:
            host_times[word] = at
            if uptime:
                guest_times[word.lower().replace("-", "_").replace("petitkexec_", "")] = float(
                    uptime.group(1)
                )
        if word == "SCENARIO-EXIT":
            exit_code = int(line.split()[1])
        elif word == "PETITKEXEC-SECOND-UP":
            second_up = second_up or line.split()[1:2] == [marker]
        elif word == "SECOND-SCENARIO-EXIT":
            second_scenario_exit = int(line.split()[1])
        elif word == "SECOND-DEVICE":
            m = _KV_LINE.match(line)
            if m:
                second_devices[m["bdf"]] = None if m["driver"] == "-" else m["driver"]
        elif word in second_lists:
            second_lists[word].append(line.split()[1])
        elif word == "READBACK-BEGIN":
            current = []
        elif word == "READBACK":
            m = _READBACK.match(line)
            if m and current is not None:
                cmd = None if m["command"] == "----" else int(m["command"], 16)
                driver = None if m["driver"] == "-" else m["driver"]
                current.append(ReadbackLine(m["bdf"], driver, cmd, m["tag"]))
        elif word == "READBACK-END":
            if current is not None:
                snapshots.append((line.split("tag=", 1)[1].split()[0], current))
            current = None
        elif "kexec_core: Starting new kernel" in line:
            host_times["starting_new_kernel"] = at
            m = _PRINTK_TIME.match(line)
            if m:
                guest_times["starting_new_kernel"] = float(m.group(1))
    return ConsoleReport(
        exit_code=exit_code,
        stage1_ready="STAGE1-READY" in host_times,
        second_up=second_up,
        second_done="SECOND-DONE" in host_times,
        second_scenario_exit=second_scenario_exit,
        second_devices=second_devices,
        second_nvme=second_lists["SECOND-NVME"],
        second_net=second_lists["SECOND-NET"],
        second_usb=second_lists["SECOND-USB"],
        readback_snapshots=snapshots,
        guest_times=guest_times,
        host_times=host_times,
    )


@dataclasses.dataclass(frozen=True)
class QemuRun:
    """What one QEMU process did: its console lines (host arrival time, text) and how it ended."""

    lines: list[tuple[float, str]]
    timed_out: bool
    poweroff_hung: bool
    returncode: int
    wall_seconds: float


def run_qemu(
    command: Sequence[str],
    log_path: Path,
    *,
    timeout: float,
    poweroff_grace: float,
    echo: bool,
    poll_s: float = 0.1,
) -> QemuRun:
    """Run QEMU with its console on stdout (copied to log_path), killed when `timeout` runs
    out or when power-off does not follow the final line within `poweroff_grace` seconds."""
    started = time.monotonic()
    timed_out = poweroff_hung = False
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert proc.stdout is not None
        reader = _SerialReader(proc.stdout, log_file, started, echo)
        reader.start()
        try:
            while proc.poll() is None:
                now = time.monotonic()
                if now - started > timeout:
                    timed_out = True
                    break
                final = reader.final_line_at
                if final is not None and now - final > poweroff_grace:
                    poweroff_hung = True
                    break
                time.sleep(poll_s)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            reader.join(timeout=10)
    wall = time.monotonic() - started
    with reader.lock:
        lines = list(reader.lines)
    return QemuRun(lines, timed_out, poweroff_hung, proc.returncode, wall)


def boot(
    machine: Machine,
    scenario: str,
    *,
    second_scenario: str | None = None,
    load_second: bool = True,
    extra_qemu_args: Sequence[str] = (),
    nvme_image: Path | None = None,
    kernel_append: str = "",
    second_append: str = "",
    timeout: float | None = None,
    poweroff_grace: float = 30,
    images: Images | None = None,
    echo: bool | None = None,
    virtfs: bool = False,
    capture_path: Path | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> GuestRun:
    """Boot stage 1 on `machine` with `scenario` (busybox sh script) and return what happened.

    - second_scenario: sh script the second kernel runs after its report;
    - load_second=False: stage 1 does not `kexec -l` (the scenario may load by itself);
    - nvme_image: raw disk for the nvme namespace (default: a blank 64 MiB file);
    - timeout: default machine.timeout; images: default the machine's lane's current images;
    - echo: copy the console to stderr as it arrives (default: $PETITKEXEC_VM_ECHO);
    - virtfs, capture_path: extra_qemu_args has a virtio-9p share (stage 1 exports its tag as
      $PK_VIRTFS_TAG) or a serial port written to capture_path (kept in the GuestRun);
    - extra_files: more files for this run's layer (path in the guest → bytes, mode 0644).
    """
    images = images or current_images(machine.lane)
    echo = bool(os.environ.get("PETITKEXEC_VM_ECHO")) if echo is None else echo
    timeout = machine.timeout if timeout is None else timeout
    runs = machine.lane.cache() / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    marker = uuid.uuid4().hex[:12]
    work = Path(tempfile.mkdtemp(prefix=f"run-{marker}-", dir=runs))
    log_path = runs / f"{marker}.log"
    old_logs = sorted(runs.glob("*.log"), key=lambda p: p.stat().st_mtime)
    for old_log in old_logs[: -machine.keep_logs]:
        old_log.unlink(missing_ok=True)
    disk = nvme_image
    if disk is None:
        disk = work / "nvme.img"
        with open(disk, "wb") as f:
            f.truncate(64 << 20)
    if machine.second_console:  # the last console= is /dev/console
        second_append = f"console={machine.console} {second_append}".strip()
    layer = _run_layer(
        work / "run.cpio.gz",
        scenario=scenario,
        second_scenario=second_scenario,
        marker=marker,
        load_second=load_second,
        second_append=second_append,
        virtfs=virtfs,
        extra_files=extra_files or {},
    )
    initrd = work / "initrd.cpio.gz"
    with open(initrd, "wb") as out:
        for part in [*images.stage1_layers, layer]:
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
    append = f"console={machine.console} panic=-1 loglevel=6 {kernel_append}".strip()
    args = [*machine.command(images.kernel, initrd, disk, append), *extra_qemu_args]

    qemu = run_qemu(args, log_path, timeout=timeout, poweroff_grace=poweroff_grace, echo=echo)
    shutil.rmtree(work, ignore_errors=True)
    return GuestRun.from_qemu(
        qemu, marker=marker, log_path=log_path, args=args, capture_path=capture_path
    )


def boot_guest(
    scenario: str,
    *,
    virtfs_dir: Path | None = None,
    capture_path: Path | None = None,
    extra_qemu_args: Sequence[str] = (),
    **options: Any,
) -> GuestRun:
    """boot() on q35 (options: second_scenario, load_second, nvme_image, kernel_append,
    second_append, timeout (240 s), poweroff_grace, images, echo), and:

    - virtfs_dir: shared as virtio-9p (tag "host0", at 00:09.0); mount it in the scenario with
      `mount -t 9p -o trans=virtio,version=9p2000.L host0 /mnt`;
    - capture_path: a second serial port (guest /dev/ttyS1) written to this host file.
    """
    q35: list[str] = []
    if capture_path is not None:
        q35 += ["-serial", f"file:{capture_path}"]
    if virtfs_dir is not None:
        q35 += [
            "-fsdev",
            f"local,id=fs0,path={virtfs_dir},security_model=none",
            "-device",
            f"virtio-9p-pci,fsdev=fs0,mount_tag={VIRTFS_TAG},bus=pcie.0,"
            f"addr={VIRTFS_BDF.split(':')[2].split('.')[0]}",
        ]
    return boot(
        Q35,
        scenario,
        extra_qemu_args=[*q35, *extra_qemu_args],
        virtfs=virtfs_dir is not None,
        capture_path=capture_path,
        **options,
    )

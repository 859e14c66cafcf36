"""contrib/ansible's role against the real systemd guest, over SSH (issue 18).

One QEMU run, three kernels, two plays (tests/vm/ansible_play.py runs them from the host,
through QEMU's port forward on 127.0.0.1 to the guest's own virtio-net):

- boot 1 (QEMU's -kernel, through SeaBIOS): the first play installs the .deb (the guest had
  it removed first: `apt install ./petitkexec_*.deb` is the play's doing), loads the
  running kernel with the running command line, `systemctl kexec` (the hook tears down),
  waits for a new boot id, and `petitkexec verify` finds every function back: it passes;
- boot 2: the second play does the same with `module_blacklist=e1000e` added to the next
  kernel's command line: 02:00.0 comes back without its driver, and the play fails naming it;
- boot 3: the test reads the metrics verify wrote and powers the guest off.

Kexec, not a firmware reboot: QEMU runs with -no-reboot, so a reset through the firmware
would have ended the run after boot 1; and each kernel says how it was started (boot_params'
type_of_loader, printed as PKTEST-BOOT): QEMU's loader id 0xb0 for boot 1, kexec-tools' 0xd0
for the two after it, each after the previous kernel's "kexec_core: Starting new kernel".
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.vm import ansible_play, debian_package, systemd_guest
from tests.vm.systemd_guest import KEPT_OUT_BDF, KEPT_OUT_MODULE, SystemdRun
from tests.vm.test_systemd_guest import images  # noqa: F401 (the module's image fixture)

pytestmark = pytest.mark.vm

# Three Debian boots under TCG (~70-110 s each here), two plays, verify's wait for the absent
# driver (60 s): about twice the slowest expected, then QEMU is killed.
RUN_TIMEOUT = 1800
READY_TIMEOUT = 600  # boot 1 until sshd is up
FAILING_VERIFY_WAIT = 10  # seconds
TEXTFILE = "/var/lib/prometheus/node-exporter/petitkexec.prom"
QEMU_LOADER = "0xb0"  # QEMU's x86 -kernel loader (boot.rst: loader id B)
KEXEC_LOADER = "0xd0"  # kexec-tools (loader id D)


@dataclasses.dataclass
class Plays:
    """What the host saw while the guest ran."""

    ready_seconds: float | None = None
    passing: ansible_play.PlayResult | None = None
    failing: ansible_play.PlayResult | None = None
    metrics_after_pass: str = ""
    metrics_after_fail: str = ""
    error: str = ""


def _wait_for(log_path: Path, text: str, timeout: float) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if log_path.exists() and text in log_path.read_text(errors="replace"):
            return time.monotonic() - started
        time.sleep(1)
    return None


@dataclasses.dataclass(frozen=True)
class AnsibleRun:
    run: SystemdRun
    plays: Plays

    @property
    def boots(self) -> list[dict[str, str]]:
        """Each boot's PKTEST-BOOT line: boot_id, loader, kexec_loaded, uptime."""
        return [
            dict(word.split("=", 1) for word in value.split()[1:] if "=" in word)
            for value in self.run.values("PKTEST-BOOT")
        ]


@pytest.fixture(scope="module")
def ansible_run(
    images: systemd_guest.SystemdImages,  # noqa: F811
    record_timing: Callable[[str, str], None],
) -> AnsibleRun:
    started = time.monotonic()
    bin_dir = ansible_play.ansible_venv()
    work = Path(tempfile.mkdtemp(prefix="ansible-", dir=systemd_guest.cache()))
    key, public = ansible_play.throwaway_key(work)
    package = debian_package.build_deb()  # what the play installs with apt
    record_timing(f"ansible: venv, key, {package.name}", f"{time.monotonic() - started:.1f}s")
    controller = ansible_play.Controller(bin_dir, ansible_play.free_port(), key, work)
    plays = Plays()

    def drive(log_path: Path, marker: str) -> None:
        try:
            plays.ready_seconds = _wait_for(log_path, f"PKTEST-SSH-READY {marker}", READY_TIMEOUT)
            if plays.ready_seconds is None:
                plays.error = "the guest's sshd never came up"
                return
            plays.passing = controller.play(f"petitkexec_package={package}")
            plays.metrics_after_pass = controller.ssh(f"cat {TEXTFILE}").stdout
            plays.failing = controller.play(
                f"petitkexec_cmdline_extra=module_blacklist={KEPT_OUT_MODULE}",
                # e1000e cannot come back: verify need not look again for its default minute.
                f"petitkexec_verify_wait={FAILING_VERIFY_WAIT}",
            )
            plays.metrics_after_fail = controller.ssh(f"cat {TEXTFILE}").stdout
        except Exception as error:  # reported by the tests; QEMU still ends
            plays.error = f"{type(error).__name__}: {error}"
        finally:
            controller.ssh("systemctl --no-block --force poweroff")

    run = systemd_guest.boot_systemd(
        images,
        mode="ssh",
        timeout=RUN_TIMEOUT,
        ssh=systemd_guest.SshAccess(controller.port, public),
        while_running=drive,
    )
    record_timing(
        "ansible: QEMU run (3 boots, 2 plays)", f"{run.wall_seconds:.1f}s ({run.log_path})"
    )
    ready = [at for at, line in run.arrivals if "PKTEST-SSH-READY" in line]
    handoffs = [at for at, line in run.arrivals if "kexec_core: Starting new kernel" in line]
    record_timing(
        "ansible: host clock, QEMU start -> each boot's sshd",
        ", ".join(f"{at:.1f}s" for at in ready),
    )
    record_timing(
        "ansible: host clock, each 'Starting new kernel' -> the next boot's sshd",
        ", ".join(f"{up - at:.1f}s" for at, up in zip(handoffs, ready[1:], strict=False)),
    )
    for name, play in (("passing", plays.passing), ("failing", plays.failing)):
        if play is not None:
            record_timing(f"ansible: {name} play", f"{play.seconds:.1f}s (exit {play.returncode})")
    return AnsibleRun(run, plays)


def _context(result: AnsibleRun) -> str:
    plays = result.plays
    return "\n".join(
        [
            f"error: {plays.error}",
            "--- passing play ---",
            plays.passing.output[-6000:] if plays.passing else "(not run)",
            "--- failing play ---",
            plays.failing.output[-6000:] if plays.failing else "(not run)",
            "--- console ---",
            result.run.tail(60),
        ]
    )


def test_the_play_passes_after_a_kexec(ansible_run: AnsibleRun) -> None:
    play = ansible_run.plays.passing
    assert play is not None and play.returncode == 0, _context(ansible_run)
    assert re.search(r"pkguest\s*: ok=\d+\s+changed=\d+\s+unreachable=0\s+failed=0", play.output)
    # The shutdown hook ran the teardown in boot 1's `systemctl kexec`, and it succeeded.
    assert "teardown exit 0" in ansible_run.run.hook_text, _context(ansible_run)
    # The play installed petitkexec: the guest had it removed before the play began.
    assert ansible_run.run.values("PKTEST-UNINSTALLED") == ["petitkexec=none"]
    assert re.search(r"Install the \.deb[^\n]*\n+changed: \[pkguest\]", play.output)


def test_each_boot_after_the_first_was_a_kexec(ansible_run: AnsibleRun) -> None:
    boots = ansible_run.boots
    assert len(boots) == 3, _context(ansible_run)
    assert len({boot["boot_id"] for boot in boots}) == 3
    # Boot 1 came from QEMU's loader (after SeaBIOS); boots 2 and 3 from kexec-tools, within
    # the same QEMU process (-no-reboot: a reset would have ended it).
    assert [boot["loader"] for boot in boots] == [QEMU_LOADER, KEXEC_LOADER, KEXEC_LOADER]
    assert ansible_run.run.log.count("kexec_core: Starting new kernel") == 2
    # SeaBIOS prints its banner on the serial console at every firmware boot: once here.
    assert ansible_run.run.log.count("SeaBIOS (version ") == 1
    assert not ansible_run.run.timed_out


def test_the_play_fails_naming_the_function_without_its_driver(ansible_run: AnsibleRun) -> None:
    play = ansible_run.plays.failing
    assert play is not None and play.returncode == 2, _context(ansible_run)  # a host failed
    assert re.search(r"pkguest\s*: ok=\d+\s+changed=\d+\s+unreachable=0\s+failed=1", play.output)
    # ansible-core prints the message twice: its error line, then the task's result.
    named = re.findall(r"PCI function\(s\) not back after the kexec: ([^\"\n]*)", play.output)
    assert set(named) == {f"{KEPT_OUT_BDF} unbound (was {KEPT_OUT_MODULE})"}, _context(ansible_run)


def test_verify_wrote_its_metrics_where_node_exporter_reads(ansible_run: AnsibleRun) -> None:
    after_pass = ansible_run.plays.metrics_after_pass
    after_fail = ansible_run.plays.metrics_after_fail
    assert 'petitkexec_verify_functions_not_back{change="unbound"} 0' in after_pass, after_pass
    assert 'petitkexec_verify_functions_not_back{change="unbound"} 1' in after_fail, after_fail
    assert "# TYPE petitkexec_verify_functions_not_back gauge" in after_fail

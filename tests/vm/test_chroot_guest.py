"""petitkexec run inside a chroot on the real kernel: the q35 guest's nvme ext4 holds the
chroot in a subdirectory, so the kernel leaves the ext4 out of the chroot's mountinfo
(show_mountinfo() skips what seq_path_root() cannot reach from the root of the process
whose table it is: ours in the chroot; pid 1's table still lists it)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.vm.guest import GuestRun
from tests.vm.images.disk import make_ext4_image
from tests.vm.test_scenarios import (
    EXEC,
    NVME,
    NVME_PORT,
    assert_quiet_before_kexec,
    assert_second_kernel_reprobed,
    scenario,
)

pytestmark = pytest.mark.vm

Boot = Callable[..., GuestRun]

# The chroot is a directory of the ext4, not its mount point: a chroot whose directory is the
# mount point sees the mount as its own `/`. The guest's programs come in as bind mounts.
CHROOT = """\
mkdir -p /mnt/nvme && mount -t ext4 /dev/nvme0n1 /mnt/nvme
R=/mnt/nvme/chroot
for d in bin sbin usr lib lib64 etc dev proc sys run tmp boot; do
  [ -d /$d ] && mkdir -p $R/$d && mount --bind /$d $R/$d
done
echo "CHROOT-TABLE-HAS-EXT4 $(chroot $R grep -c ' - ext4 ' /proc/self/mountinfo)"
echo "PID1-TABLE-HAS-EXT4 $(grep -c ' - ext4 ' /proc/1/mountinfo)"
"""


def test_the_disk_holding_a_chroot_is_protected_though_its_mountinfo_omits_it(
    boot: Boot, tmp_path: Path
) -> None:
    disk = make_ext4_image(tmp_path / "nvme.img", {"hello.txt": "from the host\n"})
    run = boot(
        scenario(f"{CHROOT}chroot $R {EXEC}\necho PK-EXIT $?\n"),
        nvme_image=disk,
    )
    assert "CHROOT-TABLE-HAS-EXT4 0" in run.log, run.tail(120)  # the kernel hides it ...
    assert "PID1-TABLE-HAS-EXT4 1" in run.log, run.tail(120)  # ... from the chroot only
    assert re.search(rf"{NVME} protect +held: backs / of this chroot", run.log), run.tail(120)
    assert re.search(rf"{NVME_PORT} protect +held: above protected {NVME}", run.log)
    assert run.readback("pre-kexec")[NVME].driver == "nvme"
    assert_quiet_before_kexec(run, protected={NVME, NVME_PORT})
    assert_second_kernel_reprobed(run)

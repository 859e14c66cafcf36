"""Record sysfs trees for the umockdev tests (tests/fixtures/umockdev/).

    python -m tests.vm.record_guest            # the lane's q35 guest -> q35-guest.umockdev
    python -m tests.vm.record_guest --sriov    # same, with 2 nvme VFs -> q35-guest-sriov.umockdev
    python -m tests.vm.record_guest --host     # this machine (read-only) -> host.umockdev

The guest runs `umockdev-record --all` right after stage 1 has probed every device and sends
the gzip'd result through a second serial port (guest /dev/ttyS1, a host file), checked by size
and md5. umockdev-record needs `udevadm`: the guest has Debian's; for the host, when udevadm is
not installed, the one unpacked in the lane's package cache is put on PATH (installing the udev
package here would start udevd, which triggers uevents on this host's devices).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python tests/vm/record_guest.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "tests.vm"

from .guest import boot_guest
from .images.build import Images, build_images
from .images.lanes import REPO_ROOT, cache_dir

FIXTURES = REPO_ROOT / "tests" / "fixtures" / "umockdev"

RECORD_SCENARIO = r"""
{setup}
umockdev-record --all > /tmp/record.umockdev || exit 1
gzip -9 -c /tmp/record.umockdev > /tmp/record.gz
stty -F /dev/ttyS1 raw -echo
cat /tmp/record.gz > /dev/ttyS1
echo "RECORD-DONE bytes=$(wc -c < /tmp/record.gz) md5=$(md5sum < /tmp/record.gz | cut -c1-32)"
"""


class RecordError(RuntimeError):
    pass


def record_guest(
    out: Path | None = None, *, sriov: bool = False, images: Images | None = None
) -> Path:
    """Boot the lane's guest (no kexec), record its sysfs, write it to `out`."""
    if out is None:
        out = FIXTURES / ("q35-guest-sriov.umockdev" if sriov else "q35-guest.umockdev")
    setup = "setup-sriov || exit 1" if sriov else ""
    with tempfile.TemporaryDirectory() as tmp:
        capture = Path(tmp) / "ttyS1.bin"
        run = boot_guest(
            RECORD_SCENARIO.format(setup=setup),
            load_second=False,
            capture_path=capture,
            images=images,
            timeout=300,
        )
        done = run.lines_starting("RECORD-DONE ")
        if run.exit_code != 0 or not done:
            raise RecordError(f"the guest did not record:\n{run.tail()}")
        fields = dict(word.split("=", 1) for word in done[-1].split()[1:])
        data = capture.read_bytes()
        if len(data) != int(fields["bytes"]) or hashlib.md5(data).hexdigest() != fields["md5"]:
            raise RecordError(
                f"ttyS1 capture is {len(data)} bytes, md5 {hashlib.md5(data).hexdigest()}; "
                f"the guest sent {fields}"
            )
        recording = gzip.decompress(data)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(recording)
    return out


def record_host(out: Path | None = None) -> Path:
    """`umockdev-record --all` of this machine (reads sysfs only)."""
    out = out or FIXTURES / "host.umockdev"
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        if shutil.which("udevadm") is None:
            udevadm = cache_dir() / "pkgroot" / "bin" / "udevadm"
            if not udevadm.exists():
                build_images(project=False)
            os.symlink(udevadm, Path(tmp) / "udevadm")
            env["PATH"] = f"{tmp}:{env.get('PATH', '/usr/bin:/bin')}"
        proc = subprocess.run(
            ["umockdev-record", "--all"], capture_output=True, env=env, check=False
        )
    if proc.returncode != 0 or not proc.stdout:
        raise RecordError(f"umockdev-record failed ({proc.returncode}): {proc.stderr.decode()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(proc.stdout)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", action="store_true", help="record this machine instead")
    parser.add_argument("--sriov", action="store_true", help="bring up 2 nvme VFs first")
    parser.add_argument("--out", type=Path, help="where to write the recording")
    args = parser.parse_args(argv)
    path = record_host(args.out) if args.host else record_guest(args.out, sriov=args.sriov)
    devices = path.read_text(errors="replace").count("\nP: ") + 1
    print(f"{path}: {path.stat().st_size} bytes, {devices} devices")
    return 0


if __name__ == "__main__":
    sys.exit(main())

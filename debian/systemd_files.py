"""Put petitkexec's systemd files where a Debian package ships them (run by debian/rules).

    PYTHONPATH=<the package's dist-packages> python3 debian/systemd_files.py PACKAGE_ROOT COMMAND

The files are petitkexec.install's (what `petitkexec install-systemd` writes, with COMMAND in
the units and the defaults), at the same paths, except the units: a package puts them in
/lib/systemd/system and dh_installsystemd enables them the Debian way (deb-systemd-helper),
where install-systemd writes /etc/systemd/system, the admin's directory, and links them itself.
"""

from __future__ import annotations

import sys
from pathlib import Path

from petitkexec.install import UNIT_DIR, files_to_install

PACKAGE_UNIT_DIR = Path("lib/systemd/system")


def main(package_root: Path, command: str) -> None:
    for item in files_to_install(command):
        path = item.path
        if path.parent == UNIT_DIR:
            path = PACKAGE_UNIT_DIR / path.name
        target = package_root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(item.text)
        target.chmod(item.mode)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])

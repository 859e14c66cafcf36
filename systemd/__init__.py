"""The systemd files (this folder), shipped inside the petitkexec package as petitkexec.systemd
so that `petitkexec install-systemd` can install them however petitkexec itself was installed."""

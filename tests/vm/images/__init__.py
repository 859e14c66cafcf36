"""Guest images for the real-kernel lane, built from Debian packages only.

Everything comes from ``apt-get download`` + ``dpkg-deb -x`` (no network besides Debian's
archive and PyPI for petitkexec's dependencies) and is cached under ``<repo>/.cache/vm/``:

- ``debs/``       the downloaded packages (the kernel, busybox, kexec-tools, python3.11, ...
                  and the library packages they depend on);
- ``pkgroot/``    all of them unpacked into one tree, with ``depmod`` run on the host;
- ``build-<key>/`` the kernel, the stage-1 initramfs base (everything but petitkexec), the
                  second kernel's initramfs, and petitkexec's dependencies as a layer; ``key``
                  hashes this package, ``guest/`` and the package list, so editing either
                  rebuilds;
- ``session/``    petitkexec itself, installed from the working tree: rebuilt once per process
                  (= once per pytest session), because the tree changes under test.

All of it is done by lane: a `lanes.Lane` names what differs (architecture, packages, modules,
how to reach apt, the kernel's file name, the cache subdirectory). `lanes.X86` is the q35
lane's; powernv.py defines the PowerNV lane's, cached under ``.cache/vm/powernv/`` the same way.

An initramfs is a gzip'd newc cpio; the kernel unpacks concatenated archives in order, so a
boot's initrd is ``stage1-base + deps + project + the run's own layer`` (see guest.py).

One build, one module a step:

- ``lanes.py``      what a lane's images are made of (`Lane`, `X86`), where the cache is;
- ``debs.py``       packages: resolve, download, unpack; the kernel and its module load order;
- ``rootfs.py``     a guest root assembled from the unpacked packages, libraries by readelf;
- ``python.py``     the guest's trimmed Python 3.11, precompiled on the host;
- ``initramfs.py``  the stage-1 and second-kernel bases, named steps composed in two functions;
- ``layers.py``     petitkexec's dependencies and petitkexec itself as initramfs layers;
- ``cpio.py``       the newc archive writer;
- ``build.py``      the cache: what is rebuilt when (`build_images`, `current_images`);
- ``run.py``        the one way a child process is run, and the build log;
- ``disk.py``       an ext4 disk image for the guest's nvme (not part of the initramfs).

Usage: ``python -m tests.vm.images [--force] [--no-project] [--json]`` (or ``python
tests/vm/images``).
"""

"""The real-kernel lane: every test here boots a QEMU q35 guest (TCG) and is marked `vm`.

Deselect locally with `-m 'not vm'`. Missing host tools skip the lane locally, but fail it in
CI (CI=true, 1, yes...): there the lane must run. `.ci/run` installs what it needs
(`.ci/apt-packages`).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.ci import in_ci  # noqa: E402
from tests.conftest import TIMINGS_DIR  # noqa: E402
from tests.vm import guest  # noqa: E402
from tests.vm.images.build import Images, current_images  # noqa: E402
from tests.vm.images.lanes import X86, Lane  # noqa: E402

HERE = Path(__file__).resolve().parent
HOST_TOOLS = (
    "qemu-system-x86_64",
    "apt-get",
    "apt-cache",
    "dpkg-deb",
    "depmod",
    "ldconfig",
    "mke2fs",
    "readelf",
)
Boot = Callable[..., guest.GuestRun]


# The guests that do not boot the q35 lane's images (each lane caches its own). scripts/test
# runs two pytest-xdist workers with --dist loadgroup: the q35 lane's tests go to one, these to
# the other, so two single-vCPU guests run side by side on two cores and no two workers ever
# build the same lane's images (its session layer is rewritten once per process).
OTHER_IMAGES = ("test_powernv", "test_systemd_guest", "test_debian_package", "test_ansible")


def lane_group(module: str) -> str:
    return "other-images" if module.startswith(OTHER_IMAGES) else "q35"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        path = Path(str(item.fspath)).resolve()
        if HERE in path.parents:
            item.add_marker(pytest.mark.vm)
            item.add_marker(pytest.mark.xdist_group(lane_group(path.stem)))


@pytest.fixture(scope="session")
def record_timing(pytestconfig: pytest.Config) -> Callable[[str, str], None]:
    """record_timing(name, value): shown in the 'vm lane timings' section after the run."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    path = Path(os.environ[TIMINGS_DIR]) / f"{worker}.txt"

    def record(name: str, value: str) -> None:
        with open(path, "a") as timings:
            timings.write(f"{name}: {value}\n")

    return record


@pytest.fixture(scope="session")
def lane_images(
    record_timing: Callable[[str, str], None],
) -> Callable[[Lane, Sequence[str]], Images]:
    """lane_images(lane, host_tools): the lane's images for this session (cached base,
    petitkexec layer rebuilt from the tree), build time reported. A missing host tool skips
    the lane locally and fails it in CI."""

    def build(lane: Lane, host_tools: Sequence[str]) -> Images:
        missing = [
            tool
            for tool in host_tools
            if shutil.which(tool) is None
            and not Path("/sbin", tool).exists()
            and not Path("/usr/sbin", tool).exists()
        ]
        if missing:
            message = f"the {lane.name} lane needs {', '.join(missing)}: see .ci/apt-packages"
            if in_ci():
                pytest.fail(message)
            pytest.skip(message)
        started = time.monotonic()
        images = current_images(lane)
        record_timing(
            f"{lane.name} image build (this session)",
            f"{time.monotonic() - started:.1f}s (petitkexec layer: {images.project_install})",
        )
        return images

    return build


@pytest.fixture
def timed_boot(
    request: pytest.FixtureRequest, record_timing: Callable[[str, str], None]
) -> Callable[[Boot, Images], Boot]:
    """timed_boot(boot_function, images) -> boot(scenario, **kwargs) -> GuestRun, with these
    images; each boot's wall time is reported under the test's name."""

    def bind(boot_function: Boot, images: Images) -> Boot:
        def _boot(scenario: str, **kwargs: object) -> guest.GuestRun:
            run = boot_function(scenario, images=images, **kwargs)
            record_timing(
                f"{request.node.name} wall", f"{run.wall_seconds:.1f}s (log {run.log_path})"
            )
            return run

        return _boot

    return bind


@pytest.fixture(scope="session")
def vm_images(lane_images: Callable[[Lane, Sequence[str]], Images]) -> Images:
    """The q35 guest's images."""
    return lane_images(X86, HOST_TOOLS)


@pytest.fixture
def boot(vm_images: Images, timed_boot: Callable[[Boot, Images], Boot]) -> Boot:
    """boot(scenario, **kwargs) -> GuestRun: guest.boot_guest with this session's images."""
    return timed_boot(guest.boot_guest, vm_images)

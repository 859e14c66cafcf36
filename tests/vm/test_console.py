"""Reading the guests' consoles: what the firmware writes into the middle of a guest's line."""

from __future__ import annotations

from tests.vm.guest import rejoin_firmware_interruptions

SBE = "[   81.460996725,3] SBE: Timer stuck, falling back to OPAL pollers."
JITTER = "[   81.461556592,3] SBE: You will likely have slower I2C and may have experienced jitter."


def lines(*texts: str) -> list[tuple[float, str]]:
    return [(float(at), text) for at, text in enumerate(texts)]


def test_a_guest_line_cut_by_skiboot_is_whole_again_and_the_messages_are_their_own_lines() -> None:
    console = lines(
        "READBACK 0003:00:00.0 driver=- command=0107 tag=second",
        "READBACK 0003:01" + SBE,
        JITTER,
        ":00.0 driver=xhci_hcd command=0506 tag=second",
        "READBACK-END tag=second count=2",
    )
    assert rejoin_firmware_interruptions(console) == [
        (0.0, "READBACK 0003:00:00.0 driver=- command=0107 tag=second"),
        (1.0, SBE),
        (2.0, JITTER),
        (3.0, "READBACK 0003:01:00.0 driver=xhci_hcd command=0506 tag=second"),
        (4.0, "READBACK-END tag=second count=2"),
    ]


def test_lines_that_quote_the_firmware_log_on_purpose_are_left_alone() -> None:
    console = lines("OPAL-BEFORE " + SBE, SBE, "[ 5/13] 0001:00:00.0 clear-bus-master done")
    assert rejoin_firmware_interruptions(console) == console


def test_a_cut_line_whose_end_never_came_is_kept() -> None:
    assert rejoin_firmware_interruptions(lines("[ 5/13] 0001:00:" + SBE)) == [
        (0.0, SBE),
        (0.0, "[ 5/13] 0001:00:"),
    ]

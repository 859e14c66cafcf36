"""petitkexec: quiesce PCI devices the way remove() does, then hand off to kexec."""

__version__ = "0.1.0"

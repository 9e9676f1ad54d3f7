"""The machine fingerprint (accelops/_machine.py, shared with the tuned dispatch of accelops.ops)."""

from .._machine import CPU_FEATURES, fingerprint, machine_info

__all__ = ["CPU_FEATURES", "fingerprint", "machine_info"]

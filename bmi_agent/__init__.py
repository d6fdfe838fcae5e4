"""Node agent: runs in the initramfs of a PXE-booted node (inventory, boot plan, iSCSI, pivot).

It depends only on grpcio and the generated bmi.v1 stubs, never on bmi_server, so it fits
in an initramfs (see bmi_server/devenv/agent_image.py).
"""

__version__ = "0.1.0"

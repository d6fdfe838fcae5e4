"""Node agent: runs in the initramfs of a PXE-booted node (inventory, boot plan, iSCSI, pivot)."""

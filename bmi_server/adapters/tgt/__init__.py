"""iSCSI export of disks through tgtd (``tgtadm``)."""

from .tgtadm import TgtTargetDriver

__all__ = ["TgtTargetDriver"]

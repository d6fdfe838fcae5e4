"""The Ceph client profile for tgtd's rbd backing store.

tgt-rbd opens one librados client per LUN, so each exported disk costs tgtd a whole Ceph
client: 31 threads with Ceph's defaults plus tgtd's 16 I/O threads per LUN. This profile
(appended to the ceph.conf tgtd is given through ``bsopts conf=``) trims what a client
that serves one image does not need; with ``tgtd -t 4`` a LUN costs 16 threads. Measured
on a 2-core host: no change in sequential or 4 KiB read throughput through tgtd
(bench/README.md, "Gateways"). contrib/ceph-tgt.conf ships the same section for hosts.
"""

TGT_CLIENT_PROFILE = """
[client]
# One admin socket per LUN client would all be named $name.asok and collide anyway.
admin socket =
# One messenger worker and one librbd I/O context thread per LUN instead of 3 and 2.
ms async op threads = 1
librados thread count = 1
"""

# tgtd's I/O threads per LUN (``tgtd -t``): 4 serve a booting node's queue as fast as 16.
TGT_IO_THREADS = 4

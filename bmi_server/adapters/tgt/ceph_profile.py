"""The Ceph client profile for tgtd's rbd backing store.

tgt-rbd opens one librados client per LUN, so each exported disk costs tgtd a whole Ceph
client: 31 threads per LUN with the defaults (15 of the client, 16 tgtd I/O threads). This
profile (appended to the ceph.conf tgtd is given through ``bsopts conf=``) trims what a
client serving one image does not need; with ``tgtd -t 4`` a LUN costs 16 threads.
Measured on a 2-core host: the same read throughput through tgtd with 2 to 16 I/O threads
(bench/README.md, "Provisioning"). contrib/ceph-tgt.conf ships the same section for hosts.
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

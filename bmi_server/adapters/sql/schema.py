"""Tables of the catalogue. Unique constraints, not in-process locks, keep names unique
so several servers can share one database."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

images = Table(
    "images",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(64), nullable=False),
    Column("project", String(64), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("visibility", String(16), nullable=False),
    Column("state", String(16), nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
    Column("volume", String(64), nullable=False, unique=True),
    Column("source", String(255), nullable=False, default=""),
    # NULL when unused, so the unique constraint ignores calls without one.
    Column("request_id", String(200), nullable=True, unique=True),
    Column("create_time", DateTime(timezone=True), nullable=False),
    # Replica (incarnation id) working on the record while it is in flight; NULL otherwise.
    Column("owner", String(64), nullable=True),
    # SHA-256 hex of the raw content as made; NULL: not recorded (older images).
    Column("content_sha256", String(64), nullable=True),
    # URL imports: "<algorithm>:<hex>" of the fetched file, as checked.
    Column("file_digest", String(140), nullable=True),
    # URL imports in progress: bytes fetched, announced length; NULL otherwise.
    Column("fetched_bytes", BigInteger, nullable=True),
    Column("fetch_total_bytes", BigInteger, nullable=True),
    UniqueConstraint("project", "name", name="uq_images_project_name"),
    Index("ix_images_visibility", "visibility"),
    Index("ix_images_name", "name"),
)

disks = Table(
    "disks",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(64), nullable=False),
    Column("project", String(64), nullable=False),
    Column("image_id", String(32), nullable=False),
    Column("image_name", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
    Column("volume", String(64), nullable=False, unique=True),
    Column("request_id", String(200), nullable=True, unique=True),
    Column("create_time", DateTime(timezone=True), nullable=False),
    # Replica (incarnation id) working on the record while it is in flight; NULL otherwise.
    Column("owner", String(64), nullable=True),
    UniqueConstraint("project", "name", name="uq_disks_project_name"),
    Index("ix_disks_image_id", "image_id"),
    Index("ix_disks_name", "name"),
)

nodes = Table(
    "nodes",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("project", String(64), nullable=True),
    Column("state", String(16), nullable=False),
    Column("failure_reason", String(1000), nullable=False, default=""),
    Column("smbios_uuid", String(128), nullable=False, default=""),
    Column("smbios_serial", String(128), nullable=False, default=""),
    Column("smbios_manufacturer", String(128), nullable=False, default=""),
    Column("smbios_product", String(128), nullable=False, default=""),
    Column("disk_id", String(32), nullable=True),
    Column("image_id", String(32), nullable=True),
    Column("owns_disk", Boolean, nullable=False, default=False),
    Column("target_iqn", String(255), nullable=True),
    Column("target_volume", String(64), nullable=True),
    Column("initiator_iqn", String(255), nullable=True),
    Column("chap_user", String(64), nullable=True),
    Column("chap_secret", String(64), nullable=True),
    Column("request_id", String(200), nullable=True),
    Column("create_time", DateTime(timezone=True), nullable=False),
    Column("last_seen_time", DateTime(timezone=True), nullable=True),
    # NULL (databases made before agents): sanboot. Added to older databases on start.
    Column("boot_mode", String(16), nullable=True),
    # The current provisioning's config drive (core/node_config.py): cloud-init's instance
    # id, the host name it gives, the volume exported as LUN 2. NULL: none (not
    # provisioned, or provisioned before config drives; added to older databases on start).
    Column("instance_id", String(32), nullable=True),
    Column("hostname", String(253), nullable=True),
    Column("config_volume", String(64), nullable=True),
    # Replica (incarnation id) working on the record while it is in flight; NULL otherwise.
    Column("owner", String(64), nullable=True),
    # The last session change the session watcher saw on a target of the node: the target,
    # "logged_in" or "ended", and when. Written only by the watcher, only on a change;
    # node saves leave them alone. Added to older databases on start.
    Column("session_iqn", String(255), nullable=True),
    Column("session_state", String(16), nullable=True),
    Column("session_time", DateTime(timezone=True), nullable=True),
    Index("ix_nodes_project", "project"),
    Index("ix_nodes_state", "state"),
    Index("ix_nodes_target_iqn", "target_iqn"),
    # One node per disk: two nodes can never boot the same clone.
    Index("ux_nodes_disk_id", "disk_id", unique=True),
)

node_macs = Table(
    "node_macs",
    metadata,
    Column("mac", String(17), primary_key=True),
    Column("node_id", String(32), ForeignKey("nodes.id", ondelete="CASCADE"), nullable=False),
    Index("ix_node_macs_node_id", "node_id"),
)

node_transitions = Table(
    "node_transitions",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("node_id", String(32), ForeignKey("nodes.id", ondelete="CASCADE"), nullable=False),
    Column("from_state", String(16), nullable=False),
    Column("to_state", String(16), nullable=False),
    Column("reason", String(1000), nullable=False),
    Column("time", DateTime(timezone=True), nullable=False),
    # The replica that recorded it (so its own event relay can skip it); NULL before replicas.
    Column("origin", String(64), nullable=True),
    Index("ix_node_transitions_node_id_seq", "node_id", "seq"),
)

# The hardware a node's agent reported last (JSON: see adapters/sql/agent_store.py).
node_inventories = Table(
    "node_inventories",
    metadata,
    Column("node_id", String(32), ForeignKey("nodes.id", ondelete="CASCADE"), primary_key=True),
    Column("inventory", Text, nullable=False),
    Column("collect_time", DateTime(timezone=True), nullable=False),
)

# What a provisioned node's config drive holds (core/node_config.py), written in the
# transaction of the node's save that names the drive, dropped with it. Read only to build
# the drive and to say what is set (GetNode): user-data may hold secrets.
node_configs = Table(
    "node_configs",
    metadata,
    Column("node_id", String(32), ForeignKey("nodes.id", ondelete="CASCADE"), primary_key=True),
    Column("hostname", String(253), nullable=False),
    Column("ssh_keys", Text, nullable=False),  # JSON list of public key lines
    Column("user_data", LargeBinary, nullable=False),
    Column("network_config", LargeBinary, nullable=False),
    Column("metadata", Text, nullable=False),  # JSON object
    Column("update_time", DateTime(timezone=True), nullable=False),
)

# One-boot tokens of node agents: only a SHA-256 of each, one per node.
boot_tokens = Table(
    "boot_tokens",
    metadata,
    Column("node_id", String(32), ForeignKey("nodes.id", ondelete="CASCADE"), primary_key=True),
    Column("token_hash", String(64), nullable=False),
    Column("expire_time", DateTime(timezone=True), nullable=False),
)

# Live server replicas: each renews its lease; another replica repairs the in-flight work
# (records whose owner is) of one whose lease expired.
replicas = Table(
    "replicas",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(128), nullable=False),
    Column("address", String(255), nullable=False, default=""),
    Column("start_time", DateTime(timezone=True), nullable=False),
    Column("expire_time", DateTime(timezone=True), nullable=False),
    Index("ix_replicas_name", "name"),
)

# Which resource a call with an idempotency key acted on, for calls that make no record
# to hold the key (UpdateImage, DeleteImage, DeleteDisk): a retry acts on that same
# resource again, by id, even once it is gone. Keys are per caller ("<caller>/<id>").
request_log = Table(
    "request_log",
    metadata,
    Column("request_id", String(200), primary_key=True),
    Column("action", String(32), nullable=False),
    Column("resource_id", String(32), nullable=False),
    Column("create_time", DateTime(timezone=True), nullable=False),
)

# A project's own limits (core/quotas.py), set by an admin with SetQuota; NULL: the
# server's default (0: no limit). Projects without a row use the defaults throughout.
project_quotas = Table(
    "project_quotas",
    metadata,
    Column("project", String(64), primary_key=True),
    Column("max_bytes", BigInteger, nullable=True),
    Column("max_images", BigInteger, nullable=True),
    Column("max_disks", BigInteger, nullable=True),
    Column("update_time", DateTime(timezone=True), nullable=False),
)

# -- gateway mode (core/gateways.py) --------------------------------------------------------

# iSCSI gateways that announced themselves; live while heartbeat_time is recent.
gateways = Table(
    "gateways",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("portals", Text, nullable=False),  # comma-separated host:port
    Column("heartbeat_time", DateTime(timezone=True), nullable=False),
    Column("incarnation", String(64), nullable=False, default=""),
    # Watches from before this revision need a snapshot (removals after it were pruned).
    Column("pruned_through", BigInteger, nullable=False, default=0),
)

# The targets each gateway should export (removed: should take down), one row per
# (gateway, target), and what the gateway reported about the row's current revision.
gateway_targets = Table(
    "gateway_targets",
    metadata,
    Column("gateway", String(64), primary_key=True),
    Column("iqn", String(255), primary_key=True),
    Column("volume", String(64), nullable=False),
    Column("initiator_iqn", String(255), nullable=False),
    Column("chap_user", String(64), nullable=False),
    Column("chap_secret", String(64), nullable=False),
    # LUN 2, the node's config drive; NULL: none (added to older databases on start).
    Column("config_volume", String(64), nullable=True),
    Column("revision", BigInteger, nullable=False),
    Column("removed", Boolean, nullable=False, default=False),
    Column("status", String(16), nullable=False),
    Column("detail", String(300), nullable=False, default=""),
    Column("logged_in", Boolean, nullable=False, default=False),
    # Comma-separated portals of the gateway the target was applied on (one of its tgtd
    # processes); NULL: all of them (added to older databases on start).
    Column("portals", Text, nullable=True),
    Index("ix_gateway_targets_gateway_revision", "gateway", "revision"),
    Index("ix_gateway_targets_iqn", "iqn"),
)

# One row: the last revision given to a change of any gateway's targets. Writers take its
# row lock first, so changes commit in revision order.
gateway_revision = Table(
    "gateway_revision",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("revision", BigInteger, nullable=False),
)

# -- local target mode with several tgtd processes (adapters/tgt/pool.py) -------------------

# Which tgtd process (0..K-1) of this host exports each target. A target without a row is
# on process 0: what a site that ran one tgtd had (its rows are written by the first audit).
tgt_placements = Table(
    "tgt_placements",
    metadata,
    Column("iqn", String(255), primary_key=True),
    Column("process", Integer, nullable=False),
    Index("ix_tgt_placements_process", "process"),
)

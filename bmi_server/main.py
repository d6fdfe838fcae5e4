"""`bmi-server`: run the control server, or repair its catalogue."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import click

from .config import Settings, load_settings
from .core.errors import BmiError, FailedPrecondition, InvalidArgument
from .core.reconcile import ReconcileReport, rebuild_catalogue, reconcile

log = logging.getLogger("bmi_server")

GRACE_SECONDS = 10
LEASE_LOST_EXIT = 75  # EX_TEMPFAIL: restart me
# Served at /chain.ipxe when BMI runs from a source tree (deployments use ipxe/ directly).
CHAIN_TEMPLATE = Path(__file__).resolve().parent.parent / "ipxe" / "chain.ipxe"
# Where `make agent-image` puts the node agent's kernel + initrd in a source tree.
AGENT_IMAGE_DIR = Path(__file__).resolve().parent.parent / "build" / "agent-image"


@contextlib.contextmanager
def open_core(
    settings: Settings, *, fence: bool = False, metrics=None, relay=False, serving=False
) -> Iterator:
    """Ports and core for these settings. Without ``ceph_conf`` the server's own Ceph
    cluster in state_dir, and without ``tgt_portal`` its own tgtd (``serving`` only: other
    commands leave targets alone), both kept across restarts (``bmi_server.embedded``).
    With ``metrics``, Ceph operations are timed and tgtd's target count is reported.
    With ``relay`` (a serving replica on PostgreSQL), other replicas' node transitions
    reach this one's WatchNodes streams."""
    from .adapters.ceph.rbd_store import RbdImageStore
    from .adapters.sql.store import SqlStateStore
    from .core.events import NodeEvents
    from .core.replicas import ReplicaLease, new_replica
    from .server import Core

    settings.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        conf, pool = settings.ceph_conf, settings.ceph_pool
        tgt_conf = settings.tgt_ceph_conf or conf
        tgt_user = settings.tgt_rbd_user
        local_tgtd = settings.target_mode != "gateways" and not settings.tgt_portal
        embedded = None
        if not conf or local_tgtd:
            from .embedded import EmbeddedServices

            embedded = stack.enter_context(EmbeddedServices(settings.state_dir))
            if serving and not embedded.owner:
                raise FailedPrecondition(
                    f"another bmi-server serves from state_dir {settings.state_dir} "
                    "(it runs the Ceph cluster and tgtd kept there); stop it first")
        if not conf:
            cluster = embedded.ceph(pool, settings.embedded_ceph_bytes)
            conf = str(cluster.conf_path)
            tgt_conf, tgt_user = str(cluster.tgt_conf_path), cluster.tgt_user
        store = RbdImageStore(
            conf, pool, settings.ceph_client, op_timeout=settings.ceph_timeout_seconds
        )
        stack.callback(store.close)
        if fence:
            fenced = store.fence_previous_instance(settings.ceph_client_record)
            if fenced:
                log.warning("blocklisted the previous server's Ceph client %s", fenced)
        replica = new_replica(settings.replica, settings.listen)
        state = SqlStateStore(
            settings.database, replica_id=replica.id, timeout=settings.database_timeout_seconds,
            upgrade=settings.database_auto_upgrade,
        )
        stack.callback(state.close)
        events = NodeEvents()
        if relay and state.is_postgres:
            from .adapters.sql.pg_events import PgNodeEventRelay

            relayed = PgNodeEventRelay(state, events)
            relayed.start()
            stack.callback(relayed.stop)
        gateways = None
        if settings.target_mode == "gateways":
            from .core.gateways import GatewayDirectory, GatewayExports

            targets = GatewayExports(state, _gateway_policy(settings))
            gateways = GatewayDirectory(targets)
            advertised = []  # each target's portals are its live gateways'
        else:
            targets = _local_targets(settings, state, embedded, local_tgtd, serving, pool,
                                     tgt_conf, tgt_user)
            advertised = targets.portals()
        if metrics is not None:
            from .api.metrics import TargetCountCollector, TimedImageStore

            store = TimedImageStore(store, metrics)
            metrics.registry.register(TargetCountCollector(targets))
            if gateways is not None:
                from .api.metrics import GatewayCollector

                metrics.registry.register(GatewayCollector(targets))
        core = Core.build(
            state,
            store,
            targets,
            advertised_portals=advertised,
            retry_seconds=settings.discovery_retry_seconds,
            isolator=_isolator(settings, state),
            agent_policy=_agent_policy(settings),
            discovery_mode=settings.discovery_mode,
            portal_source=targets,
            gateways=gateways,
            events=events,
            lease=ReplicaLease(state, replica, settings.replica_lease_seconds),
            replicas=state,
            quota_defaults=settings.quota_defaults,
        )
        yield core


def _local_targets(settings: Settings, state, embedded, local_tgtd: bool, serving: bool,
                   pool: str, tgt_conf: str, tgt_user: str):
    """Local target mode: a TgtdPool over this host's K tgtd processes (BMI's own, started
    here when ``serving``, or the operator's at tgt_portal)."""
    from .adapters.tgt.control_socket import TgtdSocketRunner
    from .adapters.tgt.layout import (
        advertised_groups,
        default_processes,
        process_portals,
        split_list,
    )
    from .adapters.tgt.pool import TgtdPool, processes_needed
    from .adapters.tgt.tgtadm import TgtTargetDriver

    listed = split_list(settings.tgt_portal)
    active = settings.tgtd_processes or (default_processes() if local_tgtd else len(listed))
    running = processes_needed(active, state.placement_counts())
    if running > active:
        log.warning("tgtd processes %d..%d still hold targets (tgtd_processes is %d): they "
                    "keep running and get no new targets", active, running - 1, active)
    read_now = True
    if local_tgtd and serving:
        daemons = embedded.tgtds(settings.tgt_listen, running)
        endpoints = [(d.portal, d.control) for d in daemons]
    elif local_tgtd:
        # Repairs of the catalogue need no tgtd: the serving server runs them.
        endpoints = embedded.recorded_tgtds()[:running]
        endpoints += [("127.0.0.1:0", None)] * (running - len(endpoints))
        read_now = False
    else:
        portals = process_portals(listed, running)
        endpoints = [(p, settings.tgt_control + i) for i, p in enumerate(portals)]
    drivers = [
        TgtTargetDriver(tgt_conf, pool, portal, control=control,
                        runner=TgtdSocketRunner() if settings.tgt_admin == "socket" else None,
                        rbd_user=tgt_user or None, read_now=read_now)
        for portal, control in endpoints
    ]
    advertised = advertised_groups(settings.advertised_portals, [p for p, _ in endpoints])
    return TgtdPool(drivers, advertised, state, active)


def _told(targets) -> str:
    """Each tgtd process's advertised portals, for the start-up log line."""
    groups = [", ".join(g) for g in getattr(targets, "advertised", lambda: [])()]
    if len(groups) <= 1:
        return ", ".join(targets.portals())
    return "; ".join(f"{g} (tgtd process {i})" for i, g in enumerate(groups))


def prepare_state(settings: Settings) -> None:
    """The state directory 0700 and what BMI keeps in it 0600, before anything is opened
    (SQLite gives a new -wal/-shm the database file's mode); secret files set elsewhere
    by the operator are warned about if other users may read them."""
    from .private_files import prepare_state_dir

    secrets = [("database", path) for path in settings.sqlite_files]
    if settings.isolator == "standalone":
        secrets.append(("token_file", settings.tokens_path))
    secrets.append(("gateway_token_file", settings.gateway_tokens_path))
    for name in ("tls_key_file", "hil_password_file"):
        if getattr(settings, name):
            secrets.append((name, Path(getattr(settings, name))))
    prepare_state_dir(settings.state_dir, [settings.ceph_client_record, settings.spool_dir],
                      secrets)


def _gateway_policy(settings: Settings):
    from .core.gateways import GatewayPolicy

    return GatewayPolicy(
        replicas=settings.gateway_replicas,
        heartbeat_seconds=settings.gateway_heartbeat_seconds,
        expiry_seconds=settings.gateway_expiry_seconds,
        apply_timeout_seconds=settings.gateway_apply_timeout_seconds,
    )


def _agent_policy(settings: Settings):
    from .core.agent import AgentPolicy

    return AgentPolicy(
        token_ttl_seconds=settings.agent_token_ttl_seconds,
        heartbeat_seconds=settings.agent_heartbeat_seconds,
        wait_seconds=settings.agent_heartbeat_seconds,
        attach_attempts=settings.agent_attach_attempts,
        retry_delay_seconds=settings.agent_retry_delay_seconds,
        init_args=tuple(settings.os_kernel_args.split()),
    )


def _agent_image(settings: Settings, tls: bool):
    """``tls``: the gRPC API uses TLS, so agents get agent_ca_file to verify it with."""
    from .api.http_boot import AgentImageConfig

    folder = Path(settings.agent_image_dir) if settings.agent_image_dir else AGENT_IMAGE_DIR
    ca_pem = b""
    if tls and settings.agent_ca_file:
        try:
            ca_pem = Path(settings.agent_ca_file).read_bytes()
        except OSError as exc:
            raise InvalidArgument(
                f"agent_ca_file {settings.agent_ca_file}: {exc.strerror or exc}"
            ) from None
    config = AgentImageConfig(
        image_dir=folder,
        grpc_port=_host_port(settings.listen)[1],
        server=settings.agent_server,
        kernel_args=settings.agent_kernel_args,
        tls=tls,
        ca_pem=ca_pem,
    )
    missing = config.missing()
    if "agent_ca_file" in missing:
        missing.remove("agent_ca_file")
        log.warning("TLS on and no agent_ca_file: nodes in agent mode cannot boot")
    if missing:
        log.warning(
            "no agent image in %s (%s): nodes in agent mode cannot boot (make agent-image)",
            folder,
            ", ".join(missing),
        )
    return config


def _boot_rate_limits(settings: Settings, metrics):
    from .api.http_boot import BootRateLimits
    from .core.rate_limit import TokenBuckets

    try:
        limits = BootRateLimits(
            TokenBuckets(settings.boot_rate_per_second, settings.boot_burst),
            TokenBuckets(settings.discovery_rate_per_second, settings.discovery_burst),
        )
    except ValueError as exc:
        raise InvalidArgument(f"boot rate limits: {exc}") from None
    if metrics is not None:
        limits.on_refused = lambda bucket: metrics.boot_rate_limited.labels(bucket).inc()
    return limits


def _isolator(settings: Settings, nodes):
    """HIL, or BMI's own node records (standalone)."""
    if settings.isolator == "hil":
        from .adapters.hil import HilIsolator
        from .adapters.hil.membership import ProjectMembers

        return HilIsolator(
            _hil_client(settings),
            settings.hil_provisioning_network,
            boot_nic=settings.hil_boot_nic,
            action_timeout=settings.hil_action_timeout_seconds,
            members=ProjectMembers(settings.hil_membership_cache_seconds),
        )
    from .adapters.standalone import StandaloneIsolator

    return StandaloneIsolator(nodes, settings.power_commands)


def _share_hil_members(authenticator, isolator) -> None:
    """HIL mode: checking a tenant reads its project's node list, which the isolator's
    listing cache can keep."""
    if hasattr(authenticator, "members") and hasattr(isolator, "members"):
        authenticator.members = isolator.members


def _hil_client(settings: Settings):
    from .adapters.hil import HilClient

    return HilClient(settings.hil_url, settings.hil_account(), timeout=settings.hil_timeout_seconds)


def _authenticator(settings: Settings):
    """Callers' HIL credentials in HIL mode; bearer tokens from the token file otherwise."""
    if settings.isolator == "hil":
        from .adapters.hil import HilAuthenticator

        return HilAuthenticator(
            _hil_client(settings), cache_seconds=settings.hil_auth_cache_seconds
        )
    from .adapters.auth.token_file import TokenFileAuthenticator, ensure_token_file

    if ensure_token_file(settings.tokens_path):
        log.warning("created %s with an admin token (read it there)", settings.tokens_path)
    return TokenFileAuthenticator(settings.tokens_path)


def _url_fetcher(settings: Settings):
    """The HTTP fetcher of URL imports, or None when no host is allowed (URL import off)."""
    from .adapters.http_fetcher import HttpFetcher
    from .adapters.url_guard import UrlPolicy

    policy = UrlPolicy(settings.url_import_allowed_hosts, settings.url_import_schemes)
    if not policy.enabled:
        return None
    return HttpFetcher(
        policy,
        max_bytes=settings.url_import_max_bytes,
        connect_timeout=settings.url_import_connect_timeout_seconds,
        read_timeout=settings.url_import_read_timeout_seconds,
        max_redirects=settings.url_import_max_redirects,
    )


def _gateway_authenticator(settings: Settings, core):
    if core.gateways is None:
        return None
    from .adapters.auth.gateway_tokens import GatewayTokenFile

    if not settings.gateway_tokens_path.exists():
        log.warning("gateway mode without %s: no gateway can connect",
                    settings.gateway_tokens_path)
    return GatewayTokenFile(settings.gateway_tokens_path)


def _print_report(report: ReconcileReport) -> None:
    for line in report.repaired:
        click.echo(f"repaired: {line}")
    for line in report.problems:
        click.echo(f"problem: {line}")
    if not report:
        click.echo("catalogue and image store agree")


@click.group(invoke_without_command=True)
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML config file")
@click.option("--log-level", default="INFO", show_default=True)
@click.pass_context
def cli(ctx: click.Context, config_file: str | None, log_level: str) -> None:
    """BMI control server. Without a command, serves."""
    from .api.logging_setup import configure

    ctx.obj = load_settings(config_file)
    configure(log_level, ctx.obj.log_format)
    if ctx.invoked_subcommand is None:
        ctx.invoke(serve)


@cli.command()
@click.pass_obj
def serve(settings: Settings) -> None:
    """Reconcile with Ceph, then serve the gRPC API until SIGTERM/SIGINT."""
    from .adapters.qemu_img import QemuImgInspector
    from .api.admission import AdmissionLimits
    from .api.http_boot import BootHttpServer
    from .api.http_guard import HttpLimits
    from .api.tls import transport_security
    from .server import build_grpc_server

    prepare_state(settings)
    transport = transport_security(
        settings.listen,
        settings.tls_cert_file,
        settings.tls_key_file,
        settings.tls_client_ca_file,
        allow_plaintext=settings.allow_plaintext,
    )
    authenticator = _authenticator(settings)
    metrics = None
    if settings.metrics_listen:
        from .api.metrics import Metrics

        metrics = Metrics()
    with open_core(settings, fence=True, metrics=metrics, relay=True, serving=True) as core:
        _share_hil_members(authenticator, core.ownership.isolator)
        core.lease.register()
        log.info("replica %s (%s) registered", core.lease.replica.name, core.lease.replica.id)
        if core.reconcile() is None:
            log.info("another replica is reconciling; this one serves at once")
        server = build_grpc_server(
            core,
            QemuImgInspector(
                max_virtual_bytes=settings.max_image_virtual_bytes,
                convert_timeout=settings.image_convert_timeout_seconds,
            ),
            authenticator,
            settings.spool_dir,
            max_image_virtual_bytes=settings.max_image_virtual_bytes,
            spool_reserve_bytes=settings.spool_reserve_bytes,
            metrics=_serve_metrics(settings, core, metrics),
            gateway_authenticator=_gateway_authenticator(settings, core),
            url_fetcher=_url_fetcher(settings),
            url_import_max_bytes=settings.url_import_max_bytes,
            url_import_timeout=settings.url_import_timeout_seconds,
            limits=AdmissionLimits(
                workers=settings.workers, max_queued=settings.max_queued_rpcs,
                max_streams=settings.max_streams,
                max_streams_per_caller=settings.max_streams_per_caller,
            ),
        )
        if transport.add_port(server, settings.listen) == 0:
            hint = " (is the key that of the certificate?)" if transport.tls else ""
            raise click.ClickException(f"cannot listen on {settings.listen}{hint}")
        chain = CHAIN_TEMPLATE.read_text() if CHAIN_TEMPLATE.exists() else None
        http = BootHttpServer(
            _host_port(settings.http_listen), core.planner, chain,
            _agent_image(settings, transport.tls), _boot_rate_limits(settings, metrics),
            HttpLimits(settings.http_idle_timeout_seconds, settings.http_read_timeout_seconds,
                       settings.http_max_connections),
        )
        if metrics is not None:
            http.on_connection_refused = metrics.http_refused.inc
            metrics.serving["http"] = lambda: http.open_connections
        if transport.mutual:
            log.warning("mutual TLS: node agents have no client certificate and cannot boot")
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        server.start()
        http.start()
        watcher = threading.Thread(
            target=_background, args=(core, stop, settings), name="background", daemon=True
        )
        watcher.start()
        heartbeat = threading.Thread(
            target=_heartbeat, args=(core.lease, stop, settings), name="lease", daemon=True
        )
        heartbeat.start()
        # Its own thread: hashing a large image takes minutes, which must not hold up the
        # session polls and audits of the background loop.
        threading.Thread(target=_digests, args=(core, stop), name="digests",
                         daemon=True).start()
        log.info(
            "serving bmi.v1 on %s (%s), boot scripts on http://%s/boot.ipxe (iPXE: chain "
            "http://%s/chain.ipxe)",
            settings.listen,
            transport.description,
            settings.http_listen,
            settings.http_listen,
        )
        if core.gateways is None:
            log.info("nodes are told to log in to their iSCSI targets at %s%s",
                     _told(core.targets),
                     "" if settings.portals else
                     " (set advertised_portals if they reach it at another address)")
        else:
            log.info("nodes are told to log in to their iSCSI targets at the portals of live "
                     "gateways")
        if not transport.tls:
            log.warning("gRPC API without TLS: credentials cross the network in the clear")
        print(f"bmi-server listening on {settings.listen}", flush=True)
        stop.wait()
        log.info("shutting down: finishing in-flight calls (up to %ss)", GRACE_SECONDS)
        http.stop()
        server.stop(GRACE_SECONDS).wait()
        watcher.join(GRACE_SECONDS)
        heartbeat.join(GRACE_SECONDS)
        # Nothing is in flight any more: no need for the others to wait out the lease.
        with contextlib.suppress(BmiError):
            core.lease.retire()


def _serve_metrics(settings: Settings, core, metrics):
    """Prometheus /metrics on metrics_listen, or None when it is not set."""
    if metrics is None:
        return None
    from prometheus_client import start_http_server

    from .api.metrics import NodeSessionCollector, NodeStateCollector, PhaseTimer

    metrics.registry.register(NodeStateCollector(core.state))
    metrics.registry.register(NodeSessionCollector(core.state))
    PhaseTimer(metrics, core.registry.events).start()
    host, port = _host_port(settings.metrics_listen)
    start_http_server(port, host, registry=metrics.registry)
    log.info("metrics on http://%s/metrics", settings.metrics_listen)
    return metrics


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise click.ClickException(f"{address!r} is not host:port")
    return host, int(port)


DIGEST_POLL_SECONDS = 2.0


def _digests(core, stop: threading.Event) -> None:
    """Records the content digests of images made without one (core/image_digests.py)."""
    # Hashing is CPU-bound for as long as the virtual size is large: at the lowest
    # priority (Linux nices each thread) it only takes what serving leaves.
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    while not stop.wait(DIGEST_POLL_SECONDS):
        try:
            while core.fill_digests() and not stop.is_set():
                pass  # more may be waiting
        except Exception:
            log.exception("hashing images failed; trying again later")


def _background(core, stop: threading.Event, settings: Settings) -> None:
    """Finishes rollbacks an outage interrupted; moves BOOTING nodes to ACTIVE once they
    log in (every replica: compare-and-set makes that safe); records the sessions seen and
    ended on every node's target (one replica at a time); re-creates targets tgtd lost
    (gateway mode: re-places targets whose gateways are all down) and repairs work of
    replicas whose lease expired (one replica at a time, under the cluster-wide reconcile
    lock)."""
    next_audit = time.monotonic() + settings.target_audit_seconds
    next_reconcile = time.monotonic() + settings.reconcile_seconds
    next_sweep = time.monotonic()
    # Rollbacks wait for the store to come back: each try may take ceph_timeout_seconds,
    # so tries back off (up to a minute) rather than hold up session polls and audits.
    next_rollback, rollback_wait = 0.0, settings.session_poll_seconds
    tick = min(settings.session_poll_seconds, settings.session_sweep_seconds,
               settings.reconcile_seconds)
    while not stop.wait(tick):
        try:
            if time.monotonic() >= next_rollback:
                if core.retry_rollbacks():  # some still pending: the store is still away
                    rollback_wait = min(rollback_wait * 2, 60.0)
                    next_rollback = time.monotonic() + rollback_wait
                else:
                    rollback_wait = settings.session_poll_seconds
            core.sessions.poll_once()
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + settings.session_sweep_seconds
                core.sweep_sessions()  # logs what it recorded
            if time.monotonic() >= next_reconcile:
                next_reconcile = time.monotonic() + settings.reconcile_seconds
                core.reconcile(full=False)  # logs what it repaired
            if time.monotonic() >= next_audit:
                next_audit = time.monotonic() + settings.target_audit_seconds
                report = core.audit_targets()
                for line in report.problems if report else []:
                    log.warning("target audit: %s", line)
                if core.gateways is not None and (pruned := core.gateways.prune_dead()):
                    log.info("forgot %d removals that down gateways never confirmed", pruned)
        except Exception:  # keep going; the next round may succeed
            log.exception("background round failed")


def _heartbeat(lease, stop: threading.Event, settings: Settings) -> None:
    """Renews this replica's lease three times per lease period."""
    renewed = time.monotonic()
    while not stop.wait(settings.replica_lease_seconds / 3):
        try:
            alive = lease.renew()
        except Exception:  # the database is down: the lease may expire; keep trying
            log.exception("could not renew the replica lease")
            continue
        if not alive:
            # Another replica repairs (or repaired) what this one has in flight: going on
            # would do that work twice. Stop at once; the service manager restarts us.
            os._exit(LEASE_LOST_EXIT)
        late, renewed = time.monotonic() - renewed, time.monotonic()
        if late > settings.replica_lease_seconds * 2 / 3:
            log.warning("replica lease renewed %.1fs after the previous renewal", late)


@cli.group()
def admin() -> None:
    """Repair and maintenance."""


@admin.command("reconcile")
@click.option(
    "--remove-unknown", is_flag=True, help="Also remove complete volumes that no record claims."
)
@click.pass_obj
def admin_reconcile(settings: Settings, remove_unknown: bool) -> None:
    """Compare the database with Ceph and repair interrupted operations."""
    prepare_state(settings)
    # Work of replicas that are alive now is theirs: only expired leases' is repaired.
    with open_core(settings) as core, core.replicas.exclusive("reconcile") as mine:
        if not mine:
            raise click.ClickException("a server replica is reconciling now; try again")
        orphaned = core.lease.orphaned()
        _print_report(
            reconcile(core.state, core.store, remove_unknown=remove_unknown, orphaned=orphaned,
                      drives=core.provisioner.drives)
        )


@admin.command("rebuild-catalogue")
@click.pass_obj
def admin_rebuild(settings: Settings) -> None:
    """Recreate missing database records from the metadata of the volumes in Ceph."""
    prepare_state(settings)
    with open_core(settings) as core:
        _print_report(rebuild_catalogue(core.state, core.store))


@admin.group("db")
def admin_db() -> None:
    """The database's schema version (versioned migrations)."""


@admin_db.command("upgrade")
@click.pass_obj
def admin_db_upgrade(settings: Settings) -> None:
    """Migrate the database's schema to this release's, as a starting server does (once,
    under a lock: safe beside running replicas and other upgrades)."""
    from .adapters.sql import migrate

    prepare_state(settings)
    with _database(settings) as engine:
        found, now = migrate.upgrade(engine)
    if found.at_head:
        click.echo(f"database schema is {now.describe()}: nothing to do")
    else:
        click.echo(f"database schema upgraded from {found.origin} to {now.describe()}")


@admin_db.command("current")
@click.pass_obj
def admin_db_current(settings: Settings) -> None:
    """Print the database's schema revision (and whether it is this release's head)."""
    from .adapters.sql import migrate

    prepare_state(settings)
    with _database(settings) as engine:
        click.echo(migrate.version(engine).describe())


@contextlib.contextmanager
def _database(settings: Settings) -> Iterator:
    """An engine on the database alone: the db commands need no Ceph, tgtd or store."""
    from sqlalchemy.exc import OperationalError

    from .adapters.sql.store import make_engine

    engine = make_engine(settings.database, settings.database_timeout_seconds)
    try:
        yield engine
    except OperationalError as exc:
        raise click.ClickException(f"database unavailable: {exc.orig or exc}") from exc
    finally:
        engine.dispose()


@admin.command("stop-embedded")
@click.pass_obj
def admin_stop_embedded(settings: Settings) -> None:
    """Stop the Ceph cluster and tgtd kept in state_dir that a server which did not stop
    cleanly (killed, crashed) left running. Their data stays; the next start starts them."""
    from .embedded import EmbeddedServices

    with EmbeddedServices(settings.state_dir) as embedded:
        stopped = embedded.stop_left_running()
    click.echo("stopped: " + ", ".join(stopped) if stopped else "nothing was running")


def main() -> None:
    from .private_files import restrict_umask

    restrict_umask()  # before any file exists: the database, its -wal/-shm, tokens, spool
    try:
        cli(standalone_mode=True)
    except BmiError as exc:
        print(f"bmi-server: {exc.message}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

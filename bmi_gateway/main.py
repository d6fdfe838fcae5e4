"""`bmi-gateway`: keep this host's tgtd equal to the targets the BMI server assigns it."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path

import click

from bmi_server.core.errors import BmiError

from .config import GatewaySettings, load_gateway_settings

log = logging.getLogger("bmi_gateway")


@click.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="TOML file with a [gateway] table (or BMI_GATEWAY_CONFIG)")
@click.option("--log-level", default="INFO", show_default=True)
def cli(config_file: str | None, log_level: str) -> None:
    """Run the gateway daemon until SIGTERM/SIGINT."""
    from bmi_server.adapters.tgt.control_socket import TgtdSocketRunner
    from bmi_server.adapters.tgt.pool import processes_needed
    from bmi_server.adapters.tgt.tgtadm import TgtTargetDriver
    from bmi_server.api.logging_setup import configure

    from .client import GatewayClient
    from .daemon import GatewayDaemon
    from .processes import FilePlacements, GatewayTgtds

    settings = load_gateway_settings(config_file)
    configure(log_level, "text")
    _warn_about_shared_secrets(settings)
    placements = FilePlacements(Path(settings.placement_file))
    active = settings.processes
    # Processes beyond tgtd_processes that still hold targets (it was lowered) are driven
    # until they are empty; they get no new targets.
    running = processes_needed(active, placements.placement_counts())
    if running > active:
        log.warning("tgtd processes %d..%d still hold targets: driven until they are empty",
                    active, running - 1)
    drivers = [
        TgtTargetDriver(settings.ceph_conf, settings.ceph_pool, portal, control=control,
                        iqn_prefix=settings.iqn_prefix, rbd_user=settings.rbd_user or None,
                        runner=TgtdSocketRunner() if settings.tgt_admin == "socket" else None)
        for portal, control in settings.process_endpoints(running)
    ]
    driver = GatewayTgtds(drivers, settings.advertised(running), placements, active)
    credentials = None
    if settings.tls or settings.ca_file or settings.cert_file:
        from bmi_client.client import channel_credentials

        try:
            credentials = channel_credentials(settings.ca_file or None,
                                              settings.cert_file or None,
                                              settings.key_file or None)
        except OSError as exc:
            raise click.ClickException(f"TLS files: {exc}") from None
    client = GatewayClient(settings.server, settings.credential(), credentials)
    daemon = GatewayDaemon(settings.name, settings.portals, driver, client,
                           prefix=settings.iqn_prefix, audit_seconds=settings.audit_seconds,
                           reconnect_max_seconds=settings.reconnect_max_seconds)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: daemon.stop())
    print(f"bmi-gateway {settings.name} following {settings.server}", flush=True)
    runner = threading.Thread(target=daemon.run, name="reconcile")
    runner.start()
    while runner.is_alive():  # the main thread stays free to take signals
        runner.join(0.5)
    client.close()


def _warn_about_shared_secrets(settings: GatewaySettings) -> None:
    """The operator's files, so only warned about: the token file (unless the token came
    from the environment) and the TLS client key."""
    from pathlib import Path

    from bmi_server.private_files import warn_if_shared

    if not settings.token:
        warn_if_shared("token_file", Path(settings.token_file))
    if settings.key_file:
        warn_if_shared("key_file", Path(settings.key_file))


def main() -> None:
    from bmi_server.private_files import restrict_umask

    restrict_umask()  # nothing this daemon (or a tool it runs) writes is others' to read
    try:
        cli(standalone_mode=True)
    except BmiError as exc:
        print(f"bmi-gateway: {exc.message}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

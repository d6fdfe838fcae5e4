"""The ``bmi`` command line: images, disks, snapshots, nodes and quotas on a BMI server."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any, NoReturn

import click
import grpc
from bmi.v1 import disks_pb2, images_pb2
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from bmi_client.client import BmiClient
from bmi_client.config import ConfigError, load_config

FORMATS = {"raw": images_pb2.IMAGE_FORMAT_RAW, "qcow2": images_pb2.IMAGE_FORMAT_QCOW2}


class CliError(click.ClickException):
    """A failure reported as one ``error: ...`` line on stderr, exit code 1."""

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def rpc_error_message(error: grpc.RpcError) -> str:
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else None
    name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    # Keep it on one line whatever the server put in the message.
    text = " ".join(str(details or "").split())
    return f"{name}: {text}" if text else name


class _Root(click.Group):
    """Turns expected failures anywhere below into one-line errors, never tracebacks."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except grpc.RpcError as e:
            raise CliError(rpc_error_message(e)) from None
        except ConfigError as e:
            raise CliError(str(e)) from None
        except OSError as e:
            raise CliError(f"{e.filename or ''}: {e.strerror or e}".lstrip(": ")) from None


@dataclass
class State:
    server: str | None
    token: str | None
    as_json: bool
    user: str | None = None
    project: str | None = None
    tls: bool = False
    tls_files: dict[str, str | None] = field(default_factory=dict)
    timeout: float | None = None  # seconds per call, retries included (None: the client's)
    _client: BmiClient | None = field(default=None, repr=False)

    def client(self) -> BmiClient:
        # Built lazily so that --help and usage errors need neither server nor token.
        if self._client is None:
            cfg = load_config(
                self.server,
                self.token,
                user=self.user,
                project=self.project,
                tls=self.tls,
                tls_files=self.tls_files,
            )
            transport: dict[str, Any] = {
                "tls": cfg.tls,
                "ca_file": cfg.ca_file,
                "cert_file": cfg.cert_file,
                "key_file": cfg.key_file,
            }
            if self.timeout is not None:
                transport["timeout"] = self.timeout
            if cfg.token:
                self._client = BmiClient(
                    cfg.server, cfg.token, project=cfg.project or "", **transport
                )
            elif cfg.user and cfg.password:
                self._client = BmiClient(
                    cfg.server,
                    user=cfg.user,
                    password=cfg.password,
                    project=cfg.project or "",
                    **transport,
                )
            else:
                raise CliError(
                    "no token: pass --token, set BMI_TOKEN, or set token/token_file "
                    "in ~/.config/bmi/client.toml (or $BMI_CONFIG); with HIL, give "
                    "--user (BMI_USER) and BMI_PASSWORD instead"
                )
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


pass_state = click.make_pass_decorator(State)


# -- rendering --------------------------------------------------------------------


def human_size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            break
    return f"{value:.1f} {unit}"


def short_enum(msg: Message, field_name: str) -> str:
    """VISIBILITY_PUBLIC -> public, RESOURCE_STATE_READY -> ready."""
    enum = msg.DESCRIPTOR.fields_by_name[field_name].enum_type
    number = getattr(msg, field_name)
    value = enum.values_by_number.get(number)
    if value is None:
        return str(number)
    prefix = enum.values_by_number[0].name.removesuffix("UNSPECIFIED")
    return value.name.removeprefix(prefix).lower()


def timestamp(msg: Message) -> str:
    if not msg.HasField("create_time"):
        return "-"
    ts = msg.create_time.ToDatetime(tzinfo=UTC)
    return ts.strftime("%Y-%m-%d %H:%M:%SZ")


def to_dict(msg: Message) -> dict[str, Any]:
    # Print every field, so scripts see the same keys whether a value is default or not.
    return MessageToDict(
        msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _image_row(img: images_pb2.Image) -> list[str]:
    return [
        img.id,
        img.name,
        img.project,
        short_enum(img, "visibility"),
        short_enum(img, "kind"),
        short_enum(img, "state"),
        human_size(img.size_bytes),
    ]


# No CREATED column in lists: it made rows wrap on 80-column terminals; `show` has it.
IMAGE_COLUMNS = ["ID", "NAME", "PROJECT", "VISIBILITY", "KIND", "STATE", "SIZE"]
DISK_COLUMNS = ["ID", "NAME", "PROJECT", "IMAGE", "STATE", "SIZE"]
# Enough for the longest short enum value / size, so they do not wrap mid-word.
MIN_WIDTH = {"NAME": 8, "PROJECT": 7, "IMAGE": 8, "VISIBILITY": 7, "KIND": 8, "STATE": 8,
             "SIZE": 9}


def _disk_row(disk: disks_pb2.Disk) -> list[str]:
    image = disk.image_name or disk.image_id
    return [
        disk.id,
        disk.name,
        disk.project,
        image,
        short_enum(disk, "state"),
        human_size(disk.size_bytes),
    ]


def _image_details(img: images_pb2.Image) -> list[tuple[str, str]]:
    rows = list(zip([c.lower() for c in IMAGE_COLUMNS], _image_row(img), strict=True))
    rows += [("source", img.source or "-"), ("created", timestamp(img))]
    rows.append(("sha256", img.content_sha256 or "-"))
    if img.file_digest:
        rows.append(("file digest", img.file_digest))
    if img.state == images_pb2.RESOURCE_STATE_CREATING and img.source.startswith("http"):
        total = human_size(img.fetch_total_bytes) if img.fetch_total_bytes else "?"
        rows.append(("fetched", f"{human_size(img.fetched_bytes)} of {total}"))
    rows += _missing_note(img)
    if img.rbd_name:
        rows.append(("rbd name", img.rbd_name))
    return rows


def _disk_details(disk: disks_pb2.Disk) -> list[tuple[str, str]]:
    return [
        ("id", disk.id),
        ("name", disk.name),
        ("project", disk.project),
        ("image", f"{disk.image_name} ({disk.image_id})" if disk.image_name else disk.image_id),
        ("state", short_enum(disk, "state")),
        ("size", human_size(disk.size_bytes)),
        ("used", human_size(disk.used_bytes)),
        ("created", timestamp(disk)),
        *_missing_note(disk),
        *([("rbd name", disk.rbd_name)] if disk.rbd_name else []),
    ]


def _missing_note(msg: Message) -> list[tuple[str, str]]:
    if msg.state != images_pb2.RESOURCE_STATE_MISSING:
        return []
    return [("note", "its data is no longer in the image store: it cannot be used; "
                     "delete it (or an admin restores the data and reconciles)")]


def emit_list(state: State, items: Iterable[Message], columns: Sequence[str], row: Any) -> None:
    items = list(items)
    if state.as_json:
        click.echo(json.dumps([to_dict(m) for m in items], indent=2))
        return
    table = Table(box=None, header_style="bold")
    for col in columns:
        # On a narrow terminal cells wrap rather than vanish, but ids stay copy-pasteable.
        table.add_column(col, no_wrap=col == "ID", overflow="fold", min_width=MIN_WIDTH.get(col))
    for m in items:
        table.add_row(*row(m))
    _stdout().print(table)


def _stdout() -> Console:
    console = Console()
    if not console.is_terminal:
        # Piped output: never wrap, so grep/awk see one line per resource.
        console = Console(width=10_000)
    return console


def emit_one(state: State, msg: Message, details: Any) -> None:
    if state.as_json:
        click.echo(json.dumps(to_dict(msg), indent=2))
        return
    table = Table(box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in details(msg):
        table.add_row(key, value)
    _stdout().print(table)


def emit_deleted(state: State, kind: str, name: str) -> None:
    if state.as_json:
        click.echo(json.dumps({"deleted": kind, "name": name}))
    else:
        click.echo(f"deleted {kind} {name}")


def usage(message: str) -> NoReturn:
    raise click.UsageError(message)


# -- commands ---------------------------------------------------------------------


@click.group(cls=_Root)
@click.option(
    "--server",
    metavar="HOST:PORT[,HOST:PORT...]",
    help="BMI server, or several replicas of it to fail over between (env BMI_SERVER).",
)
@click.option("--token", help="Bearer token (env BMI_TOKEN).")
@click.option("--user", help="HIL user name, with BMI_PASSWORD (env BMI_USER).")
@click.option("--project", "acting_project", help="Project you act in (env BMI_PROJECT).")
@click.option("--json", "as_json", is_flag=True,
              help="Machine-readable JSON output (also accepted after the subcommand).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              metavar="SECONDS", envvar="BMI_TIMEOUT", show_envvar=False,
              help="Give up a call after this long, retries included (env BMI_TIMEOUT; "
                   "default 30).")
@click.option("--tls", is_flag=True, help="TLS with the system's CAs (env BMI_TLS).")
@click.option("--ca-file", type=click.Path(dir_okay=False),
              help="TLS: CA the server's certificate must chain to (env BMI_CA_FILE).")
@click.option("--cert-file", type=click.Path(dir_okay=False),
              help="TLS: client certificate, for mutual TLS (env BMI_CERT_FILE).")
@click.option("--key-file", type=click.Path(dir_okay=False),
              help="TLS: the client certificate's key (env BMI_KEY_FILE).")
@click.pass_context
def cli(
    ctx: click.Context,
    server: str | None,
    token: str | None,
    user: str | None,
    acting_project: str | None,
    as_json: bool,
    timeout: float | None,
    tls: bool,
    ca_file: str | None,
    cert_file: str | None,
    key_file: str | None,
) -> None:
    """Manage BMI golden images, disks, snapshots, nodes and quotas."""
    files = {"ca_file": ca_file, "cert_file": cert_file, "key_file": key_file}
    state = State(server, token, as_json, user, acting_project, tls, files, timeout=timeout)
    ctx.obj = state
    ctx.call_on_close(state.close)


@cli.group()
def image() -> None:
    """Golden images."""


@image.command("import")
@click.argument("name")
@click.option(
    "--file", "path", type=click.Path(exists=True, dir_okay=False), help="Upload a local file."
)
@click.option("--format", "fmt", type=click.Choice(sorted(FORMATS)), help="Default: guessed.")
@click.option(
    "--rbd", "rbd_source", metavar="SOURCE", help="Copy an existing RBD image (not one of BMI's)."
)
@click.option("--url", help="Have the server fetch an http(s) URL (with --sha256 or --sha512).")
@click.option("--sha256", metavar="HEX", help="Expected SHA-256 of the file at --url.")
@click.option("--sha512", metavar="HEX", help="Expected SHA-512 of the file at --url.")
@click.option("--project", default="", help="Owning project (default: yours).")
@click.option("--public", is_flag=True, help="Let every project use the image (admins).")
@pass_state
def image_import(
    state: State,
    name: str,
    path: str | None,
    fmt: str | None,
    rbd_source: str | None,
    url: str | None,
    sha256: str | None,
    sha512: str | None,
    project: str,
    public: bool,
) -> None:
    """Import image NAME from a local file, an RBD image or a URL."""
    if sum(map(bool, (path, rbd_source, url))) != 1:
        usage("give exactly one of --file, --rbd or --url")
    if fmt and rbd_source:
        usage("--format applies to --file and --url")
    if (sha256 or sha512) and not url:
        usage("--sha256 and --sha512 go with --url")
    if url and bool(sha256) == bool(sha512):
        usage("--url needs the file's digest: exactly one of --sha256 or --sha512")
    visibility = images_pb2.VISIBILITY_PUBLIC if public else images_pb2.VISIBILITY_PRIVATE
    client = state.client()
    if rbd_source:
        img = client.import_image(name, rbd_source, project=project, visibility=visibility)
    elif url:
        digest = f"sha256:{sha256}" if sha256 else f"sha512:{sha512}"
        img = _fetch_with_progress(client, name, url, digest, fmt, project, visibility)
    else:
        assert path is not None
        img = _upload_with_progress(client, path, name, fmt, project, visibility)
    emit_one(state, img, _image_details)


def _progress_bar() -> Progress:
    # Progress goes to stderr so that --json output on stdout stays parseable.
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )


def _fetch_with_progress(
    client: BmiClient,
    name: str,
    url: str,
    digest: str,
    fmt: str | None,
    project: str,
    visibility: images_pb2.Visibility.ValueType,
) -> images_pb2.Image:
    """The import call blocks until the server has the file; meanwhile the image's record
    (CREATING) says how many bytes the server fetched, read here once a second."""
    progress = _progress_bar()
    done = threading.Event()

    def watch(task: Any) -> None:
        while not done.wait(1.0):
            try:
                img = client.get_image(name)
            except grpc.RpcError:
                continue  # not recorded yet, or a moment's outage
            if img.state == images_pb2.RESOURCE_STATE_CREATING:
                progress.update(task, completed=img.fetched_bytes,
                                total=img.fetch_total_bytes or None)

    with progress:
        task = progress.add_task(f"fetching {name}", total=None)
        watcher = threading.Thread(target=watch, args=(task,), daemon=True)
        watcher.start()
        try:
            return client.import_image_from_url(
                name, url, digest,
                format=FORMATS[fmt] if fmt else images_pb2.IMAGE_FORMAT_UNSPECIFIED,
                project=project, visibility=visibility,
            )
        finally:
            done.set()
            watcher.join(timeout=2)


def _upload_with_progress(
    client: BmiClient,
    path: str,
    name: str,
    fmt: str | None,
    project: str,
    visibility: images_pb2.Visibility.ValueType,
) -> images_pb2.Image:
    progress = _progress_bar()
    with progress:
        task = progress.add_task(f"uploading {name}", total=None)
        return client.upload_image(
            path,
            name,
            format=FORMATS[fmt] if fmt else None,
            project=project,
            visibility=visibility,
            progress_callback=lambda sent, total: progress.update(
                task, completed=sent, total=total
            ),
        )


@image.command("ls")
@click.option("--project", default="", help="Only this project's images.")
@pass_state
def image_ls(state: State, project: str) -> None:
    """List images."""
    emit_list(state, state.client().list_images(project=project), IMAGE_COLUMNS, _image_row)


@image.command("show")
@click.argument("image")
@pass_state
def image_show(state: State, image: str) -> None:
    """Show IMAGE (id or name)."""
    emit_one(state, state.client().get_image(image), _image_details)


@image.command("verify")
@click.argument("image")
@pass_state
def image_verify(state: State, image: str) -> None:
    """Read IMAGE back from the store and check its recorded SHA-256 (exit 1 if not)."""
    result = state.client().verify_image(image)
    if state.as_json:
        click.echo(json.dumps(to_dict(result), indent=2))
    else:
        click.echo(f"recorded sha256: {result.recorded_sha256 or '-'}")
        click.echo(f"computed sha256: {result.computed_sha256}")
        click.echo("ok: the content is as recorded" if result.matches
                   else f"MISMATCH: {result.detail}")
    if not result.matches:
        raise SystemExit(1)


@image.command("rm")
@click.argument("image")
@pass_state
def image_rm(state: State, image: str) -> None:
    """Delete IMAGE."""
    state.client().delete_image(image)
    emit_deleted(state, "image", image)


@image.command("cp")
@click.argument("image")
@click.option("--to-project", required=True, help="Project that will own the copy.")
@click.option("--name", default="", help="Name of the copy (default: the source's).")
@pass_state
def image_cp(state: State, image: str, to_project: str, name: str) -> None:
    """Copy IMAGE into another project."""
    emit_one(state, state.client().copy_image(image, to_project, name), _image_details)


@image.command("mv")
@click.argument("image")
@click.argument("new_name")
@pass_state
def image_mv(state: State, image: str, new_name: str) -> None:
    """Rename IMAGE to NEW_NAME."""
    emit_one(state, state.client().update_image(image, name=new_name), _image_details)


@image.command("set")
@click.argument("image")
@click.option("--public/--private", "public", default=None, help="Change visibility.")
@pass_state
def image_set(state: State, image: str, public: bool | None) -> None:
    """Change IMAGE's visibility."""
    if public is None:
        usage("nothing to change: give --public or --private")
    visibility = images_pb2.VISIBILITY_PUBLIC if public else images_pb2.VISIBILITY_PRIVATE
    emit_one(state, state.client().update_image(image, visibility=visibility), _image_details)


@cli.group()
def disk() -> None:
    """Disks: copy-on-write clones of images."""


@disk.command("create")
@click.argument("name")
@click.option("--image", required=True, help="Image id or name to clone.")
@click.option("--project", default="", help="Owning project (default: yours).")
@pass_state
def disk_create(state: State, name: str, image: str, project: str) -> None:
    """Create disk NAME cloned from --image."""
    emit_one(state, state.client().create_disk(name, image, project), _disk_details)


@disk.command("ls")
@click.option("--project", default="", help="Only this project's disks.")
@click.option("--image", default="", help="Only disks cloned from this image.")
@pass_state
def disk_ls(state: State, project: str, image: str) -> None:
    """List disks."""
    disks = state.client().list_disks(project=project, image=image)
    emit_list(state, disks, DISK_COLUMNS, _disk_row)


@disk.command("show")
@click.argument("disk")
@pass_state
def disk_show(state: State, disk: str) -> None:
    """Show DISK (id or name), with its allocated size."""
    emit_one(state, state.client().get_disk(disk), _disk_details)


@disk.command("rm")
@click.argument("disk")
@pass_state
def disk_rm(state: State, disk: str) -> None:
    """Delete DISK."""
    state.client().delete_disk(disk)
    emit_deleted(state, "disk", disk)


@cli.group()
def snapshot() -> None:
    """Snapshots of disks, saved as images."""


@snapshot.command("create")
@click.argument("disk")
@click.argument("image_name")
@pass_state
def snapshot_create(state: State, disk: str, image_name: str) -> None:
    """Snapshot DISK into a new image IMAGE_NAME."""
    emit_one(state, state.client().snapshot_disk(disk, image_name), _image_details)


# Registered last: the node and quota commands reuse the rendering helpers above.
from bmi_client.node_cli import node  # noqa: E402
from bmi_client.quota_cli import quota  # noqa: E402

cli.add_command(node)
cli.add_command(quota)


def _json_here(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        ctx.find_object(State).as_json = True


def _accept_json_after(group: click.Group) -> None:
    """``bmi image ls --json`` as well as ``bmi --json image ls``: every subcommand
    takes --json too."""
    for command in group.commands.values():
        if isinstance(command, click.Group):
            _accept_json_after(command)
        else:
            command.params.append(click.Option(
                ["--json"], is_flag=True, expose_value=False, callback=_json_here,
                help="Machine-readable JSON output."))


_accept_json_after(cli)


def main() -> None:
    cli(prog_name="bmi")

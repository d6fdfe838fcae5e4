#!/usr/bin/env python3
"""Generate docs/api.md, the bmi.v1 API reference, from the comments in proto/bmi/v1/*.proto.

    python tools/gen_api_docs.py -o docs/api.md     # what `make docs` runs
    python tools/gen_api_docs.py --check docs/api.md  # exit 1 if the file is stale

The protos are compiled with grpc_tools' protoc into a FileDescriptorSet with source info
(comments and their positions), so the reference says exactly what the .proto files say.
Output is deterministic: the same protos give the same bytes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from google.protobuf import descriptor_pb2 as pb
from grpc_tools import protoc

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "proto"
PACKAGE_DIR = PROTO_ROOT / "bmi" / "v1"

# Field numbers in descriptor.proto, for SourceCodeInfo paths.
_FILE_PACKAGE, _FILE_MESSAGE, _FILE_ENUM, _FILE_SERVICE = 2, 4, 5, 6
_MSG_FIELD, _MSG_NESTED, _MSG_ENUM, _MSG_ONEOF = 2, 3, 4, 8
_ENUM_VALUE = 2
_SERVICE_METHOD = 2

_SCALARS = {
    value: name.removeprefix("TYPE_").lower()
    for name, value in pb.FieldDescriptorProto.Type.items()
    if name not in ("TYPE_MESSAGE", "TYPE_ENUM", "TYPE_GROUP")
}


def load(proto_files: list[Path]) -> pb.FileDescriptorSet:
    """Compile the protos into a descriptor set with comments."""
    include = resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "api.binpb"
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            *(str(p.relative_to(PROTO_ROOT)) for p in proto_files),
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        return pb.FileDescriptorSet.FromString(out.read_bytes())


class Comments:
    """The comment attached to each element of one file, by its SourceCodeInfo path."""

    def __init__(self, file: pb.FileDescriptorProto) -> None:
        self._by_path = {
            tuple(loc.path): loc for loc in file.source_code_info.location
        }

    def lines(self, *path: int) -> list[str]:
        loc = self._by_path.get(tuple(path))
        if loc is None:
            return []
        text = loc.leading_comments
        if loc.trailing_comments.strip():
            text = text.rstrip("\n") + "\n" + loc.trailing_comments
        lines = [line[1:] if line.startswith(" ") else line for line in text.split("\n")]
        while lines and not lines[-1].strip():
            lines.pop()
        while lines and not lines[0].strip():
            lines.pop(0)
        return [line.rstrip() for line in lines]

    def block(self, *path: int) -> str:
        """The comment as Markdown paragraphs (line breaks kept)."""
        return "\n".join(self.lines(*path))

    def cell(self, *path: int) -> str:
        """The comment on one line, for a table cell."""
        paragraphs: list[str] = []
        current: list[str] = []
        for line in [*self.lines(*path), ""]:
            if line.strip():
                current.append(line.strip())
            elif current:
                paragraphs.append(" ".join(current))
                current = []
        return "<br><br>".join(paragraphs).replace("|", "\\|")


def anchor(full_name: str) -> str:
    return full_name.lstrip(".")


def _short(type_name: str) -> str:
    return type_name.rsplit(".", 1)[-1]


def type_link(type_name: str, package: str) -> str:
    """A message or enum type, linked when it is documented here."""
    name = type_name.lstrip(".")
    if name.startswith(package + "."):
        return f"[{name.removeprefix(package + '.')}](#{anchor(name)})"
    return f"`{name}`"


def walk_messages(
    messages: list[pb.DescriptorProto], path: tuple[int, ...], prefix: str
) -> Iterator[tuple[pb.DescriptorProto, tuple[int, ...], str]]:
    """Every message, nested ones after their parent, with its path and dotted name."""
    for i, message in enumerate(messages):
        here = (*path, i)
        name = f"{prefix}{message.name}"
        if message.options.map_entry:
            continue
        yield message, here, name
        yield from walk_messages(list(message.nested_type), (*here, _MSG_NESTED), name + ".")


def walk_enums(
    file: pb.FileDescriptorProto,
) -> Iterator[tuple[pb.EnumDescriptorProto, tuple[int, ...], str]]:
    for i, enum in enumerate(file.enum_type):
        yield enum, (_FILE_ENUM, i), enum.name
    for message, path, name in walk_messages(list(file.message_type), (_FILE_MESSAGE,), ""):
        for i, enum in enumerate(message.enum_type):
            yield enum, (*path, _MSG_ENUM, i), f"{name}.{enum.name}"


class Renderer:
    def __init__(self, files: list[pb.FileDescriptorProto], package: str) -> None:
        self.files = files
        self.package = package
        self.maps = {f".{package}.{m.name}": m for f in files for m in _map_entries(f)}
        self.out: list[str] = []

    def emit(self, *lines: str) -> None:
        self.out.extend(lines)

    def field_type(self, field: pb.FieldDescriptorProto) -> str:
        if field.type_name in self.maps:
            entry = self.maps[field.type_name]
            key, value = entry.field[0], entry.field[1]
            return f"map<{self.scalar_or_link(key)}, {self.scalar_or_link(value)}>"
        base = self.scalar_or_link(field)
        if field.label == pb.FieldDescriptorProto.LABEL_REPEATED:
            return f"repeated {base}"
        if field.proto3_optional:
            return f"optional {base}"
        return base

    def scalar_or_link(self, field: pb.FieldDescriptorProto) -> str:
        if field.type in (pb.FieldDescriptorProto.TYPE_MESSAGE, pb.FieldDescriptorProto.TYPE_ENUM):
            return type_link(field.type_name, self.package)
        return f"`{_SCALARS[field.type]}`"

    def render(self) -> str:
        package_comment = ""
        for f in self.files:
            package_comment = package_comment or Comments(f).block(_FILE_PACKAGE)
        self.emit(
            f"# {self.package} API reference",
            "",
            "<!-- Generated by tools/gen_api_docs.py from proto/bmi/v1/*.proto (`make docs`)."
            " Do not edit: change the proto comments and regenerate. -->",
            "",
        )
        if package_comment:
            self.emit(package_comment, "")
        self.emit(
            "Calls carry their credentials in gRPC metadata: `authorization: Bearer <token>` "
            "unless a service below says otherwise. Errors are gRPC status codes with a "
            "one-line message.",
            "",
            "## Contents",
            "",
        )
        for f in self.files:
            for service in f.service:
                self.emit(f"- [{service.name}](#{self.package}.{service.name})")
        for f in self.files:
            self.emit(f"- [Types in `{f.name}`](#{f.name})")
        self.emit("")
        for f in self.files:
            comments = Comments(f)
            for i, service in enumerate(f.service):
                self.service(service, comments, (_FILE_SERVICE, i), f.name)
        for f in self.files:
            self.types(f)
        return "\n".join(self.out).rstrip("\n") + "\n"

    def service(
        self, service: pb.ServiceDescriptorProto, comments: Comments, path: tuple[int, ...],
        file_name: str,
    ) -> None:
        full = f"{self.package}.{service.name}"
        self.emit(f'<a id="{full}"></a>', "", f"## {service.name}", "")
        self.emit(f"Defined in `{file_name}`.", "")
        if comments.block(*path):
            self.emit(comments.block(*path), "")
        for i, method in enumerate(service.method):
            request, response = _short(method.input_type), _short(method.output_type)
            signature = (
                f"rpc {method.name}({'stream ' if method.client_streaming else ''}{request})"
                f" returns ({'stream ' if method.server_streaming else ''}{response})"
            )
            self.emit(
                f'<a id="{full}.{method.name}"></a>',
                "",
                f"### {service.name}.{method.name}",
                "",
                f"`{signature}`",
                "",
            )
            text = comments.block(*path, _SERVICE_METHOD, i)
            if method.options.deprecated:
                text = "**Deprecated.** " + text
            if text:
                self.emit(text, "")
            self.emit(
                f"Request: {type_link(method.input_type, self.package)}"
                f"{' (a stream)' if method.client_streaming else ''}."
                f" Response: {type_link(method.output_type, self.package)}"
                f"{' (a stream)' if method.server_streaming else ''}.",
                "",
            )

    def types(self, file: pb.FileDescriptorProto) -> None:
        comments = Comments(file)
        self.emit(f'<a id="{file.name}"></a>', "", f"## Types in `{file.name}`", "")
        for message, path, name in walk_messages(list(file.message_type), (_FILE_MESSAGE,), ""):
            self.message(message, comments, path, name)
        for enum, path, name in walk_enums(file):
            self.enum(enum, comments, path, name)

    def message(
        self, message: pb.DescriptorProto, comments: Comments, path: tuple[int, ...], name: str
    ) -> None:
        self.emit(f'<a id="{self.package}.{name}"></a>', "", f"### {name}", "")
        if comments.block(*path):
            self.emit(comments.block(*path), "")
        if not message.field:
            self.emit("No fields.", "")
            return
        self.emit("| Field | Type | Number | Description |", "|---|---|---|---|")
        for i, field in enumerate(message.field):
            text = comments.cell(*path, _MSG_FIELD, i)
            if field.HasField("oneof_index") and not field.proto3_optional:
                oneof = message.oneof_decl[field.oneof_index].name
                text = f"One of `{oneof}`. {text}".rstrip()
            if field.options.deprecated:
                text = f"**Deprecated.** {text}".rstrip()
            self.emit(f"| `{field.name}` | {self.field_type(field)} | {field.number} | {text} |")
        self.emit("")
        for i, oneof in enumerate(message.oneof_decl):
            members = [f.name for f in message.field
                       if f.HasField("oneof_index") and f.oneof_index == i
                       and not f.proto3_optional]
            if not members:
                continue
            text = comments.cell(*path, _MSG_ONEOF, i)
            listed = ", ".join(f"`{m}`" for m in members)
            line = f"Oneof `{oneof.name}`: at most one of {listed} is set."
            self.emit(f"{line} {text}" if text else line, "")

    def enum(
        self, enum: pb.EnumDescriptorProto, comments: Comments, path: tuple[int, ...], name: str
    ) -> None:
        self.emit(f'<a id="{self.package}.{name}"></a>', "", f"### {name} (enum)", "")
        if comments.block(*path):
            self.emit(comments.block(*path), "")
        self.emit("| Value | Number | Description |", "|---|---|---|")
        for i, value in enumerate(enum.value):
            text = comments.cell(*path, _ENUM_VALUE, i)
            self.emit(f"| `{value.name}` | {value.number} | {text} |")
        self.emit("")


def _map_entries(file: pb.FileDescriptorProto) -> Iterator[pb.DescriptorProto]:
    """Map entry messages, renamed to their dotted name within the package."""

    def visit(messages: list[pb.DescriptorProto], prefix: str) -> Iterator[pb.DescriptorProto]:
        for message in messages:
            for nested in message.nested_type:
                if nested.options.map_entry:
                    entry = pb.DescriptorProto()
                    entry.CopyFrom(nested)
                    entry.name = f"{prefix}{message.name}.{nested.name}"
                    yield entry
            yield from visit(list(message.nested_type), f"{prefix}{message.name}.")

    yield from visit(list(file.message_type), "")


# Reading order: the resources first, the agent's service last.
FILE_ORDER = ["images.proto", "disks.proto", "nodes.proto", "inventory.proto", "boot.proto"]


def ordered(paths: list[Path]) -> list[Path]:
    def key(p: Path) -> tuple[int, str]:
        return (FILE_ORDER.index(p.name) if p.name in FILE_ORDER else len(FILE_ORDER), p.name)

    return sorted(paths, key=key)


def generate() -> str:
    protos = ordered(list(PACKAGE_DIR.glob("*.proto")))
    descriptors = load(protos)
    wanted = {str(p.relative_to(PROTO_ROOT)) for p in protos}
    by_name = {f.name: f for f in descriptors.file if f.name in wanted}
    files = [by_name[str(p.relative_to(PROTO_ROOT))] for p in protos]
    return Renderer(files, files[0].package).render()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-o", "--output", help="write here (default: stdout)")
    group.add_argument("--check", metavar="PATH", help="exit 1 if PATH is not up to date")
    args = parser.parse_args()
    text = generate()
    if args.check:
        current = Path(args.check).read_text() if Path(args.check).exists() else ""
        if current != text:
            print(f"{args.check} is out of date: run `make docs`", file=sys.stderr)
            return 1
        return 0
    if args.output:
        path = Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

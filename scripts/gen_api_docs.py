"""Generates docs/api.md, the API reference, from the proto files.

protoc (from grpcio-tools) compiles ``proto/hitl/v1/*.proto`` into a
descriptor set with source info; the comments come from ``SourceCodeInfo``.
The output depends only on the proto files, so it is stable across runs and
machines. Every service, RPC, message, field, oneof, enum and enum value must
have a comment: the script lists the ones that do not and exits 1.

Usage (from the repository root, with the project's virtualenv)::

    .venv/bin/python scripts/gen_api_docs.py              # writes docs/api.md
    .venv/bin/python scripts/gen_api_docs.py --out FILE   # writes FILE ('-' for stdout)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from google.protobuf import descriptor_pb2
from grpc_tools import protoc  # type: ignore[import-untyped]  # ships no type hints

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTO_GLOB = "hitl/v1/*.proto"
DEFAULT_OUT = ROOT / "docs" / "api.md"

# Field numbers inside descriptor.proto that SourceCodeInfo paths use.
FILE_MESSAGE, FILE_ENUM, FILE_SERVICE, FILE_SYNTAX = 4, 5, 6, 12
MESSAGE_FIELD, MESSAGE_NESTED, MESSAGE_ENUM, MESSAGE_ONEOF = 2, 3, 4, 8
ENUM_VALUE, SERVICE_METHOD = 2, 2

FDP = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    FDP.TYPE_DOUBLE: "double",
    FDP.TYPE_FLOAT: "float",
    FDP.TYPE_INT64: "int64",
    FDP.TYPE_UINT64: "uint64",
    FDP.TYPE_INT32: "int32",
    FDP.TYPE_FIXED64: "fixed64",
    FDP.TYPE_FIXED32: "fixed32",
    FDP.TYPE_BOOL: "bool",
    FDP.TYPE_STRING: "string",
    FDP.TYPE_BYTES: "bytes",
    FDP.TYPE_UINT32: "uint32",
    FDP.TYPE_SFIXED32: "sfixed32",
    FDP.TYPE_SFIXED64: "sfixed64",
    FDP.TYPE_SINT32: "sint32",
    FDP.TYPE_SINT64: "sint64",
}
_EXTERNAL_DOCS = {
    ".google.protobuf.Timestamp": "https://protobuf.dev/reference/protobuf/google.protobuf/#timestamp",
}


def compile_protos(files: Sequence[str]) -> descriptor_pb2.FileDescriptorSet:
    """Runs protoc; returns the descriptor set with comments (no imports)."""
    well_known = resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "descriptors.binpb"
        code = protoc.main(
            [
                "protoc",
                f"-I{PROTO_ROOT}",
                f"-I{well_known}",
                "--include_source_info",
                f"--descriptor_set_out={out}",
                *files,
            ]
        )
        if code != 0:
            raise SystemExit(f"protoc failed with exit code {code}")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


@dataclass
class Comments:
    """Comments of one file by SourceCodeInfo path; records elements without one."""

    by_path: dict[tuple[int, ...], str]
    missing: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, file: descriptor_pb2.FileDescriptorProto) -> Comments:
        by_path: dict[tuple[int, ...], str] = {}
        for location in file.source_code_info.location:
            text = location.leading_comments or location.trailing_comments
            if text.strip():
                by_path[tuple(location.path)] = _clean(text)
        return cls(by_path)

    def get(self, path: Iterable[int], what: str) -> str:
        text = self.by_path.get(tuple(path), "")
        if not text:
            self.missing.append(what)
        return text


def _clean(comment: str) -> str:
    lines = [line[1:] if line.startswith(" ") else line for line in comment.splitlines()]
    while lines and not lines[-1].strip():
        lines.pop()
    return "\n".join(line.rstrip() for line in lines).strip("\n")


def _cell(text: str) -> str:
    """A comment as one Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def _anchor(name: str) -> str:
    return name.lower().replace(".", "")


class Renderer:
    """Markdown for one package's files."""

    def __init__(self, files: Sequence[descriptor_pb2.FileDescriptorProto]) -> None:
        self.files = files
        self.missing: list[str] = []
        self.local = {  # full type name -> name within the package (the heading)
            f".{file.package}.{name}": name
            for file in files
            for name in _type_names(file.message_type, file.enum_type, "")
        }
        self.maps = {
            f".{file.package}.{name}": entry
            for file in files
            for name, entry in _map_entries(file.message_type, "")
        }

    def type_of(self, f: descriptor_pb2.FieldDescriptorProto) -> str:
        if f.type in _SCALARS:
            return f"`{_SCALARS[f.type]}`"
        entry = self.maps.get(f.type_name)
        if entry is not None:
            key, value = entry.field[0], entry.field[1]
            if value.type in _SCALARS:
                return f"`map<{_SCALARS[key.type]}, {_SCALARS[value.type]}>`"
            return f"`map<{_SCALARS[key.type]},` {self.type_of(value)}`>`"
        return self.link(f.type_name)

    def link(self, type_name: str) -> str:
        if type_name in self.local:
            name = self.local[type_name]
            return f"[`{name}`](#{_anchor(name)})"
        if type_name in _EXTERNAL_DOCS:
            return f"[`{type_name.lstrip('.')}`]({_EXTERNAL_DOCS[type_name]})"
        return f"`{type_name.lstrip('.')}`"

    def render(self) -> str:
        out: list[str] = [
            "# hitl.v1 API reference",
            "",
            "<!-- Generated by scripts/gen_api_docs.py from proto/; do not edit. "
            "Run `make docs` after changing the proto. -->",
            "",
        ]
        services: list[str] = []
        messages: list[str] = []
        enums: list[str] = []
        for file in self.files:
            comments = Comments.of(file)
            intro = comments.by_path.get((FILE_SYNTAX,), "")
            out += [f"Package `{file.package}`, file `proto/{file.name}`.", ""]
            if intro:
                out += [intro, ""]
            for i, service in enumerate(file.service):
                services += self._service(file, service, comments, (FILE_SERVICE, i))
            for i, message in enumerate(file.message_type):
                messages += self._message(message, comments, (FILE_MESSAGE, i), "")
            for i, enum in enumerate(file.enum_type):
                enums += self._enum(enum, comments, (FILE_ENUM, i), "")
            self.missing += [f"{file.name}: {what}" for what in comments.missing]
        out += ["## Contents", ""]
        out += ["- [Services](#services)", "- [Messages](#messages)", "- [Enums](#enums)", ""]
        out += ["## Services", "", *services, "## Messages", "", *messages, "## Enums", "", *enums]
        return "\n".join(out).rstrip("\n") + "\n"

    def _service(
        self,
        file: descriptor_pb2.FileDescriptorProto,
        service: descriptor_pb2.ServiceDescriptorProto,
        comments: Comments,
        path: tuple[int, ...],
    ) -> list[str]:
        full = f"{file.package}.{service.name}"
        out = [f"### {service.name}", "", comments.get(path, f"service {full}"), ""]
        out += ["| RPC | Request | Response |", "| --- | --- | --- |"]
        for method in service.method:
            stream_in = "stream " if method.client_streaming else ""
            stream_out = "stream " if method.server_streaming else ""
            out.append(
                f"| [`{method.name}`](#{_anchor(service.name + method.name)}) "
                f"| {stream_in}{self.link(method.input_type)} "
                f"| {stream_out}{self.link(method.output_type)} |"
            )
        out.append("")
        for i, method in enumerate(service.method):
            text = comments.get((*path, SERVICE_METHOD, i), f"rpc {full}.{method.name}")
            out += [
                f'<a id="{_anchor(service.name + method.name)}"></a>',
                "",
                f"#### {service.name}.{method.name}",
                "",
                f"`rpc {method.name}({'stream ' if method.client_streaming else ''}"
                f"{method.input_type.rsplit('.', 1)[-1]}) returns "
                f"({'stream ' if method.server_streaming else ''}"
                f"{method.output_type.rsplit('.', 1)[-1]})`",
                "",
                text,
                "",
            ]
        return out

    def _message(
        self,
        message: descriptor_pb2.DescriptorProto,
        comments: Comments,
        path: tuple[int, ...],
        prefix: str,
    ) -> list[str]:
        if message.options.map_entry:
            return []  # map<K, V> fields are shown as such
        name = f"{prefix}{message.name}"
        out = [f"### {name}", "", comments.get(path, f"message {name}"), ""]
        if message.field:
            out += [
                "| Field | Number | Type | Label | Description |",
                "| --- | --- | --- | --- | --- |",
            ]
        for i, f in enumerate(message.field):
            text = comments.get((*path, MESSAGE_FIELD, i), f"field {name}.{f.name}")
            out.append(
                f"| `{f.name}` | {f.number} | {self.type_of(f)} | {self._label(message, f)} "
                f"| {_cell(text)} |"
            )
        real_oneofs = [
            (i, o)
            for i, o in enumerate(message.oneof_decl)
            if not any(f.proto3_optional and f.oneof_index == i for f in message.field)
        ]
        if real_oneofs:
            out.append("")
            for i, oneof in real_oneofs:
                text = comments.get((*path, MESSAGE_ONEOF, i), f"oneof {name}.{oneof.name}")
                members = ", ".join(
                    f"`{f.name}`"
                    for f in message.field
                    if f.HasField("oneof_index") and f.oneof_index == i
                )
                out.append(f"- oneof `{oneof.name}` ({members}): {_cell(text)}")
        out.append("")
        for i, nested in enumerate(message.nested_type):
            out += self._message(nested, comments, (*path, MESSAGE_NESTED, i), f"{name}.")
        for i, enum in enumerate(message.enum_type):
            out += self._enum(enum, comments, (*path, MESSAGE_ENUM, i), f"{name}.")
        return out

    def _label(
        self, message: descriptor_pb2.DescriptorProto, f: descriptor_pb2.FieldDescriptorProto
    ) -> str:
        if f.type_name in self.maps:
            return ""
        if f.label == FDP.LABEL_REPEATED:
            return "repeated"
        if f.proto3_optional:
            return "optional"
        if f.HasField("oneof_index"):
            return f"oneof `{message.oneof_decl[f.oneof_index].name}`"
        return ""

    def _enum(
        self,
        enum: descriptor_pb2.EnumDescriptorProto,
        comments: Comments,
        path: tuple[int, ...],
        prefix: str,
    ) -> list[str]:
        name = f"{prefix}{enum.name}"
        out = [f"### {name}", "", comments.get(path, f"enum {name}"), ""]
        out += ["| Name | Number | Description |", "| --- | --- | --- |"]
        for i, value in enumerate(enum.value):
            text = comments.get((*path, ENUM_VALUE, i), f"enum value {name}.{value.name}")
            out.append(f"| `{value.name}` | {value.number} | {_cell(text)} |")
        return [*out, ""]


def _type_names(
    messages: Iterable[descriptor_pb2.DescriptorProto],
    enums: Iterable[descriptor_pb2.EnumDescriptorProto],
    prefix: str,
) -> Iterable[str]:
    for enum in enums:
        yield f"{prefix}{enum.name}"
    for message in messages:
        yield f"{prefix}{message.name}"
        yield from _type_names(message.nested_type, message.enum_type, f"{prefix}{message.name}.")


def _map_entries(
    messages: Iterable[descriptor_pb2.DescriptorProto], prefix: str
) -> Iterable[tuple[str, descriptor_pb2.DescriptorProto]]:
    for message in messages:
        if message.options.map_entry:
            yield f"{prefix}{message.name}", message
        yield from _map_entries(message.nested_type, f"{prefix}{message.name}.")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate the API reference from the proto.")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output file, '-' for stdout")
    args = parser.parse_args(argv)
    files = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.glob(PROTO_GLOB))
    if not files:
        print(f"no proto files match proto/{PROTO_GLOB}", file=sys.stderr)
        return 1
    descriptors = compile_protos(files)
    ours = [f for f in descriptors.file if f.name in files]
    renderer = Renderer(ours)
    text = renderer.render()
    if renderer.missing:
        print("These proto elements have no comment; add one above each:", file=sys.stderr)
        for what in renderer.missing:
            print(f"  {what}", file=sys.stderr)
        return 1
    if args.out == "-":
        sys.stdout.write(text)
    else:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Documents from local files (JSON Lines, text, Parquet) or a hub dataset.

Local files are read by the readers below, not by `datasets`' own: a bad record must be refused
in one line naming its file and line (Arrow's readers fail deep inside with neither), and
`scan_sources` must find every bad record before a stage writes anything. `datasets` still
provides the seeded streaming shuffle: the files are its shards, as with its own readers, so
the document order is the one `datasets` gives for the same files and seed.

A bad record is one that cannot become a document: a line that is not JSON (a cut-off last line,
a binary file), JSON that is not an object, a missing or non-string text (or prompt) field, a
null in a Parquet text column, a text file that is not UTF-8, a file with no records at all.
`data.on_bad_record: error` refuses the first; `skip` leaves them out and counts them.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import DataConfig
from pipeline.errors import ConfigError, InputError
from pipeline.shards import file_sha256

TEXT_CHUNK = 10 << 20  # characters per read of a .txt file in paragraph mode (as `datasets` reads)


class BadRecord(str):
    """Why a record cannot become a document, with its place: "FILE:LINE: what is wrong"."""


def local_files(data: DataConfig, key: str = "data.files") -> list[str]:
    files = []
    for pattern in data.files:
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise ConfigError(f"{key}: no file matches {pattern!r}")
        files.extend(matches)
    return files


@dataclass(frozen=True)
class Group:
    """One of data.read_groups runs of the source's files: what one task reads for its shards."""

    index: int
    files: tuple[str, ...]  # local files; empty for a hub dataset (its data files are chosen by index)
    weight: float  # its share of the budget: the bytes of its files, or its number of hub data files


def split_evenly(count: int, groups: int) -> list[range]:
    """`count` items in `groups` contiguous runs, the first ones one longer: how `datasets` splits a
    dataset's files between the shards of an IterableDataset."""
    size, extra = divmod(count, groups)
    runs, start = [], 0
    for g in range(groups):
        runs.append(range(start, start + size + (g < extra)))
        start = runs[-1].stop
    return runs


def source_groups(data: DataConfig, key: str = "data.files") -> list[Group]:
    """The source cut into data.read_groups groups of whole files, in order (sizes from the file
    system or the hub's file list: nothing is read)."""
    if data.read_groups == 1:
        return [Group(0, tuple(local_files(data, key)) if data.source != "hub" else (), 1.0)]
    files = local_files(data, key) if data.source != "hub" else None
    count = len(files) if files is not None else _hub_stream(data).n_shards
    if data.read_groups > count:
        raise ConfigError(f"data.read_groups: {data.read_groups} groups of {count} files; at most one group per file")
    if files is None:
        return [Group(g, (), len(run)) for g, run in enumerate(split_evenly(count, data.read_groups))]
    return [Group(g, tuple(files[run.start:run.stop]), sum(os.path.getsize(f) for f in files[run.start:run.stop]))
            for g, run in enumerate(split_evenly(count, data.read_groups))]


def source_fingerprint(data: DataConfig) -> dict:
    """What the documents are read from: each file's sha256 (streamed), keyed by its name, or by its
    path below the files' common folder when two names collide; or the hub dataset's name."""
    if data.source == "hub":
        return {"hub": data.hub_name, "config": data.hub_config, "split": data.hub_split}
    files = [Path(f).resolve() for f in local_files(data)]
    names = [f.name for f in files]
    if len(set(names)) < len(names):
        common = Path(os.path.commonpath(files))
        names = [str(f.relative_to(common)) for f in files]
    return {name: file_sha256(f)[:16] for name, f in zip(names, files)}


# ---------------------------------------------------------------- one file -> records


def _json_lines(path: str) -> Iterator[tuple[str, dict | BadRecord]]:
    with open(path, "rb") as f:  # bytes: a binary file must not fail before its first line is named
        for number, line in enumerate(f, 1):
            where = f"{path}:{number}"
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except UnicodeDecodeError:
                yield where, BadRecord(f"{where}: not UTF-8 text (a binary file?)")
                continue
            except json.JSONDecodeError as e:
                cut = "; the line ends without a newline: is the file cut off?" if not line.endswith(b"\n") else ""
                what = e.msg.removesuffix(" starting at")  # "Unterminated string starting at"
                yield where, BadRecord(f"{where}: not valid JSON at column {e.colno}: {what}{cut}")
                continue
            if not isinstance(record, dict):
                yield where, BadRecord(f"{where}: expected a JSON object, got {type(record).__name__}")
                continue
            yield where, record


def _undecodable_line(path: str) -> BadRecord | None:
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return BadRecord(f"{path}:{number}: not UTF-8 text (byte {line[e.start]:#04x} at column {e.start + 1}); "
                                 "a binary file? (the whole file is one bad record)")
    return None


def _text_documents(path: str, sample_by: str) -> Iterator[tuple[str, dict | BadRecord]]:
    """What `datasets`' text reader yields: universal newlines; a line (without its newline), a
    paragraph (split on blank lines, empty ones dropped), or the whole file."""
    bad = _undecodable_line(path)
    if bad:
        yield path, bad
        return
    with open(path, encoding="utf-8") as f:
        if sample_by == "line":
            for number, line in enumerate(f, 1):
                yield f"{path}:{number}", {"text": line.rstrip("\n")}
        elif sample_by == "paragraph":
            pending = ""
            while chunk := f.read(TEXT_CHUNK):
                *paragraphs, pending = (pending + chunk + f.readline()).split("\n\n")
                yield from ((path, {"text": p}) for p in paragraphs if p)
            if pending:
                yield path, {"text": pending}
        else:
            yield path, {"text": f.read()}


def _parquet_rows(path: str, columns: list[str]) -> Iterator[tuple[str, dict | BadRecord]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        yield path, BadRecord(f"{path}: not a Parquet file ({e})")
        return
    schema = table.schema_arrow
    for name in columns:
        if name not in schema.names:
            yield path, BadRecord(f"{path}: no column {name!r} (columns: {', '.join(schema.names)})")
            return
        if not (pa.types.is_string(schema.field(name).type) or pa.types.is_large_string(schema.field(name).type)):
            yield path, BadRecord(f"{path}: column {name!r} holds {schema.field(name).type}, not text")
            return
    row = 0
    for batch in table.iter_batches(columns=columns):
        for record in batch.to_pylist():
            yield f"{path}: row {row}", record
            row += 1


def file_records(path: str, data: DataConfig) -> Iterator[dict | BadRecord]:
    """Every record of one local file in file order: its text (and prompt) fields, or why it is bad."""
    if data.source == "json":
        records = _json_lines(path)
    elif data.source == "text":
        records = _text_documents(path, data.text_sample_by)
    else:
        records = _parquet_rows(path, _fields(data))
    empty = True
    for where, record in records:
        empty = False
        yield record if isinstance(record, BadRecord) else _checked_fields(where, record, data)
    if empty:
        yield BadRecord(f"{path}: no records (an empty file?)")


def _fields(data: DataConfig) -> list[str]:
    return [data.text_field if data.source != "text" else "text"] + ([data.prompt_field] if data.chat_template else [])


def _checked_fields(where: str, record: dict, data: DataConfig) -> dict | BadRecord:
    """The record's text (and prompt) fields if they are strings, else why not."""
    for name in _fields(data):
        if name not in record:
            return BadRecord(f"{where}: no field {name!r} (fields: {', '.join(record) or 'none'})")
        if not isinstance(record[name], str):
            kind = "null" if record[name] is None else type(record[name]).__name__
            return BadRecord(f"{where}: field {name!r} is {kind}, not a string")
    return {name: record[name] for name in _fields(data)}


# ---------------------------------------------------------------- the scan and the stream


@dataclass
class Scan:
    """What one read of every local record found (all zero for a hub dataset, checked as it streams)."""

    skipped: int = 0  # bad records left out (data.on_bad_record: skip)
    documents: int = 0  # good records
    characters: int = 0  # in their text (and prompt) fields
    sample: list[str] = field(default_factory=list)  # the first SAMPLE_PER_FILE texts of each file


SAMPLE_PER_FILE = 16  # documents per file whose characters per token estimate the corpus's tokens


def scan_sources(data: DataConfig, key: str = "data.files", group: Group | None = None) -> Scan:
    """Read every record of the local files (of `group`, else all) once, before anything is written:
    with on_bad_record error, refuse the first bad one; with skip, count them; and measure what the
    good ones hold."""
    scan = Scan()
    if data.source == "hub":
        return scan
    first = None
    for path in group.files if group else local_files(data, key):
        sampled = 0
        for record in file_records(path, data):
            if not isinstance(record, BadRecord):
                scan.documents += 1
                scan.characters += sum(len(record[name]) for name in _fields(data))
                if sampled < SAMPLE_PER_FILE:
                    scan.sample.append(record[_fields(data)[0]])
                    sampled += 1
            elif data.on_bad_record == "error":
                raise InputError(f"{key}: {record} (data.on_bad_record: skip leaves such records out)")
            else:
                scan.skipped, first = scan.skipped + 1, first or record
    if scan.documents == 0:
        where = ", ".join(group.files if group else data.files)
        raise InputError(f"{key}: no readable record in {where}; the first bad one: {first}")
    return scan


def _good_records(files: list[str], data: DataConfig, key: str) -> Iterator[dict]:
    for path in files:
        for record in file_records(path, data):
            if not isinstance(record, BadRecord):
                yield record
            elif data.on_bad_record == "error":
                raise InputError(f"{key}: {record}")


def _hub_stream(data: DataConfig):
    from datasets import load_dataset

    return load_dataset(data.hub_name, data.hub_config or None, split=data.hub_split, streaming=True)


def stream_documents(data: DataConfig, tokenizer=None, key: str = "data.files",
                     group: Group | None = None) -> Iterator[str]:
    """Documents as text (of `group`, else of the whole source), in the seeded order every task sees
    identically."""
    from datasets import IterableDataset

    if data.source == "hub":
        stream = _hub_stream(data)
        if group is not None and data.read_groups > 1:
            stream = stream.shard(num_shards=data.read_groups, index=group.index, contiguous=True)
    else:
        # gen_kwargs lists are `datasets`' shards: one per file, shuffled by the seed as its readers' are
        files = list(group.files) if group else local_files(data, key)
        stream = IterableDataset.from_generator(_good_records, gen_kwargs={"files": files, "data": data, "key": key})
    if data.shuffle_buffer:
        stream = stream.shuffle(seed=data.seed + (group.index if group else 0), buffer_size=data.shuffle_buffer)
    for i, record in enumerate(stream):
        if data.source == "hub":
            record = _checked_fields(f"{data.hub_name} record {i}", record, data)  # local ones are checked
            if isinstance(record, BadRecord):
                if data.on_bad_record == "error":
                    raise InputError(f"data.hub_name: {record}")
                continue
        yield _document_text(record, data, tokenizer)


def hub_documents(data: DataConfig) -> int | None:
    """The number of documents in the hub dataset's split, from its metadata (its card's dataset_info),
    or None when the metadata does not say."""
    from datasets import load_dataset_builder

    try:
        splits = load_dataset_builder(data.hub_name, data.hub_config or None).info.splits or {}
    except Exception as e:  # unreachable, unknown, gated: the stream itself will say so precisely
        raise InputError(f"data.hub_name: cannot read the metadata of {data.hub_name!r} ({str(e).splitlines()[0]})") from None
    split = splits.get(data.hub_split)
    return split.num_examples if split and split.num_examples else None


def sample_documents(data: DataConfig, tokenizer, count: int) -> list[str]:
    """The hub dataset's first `count` documents in stored order (no shuffle buffer to fill first)."""
    import itertools

    return list(itertools.islice(stream_documents(dataclasses.replace(data, shuffle_buffer=0), tokenizer), count))


def _document_text(record: dict, data: DataConfig, tokenizer) -> str:
    field = _fields(data)[0]
    if not data.chat_template:
        return record[field]
    if not tokenizer.chat_template:
        raise InputError("data.chat_template: the tokenizer has no chat template; set it to false or pick model.tokenizer")
    # As the Balcony reference code does for cosmopedia-v2: (prompt, text) as one conversation.
    messages = [{"role": "user", "content": record[data.prompt_field]},
                {"role": "assistant", "content": record[field]}]
    return tokenizer.apply_chat_template(messages, tokenize=False)

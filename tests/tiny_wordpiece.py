"""A 12-token uncased WordPiece tokenizer with BERT's templates, written to a directory as a
checkpoint's tokenizer files (for the text pipeline's exact-batch tests)."""

import json
import pathlib

import tokenizers
from tokenizers import models, normalizers, pre_tokenizers, processors

# ids:    0        1        2        3      4      5      6     7     8      9    10     11
VOCAB = ["[UNK]", "[PAD]", "[CLS]", "[SEP]", "the", "cat", "sat", "on", "mat", "a", "dog", "##s"]
CLS, SEP, PAD = 2, 3, 1


def write_tokenizer_dir(
    d: pathlib.Path, tokenizer_config: dict | None = None, model_config: dict | None = None
) -> pathlib.Path:
    """``d`` with ``tokenizer.json``, ``tokenizer_config.json`` (pad token ``[PAD]``, plus
    ``tokenizer_config``) and, when given, the model's ``config.json``."""
    tok = tokenizers.Tokenizer(
        models.WordPiece({t: i for i, t in enumerate(VOCAB)}, unk_token="[UNK]")
    )
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)],
    )
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    config = {"pad_token": "[PAD]", **(tokenizer_config or {})}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    if model_config is not None:
        (d / "config.json").write_text(json.dumps(model_config))
    return d

"""A tiny word-level chat tokenizer (with a chat template) and a conversation, shared by the
chat data, pipeline and generation-evaluation tests."""

import ml_collections
import tokenizers
import transformers
from tokenizers import models, pre_tokenizers

# Word ids: [UNK] 0, [PAD] 1, <end> 2, <system> 3, <user> 4, <assistant> 5, be 6, nice 7, hi 8,
# hello 9, there 10, ok 11, bye 12.
VOCAB = "[UNK] [PAD] <end> <system> <user> <assistant> be nice hi hello there ok bye".split()
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} <end> {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)
CONV = [
    {"role": "system", "content": "be nice"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello there"},
    {"role": "user", "content": "bye"},
    {"role": "assistant", "content": "ok"},
]


def tiny_chat_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer; `<end>` (id 2) is the special end-of-turn token."""
    backend = tokenizers.Tokenizer(
        models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="[UNK]")
    )
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<end>",
        pad_token="[PAD]",
        unk_token="[UNK]",
        chat_template=TEMPLATE,
    )


def chat_data_cfg(**kw) -> ml_collections.ConfigDict:
    """A ``data`` config block for chat data (default: user files, ``data.name="files"``)."""
    cfg = dict(
        name="files",
        train_file="",
        validation_file="",
        test_file="",
        messages_field="messages",
        max_train_examples=0,
        task_sizes={"train": 4000, "validation": 200, "test": 500},
        task_seed=0,
    )
    return ml_collections.ConfigDict({**cfg, **kw})

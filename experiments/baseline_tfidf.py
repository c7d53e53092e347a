"""TF-IDF + logistic regression baseline (scikit-learn) on a text-classification config's
splits, for comparison with fine-tuned encoders.

  python -m experiments.baseline_tfidf --config configs/text_cls.py \
      [--config.data.max_train_examples=0] [--out FILE.json]

Uses exactly the train examples the config's training run would see (the same subsample when
``data.max_train_examples`` is set), picks C on the validation split, reports test metrics and
writes them to --out (JSON) when given.
"""

import json

import numpy as np
from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Text classification config.")
_OUT = flags.DEFINE_string("out", "", "Optional JSON output path.")
flags.mark_flags_as_required(["config"])


def _texts_labels(source, text_pair: bool):
    texts, labels = [], []
    for i in range(len(source)):
        r = source[i]
        t = r["text"].decode("utf-8") if isinstance(r["text"], bytes) else str(r["text"])
        if text_pair:
            p = r["text_pair"]
            t += " [SEP] " + (p.decode("utf-8") if isinstance(p, bytes) else str(p))
        texts.append(t)
        labels.append(int(r["label"]))
    return texts, np.asarray(labels)


def main(argv):
    del argv
    from sft_jax.logging import setup_cli_logging

    setup_cli_logging()
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from sft_jax import components
    from sft_jax import metrics as metrics_lib
    from sft_jax.data.builders import load_text_classification

    cfg = _CONFIG.value
    data = load_text_classification(cfg.data, components.data_dir(cfg))
    splits = {s: _texts_labels(data.sources[s], data.text_pair) for s in data.sources}
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    x_train = vec.fit_transform(splits["train"][0])
    best = None
    for c in (0.25, 1.0, 4.0, 16.0):
        clf = LogisticRegression(C=c, max_iter=2000).fit(x_train, splits["train"][1])
        pred = clf.predict(vec.transform(splits["validation"][0]))
        cm = metrics_lib.confusion_matrix(splits["validation"][1], pred, len(data.label_names))
        f1 = metrics_lib.classification_metrics(cm)["macro_f1"]
        if best is None or f1 > best[0]:
            best = (f1, c, clf)
    result = {
        "model": "tfidf_logreg",
        "C": best[1],
        "validation_macro_f1": best[0],
        "num_train": int(x_train.shape[0]),
    }
    if "test" in splits:
        pred = best[2].predict(vec.transform(splits["test"][0]))
        cm = metrics_lib.confusion_matrix(splits["test"][1], pred, len(data.label_names))
        result["test"] = metrics_lib.classification_metrics(cm, data.label_names)
    print(json.dumps(result))
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)

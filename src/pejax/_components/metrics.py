"""Built-in evaluation metrics of :mod:`pejax.registry` (imported by it; heavy imports stay inside each builder)."""

from __future__ import annotations

import numpy as np

from pejax.registry import EvalContext
from pejax.registry import register


@register(
    "metric",
    "accuracy",
    doc="accuracy on the held-out split of a logistic regression (C = run.classifier_c) fit on the synthetic set",
    extra="demo",
)
def _accuracy(opts, ectx: EvalContext):
    from pejax.metrics import downstream_accuracy

    if ectx.modality == "image":
        size = tuple(ectx.test_samples.shape[1:3])

        def accuracy(samples, labels):
            return downstream_accuracy(
                samples, labels, ectx.test_samples, ectx.test_labels, size=size, C=ectx.classifier_c
            )

        return accuracy
    test_emb = np.asarray(ectx.embed(ectx.test_samples), np.float64)

    def text_accuracy(samples, labels):
        return embedding_accuracy(
            np.asarray(ectx.embed(samples), np.float64),
            labels,
            test_emb,
            ectx.test_labels,
            ectx.classifier_c,
        )

    return text_accuracy


def embedding_accuracy(train_emb, train_labels, test_emb, test_labels, C: float) -> float:
    """Test accuracy of ``LogisticRegression(C)`` fit on (train_emb, train_labels); one class: a constant guess."""
    train_labels = np.asarray(train_labels)
    test_labels = np.asarray(test_labels)
    classes = np.unique(train_labels)
    if classes.size == 1:
        return float(np.mean(test_labels == classes[0]))
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError as e:
        raise ImportError(
            "the 'accuracy' metric needs scikit-learn, which is not installed: pip install 'pejax[demo]'."
        ) from e

    clf = LogisticRegression(C=C, max_iter=1000).fit(train_emb, train_labels)
    return float(clf.score(test_emb, test_labels))


@register(
    "metric",
    "frechet",
    doc="Frechet distance between the synthetic and held-out sets in the evaluation embedding",
)
def _frechet(opts, ectx: EvalContext):
    from pejax.metrics import frechet_distance

    test_emb = np.asarray(ectx.embed(ectx.test_samples))

    def frechet(samples, labels):
        del labels
        return frechet_distance(np.asarray(ectx.embed(samples)), test_emb)

    return frechet

"""The downstream probes: classifiers fitted on a model's embeddings (the Fashion-MNIST ConvVAE
study's RandomForest, with a logistic regression and a kNN beside it)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ProbeSettings:
    """The probes' settings: the RandomForest's (the study's: 100 trees, ``random_state`` 42),
    the kNN's neighbours, and the cores both may use (-1: all)."""

    n_estimators: int = 100
    random_state: int = 42
    knn_k: int = 5
    n_jobs: int | None = -1


@dataclass
class ProbeResult:
    """Test accuracies of the probes and the RandomForest's confusion matrix (rows: true)."""

    accuracy: dict[str, float]
    confusion: np.ndarray
    n_train: int
    n_test: int
    seconds: dict[str, float] = field(default_factory=dict)


def fit_probes(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    settings: ProbeSettings | None = None,
    num_classes: int = 10,
) -> ProbeResult:
    """Fit the RandomForest, a logistic regression and a kNN on features; score on test.

    The logistic regression sees standardised features; the kNN uses Euclidean distance.
    """
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import confusion_matrix
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    s = settings or ProbeSettings()
    probes = {
        "rf": RandomForestClassifier(
            n_estimators=s.n_estimators, random_state=s.random_state, n_jobs=s.n_jobs
        ),
        "logreg": make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
        "knn": KNeighborsClassifier(n_neighbors=s.knn_k, n_jobs=s.n_jobs),
    }
    accuracy, seconds, confusion = {}, {}, None
    for name, clf in probes.items():
        t0 = time.perf_counter()
        clf.fit(train_x, train_y)
        pred = clf.predict(test_x)
        seconds[name] = time.perf_counter() - t0
        accuracy[name] = float((pred == test_y).mean())
        if name == "rf":
            confusion = confusion_matrix(test_y, pred, labels=list(range(num_classes)))
    return ProbeResult(accuracy, confusion, len(train_x), len(test_x), seconds)

"""Bag-of-codes baselines for the EHR tasks: logistic regression and gradient boosting (scikit-learn)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from medai.pipelines.ehr_data import PreparedEHR, encode_sample


def bag_of_codes(encoded: Sequence[dict[str, Any]], vocab_size: int):
    """Sparse (n, vocab) counts of the input tokens of each encoded sample (the models' inputs)."""
    from scipy.sparse import csr_matrix

    rows, cols = [], []
    for i, enc in enumerate(encoded):
        ids = enc["input_ids"]
        rows.append(np.full(len(ids), i))
        cols.append(ids)
    data = np.ones(sum(len(r) for r in rows), dtype=np.float32)
    matrix = csr_matrix((data, (np.concatenate(rows), np.concatenate(cols))), shape=(len(encoded), vocab_size))
    matrix.sum_duplicates()
    return matrix


def run_code_count_baselines(prepared: PreparedEHR, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Logistic regression and gradient boosting per task (per group) on bag-of-codes; test predictions.

    Same samples, splits and inputs (the truncated pre-cutoff tokens) as the neural models;
    one model per task output, fit on train (val is not needed: fixed standard settings).
    """
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression

    enc = {split: [encode_sample(prepared, s) for s in prepared.samples_of(split)] for split in ("train", "test")}
    x = {split: bag_of_codes(enc[split], len(prepared.tokenizer)) for split in enc}
    # Codes present in at least 3 training samples only (chosen on train): keeps boosting fast on 2 cores.
    used = np.flatnonzero(np.asarray((x["train"] > 0).sum(0)).ravel() >= 3)
    x = {split: m[:, used] for split, m in x.items()}
    x_log = {split: x[split].log1p() for split in x}
    results: dict[str, dict[str, np.ndarray]] = {}
    for name in ("logistic_regression", "gradient_boosting"):
        probs = np.zeros((len(enc["test"]), prepared.num_labels), dtype=np.float32)
        for k, (task, (start, stop)) in enumerate(prepared.layout.items()):
            tr = np.array([e["task_index"] == k for e in enc["train"]])
            te = np.array([e["task_index"] == k for e in enc["test"]])
            for j in range(start, stop):
                y = np.array([e["targets"][j] for e in enc["train"]])[tr]
                if tr.sum() == 0 or te.sum() == 0:
                    continue
                if y.min() == y.max():
                    probs[te, j] = y[0]  # one class in train: the only honest constant
                    continue
                if name == "logistic_regression":
                    model = LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced")
                    model.fit(x_log["train"][tr], y)
                    probs[te, j] = model.predict_proba(x_log["test"][te])[:, 1]
                else:
                    model = HistGradientBoostingClassifier(max_iter=100, learning_rate=0.1, random_state=seed)
                    model.fit(x["train"][tr].toarray(), y)
                    probs[te, j] = model.predict_proba(x["test"][te].toarray())[:, 1]
        results[name] = {
            "task_index": np.array([e["task_index"] for e in enc["test"]]),
            "targets": np.stack([e["targets"] for e in enc["test"]]),
            "probs": probs,
        }
    return results

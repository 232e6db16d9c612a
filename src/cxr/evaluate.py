"""Predictions on held-out images -> metrics, a classification report and plots.

Nothing here writes files: it returns numbers and matplotlib figures, and `artifacts` saves them.
"""

import numpy as np
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, classification_report, confusion_matrix,
                             roc_auc_score)

from cxr.errors import warn


def predict_probabilities(model, dataset):
    """Class probabilities for every image of a (image, label) dataset, in dataset order."""
    return model.predict(dataset.map(lambda x, y: x), verbose=0)


def auc_score(y_true, probabilities, num_classes):
    """ROC AUC: binary for two classes, macro one-vs-rest for more; None when the labels hold one class."""
    present = np.unique(y_true)
    if len(present) < 2:
        warn("the test set holds a single class, so AUC is undefined and reported as null")
        return None
    if num_classes == 2:
        return float(roc_auc_score(y_true, probabilities[:, 1]))
    if len(present) < num_classes:
        warn("some classes are missing from the test set; AUC is the macro one-vs-rest over the present ones")
        scores = [roc_auc_score(y_true == c, probabilities[:, c]) for c in present]
        return float(np.mean(scores))
    return float(roc_auc_score(y_true, probabilities, multi_class="ovr", average="macro"))


def report(y_true, probabilities, class_names):
    """scikit-learn's classification report (as a dict) at argmax."""
    return classification_report(y_true, probabilities.argmax(axis=1), labels=list(range(len(class_names))),
                                 target_names=class_names, output_dict=True, zero_division=0)


def metrics(y_true, probabilities, class_names, classification=None):
    """Test metrics at argmax: accuracy, balanced accuracy, AUC and per-class precision/recall/F1."""
    y_pred = probabilities.argmax(axis=1)
    labels = list(range(len(class_names)))
    classification = classification or report(y_true, probabilities, class_names)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "auc": auc_score(y_true, probabilities, len(class_names)),
        "per_class": {name: {k: float(v) for k, v in classification[name].items()} for name in class_names},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "n_images": int(len(y_true)),
    }


def report_rows(classification):
    """A classification report dict as CSV rows (header first)."""
    total = int(classification["macro avg"]["support"])
    rows = [["class", "precision", "recall", "f1-score", "support"]]
    for name, values in classification.items():
        if name == "accuracy":
            rows.append(["accuracy", "", "", f"{values:.4f}", str(total)])
        else:
            rows.append([name, *(f"{values[k]:.4f}" for k in ("precision", "recall", "f1-score")),
                         str(int(values["support"]))])
    return rows


def confusion_matrix_figure(y_true, probabilities, class_names, title="Confusion matrix (test set)"):
    import matplotlib

    matplotlib.use("Agg")
    from sklearn.metrics import ConfusionMatrixDisplay

    matrix = confusion_matrix(y_true, probabilities.argmax(axis=1), labels=list(range(len(class_names))))
    display = ConfusionMatrixDisplay(matrix, display_labels=class_names)
    display.plot(cmap="Blues", values_format="d", colorbar=False)
    display.ax_.set_title(title)
    display.figure_.tight_layout()
    return display.figure_


def training_curves_figure(history):
    """Loss and accuracy per epoch over both phases, with the phase boundary marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    steps = np.arange(1, len(history) + 1)
    for ax, metric in zip(axes, ("loss", "accuracy")):
        ax.plot(steps, [e[metric] for e in history], marker=".", label=f"train {metric}")
        ax.plot(steps, [e[f"val_{metric}"] for e in history], marker=".", label=f"val {metric}")
        boundary = sum(1 for e in history if e["phase"] == 1)
        if 0 < boundary < len(history):
            ax.axvline(boundary + 0.5, color="grey", linestyle="--", label="fine-tuning starts")
        ax.set_xlabel("epoch (both phases)")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric.capitalize()} per epoch")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig

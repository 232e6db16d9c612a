"""The evaluation's figures as matplotlib figures (saved by `artifacts`, embedded in the HTML report)."""

import io

import matplotlib

matplotlib.use("Agg")  # no screen on servers; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, precision_recall_curve, roc_curve  # noqa: E402


def figure_png(figure, dpi=110):
    """The figure as PNG bytes; the figure is closed."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    plt.close(figure)
    return buffer.getvalue()


def roc_figure(curves, operating_point=None, title="ROC curve (test set)"):
    """One ROC curve per entry of `curves` (name, is_positive, scores, auc, auc_ci, band), with its CI band.

    `operating_point` = (false positive rate, sensitivity, label) is marked on the curve.
    """
    fig, ax = plt.subplots(figsize=(6, 5.5))
    for curve in curves:
        fpr, tpr, _ = roc_curve(curve["is_positive"], curve["scores"])
        ax.plot(fpr, tpr, label=f"{curve['name']}: AUC {_with_ci(curve['auc'], curve.get('auc_ci'))}")
        if curve.get("band") is not None:
            grid, low, high = curve["band"]
            ax.fill_between(grid, low, high, alpha=0.2, label=f"{curve['name']}: 95% bootstrap band")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="chance")
    if operating_point is not None:
        fpr, tpr, label = operating_point
        ax.plot([fpr], [tpr], "o", color="crimson", markersize=9, label=label)
    return _unit_square(fig, ax, "1 - specificity (false positive rate)", "Sensitivity (true positive rate)", title,
                        "lower right")


def roc_grid_figure(curves, title="ROC curve per finding (test set)"):
    """One small ROC panel per finding: `curves` as for `roc_figure`, plus "point" (fpr, tpr) at the finding's
    threshold, or None."""
    columns = min(4, max(1, len(curves)))
    rows = -(-len(curves) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, curve in zip(axes.flat, curves):
        ax.axis("on")
        fpr, tpr, _ = roc_curve(curve["is_positive"], curve["scores"])
        ax.plot(fpr, tpr)
        if curve.get("band") is not None:
            grid, low, high = curve["band"]
            ax.fill_between(grid, low, high, alpha=0.2)
        ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8)
        if curve.get("point") is not None:
            ax.plot(*curve["point"], "o", color="crimson", markersize=6)
        ax.set_title(f"{curve['name']}\nAUC {_with_ci(curve['auc'], curve.get('auc_ci'))}", fontsize=8)
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.02)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}; the dot is the finding's threshold")
    fig.supxlabel("1 - specificity", fontsize=9)
    fig.supylabel("sensitivity", fontsize=9)
    fig.tight_layout()
    return fig


def forest_figure(subgroups, overall, metrics=("auc_roc", "sensitivity", "specificity")):
    """A forest plot: per subgroup (rows, grouped by attribute) each metric with its 95% interval, the whole
    set's value as a dashed line; groups under the stable size are drawn hollow. `subgroups` is
    `evaluate.subgroups.subgroup_analysis`'s result, `overall` {metric: whole-set value}."""
    rows = [(attribute, group, numbers) for attribute, entry in subgroups.items()
            for group, numbers in entry["groups"].items()]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics) + 1.5, 0.9 + 0.32 * len(rows)),
                             sharey=True, squeeze=False)
    y = np.arange(len(rows))[::-1]
    for ax, metric in zip(axes[0], metrics):
        for k, (attribute, group, numbers) in enumerate(rows):
            value, (low, high) = numbers.get(metric), numbers["ci"].get(metric, [None, None])
            if value is None:
                continue
            if low is not None:
                ax.plot([low, high], [y[k], y[k]], color="#1f6fb2", linewidth=1.5)
            ax.plot([value], [y[k]], "o", color="#1f6fb2", markerfacecolor="white" if numbers["small"] else "#1f6fb2")
        if overall.get(metric) is not None:
            ax.axvline(overall[metric], color="grey", linestyle="--", linewidth=1, label="whole set")
        ax.set_xlim(-0.02, 1.02)
        ax.set_title(metric.replace("_", " "), fontsize=10)
        ax.grid(alpha=0.3, axis="x")
    axes[0][0].set_yticks(y, [f"{a}: {g} (n={n['n_images']}{', small' if n['small'] else ''})" for a, g, n in rows],
                          fontsize=8)
    axes[0][-1].legend(loc="lower right", fontsize=8)
    fig.suptitle("Subgroups: value and 95% bootstrap interval (hollow: too few images for a stable number)",
                 fontsize=10)
    fig.tight_layout()
    return fig


def pr_figure(curves, title="Precision-recall curve (test set)"):
    fig, ax = plt.subplots(figsize=(6, 5.5))
    for curve in curves:
        precision, recall, _ = precision_recall_curve(curve["is_positive"], curve["scores"])
        line, = ax.step(recall, precision, where="post",
                        label=f"{curve['name']}: average precision {_with_ci(curve['ap'], curve.get('ap_ci'))}")
        prevalence = np.mean(curve["is_positive"])
        ax.axhline(prevalence, linestyle="--", color=line.get_color(), alpha=0.6,
                   label=f"{curve['name']}: chance (prevalence {prevalence:.2f})")
    return _unit_square(fig, ax, "Recall (sensitivity)", "Precision (PPV)", title, "lower left")


def reliability_figure(before, after, title="Reliability diagram (test set)"):
    """Accuracy against confidence per bin, before and after temperature scaling.

    `before` / `after` = (label, mean confidence per bin, accuracy per bin, count per bin).
    """
    fig, ax = plt.subplots(figsize=(6, 5.5))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    for (label, confidence, accuracy, counts), marker in zip((before, after), ("s", "o")):
        ax.plot(confidence, accuracy, marker=marker, label=label)
    return _unit_square(fig, ax, "Confidence (probability of the predicted class)", "Observed accuracy", title,
                        "upper left")


def _unit_square(fig, ax, xlabel, ylabel, title, legend_loc):
    """Shared finish of the ROC, PR and reliability plots: both axes 0-1, labelled, titled, legend, grid."""
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc=legend_loc, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def confusion_matrix_figure(matrix, class_names, title="Confusion matrix (test set)"):
    """Counts and row-normalised rates (each row: how the images of one true class were classified)."""
    matrix = np.asarray(matrix)
    fig, axes = plt.subplots(1, 2, figsize=(5.5 + 1.2 * len(class_names), 3.2 + 0.5 * len(class_names)))
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = np.nan_to_num(matrix / matrix.sum(axis=1, keepdims=True))
    for ax, values, fmt, subtitle in ((axes[0], matrix, "d", "counts"), (axes[1], rates, ".2f", "row-normalised")):
        ConfusionMatrixDisplay(values, display_labels=class_names).plot(ax=ax, cmap="Blues", values_format=fmt,
                                                                       colorbar=False)
        ax.set_title(subtitle)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def training_curves_figure(history):
    """Loss and accuracy per epoch over both phases, with the phase boundary marked."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    steps = np.arange(1, len(history) + 1)
    for ax, metric in zip(axes, ("loss", "accuracy" if "accuracy" in history[0] else "auc")):
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


def explanation_figure(panels, title):
    """Grad-CAM overlays side by side, `panels` = [(overlay, caption), ...], titled with the label and
    probability."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5.3 + 0.3 * bool(panels[0][1])), squeeze=False)
    for ax, (overlay, caption) in zip(axes[0], panels):
        ax.imshow(overlay)
        ax.set_title(caption, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def gallery_figure(rows, title):
    """A grid of Grad-CAM overlays: `rows` = [(row title, [(overlay, caption), ...]), ...]; empty rows say so."""
    columns = max([len(items) for _, items in rows] + [1])
    fig, axes = plt.subplots(len(rows), columns, figsize=(2.6 * columns, 2.9 * len(rows)), squeeze=False)
    for r, (row_title, items) in enumerate(rows):
        for c in range(columns):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(items):
                ax.imshow(items[c][0])
                ax.set_title(items[c][1], fontsize=8)
        if not items:
            axes[r, 0].text(0, 0.5, f"{row_title}: none among these images", fontsize=10, transform=axes[r, 0].transAxes)
        else:
            axes[r, 0].text(-0.08, 0.5, row_title, rotation=90, va="center", ha="right", fontsize=10,
                            transform=axes[r, 0].transAxes)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _with_ci(value, ci):
    if value is None or not np.isfinite(value):
        return "n/a"
    if ci and ci[0] is not None:
        return f"{value:.3f} ({ci[0]:.3f}-{ci[1]:.3f})"
    return f"{value:.3f}"

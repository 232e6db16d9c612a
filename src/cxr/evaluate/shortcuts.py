"""The shortcut check: do the model's calls change when only what lies outside the lungs, or the image's
proportions, change?

Models trained on Kermany's train/ folder read burned-in markers, black edges (collimation), a tight field
of view and a tall chest as signs of pneumonia (benchmarks/README.md, "Shortcuts outside the lungs" and
"Proportions"): at another site, where those differ, normal children are called pneumonia. Each probe here
makes one such edit to the evaluated images; a model that reads the lungs keeps its calls, one that reads the
edit changes them.
"""

import numpy as np

SAMPLE = 400  # images probed at most: enough to see a shortcut, cheap next to the evaluation itself


def probes(seed=0):
    """{name: edit}: each edit maps a uint8 (n, side, side, 3) batch to an edited copy."""
    from cxr.data.augment import BurnedInMarkings

    markings = BurnedInMarkings(rate=1.0, seed=seed)

    def burned_in_markings(x):
        return np.uint8(np.clip(np.asarray(markings(x.astype(np.float32))) + 0.5, 0, 255))

    def black_edges(x, fraction=0.1):
        x, band = x.copy(), max(1, int(x.shape[1] * fraction))
        x[:, :band], x[:, -band:], x[:, :, :band], x[:, :, -band:] = 0, 0, 0, 0
        return x

    def zoomed_in(x, keep=0.8):
        from PIL import Image

        side = x.shape[1]
        cut = max(1, int(side * (1 - keep) / 2))
        return np.stack([np.asarray(Image.fromarray(image[cut:side - cut, cut:side - cut]).resize(
            (side, side), Image.BILINEAR)) for image in x])

    def taller(x, stretch=1.15):
        from PIL import Image

        side = x.shape[1]
        height = int(round(side * stretch))
        cut = (height - side) // 2
        return np.stack([np.asarray(Image.fromarray(image).resize((side, height), Image.BILINEAR))[cut:cut + side]
                         for image in x])

    return {"burned-in markings (a letter and a line of text)": burned_in_markings,
            "black edges (10% of each side)": black_edges,
            "zoomed in (central 80%)": zoomed_in,
            "taller (height stretched by 15%)": taller}


def shortcut_check(model, images, rows, y_true, seed=0, batch_size=32):
    """How each probe moves the calls of `model` (a `SavedModel`) on up to SAMPLE of the images `images[rows]`
    (uint8 (n, side, side, 3); labels `y_true` (n,)), drawn with `seed`.

    Returns {"n_images": how many were probed, "negatives_called_positive": share of the probed negatives called
    positive as they are (binary models; None otherwise), "probes": {probe name: {"changed_calls": share of the
    probed images whose call the edit changes (of a multi-label model: of the (image, finding) calls),
    "negatives_called_positive": the same share after the edit}}}.
    """
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(y_true), min(SAMPLE, len(y_true)), replace=False))
    x, y = np.asarray(images[np.asarray(rows)[chosen]]), np.asarray(y_true)[chosen]
    negative = y != model.positive_index
    binary = model.positive_index is not None and len(model.class_names) == 2 and negative.any()

    def called_positive(calls):
        return float(np.mean(calls[negative] == model.positive_index)) if binary else None

    _, before = model.predict(x, batch_size=batch_size)
    result = {"n_images": int(len(chosen)), "negatives_called_positive": called_positive(before), "probes": {}}
    for name, edit in probes(seed).items():
        _, after = model.predict(edit(x), batch_size=batch_size)
        result["probes"][name] = {"changed_calls": float(np.mean(after != before)),
                                  "negatives_called_positive": called_positive(after)}
    return result

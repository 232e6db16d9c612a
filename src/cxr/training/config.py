"""Every option of a training run, with the seed script's defaults.

One flat dataclass, like nanoGPT's config: the CLI builds it from flags, `summary.json` stores it whole, and
tests build it directly with small values. Options left at None that the backbone registry has a default for
(augmentation, phase 2's epochs) take the backbone's when the Config is made, so summary.json names them.
"""

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cxr.model import backbones
from cxr.model.backbones import NAMES as BACKBONES
from cxr.data.pipeline import AUGMENTATIONS
from cxr.training.distribute import STRATEGIES
from cxr.bundle.serving import PRECISIONS
from cxr.errors import UserError

MONITORS = ("val_accuracy", "val_auc", "val_loss")


@dataclass
class Config:
    data_dir: Path = Path("data")
    # A labels table instead of class folders (data.labels_csv): the CSV, the folder its image paths are
    # relative to, and how to read it. A run from a CSV trains a multi-label model, one sigmoid per finding.
    labels: Optional[Path] = None
    images: Optional[Path] = None
    label_format: Optional[str] = None  # nih | chexpert | columns; None: from the header
    findings: Optional[list] = None  # None: every finding with MIN_POSITIVES positives in the training split
    uncertain: str = "ignore"  # CheXpert's -1: ignore (unknown, masked out of loss and metrics) | zeros | ones
    views: Optional[list] = ("PA", "AP")  # frontal only; None: every view
    path_column: Optional[str] = None
    patient_column: Optional[str] = None
    view_column: Optional[str] = None
    test_list: Optional[Path] = None  # an official list of test images (NIH's test_list.txt)
    subgroups: Optional[list] = None  # further labels-CSV columns the evaluation reports subgroups of
    age_bands: tuple = (18, 40, 60, 80)  # the subgroup analysis's age band edges: 0-17, 18-39, 40-59, 60-79, 80+
    # A CSV of codes for classes the vocabulary (data.vocabulary) does not know, or codes the site prefers; saved
    # with the model, for the DICOM results of `cxr listen`
    codes: Optional[Path] = None
    output_dir: Path = Path("outputs")
    img_size: int = 224
    batch_size: int = 32
    epochs: int = 30  # per phase
    val_split: float = 0.15
    test_split: float = 0.15
    patience: int = 6
    seed: int = 42
    lr: Optional[float] = None  # phase 1's; None: the seed's 1e-3, or 1e-2 for a labels CSV (see __post_init__)
    finetune_lr: float = 1e-5
    # Phase 2's cap. None: the backbone's (B0: --epochs, as the seed; Lite0: 5, or --epochs when lower).
    finetune_epochs: Optional[int] = None
    # None: the backbone's own default (B0: the seed's 200; Lite0: up to block 4a, 50).
    frozen_layers: Optional[int] = None
    dropout: float = 0.25
    # None: efficientnet-lite0, the recipe every measurement uses, whose ImageNet weights ship with cxr (the seed's
    # efficientnetb0 stays available by name; its weights must be downloaded)
    backbone: Optional[str] = None
    weights: str = "imagenet"  # imagenet | none | path to a weights file
    init_from: Optional[Path] = None  # start the backbone from another cxr model of the same backbone
    port: Optional[int] = None
    # Off: on a CPU with avx512_bf16, bfloat16 ran this network slower than float32 (benchmarks/README.md).
    mixed_precision: bool = False
    class_weight: str = "none"  # none | balanced
    deterministic: bool = True  # op determinism: the same seed gives the same numbers, at no measured cost
    strict: bool = False
    # None: decide from the data (on when the val folder has fewer than MIN_VAL_IMAGES images).
    val_from_train: Optional[bool] = None
    group_pattern: Optional[str] = None
    feature_cache: bool = True
    feature_views: Optional[int] = None  # None: the backbone's (B0 2, Lite0 4)
    augment: Optional[str] = None  # data.augment's AUGMENTATIONS; None: the backbone's (B0 seed, Lite0 site-aspect)
    # What early stopping, checkpoints and the final phase's choice follow; None: val_accuracy (the seed's), or
    # val_auc (the mean over findings) for a multi-label run, where accuracy means little.
    monitor: Optional[str] = None
    label_smoothing: float = 0.0
    weight_decay: float = 0.0  # AdamW's decoupled weight decay; 0 keeps the seed's Adam
    # The zoomed views of each image the saved model averages (networks.with_test_time_scales); None: the
    # backbone's (B0 [1.0], the image alone; Lite0 [0.9, 1.0]).
    test_time_scales: Optional[list] = None
    # Evaluation: None = PNEUMONIA if there is such a class, else the second class.
    positive_class: Optional[str] = None
    # The highest threshold reaching this sensitivity on validation; None: the one maximising Youden's J.
    # A validation target of 0.90 held up best at another site: of the rules measured there (Youden's J, 0.95,
    # 0.90, specificity >= 0.98) it gave the highest balanced accuracy in every run, at a sensitivity of 0.92-0.96
    # there (benchmarks/README.md, "Fine-tuning from block 4a, the 0.90 threshold rule, and the field of view").
    target_sensitivity: Optional[float] = 0.90
    bootstrap: int = 2000  # resamples for the confidence intervals; 0 turns them off
    # The share of validation images the population check flags (cxr.model.population). At 0.01 the full default model
    # flagged 2.6 % of its own test split; at 0.005, 1.3 %, and still every NIH adult and every non-X-ray
    # (bench_population.py in benchmarks/README.md).
    false_flag_rate: float = 0.005
    # "auto": no population check where the validation split is too small for one worth its flags (fewer than 99
    # images, population.too_few_validation_images); "always": fit it anyway
    population_check: str = "auto"
    precision: str = "auto"  # serving.PRECISIONS: int8 where it passes the accuracy guard on validation
    resume: bool = False  # go on with the killed run in output_dir (same options and data) from its last epoch
    strategy: str = "auto"  # distribute.STRATEGIES; --batch-size is the global batch across its replicas

    def __post_init__(self):
        if self.views is not None:
            self.views = list(self.views)
        self.age_bands = list(self.age_bands)
        if self.monitor is None:
            self.monitor = "val_auc" if self.multi_label else "val_accuracy"
        if self.backbone is None:
            self.backbone = "efficientnet-lite0"
        # A multi-label run's defaults, measured on the NIH sample (bench_multilabel.py in benchmarks/README.md):
        # the head learns at 1e-2 with the seed's augmentation; the shortcut augmentations of Lite0's default
        # were chosen against the pediatric Kermany set's markers and framing and did worse on adults.
        if self.lr is None:
            self.lr = 1e-2 if self.multi_label else 1e-3
        if self.augment is None and self.multi_label:
            self.augment = "seed"
        if self.backbone not in BACKBONES:  # validate() reports it
            return
        backbone = backbones.get(self.backbone)
        if self.augment is None:
            self.augment = backbone.augment
        if self.finetune_epochs is None:
            self.finetune_epochs = min(self.epochs, backbone.finetune_epochs or self.epochs)
        if self.test_time_scales is None:
            self.test_time_scales = list(backbone.test_time_scales)
        if self.feature_views is None:
            self.feature_views = backbone.feature_views

    @property
    def multi_label(self):
        return self.labels is not None

    def label_options(self):
        from cxr.data.labels_csv import LabelOptions

        return LabelOptions(self.label_format, self.findings, self.uncertain, self.views, self.path_column,
                            self.patient_column, self.view_column, self.subgroups or ())

    def validate(self):
        """Raise UserError for option values no run could use."""
        checks = [
            (self.labels is None or self.images is not None, "--labels needs --images, the folder its paths start in"),
            (self.images is None or self.labels is not None, "--images needs --labels, the CSV that labels them"),
            (not (self.multi_label and self.monitor == "val_accuracy"),
             "--monitor val_accuracy is for class folders; a multi-label run monitors val_auc or val_loss"),
            (self.img_size >= 32, f"--img-size must be at least 32, got {self.img_size}"),
            (self.population_check in ("auto", "always"),
             f"--population-check must be auto or always, got {self.population_check!r}"),
            (self.strategy in STRATEGIES, f"--strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.finetune_epochs is None or self.finetune_epochs >= 1,
             f"--finetune-epochs must be at least 1, got {self.finetune_epochs}"),
            (0 < self.val_split < 1, f"--val-split must be between 0 and 1, got {self.val_split}"),
            (0 < self.test_split < 1, f"--test-split must be between 0 and 1, got {self.test_split}"),
            (self.val_split + self.test_split < 1,
             f"--val-split + --test-split must leave images for training, got {self.val_split + self.test_split}"),
            (self.patience >= 1, f"--patience must be at least 1, got {self.patience}"),
            (0 < self.lr < 1 and 0 < self.finetune_lr < 1, "--lr and --finetune-lr must be between 0 and 1"),
            (self.seed >= 0, f"--seed must be 0 or more, got {self.seed}"),
            (self.frozen_layers is None or self.frozen_layers >= 0,
             f"--frozen-layers must be 0 or more, got {self.frozen_layers}"),
            (0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}"),
            (self.backbone in BACKBONES, f"--backbone must be one of {', '.join(BACKBONES)}, got {self.backbone!r}"),
            (self.class_weight in ("none", "balanced"), f"--class-weight must be none or balanced, got {self.class_weight!r}"),
            (self.port is None or 1 <= self.port <= 65535, f"--port must be between 1 and 65535, got {self.port}"),
            (self.feature_views is None or self.feature_views >= 1, f"--feature-views must be at least 1, got {self.feature_views}"),
            (self.augment in AUGMENTATIONS, f"--augment must be one of {', '.join(AUGMENTATIONS)}, got {self.augment!r}"),
            (self.monitor in MONITORS, f"--monitor must be one of {', '.join(MONITORS)}, got {self.monitor!r}"),
            (0 <= self.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}"),
            (0 <= self.weight_decay < 1, f"--weight-decay must be in [0, 1), got {self.weight_decay}"),
            (self.test_time_scales is None or (len(self.test_time_scales) >= 1
                                                and all(0.5 <= s <= 2 for s in self.test_time_scales)),
             f"--test-time-scales must be one or more zooms between 0.5 and 2, got {self.test_time_scales}"),
            (self.target_sensitivity is None or 0 < self.target_sensitivity <= 1,
             f"--target-sensitivity must be in (0, 1], got {self.target_sensitivity}"),
            (self.bootstrap >= 0, f"--bootstrap must be 0 or more, got {self.bootstrap}"),
            (0 < self.false_flag_rate < 0.5, f"--false-flag-rate must be between 0 and 0.5, got {self.false_flag_rate}"),
            (self.precision in PRECISIONS, f"--precision must be auto, float32 or int8, got {self.precision!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        if self.group_pattern is not None:
            try:
                re.compile(self.group_pattern)
            except re.error as error:
                raise UserError(f"--group-pattern {self.group_pattern!r} is not a valid regular expression ({error}); "
                                "give a pattern whose first group is the patient id") from None
        if self.init_from is not None and not Path(self.init_from).is_file():
            raise UserError(f"--init-from {self.init_from}: no such file; give a model.h5 written by cxr train")
        if self.weights not in ("imagenet", "none") and not Path(self.weights).is_file():
            raise UserError(f"--weights {self.weights}: no such file; give imagenet, none or the path to a weights file")
        return self

    def to_dict(self):
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}

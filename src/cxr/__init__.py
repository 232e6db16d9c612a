"""cxr: chest X-ray classifiers by transfer learning with Keras 3."""

__version__ = "0.1.0"

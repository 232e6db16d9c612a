"""Train a chest X-ray classifier: the seed script's entry point, same options as `cxr train`.

    python train_cnn.py --port 7002
"""

import sys
from pathlib import Path

try:
    from cxr.cli import main
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
    from cxr.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))

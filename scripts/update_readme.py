"""Rebuild README.md's results table from the results files: python scripts/update_readme.py [OUTPUT_DIR]."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import helpers as H  # noqa: E402

if __name__ == "__main__":
    output_dir = sys.argv[1] if len(sys.argv) > 1 else ROOT / "outputs"
    H.update_readme(ROOT / "README.md", output_dir)
    print(f"README.md results table rebuilt from {Path(output_dir) / 'results'}")

"""Rebuild README.md's results table from the results files: python scripts/update_readme.py [OUTPUT_DIR]."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import helpers as H  # noqa: E402

START, END = "<!-- results:start -->", "<!-- results:end -->"


def update_readme(readme, output_dir):
    """Replace the table between the results markers in README.md with OUTPUT_DIR/results' runs (never QUICK's)."""
    text = Path(readme).read_text()
    if START not in text or END not in text:
        raise ValueError(f"{readme} has no '{START}' ... '{END}' markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    Path(readme).write_text(f"{head}{START}\n{H.results_table(output_dir, include_quick=False)}\n{END}{tail}")


if __name__ == "__main__":
    output_dir = sys.argv[1] if len(sys.argv) > 1 else ROOT / "outputs"
    update_readme(ROOT / "README.md", output_dir)
    print(f"README.md results table rebuilt from {Path(output_dir) / 'results'}")

"""Rebuild README.md's results table and course/expected.json (what each shipped run reached) from the results files:
python scripts/update_readme.py [OUTPUT_DIR]."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from course.runs import load_results, results_table  # noqa: E402

START, END = "<!-- results:start -->", "<!-- results:end -->"


def update_readme(readme, output_dir):
    """Replace the table between the results markers in README.md with OUTPUT_DIR/results' runs (never QUICK's)."""
    text = Path(readme).read_text()
    if START not in text or END not in text:
        raise ValueError(f"{readme} has no '{START}' ... '{END}' markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    table = results_table(Path(output_dir) / "results", include_quick=False)
    Path(readme).write_text(f"{head}{START}\n{table}\n{END}{tail}")


def _batch(config):
    return config.get("batch_size") or (config.get("data") or {}).get("batch_size", "?")


def expected(output_dir):
    """{experiment: one line} for every finished, real run in OUTPUT_DIR/results: what notebooks print as expected."""
    out = {}
    for name, rec in load_results(Path(output_dir) / "results").items():
        if rec["status"] == "complete" and not rec["quick"] and rec["final_test_acc"] is not None:
            cfg = rec["config"]
            model = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
            sched = cfg.get("scheduler") if isinstance(cfg.get("scheduler"), dict) else {}
            out[name] = (f"{rec['final_test_acc']:.2f}% test accuracy ({model.get('name', '?')} "
                         f"{model.get('norm', '')}, {sched.get('name', '?')}, {rec['epochs_run']} epochs at batch "
                         f"{_batch(cfg)}; {rec['wall_time_s'] / 60:.0f} min on {rec['device']}"
                         + (f"; data: {rec['data_files']})" if rec.get("data_files") else ")"))
    return out


if __name__ == "__main__":
    output_dir = sys.argv[1] if len(sys.argv) > 1 else ROOT / "outputs"
    if not any((Path(output_dir) / "results").glob("*.json")):  # a typo must not empty README's table
        sys.exit(f"no results files in {Path(output_dir) / 'results'}: README.md and course/expected.json not changed")
    update_readme(ROOT / "README.md", output_dir)
    (ROOT / "course" / "expected.json").write_text(json.dumps(expected(output_dir), indent=1) + "\n")
    print(f"README.md results table and course/expected.json rebuilt from {Path(output_dir) / 'results'}")

"""Point the course at its repository: python scripts/set_repo_url.py https://github.com/ORG/REPO [--ref TAG]

Rewrites the REPO_URL / REPO_REF line of every notebook's setup cell, the "Open in Colab" badges of the notebooks
and README.md, and README's mentions of the address, so that a teacher who forks the course changes one thing.
Pin a tag (--ref v1.0) for a course, so that the helpers.py students fetch always matches their notebooks.
"""

import argparse
import re
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r'REPO_URL, REPO_REF = "([^"]*)", "([^"]*)"')
GITHUB = re.compile(r"https://github\.com/([\w.-]+/[\w.-]+?)(?:\.git)?/?$")


def rewrite(text, old, new):
    """text with the (url, ref) pair old replaced by new: the setup line, the Colab badges, plain mentions."""
    (old_url, old_ref), (new_url, new_ref) = old, new
    old_path, new_path = GITHUB.match(old_url).group(1), GITHUB.match(new_url).group(1)
    text = LINE.sub(f'REPO_URL, REPO_REF = "{new_url}", "{new_ref}"', text)
    text = text.replace(f"colab.research.google.com/github/{old_path}/blob/{old_ref}/",
                        f"colab.research.google.com/github/{new_path}/blob/{new_ref}/")
    return text.replace(old_url, new_url)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("url", help="the course's GitHub address, e.g. https://github.com/my-school/resnet-course")
    ap.add_argument("--ref", default="main", help="the branch or tag students get (pin a tag for a course)")
    ap.add_argument("--root", type=Path, default=ROOT, help="the checkout to rewrite (default: this one)")
    a = ap.parse_args(argv)
    url = a.url.rstrip("/").removesuffix(".git")
    if not GITHUB.match(url):
        raise SystemExit(f"not a GitHub repository address: {a.url!r} (expected https://github.com/ORG/REPO)")
    notebooks = sorted((a.root / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    first = nbformat.read(notebooks[0], as_version=4)
    old = LINE.search(next(c.source for c in first.cells if c.cell_type == "code")).groups()
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            cell.source = rewrite(cell.source, old, (url, a.ref))
        nbformat.write(nb, path)
    readme = a.root / "README.md"
    readme.write_text(rewrite(readme.read_text(), old, (url, a.ref)))
    print(f"{len(notebooks)} notebooks and README.md now use {url} at {a.ref} (was {old[0]} at {old[1]})")


if __name__ == "__main__":
    main()

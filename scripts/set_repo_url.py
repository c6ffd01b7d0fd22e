"""Point the course at its repository: python scripts/set_repo_url.py https://github.com/ORG/REPO --ref TAG
[--publish DIR]

Rewrites the REPO_URL / REPO_REF line of every notebook's setup cell, the "Open in Colab" badges of the notebooks
and README.md, and README's mentions of the address, so that a teacher's private copy of the course (imported, not
forked: README) changes one thing. Pin a tag (--ref v1.0) for a course, so that the helpers.py students fetch always
matches their notebooks.

--publish DIR writes the class's copy instead: every file of this checkout's last commit except teacher/ and
tests/test_teacher.py (the model answers and the tests that read them) into DIR, with the address set there; this
checkout is not changed. Push DIR to the repository students clone, and tag it with --ref.
"""

import argparse
import re
import subprocess
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r'REPO_URL, REPO_REF = "([^"]*)", "([^"]*)"')
GITHUB = re.compile(r"https://github\.com/([\w.-]+/[\w.-]+?)(?:\.git)?/?$")
PRIVATE = ("teacher/", "tests/test_teacher.py")  # never in a class's copy (the tests hold fixed answers)


def ref_problem(ref):
    """Why ref is not a branch or tag name git accepts (git check-ref-format's rules), or None."""
    if not re.fullmatch(r"[A-Za-z0-9._/-]+", ref):
        return "it may hold only letters, digits, '.', '_', '-' and '/'"
    if ref.startswith(("-", "/", ".")) or ref.endswith(("/", ".", ".lock")):
        return "it may not start with '-', '/' or '.', nor end with '/', '.' or '.lock'"
    if ".." in ref or "//" in ref or "/." in ref:
        return "it may not contain '..', '//' or a part starting with '.'"
    return None


def rewrite(text, old, new):
    """text with the (url, ref) pair old replaced by new: the setup line, the Colab badges, plain mentions."""
    (old_url, old_ref), (new_url, new_ref) = old, new
    old_path, new_path = GITHUB.match(old_url).group(1), GITHUB.match(new_url).group(1)
    text = LINE.sub(f'REPO_URL, REPO_REF = "{new_url}", "{new_ref}"', text)
    text = text.replace(f"colab.research.google.com/github/{old_path}/blob/{old_ref}/",
                        f"colab.research.google.com/github/{new_path}/blob/{new_ref}/")
    return text.replace(old_url, new_url)


def set_address(root, url, ref):
    """Rewrite every notebook and README.md under root to url at ref; returns the old (url, ref)."""
    notebooks = sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    first = nbformat.read(notebooks[0], as_version=4)
    old = LINE.search(next(c.source for c in first.cells if c.cell_type == "code")).groups()
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            cell.source = rewrite(cell.source, old, (url, ref))
        nbformat.write(nb, path)
    readme = root / "README.md"
    readme.write_text(rewrite(readme.read_text(), old, (url, ref)))
    return old, len(notebooks)


def publish(root, dest):
    """Copy the files of root's last commit, except teacher/, into dest (which must be empty or new)."""
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise SystemExit(f"--publish needs an empty or new folder; {dest} is not empty")
    changed = subprocess.run(["git", "-C", str(root), "status", "--porcelain"],  # new files too (not ignored ones)
                             capture_output=True, text=True, check=True).stdout.splitlines()
    if changed:  # --publish copies the last commit: say what it would leave out, instead of leaving it out silently
        raise SystemExit(f"{len(changed)} file(s) new or changed since the last commit would not be in the class's "
                         f"copy: {', '.join(line[3:] for line in changed[:5])}. Commit them (git add them, then git "
                         f"commit -m '...') and run this again.")
    entries = subprocess.run(["git", "-C", str(root), "ls-tree", "-r", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.splitlines()  # "MODE blob SHA\tNAME"
    files = [(line.split("\t", 1)[1], line.split()[0]) for line in entries]
    for name, mode in files:
        if name.startswith(PRIVATE):
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        blob = subprocess.run(["git", "-C", str(root), "show", f"HEAD:{name}"], capture_output=True, check=True)
        target.write_bytes(blob.stdout)
        target.chmod(0o755 if mode == "100755" else 0o644)  # scripts stay executable
    return [n for n, _ in files if not n.startswith(PRIVATE)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("url", help="the course's GitHub address, e.g. https://github.com/my-school/resnet-course")
    ap.add_argument("--ref", default="main", help="the branch or tag students get (pin a tag for a course)")
    ap.add_argument("--root", type=Path, default=ROOT, help="the checkout to rewrite (default: this one)")
    ap.add_argument("--publish", type=Path, metavar="DIR",
                    help="write the class's copy (without teacher/ and tests/test_teacher.py) to DIR")
    a = ap.parse_args(argv)
    url = a.url.rstrip("/").removesuffix(".git")
    if not GITHUB.match(url):
        raise SystemExit(f"not a GitHub repository address: {a.url!r} (expected https://github.com/ORG/REPO)")
    problem = ref_problem(a.ref)
    if problem:
        raise SystemExit(f"not a branch or tag name: {a.ref!r}: {problem} (e.g. v1.0 or main)")
    root = a.root
    if a.publish:
        files = publish(root, a.publish)
        root = a.publish
        print(f"wrote the class's copy to {a.publish}: {len(files)} files, without {', '.join(PRIVATE)}")
    old, n = set_address(root, url, a.ref)
    print(f"{n} notebooks and README.md in {root} now use {url} at {a.ref} (was {old[0]} at {old[1]})")


if __name__ == "__main__":
    sys.exit(main())

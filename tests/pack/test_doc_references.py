"""Every file the code, tests and docs refer to is in the repository: paths inside the pack (nodes/fusion.py,
docs/methods/photoverse.md, train/face_data.py:148, ...), relative links of the Markdown pages, and bare *.md names.
Nothing points at the team's notes outside the repository."""
import os
import re
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A path that starts at one of the repository's top-level entries, e.g. `samplers/fusion_math.py:32`.
EXT = r"(?:py|md|json|sh|txt|toml|yml|yaml|ini|js|png|webp|jpg)"
PATH = re.compile(r"(?<![\w./-])((?:\.ci|[A-Za-z_][\w-]*)(?:/[\w.*-]+)+\.%s)(?::\d+)?(?![\w/])" % EXT)
MD_NAME = re.compile(r"(?<![\w./-])([\w-]+\.md)\b")
MD_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
OUTSIDE = re.compile(r"\.\./shared|/work/shared|\bseeds/\d{3}_")
# CI's optional checks (a second host, other packs for stacking tests) may use the team's shared folder when present.
CI_ONLY = re.compile(r"^(\.ci/|tests/|scripts/(ci_|setup_second_host))")


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout.split()
    return [f for f in out if os.path.exists(os.path.join(REPO, f))]


FILES = tracked_files()
TOP = {f.split("/")[0] for f in FILES}
SOURCES = [f for f in FILES if (f.endswith((".py", ".md", ".sh", ".toml", ".ini", ".txt", ".yml", ".yaml"))
           or f == ".ci/run") and f != "tests/pack/test_doc_references.py"]   # this file's examples are broken on purpose


def references(path: str, text: str):
    """(line number, referenced path, resolved path) for the references in one file that must exist."""
    here = os.path.dirname(path)
    for number, line in enumerate(text.splitlines(), 1):
        for m in PATH.finditer(line):
            ref = m.group(1)
            if ref.split("/")[0] in TOP and "*" not in ref:
                yield number, ref, ref
        if path.endswith(".md"):
            for m in MD_LINK.finditer(line):
                ref = m.group(1)
                if "://" not in ref and not ref.startswith("mailto:"):
                    yield number, ref, os.path.normpath(os.path.join(here, ref))
        for m in MD_NAME.finditer(line):
            name = m.group(1)
            yield number, name, name


def resolves(ref: str, resolved: str) -> bool:
    if os.path.exists(os.path.join(REPO, resolved)):
        return True
    if "/" not in ref and ref.endswith(".md"):   # a bare page name: some page of that name exists
        return any(f.split("/")[-1] == ref for f in FILES)
    return False


@pytest.mark.parametrize("path", SOURCES)
def test_references_resolve(path):
    text = open(os.path.join(REPO, path), encoding="utf-8", errors="replace").read()
    broken = [f"{path}:{n}: {ref}" for n, ref, resolved in references(path, text) if not resolves(ref, resolved)]
    assert not broken, "references to files that are not in the repository:\n" + "\n".join(broken)
    if not CI_ONLY.match(path):
        outside = [f"{path}:{n}" for n, line in enumerate(text.splitlines(), 1) if OUTSIDE.search(line)]
        assert not outside, "the pack and its docs must not point at files outside the repository:\n" + "\n".join(outside)


def test_the_checker_finds_broken_references():
    text = "see docs/methods/nowhere.md and samplers/fusion_math.py:32, [x](../missing.md), methods.md D.3"
    found = [(ref, resolves(ref, resolved)) for _, ref, resolved in references("docs/page.md", text)]
    assert ("docs/methods/nowhere.md", False) in found
    assert ("samplers/fusion_math.py", True) in found
    assert ("../missing.md", False) in found
    assert ("methods.md", False) in found

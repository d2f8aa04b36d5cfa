"""The README stays short and the docs stay true: links resolve, no page is orphaned, and the
curl examples answer 2xx against the live test server.

Which curl examples run: every ``curl`` command in a fenced ```bash or ```sh block of README.md
or docs/*.md whose URL is http://127.0.0.1:8000 or localhost:8000, with the test server's URL
put in its place. Not run:
- a command below a line ``# not run by tests: <why>`` in the same block (it needs Kubernetes,
  the container, a token, or it changes the server's state);
- a command whose body comes from a file (``-d @file``, ``--data-binary @file``);
- a command aimed at any other host or port.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from conftest import require_tool

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 250

FENCE = re.compile(r"^\s*```(\w*)\s*\n(.*?)^\s*```\s*$", re.S | re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
LOCAL_SERVER = re.compile(r"^(?:http://)?(?:127\.0\.0\.1|localhost):8000(?=/|$)")
NOT_RUN = "# not run by tests"


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where brackets are not links."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, markup and punctuation other than '-' and '_'
    dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    headings = re.findall(r"^#{1,6} +(.+?) *#* *$", FENCE.sub("", page.read_text()), re.M)
    return {anchor(h) for h in headings}


def relative_links(page: Path) -> list[str]:
    return [link for link in LINK.findall(prose(page.read_text()))
            if not re.match(r"^[a-z][a-z0-9+.-]*:", link)]  # http:, https:, mailto: ...


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move detail to docs/"


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.name)
def test_relative_links_resolve(page):
    broken = []
    for link in relative_links(page):
        path, _, fragment = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link}: no file {target.relative_to(ROOT)}")
        elif fragment and target.suffix == ".md" and fragment not in anchors(target):
            broken.append(f"{link}: no heading #{fragment} in {target.name}")
    assert not broken, f"{page.name}: {broken}"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / link.partition("#")[0]).resolve() for link in relative_links(README)}
    orphans = [p.name for p in DOCS.glob("*.md") if p.resolve() not in linked]
    assert not orphans, f"docs pages the README does not link: {orphans}"


def curl_examples() -> list:
    """A pytest.param(argv, id="page:line") for every curl example that runs against the local
    server."""
    examples = []
    for page in pages():
        in_fence = in_shell = skipping = False
        command, first_line = "", 0
        for number, line in enumerate(page.read_text().splitlines(), 1):
            stripped = line.strip()
            if stripped.startswith("```"):
                in_fence = not in_fence
                in_shell = in_fence and stripped[3:].strip() in ("bash", "sh")
                skipping, command = False, ""
                continue
            skipping = skipping or stripped.startswith(NOT_RUN)
            if not in_shell or not (command or stripped.startswith("curl ")):
                continue
            command, first_line = command + line + "\n", first_line if command else number
            if stripped.endswith("\\"):
                continue  # a continued line
            try:
                argv = shlex.split(command.replace("\\\n", " "), comments=True)
            except ValueError:
                continue  # a quoted body that goes on below
            command = ""
            argv = argv[:next((i for i, a in enumerate(argv) if a in ("|", "&&", ";", "&")), len(argv))]
            from_file = any(a.startswith("@") for a in argv)
            if not skipping and not from_file and any(LOCAL_SERVER.match(a) for a in argv):
                examples.append(pytest.param(argv, id=f"{page.name}:{first_line}"))
    return examples


def test_curl_examples_are_found():
    assert len(curl_examples()) >= 10, "the curl extraction broke (or the examples went away)"


@pytest.mark.serve
@pytest.mark.parametrize("argv", curl_examples())
def test_curl_example_answers_2xx(serve_cluster, argv):
    curl = require_tool("curl")
    argv = [curl] + [LOCAL_SERVER.sub(serve_cluster.url, a) for a in argv[1:]]
    result = subprocess.run([*argv, "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "60"],
                            capture_output=True, text=True, timeout=90)
    assert result.stdout.startswith("2"), f"{shlex.join(argv)}\n-> HTTP {result.stdout} {result.stderr}"

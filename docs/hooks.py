"""MkDocs hooks (``hooks:`` in mkdocs.yml): bring in what lives outside ``docs/``, offline.

- ``README.md`` is the site's home page (``index.md``): one landing page for GitHub and the site.
  Its links into ``docs/`` become site-relative (``docs/search.md`` -> ``search.md``).
- The benchmark tables and images of ``results/`` (``*.md``, ``*.png``) are copied in under
  ``results/``. Pages link them as ``../results/NAME.md`` -- right when browsing the repository,
  where ``docs/`` and ``results/`` are siblings -- and that prefix is made ``results/`` here.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
RESULT_SUFFIXES = (".md", ".png")
_DOCS_LINK = re.compile(r"\]\(docs/")
_RESULTS_LINK = re.compile(r"\]\(\.\./results/")


def on_files(files, config):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    files.append(File.generated(config, "index.md", content=_DOCS_LINK.sub("](", readme)))
    for path in sorted((ROOT / "results").iterdir()):
        if path.suffix in RESULT_SUFFIXES and path.is_file():
            files.append(File.generated(config, f"results/{path.name}", abs_src_path=str(path)))
    return files


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri.count("/") == 0:  # pages at the top of docs/: ../results/ is results/ on the site
        return _RESULTS_LINK.sub("](results/", markdown)
    return markdown

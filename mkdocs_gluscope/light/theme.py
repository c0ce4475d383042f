"""The theme's page around every light neuron page: a template block override, rendered once.

The plugin ships ``templates/gluscope/neuron.html``, a template that extends the theme's
``main.html`` and overrides its blocks (title, header, navigation, content, scripts). MkDocs'
own machinery renders it once per build, as it renders a page, for a page at a neuron's URL (so
every relative link is right for every neuron page: they are all at the same depth), with markers
where the title and the content go; each neuron page is that text with the markers replaced. A
theme without the blocks the markers are in fails the build with a message that says which block.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

TEMPLATE = "gluscope/neuron.html"
TITLE = "GLUSCOPE:TITLE"
CONTENT = "GLUSCOPE:CONTENT"
SEARCH = "GLUSCOPE:SEARCH"
#: Marker -> the block of the theme's template it is written in (what a theme must have).
MARKERS = {TITLE: "htmltitle", CONTENT: "content"}


class ThemeError(ValueError):
    """The theme cannot give the light layout its page."""


def template_dir() -> str:
    """The folder holding ``gluscope/neuron.html`` (added to the theme's template folders)."""
    return str(resources.files("mkdocs_gluscope").joinpath("templates"))


@dataclass(frozen=True)
class Shell:
    """A rendered neuron page split at its markers: ``head + title + middle + content + tail``."""

    head: str
    middle: str
    tail: str

    def page(self, title: str, content: str) -> str:
        return self.head + title + self.middle + content + self.tail


def split_shell(output: str, search_url: str) -> Shell:
    """The rendered template cut at its markers; indentation and blank lines go (a tenth of a page:
    the template holds no ``<pre>``)."""
    for marker, block in MARKERS.items():
        found = output.count(marker)
        if found != 1:
            raise ThemeError(
                f"the theme's page has {'no' if not found else found} {marker} marker(s): its template has no block "
                f"'{block}' where {TEMPLATE} puts it (the light layout needs a theme whose main.html extends a "
                f"base with the blocks {', '.join(sorted(set(MARKERS.values())))}, as mkdocs-material's does; or "
                f"override {TEMPLATE} in the theme's custom_dir)")
    output = re.sub(r"\n\s*", "\n", output.replace(SEARCH, search_url))
    head, rest = output.split(TITLE)
    middle, tail = rest.split(CONTENT)
    return Shell(head, middle, tail)


def render_shell(config: Any, env: Any, nav: Any, files: Any, url: str, search_url: str) -> Shell:
    """The neuron template rendered as MkDocs renders a page (the page context plugins see, then the
    ``post_page`` event) for a page at ``url`` (a neuron page's URL, relative to the site)."""
    import jinja2
    from mkdocs.commands.build import get_context
    from mkdocs.structure.files import File
    from mkdocs.structure.pages import Page
    from mkdocs.structure.toc import get_toc

    src = url.rstrip("/") + ".md" if url.endswith("/") else url[: -len(".html")] + ".md"
    page = Page(TITLE, File.generated(config, src, content=""), config)
    page.content, page.toc, page.meta = CONTENT, get_toc([]), {}
    if page.url.rstrip("/") + ("/" if url.endswith("/") else "") != url:
        raise ThemeError(f"a neuron page's URL came out as {page.url!r}, not {url!r}")
    try:
        template = env.get_template(TEMPLATE)
    except jinja2.TemplateNotFound as e:
        raise ThemeError(f"the theme has no template {e.name!r} (the plugin adds it to theme.dirs)") from None
    context = get_context(nav, files, config, page)
    context = config.plugins.on_page_context(context, page=page, config=config, nav=nav)
    output = config.plugins.on_post_page(template.render(context), page=page, config=config)
    return split_shell(output, search_url)

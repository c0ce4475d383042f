"""The theme's page around every light neuron page: a template block override, rendered once.

The plugin ships ``templates/gluscope/neuron.html``, a template that extends the theme's
``main.html`` and overrides two of its blocks (the title and the content) with markers. MkDocs' own
machinery renders it as it renders a page, for a page at a neuron's URL (so every relative link is
right for every neuron page at that depth), once per build and depth; the site keeps it as one file
(the *shell*, not a page: it is in no sitemap), and ``assets/gluscope/stub.js`` turns each neuron page,
a stub of a few hundred bytes, into the shell with the stub's title and content where the markers
are. A theme without the blocks the markers are in fails the build with a message that says which.
"""

from __future__ import annotations

from importlib import resources
from typing import Any, Sequence

TEMPLATE = "gluscope/neuron.html"
TITLE = "GLUSCOPE:TITLE"
CONTENT = "GLUSCOPE:CONTENT"
#: Marker -> the block of the theme's template it is written in (what a theme must have).
MARKERS = {TITLE: "htmltitle", CONTENT: "content"}


class ThemeError(ValueError):
    """The theme cannot give the light layout its page."""


def template_dir() -> str:
    """The folder holding ``gluscope/neuron.html`` (added to the theme's template folders)."""
    return str(resources.files("mkdocs_gluscope").joinpath("templates"))


def check_shell(output: str) -> str:
    """The rendered template, checked: its content marker once, its title marker at least once (a theme
    may show the title in its header too)."""
    for marker, block in MARKERS.items():
        found = output.count(marker)
        if not found or (marker == CONTENT and found != 1):
            raise ThemeError(
                f"the theme's page has {found or 'no'} {marker} marker(s): its template has no block "
                f"'{block}' where {TEMPLATE} puts it (the light layout needs a theme whose main.html extends a "
                f"base with the blocks {', '.join(sorted(set(MARKERS.values())))}, as mkdocs-material's does; or "
                f"override {TEMPLATE} in the theme's custom_dir)")
    return output


def render_shell(config: Any, env: Any, nav: Any, files: Any, url: str, vendor_modules: Sequence[str] = ()) -> str:
    """The neuron template rendered as MkDocs renders a page (the page context plugins see, then the
    ``post_page`` event) for a page at ``url`` (a neuron page's URL, relative to the site).
    ``vendor_modules``: the Parquet reader's modules (below ``assets/gluscope/``), preloaded."""
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
    context["gluscope_vendor_modules"] = list(vendor_modules)
    output = config.plugins.on_post_page(template.render(context), page=page, config=config)
    return check_shell(output)

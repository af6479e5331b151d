"""Write each inline script of a page once.

Sphinx 7.4 adds an inline script that an extension registers after the HTML
builder has started (sphinx-thebe's configuration is one) to every page twice,
once under the file name None and once under ''. The second copy declares the
same constants again, and the browser stops it with a SyntaxError. This drops
the copy before the page is written.
"""

from __future__ import annotations

from typing import Any

from sphinx.application import Sphinx


def _drop_repeated_scripts(app: Sphinx, pagename: str, templatename: str, context: dict[str, Any], doctree: Any) -> None:
    seen = set()
    unique = []
    for script in context.get("script_files", []):
        key = (script.filename or "", script.priority, tuple(sorted(script.attributes.items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"] = unique


def setup(app: Sphinx) -> dict[str, bool]:
    app.connect("html-page-context", _drop_repeated_scripts)
    return {"parallel_read_safe": True, "parallel_write_safe": True}

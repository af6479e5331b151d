"""A bibliography whose labels read like the citations in the text.

With ``bibtex_reference_style = "author_year"`` the text cites (Dao et al.,
2022), but pybtex's styles label the entries of the bibliography [DFE+22].
This registers the pybtex style ``author_year``: pybtex's ``unsrt``
formatting, sorted by author, year and title, with labels in the form the text
uses. Select it with ``bibtex_default_style = "author_year"``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from pybtex.database import Entry
from pybtex.plugin import register_plugin
from pybtex.style.formatting.unsrt import Style as UnsrtStyle
from pybtex.style.labels import BaseLabelStyle
from sphinx.application import Sphinx


class AuthorYearLabels(BaseLabelStyle):
    """Labels "Shazeer, 2019", "Milakov and Gimelshein, 2018", "Dao et al., 2022"."""

    def format_labels(self, sorted_entries: Iterable[Entry]) -> Iterator[str]:
        for entry in sorted_entries:
            last = [" ".join(person.prelast_names + person.last_names) for person in entry.persons["author"]]
            if len(last) == 1:
                names = last[0]
            elif len(last) == 2:
                names = f"{last[0]} and {last[1]}"
            else:
                names = f"{last[0]} et al."
            yield f"{names}, {entry.fields['year']}"


class AuthorYearStyle(UnsrtStyle):
    default_label_style = AuthorYearLabels
    default_sorting_style = "author_year_title"


def setup(app: Sphinx) -> dict[str, bool]:
    register_plugin("pybtex.style.formatting", "author_year", AuthorYearStyle)
    return {"parallel_read_safe": True, "parallel_write_safe": True}

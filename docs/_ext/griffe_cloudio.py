"""A griffe extension for the API reference: cloudio's numpydoc docstrings as mkdocstrings renders them.

The docstrings are written for Sphinx-style readers (``:func:`cloudio.open```)
and give parameter types only in the signatures. Markdown knows neither roles
nor griffe's rule that grouped names (``mode, driver, ...``) share the first
one's type, so without this the page shows literal roles and wrong types.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

# :func:`target`, :class:`~target`, ... (any Sphinx Python-domain role)
_ROLE = re.compile(r":(?:func|class|meth|attr|mod|exc|data|obj):`(~?)([\w.]+)`")


def _role_to_markdown(match: re.Match[str]) -> str:
    """A link for public cloudio names (the strict build fails if it has no target), code otherwise."""
    short, target = match.group(1), match.group(2)
    title = target.rsplit(".", 1)[-1] if short else target
    parts = target.split(".")
    if parts[0] == "cloudio" and not any(p.startswith("_") for p in parts):
        return f"[`{title}`][{target}]"
    return f"`{title}`"


class CloudioDocstrings(griffe.Extension):
    """Rewrite roles to Markdown; give a parameter its signature's type, or keep a group as one row."""

    def on_object(self, *, obj: griffe.Object, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if obj.docstring is None:
            return
        obj.docstring.value = _ROLE.sub(_role_to_markdown, obj.docstring.value)
        if not isinstance(obj, griffe.Function):
            return
        for section in obj.docstring.parsed:
            if section.kind is griffe.DocstringSectionKind.parameters:
                section.value = _typed_parameters(obj, section.value)


def _typed_parameters(
    func: griffe.Function, params: list[griffe.DocstringParameter]
) -> list[griffe.DocstringParameter]:
    """One row per documented entry: a single name typed from the signature, a group untyped."""
    rows: list[griffe.DocstringParameter] = []
    for param in params:
        if rows and rows[-1].description == param.description:  # griffe split "a, b" into rows
            rows[-1].name = f"{rows[-1].name}, {param.name}"
            rows[-1].annotation = rows[-1].value = None
            continue
        name = param.name.lstrip("*")
        if name in func.parameters:
            param.annotation = func.parameters[name].annotation
            param.value = func.parameters[name].default
        rows.append(param)
    return rows

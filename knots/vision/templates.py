"""The standard zero-shot prompt templates of the eight vision tasks (Ilharco et al., task vectors).

Each template has one ``{}`` for the class name. Sizes: cars 8, dtd 8, eurosat 3, gtsrb 3, mnist 1,
resisc45 18, sun397 2, svhn 1.
"""

from __future__ import annotations

from knots.errors import ConfigError


TEMPLATES: dict[str, list[str]] = {
    "cars": [
        "a photo of a {}.", "a photo of the {}.", "a photo of my {}.", "i love my {}!",
        "a photo of my dirty {}.", "a photo of my clean {}.", "a photo of my new {}.", "a photo of my old {}.",
    ],
    "dtd": [f"a photo of {art} {{}} {thing}." for art in ("a", "the")
            for thing in ("texture", "pattern", "thing", "object")],
    "eurosat": [f"a centered satellite photo of {art}{{}}." for art in ("", "a ", "the ")],
    "gtsrb": [f'a {view} photo of a "{{}}" traffic sign.' for view in ("zoomed in", "centered", "close up")],
    "mnist": ['a photo of the number: "{}".'],
    "resisc45": [f"{kind} {medium} of {art}{{}}." for art in ("", "a ", "the ")
                 for medium in ("imagery", "photo", "view") for kind in ("satellite", "aerial")],
    "sun397": ["a photo of a {}.", "a photo of the {}."],
    "svhn": ['a photo of the number: "{}".'],
}


def templates_for(task: str) -> list[str]:
    """The template list of a task (a copy)."""
    if task not in TEMPLATES:
        raise ConfigError(f"no prompt templates for task {task!r}; known: {', '.join(sorted(TEMPLATES))}")
    return list(TEMPLATES[task])

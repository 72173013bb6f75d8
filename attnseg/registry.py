"""Name -> factory registries.

A registry maps a name to a callable with an explicit signature, and does nothing else: it raises on a
duplicate name (torchvision's rule, not timm's warn-and-overwrite), and an unknown name raises a
``KeyError`` that lists the closest registered names. Config validation (``attnseg.config``) checks
names and keyword arguments against these registries before anything is built.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

__all__ = ["Registry", "BACKBONES", "HEADS", "MODELS", "DATASETS", "LOSSES", "suggest"]

F = TypeVar("F", bound=Callable[..., Any])


def suggest(name: str, choices: list[str] | tuple[str, ...] | Any) -> str:
    """Return a ``"; did you mean 'x'?"`` suffix for the closest of ``choices``, or ``""``."""
    matches = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean '{matches[0]}'?" if matches else ""


class Registry:
    """A named table of factories.

    Example::

        BACKBONES = Registry("backbone")

        @BACKBONES.register()
        def mambaout_femto(**kwargs): ...

        BACKBONES.get("mambaout_femto")(num_classes=10)
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., Any]] = {}
        self._classes: dict[str, type] = {}

    def register(self, name: str | None = None, *, cls: type | None = None) -> Callable[[F], F]:
        """Decorator registering ``fn`` under ``name`` (default: its ``__name__``).

        ``cls`` names the class a ``**kwargs`` factory forwards to, so that config validation can check
        keyword arguments against that class's ``__init__`` (a variant factory fixes some of them).
        """

        def deco(fn: F) -> F:
            key = name or fn.__name__
            if key in self._entries and self._entries[key] is not fn:
                raise ValueError(f"{self.kind} '{key}' is already registered (by {self._entries[key].__module__})")
            self._entries[key] = fn
            if cls is not None:
                self._classes[key] = cls
            return fn

        return deco

    def parameters(self, name: str) -> dict[str, inspect.Parameter]:
        """Keyword parameters the factory ``name`` accepts (following ``**kwargs`` to its registered class).

        A factory that takes ``**kwargs`` and has no registered class accepts anything; the returned dict then
        holds a ``VAR_KEYWORD`` entry under ``"**"``.
        """
        fn = self.get(name)
        params: dict[str, inspect.Parameter] = {}
        var_kw = False
        for p in inspect.signature(fn).parameters.values():
            if p.kind is p.VAR_KEYWORD:
                var_kw = True
            elif p.kind is not p.VAR_POSITIONAL:
                params[p.name] = p
        if var_kw:
            owner = self._classes.get(name)
            if owner is None:
                params["**"] = inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)
            else:
                for p in list(inspect.signature(owner.__init__).parameters.values())[1:]:
                    if p.kind is p.VAR_KEYWORD:
                        params["**"] = p
                    elif p.kind is not p.VAR_POSITIONAL:
                        params.setdefault(p.name, p)
        return params

    def get(self, name: str) -> Callable[..., Any]:
        """Return the factory registered as ``name``; ``KeyError`` with a suggestion otherwise."""
        _ensure_populated()
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{self.kind} '{name}' is not registered{suggest(name, self._entries)}") from None

    def owner_class(self, name: str) -> type | None:
        """The class a ``**kwargs`` factory forwards to, when it was registered with ``cls=``."""
        self.get(name)
        return self._classes.get(name)

    def names(self) -> list[str]:
        _ensure_populated()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        _ensure_populated()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        _ensure_populated()
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._entries)} entries)"


def _ensure_populated() -> None:
    # Registration happens when the family modules are imported; importing them here (lazily, once) means a
    # lookup never misses a name just because the caller imported `attnseg.registry` first.
    import attnseg.backbones  # noqa: F401
    import attnseg.datasets  # noqa: F401
    import attnseg.engine.losses  # noqa: F401
    import attnseg.heads  # noqa: F401
    import attnseg.models  # noqa: F401


BACKBONES = Registry("backbone")
HEADS = Registry("head")
MODELS = Registry("model")
DATASETS = Registry("dataset")
LOSSES = Registry("loss")

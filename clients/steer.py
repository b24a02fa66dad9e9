"""A typed builder for the `steer` request object, validated with the server's own Specs.

    from openai import OpenAI
    from steerserve.clients import Steer

    steer = Steer().infosteer(alpha=1.5, layers=[10, 11, 12])
    steer = Steer().context_attention(alpha=0.5, heads="default")     # PASTA-style emphasis
    steer = Steer().mixing("taia").proxy(pair="demo", alpha=0.5).context_indicator()
    steer = Steer().vector("joy", 0.8).vector("calm", -0.5, layers=[10, 11], positions="generated")
    client.chat.completions.create(model=..., messages=..., extra_body=steer.extra_body())

Every steer of the registry (`steerserve.patches.steers`) has a builder method of its name, by
construction: its arguments are the fields of that steer's Spec, and its value is validated by
that Spec (pydantic.ValidationError on values no model accepts). A steer whose value is a list
also has a method that appends one item (`Steer.item`: `vector` for `vectors`). Imports neither
torch nor vLLM.
"""

from __future__ import annotations

from typing import Any

from steerserve.patches.steers import BY_NAME

ITEMS = {s.item: s for s in BY_NAME.values() if s.item}  # item method name -> its list steer


class Steer:
    """Immutable builder: each method returns a new `Steer` with one more field set."""

    def __init__(self, fields: dict[str, Any] | None = None):
        self._fields = dict(fields or {})

    def _with(self, name: str, value: Any) -> Steer:
        return Steer({**self._fields, name: value})

    def __getattr__(self, name: str):
        steer = BY_NAME.get(name)
        owner = ITEMS.get(name)
        if owner is not None:
            def add(*args, **kwargs) -> Steer:
                return self._with(owner.name, [*self._fields.get(owner.name, []), owner.build_item(*args, **kwargs)])

            add.__name__ = name
            add.__doc__ = f"Append one item to steer.{owner.name}: {owner.build_item.__doc__ or ''}".strip()
            return add
        if steer is None:
            raise AttributeError(f"Steer has no steer {name!r}; steers: {', '.join(BY_NAME)} (and profile, "
                                 "experiment)")

        def build(*args, **kwargs) -> Steer:
            return self._with(name, steer.build(*args, **kwargs))

        build.__name__ = name
        build.__doc__ = f"steer.{name}: {steer.summary}. {steer.build.__doc__ or ''}".strip()
        return build

    def __dir__(self):
        return [*super().__dir__(), *BY_NAME, *ITEMS]

    def set(self, name: str, value: Any) -> Steer:
        """Set `steer.<name>` to a JSON value (an object, a shorthand string, a bool: what the wire
        takes), validated with the steer's Spec; `profile` and `experiment` take their name."""
        if name in ("profile", "experiment"):
            return getattr(self, name)(value)
        steer = BY_NAME.get(name)
        if steer is None:
            raise ValueError(f"unknown steer {name!r}; steers: {', '.join(BY_NAME)} (and profile, experiment)")
        from pydantic import BaseModel, TypeAdapter

        checked = TypeAdapter(steer.spec_type()).validate_python(value)
        return self._with(name, checked.model_dump(exclude_none=True) if isinstance(checked, BaseModel) else checked)

    @classmethod
    def from_dict(cls, body: dict) -> Steer:
        """A builder holding the `steer` object `body` (each field validated as by `set`)."""
        steer = cls()
        for name, value in body.items():
            steer = steer.set(name, value)
        return steer

    def profile(self, name: str) -> Steer:
        """Use a server-side profile (the other steers set here override its fields)."""
        if not isinstance(name, str):
            raise TypeError("a profile name is a string")
        return self._with("profile", name)

    def experiment(self, name: str) -> Steer:
        """Join a server-side A/B experiment (alone; send a `user` unit key with the request)."""
        if not isinstance(name, str):
            raise TypeError("an experiment name is a string")
        return self._with("experiment", name)

    def to_dict(self) -> dict:
        """The `steer` object as JSON-ready data (unset fields left to the server's defaults)."""
        return dict(self._fields)

    def extra_body(self, **more) -> dict:
        """`extra_body` for the OpenAI SDK: {"steer": {...}, **more}."""
        return {"steer": self.to_dict(), **more}

    def __repr__(self) -> str:
        return f"Steer({self.to_dict()})"

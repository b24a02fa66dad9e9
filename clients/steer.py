"""A typed builder for the `steer` request object, validated against the server's own schema.

    from openai import OpenAI
    from steerserve.clients import Steer

    steer = Steer().infosteer(alpha=1.5, layers=[10, 11, 12])
    steer = Steer().context_attention(alpha=0.5, heads="default")     # PASTA-style emphasis
    client.chat.completions.create(model=..., messages=..., extra_body=steer.extra_body())
"""

from __future__ import annotations

from typing import Literal

from steerserve.server.schema import ContextAttentionSpec, InfoSteerSpec, SteerSpec


class Steer:
    """Immutable builder: each method returns a new `Steer` with one more steer set."""

    def __init__(self, spec: SteerSpec | None = None):
        self._spec = spec or SteerSpec()

    def infosteer(
        self,
        alpha: float,
        mode: Literal["scale", "topk", "lift"] = "scale",
        layers: Literal["all"] | list[int] = "all",
        k: int | None = None,
        p: float | None = None,
    ) -> Steer:
        """FFN memory amplification; raises pydantic.ValidationError on values no model accepts."""
        info = InfoSteerSpec(alpha=float(alpha), mode=mode, layers=layers, k=k, p=p)
        return Steer(self._spec.model_copy(update={"infosteer": info}))

    def context_attention(
        self,
        alpha: float | None = None,
        layers: Literal["all"] | list[int] = "all",
        heads: Literal["all"] | list[list[int]] | str | None = None,
        emphasis: Literal["user", "last_user", "marked"] | None = None,
    ) -> Steer:
        """User-context attention steering (PASTA-style); `None` leaves a field to the server's
        default (alpha by head set, the server's default head set, emphasis "user" on chat)."""
        spec = ContextAttentionSpec(
            alpha=None if alpha is None else float(alpha), layers=layers,
            heads=[list(p) for p in heads] if isinstance(heads, (list, tuple)) else heads, emphasis=emphasis,
        )
        return Steer(self._spec.model_copy(update={"context_attention": spec}))

    def profile(self, name: str) -> Steer:
        """Use a server-side profile (the other steers set here override its fields)."""
        return Steer(self._spec.model_copy(update={"profile": name}))

    def to_dict(self) -> dict:
        """The `steer` object as JSON-ready data (unset fields left to the server's defaults)."""
        return self._spec.model_dump(exclude_none=True, exclude_unset=False, exclude_defaults=False)

    def extra_body(self, **more) -> dict:
        """`extra_body` for the OpenAI SDK: {"steer": {...}, **more}."""
        return {"steer": self.to_dict(), **more}

    def __repr__(self) -> str:
        return f"Steer({self.to_dict()})"

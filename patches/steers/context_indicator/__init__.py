"""The context-dependency indicator: the text a model was trained to see after context-dependent
user turns, appended to every user message (docs/families.md). Its plan is that text; the
server appends it to the messages before rendering."""

from __future__ import annotations

from ..base import ServingContext, Steer, SteerError, shown


def apply_indicator(messages: list, text: str) -> list:
    """Append `text` to every user message (string content or the last text part): what the server
    does for `steer.context_indicator: true`, and what training did to marked conversations."""
    out = []
    for m in messages:
        if isinstance(m, dict) and m.get("role") == "user":
            content = m.get("content")
            if isinstance(content, str):
                m = {**m, "content": content + text}
            elif isinstance(content, list):
                idx = [j for j, p in enumerate(content) if isinstance(p, dict) and p.get("type") == "text"]
                if idx:
                    parts = list(content)
                    parts[idx[-1]] = {**parts[idx[-1]], "text": parts[idx[-1]].get("text", "") + text}
                    m = {**m, "content": parts}
                else:
                    m = {**m, "content": [*content, {"type": "text", "text": text}]}
        out.append(m)
    return out


class ContextIndicator(Steer):
    name = "context_indicator"
    Spec = bool
    Plan = str
    summary = ("append the context-dependency indicator the model was trained with to every user message "
               "(chat only; 400 for models trained without one)")

    def spec_models(self):
        return []

    def build(self, on: bool = True) -> bool:
        if not isinstance(on, bool):
            raise TypeError("Steer().context_indicator() takes a bool")
        return on

    def normalise(self, spec: bool, ctx: ServingContext) -> str | None:
        if not spec:
            return None
        field = "steer.context_indicator"
        if ctx.endpoint != "chat":
            raise SteerError(field, "only on /v1/chat/completions (the indicator is appended to user messages)")
        indicator = ctx.family.indicator_for(ctx.model)
        if indicator is None:
            who = ctx.model or ctx.family.base_name or "the served model"
            raise SteerError(field, f"model {shown(who)} was not trained with a context-dependency indicator (its "
                                    "steerserve.json has no context_indicator; train with `steerserve train sft "
                                    "--context-indicator`)")
        return indicator

    def prepare_request(self, request, plan: str, ctx: ServingContext) -> None:
        """Append the indicator to every user message (mutates `request.messages`)."""
        request.messages = apply_indicator(list(request.messages), plan)
        return None

    def plan_from_json(self, body: str) -> str:
        return body

    def echo(self, plan: str) -> dict:
        return {"steer": "context_indicator", "text": plan}


STEER = ContextIndicator()

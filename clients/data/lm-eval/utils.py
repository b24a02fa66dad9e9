"""lm-evaluation-harness tasks over steerserve's first questions (clients/data/first-questions.jsonl),
for docs/clients.md's recipe: the data ships with steerserve, so the tasks run offline."""

import json
from pathlib import Path


def load(**kwargs):
    """The questions as the harness's test split (`custom_dataset` in the task files)."""
    import datasets

    path = Path(__file__).resolve().parents[1] / "first-questions.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {"test": datasets.Dataset.from_list(rows)}


def answered(doc, results):
    """1.0 when the generated answer contains one of the question's references (case-insensitive)."""
    text = results[0].lower()
    return {"answered": float(any(ref.lower() in text for ref in doc["references"]))}

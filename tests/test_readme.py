"""The README documents what the commands write."""

import json
import re
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _documented(key: str) -> bool:
  """`key` in backquotes in the README, or an instance of a documented `<...>` pattern."""
  if f"`{key}`" in README:
    return True
  patterns = re.findall(r"`([\w/]*<\w+>[\w/]*)`", README)
  return any(re.fullmatch(re.sub(r"<\w+>", r"\\w+", p), key) for p in patterns)


def test_every_metrics_jsonl_key_of_a_training_run_is_documented(kang_pretrained):
  rows = [json.loads(line) for line in (kang_pretrained / "metrics.jsonl").read_text().splitlines()]
  keys = set().union(*rows)
  assert {"batch_checksum", "accuracy", "steps_per_s", "eval_loss"} <= keys  # a real run's rows
  assert [k for k in sorted(keys) if not _documented(k)] == []

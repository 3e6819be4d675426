"""Run a tinker-cookbook recipe with hub datasets served from local JSONL files (test-only).

Some recipes read their data only by hub name (`datasets.load_dataset("Anthropic/hh-rlhf")`)
and have no option for a local file. This wrapper answers `datasets.load_dataset` for the
names in $OFFLINE_DATASETS (JSON: {"org/name": {"train": "a.jsonl", "test": "b.jsonl"}}) from
those files, then runs the recipe module as `python -m` would. The cookbook's files stay as
they are.

usage: offline_hub_datasets.py MODULE [key=value ...]
"""

import json
import os
import runpy
import sys

import datasets

LOCAL = json.loads(os.environ["OFFLINE_DATASETS"])
hub_load_dataset = datasets.load_dataset


def load_dataset(path, *args, split=None, **kwargs):
    if path not in LOCAL:
        return hub_load_dataset(path, *args, split=split, **kwargs)
    splits = datasets.DatasetDict(
        {name: datasets.Dataset.from_json(file) for name, file in LOCAL[path].items()}
    )
    return splits if split is None else splits[split]


datasets.load_dataset = load_dataset
module = sys.argv[1]
sys.argv = [module, *sys.argv[2:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)

"""The mean NLL of a saved training state on one batch of the chat SFT recipe's dataset, built
by the recipe's own dataset builder (run by tests/test_cookbook.py with the cookbook
environment's Python). Tells what a run resumed from that state must log for that batch.

usage: cookbook_batch_nll.py BASE_URL MODEL_NAME JSONL BATCH_SIZE MAX_LENGTH STATE_PATH BATCH
"""

import sys

import tinker
from tinker_cookbook.recipes.chat_sl.train import get_dataset_builder
from tinker_cookbook.supervised.common import compute_mean_nll

base_url, model_name, jsonl, batch_size, max_length, state_path, batch = sys.argv[1:8]
builder = get_dataset_builder(jsonl, model_name, "qwen3_instruct", int(max_length), int(batch_size))
dataset, _ = builder()
dataset.set_epoch(seed=0)  # what the recipe does at the start of epoch 0
data = dataset.get_batch(int(batch))
service = tinker.ServiceClient(base_url=base_url)
training = service.create_training_client_from_state(state_path)
out = training.forward(data, "cross_entropy").result()
logprobs = [x["logprobs"] for x in out.loss_fn_outputs]
print(compute_mean_nll(logprobs, [d.loss_fn_inputs["weights"] for d in data]))

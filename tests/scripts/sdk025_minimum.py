"""The minimum Tinker script with SDK 0.25 (run by tests/test_checkpoints_rest.py with the
0.25 environment's Python): train, sample, save, restore (0.25's own flow: weights_info,
create_model, load_weights at seq 1), list checkpoints."""

import sys

import tinker
from tinker import types

base_url, api_key, base = sys.argv[1:4]
assert tinker.__version__ == "0.25.0", tinker.__version__
sc = tinker.ServiceClient(base_url=base_url, api_key=api_key)
names = [m.model_name for m in sc.get_server_capabilities().supported_models]
assert base in names, names
tc = sc.create_lora_training_client(base_model=base, rank=4)
datum = types.Datum(
    model_input=types.ModelInput.from_ints([5, 9, 13, 21, 34]),
    loss_fn_inputs={"target_tokens": [9, 13, 21, 34, 55]},
)
losses = []
for _ in range(4):
    losses.append(tc.forward_backward([datum], "cross_entropy").result().metrics["loss:sum"])
    # the adapter init is unseeded (as 0.25 clients send it): a rate that falls from any init
    tc.optim_step(types.AdamParams(learning_rate=0.01)).result()
assert losses[-1] < losses[0], losses
sampler = tc.save_weights_and_get_sampling_client()
res = sampler.sample(
    types.ModelInput.from_ints([5, 9]), 2, types.SamplingParams(max_tokens=4, temperature=0.7)
).result()
assert len(res.sequences) == 2 and all(s.logprobs for s in res.sequences)
path = tc.save_state("sdk025").result().path
loss = tc.forward([datum], "cross_entropy").result().metrics["loss:sum"]
restored = sc.create_training_client_from_state(path)
assert restored.forward([datum], "cross_entropy").result().metrics["loss:sum"] == loss
rest = sc.create_rest_client()
listed = rest.list_checkpoints(tc.model_id).result().checkpoints
assert [c.checkpoint_id for c in listed] == ["weights/sdk025"], listed
print("OK", losses)

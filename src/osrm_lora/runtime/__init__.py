"""Code that loads and runs models, kept apart from the pure tensor maths of `merge/`, `subspace` and `init`.

- `models`: the task's sequence-classification model and tokenizer (`load_model_and_tokenizer`);
- `weights`: writing W0 + ΔW into target linear weights and mapping an adapter's task head to the model's
  parameter names, shared by the in-memory merge (`merge.apply`), the sharded merge and evaluation;
- `fisher`: diagonal Fisher estimation (forward and backward passes) and its file format.

Nothing is imported here, so importing one of them does not pull in the others' dependencies.
"""

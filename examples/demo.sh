#!/usr/bin/env bash
# The README's main command: a real LoRA fine-tune on CPU with a tiny random-weight Llama and the
# bundled example data, driven through the CLI like a user would.
set -euo pipefail
cd "$(dirname "$0")/.."
export TUNEKIT_HOME=${TUNEKIT_HOME:-$PWD/out/tunekit-home}
model=${MODEL:-$PWD/out/tiny-llama}

echo "== 1. validate the example data"
tunekit validate examples/data/train.jsonl --backend local
tunekit validate examples/data/valid.jsonl --backend local

echo "== 2. a tiny random-weight Llama (built in code; nothing is downloaded)"
python -m tunekit.testing "$model" --hidden-size 128 --layers 2

echo "== 3. plan: how the local backend honours each field"
cat > out/spec.json <<JSON
{"base_model": "$model",
 "hyperparameters": {"epochs": 3, "batch_size": 8, "learning_rate": 0.002, "max_length": 256},
 "adapter": {"r": 16, "alpha": 32},
 "provider_options": {"local": {"checkpoint_steps": 10}}}
JSON
tunekit plan out/spec.json --backend local

echo "== 4. start the job (a detached worker process trains; this shell could exit)"
job=$(tunekit finetune examples/data/train.jsonl --backend local --spec out/spec.json \
      --validation-data examples/data/valid.jsonl)
echo "job: $job"

echo "== 5. progress, then the final status"
tunekit jobs wait "$job"
tunekit jobs status "$job"
tunekit jobs metrics "$job" --plot out/loss.png

echo "== 6. the adapter and its registry entry"
tunekit adapters list
tunekit adapters show "$job"

"""The same script for every backend: only --backend changes.

    python examples/quickstart.py --backend together --base-model llama-3.1-8b-instruct
    python examples/quickstart.py --backend local --base-model /path/to/model   # or a HF id
"""

import argparse
from pathlib import Path

import tunekit

HERE = Path(__file__).parent

parser = argparse.ArgumentParser()
parser.add_argument("--backend", default="local")
parser.add_argument("--base-model", default="llama-3.1-8b-instruct")
parser.add_argument("--data", default=str(HERE / "data" / "train.jsonl"))
parser.add_argument("--epochs", type=int, default=1)
parser.add_argument("--timeout", type=float, default=None)
args = parser.parse_args()

report = tunekit.validate(args.data, backend=args.backend)
print(report.summary())
job = tunekit.finetune(
    args.data,
    base_model=args.base_model,
    backend=args.backend,
    hyperparameters={"epochs": args.epochs},
)
print(f"started {job.id} on {job.backend_name}")
job.wait(timeout=args.timeout)
print(job.status.value, job.result.model if job.result else job.error)

"""Worker for tests/test_launch_cli.py, run under ``accelerate launch --use_deepspeed`` (ZeRO-3, CPU).

argv: model_dir out_dir. Loads the model with ``load_model_and_tokenizer`` (the pipelines' loader) and writes
out_dir/load-<rank>.json: the elements this rank holds (``ds_tensor.numel()``) and the model's (``ds_numel``),
and the elements of the largest parameter held whole (``numel()`` of a parameter without a partition).
"""
import json
import os
import sys
from pathlib import Path

from fastweight.train.models import load_model_and_tokenizer
from fastweight.train.zero3 import local_and_full_numel

model_dir, out = sys.argv[1], Path(sys.argv[2])
model, _ = load_model_and_tokenizer(model_dir)
local, full = local_and_full_numel(model)
whole = max((p.numel() for p in model.parameters() if not hasattr(p, "ds_tensor")), default=0)
shard = max(p.ds_tensor.numel() for p in model.parameters() if hasattr(p, "ds_tensor"))
rank = int(os.environ["RANK"])
(out / f"load-{rank}.json").write_text(json.dumps({"local": local, "full": full, "largest_whole": whole,
                                                    "largest_shard": shard,
                                                    "params": sum(1 for _ in model.parameters())}))
import torch.distributed as dist  # noqa: E402

dist.barrier()
dist.destroy_process_group()

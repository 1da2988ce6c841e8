"""The FSDP2 branch of `prepare_reference_model`, on CPU processes (gloo): run with
`torchrun --standalone --nproc_per_node 2 fsdp2_reference.py REPORT_DIR`.

accelerate never selects FSDP on a CPU-only machine (it falls back to DDP), so the Trainer cannot reach this branch
here; `fully_shard` itself runs on CPU, so the function is called with the accelerate FSDP2 plugin a GPU launch
would build, on a stand-in for the Accelerator that has the attributes it reads. Every process but rank 0 starts
from different weights, as with CPU-RAM-efficient loading (where they hold none): the reference must end up with
rank 0's weights. Writes REPORT_DIR/rank<i>.json: the reference's type, mode, which layers are their own FSDP
groups, the parameter elements held here, and the largest logit difference from rank 0's unsharded model.
"""

import json
import os
import sys
import types

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for conftest's FACTS


def main(report_dir: str) -> None:
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from conftest import FACTS
    from torch.distributed.fsdp import FSDPModule

    from gnm_trainer.distributed import parameter_counts
    from gnm_trainer.reference import frozen_copy, prepare_reference_model
    from gnm_trainer.target import build_tiny_llama, train_tokenizer

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tokenizer = train_tokenizer([f"{q} {a}" for q, a in FACTS], vocab_size=300)
    build = lambda seed: build_tiny_llama(tokenizer, 32, 2, 2, max_position_embeddings=64, seed=seed)  # noqa: E731
    batch = tokenizer([f"{q} {a}" for q, a in FACTS[:3]], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = build(0)(**batch).logits  # rank 0's model, unsharded
    os.environ["ACCELERATE_USE_FSDP"] = "true"
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True,
        cpu_ram_efficient_loading=True, state_dict_type="SHARDED_STATE_DICT",
    )  # fmt: skip
    accelerator = types.SimpleNamespace(
        distributed_type=DistributedType.FSDP, is_fsdp2=True, state=types.SimpleNamespace(fsdp_plugin=plugin),
        mixed_precision="no", device=torch.device("cpu"), is_main_process=rank == 0,
    )  # fmt: skip
    reference = prepare_reference_model(accelerator, frozen_copy(build(rank)))
    with torch.no_grad():
        logits = reference(**batch).logits
    local, total = parameter_counts(reference)
    report = {
        "process_index": rank,
        "num_processes": dist.get_world_size(),
        "reference_type": type(reference).__name__,
        "reference_training": reference.training,
        "requires_grad": any(p.requires_grad for p in reference.parameters()),
        "layers_sharded": [isinstance(layer, FSDPModule) for layer in reference.model.layers],
        "root_sharded": isinstance(reference, FSDPModule),
        "reference_local_elements": local,
        "reference_total_elements": total,
        "max_logit_difference": (logits - expected).abs().max().item(),
    }
    os.makedirs(report_dir, exist_ok=True)
    with open(os.path.join(report_dir, f"rank{rank}.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

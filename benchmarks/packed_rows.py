"""Packed rows on CPU: the row-length bound, the attention implementation, and logits only where a loss reads.

    OMP_NUM_THREADS=1 python benchmarks/packed_rows.py [--data /work/shared/data/lume] [--batches 3] [--repeats 3]
        [--bounds 256,512,...] [--models tiny,20M]

One step's policy sequences of the paper's recipe (forget, retain and a negative per forget row: LUME prompts and
completions, random batches of 8, `max_length` 512, `max_prompt_length` 384, a 4096-token tokenizer trained on
them) go forward and backward through a random Llama, the tiny one of the tests and a ~20M one with a 50k
vocabulary: padded (one pass), packed under each bound of the sweep, then at the default bound with eager and flex
attention and with the logits of every position. Each time is the fastest of `--repeats` runs (the machine is
shared), summed over `--batches` batches. Memory is how far the resident set rose during the first batch's step
(forward + backward), each layout in an interpreter of its own. Prints one JSON line per measurement; the figures
are in docs/performance.md, "Packed rows".
"""

import argparse
import json
import os
import time

import torch

MODELS = {  # LlamaConfig sizes
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=4096),
    "20M": dict(hidden_size=320, intermediate_size=864, num_hidden_layers=6, num_attention_heads=5, vocab_size=50304),
}
BOUNDS = (256, 512, 1024, 2048, 4096, 8192)


def build_model(size: dict, attention: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(num_key_value_heads=size["num_attention_heads"], max_position_embeddings=1024,
                         tie_word_embeddings=False, **size)  # fmt: skip
    model = LlamaForCausalLM(config)
    model.set_attn_implementation(attention)
    return model.train()


def step_batches(data_dir: str, batches: int, batch_size: int = 8, seed: int = 0):
    """Padded groups (forget, retain, negative) of `batches` random batches of LUME rows, as the collator gives them."""
    from gnm_trainer.data.collator import GNMDataCollator, select_negatives, tokenize_examples
    from gnm_trainer.data.loading import load_unlearning_data
    from gnm_trainer.target import train_tokenizer

    forget = load_unlearning_data(os.path.join(data_dir, "forget_train.jsonl"), "forget")
    retain = load_unlearning_data(os.path.join(data_dir, "retain_train.jsonl"), "retain")
    tokenizer = train_tokenizer([f"{r['prompt']} {r['completion']}" for r in list(forget) + list(retain)], vocab_size=4096)
    tokenize = dict(tokenizer=tokenizer, template="{prompt} {completion}", max_length=512, max_prompt_length=384,
                    add_eos_token=True)  # fmt: skip
    forget_examples = tokenize_examples(forget, name="forget", **tokenize)
    retain_examples = tokenize_examples(retain, name="retain", **tokenize)
    generator = torch.Generator().manual_seed(seed)
    shuffled = torch.randperm(len(forget_examples), generator=generator).tolist()
    negatives = {e["id"]: [forget_examples[j]["completion_input_ids"]] for e, j in zip(forget_examples, shuffled)}
    collator = GNMDataCollator(pad_token_id=tokenizer.pad_token_id, max_length=512, max_prompt_length=384, retain_examples=retain_examples,
                               negative_completions=negatives, use_retain=True, use_negatives=True, seed=seed)  # fmt: skip
    keys = ("input_ids", "attention_mask", "completion_mask")
    steps = []
    for batch_index in range(batches):
        rows = shuffled[batch_index * batch_size : (batch_index + 1) * batch_size]
        batch = collator([forget_examples[i] for i in rows])
        groups = [{key: batch[f"{name}_{key}"] for key in keys} for name in ("forget", "retain")]
        groups.append(select_negatives(batch, "gradual", 0.0)[0])
        steps.append(groups)
    return steps, tokenizer.pad_token_id


def layout(groups, bound, pad_id):
    """(model inputs, loss positions): packed rows under `bound`, or (bound None) one padded pass."""
    from gnm_trainer.data.packing import pack_groups, padded_loss_positions
    from gnm_trainer.gnm_trainer import GROUP_KEYS, pad_to_length

    if bound is not None:
        packed = pack_groups(groups, bound, pad_id)
        return packed.model_inputs(), packed.loss_positions
    length = max(g["input_ids"].shape[1] for g in groups)
    padded = {key: torch.cat([pad_to_length(g[key], length, pad_id if key == "input_ids" else 0) for g in groups])
              for key in GROUP_KEYS}  # fmt: skip
    inputs = {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]}
    return inputs, padded_loss_positions(padded["completion_mask"])


def status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(field + ":"))


def step_seconds_and_peak_bytes(model, inputs, positions, logits_only: bool) -> tuple[float, int]:
    """Forward + backward of the summed log-probabilities at `positions`; how far the resident set rose above where
    it started (Linux: VmHWM reset through /proc/self/clear_refs; large tensors are mapped and unmapped whole)."""
    from gnm_trainer.packed_forward import logits_only_at

    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the system: reused, it would hide part of the peak
    with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")
    before = status_kib("VmRSS")
    started = time.perf_counter()
    if logits_only:
        with logits_only_at(model, positions):
            logits = model(**inputs, use_cache=False).logits
    else:  # the logits of every position, the loss reading the same ones
        logits = model(**inputs, use_cache=False).logits
        logits = logits.reshape(-1, logits.shape[-1])[positions]
    loss = torch.log_softmax(logits.float(), -1).max(-1).values.sum()
    loss.backward()
    seconds = time.perf_counter() - started
    model.zero_grad(set_to_none=True)
    return seconds, (status_kib("VmHWM") - before) * 1024


def measure(model, steps, pad_id, bound, repeats: int, logits_only: bool = True) -> dict:
    seconds, tokens = 0.0, 0
    for groups in steps:
        inputs, positions = layout(groups, bound, pad_id)
        seconds += min(step_seconds_and_peak_bytes(model, inputs, positions, logits_only)[0] for _ in range(repeats))
        tokens += inputs["input_ids"].numel()
    return {"seconds": round(seconds, 3), "model_tokens": tokens}


def peak_in_fresh_process(args, name: str, bound, logits_only: bool) -> float:
    """MiB the resident set rose during the first batch's step, in an interpreter of its own (no allocator pool left
    by earlier steps to hide the peak)."""
    import subprocess
    import sys

    command = [sys.executable, __file__, "--data", args.data, "--models", name, "--memory-of",
               f"{bound or 'padded'},{int(logits_only)}"]  # fmt: skip
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])["step_peak_mib"]


def memory_of(args, steps, pad_id) -> None:
    bound, logits_only = args.memory_of.split(",")
    model = build_model(MODELS[args.models], "sdpa")
    inputs, positions = layout(steps[0], None if bound == "padded" else int(bound), pad_id)
    _, peak = step_seconds_and_peak_bytes(model, inputs, positions, logits_only == "1")
    print(json.dumps({"step_peak_mib": round(peak / 2**20, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/work/shared/data/lume")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default="tiny,20M")
    parser.add_argument("--bounds", default=",".join(map(str, BOUNDS)), help="max_packed_length values of the sweep")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # BOUND,LOGITS_ONLY: one step's peak, then exit
    args = parser.parse_args()
    from gnm_trainer.data.packing import DEFAULT_MAX_PACKED_LENGTH as DEFAULT

    torch.set_num_threads(1)
    steps, pad_id = step_batches(args.data, args.batches)
    if args.memory_of:
        return memory_of(args, steps, pad_id)
    real = sum(int(g["attention_mask"].sum()) for groups in steps for g in groups)
    print(json.dumps({"real_tokens": real, "sequences_per_step": sum(len(g["input_ids"]) for g in steps[0])}))
    for name in args.models.split(","):
        size = MODELS[name]
        model = build_model(size, "sdpa")
        measure(model, steps[:1], pad_id, DEFAULT, 1)  # warm-up
        for bound in (None, *map(int, args.bounds.split(","))):
            print(json.dumps({"model": name, "attention": "sdpa", "bound": bound or "padded",
                              **measure(model, steps, pad_id, bound, args.repeats)}), flush=True)  # fmt: skip
        for attention in ("eager", "flex_attention"):
            model.set_attn_implementation(attention)
            try:
                measure(model, steps[:1], pad_id, DEFAULT, 1)  # warm-up (flex compiles its block mask)
                figures = measure(model, steps, pad_id, DEFAULT, args.repeats)
            except NotImplementedError as error:  # torch 2.13: "FlexAttention does not support backward on CPU"
                figures = {"error": str(error).split(".")[0]}
            print(json.dumps({"model": name, "attention": attention, "bound": DEFAULT, **figures}), flush=True)
        model.set_attn_implementation("sdpa")
        print(json.dumps({"model": name, "attention": "sdpa", "bound": DEFAULT, "logits": "all positions",
                          **measure(model, steps, pad_id, DEFAULT, args.repeats, logits_only=False)}), flush=True)  # fmt: skip
        for bound, logits_only in ((None, False), (None, True), (DEFAULT, False), (DEFAULT, True)):
            peak = peak_in_fresh_process(args, name, bound, logits_only)
            print(json.dumps({"model": name, "bound": bound or "padded", "logits": "completion" if logits_only
                              else "all positions", "step_peak_mib": peak}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

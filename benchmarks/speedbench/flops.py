"""Model FLOPs of a LoRA training step and the model FLOPs utilisation (MFU) they give on a known GPU.

The count follows the usual convention (Kaplan et al. 2020; PaLM's MFU): 2 FLOPs per weight of a matrix multiply per
token for a forward pass, attention's length-squared term left out (the sequences here are a few hundred tokens on
a 768-wide model: a few percent). A LoRA step trains the adapters only, so its backward pass computes the gradient
of the activations (2 per weight per token) and not of the frozen weights: 4 per weight per token of the policy's
sequences (6 for a full fine-tune), plus 2 per reference token (the adapter-disabled forward). The weights counted
are those of the base model's linear layers, the LM head included; the adapters' own work is left out (rank 8).
"""

# Dense peak TFLOPS by precision, from the vendors' data sheets (without sparsity). Matched on the device name.
PEAK_TFLOPS = {
    "H200": {"float32": 66.9, "tf32": 494.7, "bfloat16": 989.4},
    "H100 PCIe": {"float32": 51.2, "tf32": 378.0, "bfloat16": 756.0},
    "H100 80GB HBM3": {"float32": 66.9, "tf32": 494.7, "bfloat16": 989.4},  # H100 SXM5
    "A100": {"float32": 19.5, "tf32": 156.0, "bfloat16": 312.0},
}


def linear_weights(model) -> int:
    """The weights of the base model's linear layers (the LM head included, LoRA's adapters not)."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    seen, total = set(), 0
    for name, module in base.named_modules():
        if isinstance(module, torch.nn.Linear) and "lora_" not in name and id(module.weight) not in seen:
            seen.add(id(module.weight))
            total += module.weight.numel()
    return total


def lora_step_flops(weights: int, policy_tokens: float, reference_tokens: float) -> float:
    """Model FLOPs of one LoRA step: forward and activation-gradient backward over the policy's tokens, a forward
    over the reference's."""
    return 4 * weights * policy_tokens + 2 * weights * reference_tokens


def matmul_precision(model_dtype) -> str:
    """The precision the model's matrix multiplies run in: its dtype, or tf32 for float32 when torch allows it."""
    import torch

    if model_dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "float32"
    return str(model_dtype).removeprefix("torch.")


def peak_tflops(device_name: str, precision: str) -> float | None:
    for known, peaks in PEAK_TFLOPS.items():
        if known in device_name:
            return peaks.get(precision)
    return None


def utilisation(flops_per_step: float, step_seconds: float, device_name: str | None, precision: str) -> dict:
    """Achieved model TFLOPS and, on a GPU whose peak is known, the MFU against the peak of `precision`."""
    achieved = flops_per_step / step_seconds / 1e12
    peak = peak_tflops(device_name, precision) if device_name else None
    return {
        "model_tflops_per_step": flops_per_step / 1e12,
        "achieved_model_tflops": achieved,
        "matmul_precision": precision,
        "peak_tflops": peak,
        "mfu": achieved / peak if peak else None,
    }
